"""``pd-serve``: one instance = an API server (this process) + an engine-core
process per local DP rank, joined over ZMQ on the engine-worker-queue ports.

Start-up: parse and validate flags, start the engine processes, load the
tokenizer, wait until every engine reports its model loaded, and only then open
the API port. The API server balances requests over its DP ranks
(``pd/engine_client.py``). With one API server per DP rank (``--ports``) this
process starts one such ``pd-serve`` per rank instead (``pd/api_servers.py``).

SIGTERM/SIGINT drain in-flight requests (bounded) and exit 0. A dead engine
process fails its rank's requests; the others keep serving (DP ranks share
nothing), and once every rank is dead the server exits 1.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import multiprocessing
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pd.args import ServeArgs, parse_args, pick_free_port
from pd.cluster_instance import cluster_instance
from pd.cluster_secret import engine_channel_key
from pd.cpu_threads import apply_api_server_threads, engine_thread_choice
from pd.flag_notes import flag_notes

if TYPE_CHECKING:
    from pd.api_servers import Launcher
    from pd.rank.settings import RankSettings

logger = logging.getLogger("pd.serve")

_READY_TIMEOUT_S = 1800.0  # model loading can be slow on big checkpoints
_DRAIN_TIMEOUT_S = 30
_ENGINE_STOP_TIMEOUT_S = 10.0
_LAST_BEAT_TIMEOUT_S = 2.0  # for telling pd-router that we stop


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["cluster"]:
        from pd.cluster import main as cluster_main

        sys.exit(cluster_main(argv[1:]))
    if argv[:1] == ["multi-api-server"]:
        from pd.api_servers import multi_api_server_main

        sys.exit(multi_api_server_main(argv[1:]))
    args = parse_args(argv)
    if len(args.ports) > 1:
        from pd.api_servers import run_api_servers

        sys.exit(run_api_servers(args))
    sys.exit(run_one(args))


def run_one(args: ServeArgs, launcher: Launcher | None = None) -> int:
    """Serve with one API server; ``launcher``: the process that started this one
    (``pd/api_servers.py``), told when we listen, and whose exit stops us."""
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return asyncio.run(serve(args, launcher))


def engine_kwargs(args: ServeArgs, local_index: int = 0, dp_master_port: int = 0) -> dict:
    """The engine config of the ``local_index``-th DP rank this process runs (plain
    values only: unpickling them in the engine process must not import torch)."""
    layout = args.dp_layout
    host_index = args.data_parallel_local_offset + local_index  # GPUs come in this order
    data_parallel = {  # engine.config.DataParallelConfig's fields
        "rank": layout.start + local_index,
        "size": layout.size,
        "master_host": args.data_parallel_address,
        "master_port": dp_master_port,
    }
    return {
        "model": args.model,
        "dtype": args.dtype,
        "max_model_len": args.max_model_len,
        "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "num_gpu_blocks_override": args.num_gpu_blocks_override,
        "block_size": args.block_size,
        "device": args.device,
        "device_offset": host_index * args.tensor_parallel_size,
        "seed": args.seed,
        "enable_prefix_caching": args.enable_prefix_caching,
        "gpu_memory_utilization": args.gpu_memory_utilization,
        "load_format": args.load_format,
        "attention_backend": args.attention_backend,
        "enforce_eager": args.enforce_eager,
        # A prefill/decode rank shares its blocks with peers: it steps synchronously.
        "async_scheduling": args.async_scheduling and args.splitwise_role == "mixed",
        "tensor_parallel_size": args.tensor_parallel_size,
        "data_parallel": data_parallel,
        "enable_expert_parallel": args.enable_expert_parallel,
    }


def gpu_shortage(args: ServeArgs) -> str | None:
    """Why this process's DP ranks cannot all have their GPUs, or None (on the CPU too):
    said before any engine starts, rather than as a CUDA error from one of them."""
    import torch

    from engine.config import resolve_device

    try:
        device = resolve_device(args.device)
    except ValueError as error:  # cuda asked for, none here
        return str(error)
    if not device.startswith("cuda"):
        return None
    first = torch.device(device).index or 0
    last = first + (args.data_parallel_local_offset + args.dp_layout.local) * (
        args.tensor_parallel_size
    )
    available = torch.cuda.device_count()
    if last <= available:
        return None
    return (
        f"{args.dp_layout.local} DP rank(s) x --tensor-parallel-size "
        f"{args.tensor_parallel_size} from {device} need GPUs {first}..{last - 1}; this host "
        f"has {available} (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')!r})"
    )


@dataclass
class EngineProcess:
    """The engine-core process of one DP rank."""

    dp_rank: int
    process: multiprocessing.Process
    address: str  # its engine-worker-queue channel


def dp_master_port(args: ServeArgs) -> int:
    """The DP group's port: given, or (when this process runs every rank) a free one."""
    if args.data_parallel_size == 1:
        return 0
    return args.data_parallel_rpc_port or pick_free_port(args.data_parallel_address)


