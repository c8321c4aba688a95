#!/usr/bin/env python3
"""Random requests against a running `whale serve` (loopback): every answer must be a
2xx or an OpenAI-shaped 4xx error, never a 5xx; streams must end with [DONE]; JSON-mode
answers that stopped must parse; and the server must be idle with no pages held after.
Not part of CI (it needs a server); run by hand after changing request handling:

    whale serve --port 18092 --db /tmp/fz.db --max-context 512 &
    python3 tests/fuzz_server.py http://127.0.0.1:18092 [N] [SEED]
"""

import json
import random
import sys
import urllib.error
import urllib.request

OPTS = {
    "max_tokens": [1, 2, 5, None, 600, 0],
    "temperature": [0, 0.5, 2, None, 2.0001],
    "top_p": [0.01, 1, None, 0],
    "stop": [None, "=", ["+", "="], [""], "x" * 50],
    "n": [1, 2, 3, None, 17],
    "stream": [True, False, None],
    "stream_options": [None, {"include_usage": True}],
    "logprobs": [True, False, None],
    "top_logprobs": [0, 5, 20, None, 21],
    "seed": [None, 0, 7, -5],
    "top_k": [None, 0, 1, 5, -1],
    "min_p": [None, 0, 0.5, 1],
    "repetition_penalty": [None, 1, 1.5, 0.01],
    "response_format": [None, {"type": "text"}, {"type": "json_object"},
                        {"type": "json_schema", "json_schema": {"name": "a", "schema": {
                            "type": "object", "properties": {"x": {"type": "boolean"}},
                            "required": ["x"], "additionalProperties": False}}},
                        {"type": "json_schema", "json_schema": {"name": "b", "schema": {
                            "type": "array", "maxItems": 2, "items": {"enum": [1, 2]}}}}],
    "tools": [None, [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["a"], "additionalProperties": False}}}]],
    "tool_choice": [None, "none", "auto", "required", {"type": "function", "function": {"name": "f"}}],
    "messages": [[{"role": "user", "content": "What is 1 + 1?"}],
                 [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"},
                  {"role": "assistant", "content": "x", "prefix": True}],
                 [{"role": "user", "content": [{"type": "text", "text": "What is 2 + 2?"}]}],
                 [{"role": "assistant", "content": ""}]],
}


def main():
    base = sys.argv[1]
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 250
    random.seed(int(sys.argv[3]) if len(sys.argv) > 3 else 2)
    codes = {}
    for _ in range(n):
        body = {"model": "deepseek-chat"}
        for k, v in OPTS.items():
            if random.random() < 0.35:
                body[k] = random.choice(v)
        body.setdefault("messages", OPTS["messages"][0])
        if body.get("max_tokens") is None:
            body["max_tokens"] = 6
        path = random.choice(["/chat/completions", "/beta/chat/completions"])
        if random.random() < 0.2:
            path = "/v1/completions"
            body.pop("messages")
            body.pop("tools", None)
            body.pop("tool_choice", None)
            body["prompt"] = random.choice(["User: hi\n\nAssistant:", "x", [1, 2, 3]])
            if isinstance(body.get("logprobs"), bool):
                body["logprobs"] = 3
        req = urllib.request.Request(base + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                text, code = r.read().decode(), r.status
            if body.get("stream"):
                assert text.rstrip().endswith("data: [DONE]"), text[-200:]
                for ev in text.split("\n\n"):
                    if ev.startswith("data: {"):
                        json.loads(ev[6:])
            else:
                j = json.loads(text)
                rf = body.get("response_format") or {}
                if "chat" in path and rf.get("type") in ("json_object", "json_schema") and not body.get("tools"):
                    for ch in j["choices"]:
                        if ch["finish_reason"] == "stop":
                            json.loads(ch["message"]["content"])
        except urllib.error.HTTPError as e:
            code = e.code
            err = json.loads(e.read())["error"]
            assert {"message", "type", "param", "code"} <= set(err), err
            assert code < 500, (code, body, err)
        codes[code] = codes.get(code, 0) + 1
    with urllib.request.urlopen(base + "/metrics") as r:
        m = r.read().decode()
    held = [l for l in m.splitlines() if l.startswith(("vllm:num_requests_running", "vllm:num_requests_waiting"))]
    assert all(l.endswith(" 0") for l in held), held
    print("answers by status:", dict(sorted(codes.items())))


if __name__ == "__main__":
    main()
