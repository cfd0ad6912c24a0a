"""Typed, validated configuration of one engine (one DP rank).

``EngineConfig`` composes a ``ModelConfig`` (read from the checkpoint's
config.json), a ``CacheConfig`` and a ``SchedulerConfig``; each checks its own
fields and raises ``ValueError`` naming what was wrong.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine.attention.backend import BACKEND_NAMES
from engine.gguf_metadata import model_folder
from engine.layers.fused_moe import local_expert_shape
from engine.moe_config import MoeConfig

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
}


def parse_dtype(name: str | torch.dtype, checkpoint_dtype: str | None) -> torch.dtype:
    """Map a user dtype name to torch; "auto" takes the checkpoint's (fp32 if unknown)."""
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return _DTYPES.get(checkpoint_dtype or "float32", torch.float32)
    if name not in _DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(_DTYPES)}; got {name!r}")
    return _DTYPES[name]


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    rope_type: str = "default"  # default | linear | llama3
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None
    # Rotate pairs of neighbouring dims (ERNIE-4.5, GPT-J) instead of the two halves.
    interleaved: bool = False

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> RopeConfig:
        # transformers>=5 writes "rope_parameters"; older checkpoints use
        # "rope_theta" + "rope_scaling". Accept both.
        params = dict(hf.get("rope_parameters") or {})
        scaling = dict(hf.get("rope_scaling") or {})
        params.update(scaling)
        default_theta = _DEFAULT_ROPE_THETA.get(hf.get("model_type", ""), 10000.0)
        theta = params.get("rope_theta", hf.get("rope_theta", default_theta))
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type not in ("default", "linear", "llama3"):
            raise ValueError(f"rope_scaling type {rope_type!r} is not supported yet")
        return cls(
            theta=float(theta),
            rope_type=rope_type,
            factor=float(params.get("factor", 1.0)),
            low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=params.get("original_max_position_embeddings"),
            interleaved=hf.get("model_type") == "ernie4_5_moe",
        )


# Where a config.json names no rope_theta, transformers' config class default.
_DEFAULT_ROPE_THETA = {"ernie4_5_moe": 500000.0}


@dataclass(frozen=True)
class Multipliers:
    """Granite's scalars (all neutral for other models): embeddings times ``embedding``,
    each sub-layer's output times ``residual`` before the residual add, attention
    scores times ``attention`` (None: head_dim ** -0.5), logits divided by
    ``logits_scaling``."""

    embedding: float = 1.0
    residual: float = 1.0
    attention: float | None = None
    logits_scaling: float = 1.0

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> Multipliers:
        attention = hf.get("attention_multiplier")
        return cls(
            embedding=float(hf.get("embedding_multiplier", 1.0)),
            residual=float(hf.get("residual_multiplier", 1.0)),
            attention=None if attention is None else float(attention),
            logits_scaling=float(hf.get("logits_scaling", 1.0)),
        )