def start_engines(
    args: ServeArgs,
    settings: list[RankSettings] | None = None,
    channel_key: bytes | None = None,
) -> list[EngineProcess]:
    """Start one engine-core process per local DP rank (``settings``: each rank's
    splitwise registration, or None for the local scheduler)."""
    from pd.engine_process import run_engine_process

    layout = args.dp_layout
    queue_ports = args.rank_ports("engine_worker_queue_ports")
    threads = engine_thread_choice(
        args.engine_threads, num_engines=layout.local * args.tensor_parallel_size,
        num_api_servers=1,
    )  # fmt: skip
    master_port = dp_master_port(args)
    engines = []
    for index, dp_rank in enumerate(layout.ranks):
        address = f"tcp://127.0.0.1:{queue_ports.per_rank[index][0] or pick_free_port()}"
        rank_settings = settings[index] if settings is not None else None
        process = multiprocessing.get_context("spawn").Process(
            target=run_engine_process,
            args=(engine_kwargs(args, index, master_port), address, args.log_level, threads,
                  rank_settings, channel_key),
            name=f"pd-engine-{dp_rank}",
            # Not daemonic: it starts TP worker processes. It stops with us all the same:
            # _stop_engines on every exit path, and it watches our pid in case we are killed.
            daemon=False,
        )  # fmt: skip
        process.start()
        logger.info("engine core (DP rank %d) pid %d on %s", dp_rank, process.pid, address)
        engines.append(EngineProcess(dp_rank, process, address))
    return engines


async def serve(args: ServeArgs, launcher: Launcher | None = None) -> int:
    import uvicorn

    from engine.tokenizer import load_tokenizer
    from pd.api.server import build_app
    from pd.api.state import ServerState
    from pd.engine_client import EngineDeadError
    from scheduler.redis_link import SchedulerUnavailable

    logger.info(apply_api_server_threads())
    if launcher is None:  # else the launcher said them, for every server
        for note in flag_notes(args):
            logger.info("%s", note)
    shortage = gpu_shortage(args)
    if shortage is not None:
        logger.error("start-up failed: %s", shortage)
        return 1
    api_port = args.api_port or pick_free_port(args.host)
    in_cluster = args.scheduler_name == "splitwise" or args.paired_by_router
    instance = cluster_instance(args, api_port) if in_cluster else None
    channel_key = engine_channel_key(args.cluster_secret())
    engines = start_engines(args, instance.rank_settings if instance else None, channel_key)
    addresses = [engine.address for engine in engines]
    dp_ranks = [engine.dp_rank for engine in engines]
    try:
        state = ServerState.create(args, load_tokenizer(args.model))
        client = _engine_client(args, instance, addresses, dp_ranks, state)
        client.channel_key = channel_key
        state.engine = client
        alive = [engine.process.is_alive for engine in engines]
        info = await client.wait_ready(alive, _READY_TIMEOUT_S)
    except (EngineDeadError, ValueError, OSError, SchedulerUnavailable) as error:
        logger.error("start-up failed: %s", error)
        _stop_engines(engines, starting=True)
        return 1
    state.max_model_len = info.max_model_len
    servers = _make_servers(args, api_port, build_app(state), state, uvicorn)
    # NOTE: uvicorn captures SIGINT/SIGTERM while serving, drains, restores the
    # previous handlers and raises the signal again; ours make that a no-op, so
    # a drained shutdown exits 0 instead of dying by the signal.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    watcher = asyncio.create_task(_watch(engines, client, servers, launcher))
    beats = _register_with_router(args, api_port, state, dp_ranks[0], servers)
    try:
        await asyncio.gather(*(server.serve() for server in servers))
    finally:
        watcher.cancel()
        if beats is not None:  # it tells the router we stop, then returns
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(beats, timeout=_LAST_BEAT_TIMEOUT_S)
        await client.shutdown()
        _stop_engines(engines)
    # A DP rank that died is a failure to report, even when the others drained cleanly.
    return 1 if any(link.dead_reason for link in client.links) else 0


