"""``pd-serve`` command line: the parser, the typed ``ServeArgs``, and ``parse_args``.

Flag names and meanings follow FastDeploy and vLLM, so that their users' command
lines work here. This module imports only the standard library: ``pd-serve
--help`` must not wait for torch.

Every error exits with status 2 and one line on stderr (``pd-serve: error: ...``):
first malformed values, then combinations that can never work.
"""

from __future__ import annotations

import argparse
import socket
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NoReturn

from pd.args_validation import (
    check_combinations,
    parse_device,
    parse_fraction,
    parse_host_port,
    parse_non_negative,
    parse_port,
    parse_port_list,
    parse_protocols,
    parse_size,
)
from pd.dp_layout import RANK_PORT_FLAGS, DPLayout, RankPorts, rank_ports
from pd.mindie_config import apply_mindie_config

if TYPE_CHECKING:
    from scheduler.config import SchedulerConfig

DEFAULT_PORT = 8000
DEFAULT_PROTOCOLS = ("ipc", "tcp")
DTYPES = ("auto", "float32", "float", "float16", "half", "bfloat16")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
PORT_LIST = "P1,P2,..."

# NOTE: these default to None in the parser so that "given explicitly" can be told
# apart from "left out" (a --mindie-config value may fill them); _resolve() fills in
# the real defaults afterwards.
_LEFT_OUT_DEFAULTS = {
    "splitwise_role": "mixed",
    "tensor_parallel_size": 1,
    "data_parallel_size": 1,
    "scheduler_host": "127.0.0.1",
    "scheduler_port": 6379,
    "scheduler_db": 0,
    "scheduler_topic": "default",
    "scheduler_ttl": 900,
    "scheduler_expire_period": 3000,
}


