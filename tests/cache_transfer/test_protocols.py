"""What a rank offers: the user's list minus what cannot run here, with reasons."""

from __future__ import annotations

import pytest

from cache_transfer.protocols import usable_protocols


def test_rdma_is_dropped_with_the_reason_when_it_cannot_run() -> None:
    offered, notes = usable_protocols(["rdma", "ipc"], lambda: (False, "no RDMA device"))
    assert offered == ["ipc"] and notes == ["rdma not offered: no RDMA device"]
    offered, notes = usable_protocols(["rdma", "tcp"], lambda: (True, "mlx5_0"))
    assert offered == ["rdma", "tcp"] and notes == []


def test_nothing_usable_falls_back_to_tcp_and_unknown_names_are_refused() -> None:
    offered, notes = usable_protocols(["rdma"], lambda: (False, "pyverbs is not importable"))
    assert offered == ["tcp"] and "offering tcp" in notes[-1]
    with pytest.raises(ValueError, match="unknown KV-transfer protocol 'nvlink'"):
        usable_protocols(["nvlink"])


def test_this_machine_reports_a_reason() -> None:
    offered, notes = usable_protocols(["rdma", "ipc", "tcp"])
    assert "ipc" in offered and "tcp" in offered
    assert "rdma" in offered or notes
