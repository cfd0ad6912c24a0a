#!/usr/bin/env bash
# The main job, for now: set up .venv, generate a tiny model, and run offline generation.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/bootstrap.sh"
model="${PD_DEMO_MODEL:-$root/.tiny/llama}"
if [ ! -f "$model/config.json" ]; then
  python "$root/scripts/make_tiny_model.py" "$model" --arch llama
fi
python "$root/examples/offline_inference.py" --model "$model" "$@"
