"""Process groups as objects: a rank's place in its tensor-parallel group and the
collectives the layers call.

A ``ParallelGroup`` is passed to every layer that shards (linear, embedding, LM
head) and to the worker; nothing reads a module global. A group of one rank has
no backend and its collectives return their input. Larger groups wrap a c10d
backend (gloo on CPU, NCCL on CUDA) built directly over a TCP store, without
torch.distributed's default group, so several engines (an ``LLM`` and the tests
that build many) live in one process without stepping on each other.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

# How long a collective may wait for a peer before it fails. A rank that died is
# noticed sooner: gloo fails when its socket closes, and the executor watches its
# worker processes.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)
# How long ranks wait for each other to join (a worker that died while starting).
JOIN_TIMEOUT = datetime.timedelta(minutes=2)


@dataclass(frozen=True)
class GroupAddress:
    """Where the ranks of one group meet: the TCP store that rank 0 hosts."""

    host: str
    port: int
    world_size: int


class ParallelGroup:
    def __init__(self, rank: int, size: int, backend=None):  # type: ignore[no-untyped-def]
        if not 0 <= rank < size:
            raise ValueError(f"rank {rank} out of range for a group of {size}")
        if size > 1 and backend is None:
            raise ValueError(f"a group of {size} ranks needs a backend")
        self.rank = rank
        self.size = size
        self._backend = backend

    @classmethod
    def single(cls) -> ParallelGroup:
        return cls(0, 1)

    @property
    def is_driver(self) -> bool:
        """Rank 0 samples and answers for the group."""
        return self.rank == 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place."""
        if self.size > 1:
            self._backend.allreduce([x]).wait()
        return x

    def all_reduce_min(self, value: int, device: torch.device) -> int:
        """The smallest of each rank's ``value`` (e.g. how many KV blocks fit)."""
        if self.size == 1:
            return value
        x = torch.tensor([value], dtype=torch.int64, device=device)
        options = dist.AllreduceOptions()
        options.reduceOp = dist.ReduceOp.MIN
        self._backend.allreduce([x], options).wait()
        return int(x.item())

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """Each rank's ``x`` side by side along the last dimension, in rank order."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        self._backend.allgather([parts], [x.contiguous()]).wait()
        return torch.cat(parts, dim=-1)

    def all_gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Each rank's ``x`` (same shape) stacked along dim 0, in rank order."""
        if self.size == 1:
            return x
        x = x.contiguous()
        out = x.new_empty((self.size * x.shape[0], *x.shape[1:]))
        self._backend._allgather_base(out, x).wait()
        return out

    def reduce_scatter_rows(self, x: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of ``x`` ([size * n, ...]), rank r keeping rows r*n..r*n+n-1."""
        if self.size == 1:
            return x
        x = x.contiguous()
        out = x.new_empty((x.shape[0] // self.size, *x.shape[1:]))
        self._backend._reduce_scatter_base(out, x).wait()
        return out

    def all_to_all_rows(
        self, x: torch.Tensor, send_counts: list[int], recv_counts: list[int]
    ) -> torch.Tensor:
        """Rows ``x`` (grouped by destination rank, ``send_counts[r]`` for rank r) sent
        out; returns the rows every rank sent here, grouped by source rank."""
        if self.size == 1:
            return x
        out = x.new_empty((sum(recv_counts), *x.shape[1:]))
        self._backend.alltoall_base(out, x.contiguous(), recv_counts, send_counts).wait()
        return out

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Rank ``src``'s ``x`` into every rank's ``x`` (same shape and dtype), in place."""
        if self.size > 1:
            self._backend.broadcast(x, src).wait()
        return x

    def abort(self) -> None:
        """Make collectives blocked on a dead peer fail (where the backend can)."""
        abort = getattr(self._backend, "abort", None) or getattr(self._backend, "_abort", None)
        if abort is not None:
            abort()


def host_group_store(host: str, world_size: int) -> tuple[dist.TCPStore, GroupAddress]:
    """Rank 0's side: a TCP store on a free port, kept alive while the group lives."""
    store = listening_store(host, 0, world_size, JOIN_TIMEOUT)
    return store, GroupAddress(host, store.port, world_size)


def listening_store(
    host: str, port: int, world_size: int, timeout: datetime.timedelta
) -> dist.TCPStore:
    """A master TCP store that listens on ``host`` only (``port`` 0: a free one). NOTE:
    TCPStore binds every interface by itself; it is handed a socket bound here instead
    (an internal port binds the address peers use, DESIGN "Trust inside the cluster").
    Raises OSError when the address cannot be bound."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    with socket.socket(family, socket.SOCK_STREAM) as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen()
        port = listener.getsockname()[1]
        fd = listener.detach()  # the store owns it from here
    try:
        return dist.TCPStore(
            host, port, world_size, is_master=True, timeout=timeout,
            wait_for_workers=False, master_listen_fd=fd,
        )  # fmt: skip
    except BaseException:
        os.close(fd)
        raise


def join_group(
    address: GroupAddress, rank: int, device: torch.device, store: dist.TCPStore | None = None
) -> ParallelGroup:
    """Connect this rank to the group at ``address`` (rank 0 passes the store it hosts).
    Returns once every rank has joined."""
    size = address.world_size
    if size == 1:
        return ParallelGroup.single()
    if store is None:
        store = dist.TCPStore(
            address.host, address.port, size, is_master=False, timeout=JOIN_TIMEOUT
        )
    if device.type == "cuda":
        torch.cuda.set_device(device)
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = COLLECTIVE_TIMEOUT
        backend = dist.ProcessGroupNCCL(store, rank, size, options)
    else:
        backend = dist.ProcessGroupGloo(store, rank, size, COLLECTIVE_TIMEOUT)
    group = ParallelGroup(rank, size, backend)
    group.all_reduce(torch.zeros(1, device=device))  # every rank is here
    return group
