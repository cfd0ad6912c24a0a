"""A prefill instance's API server behind ``pd-router --splitwise`` (no Redis).

The router sends each request here with the decode rank it paired it with
(``pd/router/wire.py``). The request runs on one of this instance's prefill ranks,
which reserves on that decode rank, writes the prompt's KV there and commits, as in the
Redis path; every token comes back to this server's result port
(``scheduler/direct_results.py``): the first from the prefill rank, the rest from the
decode rank, put back in order. Then they are processed like a local engine's outputs.

Where a request can be lost, and how it ends:
- the local prefill rank dies: its link fails the request at once (as a local engine);
- the decode rank dies or loses it: no rank names it for ``silence_s``, and it fails
  with that reason;
- the client goes away (or a stop string ends it here): the prefill rank is told over
  ZMQ and the decode rank with a pd-comm Abort (remembered there if the Commit has not
  come yet, so it is refused).
"""

from __future__ import annotations

import base64
import binascii
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from cache_transfer.pd_comm import PdCommClient, PdCommError
from engine.sampling_params import SamplingParams
from pd.cluster_secret import results_key
from pd.engine_client import EngineClient, EngineInfo, RequestEntry, RequestFailed, RouteRefused
from pd.engine_link import EngineLink
from pd.engine_messages import AddRequest, Kind, Pairing, encode
from pd.router.wire import DECODE_RANK_HEADER, MAX_RECORD_CHARS, PAIR_TOKEN_HEADER, check_pair_token
from scheduler.config import ID_PATTERN
from scheduler.direct_results import ResultListener
from scheduler.records import MalformedRecord
from scheduler.registry import parse_record

logger = logging.getLogger("pd.api")

_ABORT_TIMEOUT_S = 2.0
# A decode rank that did not answer an abort is not asked again for this long: aborts
# of its requests then cost nothing (it is gone, or its requests end by themselves),
# and those of healthy ranks do not queue behind its time-outs.
_UNREACHABLE_PAUSE_S = 10.0


@dataclass(frozen=True)
class DecodeRoute:
    """The decode rank a router paired a request with."""

    record: bytes  # its serialized InstanceRecord, as the prefill rank needs it
    rank_id: str
    pd_comm_address: str  # host:port, where an abort reaches it


