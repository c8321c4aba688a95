#!/usr/bin/env python3
"""Start to first token on a warm page cache (issue 5's target: <= 2 s for the 8.9 GB Q4_0 file).

    python3 bench/first_token.py --model FILE.gguf [--runs 3] [--whale target/release/whale]

Each run reads the model file once (so its pages are in the page cache: the "warm" start), then
starts `whale generate --prompt ... --max-tokens 8` and times, from the moment the process is
spawned, the first byte it writes on stdout (the first generated text) and its exit. Prints one
JSON object per run and a summary line.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def warm(path):
    """Reads the whole file so that the next start finds it in the page cache."""
    with open(path, "rb", buffering=0) as f:
        while f.read(16 << 20):
            pass


def time_first_byte(cmd, env):
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    first = p.stdout.read(1)
    t1 = time.perf_counter()
    rest = p.stdout.read()
    p.wait()
    t2 = time.perf_counter()
    if p.returncode != 0:
        sys.exit(f"{cmd[0]} exited with {p.returncode}")
    if not first:
        sys.exit(f"{cmd[0]} wrote nothing on stdout")
    return t1 - t0, t2 - t0, (first + rest).decode("utf-8", "replace")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--whale", default="target/release/whale")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", default="Hello, how are you?")
    a = ap.parse_args()
    env = dict(os.environ, RAYON_NUM_THREADS=str(a.threads))
    engines = [("whale", [a.whale, "generate", "--model", a.model, "--prompt", a.prompt,
                          "--max-tokens", "8"])]
    firsts = {name: [] for name, _ in engines}
    for r in range(a.runs):
        for name, cmd in engines:
            warm(a.model)
            first, total, text = time_first_byte(cmd, env)
            firsts[name].append(first)
            print(json.dumps({"engine": name, "run": r + 1, "first_byte_s": round(first, 3),
                              "exit_s": round(total, 3), "text": text[:80]}), flush=True)
    for name, xs in firsts.items():
        print(f"{name}: first byte median {statistics.median(xs):.2f} s, "
              f"min {min(xs):.2f}, max {max(xs):.2f} over {len(xs)} warm starts")


if __name__ == "__main__":
    main()
