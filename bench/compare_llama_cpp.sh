#!/usr/bin/env bash
# whale against llama.cpp on the same synthetic DeepSeek-V2-Lite GGUF, same machine, same threads.
#
#   bench/compare_llama_cpp.sh                 Q4_0 and Q8_0, depths 0 and 4096 (about an hour on 2 cores)
#   TYPES="q4_0" DEPTHS="0" bench/compare_llama_cpp.sh
#   KV=bf16 FIGS=tg TYPES=q4_0 DEPTHS=4096 bench/compare_llama_cpp.sh   both engines' caches in bf16, generation only
#   KV=bf16 LLAMA_KV=f16 ...                   whale's cache in bf16 against llama.cpp's in f16
#   bench/compare_llama_cpp.sh --build-only    just build llama-bench / llama-server
#
# Builds llama.cpp's own llama-bench from the llama-cpp-python source distribution (the llama.cpp
# vendored by llama-cpp-python 0.3.36; cmake and ninja from PyPI; about 10 minutes on 2 cores,
# cached in $WHALE_CACHE, default target/llama-cpp), writes the synthetic models with `whale synth`
# (cached), then measures each file, depth and figure (pp, then tg) in turn: llama-bench with flash
# attention off, `whale bench`, llama-bench with flash attention on, one repetition each, repeated
# REPS times. The engines alternate within minutes of each other because this kind of VM's speed
# drifts by 1.5x over a quarter of an hour; running one engine's whole block and then the other's
# compared different minutes. The read-bandwidth bench runs right before and right after each
# whale generation run (it moved from 15 to 24 GB/s within a minute here), and the roofline is
# their mean. Prints both engines' numbers and whale's ratio against
# llama.cpp's better flash-attention setting per figure. Results: bench/results/compare.jsonl
# (RESULTS=name to write bench/results/name.jsonl instead), with report.py's table (.md) and plot
# (.png) beside it.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${WHALE_CACHE:-$ROOT/target/llama-cpp}
VERSION=0.3.36
THREADS=${THREADS:-2}
TYPES=${TYPES:-"q4_0 q8_0"}
DEPTHS=${DEPTHS:-"0 4096"}
PP=${PP:-512}
TG=${TG:-128}
FIGS=${FIGS:-"pp tg"}    # which figures: pp, tg or both
KV=${KV:-f16}            # both engines' cache type: whale --kv-type, llama-bench -ctk/-ctv (f16 is both defaults)
LLAMA_KV=${LLAMA_KV:-$KV} # llama.cpp's alone, where it should differ
REPS=${REPS:-2}          # rounds at depth 0
DEEP_REPS=${DEEP_REPS:-1} # at depth > 0 (each run refills its cache: a round at 4096 is ~25 minutes)
SRC=$CACHE/llama_cpp_python-$VERSION/vendor/llama.cpp
BUILD=$CACHE/build-$VERSION
CPU_FLAGS=(-DGGML_NATIVE=ON)
# On a CPU with AMX tiles a native build compiles ggml's AMX path, and llama.cpp 0.3.36 then
# aborts while creating the context for this model (GGML_ASSERT(*cur_backend_id != -1) in
# ggml_backend_sched_split_graph: the AMX buffer type holds weights some op cannot read). With
# --repack 0 it runs, but without its AVX-512 repacked Q4_0 (pp512 23.5 against 33.8 tok/s on a
# Sapphire-Rapids-class Xeon, 2026-12-02). Its best working build there is the same ISA without
# AMX; LLAMA_AMX=1 keeps the native one.
if grep -qw amx_tile /proc/cpuinfo && [ "${LLAMA_AMX:-0}" != 1 ]; then
  BUILD=$CACHE/build-$VERSION-noamx
  CPU_FLAGS=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_BMI2=ON -DGGML_FMA=ON -DGGML_F16C=ON
    -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON)
fi
mkdir -p "$CACHE" "$ROOT/bench/results"

