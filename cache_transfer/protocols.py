"""Which KV-transfer protocols a rank can actually offer: what the user listed in
``--cache-transfer-protocol``, minus what cannot run here (with the reason, logged).
The pair's pick from both sides' offers is scheduler.dispatch_policy.explain_protocol."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

logger = logging.getLogger(__name__)

PROTOCOLS = ("rdma", "ipc", "tcp")


def usable_protocols(
    requested: Sequence[str],
    rdma_available: Callable[[], tuple[bool, str]] | None = None,
) -> tuple[list[str], list[str]]:
    """(protocols to offer, notes on those dropped). rdma is dropped when the device or
    pyverbs is missing; tcp is always possible; ipc needs nothing but a peer on the host."""
    if rdma_available is None:
        from cache_transfer.rdma import rdma_available
    offered, notes = [], []
    for protocol in requested:
        if protocol not in PROTOCOLS:
            raise ValueError(f"unknown KV-transfer protocol {protocol!r}; use {PROTOCOLS}")
        if protocol == "rdma":
            ok, why = rdma_available()
            if not ok:
                notes.append(f"rdma not offered: {why}")
                continue
        offered.append(protocol)
    if not offered:
        notes.append("no requested protocol is usable; offering tcp")
        offered = ["tcp"]
    for note in notes:
        logger.warning("KV transfer: %s", note)
    return offered, notes
