#!/usr/bin/env python3
"""Bounded load generator for OpenAI-compatible servers on loopback.

For each concurrency level C it starts C streaming `/v1/completions` requests at
once (same prompt length, `max_tokens` N, `ignore_eos`), and reports aggregate
generation tokens/s (all generated tokens / wall time of the level), time to first
token and inter-token latency percentiles. Against whale it also reads /metrics
before and after each level: the mean number of distinct routed experts an MoE
layer read per step (the weight traffic that bounds batched decode) and the mean
sequences per step.

Loopback only: it refuses any other address. Standard library only.

    python3 bench/serve_load.py --url http://127.0.0.1:8000 --engine whale \
        --levels 1,4,8,16 --tokens 32 --out bench/results/serve_load.jsonl
"""

import argparse
import http.client
import ipaddress
import json
import os
import socket
import statistics
import threading
import time
import urllib.parse

PROMPT_WORDS = ("the quick brown fox jumps over the lazy dog while seven wise owls "
                "count stars above quiet hills").split()


RUN = 0


def prompt(i, words):
    # Different prompts per stream and per level (no prefix or prompt-cache reuse,
    # which llama-server's slots do for an identical prompt), same length.
    w = [PROMPT_WORDS[(i * 7 + k) % len(PROMPT_WORDS)] for k in range(words)]
    return f"Story {RUN}.{i}: " + " ".join(w)


def loopback(url):
    host = urllib.parse.urlparse(url).hostname
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except OSError:
        return False


def stream_one(url, model, text, tokens, out, per_token=False):
    u = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=3600)
    req = {"model": model, "prompt": text, "max_tokens": tokens, "stream": True,
           "temperature": 0, "ignore_eos": True, "stream_options": {"include_usage": True}}
    if per_token:
        # The sampled token's log-probability with every token: a server then sends
        # an event per token, also for a piece of a UTF-8 character it holds back.
        req["logprobs"] = 0
    body = json.dumps(req)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        out.update(error=f"{resp.status} {resp.read()[:200]!r}")
        return
    stamps = []
    usage = None
    buf = b""
    while True:
        chunk = resp.read1(65536)
        if not chunk:
            break
        buf += chunk
        while b"\n\n" in buf:
            event, buf = buf.split(b"\n\n", 1)
            for line in event.split(b"\n"):
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    continue
                d = json.loads(data)
                if d.get("usage"):
                    usage = d["usage"].get("completion_tokens")
                ch = d.get("choices") or []
                # One event per token for both engines; count events that carry text
                # (and, per token, those that carry a log-probability).
                if ch and (ch[0].get("text") or ch[0].get("content")
                           or (per_token and ch[0].get("logprobs"))):
                    stamps.append(time.perf_counter())
    conn.close()
    out.update(start=t0, stamps=stamps, tokens=usage or len(stamps))


def metrics(url):
    u = urllib.parse.urlparse(url)
    try:
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    except OSError:
        return {}
    m = {}
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        name, value = line.rsplit(" ", 1)
        name = name.split("{")[0]
        try:
            m[name] = m.get(name, 0.0) + float(value)
        except ValueError:
            pass
    return m


def pct(v, p):
    if not v:
        return None
    v = sorted(v)
    return v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))]


def level(args, c):
    global RUN
    RUN += 1
    before = metrics(args.url)
    outs = [dict() for _ in range(c)]
    threads = [threading.Thread(target=stream_one,
                                args=(args.url, args.model, prompt(i, args.prompt_words),
                                      args.tokens, outs[i], args.per_token)) for i in range(c)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    after = metrics(args.url)
    errors = [o["error"] for o in outs if "error" in o]
    if errors:
        raise SystemExit(f"{args.engine} at {c} streams: {errors[0]}")
    ttft = [o["stamps"][0] - o["start"] for o in outs if o["stamps"]]
    # Inter-token latency as clients see it, prefill stalls included.
    itl = [b - a for o in outs for a, b in zip(o["stamps"], o["stamps"][1:])]
    gen = sum(o["tokens"] for o in outs)
    if os.environ.get("SERVE_LOAD_DUMP"):
        # Raw figures for a closer look: per stream the events that carried text
        # against the tokens the server counted, and every interval.
        with open(os.environ["SERVE_LOAD_DUMP"], "a") as f:
            f.write(json.dumps({"engine": args.engine, "streams": c,
                                "text_events": [len(o["stamps"]) for o in outs],
                                "tokens": [o["tokens"] for o in outs],
                                "itl_s": sorted(round(x, 4) for x in itl)}) + "\n")
    # Steady state: the window in which every stream is decoding (from the last
    # stream's first token to the first stream's last token), tokens seen in it.
    lo = max(o["stamps"][0] for o in outs)
    hi = min(o["stamps"][-1] for o in outs)
    inside = sum(1 for o in outs for s in o["stamps"] if lo < s <= hi)
    decode = inside / (hi - lo) if hi > lo and inside >= c else None
    row = {"engine": args.engine, "streams": c, "tokens_per_stream": args.tokens,
           "generated": gen, "wall_s": round(wall, 3), "agg_tok_s": round(gen / wall, 3),
           "decode_tok_s": round(decode, 3) if decode else None,
           "ttft_p50_s": round(pct(ttft, 50), 3), "ttft_p99_s": round(pct(ttft, 99), 3),
           "itl_p50_s": round(pct(itl, 50), 4), "itl_p99_s": round(pct(itl, 99), 4)}
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    if d.get("whale_moe_layer_calls_total"):
        row["experts_per_moe_step"] = round(d["whale_moe_experts_touched_total"] / d["whale_moe_layer_calls_total"], 2)
        row["rows_per_moe_step"] = round(d["whale_moe_token_rows_total"] / d["whale_moe_layer_calls_total"], 2)
    if d.get("whale_steps_total"):
        row["seqs_per_step"] = round(d["whale_step_sequences_total"] / d["whale_steps_total"], 2)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", required=True)
    ap.add_argument("--engine", required=True, help="label for the results")
    ap.add_argument("--model", default="deepseek-chat")
    ap.add_argument("--levels", default="1,4,8,16")
    ap.add_argument("--tokens", type=int, default=32, help="max_tokens per stream")
    ap.add_argument("--prompt-words", type=int, default=16)
    ap.add_argument("--out", help="append JSON lines here")
    ap.add_argument("--per-token", action="store_true",
                    help="request logprobs so every token is an event: intervals between "
                         "tokens, not between pieces of text (a token that is part of a UTF-8 "
                         "character carries no text, and its interval merges into the next)")
    args = ap.parse_args()
    if not loopback(args.url):
        raise SystemExit(f"refusing to load {args.url}: loopback addresses only")
    # Warm up (first requests pay page faults and lazy allocation).
    level(args, 1)
    for c in [int(x) for x in args.levels.split(",")]:
        row = level(args, c)
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
