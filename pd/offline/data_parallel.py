"""The offline backend of several DP ranks: an engine-core process per rank, each request
placed on the least loaded one.

Load is the work this LLM has open on a rank, counted in tokens: for each unfinished
engine request, its prompt plus the most it may generate (``max_tokens``, capped by
``max_model_len``). The LLM is its ranks' only client, so its own count is exact and
current, where the ranks' STATS lag by up to 100 ms (a whole batch is placed before
any step runs). Ties go to the lower rank, so placement is deterministic: a long
prompt sends the next short ones to the other ranks, equal prompts alternate. All
choices (``n``) of a request go to one rank, where they share the prompt's KV.
"""

from __future__ import annotations

from typing import Any

from engine.config import EngineConfig
from engine.engine_core import check_prompt
from engine.outputs import EngineCoreOutput
from engine.sampling_params import SamplingParams
from pd.cluster_secret import engine_channel_key
from pd.engine_messages import AddRequest, Kind
from pd.offline.rank_link import RankLink
from pd.offline.rank_processes import RankProcesses

_POLL_S = 0.1  # between liveness checks while waiting for outputs


class RequestRefused(ValueError):
    """A rank refused a request the LLM had checked (it should not happen)."""


class DataParallelBackend:
    def __init__(
        self,
        rank_kwargs: dict[int, dict[str, Any]],
        queue_ports: list[int],
        configs: dict[int, EngineConfig],
    ):
        self.config = next(iter(configs.values()))
        self.ranks = RankProcesses(rank_kwargs, queue_ports, engine_channel_key(None))
        info = self.ranks.links[0].info
        assert info is not None  # ready
        self.max_model_len = info.max_model_len
        self.vocab_size = info.vocab_size
        self.requests_per_rank = {f"dp{link.dp_rank}": 0 for link in self.ranks.links}
        self.open_tokens = {link.dp_rank: 0 for link in self.ranks.links}
        # Each unfinished engine request: its rank and the tokens it counts there.
        self._placed: dict[str, tuple[RankLink, int]] = {}

    def check_prompt(self, prompt_token_ids: list[int]) -> None:
        check_prompt(prompt_token_ids, self.max_model_len, self.vocab_size)

    def add(
        self, child_ids: list[str], prompt_token_ids: list[int], params: SamplingParams
    ) -> None:
        link = min(self.ranks.links, key=lambda link: self.open_tokens[link.dp_rank])
        max_new = params.max_tokens or self.max_model_len
        work = min(len(prompt_token_ids) + max_new, self.max_model_len)
        for index, child_id in enumerate(child_ids):
            request = AddRequest(child_id, prompt_token_ids, params.for_child(index))
            self.ranks.send(link, Kind.ADD, request)
            self._placed[child_id] = (link, work)
            self.open_tokens[link.dp_rank] += work
            self.requests_per_rank[f"dp{link.dp_rank}"] += 1

    def outputs(self) -> list[EngineCoreOutput]:
        while True:
            outputs = self._take()
            if outputs:
                return outputs
            self.ranks.check_alive("while running requests")
            self.ranks.poll(_POLL_S)

    def _take(self) -> list[EngineCoreOutput]:
        outputs: list[EngineCoreOutput] = []
        for link in self.ranks.links:
            for kind, payload in link.take():
                if kind is Kind.REJECTED:
                    request_id, message = payload
                    raise RequestRefused(f"DP rank {link.dp_rank} refused {request_id}: {message}")
                outputs.extend(payload)
        for output in outputs:
            if output.finished:
                self._forget(output.request_id)
        return outputs

    def abort(self, child_ids: list[str]) -> None:
        by_rank: dict[int, tuple[RankLink, list[str]]] = {}
        for child_id in child_ids:
            placed = self._placed.get(child_id)
            if placed is not None:
                by_rank.setdefault(placed[0].dp_rank, (placed[0], []))[1].append(child_id)
                self._forget(child_id)
        for link, ids in by_rank.values():
            self.ranks.send(link, Kind.ABORT, ids)

    def _forget(self, child_id: str) -> None:
        placed = self._placed.pop(child_id, None)
        if placed is not None:
            self.open_tokens[placed[0].dp_rank] -= placed[1]

    def settle(self) -> None:
        """Nothing to wait for: a rank answers an abort with an "abort" output, which
        arrives later and is ignored (its id is no longer placed)."""

    def close(self) -> None:
        self.ranks.close()
