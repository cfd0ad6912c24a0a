"""Engine-core output diffs -> per-request results (text, stop strings, n > 1)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from engine.detokenizer import IncrementalDetokenizer, decode_token
from engine.outputs import (
    CompletionOutput,
    EngineCoreOutput,
    OutputKind,
    RequestOutput,
    TokenLogprobs,
)
from engine.sampling_params import SamplingParams
from engine.stop_strings import StopStringMatcher

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass
class ProcessedOutputs:
    """What one ``OutputProcessor.process`` call produced."""

    request_outputs: list[RequestOutput] = field(default_factory=list)
    # Child ids that matched a stop string: finished here, still running in the engine.
    to_abort: list[str] = field(default_factory=list)


class _Completion:
    """One child sequence: token ids -> detokenizer -> stop matcher -> text."""

    def __init__(
        self,
        index: int,
        tokenizer: PreTrainedTokenizerBase,
        prompt_token_ids: list[int],
        params: SamplingParams,
        text_at_end: bool = False,
    ) -> None:
        self.index = index
        # Nobody reads the text before the end and no stop string needs it: detokenize
        # once, when the completion finishes (per-token detokenizing is most of the
        # host's work per step in a large offline batch).
        self._text_at_end = text_at_end and not params.stop
        self._pending_text_ids: list[int] = []
        self._include_stop = params.include_stop_str_in_output
        self._detokenizer = IncrementalDetokenizer(
            tokenizer, prompt_token_ids, params.skip_special_tokens
        )
        self._stop_matcher = StopStringMatcher(list(params.stop or []), self._include_stop)
        self.text = ""
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprobs] | None = [] if params.logprobs is not None else None
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self._num_sent_chars = 0
        self._num_sent_tokens = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def update(self, output: EngineCoreOutput) -> bool:
        """Applies one engine diff; True when a stop string ended the completion here."""
        self.token_ids.extend(output.new_token_ids)
        if self.logprobs is not None and output.new_logprobs:
            self.logprobs.extend(output.new_logprobs)
        text_ids = output.new_token_ids
        if _is_stop_token_finish(output) and not self._include_stop:
            text_ids = text_ids[:-1]  # the stop token stays in token_ids, not in text
        if self._text_at_end:
            self._pending_text_ids.extend(text_ids)
            if not output.finished:
                return False
            text_ids, self._pending_text_ids = self._pending_text_ids, []
        if self._consume(self._detokenizer.add_tokens(text_ids)):
            return True
        if output.finished and not self._consume(self._detokenizer.flush()):
            self.text += self._stop_matcher.flush()
            self.finish_reason = output.finish_reason
            self.stop_reason = output.stop_reason
        return False

    def snapshot(self, delta: bool) -> CompletionOutput:
        """The completion so far, or (``delta``) only what was not sent before."""
        first_char = self._num_sent_chars if delta else 0
        first_token = self._num_sent_tokens if delta else 0
        self._num_sent_chars = len(self.text)
        self._num_sent_tokens = len(self.token_ids)
        logprobs = None if self.logprobs is None else self.logprobs[first_token:]
        return CompletionOutput(
            index=self.index,
            text=self.text[first_char:],
            token_ids=self.token_ids[first_token:],
            logprobs=logprobs,
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
        )

    def _consume(self, new_text: str) -> bool:
        """Runs detokenized text through the stop matcher; True on a stop string."""
        if not new_text:
            return False
        safe_text, stop = self._stop_matcher.feed(new_text)
        self.text += safe_text
        if stop is None:
            return False
        self.finish_reason = "stop"
        self.stop_reason = stop
        return True


def _is_stop_token_finish(output: EngineCoreOutput) -> bool:
    return (
        output.finish_reason == "stop"
        and isinstance(output.stop_reason, int)
        and bool(output.new_token_ids)
    )


@dataclass
class _ParentRequest:
    """A user request: its ``n`` completions are engine requests of their own."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    kind: OutputKind
    child_ids: list[str]
    completions: list[_Completion]
    num_cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return all(completion.finished for completion in self.completions)

    @property
    def is_delta(self) -> bool:
        return self.kind is OutputKind.DELTA

    def make_output(self, changed: list[int]) -> RequestOutput:
        """Delta mode reports the changed completions; the other modes all of them."""
        indices = sorted(set(changed)) if self.is_delta else range(len(self.completions))
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            outputs=[self.completions[i].snapshot(self.is_delta) for i in indices],
            finished=self.finished,
            num_cached_tokens=self.num_cached_tokens,
        )


