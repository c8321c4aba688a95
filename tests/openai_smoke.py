#!/usr/bin/env python3
"""Smoke test of `whale serve` with the official `openai` Python package.

Starts `whale serve` on the bundled tiny model (open, loopback, a temporary
billing database), then drives it exactly as a user's OpenAI/DeepSeek client
would: chat (plain, streamed with usage, JSON mode, a forced tool call), FIM-less
legacy completions, model listing, and the error classes the SDK raises.

    python3 tests/openai_smoke.py [--whale target/debug/whale]
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import openai


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(base, proc, timeout=120):
    t = time.time()
    while time.time() - t < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"whale serve exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                if json.load(r)["status"] == "ok":
                    return
        except OSError:
            time.sleep(0.2)
    raise SystemExit("whale serve did not become healthy")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--whale", default="target/debug/whale")
    args = ap.parse_args()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.Popen(
            [args.whale, "serve", "--port", str(port), "--db", os.path.join(tmp, "w.db"),
             "--max-context", "1024", "--keepalive-secs", "1"],
            stderr=subprocess.PIPE, text=True)
        try:
            wait_healthy(base, proc)
            run(base)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    print("openai smoke: all checks passed")


def run(base):
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="sk-unused", max_retries=0)
    beta = openai.OpenAI(base_url=f"{base}/beta", api_key="sk-unused", max_retries=0)
    msgs = [{"role": "user", "content": "What is 37 + 48?"}]

    r = client.chat.completions.create(model="deepseek-chat", messages=msgs, temperature=0)
    assert r.choices[0].message.content == "37 + 48 = 85", r
    assert r.choices[0].finish_reason == "stop"
    u = r.usage
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    extra = u.model_extra
    assert extra["prompt_cache_hit_tokens"] + extra["prompt_cache_miss_tokens"] == u.prompt_tokens
    print("chat:", r.choices[0].message.content, u)

    chunks = list(client.chat.completions.create(
        model="deepseek-chat", messages=msgs, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "37 + 48 = 85", text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    print("stream:", len(chunks), "chunks")

    r = client.chat.completions.create(
        model="deepseek-chat", messages=[{"role": "user", "content": "Answer 37 + 48 in JSON."}],
        temperature=0, max_tokens=64, response_format={"type": "json_object"})
    assert isinstance(json.loads(r.choices[0].message.content), dict), r
    print("json mode:", r.choices[0].message.content)

    tools = [{"type": "function", "function": {
        "name": "add", "description": "Add two integers",
        "parameters": {"type": "object", "additionalProperties": False, "required": ["a", "b"],
                       "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                      "b": {"type": "integer", "minimum": 0, "maximum": 99}}}}}]
    r = client.chat.completions.create(
        model="deepseek-chat", messages=msgs, temperature=0, max_tokens=64, tools=tools,
        tool_choice={"type": "function", "function": {"name": "add"}})
    call = r.choices[0].message.tool_calls[0]
    assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "add"
    args = json.loads(call.function.arguments)
    assert set(args) == {"a", "b"}
    print("tool call:", call.function.name, args)

    r = beta.chat.completions.create(
        model="deepseek-chat", temperature=0,
        messages=msgs + [{"role": "assistant", "content": "37 + 48 =", "prefix": True}])
    assert r.choices[0].message.content == " 85", r
    print("prefix completion:", repr(r.choices[0].message.content))

    c = beta.completions.create(model="deepseek-coder", prompt="User: What is 37 + 48?\n\nAssistant:",
                                max_tokens=16, temperature=0)
    assert c.choices[0].text == " 37 + 48 = 85", c
    print("completions:", repr(c.choices[0].text))

    ids = [m.id for m in client.models.list()]
    assert "deepseek-chat" in ids and "deepseek-coder" in ids, ids

    for kwargs, err in [
        ({"model": "gpt-4"}, openai.BadRequestError),
        ({"model": "deepseek-chat", "temperature": 3}, openai.UnprocessableEntityError),
        ({"model": "deepseek-chat", "max_tokens": 5000}, openai.BadRequestError),
    ]:
        try:
            client.chat.completions.create(messages=msgs, **kwargs)
        except err as e:
            assert e.body["message"], e
            print(f"{err.__name__}: {e.body['message'][:60]}")
        else:
            raise AssertionError(f"{kwargs} was accepted")
    # Still serving.
    r = client.chat.completions.create(model="deepseek-chat", messages=msgs, temperature=0)
    assert r.choices[0].message.content == "37 + 48 = 85"


if __name__ == "__main__":
    sys.exit(main())
