#!/usr/bin/env python3
"""Table (and plot) of bench/compare_llama_cpp.sh's results: whale against llama.cpp's better
flash-attention setting per figure. Usage: bench/report.py bench/results/compare.jsonl

Each figure is the mean over the script's rounds. The ratio column divides whale's mean by the
better setting's mean; "per round" gives each round's ratio against that round's better
llama.cpp run, which shows how far the machine drifted. The roofline share of a round divides
whale's achieved read rate by the mean of the bandwidth bench runs just before and after it. Files written before the
engines were interleaved (one whale row with both figures, one bandwidth row for the whole
run) read the same way."""
import json
import sys
from collections import defaultdict
from pathlib import Path


def mean(v):
    return sum(v) / len(v)


def main(path):
    rows = [json.loads(l) for l in Path(path).read_text().splitlines() if l.strip()]
    # (type, depth, kind) -> fa label -> round -> tok/s
    llama = defaultdict(lambda: defaultdict(dict))
    whale = defaultdict(dict)  # (type, depth, kind) -> round -> whale's row
    bandwidth = defaultdict(list)  # (type, depth, round) -> [GB/s]; ("-", None, None): all
    for r in rows:
        row = r["row"]
        if r["engine"] == "machine":
            bandwidth[(r["type"], r.get("depth"), r.get("round"))].append(row["read_gb_s"])
            continue
        if r["engine"] == "llama.cpp":
            kind = "pp" if row["n_prompt"] > 0 else "tg"
            fa = "fa on" if row.get("flash_attn") else "fa off"
            rounds = llama[(r["type"], row.get("n_depth", 0), kind)][fa]
            rounds[r.get("round", len(rounds) + 1)] = row["avg_ts"]
            continue
        for kind in ("pp", "tg"):
            if row[f"{kind}_tok_s"] > 0:
                rounds = whale[(r["type"], row["depth"], kind)]
                rounds[r.get("round", len(rounds) + 1)] = row

    out = [
        "| file | depth | figure | llama.cpp (better fa) | whale | whale / llama.cpp | per round |",
        "|---|---|---|---|---|---|---|",
    ]
    keys = sorted({(t, d) for (t, d, _) in whale})
    for t, d in keys:
        rss = []
        for kind, field in [("pp", "pp_tok_s"), ("tg", "tg_tok_s")]:
            w = whale.get((t, d, kind))
            if not w:
                continue
            first = next(iter(w.values()))
            label = f"pp{first['n_prompt']}" if kind == "pp" else f"tg{first['n_gen']}"
            wm = mean([row[field] for row in w.values()])
            rss += [row["peak_rss_bytes"] for row in w.values()]
            fas = llama.get((t, d, kind), {})
            if fas:
                best_fa = max(fas, key=lambda fa: mean(list(fas[fa].values())))
                lm = mean(list(fas[best_fa].values()))
                per_round = []
                for rnd, row in sorted(w.items()):
                    l = [fas[fa][rnd] for fa in fas if rnd in fas[fa]]
                    if l:
                        per_round.append(f"{row[field] / max(l):.2f}x")
                lt, ratio = f"{lm:.2f} ({best_fa})", f"**{wm / lm:.2f}x**"
            else:
                lt, ratio, per_round = "-", "-", []
            out.append(f"| {t} | {d} | {label} tok/s | {lt} | {wm:.2f} | {ratio} | {', '.join(per_round)} |")
            if kind != "tg":
                continue
            gbs, bws = [], []
            for rnd, row in sorted(w.items()):
                # The runs just before and after this round's whale run; an old file's single
                # row stands for every run.
                bw = bandwidth.get((t, d, rnd)) or bandwidth.get(("-", None, None))
                if bw:
                    gbs.append(row["achieved_gb_s"])
                    bws.append(mean(bw))
            if bws:
                shares = [g / b for g, b in zip(gbs, bws)]
                out.append(f"| {t} | {d} | whale tg GB/s read (weights+cache) / bandwidth bench GB/s "
                           f"(mean of the runs before and after) | "
                           f"| {mean(gbs):.1f} / {mean(bws):.1f} | **{mean(shares):.0%}** of roofline | "
                           f"{', '.join(f'{s:.0%}' for s in shares)} |")
                per_token = first["bytes_read_per_token"]
                out.append(f"| {t} | {d} | tg roofline tok/s (bandwidth / bytes per token) | | "
                           f"{mean(bws) * 1e9 / per_token:.2f} | | |")
            else:
                gbs = [row["achieved_gb_s"] for row in w.values()]
                out.append(f"| {t} | {d} | whale tg GB/s read (weights+cache) | | {mean(gbs):.1f} | | |")
        out.append(f"| {t} | {d} | whale peak RSS GB | | {max(rss) / 1e9:.2f} | | |")
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
    for t in sorted({k[0] for k in keys}):
        ds = sorted(d for (tt, d) in keys if tt == t and (t, d, "tg") in whale)
        ax.plot(ds, [mean([r["tg_tok_s"] for r in whale[(t, d, "tg")].values()]) for d in ds], "o-",
                label=f"whale {t}")
        ld = [d for d in ds if (t, d, "tg") in llama]
        best = [max(mean(list(v.values())) for v in llama[(t, d, "tg")].values()) for d in ld]
        ax.plot(ld, best, "s--", label=f"llama.cpp {t} (better fa)")
    ax.set_xlabel("depth (tokens in the cache)")
    ax.set_ylabel("generation tok/s (2 threads)")
    ax.set_title("Synthetic DeepSeek-V2-Lite")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(Path(path).with_suffix(".png"), dpi=110)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bench/results/compare.jsonl")