@dataclass(frozen=True)
class ServeArgs:
    """One ``pd-serve`` instance's settings, parsed and checked by ``parse_args``.

    Port lists hold one port per DP rank (``rdma_comm_ports``: one per GPU); 0 is a
    port still to be picked free at start-up. ``ports`` are the API servers' ports:
    one entry for a single API server (``--port``), or one per DP rank (``--ports``).
    Built directly (in tests), nothing is checked.
    """

    model: str
    served_model_name: list[str] = field(default_factory=list)
    dtype: str = "auto"
    device: str = "auto"
    load_format: str = "auto"
    seed: int = 0
    max_model_len: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    num_gpu_blocks_override: int | None = None
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    attention_backend: str = "auto"
    enforce_eager: bool = False
    async_scheduling: bool = True  # mixed instances only; a prefill/decode rank steps in sync
    host: str = "0.0.0.0"
    ports: list[int] = field(default_factory=lambda: [DEFAULT_PORT])
    metrics_port: int | None = None
    metrics_ports: list[int] | None = None
    engine_worker_queue_ports: list[int] = field(default_factory=lambda: [0])
    api_key: str | None = None
    max_waiting_requests: int = 1024
    max_request_tokens: int = 32768
    log_level: str = "info"
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    data_parallel_start_rank: int = 0
    data_parallel_size_local: int | None = None  # None: from the start rank to the last
    data_parallel_address: str = "127.0.0.1"
    data_parallel_rpc_port: int = 0  # 0: picked free (only when this process runs every rank)
    # Not a flag: the place of this process's first DP rank among the DP ranks of its
    # host (their GPUs come in that order). The multi-API-server launcher sets it for
    # each server it starts; a pd-serve started by hand runs its host's first ranks.
    data_parallel_local_offset: int = 0
    enable_expert_parallel: bool = False
    engine_threads: int = 0
    splitwise_role: str = "mixed"
    cache_transfer_protocols: list[str] = field(default_factory=lambda: list(DEFAULT_PROTOCOLS))
    cache_queue_ports: list[int] = field(default_factory=lambda: [0])
    rdma_comm_ports: list[int] = field(default_factory=lambda: [0])
    pd_comm_ports: list[int] = field(default_factory=lambda: [0])
    scheduler_name: str = "local"
    scheduler_host: str = "127.0.0.1"
    scheduler_port: int = 6379
    scheduler_db: int = 0
    scheduler_password: str | None = None
    cluster_secret_file: str | None = None
    scheduler_topic: str = "default"
    scheduler_ttl: int = 900
    scheduler_expire_period: int = 3000
    router: tuple[str, int] | None = None

    @property
    def dp_layout(self) -> DPLayout:
        """The DP ranks this process runs."""
        local = self.data_parallel_size_local
        if local is None:
            local = self.data_parallel_size - self.data_parallel_start_rank
        return DPLayout(
            self.data_parallel_size, self.data_parallel_start_rank, local,
            self.tensor_parallel_size,
        )  # fmt: skip

    @property
    def paired_by_router(self) -> bool:
        """A prefill or decode instance behind ``pd-router --splitwise``: the router
        pairs its requests, no Redis."""
        return self.router is not None and self.splitwise_role != "mixed"

    def rank_ports(self, dest: str) -> RankPorts:
        """A port-list flag's ports for this process's DP ranks (``dp_layout.rank_ports``)."""
        flag, per_gpu = RANK_PORT_FLAGS[dest]
        per_rank = self.tensor_parallel_size if per_gpu else 1
        return rank_ports(flag, getattr(self, dest), self.dp_layout, per_rank)

    @property
    def api_port(self) -> int:
        """The port of the one API server (0: pick a free one at start-up)."""
        if len(self.ports) != 1:
            raise ValueError(f"{len(self.ports)} API servers (--ports) have no single api_port")
        return self.ports[0]

    def cluster_secret(self) -> bytes | None:
        """The cluster secret (``--cluster-secret-file`` or PD_CLUSTER_SECRET), or None."""
        from pd.cluster_secret import load_cluster_secret

        return load_cluster_secret(self.cluster_secret_file)

    def _redis_password(self) -> str | None:
        """--scheduler-password, else the one derived from the cluster secret."""
        if self.scheduler_password is not None:
            return self.scheduler_password
        from pd.cluster_secret import redis_password

        secret = self.cluster_secret()
        return None if secret is None else redis_password(secret)

    def scheduler_config(self) -> SchedulerConfig:
        from scheduler.config import SchedulerConfig

        return SchedulerConfig(
            name=self.scheduler_name,
            host=self.scheduler_host,
            port=self.scheduler_port,
            db=self.scheduler_db,
            password=self._redis_password(),
            topic=self.scheduler_topic,
            ttl_s=self.scheduler_ttl,
            expire_period_ms=self.scheduler_expire_period,
        )


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr, without the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``pd-serve`` parser, with flags grouped by topic in ``--help``."""
    parser = OneLineParser(
        prog="pd-serve",
        description="Serve a model over the OpenAI API as one instance of a "
        "prefill/decode disaggregated cluster.",
        epilog="Port lists are comma-separated (e.g. --ports 8001,8002); a port of 0, "
        "or a list left out, is picked free at start-up.",
        allow_abbrev=False,
    )
    _add_model_flags(parser.add_argument_group("model"))
    _add_engine_flags(parser.add_argument_group("engine limits and KV cache"))
    _add_server_flags(parser.add_argument_group("server and API"))
    _add_parallel_flags(parser.add_argument_group("parallelism"))
    _add_transfer_flags(parser.add_argument_group("disaggregation and KV transfer"))
    _add_scheduler_flags(parser.add_argument_group("cluster scheduler"))
    return parser


def _add_size(
    group: argparse._ArgumentGroup, flag: str, help_text: str, default: int | None = None
) -> None:
    group.add_argument(flag, default=default, type=parse_size, metavar="N", help=help_text)


def _add_port_list(
    group: argparse._ArgumentGroup, flag: str, help_text: str, dest: str | None = None
) -> None:
    group.add_argument(flag, dest=dest, type=parse_port_list, metavar=PORT_LIST, help=help_text)


def _add_model_flags(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--model", metavar="PATH", help="local HF checkpoint folder or .gguf file")
    group.add_argument(
        "--mindie-config",
        metavar="PATH",
        help="a MindIE Server config.json: --model, --served-model-name, "
        "--tensor-parallel-size, --data-parallel-size (MindIE's worldSize/tp/dp rules) and "
        "--max-model-len from BackendConfig.ModelDeployConfig; a flag given too must agree",
    )
    group.add_argument(
        "--served-model-name",
        nargs="+",
        metavar="NAME",
        help="name(s) clients use in the 'model' field (default: the --model path)",
    )
    group.add_argument("--dtype", default="auto", choices=DTYPES, help="(default: auto)")
    group.add_argument(
        "--device",
        default="auto",
        type=parse_device,
        metavar="DEVICE",
        help="auto, cpu, cuda or cuda:N",
    )
    group.add_argument(
        "--load-format",
        default="auto",
        choices=("auto", "dummy"),
        help="dummy: random weights at the real sizes (default: auto)",
    )
    group.add_argument(
        "--seed", default=0, type=parse_non_negative, metavar="N", help="(default: 0)"
    )


def _add_engine_flags(group: argparse._ArgumentGroup) -> None:
    _add_size(group, "--max-model-len", "prompt + output tokens (default: from model)")
    _add_size(group, "--max-num-seqs", "running requests (default: 256)", default=256)
    _add_size(group, "--max-num-batched-tokens", "token budget of one engine step")
    _add_size(group, "--num-gpu-blocks-override", "KV blocks, instead of from memory")
    _add_size(group, "--block-size", "tokens per KV block (default: 16)", default=16)
    group.add_argument(
        "--gpu-memory-utilization",
        default=0.9,
        type=parse_fraction,
        metavar="FRACTION",
        help="fraction of GPU memory for weights and KV cache, in (0, 1] (default: 0.9)",
    )
    group.add_argument(
        "--enable-prefix-caching",
        default=True,
        action=argparse.BooleanOptionalAction,
        help="reuse KV blocks of shared prompt prefixes (default: on)",
    )
    group.add_argument(
        "--attention-backend",
        default="auto",
        choices=("auto", "sdpa", "triton"),
        help="auto: triton (paged kernels) on CUDA, sdpa (the portable reference) elsewhere",
    )
    group.add_argument(
        "--enforce-eager",
        action="store_true",
        help="no CUDA graphs for decode steps (they take start-up time and some memory)",
    )
    group.add_argument(
        "--async-scheduling",
        action=argparse.BooleanOptionalAction,
        help="schedule each step while the previous one runs on the device (default: on "
        "for the mixed role; prefill and decode ranks step synchronously)",
    )


def _add_server_flags(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--host", default="0.0.0.0", metavar="HOST", help="(default: 0.0.0.0)")
    group.add_argument(
        "--port",
        type=parse_port,
        metavar="PORT",
        help=f"API port; 0 picks a free one (default: {DEFAULT_PORT})",
    )
    _add_port_list(group, "--ports", "one API server per DP rank, on these ports")
    group.add_argument(
        "--metrics-port",
        type=parse_port,
        metavar="PORT",
        help="Prometheus port (default: /metrics on the API port)",
    )
    _add_port_list(group, "--metrics-ports", "one metrics port per DP rank's API server")
    _add_port_list(
        group,
        "--engine-worker-queue-port",
        "API server <-> engine core channel, one port per DP rank",
        dest="engine_worker_queue_ports",
    )
    group.add_argument("--api-key", metavar="KEY", help="require 'Authorization: Bearer <key>'")
    _add_size(
        group,
        "--max-waiting-requests",
        "above this many waiting requests, answer 503 with Retry-After (default: 1024)",
        default=1024,
    )
    _add_size(
        group,
        "--max-request-tokens",
        "most tokens one request may generate, all its choices (n) and prompts together; "
        "without max_tokens each choice gets its share (default: 32768)",
        default=32768,
    )
    group.add_argument(
        "--log-level", default="info", type=str.lower, choices=LOG_LEVELS, help="(default: info)"
    )


def _add_parallel_flags(group: argparse._ArgumentGroup) -> None:
    _add_size(
        group,
        "--tensor-parallel-size",
        "TP ranks per DP rank: the model sharded over this many devices (worker processes) "
        "(default: 1)",
    )
    _add_size(
        group,
        "--data-parallel-size",
        "DP ranks of this instance: engine cores with their own requests and KV cache, "
        "each with its TP group, on the next GPUs in order (default: 1)",
    )
    group.add_argument(
        "--data-parallel-start-rank",
        default=0,
        type=parse_non_negative,
        metavar="N",
        help="the first DP rank this process runs, when the instance spans processes or "
        "hosts (default: 0)",
    )
    _add_size(
        group,
        "--data-parallel-size-local",
        "how many DP ranks this process runs (default: the rest from the start rank)",
    )
    group.add_argument(
        "--data-parallel-address",
        default="127.0.0.1",
        metavar="HOST",
        help="where the DP ranks' group meets: DP rank 0's host (default: 127.0.0.1)",
    )
    group.add_argument(
        "--data-parallel-rpc-port",
        default=0,
        type=parse_port,
        metavar="PORT",
        help="the DP group's port on --data-parallel-address; needed when the instance "
        "spans processes (default: picked free)",
    )
    group.add_argument(
        "--enable-expert-parallel",
        action="store_true",
        help="MoE models: split whole experts over every DP x TP rank (tokens travel to "
        "their experts) instead of each expert's width; the DP ranks of an MoE model "
        "step in lockstep either way; dense models: no effect",
    )
    group.add_argument(
        "--engine-threads",
        default=0,
        type=parse_non_negative,
        metavar="N",
        help="torch threads per engine process; 0: the cores left after the API server "
        "(OMP_NUM_THREADS when set) (default: 0)",
    )


def _add_transfer_flags(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--splitwise-role",
        choices=("mixed", "prefill", "decode"),
        help="mixed runs whole requests (default: mixed)",
    )
    group.add_argument(
        "--cache-transfer-protocol",
        dest="cache_transfer_protocols",
        type=parse_protocols,
        metavar="PROTO,...",
        help="KV transfer protocols offered: rdma, ipc, tcp "
        f"(default: {','.join(DEFAULT_PROTOCOLS)})",
    )
    _add_port_list(
        group,
        "--cache-queue-port",
        "engine core -> workers transfer queue, one port per DP rank",
        dest="cache_queue_ports",
    )
    _add_port_list(group, "--rdma-comm-ports", "RDMA connection setup, one port per GPU")
    _add_port_list(
        group,
        "--pd-comm-port",
        "P/D control service (gRPC), one port per DP rank",
        dest="pd_comm_ports",
    )


def _add_scheduler_flags(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--scheduler-name",
        default="local",
        choices=("local", "splitwise"),
        help="local: one instance, no Redis; splitwise: Redis cluster (default: local)",
    )
    group.add_argument("--scheduler-host", metavar="HOST", help="Redis host (default: 127.0.0.1)")
    group.add_argument(
        "--scheduler-port", type=parse_port, metavar="PORT", help="Redis port (default: 6379)"
    )
    group.add_argument(
        "--scheduler-db", type=parse_non_negative, metavar="N", help="Redis db (default: 0)"
    )
    group.add_argument(
        "--scheduler-password",
        metavar="PASSWORD",
        help="Redis password (default: derived from the cluster secret, when there is one)",
    )
    group.add_argument(
        "--cluster-secret-file",
        metavar="PATH",
        help="the cluster secret (at least 16 bytes; or PD_CLUSTER_SECRET): authenticates "
        "pd-comm, KV-transfer streams, the engine channel and Redis",
    )
    group.add_argument(
        "--scheduler-topic",
        metavar="TOPIC",
        help="namespace of this cluster's Redis keys (default: default)",
    )
    _add_size(
        group,
        "--scheduler-ttl",
        "seconds a queued request or unread result may live (default: 900)",
    )
    _add_size(
        group,
        "--scheduler-expire-period",
        "milliseconds an instance stays registered without a refresh; behind pd-router "
        "--splitwise, a request no rank names for 3 of these has been lost (default: 3000)",
    )
    group.add_argument(
        "--router",
        type=parse_host_port,
        metavar="HOST:PORT",
        help="register with pd-router; with --splitwise-role prefill|decode the router pairs "
        "prefill with decode (pd-router --splitwise), no Redis",
    )


def parse_args(argv: list[str] | None = None) -> ServeArgs:
    """Parse and check ``pd-serve`` flags (``sys.argv[1:]`` when None); exit 2 on error."""
    parser = build_parser()
    namespace = parser.parse_args(argv)
    try:
        if namespace.mindie_config is not None:
            apply_mindie_config(namespace)
        if namespace.model is None:
            parser.error("the following arguments are required: --model (or --mindie-config)")
        given = frozenset(dest for dest, value in vars(namespace).items() if value is not None)
        args = _resolve(namespace)
        args.cluster_secret()  # unreadable or too short: refused now, by name
        check_combinations(args, given)
    except ValueError as exc:
        parser.error(str(exc))
    return args


def _resolve(ns: argparse.Namespace) -> ServeArgs:
    """Fill in defaults for flags left out; ``--port``/``--ports`` must agree."""
    values = dict(vars(ns))
    del values["mindie_config"]  # read into the flags it sets
    port, ports = values.pop("port"), values["ports"]
    if ports is None:
        values["ports"] = [DEFAULT_PORT if port is None else port]
    elif port is not None and port != ports[0]:
        raise ValueError(
            f"--port {port} disagrees with --ports {','.join(map(str, ports))} "
            "(the first of --ports is the API port)"
        )
    for dest in RANK_PORT_FLAGS:
        if values[dest] is None:
            values[dest] = [0]  # every rank's picked free
    if values["cache_transfer_protocols"] is None:
        values["cache_transfer_protocols"] = list(DEFAULT_PROTOCOLS)
    if values["async_scheduling"] is None:
        values["async_scheduling"] = True
    if values["served_model_name"] is None:
        values["served_model_name"] = [ns.model]
    for dest, default in _LEFT_OUT_DEFAULTS.items():
        if values[dest] is None:
            values[dest] = default
    return ServeArgs(**values)


def pick_free_port(host: str = "127.0.0.1") -> int:
    """A port that was free on ``host`` just now (bind to port 0 and read it back)."""
    family = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0][0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


if __name__ == "__main__":
    print(parse_args(sys.argv[1:]))
