"""cuBLAS settings the engine prefers, applied before the process's first GEMM.

Batch-1 decode GEMMs (one token against a whole weight) are memory-bound. Given a
workspace, cuBLAS picks split-K algorithms for some of them, whose partial sums are
reduced by a second kernel per GEMM; without one it picks single-kernel algorithms
that stream the weight as fast. On an H200 (Llama-3.1-8B shape, bf16) that is 0.11 ms
of a 4.7 ms token (``benchmarks/gemm_bench.py``), and prefill and large batches
measured the same either way (``benchmarks/gpu_roofline.py``).

torch reads these variables once, when it first sizes a cuBLAS workspace: a process
that ran GEMMs before building an engine keeps what it had. A user's own values win.
"""

from __future__ import annotations

import os

WORKSPACE_FREE = {"CUBLAS_WORKSPACE_CONFIG": ":0:1", "CUBLASLT_WORKSPACE_SIZE": "0"}


def prefer_single_kernel_gemms() -> None:
    for name, value in WORKSPACE_FREE.items():
        os.environ.setdefault(name, value)
