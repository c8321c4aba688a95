#!/usr/bin/env bash
# Time to answer a long prompt on the synthetic V2-Lite GGUF, cold and then after a
# server restart with the prefix cache on disk (`whale serve --prefix-cache-dir`):
# the second answer reads the prompt's pages back instead of prefilling them.
#
#   WHALE_CACHE=/tmp/llcpp bench/prefix_disk.sh        (needs the Q4_0 file of serve_load.sh)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${WHALE_CACHE:-$ROOT/target/llama-cpp}
MODEL=${MODEL:-$CACHE/synth-v2-lite-q4_0.gguf}
PORT=${PORT:-18091}
SENTENCES=${SENTENCES:-90}
[ -f "$MODEL" ] || { echo "no $MODEL: run bench/serve_load.sh or whale synth first" >&2; exit 1; }
cargo build --release -p whale --manifest-path "$ROOT/Cargo.toml" -q
WHALE=$ROOT/target/release/whale
TMP=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$TMP"' EXIT
BODY=$(python3 - "$SENTENCES" <<'PY'
import json, sys
n = int(sys.argv[1])
prompt = " ".join(f"The quick brown fox jumps over the lazy dog number {i}." for i in range(n))
print(json.dumps({"model": "deepseek-chat", "prompt": prompt, "max_tokens": 2, "temperature": 0}))
PY
)
for round in cold restarted; do
  RUST_LOG=${RUST_LOG:-info,whale_engine=debug} "$WHALE" serve --model "$MODEL" --port "$PORT" --threads 2 --db "$TMP/w.db" \
    --prefix-cache-dir "$TMP/prefixes" 2> "$TMP/serve-$round.log" &
  PID=$!
  for _ in $(seq 1 600); do curl -fs "http://127.0.0.1:$PORT/health" > /dev/null 2>&1 && break; sleep 0.5; done
  t0=$(date +%s.%N)
  out=$(curl -s "http://127.0.0.1:$PORT/v1/completions" -H 'content-type: application/json' -d "$BODY")
  t1=$(date +%s.%N)
  python3 - "$round" "$(echo "$t1 - $t0" | bc)" "$out" <<'PY'
import json, sys
r, s, out = sys.argv[1], float(sys.argv[2]), json.loads(sys.argv[3])
u = out["usage"]
print(f"{r:10s} {s:7.2f} s  prompt {u['prompt_tokens']} tokens, {u['prompt_cache_hit_tokens']} from the cache; text {out['choices'][0]['text']!r}")
PY
  # Let the background write finish before the restart.
  for _ in $(seq 1 100); do ls "$TMP/prefixes"/*.wkv > /dev/null 2>&1 && break; sleep 0.1; done
  kill $PID; wait $PID 2>/dev/null || true
done
du -sh "$TMP/prefixes"
grep -h "tokens read in" "$TMP"/serve-*.log || true