class PairedEngineClient(EngineClient):
    def __init__(
        self,
        addresses: Sequence[str],
        tokenizer,  # type: ignore[no-untyped-def]
        timings,  # type: ignore[no-untyped-def]
        dp_ranks: Sequence[int],
        bind_host: str,
        advertised_host: str,
        secret: bytes | None,
        silence_s: float,
    ):
        """``addresses``: this instance's prefill ranks; results arrive on a port of
        ``bind_host`` that peers reach at ``advertised_host``; a request no rank names
        for ``silence_s`` has been lost."""
        super().__init__(addresses, tokenizer, timings, dp_ranks)
        self.secret = secret
        self.results: ResultListener | None = None
        self._listen = (bind_host, advertised_host, silence_s)
        self._routes: dict[str, tuple[EngineLink, str]] = {}  # child id -> (prefill, decode)
        self._aborts = ThreadPoolExecutor(max_workers=2, thread_name_prefix="decode-aborts")
        self._pd_comm: dict[str, PdCommClient] = {}
        self._unreachable_until: dict[str, float] = {}  # address -> monotonic time
        self._pd_comm_lock = threading.Lock()

    async def wait_ready(self, is_alive, timeout: float) -> EngineInfo:  # type: ignore[no-untyped-def]
        info = await super().wait_ready(is_alive, timeout)
        bind_host, advertised_host, silence_s = self._listen
        key = results_key(self.secret)
        self.results = ResultListener(
            bind_host, advertised_host, key, self._on_results, self._on_lost, silence_s
        ).start()
        logger.info("results from decode ranks on %s", self.results.address)
        return info

    def route_for(self, headers: Mapping[str, str]) -> DecodeRoute:
        encoded = headers.get(DECODE_RANK_HEADER)
        if encoded is None:
            raise RouteRefused(400, "this prefill instance serves requests that pd-router "
                               "--splitwise paired with a decode instance: send them to "
                               "the router")  # fmt: skip
        if self.secret is not None and not check_pair_token(
            self.secret, encoded, headers.get(PAIR_TOKEN_HEADER)
        ):
            raise RouteRefused(401, "a pairing needs the cluster secret's token for it")
        try:
            if len(encoded) > MAX_RECORD_CHARS:
                raise ValueError(f"longer than {MAX_RECORD_CHARS} characters")
            raw = base64.b64decode(encoded, validate=True)
            record = parse_record(raw)
            if not ID_PATTERN.fullmatch(record.rank_id):
                raise ValueError("its rank_id is not a plain id")
            if record.role != "decode":
                raise ValueError(f"rank {record.rank_id!r} is a {record.role} rank")
            if not record.host or not 0 < record.pd_comm_port < 65536:
                raise ValueError("it has no pd-comm address")
        except (binascii.Error, ValueError, MalformedRecord) as error:
            raise RouteRefused(400, f"{DECODE_RANK_HEADER} is not a decode rank's record: "
                               f"{error}") from None  # fmt: skip
        host = f"[{record.host}]" if ":" in record.host else record.host
        return DecodeRoute(raw, record.rank_id, f"{host}:{record.pd_comm_port}")

    def _submit(
        self,
        entry: RequestEntry,
        prompt_token_ids: list[int],
        params: SamplingParams,
        route: object | None,
    ) -> None:
        """Send each child to the prefill rank with its pairing; expect its results."""
        assert entry.link is not None and self.results is not None
        assert isinstance(route, DecodeRoute), "route_for() gives a paired request's route"
        pairing = Pairing(route.record, self.results.address)
        frames = [
            encode(Kind.ADD, AddRequest(child_id, prompt_token_ids, params.for_child(i), pairing))
            for i, child_id in enumerate(entry.child_ids)
        ]
        for child_id in entry.child_ids:
            self.results.expect(child_id)
            self._routes[child_id] = (entry.link, route.pd_comm_address)
        for frame in frames:
            entry.link.send(frame)

    def _on_results(self, request_id: str, entries: list) -> None:
        if entries[-1].finish_reason:
            self._routes.pop(request_id, None)
        self._on_cluster_results(entries)

    def _on_lost(self, request_id: str, message: str) -> None:
        logger.warning("%s", message)
        self._abort([request_id], None)  # whoever still has it lets go
        self._fail(request_id, RequestFailed(message))

    def _abort(self, child_ids: list[str], link: EngineLink | None) -> None:
        """Tell the prefill rank (ZMQ) and the decode rank (pd-comm) of each child still
        routed; a child that finished or was aborted before costs nothing."""
        for child_id in child_ids:
            if self.results is not None:
                self.results.forget(child_id)
            route = self._routes.pop(child_id, None)
            if route is None:
                continue
            prefill, decode_address = route
            if prefill.dead_reason is None:
                prefill.send(encode(Kind.ABORT, [child_id]))
            self._aborts.submit(self._abort_on_decode, decode_address, child_id)

    def _release(
        self, request_id: str, entry: RequestEntry, finished: bool, submitted: bool
    ) -> None:
        super()._release(request_id, entry, finished, submitted)
        if submitted and not finished:  # also when the prefill rank died: decode may hold it
            self._abort(entry.child_ids, entry.link)

    def _abort_on_decode(self, address: str, request_id: str) -> None:
        """Off the event loop (a gRPC round trip)."""
        with self._pd_comm_lock:
            if time.monotonic() < self._unreachable_until.get(address, 0.0):
                return
            client = self._pd_comm.get(address)
            if client is None:
                client = self._pd_comm[address] = PdCommClient(address, secret=self.secret)
        try:
            client.abort(request_id, timeout_s=_ABORT_TIMEOUT_S)
        except PdCommError as error:  # the rank is gone: nothing holds the request there
            logger.info("abort of %s on %s not delivered: %s", request_id, address, error)
            with self._pd_comm_lock:
                self._unreachable_until[address] = time.monotonic() + _UNREACHABLE_PAUSE_S

    async def shutdown(self) -> None:
        if self.results is not None:
            await self.results.close()
        self._aborts.shutdown(wait=False)
        with self._pd_comm_lock:
            for client in self._pd_comm.values():
                client.close()
        await super().shutdown()
