#!/usr/bin/env bash
# Serving under load: whale serve and llama.cpp's llama-server on the same synthetic
# DeepSeek-V2-Lite GGUF, one after the other, same threads, driven by bench/serve_load.py
# at 1, 4, 8 and 16 concurrent streams (loopback only).
#
#   bench/serve_load.sh                      Q4_0, levels 1,4,8,16, 32 tokens per stream
#   LEVELS=1,8 TOKENS=64 bench/serve_load.sh
#   ENGINES=whale RESULTS=serve_load-whale bench/serve_load.sh   (one engine, other results file)
#   PER_TOKEN=1 bench/serve_load.sh   (logprobs requested: an event, so an interval, per token)
#   WHALE=/tmp/whale-old bench/serve_load.sh   (that binary instead of building this tree)
#
# Needs llama-server from bench/compare_llama_cpp.sh --build-only (cached in $WHALE_CACHE).
# Results: bench/results/serve_load.jsonl and serve_load.md (bench/serve_report.py).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${WHALE_CACHE:-$ROOT/target/llama-cpp}
THREADS=${THREADS:-2}
TYPE=${TYPE:-q4_0}
LEVELS=${LEVELS:-1,4,8,16}
TOKENS=${TOKENS:-32}
CTX=${CTX:-512}
SLOTS=${SLOTS:-16}
PORT=${PORT:-18080}
ENGINES=${ENGINES:-"whale llama-server"}
PER=()
[ -n "${PER_TOKEN:-}" ] && PER=(--per-token)
SERVER=$CACHE/build-0.3.36/bin/llama-server
# The build compare_llama_cpp.sh makes on a CPU with AMX tiles (see there why).
if grep -qw amx_tile /proc/cpuinfo && [ "${LLAMA_AMX:-0}" != 1 ]; then
  SERVER=$CACHE/build-0.3.36-noamx/bin/llama-server
fi
# Built only where it is run: ENGINES=whale needs no llama.cpp.
if [[ " $ENGINES " == *" llama-server "* ]] && [ ! -x "$SERVER" ]; then
  "$ROOT/bench/compare_llama_cpp.sh" --build-only
fi
if [ -z "${WHALE:-}" ]; then
  cargo build --release -p whale --manifest-path "$ROOT/Cargo.toml" -q
  WHALE=$ROOT/target/release/whale
fi
TOKENIZER=$CACHE/deepseek-v2-tokenizer.json
[ -f "$TOKENIZER" ] || gzip -dc "$ROOT/tests/fixtures/deepseek_v2_tokenizer.json.gz" > "$TOKENIZER"
MODEL=$CACHE/synth-v2-lite-$TYPE.gguf
[ -f "$MODEL" ] || "$WHALE" synth --preset deepseek-v2-lite --type "$TYPE" --tokenizer "$TOKENIZER" --out "$MODEL"
OUT=$ROOT/bench/results/${RESULTS:-serve_load}.jsonl
: > "$OUT"
TMP=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$TMP"' EXIT

wait_up() { # url
  for _ in $(seq 1 600); do
    curl -fs "$1/health" > /dev/null 2>&1 && return 0
    sleep 0.5
  done
  echo "server at $1 did not come up" >&2; exit 1
}

if [[ " $ENGINES " == *" whale "* ]]; then
echo "== whale serve ($TYPE, $THREADS threads, batch $SLOTS)"
"$WHALE" serve --model "$MODEL" --port "$PORT" --threads "$THREADS" --max-batch "$SLOTS" \
  --max-context "$CTX" --db "$TMP/w.db" 2> "$TMP/whale.log" &
PID=$!
wait_up "http://127.0.0.1:$PORT"
python3 "$ROOT/bench/serve_load.py" --url "http://127.0.0.1:$PORT" --engine whale \
  --levels "$LEVELS" --tokens "$TOKENS" --out "$OUT" "${PER[@]}"
kill $PID; wait $PID 2>/dev/null || true
fi

if [[ " $ENGINES " == *" llama-server "* ]]; then
echo "== llama-server ($TYPE, $THREADS threads, $SLOTS slots, flash attention on)"
"$SERVER" -m "$MODEL" --port "$PORT" -t "$THREADS" -np "$SLOTS" -c $((CTX * SLOTS)) -fa on -cb \
  > "$TMP/llama.log" 2>&1 &
PID=$!
wait_up "http://127.0.0.1:$PORT"
python3 "$ROOT/bench/serve_load.py" --url "http://127.0.0.1:$PORT" --engine llama-server \
  --levels "$LEVELS" --tokens "$TOKENS" --out "$OUT" "${PER[@]}"
kill $PID; wait $PID 2>/dev/null || true
fi

python3 "$ROOT/bench/serve_report.py" "$OUT" | tee "${OUT%.jsonl}.md"
