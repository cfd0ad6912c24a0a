"""Shared-memory KV pools on this host (ipc on CPU): their names, and the removal of
those whose owner died without closing them (kill -9 leaves the file in /dev/shm).
Torch-free, so that ``pd-serve cluster`` can clean up without importing torch."""

from __future__ import annotations

import contextlib
import os
import uuid

SHM_DIR = "/dev/shm"
SHM_PREFIX = "pd-kv-"  # then "<owner pid>-<random hex>"


def new_pool_path(shm_dir: str = SHM_DIR) -> str:
    """A fresh pool file name owned by this process."""
    return os.path.join(shm_dir, f"{SHM_PREFIX}{os.getpid()}-{uuid.uuid4().hex}")


def remove_stale_pools(shm_dir: str = SHM_DIR) -> list[str]:
    """Unlink the shared-memory pools whose owner process is gone; returns their paths."""
    removed = []
    try:
        names = os.listdir(shm_dir)
    except OSError:
        return removed
    for name in names:
        if not name.startswith(SHM_PREFIX):
            continue
        pid = name[len(SHM_PREFIX) :].split("-", 1)[0]
        if not pid.isdigit() or _is_alive(int(pid)):
            continue
        path = os.path.join(shm_dir, name)
        with contextlib.suppress(OSError):
            os.unlink(path)
            removed.append(path)
    return removed


def _is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: not ours to judge
    try:  # a zombie has exited: its mappings are gone
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True
