"""Builds the model and its KV pool on one device and runs scheduled steps."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.forward_context import forward_context
from engine.input_batch import build_model_inputs
from engine.kv_cache import KVCacheLayout, allocate_kv_cache
from engine.layers.attention import Attention
from engine.models.registry import get_model_class
from engine.outputs import TokenLogprobs
from engine.sampler import Sampler, SamplingBatch, to_token_logprobs
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledSequence
from engine.sequence import Sequence
from engine.weight_loader import init_dummy_weights, load_weights

logger = logging.getLogger(__name__)

_GIB = 1 << 30
# NOTE: cuDNN's SDPA builds a graph per shape, and the context length changes
# every decode step; the other backends take our masks without that cost.
_SDPA_BACKENDS = [
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
]


# Allocates a rank's KV pool; a disaggregated rank passes one that places it where
# its peers can reach it (e.g. shared memory on CPU).
KVAllocator = Callable[[KVCacheLayout, torch.device], torch.Tensor]
LayerKVHook = Callable[[int], None]


class ModelRunner:
    def __init__(self, config: EngineConfig, allocate_kv: KVAllocator = allocate_kv_cache):
        self.config = config
        self.device = torch.device(config.device)
        self.block_size = config.cache.block_size
        self.model = self._load_model()
        self.attention_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        self.layout = self._kv_layout(self._num_blocks())
        self.kv_cache = allocate_kv(self.layout, self.device)
        for index, layer in enumerate(self.attention_layers):
            layer.kv_cache = self.kv_cache[index]
            layer.layer_index = index
        generator = torch.Generator(device=self.device).manual_seed(config.seed)
        self.sampler = Sampler(default_generator=generator)
        logger.info(
            "KV cache: %d blocks of %d tokens (%.2f GiB, %s)",
            self.layout.num_blocks,
            self.block_size,
            self.layout.total_bytes / _GIB,
            self.layout.dtype,
        )

    @property
    def num_blocks(self) -> int:
        return self.layout.num_blocks

    def _load_model(self) -> torch.nn.Module:
        model_config = self.config.model
        torch.manual_seed(self.config.seed)
        model_class = get_model_class(model_config.architecture)
        previous_dtype = torch.get_default_dtype()
        torch.set_default_dtype(model_config.dtype)
        try:
            with torch.device(self.device):
                model = model_class(model_config, self.config.scheduler.max_model_len)
        finally:
            torch.set_default_dtype(previous_dtype)
        if self.config.load_format == "dummy":
            init_dummy_weights(model, self.config.seed)
        else:
            load_weights(model, model_config.path)
        return model.eval()

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
        activations = self._profile_activation_bytes()
        used = total - free
        budget = int(total * self.config.cache.gpu_memory_utilization) - used - activations
        if budget <= 0:
            raise ValueError(
                f"no GPU memory left for the KV cache: {used / _GIB:.1f} GiB in use and "
                f"~{activations / _GIB:.1f} GiB for activations of "
                f"{total / _GIB:.1f} GiB; raise gpu_memory_utilization or lower "
                "max_num_batched_tokens"
            )
        return budget

    def _profile_activation_bytes(self) -> int:
        """Peak memory of one forward at the full token budget, measured with a
        throw-away KV cache just large enough for it."""
        sched = self.config.scheduler
        num_tokens = min(sched.max_num_batched_tokens, sched.max_model_len - 1)
        manager = BlockManager(-(-num_tokens // self.block_size), self.block_size, False)
        seq = Sequence("profile", [0] * num_tokens, SamplingParams(), arrival=0)
        manager.allocate(seq, num_tokens)
        layout = self._kv_layout(manager.num_blocks)
        cache = allocate_kv_cache(layout, self.device)
        for index, layer in enumerate(self.attention_layers):
            layer.kv_cache = cache[index]
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        self._forward([ScheduledSequence(seq, num_tokens)])
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - before
        del cache
        torch.cuda.empty_cache()
        return peak

    @torch.inference_mode()
    def _forward(
        self, scheduled: list[ScheduledSequence], on_layer_kv: LayerKVHook | None = None
    ) -> tuple[torch.Tensor, list[int]]:
        inputs = build_model_inputs(scheduled, self.block_size, self.device)
        inputs.metadata.on_layer_kv = on_layer_kv
        with forward_context(inputs.metadata), sdpa_kernel(_SDPA_BACKENDS):
            hidden = self.model(inputs.input_ids, inputs.positions)
            logits = self.model.compute_logits(hidden)
        return logits, inputs.sampling_rows

    @torch.inference_mode()
    def execute(
        self, scheduled: list[ScheduledSequence], on_layer_kv: LayerKVHook | None = None
    ) -> list[tuple[int, TokenLogprobs | None]]:
        """Run one step; returns (token id, logprobs) for each sequence that
        samples, in the order of ``scheduled``. ``on_layer_kv(i)`` is called once
        layer i's new K/V are written."""
        logits, rows = self._forward(scheduled, on_layer_kv)
        if not rows:
            return []
        seqs = [scheduled[i].seq for i in rows]
        batch = SamplingBatch.build(
            params=[s.params for s in seqs],
            prompt_token_ids=[s.prompt_token_ids for s in seqs],
            output_token_ids=[s.output_token_ids for s in seqs],
            generators=[s.generator for s in seqs],
            vocab_size=self.config.model.vocab_size,
            device=self.device,
        )
        out = self.sampler(logits, batch)
        token_ids = out.token_ids.tolist()  # the step's one read-back
        logprobs = to_token_logprobs(out, [s.params.logprobs for s in seqs])
        return list(zip(token_ids, logprobs, strict=True))
