"""Offline inference: ``LLM(model=...).generate(prompts, SamplingParams(...))``."""

from __future__ import annotations

import atexit
import itertools
import weakref
from collections.abc import Sequence

from engine.engine_core import EngineCore
from engine.output_processor import OutputProcessor
from engine.outputs import OutputKind, RequestOutput
from engine.sampling_params import SamplingParams
from engine.tokenizer import encode_chat, load_tokenizer
from pd.offline.backend import start_backend
from pd.offline.options import DataParallelPlacement, plain_dtype, queue_ports, scheduler_config

PromptType = str | list[int] | dict


class LLM:
    """Batch generation without a server; arguments follow vLLM's ``LLM`` (and, for data
    parallelism and the cluster scheduler, FastDeploy's). Sizes left as None are
    derived from the model (``max_model_len``) and the device's memory (KV blocks).

    - One DP rank (the default): one engine in this process. On CPU it runs torch's
      threads as the caller left them (``torch.set_num_threads``, ``OMP_NUM_THREADS``).
    - ``data_parallel_size=N``: an engine-core process per DP rank (each with its
      ``tensor_parallel_size`` devices, the next ones in order); prompts go to the least
      loaded rank, outputs come back in the caller's order. ``engine_worker_queue_port``
      ("6077,6078", a list, or one to count up from) sets their channels' ports;
      ``requests_per_rank`` says where requests went.
    - ``data_parallel_rank=r`` (with ``data_parallel_size``, ``data_parallel_address``
      and ``data_parallel_rpc_port``, the DP group's meeting point at DP rank 0): only
      rank r, in this process (vLLM's one process per DP rank; examples/data_parallel.py).
    - ``scheduler_name="splitwise"`` (``scheduler_host/port/topic/password/ttl``): the
      DP ranks register in that Redis cluster (role mixed) and requests go through its
      dispatcher, as an online instance's do; they may run on any rank of the topic.
    - ``enable_expert_parallel``: an MoE model splits whole experts over the TP ranks
      instead of each expert's width (engine/layers/fused_moe.py); dense models: no effect.

    Engine processes and ``tensor_parallel_size`` workers are spawned (a script that
    builds an ``LLM`` needs the ``if __name__ == "__main__":`` guard); ``shutdown()``
    or a ``with`` block stops them, as does the end of this process.
    """

    def __init__(
        self,
        model: str,
        tokenizer: str | None = None,
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
        async_scheduling: bool = True,
        tensor_parallel_size: int = 1,
        data_parallel_size: int = 1,
        data_parallel_rank: int | None = None,
        data_parallel_rank_local: int | None = None,
        data_parallel_address: str = "127.0.0.1",
        data_parallel_rpc_port: int = 0,
        engine_worker_queue_port: str | int | list[int] | None = None,
        enable_expert_parallel: bool = False,
        scheduler_name: str = "local",
        scheduler_host: str = "127.0.0.1",
        scheduler_port: int = 6379,
        scheduler_topic: str = "default",
        scheduler_password: str | None = None,
        scheduler_ttl: float = 900,
        scheduler_expire_period: int = 3000,
    ):
        engine_options = {  # make_engine_config's keywords, the same for every DP rank
            "model": model,
            "dtype": plain_dtype(dtype),
            "max_model_len": max_model_len,
            "max_num_seqs": max_num_seqs,
            "max_num_batched_tokens": max_num_batched_tokens,
            "num_gpu_blocks_override": num_gpu_blocks_override,
            "block_size": block_size,
            "device": device,
            "seed": seed,
            "enable_prefix_caching": enable_prefix_caching,
            "gpu_memory_utilization": gpu_memory_utilization,
            "cpu_kv_cache_space_gib": cpu_kv_cache_space_gib,
            "load_format": load_format,
            "attention_backend": attention_backend,
            "enforce_eager": enforce_eager,
            "async_scheduling": async_scheduling,
            "tensor_parallel_size": tensor_parallel_size,
            "enable_expert_parallel": enable_expert_parallel,
        }
        placement = DataParallelPlacement(
            data_parallel_size, data_parallel_rank, data_parallel_rank_local,
            data_parallel_address, data_parallel_rpc_port,
        )  # fmt: skip
        ports = queue_ports(engine_worker_queue_port, placement)
        scheduler = scheduler_config(
            scheduler_name, scheduler_host, scheduler_port, scheduler_topic, scheduler_password,
            scheduler_ttl, scheduler_expire_period,
        )  # fmt: skip
        self.tokenizer = load_tokenizer(tokenizer or model)
        self.backend = start_backend(engine_options, placement, scheduler, ports)
        self.config = self.backend.config  # the first DP rank's (all serve the same model)
        # The engine core when it runs in this process, else None.
        self.engine: EngineCore | None = getattr(self.backend, "engine", None)
        # NOTE: stops the engine processes when this LLM is collected, or when this
        # process exits without shutdown(): registered after they started, this exit
        # hook runs before multiprocessing's, which would wait for them forever.
        self._finalizer = weakref.finalize(self, self.backend.close)
        atexit.register(self._finalizer)
        self._request_ids = itertools.count()

    @property
    def requests_per_rank(self) -> dict[str, int]:
        """Engine requests (one per choice) each DP rank has taken, by rank name: "dp0",
        "dp1", ...; with splitwise, the cluster's rank ids (maybe other instances')."""
        return dict(self.backend.requests_per_rank)

    def shutdown(self) -> None:
        """Stop the engine processes and workers this LLM started; idempotent."""
        self._finalizer()
        atexit.unregister(self._finalizer)

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Generate for each prompt (text, token ids, or {"prompt"|"prompt_token_ids": ...});
        returns one finished output per prompt, in order."""
        prompt_list = _as_prompt_list(prompts)
        params_list = self._params_for(prompt_list, sampling_params)
        encoded = [self._encode(p) for p in prompt_list]
        for _, token_ids in encoded:  # validate everything before anything is queued
            self.backend.check_prompt(token_ids)
        return self._run(encoded, params_list)

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Generate replies to one conversation or a list of conversations."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [
            {"prompt_token_ids": ids, "prompt": text}
            for text, ids in (
                encode_chat(self.tokenizer, conv, add_generation_prompt, chat_template)
                for conv in conversations
            )
        ]
        return self.generate(prompts, sampling_params)

    def _params_for(
        self,
        prompts: list[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None,
    ) -> list[SamplingParams]:
        if sampling_params is None:
            return [SamplingParams()] * len(prompts)
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * len(prompts)
        params = list(sampling_params)
        if len(params) != len(prompts):
            raise ValueError(
                f"sampling_params has {len(params)} entries for {len(prompts)} prompts"
            )
        return params

    def _encode(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                return self._encode(prompt["prompt"])
            raise ValueError("a dict prompt needs 'prompt' or 'prompt_token_ids'")
        return None, list(prompt)

    def _run(
        self, encoded: list[tuple[str | None, list[int]]], params_list: list[SamplingParams]
    ) -> list[RequestOutput]:
        processor = OutputProcessor(self.tokenizer)
        order: list[str] = []
        added: list[str] = []
        try:
            for (text, token_ids), params in zip(encoded, params_list, strict=True):
                request_id = str(next(self._request_ids))
                children = processor.add_request(
                    request_id, text, token_ids, params, OutputKind.FINAL_ONLY
                )
                added += children
                self.backend.add(children, token_ids, params)
                order.append(request_id)
            finished = self._drain(processor)
        except BaseException:
            self.backend.abort(added)  # nothing stays allocated after an error
            self.backend.settle()
            raise
        return [finished[request_id] for request_id in order]

    def _drain(self, processor: OutputProcessor) -> dict[str, RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        while processor.has_unfinished():
            processed = processor.process(self.backend.outputs())
            if processed.to_abort:
                self.backend.abort(processed.to_abort)
            for output in processed.request_outputs:
                if output.finished:
                    finished[output.request_id] = output
        self.backend.settle()
        return finished


def _as_prompt_list(prompts: PromptType | Sequence[PromptType]) -> list[PromptType]:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts is empty")
    if all(isinstance(p, int) for p in prompts):
        return [prompts]  # one prompt given as token ids
    return prompts
