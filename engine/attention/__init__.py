"""Attention backends: ``sdpa`` (portable reference) and ``triton`` (paged CUDA kernels)."""
