"""Triton kernels for CUDA devices. Import these modules only where CUDA (or, in tests,
Triton's interpreter) runs them: the engine's CPU path never needs triton."""