def _engine_client(args: ServeArgs, instance, addresses: list[str], dp_ranks: list[int], state):  # type: ignore[no-untyped-def]
    """How this API server reaches its engines and the cluster: local engines; a
    Redis cluster (splitwise); a router's pairings (a prefill instance behind pd-router
    --splitwise). A decode instance behind the router serves no client itself: its
    ranks take requests from prefill ranks, so its engines are only watched."""
    from pd.engine_client import EngineClient

    timings = state.timings()
    if instance is None or (args.paired_by_router and args.splitwise_role == "decode"):
        return EngineClient(addresses, state.tokenizer, timings, dp_ranks)
    if args.paired_by_router:
        from pd.cluster_instance import advertised_host
        from pd.paired_client import PairedEngineClient

        silence_s = 3 * args.scheduler_config().expire_period_s
        return PairedEngineClient(
            addresses, state.tokenizer, timings, dp_ranks, args.host,
            advertised_host(args.host), args.cluster_secret(), silence_s,
        )  # fmt: skip
    from pd.splitwise_client import SplitwiseEngineClient

    return SplitwiseEngineClient(
        addresses, state.tokenizer, timings, args.scheduler_config(), instance.api_id, dp_ranks
    )


def _register_with_router(
    args: ServeArgs, api_port: int, state, dp_rank: int, servers: list
) -> asyncio.Task | None:  # type: ignore[no-untyped-def]
    """With --router: register once every server listens, then heartbeat (with the
    load: requests open here) until stopped."""
    if args.router is None:
        return None
    from pd.cluster_instance import advertised_host
    from pd.router.wire import Registration
    from pd.router_registration import RouterRegistration, model_digest

    host = advertised_host(args.host)
    url = f"http://{f'[{host}]' if ':' in host else host}:{api_port}"
    digest = model_digest(args.model)

    def pd_ranks() -> list[str]:
        """The live prefill or decode ranks: what the router pairs requests with
        (pd/router/wire.py); a DP rank that died is no longer offered."""
        return [base64.b64encode(link.info.rank_record).decode() for link in state.engine.links
                if link.dead_reason is None and link.info is not None
                and link.info.rank_record]  # fmt: skip

    def record() -> Registration:
        return Registration(
            role=args.splitwise_role, url=url, model_names=state.model_names,
            dp_rank=dp_rank, model_digest=digest, max_model_len=state.max_model_len,
            num_open=len(state.engine.streams), num_waiting=state.engine.num_not_started,
            pd_ranks=pd_ranks(),
        )  # fmt: skip

    registration = RouterRegistration(args.router, record, args.cluster_secret())
    return asyncio.create_task(registration.run(
        lambda: all(s.started for s in servers), lambda: any(s.should_exit for s in servers)
    ))  # fmt: skip


