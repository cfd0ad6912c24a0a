"""Offline inference: ``LLM(model=...).generate(prompts, SamplingParams(...))``."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from engine.config import make_engine_config
from engine.engine_core import EngineCore
from engine.output_processor import OutputProcessor
from engine.outputs import OutputKind, RequestOutput
from engine.sampling_params import SamplingParams
from engine.tokenizer import encode_chat, load_tokenizer

PromptType = str | list[int] | dict


class LLM:
    """One engine in this process, for batch generation without a server.

    Arguments follow vLLM's ``LLM``; sizes left as None are derived from the
    model (``max_model_len``) and the device's memory (number of KV blocks).
    On CPU it runs torch's threads as the caller left them (``torch.set_num_threads``,
    ``OMP_NUM_THREADS``); ``pd-serve`` chooses its own (``pd.cpu_threads``).

    ``enable_expert_parallel`` splits an MoE model's whole experts over the TP ranks
    instead of each expert's width (engine/layers/fused_moe.py).

    ``tensor_parallel_size=N`` starts N-1 worker processes (spawned: a script that
    builds an ``LLM`` needs the ``if __name__ == "__main__":`` guard); ``shutdown()``
    or a ``with`` block stops them, and they stop when this process exits.
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
        enable_expert_parallel: bool = False,
    ):
        self.config = make_engine_config(
            model,
            dtype=dtype,
            max_model_len=max_model_len,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            num_gpu_blocks_override=num_gpu_blocks_override,
            block_size=block_size,
            device=device,
            seed=seed,
            enable_prefix_caching=enable_prefix_caching,
            gpu_memory_utilization=gpu_memory_utilization,
            cpu_kv_cache_space_gib=cpu_kv_cache_space_gib,
            load_format=load_format,
            attention_backend=attention_backend,
            enforce_eager=enforce_eager,
            async_scheduling=async_scheduling,
            tensor_parallel_size=tensor_parallel_size,
            enable_expert_parallel=enable_expert_parallel,
        )
        self.tokenizer = load_tokenizer(tokenizer or model)
        self.engine = EngineCore(self.config)
        self._request_ids = itertools.count()

    def shutdown(self) -> None:
        """Stop the engine's worker processes (tensor parallelism); idempotent."""
        self.engine.close()

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
            self.engine.validate_prompt(token_ids)
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
                for index, child_id in enumerate(children):
                    self.engine.add_request(child_id, token_ids, params.for_child(index))
                    added.append(child_id)
                order.append(request_id)
            finished = self._drain(processor)
        except BaseException:
            self.engine.abort_requests(added)  # nothing stays allocated after an error
            self.engine.wait_in_flight()
            raise
        return [finished[request_id] for request_id in order]

    def _drain(self, processor: OutputProcessor) -> dict[str, RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        while processor.has_unfinished():
            processed = processor.process(self.engine.step())
            if processed.to_abort:
                self.engine.abort_requests(processed.to_abort)
            for output in processed.request_outputs:
                if output.finished:
                    finished[output.request_id] = output
        self.engine.wait_in_flight()  # rows of requests that ended while it ran
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
