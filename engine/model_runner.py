"""Builds the model and its KV pool on one device and runs forwards.

Start-up order matters on a GPU: load the weights, measure the peak memory of a
forward at the full token budget (and of a decode step at the largest CUDA-graph
batch), give what is left to the KV pool, then capture the decode graphs over it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np
import torch

from engine.attention.backend import select_backend
from engine.config import EngineConfig, rank_device
from engine.cublas_settings import prefer_single_kernel_gemms
from engine.cuda_graphs import CudaGraphRunner, capture_sizes
from engine.data_parallel import join_moe_group, spans_data_parallel
from engine.distributed import ParallelGroup
from engine.forward_context import AttentionMetadata, forward_context
from engine.input_batch import InputBatch, StepInputs
from engine.kv_cache import KVCacheLayout, allocate_kv_cache
from engine.layers.attention import Attention
from engine.layers.linear import num_local_kv_heads
from engine.models.registry import get_model_class
from engine.moe_config import MoeConfig
from engine.weight_loader import init_dummy_weights, load_weights

logger = logging.getLogger(__name__)

_GIB = 1 << 30

# Allocates a rank's KV pool; a disaggregated rank passes one that places it where
# its peers can reach it (e.g. shared memory on CPU).
KVAllocator = Callable[[KVCacheLayout, torch.device], torch.Tensor]
LayerKVHook = Callable[[int], None]


class ModelRunner:
    """One TP rank's model and KV shard. Every rank of the group builds its runner at
    the same time: loading, KV sizing and graph capture run collectives."""

    def __init__(
        self,
        config: EngineConfig,
        group: ParallelGroup,
        allocate_kv: KVAllocator = allocate_kv_cache,
    ):
        self.config = config
        self.group = group
        self.allocate_kv = allocate_kv  # what placed the pool (a transfer may need to know)
        self.device = rank_device(config.device, group.rank)
        if self.device.type == "cuda":
            prefer_single_kernel_gemms()
        self.block_size = config.cache.block_size
        num_kv_heads = num_local_kv_heads(config.model.num_key_value_heads, group.size)
        self.backend = select_backend(config.attention_backend, self.device, num_kv_heads)
        self.model = self._load_model()
        self.attention_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        self.graph_sizes: list[int] = []
        self.graphs: CudaGraphRunner | None = None
        if (
            self.device.type == "cuda"
            and not config.enforce_eager
            and self.backend.supports_cuda_graphs
            # NOTE: MoE over DP ranks exchanges token counts on the host at every layer
            # (variable all_to_all splits), which a graph cannot replay: eager steps.
            and not spans_data_parallel(config)
        ):
            self.graph_sizes = capture_sizes(config.scheduler.max_num_seqs)
        self.layout = self._kv_layout(self._num_blocks())
        self.kv_cache = allocate_kv(self.layout, self.device)
        self._bind_kv_cache(self.kv_cache)
        logger.info(
            "KV cache: %d blocks of %d tokens (%.2f GiB, %s); attention backend %s",
            self.layout.num_blocks,
            self.block_size,
            self.layout.total_bytes / _GIB,
            self.layout.dtype,
            self.backend.name,
        )
        if self.graph_sizes:
            self.graphs = self._capture_graphs()

    def _load_model(self) -> torch.nn.Module:
        model_config = self.config.model
        torch.manual_seed(self.config.seed)
        model_class = get_model_class(model_config.architecture)
        # MoE models shard their experts over the TP group (``moe_group`` defaults to it),
        # or over every DP x TP rank of the instance when there are several DP ranks.
        moe_kwargs = {}
        if model_config.moe is not None:
            moe_kwargs["expert_parallel"] = self.config.enable_expert_parallel
            if spans_data_parallel(self.config):
                moe_kwargs["moe_group"] = join_moe_group(self.config, self.group.rank, self.device)
        previous_dtype = torch.get_default_dtype()
        torch.set_default_dtype(model_config.dtype)
        try:
            with torch.device(self.device):
                model = model_class(
                    model_config, self.config.scheduler.max_model_len, self.group, **moe_kwargs
                )
        finally:
            torch.set_default_dtype(previous_dtype)
        if model_config.moe is not None and self.group.is_driver:
            self._log_expert_layout(model_config.moe, moe_kwargs.get("moe_group", self.group))
        if self.config.load_format == "dummy":
            init_dummy_weights(model, self.config.seed)
        else:
            load_weights(model, model_config.path)
        return model.eval()

    def expert_token_counts(self) -> list[int]:
        """Tokens routed to each expert since start, summed over the MoE layers (this
        DP rank's tokens); empty for a dense model. Waits for the device's queued work."""
        counts = [m.expert_tokens for m in self.model.modules() if hasattr(m, "expert_tokens")]
        return torch.stack(counts).sum(0).tolist() if counts else []

    def _log_expert_layout(self, moe: MoeConfig, moe_group: ParallelGroup) -> None:
        ranks, experts, width = moe_group.size, moe.num_experts, moe.moe_intermediate_size
        if self.config.enable_expert_parallel:
            layout = f"{experts // ranks} whole experts of {experts} per rank"
        else:
            layout = f"all {experts} experts, {width // ranks} of {width} wide, per rank"
        logger.info("MoE over %d rank(s): %s", ranks, layout)

    def _bind_kv_cache(self, kv_cache: torch.Tensor) -> None:
        for index, layer in enumerate(self.attention_layers):
            layer.kv_cache = kv_cache[index]
            layer.layer_index = index

    def _kv_layout(self, num_blocks: int) -> KVCacheLayout:
        attn = self.attention_layers[0]
        return KVCacheLayout(
            num_layers=len(self.attention_layers),
            num_blocks=num_blocks,
            block_size=self.block_size,
            num_kv_heads=attn.num_kv_heads,
            head_dim=attn.head_dim,
            dtype=self.config.model.dtype,
        )

    # -- forward ---------------------------------------------------------------------

    @torch.inference_mode()
    def forward(self, inputs: StepInputs, on_layer_kv: LayerKVHook | None = None) -> torch.Tensor:
        """Logits of the step's sampling rows: [S, vocab]. Decode-only steps without
        KV sends replay a captured CUDA graph when one fits."""
        if on_layer_kv is None and self.graphs is not None and self.graphs.can_run(inputs):
            return self.graphs.run(inputs)
        meta = AttentionMetadata(
            num_tokens=inputs.num_tokens,
            num_seqs=inputs.num_seqs,
            max_query_len=inputs.max_query_len,
            max_seq_len=inputs.max_seq_len,
            block_size=self.block_size,
            query_start_loc=inputs.query_start_loc,
            seq_lens=inputs.seq_lens,
            block_table=inputs.block_table,
            slot_mapping=inputs.slot_mapping,
            logits_index=inputs.logits_index,
            backend=self.backend,
            on_layer_kv=on_layer_kv,
        )
        self.backend.prepare(meta)
        with forward_context(meta):
            hidden = self.model(inputs.input_ids, inputs.positions)
            return self.model.compute_logits(hidden)

    def _capture_graphs(self) -> CudaGraphRunner:
        torch.cuda.synchronize(self.device)
        free_before = torch.cuda.mem_get_info(self.device)[0]
        started = time.perf_counter()
        graphs = CudaGraphRunner(
            self.model, self.backend, self.graph_sizes, self.config.scheduler.max_model_len,
            self.block_size, self.device,
        )  # fmt: skip
        graphs.capture()
        torch.cuda.synchronize(self.device)
        used = free_before - torch.cuda.mem_get_info(self.device)[0]
        logger.info(
            "CUDA graphs: %d decode batch sizes (1..%d) captured in %.1f s, %.2f GiB",
            len(self.graph_sizes),
            self.graph_sizes[-1],
            time.perf_counter() - started,
            used / _GIB,
        )
        return graphs

    # -- KV sizing ---------------------------------------------------------------------

    def _num_blocks(self) -> int:
        cache, sched = self.config.cache, self.config.scheduler
        blocks_per_seq = -(-sched.max_model_len // self.block_size)
        if cache.num_gpu_blocks_override is not None:
            num_blocks = cache.num_gpu_blocks_override
        else:
            per_block = self._kv_layout(1).bytes_per_block_all_layers
            num_blocks = self._kv_memory_budget() // per_block
            # More blocks than every sequence at full length could use only
            # feed the prefix cache; cap them so small models stay small.
            num_blocks = min(num_blocks, sched.max_num_seqs * blocks_per_seq)
        # One block manager serves every TP rank: the pool is what the smallest holds.
        num_blocks = self.group.all_reduce_min(num_blocks, self.device)
        if num_blocks < blocks_per_seq:
            raise ValueError(
                f"the KV cache holds {num_blocks} blocks of {self.block_size} tokens "
                f"({num_blocks * self.block_size} tokens), fewer than one sequence of "
                f"max_model_len {sched.max_model_len} needs: lower max_model_len or give "
                "the cache more memory/blocks"
            )
        return num_blocks

    def _kv_memory_budget(self) -> int:
        if self.device.type != "cuda":
            return int(self.config.cache.cpu_kv_cache_space_gib * _GIB)
        torch.cuda.synchronize(self.device)
        free, total = torch.cuda.mem_get_info(self.device)
        used = total - free
        sched = self.config.scheduler
        num_tokens = min(sched.max_num_batched_tokens, sched.max_model_len - 1)
        activations = self._profile_peak_bytes([num_tokens])
        # The graphs' shared pool holds about one decode step at the largest batch.
        graphs = self._profile_peak_bytes([1] * self.graph_sizes[-1]) if self.graph_sizes else 0
        budget = int(total * self.config.cache.gpu_memory_utilization) - used - activations - graphs
        logger.info(
            "GPU memory: %.2f GiB in use (weights), %.2f GiB for a forward of %d tokens, "
            "%.2f GiB for CUDA graphs, %.2f GiB left for the KV cache",
            used / _GIB, activations / _GIB, num_tokens, graphs / _GIB, budget / _GIB,
        )  # fmt: skip
        if budget <= 0:
            raise ValueError(
                f"no GPU memory left for the KV cache: {used / _GIB:.1f} GiB in use and "
                f"~{(activations + graphs) / _GIB:.1f} GiB for activations of "
                f"{total / _GIB:.1f} GiB; raise gpu_memory_utilization or lower "
                "max_num_batched_tokens"
            )
        return budget

    def _profile_peak_bytes(self, seq_lens: list[int]) -> int:
        """Peak memory of one forward computing whole sequences of ``seq_lens`` tokens,
        with a throw-away KV cache just large enough for them."""
        batch = InputBatch(len(seq_lens), max(seq_lens), self.block_size, self.device)
        num_blocks, rows = 0, []
        for num_tokens in seq_lens:
            blocks = -(-num_tokens // self.block_size)
            rows.append(
                batch.add([0] * num_tokens, list(range(num_blocks, num_blocks + blocks)), 0)
            )
            num_blocks += blocks
        num_new = np.asarray(seq_lens, dtype=np.int32)
        inputs = batch.prepare(np.asarray(rows), num_new, np.arange(len(rows)))
        cache = allocate_kv_cache(self._kv_layout(num_blocks), self.device)
        self._bind_kv_cache(cache)
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        self.forward(inputs)
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - before
        del cache
        torch.cuda.empty_cache()
        return peak
