#!/usr/bin/env bash
# The main job, for now: set up .venv, generate a tiny model, start pd-serve on it,
# answer one OpenAI chat request (streamed), and stop the server cleanly.
# Extra arguments go to pd-serve (e.g. --port 8000 --max-num-seqs 64).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/bootstrap.sh"
model="${PD_DEMO_MODEL:-$root/.tiny/llama}"
if [ ! -f "$model/config.json" ]; then
  python "$root/scripts/make_tiny_model.py" "$model" --arch llama
fi
port="${PD_DEMO_PORT:-8000}"
log="$(mktemp -t pd-serve.XXXXXX.log)"
pd-serve --model "$model" --served-model-name tiny-llama --host 127.0.0.1 --port "$port" \
  --max-model-len 512 "$@" >"$log" 2>&1 &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
for _ in $(seq 600); do
  grep -q "pd-serve ready" "$log" && break
  if ! kill -0 $server 2>/dev/null; then cat "$log"; exit 1; fi
  sleep 0.2
done
grep "pd-serve ready" "$log"
python "$root/examples/openai_chat.py" --base-url "http://127.0.0.1:$port/v1"