def _make_servers(args: ServeArgs, port: int, app, state, uvicorn) -> list:
    servers = [_server(uvicorn, app, args.host, port, args.log_level)]
    logger.info("OpenAI API on http://%s:%d/v1 (model %s)", args.host, port, state.model_names[0])
    if args.metrics_port is not None:
        metrics_port = args.metrics_port or pick_free_port(args.host)
        from pd.api.errors import install_error_handlers
        from pd.api.server import api_key_dependencies

        metrics_app = state.metrics.make_metrics_app(api_key_dependencies(args.api_key))
        install_error_handlers(metrics_app)
        servers.append(_server(uvicorn, metrics_app, args.host, metrics_port, args.log_level))
        logger.info("metrics on http://%s:%d/metrics", args.host, metrics_port)
    return servers


def _server(uvicorn, app, host: str, port: int, log_level: str):
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level.lower(),
        timeout_graceful_shutdown=_DRAIN_TIMEOUT_S,
        access_log=False,
    )
    return uvicorn.Server(config)


async def _watch(engines: list[EngineProcess], client, servers: list, launcher: Launcher | None):  # type: ignore[no-untyped-def]
    """Say when every server listens; fail a DP rank's requests when its engine process
    dies, also while the servers drain; stop every server when one stops (a signal
    reaches one of them), when every engine is dead, or when the launcher is gone. Runs
    until the servers are done (``serve`` cancels it)."""
    announced = orphaned = False
    links = {link.dp_rank: link for link in client.links}
    while True:
        for engine in engines:
            link = links[engine.dp_rank]
            if link.dead_reason is None and not engine.process.is_alive():
                client.mark_rank_dead(link, _exit_reason(engine.process.exitcode))
        stop = client.dead_reason is not None or any(s.should_exit for s in servers)
        if launcher is not None and os.getppid() != launcher.pid and not orphaned:
            logger.error("the process that started this API server is gone; stopping")
            orphaned = True
        stop = stop or orphaned
        if stop:
            for server in servers:
                server.should_exit = True
        elif not announced and all(server.started for server in servers):
            config = servers[0].config
            url = f"http://{config.host}:{config.port}/v1"
            if launcher is None:
                print(f"pd-serve ready: {url}", flush=True)
            else:
                print(f"API server of DP rank {engines[0].dp_rank} ready: {url}", flush=True)
                launcher.ready.put((engines[0].dp_rank, url))
            announced = True
        await asyncio.sleep(0.2)


def _exit_reason(exitcode: int | None) -> str:
    from pd.engine_process import GROUP_LOST_EXIT_CODE, WORKER_DIED_EXIT_CODE

    if exitcode == GROUP_LOST_EXIT_CODE:
        return (
            "another DP rank of its MoE group died (the ranks of an expert group step "
            "together; see the engine's log)"
        )
    if exitcode == WORKER_DIED_EXIT_CODE:
        return "a tensor-parallel worker of the engine died (see the engine's log)"
    return f"engine process exited with code {exitcode}"


def _stop_engines(engines: list[EngineProcess], starting: bool = False) -> None:
    """Wait for the engines to exit (one bound for all of them), then kill the rest.
    ``starting``: start-up failed, so nothing told them to stop and they serve nothing
    yet (some may wait for the others in the DP group): SIGTERM them first."""
    if starting:
        for engine in engines:
            if engine.process.is_alive():
                engine.process.terminate()
    deadline = time.monotonic() + _ENGINE_STOP_TIMEOUT_S
    for engine in engines:
        engine.process.join(max(0.0, deadline - time.monotonic()))
    for engine in engines:
        if engine.process.is_alive():
            logger.warning("engine of DP rank %d did not stop in time; killing it", engine.dp_rank)
            engine.process.kill()
            engine.process.join()


if __name__ == "__main__":
    main()