@dataclass(frozen=True)
class ModelConfig:
    """What the engine needs from a Hugging Face config.json."""

    path: str
    architecture: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    rope: RopeConfig
    dtype: torch.dtype
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    multipliers: Multipliers = field(default_factory=Multipliers)
    moe: MoeConfig | None = None  # None: a dense model

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: str | torch.dtype = "auto") -> ModelConfig:
        """From a local HF folder, or a GGUF file (``path`` then stays the file, which
        the weight loader reads; config.json comes from its converted folder)."""
        folder = model_folder(path)
        config_file = folder / "config.json"
        if not config_file.is_file():
            raise ValueError(
                f"model: no config.json in {folder} (expected a local HF folder or a .gguf file)"
            )
        hf = json.loads(config_file.read_text())
        archs = hf.get("architectures") or []
        if not archs:
            raise ValueError(f"model: {config_file} names no architectures")
        heads = int(hf["num_attention_heads"])
        hidden = int(hf["hidden_size"])
        model_type = hf.get("model_type", "")
        return cls(
            path=str(Path(path)),
            architecture=archs[0],
            model_type=model_type,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(hf["intermediate_size"]),
            num_hidden_layers=int(hf["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(hf.get("head_dim") or hidden // heads),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            # Qwen2 always has q/k/v biases; Llama-family configs say so explicitly.
            attention_bias=model_type == "qwen2" or bool(hf.get("attention_bias", False)),
            rope=RopeConfig.from_hf(hf),
            dtype=parse_dtype(dtype, hf.get("torch_dtype") or hf.get("dtype")),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=_eos_ids(folder, hf),
            multipliers=Multipliers.from_hf(hf),
            moe=MoeConfig.from_hf(hf),
        )


def _eos_ids(folder: Path, hf: dict[str, Any]) -> tuple[int, ...]:
    """eos ids from generation_config.json (preferred, may be a list) or config.json."""
    eos: Any = hf.get("eos_token_id")
    gen_file = folder / "generation_config.json"
    if gen_file.is_file():
        eos = json.loads(gen_file.read_text()).get("eos_token_id", eos)
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    num_gpu_blocks_override: int | None = None
    gpu_memory_utilization: float = 0.9
    cpu_kv_cache_space_gib: float = 1.0
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 1, got {self.block_size}")
        if self.num_gpu_blocks_override is not None and self.num_gpu_blocks_override < 1:
            raise ValueError(
                f"num_gpu_blocks_override must be >= 1, got {self.num_gpu_blocks_override}"
            )
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if self.cpu_kv_cache_space_gib <= 0:
            raise ValueError(
                f"cpu_kv_cache_space_gib must be > 0, got {self.cpu_kv_cache_space_gib}"
            )


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int = 2048

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")


@dataclass(frozen=True)
class DataParallelConfig:
    """This engine's place among the DP ranks of its instance (which may span hosts).

    DP ranks share no state. With more than one, their engine cores form a DP group
    (``engine/data_parallel.py``) whose store DP rank 0 hosts at the master address:
    it checks at start-up that every rank serves the same model, and it is where
    expert parallelism's collectives meet.
    """

    rank: int = 0
    size: int = 1
    master_host: str = "127.0.0.1"
    master_port: int = 0  # DP rank 0's group store; must be set when size > 1

    def __post_init__(self) -> None:
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ValueError(f"data-parallel rank {self.rank} is outside 0..{self.size - 1}")
        if self.size > 1 and not 0 < self.master_port < 65536:
            raise ValueError(
                f"{self.size} data-parallel ranks need the DP master's port (1..65535), "
                f"got {self.master_port}"
            )


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    device: str = "cpu"
    seed: int = 0
    load_format: str = "auto"  # auto | dummy
    attention_backend: str = "auto"  # auto | sdpa | triton (engine/attention/backend.py)
    enforce_eager: bool = False  # no CUDA graphs
    # Schedule and submit step N+1 before step N's tokens are read back (mixed only).
    async_scheduling: bool = False
    tensor_parallel_size: int = 1  # worker processes of this DP rank, one device each
    data_parallel: DataParallelConfig = field(default_factory=DataParallelConfig)
    # MoE layers split whole experts over their group instead of each expert (dense
    # models: no effect).
    enable_expert_parallel: bool = False

    def __post_init__(self) -> None:
        tp = self.tensor_parallel_size
        if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
            raise ValueError(f"tensor_parallel_size must be an integer >= 1, got {tp!r}")
        self._check_tp_divides_the_model()
        if self.device.startswith("cuda"):
            first = torch.device(self.device).index or 0
            available = torch.cuda.device_count()
            if first + tp > available:
                raise ValueError(
                    f"tensor_parallel_size {tp} from {self.device} needs GPUs "
                    f"{first}..{first + tp - 1}; this host has {available}"
                )
        if self.attention_backend not in BACKEND_NAMES:
            raise ValueError(
                f"attention_backend must be one of {', '.join(BACKEND_NAMES)}; got "
                f"{self.attention_backend!r}"
            )
        if self.load_format not in ("auto", "safetensors", "dummy"):
            raise ValueError(
                f"load_format must be auto, safetensors or dummy; got {self.load_format!r}"
            )
        if self.scheduler.max_model_len > self.model.max_position_embeddings:
            raise ValueError(
                f"max_model_len ({self.scheduler.max_model_len}) is larger than the model's "
                f"max_position_embeddings ({self.model.max_position_embeddings})"
            )

    def _check_tp_divides_the_model(self) -> None:
        tp, model = self.tensor_parallel_size, self.model
        for name in ("num_attention_heads", "intermediate_size"):
            if getattr(model, name) % tp:
                raise ValueError(
                    f"tensor_parallel_size {tp} does not divide the model's {name} "
                    f"({getattr(model, name)})"
                )
        kv = model.num_key_value_heads
        if kv % tp and tp % kv:  # fewer ranks than KV heads share them, more replicate them
            raise ValueError(
                f"tensor_parallel_size {tp} and the model's num_key_value_heads ({kv}): one "
                "must divide the other"
            )
        if model.moe is not None:  # the MoE group: every DP x TP rank of the instance
            moe = model.moe
            local_expert_shape(
                moe.num_experts, moe.moe_intermediate_size, tp * self.data_parallel.size,
                self.enable_expert_parallel,
            )  # fmt: skip
            if moe.num_shared_experts and moe.shared_intermediate_size % tp:
                raise ValueError(
                    f"tensor_parallel_size {tp} does not divide the model's shared experts' "
                    f"intermediate size ({moe.shared_intermediate_size})"
                )


def rank_device(device: str, tp_rank: int) -> torch.device:
    """TP rank i's device: the i-th GPU from the configured one, or the CPU."""
    base = torch.device(device)
    if base.type != "cuda":
        return base
    return torch.device("cuda", (base.index or 0) + tp_rank)


def offset_device(device: str, offset: int) -> str:
    """``cuda[:i]`` moved ``offset`` GPUs on; the CPU stays the CPU."""
    if offset == 0 or not device.startswith("cuda"):
        return device
    return f"cuda:{(torch.device(device).index or 0) + offset}"


def resolve_device(name: str | None) -> str:
    """Map "auto"/None to cuda when available, else cpu; validate explicit names."""
    if name in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but CUDA is not available")
        return name
    if name != "cpu":
        raise ValueError(f"device must be auto, cpu or cuda[:N]; got {name!r}")
    return name


def make_engine_config(
    model: str,
    dtype: str = "auto",
    max_model_len: int | None = None,
    max_num_seqs: int = 256,
    max_num_batched_tokens: int | None = None,
    num_gpu_blocks_override: int | None = None,
    block_size: int = 16,
    device: str = "auto",
    seed: int = 0,
    enable_prefix_caching: bool = True,
    gpu_memory_utilization: float = 0.9,
    cpu_kv_cache_space_gib: float = 1.0,
    load_format: str = "auto",
    attention_backend: str = "auto",
    enforce_eager: bool = False,
    async_scheduling: bool = False,
    tensor_parallel_size: int = 1,
    data_parallel: DataParallelConfig | None = None,
    device_offset: int = 0,
    enable_expert_parallel: bool = False,
) -> EngineConfig:
    """One engine's config from flat user options (the ``LLM`` arguments and
    the ``pd-serve`` flags); sizes left as None are derived from the model.
    ``device_offset``: on CUDA, start this many GPUs after the given one (the local
    DP rank times the TP size: each DP rank takes the next GPUs in order)."""
    model_config = ModelConfig.from_pretrained(model, dtype)
    max_model_len = max_model_len or model_config.max_position_embeddings
    return EngineConfig(
        model=model_config,
        cache=CacheConfig(
            block_size=block_size,
            num_gpu_blocks_override=num_gpu_blocks_override,
            gpu_memory_utilization=gpu_memory_utilization,
            cpu_kv_cache_space_gib=cpu_kv_cache_space_gib,
            enable_prefix_caching=enable_prefix_caching,
        ),
        scheduler=SchedulerConfig(
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens or max(8192, max_model_len),
            max_model_len=max_model_len,
        ),
        device=offset_device(resolve_device(device), device_offset),
        seed=seed,
        load_format=load_format,
        attention_backend=attention_backend,
        enforce_eager=enforce_eager,
        async_scheduling=async_scheduling,
        tensor_parallel_size=tensor_parallel_size,
        data_parallel=data_parallel or DataParallelConfig(),
        enable_expert_parallel=enable_expert_parallel,
    )
