"""An API server's registration with ``pd-router`` (``pd-serve --router HOST:PORT``).

Once the server listens it registers (role, URL, model names, DP rank, a digest of the
model, its load) and repeats that as its heartbeat, as often as the router asks; when it
starts to stop (drain), a last beat tells the router to send it nothing new. A
router that is down or restarting is retried on every beat, so a restarted router
learns this server back within a beat. With a cluster secret the registration carries
its derived token (``pd/router/wire.py``); a router that refuses us is logged, once
per change of answer.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from cache_transfer.auth import bearer_token
from pd.router.wire import REGISTER_PATH, TOKEN_PURPOSE, Registration

logger = logging.getLogger("pd.serve")

_DEFAULT_HEARTBEAT_S = 1.0
_POLL_S = 0.1
# The files whose bytes say which model (weights' index, config, tokenizer) is served.
_IDENTITY_FILES = ("config.json", "model.safetensors.index.json", "tokenizer.json",
                   "generation_config.json")  # fmt: skip


def model_digest(model: str) -> str:
    """A digest of the served checkpoint: its config, tokenizer and weight index (a
    folder), or its size and first MiB (a file). Instances under one model name must
    agree on it."""
    digest = hashlib.blake2b(digest_size=16)
    path = Path(model)
    if path.is_file():
        digest.update(str(path.stat().st_size).encode())
        with path.open("rb") as f:
            digest.update(f.read(1 << 20))
    else:
        for name in _IDENTITY_FILES:
            if (path / name).is_file():
                digest.update(name.encode() + b"\0" + (path / name).read_bytes())
        for weights in sorted(path.glob("*.safetensors")):
            digest.update(f"{weights.name}:{weights.stat().st_size}".encode())
    return digest.hexdigest()


class RouterRegistration:
    """Registers one API server with a router and keeps its heartbeat."""

    def __init__(
        self,
        router: tuple[str, int],
        registration: Callable[[], Registration],
        secret: bytes | None,
    ):
        """``registration``: the current record (called every beat, for the load)."""
        host, port = router
        host = f"[{host}]" if ":" in host else host
        self.url = f"http://{host}:{port}{REGISTER_PATH}"
        self.registration = registration
        self.headers = {"content-type": "application/json"}
        if secret is not None:
            self.headers["authorization"] = f"Bearer {bearer_token(secret, TOKEN_PURPOSE)}"
        self.heartbeat_s = _DEFAULT_HEARTBEAT_S
        self._last_outcome: str | None = None

    async def run(self, is_listening: Callable[[], bool], is_stopping: Callable[[], bool]) -> None:
        """Beat from the moment ``is_listening()``; once ``is_stopping()``, send a last
        beat that says so (the router then sends nothing new) and return."""
        while not is_listening():
            await asyncio.sleep(_POLL_S)
        logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per beat
        async with httpx.AsyncClient(timeout=5.0) as client:
            while not is_stopping():
                await self.beat(client)
                next_beat = time.monotonic() + self.heartbeat_s
                while time.monotonic() < next_beat and not is_stopping():
                    await asyncio.sleep(_POLL_S)
            await self.beat(client, is_draining=True)

    async def beat(self, client: httpx.AsyncClient, is_draining: bool = False) -> None:
        record = self.registration()
        if is_draining:
            record = record.model_copy(update={"is_draining": True})
        try:
            reply = await client.post(self.url, content=record.model_dump_json(),
                                      headers=self.headers)  # fmt: skip
        except httpx.HTTPError as error:
            self._tell("unreachable", f"router {self.url} unreachable "
                       f"({error or type(error).__name__}); retrying every beat",
                       logging.WARNING)  # fmt: skip
            return
        if reply.status_code != 200:
            message = f"router {self.url} refused {record.url}: {_error_message(reply)}"
            self._tell(f"refused {reply.status_code}", message, logging.ERROR)
            return
        self.heartbeat_s = float(reply.json().get("heartbeat_s", _DEFAULT_HEARTBEAT_S))
        if is_draining:
            logger.info("told router %s that %s is stopping", self.url, record.url)
            return
        self._tell("registered", f"registered {record.url} (DP rank {record.dp_rank}) with router "
                   f"{self.url}", logging.INFO)  # fmt: skip

    def _tell(self, outcome: str, message: str, level: int) -> None:
        """Log ``message`` when the outcome of a beat changes (not every second)."""
        if outcome != self._last_outcome:
            logger.log(level, "%s", message)
            self._last_outcome = outcome


def _error_message(reply: httpx.Response) -> str:
    try:
        return str(reply.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return reply.text[:200]
