"""Triton kernels for CUDA devices. Import these modules only where CUDA (or, in tests,
Triton's interpreter) runs them: the engine's CPU path never needs triton."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def can_run_triton(x: torch.Tensor) -> bool:
    """True for a CUDA tensor where triton imports: the layers then run our kernels."""
    return x.is_cuda and has_triton()


@functools.cache
def has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:  # CPU-only installs; CUDA builds of torch bring triton
        return False
    return True
