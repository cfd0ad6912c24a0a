"""The API server's handle on a splitwise cluster.

Requests go through Redis to whichever prefill and decode ranks the dispatcher picks
(this instance's own rank or any other); their tokens come back on this API server's
result channel, in order, and are processed exactly as a local engine's outputs are.
The instance's own engine process is still watched over ZMQ (readiness, stats, death).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from concurrent.futures import ThreadPoolExecutor

from engine.sampling_params import SamplingParams
from pd.cluster_wire import params_to_proto
from pd.engine_client import (
    ClusterUnavailable,
    EngineClient,
    EngineInfo,
    RequestEntry,
    RequestTimings,
)
from pd.engine_link import EngineLink
from proto import cluster_pb2 as pb
from scheduler.config import SchedulerConfig
from scheduler.dispatch_policy import NoRankAvailable, dispatch
from scheduler.redis_link import SchedulerUnavailable
from scheduler.splitwise import SplitwiseFrontend

logger = logging.getLogger("pd.api")

_DISPATCH_POLL_S = 0.1


class SplitwiseEngineClient(EngineClient):
    def __init__(
        self,
        addresses: list[str],
        tokenizer,  # type: ignore[no-untyped-def]
        timings: RequestTimings | None,
        scheduler: SchedulerConfig,
        api_id: str,
        dp_ranks: list[int] | None = None,
    ):
        """Requests go through Redis; ``addresses`` are this instance's own engines
        (one per local DP rank), watched for readiness, stats and death."""
        super().__init__(addresses, tokenizer, timings, dp_ranks)
        self.scheduler = scheduler
        self.api_id = api_id
        self.frontend: SplitwiseFrontend | None = None
        self._aborts = ThreadPoolExecutor(max_workers=1, thread_name_prefix="aborts")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._rng = random.Random()
        # Past --scheduler-ttl a queued request is failed by its rank; a stream silent for
        # longer than that (and a registry period) has lost its request.
        self.idle_timeout_s = scheduler.ttl_s + 2 * scheduler.expire_period_s

    async def wait_ready(self, is_alive, timeout: float) -> EngineInfo:  # type: ignore[no-untyped-def]
        info = await super().wait_ready(is_alive, timeout)
        self._loop = asyncio.get_running_loop()
        self.frontend = await asyncio.to_thread(
            SplitwiseFrontend, self.scheduler, self.api_id, self._on_results
        )
        return info

    async def wait_dispatchable(self) -> None:
        """After a Redis restart the registry is empty until every rank re-registers (a
        heartbeat or two): a request arriving then waits for them, at most two expire
        periods, instead of failing at once; past that, submitting says what is missing."""
        frontend = self.frontend
        if frontend is None:
            return
        deadline = time.monotonic() + 2 * self.scheduler.expire_period_s
        while time.monotonic() < deadline:
            try:
                dispatch(frontend.registry.snapshot(), 1, self._rng)
                return
            except (NoRankAvailable, SchedulerUnavailable):
                await asyncio.sleep(_DISPATCH_POLL_S)

    def _place(self) -> None:
        """Placed by the cluster's dispatcher, on any instance's rank."""
        return None

    def _submit(
        self,
        entry: RequestEntry,
        prompt_token_ids: list[int],
        params: SamplingParams,
        route: object | None,
    ) -> None:
        """Queue each child on a prefill rank (one Redis round trip each)."""
        assert self.frontend is not None
        child_ids = entry.child_ids
        for i, child_id in enumerate(child_ids):
            request = pb.DispatchedRequest(
                request_id=child_id,
                prompt_token_ids=prompt_token_ids,
                sampling=params_to_proto(params.for_child(i)),
            )
            try:
                self.frontend.submit(request)
            except (NoRankAvailable, SchedulerUnavailable) as e:
                if i:
                    self._abort(child_ids[:i], None)
                raise ClusterUnavailable(str(e)) from None

    def _abort(self, child_ids: list[str], link: EngineLink | None) -> None:
        """Off the event loop: an abort is a Redis round trip or two per child."""
        frontend = self.frontend
        if frontend is None:
            return

        def abort() -> None:
            for child_id in child_ids:
                try:
                    frontend.abort(child_id)
                except SchedulerUnavailable as e:  # the rank finishes it; results are dropped
                    logger.warning("abort of %s not delivered: %s", child_id, e)

        self._aborts.submit(abort)

    def _on_results(self, request_id: str, entries: list[pb.ResultEntry]) -> None:
        """The result reader's thread: hand the entries to the event loop."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._on_cluster_results, entries)

    async def shutdown(self) -> None:
        if self.frontend is not None:
            await asyncio.to_thread(self.frontend.close)
        self._aborts.shutdown(wait=False)
        await super().shutdown()
