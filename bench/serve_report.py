#!/usr/bin/env python3
"""Table of bench/serve_load.py results with the weight-bandwidth bound on batching.

A decode step of C sequences reads the non-routed weights once (F bytes) and every
routed expert that at least one of the C tokens picked, per MoE layer: with E
experts, top-k, random routing, the union is u(C) = E (1 - (1 - k/E)^C). The step
reads F + L u(C) X bytes (L MoE layers, X bytes per expert), so aggregate speed
can grow at most by C (F + L k X) / (F + L u(C) X) over one stream. Defaults are
DeepSeek-V2-Lite in Q4_0 (X = 3 x 2048 x 1408 weights at 18 bytes per 32; F + L k X
= 1.38 GB read per generated token, whale bench's decode_weight_bytes_per_token).

    python3 bench/serve_report.py bench/results/serve_load.jsonl
"""

import argparse
import json


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("jsonl")
    ap.add_argument("--per-token-bytes", type=float, default=1.38e9)
    ap.add_argument("--expert-bytes", type=float, default=3 * 2048 * 1408 * 18 / 32)
    ap.add_argument("--moe-layers", type=int, default=26)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--topk", type=int, default=6)
    a = ap.parse_args()
    rows = [json.loads(l) for l in open(a.jsonl) if l.strip()]
    routed1 = a.moe_layers * a.topk * a.expert_bytes
    fixed = a.per_token_bytes - routed1

    def bound(c, union=None):
        u = union if union is not None else a.experts * (1 - (1 - a.topk / a.experts) ** c)
        return c * a.per_token_bytes / (fixed + a.moe_layers * u * a.expert_bytes), u

    print("| engine | streams | gen tok/s | × 1 stream | bound (random routing) | % of bound | "
          "experts/MoE step (measured) | TTFT p50 / p99 s | ITL p50 / p99 ms | ITL p99 × 1 stream |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for eng in dict.fromkeys(r["engine"] for r in rows):
        er = [r for r in rows if r["engine"] == eng]
        one = next((r for r in er if r["streams"] == 1), None)
        for r in er:
            c = r["streams"]
            speed = r.get("decode_tok_s") or r["agg_tok_s"]
            x = speed / (one.get("decode_tok_s") or one["agg_tok_s"]) if one else float("nan")
            b, u = bound(c)
            meas = r.get("experts_per_moe_step")
            itl_x = r["itl_p99_s"] / one["itl_p99_s"] if one else float("nan")
            print(f"| {eng} | {c} | {speed:.2f} | {x:.2f}× | {b:.2f}× (u={u:.1f}) | {100 * x / b:.0f}% | "
                  f"{meas if meas is not None else '-'} | {r['ttft_p50_s']:.2f} / {r['ttft_p99_s']:.2f} | "
                  f"{1000 * r['itl_p50_s']:.0f} / {1000 * r['itl_p99_s']:.0f} | {itl_x:.2f}× |")


if __name__ == "__main__":
    main()
