"""Shared fixtures and marker handling for the whole test suite."""

from __future__ import annotations

import importlib.util
import inspect
import os
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import pytest

INFINIBAND_SYSFS = Path("/sys/class/infiniband")

# Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors, so CI
# checks them too. NOTE: Triton reads this when a kernel is defined (at import of
# its module), so it is set here, before any test imports one.
if not Path("/dev/nvidiactl").exists():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Nothing in the tests may come from a model hub (models are generated, or local files).
# NOTE: huggingface_hub reads this when imported, so it is set before any test imports it;
# the servers and clusters that tests start inherit it.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TinyModelFactory = Callable[..., Path]


@cache
def has_cuda() -> bool:
    import torch  # NOTE: imported lazily so that torch-free test runs stay fast.

    return torch.cuda.is_available()


@cache
def has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


@cache
def has_rdma_device() -> bool:
    """True where `ibv_devices` would list a device (the sysfs class is non-empty)."""
    return INFINIBAND_SYSFS.is_dir() and any(INFINIBAND_SYSFS.iterdir())


_MARKER_SKIPS: dict[str, tuple[Callable[[], bool], str]] = {
    "gpu": (has_cuda, "needs CUDA"),
    "rdma": (has_rdma_device, "no RDMA device (ibv_devices lists none)"),
    "triton": (has_triton, "needs triton (a dev extra on Linux x86_64)"),
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        for marker, (is_available, reason) in _MARKER_SKIPS.items():
            if item.get_closest_marker(marker) is not None and not is_available():
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> TinyModelFactory:
    """Factory: ``tiny_model(arch="llama", **kwargs) -> Path`` of a generated model.

    Takes the keyword arguments of ``scripts.make_tiny_model.make_tiny_model``.
    Each distinct argument set (after defaults) is generated once per session;
    treat the returned folder as read-only, it is shared between tests.
    """
    from scripts.make_tiny_model import make_tiny_model

    signature = inspect.signature(make_tiny_model)
    models: dict[tuple[tuple[str, Any], ...], Path] = {}

    def make(arch: str = "llama", **kwargs: Any) -> Path:
        bound = signature.bind(None, arch=arch, **kwargs)
        bound.apply_defaults()
        key = tuple((k, v) for k, v in bound.arguments.items() if k != "out_dir")
        if key not in models:
            out_dir = tmp_path_factory.mktemp(f"tiny-{arch}")
            models[key] = make_tiny_model(out_dir, **dict(key))
        return models[key]

    return make


@pytest.fixture(scope="session")
def tiny_gguf(tiny_model: TinyModelFactory, tmp_path_factory: pytest.TempPathFactory):
    """Factory: ``tiny_gguf(arch="llama", tensor_type="F32", types=None) -> Path`` of the
    tiny model written as a GGUF file (``tests/engine/gguf_files.py``), once per session."""
    from tests.engine.gguf_files import write_gguf

    files: dict[tuple[str, str, tuple[tuple[str, str], ...]], Path] = {}

    def make(arch: str = "llama", tensor_type: str = "F32", types: dict | None = None) -> Path:
        key = (arch, tensor_type, tuple(sorted((types or {}).items())))
        if key not in files:
            out = tmp_path_factory.mktemp(f"gguf-{arch}-{tensor_type}") / "tiny.gguf"
            files[key] = write_gguf(tiny_model(arch), out, tensor_type, types)
        return files[key]

    return make
