#!/usr/bin/env python3
"""Table (and plot) of bench/compare_llama_cpp.sh's results: whale against llama.cpp's better
flash-attention setting per figure. Usage: bench/report.py bench/results/compare.jsonl"""
import json
import sys
from collections import defaultdict
from pathlib import Path


def main(path):
    rows = [json.loads(l) for l in Path(path).read_text().splitlines() if l.strip()]
    llama = defaultdict(dict)  # (type, depth) -> {"pp": (best, fa), "tg": ...}
    whale = {}
    bandwidth = None
    for r in rows:
        row = r["row"]
        if r["engine"] == "machine":
            bandwidth = row["read_gb_s"]
            continue
        if r["engine"] == "llama.cpp":
            d = row.get("n_depth", 0)
            kind = "pp" if row["n_prompt"] > 0 else "tg"
            cur = llama[(r["type"], d)].get(kind)
            if cur is None or row["avg_ts"] > cur[0]:
                llama[(r["type"], d)][kind] = (row["avg_ts"], "fa on" if row.get("flash_attn") else "fa off")
        else:
            whale[(r["type"], row["depth"])] = row
    out = ["| file | depth | figure | llama.cpp (best fa) | whale | whale / llama.cpp |", "|---|---|---|---|---|---|"]
    for key in sorted(whale):
        t, d = key
        w = whale[key]
        for kind, field in [("pp", "pp_tok_s"), ("tg", "tg_tok_s")]:
            label = f"pp{w['n_prompt']}" if kind == "pp" else f"tg{w['n_gen']}"
            if w[field] == 0:
                continue
            l = llama.get(key, {}).get(kind)
            ratio = f"{w[field] / l[0]:.2f}x" if l else "-"
            lt = f"{l[0]:.2f} ({l[1]})" if l else "-"
            out.append(f"| {t} | {d} | {label} tok/s | {lt} | {w[field]:.2f} | {ratio} |")
        roof = f" ({w['achieved_gb_s'] / bandwidth:.0%} of {bandwidth:.1f} GB/s)" if bandwidth else ""
        out.append(f"| {t} | {d} | whale tg GB/s read (weights+cache){roof} | | {w['achieved_gb_s']:.1f} | |")
        if bandwidth:
            out.append(f"| {t} | {d} | tg roofline tok/s (bandwidth / bytes per token) | | "
                       f"{bandwidth * 1e9 / w['bytes_read_per_token']:.2f} | |")
        out.append(f"| {t} | {d} | whale peak RSS GB | | {w['peak_rss_bytes'] / 1e9:.2f} | |")
    table = "\n".join(out)
    print(table)
    Path(path).with_suffix(".md").write_text(table + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plot)", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for t in sorted({k[0] for k in whale}):
        ds = sorted(d for (tt, d) in whale if tt == t)
        ax.plot(ds, [whale[(t, d)]["tg_tok_s"] for d in ds], "o-", label=f"whale {t}")
        ld = [d for d in ds if "tg" in llama.get((t, d), {})]
        ax.plot(ld, [llama[(t, d)]["tg"][0] for d in ld], "s--", label=f"llama.cpp {t} (best fa)")
    ax.set_xlabel("depth (tokens in the cache)")
    ax.set_ylabel("generation tok/s (2 threads)")
    ax.set_title("Synthetic DeepSeek-V2-Lite")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(Path(path).with_suffix(".png"), dpi=110)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bench/results/compare.jsonl")
