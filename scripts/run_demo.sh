#!/usr/bin/env bash
# The main job: set up .venv, then start a local prefill/decode cluster (embedded Redis,
# one prefill and one decode pd-serve instance on SmolLM2-135M-Instruct), answer one
# OpenAI chat request with the official client (streamed, greedy), and stop everything
# cleanly. Extra arguments go to `pd-serve cluster` (e.g. --prefill 2 --decode 2,
# --model tiny, or instance flags such as --cache-transfer-protocol tcp).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/bootstrap.sh"
port="${PD_DEMO_PORT:-8000}"
log="$(mktemp -t pd-cluster.XXXXXX.log)"
pd-serve cluster --port "$port" --max-model-len 512 "$@" >"$log" 2>&1 &
cluster=$!
trap 'kill -TERM $cluster 2>/dev/null; wait $cluster 2>/dev/null || true' EXIT
for _ in $(seq 1500); do
  grep -q "OpenAI base URL" "$log" && break
  if ! kill -0 $cluster 2>/dev/null; then cat "$log"; exit 1; fi
  sleep 0.2
done
cat "$log"
base_url="$(grep "OpenAI base URL" "$log" | awk '{print $NF}')"
python "$root/examples/openai_chat.py" --base-url "$base_url"
