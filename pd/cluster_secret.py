"""The cluster secret: one value every instance of a cluster shares, which
authenticates its internal endpoints (cache_transfer/auth.py says how each uses it).

An operator gives it as a file (``--cluster-secret-file PATH``, read once, at least 16
bytes; surrounding whitespace is ignored) or in the environment (``PD_CLUSTER_SECRET``);
the file wins. ``pd-serve cluster`` creates one (0600, in its log folder) when neither
is given, and hands it to its instances and its embedded Redis.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from cache_transfer.auth import bearer_token

ENV_VAR = "PD_CLUSTER_SECRET"
MIN_BYTES = 16


def load_cluster_secret(path: str | None) -> bytes | None:
    """The secret from ``path`` or the environment; None when neither is set.
    ValueError (naming the source) when it is unreadable or too short."""
    if path is not None:
        try:
            secret = Path(path).read_bytes().strip()
        except OSError as e:
            raise ValueError(f"--cluster-secret-file {path}: {e.strerror}") from None
        source = f"--cluster-secret-file {path}"
    elif os.environ.get(ENV_VAR):
        secret, source = os.environ[ENV_VAR].strip().encode(), ENV_VAR
    else:
        return None
    if len(secret) < MIN_BYTES:
        raise ValueError(f"{source}: the cluster secret must be at least {MIN_BYTES} bytes")
    return secret


def create_secret_file(directory: Path) -> Path:
    """A fresh random secret in ``directory``/cluster.secret, readable by us only."""
    path = directory / "cluster.secret"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")
    return path


def redis_password(secret: bytes) -> str:
    """Redis's ``requirepass`` for a cluster with this secret."""
    return bearer_token(secret, "redis")


def engine_channel_key(secret: bytes | None) -> bytes:
    """The key of the API server <-> engine ZMQ channel: from the cluster secret, or a
    fresh random one per instance (the two processes get it when the engine starts)."""
    if secret is None:
        return secrets.token_bytes(32)
    return bytes.fromhex(bearer_token(secret, "engine"))


def results_key(secret: bytes | None) -> bytes | None:
    """The MAC key of result frames sent straight to an API server (pd-router
    --splitwise, ``scheduler/direct_results.py``); None without a cluster secret."""
    if secret is None:
        return None
    return bytes.fromhex(bearer_token(secret, "results"))
