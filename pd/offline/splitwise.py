"""The offline backend in a splitwise (Redis) cluster: the LLM's DP ranks run as engine
processes registered in the topic (role mixed), and its requests go through the
cluster's dispatcher, as an online API server's do (``pd/splitwise_client.py``): any
live rank of the topic may run them, this LLM's or another instance's, and other
instances may send theirs to this LLM's ranks while it lives. Results come back on
the LLM's own result channel. Choices (``n``) are dispatched one by one, as online.
"""

from __future__ import annotations

import logging
import queue
import time
import uuid
from typing import Any

from engine.config import EngineConfig
from engine.engine_core import check_prompt
from engine.outputs import EngineCoreOutput
from engine.sampling_params import SamplingParams
from pd.args import DEFAULT_PROTOCOLS
from pd.cluster_instance import advertised_host
from pd.cluster_secret import engine_channel_key, load_cluster_secret
from pd.cluster_wire import entry_to_output, params_to_proto
from pd.offline.rank_processes import RankProcesses
from pd.rank.settings import RankSettings
from proto import cluster_pb2 as pb
from scheduler.config import SchedulerConfig
from scheduler.redis_link import SchedulerUnavailable
from scheduler.splitwise import SplitwiseFrontend

logger = logging.getLogger("pd.llm")

_POLL_S = 0.1  # between liveness checks while waiting for results


class RequestFailed(RuntimeError):
    """The cluster ended a request with an error (e.g. the rank running it died)."""


class SplitwiseBackend:
    def __init__(
        self,
        rank_kwargs: dict[int, dict[str, Any]],
        queue_ports: list[int],
        configs: dict[int, EngineConfig],
        scheduler: SchedulerConfig,
    ):
        self.config = next(iter(configs.values()))
        self.scheduler = scheduler
        self.instance_id = f"offline-{uuid.uuid4().hex[:12]}"
        # NOTE: the LLM numbers its requests from 0 and so does every other LLM; ranks
        # key requests by id across the topic, so the wire id carries this instance's.
        self._wire_prefix = f"{self.instance_id}-"
        secret = load_cluster_secret(None)  # PD_CLUSTER_SECRET, as pd-serve reads it
        host = advertised_host("0.0.0.0")
        settings = [
            RankSettings(
                role="mixed",
                rank_id=f"{self.instance_id}.dp{dp_rank}",
                host=host,
                model=kwargs["model"],
                scheduler=scheduler,
                protocols=list(DEFAULT_PROTOCOLS),
                secret=secret,
            )
            for dp_rank, kwargs in rank_kwargs.items()
        ]
        # Registered in the topic once ready (before their READY).
        self.ranks = RankProcesses(rank_kwargs, queue_ports, engine_channel_key(secret), settings)
        info = self.ranks.links[0].info
        assert info is not None  # ready
        self.max_model_len = info.max_model_len
        self.vocab_size = info.vocab_size
        self.requests_per_rank: dict[str, int] = {}
        self._started: set[str] = set()  # engine requests that have had a result
        self._closed = False
        self._results: queue.SimpleQueue[list[pb.ResultEntry]] = queue.SimpleQueue()
        # A request silent for longer than this was lost (a queued one is failed by its
        # rank past the scheduler's TTL; a dead rank's are re-dispatched or failed).
        self.idle_timeout_s = scheduler.ttl_s + 2 * scheduler.expire_period_s
        try:
            self.frontend = SplitwiseFrontend(scheduler, f"api-{self.instance_id}", self._deliver)
        except BaseException:
            self.ranks.close()
            raise
        logger.info("DP ranks %s registered in topic %r", [s.rank_id for s in settings],
                    scheduler.topic)  # fmt: skip

    def check_prompt(self, prompt_token_ids: list[int]) -> None:
        check_prompt(prompt_token_ids, self.max_model_len, self.vocab_size)

    def add(
        self, child_ids: list[str], prompt_token_ids: list[int], params: SamplingParams
    ) -> None:
        for index, child_id in enumerate(child_ids):
            self.frontend.submit(
                pb.DispatchedRequest(
                    request_id=self._wire_prefix + child_id,
                    prompt_token_ids=prompt_token_ids,
                    sampling=params_to_proto(params.for_child(index)),
                )
            )

    def _deliver(self, request_id: str, entries: list[pb.ResultEntry]) -> None:
        self._results.put(entries)  # the result reader's thread

    def outputs(self) -> list[EngineCoreOutput]:
        silent_since = time.monotonic()
        while True:
            try:
                batches = [self._results.get(timeout=_POLL_S)]
            except queue.Empty:
                self.ranks.check_alive("while running requests")
                if time.monotonic() - silent_since > self.idle_timeout_s:
                    raise RequestFailed(
                        f"no result for {self.idle_timeout_s:g} s: the requests were lost"
                    ) from None
                continue
            while not self._results.empty():
                batches.append(self._results.get_nowait())
            return [self._output(entry) for entries in batches for entry in entries]

    def _output(self, entry: pb.ResultEntry) -> EngineCoreOutput:
        request_id = entry.request_id.removeprefix(self._wire_prefix)
        if entry.finish_reason == "error":
            raise RequestFailed(f"request {request_id} failed: {entry.error}")
        if request_id not in self._started:
            self._started.add(request_id)
            name = entry.rank_id or "?"
            self.requests_per_rank[name] = self.requests_per_rank.get(name, 0) + 1
        if entry.finish_reason:
            self._started.discard(request_id)
        output = entry_to_output(entry)
        output.request_id = request_id
        return output

    def abort(self, child_ids: list[str]) -> None:
        for child_id in child_ids:
            self._started.discard(child_id)
            try:
                self.frontend.abort(self._wire_prefix + child_id)
            except SchedulerUnavailable as e:  # its rank finishes it; the results are dropped
                logger.warning("abort of %s not delivered: %s", child_id, e)

    def settle(self) -> None:
        """Nothing to wait for: an aborted request's late results are discarded by the
        frontend's reader."""

    def close(self) -> None:
        """Stop reading results, then stop the ranks (each deregisters); idempotent."""
        if not self._closed:
            self._closed = True
            self.frontend.close()
            self.ranks.close()