class OutputProcessor:
    """Detokenizes engine-core diffs, applies stop strings and groups ``n`` children.

    A request with ``n > 1`` runs in the engine as ``n`` children with ids
    ``f"{request_id}-{i}"``; their completions come back together in one
    ``RequestOutput`` whose ``outputs[j].index`` says which child it is.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self._tokenizer = tokenizer
        self._parents: dict[str, _ParentRequest] = {}
        # Unfinished children only: child id -> (parent, completion index).
        self._children: dict[str, tuple[_ParentRequest, int]] = {}
        self._token_texts: dict[int, str] = {}

    def add_request(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
        kind: OutputKind = OutputKind.CUMULATIVE,
    ) -> list[str]:
        """Registers a request; returns the child request ids to submit to the engine."""
        child_ids = (
            [request_id] if params.n == 1 else [f"{request_id}-{i}" for i in range(params.n)]
        )
        self._check_ids_free([request_id, *child_ids])
        text_at_end = kind is OutputKind.FINAL_ONLY
        completions = [
            _Completion(i, self._tokenizer, prompt_token_ids, params, text_at_end)
            for i in range(params.n)
        ]
        parent = _ParentRequest(
            request_id, prompt, list(prompt_token_ids), kind, child_ids, completions
        )
        self._parents[request_id] = parent
        for i, child_id in enumerate(child_ids):
            self._children[child_id] = (parent, i)
        return list(child_ids)

    def process(self, outputs: list[EngineCoreOutput]) -> ProcessedOutputs:
        """Applies one engine step; outputs of unknown or finished ids are ignored."""
        result = ProcessedOutputs()
        changed: dict[str, list[int]] = {}
        for output in outputs:
            entry = self._children.get(output.request_id)
            if entry is None:
                continue
            parent, index = entry
            completion = parent.completions[index]
            self._fill_decoded_tokens(output.new_logprobs)
            if completion.update(output) and not output.finished:
                result.to_abort.append(output.request_id)
            if completion.finished:
                del self._children[output.request_id]
            parent.num_cached_tokens = max(parent.num_cached_tokens, output.num_cached_tokens)
            changed.setdefault(parent.request_id, []).append(index)
        for request_id, indices in changed.items():
            parent = self._parents[request_id]
            if parent.kind is OutputKind.FINAL_ONLY and not parent.finished:
                continue
            result.request_outputs.append(parent.make_output(indices))
            if parent.finished:
                del self._parents[request_id]
        return result

    def abort(self, request_id: str) -> list[str]:
        """Forgets a request; returns its child ids that are still running in the engine."""
        parent = self._parents.pop(request_id, None)
        if parent is None:
            return []
        running = [cid for cid in parent.child_ids if cid in self._children]
        for child_id in running:
            del self._children[child_id]
        return running

    def has_unfinished(self) -> bool:
        return bool(self._parents)

    def _check_ids_free(self, ids: list[str]) -> None:
        taken = sorted({i for i in ids if i in self._parents or i in self._children})
        if taken:
            raise ValueError(f"request id(s) already in use: {taken}")

    def _fill_decoded_tokens(self, new_logprobs: list[TokenLogprobs] | None) -> None:
        # NOTE: fills the engine's Logprob objects in place; they are not shared.
        for token_logprobs in new_logprobs or []:
            for token_id, logprob in token_logprobs.items():
                if logprob.decoded_token is None:
                    logprob.decoded_token = self._token_text(token_id)

    def _token_text(self, token_id: int) -> str:
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = decode_token(self._tokenizer, token_id)
        return text
