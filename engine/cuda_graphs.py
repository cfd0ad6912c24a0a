"""CUDA graphs for decode-only steps.

A decode step of a small batch is launch-bound: hundreds of short kernels issued
from Python. Each batch size of a ladder is captured once at start-up (largest
first, into one shared memory pool); a step of n sequences replays the smallest
graph of size b >= n after copying its inputs into the graphs' static buffers.
Rows n..b-1 are padding: context length 0 (attention writes zeros) and slot -1
(their K/V are dropped), so they never touch a real request's blocks.
"""

from __future__ import annotations

import bisect

import torch
from torch import nn

from engine.attention.backend import AttentionBackend
from engine.forward_context import AttentionMetadata, forward_context
from engine.input_batch import StepInputs

MAX_CAPTURE_SIZE = 512


def capture_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then steps of 8 to 64, 16 to 256, 32 to 512; the largest is
    ``max_num_seqs`` (capped at 512; larger decode batches run eagerly)."""
    top = min(max_num_seqs, MAX_CAPTURE_SIZE)
    ladder = [1, 2, 4, *range(8, 64, 8), *range(64, 256, 16), *range(256, 513, 32)]
    return sorted({size for size in ladder if size < top} | {top})


class CudaGraphRunner:
    def __init__(
        self,
        model: nn.Module,
        backend: AttentionBackend,
        sizes: list[int],
        max_model_len: int,
        block_size: int,
        device: torch.device,
    ):
        self.model = model
        self.backend = backend
        self.sizes = sizes
        self.max_model_len = max_model_len
        self.block_size = block_size
        max_size = sizes[-1]
        max_blocks = -(-max_model_len // block_size)

        def zeros(*shape: int, dtype: torch.dtype = torch.int32) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, device=device)

        # Static inputs: every graph reads the first b rows of these.
        self.rows = zeros(3, max_size)  # one copy fills all three (StepInputs.decode_rows)
        self.input_ids, self.positions, self.seq_lens = self.rows
        self.block_table = zeros(max_size, max_blocks)
        self.slot_mapping = torch.full((max_size,), -1, dtype=torch.int64, device=device)
        self.query_start_loc = torch.arange(max_size + 1, dtype=torch.int32, device=device)
        self.logits_index = torch.arange(max_size, dtype=torch.int64, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def _metadata(self, size: int) -> AttentionMetadata:
        meta = AttentionMetadata(
            num_tokens=size,
            num_seqs=size,
            max_query_len=1,
            max_seq_len=self.max_model_len,  # the longest context any replay may have
            block_size=self.block_size,
            query_start_loc=self.query_start_loc[: size + 1],
            seq_lens=self.seq_lens[:size],
            block_table=self.block_table[:size],
            slot_mapping=self.slot_mapping[:size],
            logits_index=self.logits_index[:size],
            backend=self.backend,
        )
        self.backend.prepare(meta)
        return meta

    def _forward(self, size: int, meta: AttentionMetadata) -> torch.Tensor:
        with forward_context(meta):
            hidden = self.model(self.input_ids[:size], self.positions[:size])
            return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def capture(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.sizes):
            meta = self._metadata(size)
            self._forward(size, meta)  # warm-up: compiles kernels, picks cuBLAS algorithms
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = self._forward(size, meta)
            self.graphs[size] = (graph, logits)

    def can_run(self, inputs: StepInputs) -> bool:
        return inputs.max_query_len == 1 and inputs.num_seqs <= self.sizes[-1]

    def run(self, inputs: StepInputs) -> torch.Tensor:
        """Logits of the sampling rows, [S, vocab] (a view of the graph's output,
        valid until the next replay)."""
        num_seqs = inputs.num_seqs
        size = self.sizes[bisect.bisect_left(self.sizes, num_seqs)]
        assert inputs.decode_rows is not None
        self.rows[:, :num_seqs].copy_(inputs.decode_rows)
        self.slot_mapping[:num_seqs].copy_(inputs.slot_mapping)
        if size > num_seqs:  # NOTE: stale rows hold real slots of earlier batches
            self.seq_lens[num_seqs:size].zero_()
            self.slot_mapping[num_seqs:size].fill_(-1)
        width = inputs.block_table.shape[1]
        self.block_table[:num_seqs, :width].copy_(inputs.block_table)
        graph, logits = self.graphs[size]
        graph.replay()
        if inputs.logits_index.numel() == num_seqs:  # every row samples: index = row
            return logits[:num_seqs]
        return logits[inputs.logits_index]
