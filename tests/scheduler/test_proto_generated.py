"""The checked-in protobuf modules match the .proto files (regenerate with
``python scripts/gen_proto.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from scripts.gen_proto import PROTO_DIR, generate, proto_files


def test_generated_modules_are_fresh(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools", reason="grpcio-tools (a dev dependency) is not installed")
    assert proto_files(), "no .proto files found"
    for fresh in generate(tmp_path):
        checked_in = PROTO_DIR / fresh.name
        assert checked_in.exists(), f"{checked_in} is missing: run python scripts/gen_proto.py"
        assert checked_in.read_bytes() == fresh.read_bytes(), (
            f"{checked_in.name} is stale against its .proto: run python scripts/gen_proto.py"
        )