if [ ! -d "$SRC" ]; then
  TGZ=$CACHE/llama_cpp_python-$VERSION.tar.gz
  if [ ! -f "$TGZ" ]; then
    URL=$(curl -fsSL https://pypi.org/simple/llama-cpp-python/ | grep -o "https://[^\"#]*llama_cpp_python-$VERSION.tar.gz" | head -1)
    curl -fsSL "$URL" -o "$TGZ"
  fi
  tar -xzf "$TGZ" -C "$CACHE"
fi

if [ ! -x "$BUILD/bin/llama-bench" ]; then
  python3 -m venv "$CACHE/venv"
  "$CACHE/venv/bin/pip" install -q cmake ninja
  PATH="$CACHE/venv/bin:$PATH" cmake -S "$SRC" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    "${CPU_FLAGS[@]}" -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DBUILD_SHARED_LIBS=OFF > "$CACHE/cmake.log"
  PATH="$CACHE/venv/bin:$PATH" ninja -C "$BUILD" llama-bench llama-server > "$CACHE/ninja.log"
fi
[ "${1:-}" = "--build-only" ] && { echo "built $BUILD/bin/llama-bench"; exit 0; }

cargo build --release -p whale --manifest-path "$ROOT/Cargo.toml" -q
WHALE=$ROOT/target/release/whale
TOKENIZER=$CACHE/deepseek-v2-tokenizer.json
[ -f "$TOKENIZER" ] || gzip -dc "$ROOT/tests/fixtures/deepseek_v2_tokenizer.json.gz" > "$TOKENIZER"

OUT=$ROOT/bench/results/${RESULTS:-compare}.jsonl
: > "$OUT"
bandwidth() { # $1 type, $2 depth, $3 round
  echo "{\"engine\":\"machine\",\"type\":\"$1\",\"depth\":$2,\"round\":$3,\"row\":$(cargo bench -q -p whale-kernels --bench bandwidth --manifest-path "$ROOT/Cargo.toml" 2>/dev/null | tail -1)}" >> "$OUT"
}
llama() { # $1 type, $2 model, $3 depth, $4 round, $5 fa, then llama-bench's -p/-n
  "$BUILD/bin/llama-bench" -m "$2" -d "$3" -t "$THREADS" -fa "$5" -ctk "$LLAMA_KV" -ctv "$LLAMA_KV" -r 1 -o jsonl "${@:6}" \
    | sed "s/^/{\"engine\":\"llama.cpp\",\"type\":\"$1\",\"round\":$4,\"row\":/; s/\$/}/" >> "$OUT"
}
whale() { # $1 type, $2 model, $3 depth, $4 round, then whale bench's -p/-n
  "$WHALE" bench --model "$2" --depth "$3" --threads "$THREADS" --kv-type "$KV" -r 1 --json "${@:5}" \
    | sed "s/^/{\"engine\":\"whale\",\"type\":\"$1\",\"round\":$4,\"row\":/; s/\$/}/" >> "$OUT"
}
for T in $TYPES; do
  MODEL=$CACHE/synth-v2-lite-$T.gguf
  [ -f "$MODEL" ] || "$WHALE" synth --preset deepseek-v2-lite --type "$T" --tokenizer "$TOKENIZER" --out "$MODEL"
  for D in $DEPTHS; do
    R=$REPS; [ "$D" -gt 0 ] && R=$DEEP_REPS
    for ((i = 1; i <= R; i++)); do
      for FIG in $FIGS; do
        if [ "$FIG" = pp ]; then ARGS=(-p "$PP" -n 0); else ARGS=(-p 0 -n "$TG"); fi
        echo "== $T depth $D round $i/$R $FIG: llama-bench fa off, whale, llama-bench fa on ($(date -u +%H:%M))" >&2
        llama "$T" "$MODEL" "$D" "$i" 0 "${ARGS[@]}"
        [ "$FIG" = tg ] && bandwidth "$T" "$D" "$i"
        whale "$T" "$MODEL" "$D" "$i" "${ARGS[@]}"
        [ "$FIG" = tg ] && bandwidth "$T" "$D" "$i"
        llama "$T" "$MODEL" "$D" "$i" 1 "${ARGS[@]}"
      done
    done
  done
done
python3 "$ROOT/bench/report.py" "$OUT"
