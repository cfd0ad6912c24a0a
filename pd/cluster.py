"""``pd-serve cluster``: a local prefill/decode cluster in one command.

Starts an embedded Redis (unless ``--scheduler-host/--scheduler-port`` name one),
``--prefill N`` prefill and ``--decode M`` decode instances of ``pd-serve`` (or
``--mixed K`` mixed ones) on one model — SmolLM2-135M-Instruct (``pd.default_model``)
when ``--model`` is left out, a generated tiny one with ``--model tiny`` — waits until
every instance is ready, and prints the OpenAI base URL. With ``--router`` it starts
``pd-router`` on ``--port`` instead of Redis, and instances that register with it:
``--mixed N`` ones, or ``--prefill P --decode D`` ones behind ``pd-router --splitwise``
(which pairs them per request; one router takes one kind); the base URL is then the
router's. ``--ask`` sends one chat request and prints the answer (``--once``: then
stop). Ctrl-C or SIGTERM stops the instances (each drains), then Redis. An instance
that dies is restarted on its port (at most ``--max-restarts`` times each, with a
growing pause, every restart logged); past that the cluster stops with exit 1. Flags it
does not know go to every instance
(e.g. ``--max-num-seqs 64 --cache-transfer-protocol tcp``). The instances share the
machine's cores: each engine gets ``--engine-threads`` of an even share, unless the
flag or ``OMP_NUM_THREADS`` is given.

    pd-serve cluster --prefill 1 --decode 1 --ask "Hello"
    pd-serve cluster --router --mixed 2 --router-policy least_load
    pd-serve cluster --router --prefill 1 --decode 1
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from pd.args import pick_free_port
from pd.cluster_router import flag_values, router_command, wait_registered
from pd.cpu_threads import engine_thread_choice
from pd.default_model import DEFAULT_MODEL_NAME, default_model_path, tiny_model_path

_READY_TIMEOUT_S = 600.0
_STOP_TIMEOUT_S = 40.0
_RESTART_PAUSE_S = 1.0  # doubled after each restart of the same instance


@dataclass
class Instance:
    role: str
    port: int
    process: subprocess.Popen
    log_path: Path
    command: list[str] | None = None
    num_restarts: int = 0
    ready_text: str = "pd-serve ready"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def log_tail(self, num_chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-num_chars:]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pd-serve cluster",
        description="Start a local prefill/decode cluster (embedded Redis + pd-serve "
        "instances); other flags go to every instance.",
    )
    parser.add_argument(
        "--model",
        help="HF checkpoint folder or .gguf file; 'tiny': a generated tiny model "
        f"(default: SmolLM2-135M-Instruct, served as {DEFAULT_MODEL_NAME})",
    )
    parser.add_argument("--prefill", type=int, metavar="N", help="(default: 1; 0 with --router)")
    parser.add_argument("--decode", type=int, metavar="N", help="(default: 1; 0 with --router)")
    parser.add_argument("--mixed", type=int, default=0, metavar="N", help="(default: 0)")
    parser.add_argument(
        "--port", type=int, default=8000, help="first API port; the rest follow (0: free ports)"
    )
    parser.add_argument(
        "--router",
        action="store_true",
        help="start pd-router on --port in front of the instances (no Redis); with "
        "--prefill/--decode it pairs them (pd-router --splitwise)",
    )
    parser.add_argument(
        "--router-policy",
        default="round_robin",
        metavar="NAME",
        help="the router's --policy (with --prefill/--decode: for both roles; default: "
        "round_robin)",
    )
    parser.add_argument("--scheduler-host", help="use this Redis instead of an embedded one")
    parser.add_argument("--scheduler-port", type=int)
    parser.add_argument("--scheduler-topic", default="local-cluster")
    parser.add_argument("--log-dir", help="instance logs (default: a temp dir)")
    parser.add_argument("--ask", metavar="TEXT", help="send one chat request and print the answer")
    parser.add_argument("--once", action="store_true", help="stop after --ask")
    parser.add_argument(
        "--max-restarts", type=int, default=3, metavar="N",
        help="restarts of one instance that dies before the cluster stops (default: 3)",
    )  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> int:
    args, passthrough = build_parser().parse_known_args(argv)
    _check_counts(args)
    stop = _install_stop_handlers()
    from cache_transfer.shm_pools import remove_stale_pools

    for path in remove_stale_pools():  # left by instances killed before this start
        print(f"removed a stale KV pool {path}", flush=True)
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="pd-cluster-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    try:
        model_flags = _model_flags(args.model, passthrough)
        secret_flags, secret = _cluster_secret(passthrough, log_dir)
    except ValueError as error:
        sys.exit(f"pd-serve cluster: {error}")
    redis_server = None
    instances: list[Instance] = []
    try:
        if args.router:
            router_port = args.port or pick_free_port()
            instances.append(_start_router(args, router_port, secret_flags, passthrough, log_dir))
            scheduler_flags = ["--router", f"127.0.0.1:{router_port}"]
        else:
            redis_server, scheduler_flags = _start_scheduler(args, secret)
        common = [*model_flags, "--host", "127.0.0.1", *scheduler_flags, *secret_flags,
                  *passthrough]  # fmt: skip
        roles = ["prefill"] * args.prefill + ["decode"] * args.decode + ["mixed"] * args.mixed
        common += _engine_threads_args(len(roles), passthrough)
        first_port = args.port + len(instances) if args.port else 0
        for index, role in enumerate(roles):
            api_port = first_port + index if first_port else pick_free_port()
            instances.append(_start(role, api_port, common, log_dir / f"{role}-{index}.log"))
        if not _wait_ready(instances, stop):
            return 1
        if args.router and not _wait_registered(instances, stop):
            return 1
        base_url = _announce(instances, roles, log_dir)
        if args.ask is not None:
            print(_ask(base_url, args.ask, flag_values(passthrough, "--api-key")), flush=True)
            if args.once:
                return 0
        return _watch(instances, stop, args.max_restarts)
    finally:
        _stop_all(instances)
        if redis_server is not None:
            redis_server.close()


def _check_counts(args: argparse.Namespace) -> None:
    """Resolve the default instance counts; exit with a message on impossible ones."""
    default = 0 if args.router else 1
    args.prefill = default if args.prefill is None else args.prefill
    args.decode = default if args.decode is None else args.decode
    if args.prefill < 0 or args.decode < 0 or args.mixed < 0:
        sys.exit("pd-serve cluster: instance counts must be >= 0")
    if args.router and args.mixed and (args.prefill or args.decode):
        sys.exit("pd-serve cluster: one router serves mixed instances or prefill/decode "
                 "pairs, not both (--mixed N, or --prefill P --decode D)")  # fmt: skip
    if args.router and not (args.mixed or args.prefill or args.decode):
        sys.exit("pd-serve cluster: --router needs --mixed >= 1, or --prefill >= 1 and "
                 "--decode >= 1")  # fmt: skip
    if args.mixed == 0 and (args.prefill == 0 or args.decode == 0):
        sys.exit("pd-serve cluster: needs --prefill >= 1 and --decode >= 1 (or --mixed >= 1)")


def _start_scheduler(args: argparse.Namespace, secret: bytes):  # type: ignore[no-untyped-def]
    """The embedded Redis (None when --scheduler-host/--scheduler-port name one) and the
    instances' scheduler flags."""
    redis_server = None
    if args.scheduler_host is None and args.scheduler_port is None:
        from pd.cluster_secret import redis_password
        from scheduler.redis_server import EmbeddedRedis

        redis_server = EmbeddedRedis(password=redis_password(secret)).start()
        print(f"embedded Redis on {redis_server.url}", flush=True)
    host = args.scheduler_host or "127.0.0.1"
    port = args.scheduler_port or (redis_server.port if redis_server else 6379)
    flags = [
        "--scheduler-name", "splitwise", "--scheduler-host", host,
        "--scheduler-port", str(port), "--scheduler-topic", args.scheduler_topic,
    ]  # fmt: skip
    return redis_server, flags


def _start_router(
    args: argparse.Namespace,
    port: int,
    secret_flags: list[str],
    passthrough: list[str],
    log_dir: Path,
) -> Instance:
    is_splitwise = args.prefill > 0
    command = router_command(port, args.router_policy, secret_flags, passthrough, is_splitwise)
    log_path = log_dir / "router.log"
    return Instance("router", port, _spawn(command, log_path, "w"), log_path, command,
                    ready_text="pd-router ready")  # fmt: skip


def _wait_registered(instances: list[Instance], stop: list[int]) -> bool:
    """Until the router (the first of ``instances``) lists every other one as up."""
    router = instances[0]
    urls = {f"http://127.0.0.1:{i.port}" for i in instances[1:]}
    api_key = flag_values(router.command or [], "--api-key")
    if wait_registered(router.port, urls, api_key[1] if api_key else None, stop):
        return True
    print(f"the instances did not all register with the router:\n{router.log_tail()}",
          file=sys.stderr)  # fmt: skip
    return False


def _announce(instances: list[Instance], roles: list[str], log_dir: Path) -> str:
    """Print who serves where; the OpenAI base URL (the router's when there is one)."""
    print(f"cluster ready ({', '.join(roles)}; logs in {log_dir})", flush=True)
    for instance in instances:
        print(f"  {instance.role:8s} {instance.base_url}", flush=True)
    print(f"OpenAI base URL: {instances[0].base_url}", flush=True)
    return instances[0].base_url


def _cluster_secret(passthrough: list[str], log_dir: Path) -> tuple[list[str], bytes]:
    """The instances' secret flags and the secret: the user's (--cluster-secret-file or
    PD_CLUSTER_SECRET, which the instances inherit), else a fresh one in ``log_dir``."""
    from pd.cluster_secret import create_secret_file, load_cluster_secret

    for i, arg in enumerate(passthrough):
        if arg.startswith("--cluster-secret-file"):
            path = arg.split("=", 1)[1] if "=" in arg else passthrough[i + 1]
            return [], load_cluster_secret(path)  # type: ignore[return-value]
    secret = load_cluster_secret(None)
    if secret is not None:
        return [], secret
    path = create_secret_file(log_dir)
    print(f"cluster secret in {path}", flush=True)
    return ["--cluster-secret-file", str(path)], load_cluster_secret(str(path))  # type: ignore[return-value]


def _engine_threads_args(num_instances: int, passthrough: list[str]) -> list[str]:
    """``--engine-threads`` for every instance: the cores divided among them, each
    keeping one for its API server; nothing when the user chose (flag or env)."""
    if any(arg.split("=")[0] == "--engine-threads" for arg in passthrough):
        return []
    choice = engine_thread_choice(0, num_engines=num_instances, num_api_servers=num_instances)
    if choice.source != "auto":
        return []
    print(f"engine threads: {choice.num_threads} per instance ({choice.reason})", flush=True)
    return ["--engine-threads", str(choice.num_threads)]


def _install_stop_handlers() -> list[int]:
    """A list that gets the signal number when SIGINT/SIGTERM arrives."""
    received: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda number, _frame: received.append(number))
    return received


def _model_flags(model: str | None, passthrough: list[str]) -> list[str]:
    """The instances' --model (and, for the default model, --served-model-name) flags."""
    if model == "tiny":
        return ["--model", str(tiny_model_path())]
    if model is not None:
        return ["--model", model]
    flags = ["--model", str(default_model_path())]
    if "--served-model-name" not in passthrough:
        flags += ["--served-model-name", DEFAULT_MODEL_NAME]
    return flags


def _start(role: str, port: int, common: list[str], log_path: Path) -> Instance:
    command = [sys.executable, "-m", "pd.serve", *common, "--port", str(port)]
    command += ["--splitwise-role", role]
    return Instance(role, port, _spawn(command, log_path, "w"), log_path, command)


def _spawn(command: list[str], log_path: Path, mode: str) -> subprocess.Popen:
    log = log_path.open(mode)
    # NOTE: a session of its own, so that Ctrl-C reaches only us and we stop the
    # instances before Redis (else they would spend their drain without a scheduler).
    return subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )  # fmt: skip


def _wait_ready(instances: list[Instance], stop: list[int]) -> bool:
    deadline = time.monotonic() + _READY_TIMEOUT_S
    pending = list(instances)
    while pending:
        if stop:
            return False
        for instance in list(pending):
            if instance.process.poll() is not None:
                _report_exit(instance, "")
                return False
            if instance.ready_text in instance.log_path.read_text(errors="replace"):
                pending.remove(instance)
        if time.monotonic() > deadline:
            print(f"instances not ready after {_READY_TIMEOUT_S:.0f} s", file=sys.stderr)
            return False
        time.sleep(0.2)
    return True


def _ask(base_url: str, text: str, api_key_flag: list[str]) -> str:
    """One chat request (``api_key_flag``: ``["--api-key", KEY]`` when the instances
    have one)."""
    import httpx

    headers = {"authorization": f"Bearer {api_key_flag[1]}"} if api_key_flag else {}
    body = {
        "model": httpx.get(f"{base_url}/models", headers=headers, timeout=30).json()["data"][0][
            "id"
        ],
        "messages": [{"role": "user", "content": text}],
        "max_tokens": 32,
        "temperature": 0,
    }
    reply = httpx.post(f"{base_url}/chat/completions", json=body, headers=headers, timeout=120)
    if reply.status_code != 200:
        return f"the cluster answered {reply.status_code}: {reply.text}"
    answer = reply.json()
    usage = answer["usage"]
    return (
        f"Q: {text}\nA: {answer['choices'][0]['message']['content']!r} "
        f"({usage['prompt_tokens']} prompt + {usage['completion_tokens']} new tokens)"
    )


def _watch(instances: list[Instance], stop: list[int], max_restarts: int = 3) -> int:
    """Serve until a signal (exit 0); restart an instance that dies, up to
    ``max_restarts`` times each, then stop the cluster (exit 1)."""
    print("Ctrl-C stops the cluster", flush=True)
    while not stop:
        for instance in instances:
            if instance.process.poll() is None:
                continue
            if instance.num_restarts >= max_restarts:
                _report_exit(instance, f" after {max_restarts} restarts; stopping the cluster")
                return 1
            _report_exit(instance, "; restarting it")
            _restart(instance, stop, max_restarts)
        time.sleep(0.2)
    return 0


def _restart(instance: Instance, stop: list[int], max_restarts: int) -> None:
    """Start a dead instance again on its port (its log goes on in the same file)."""
    from cache_transfer.shm_pools import remove_stale_pools

    pause_s = _RESTART_PAUSE_S * 2**instance.num_restarts
    deadline = time.monotonic() + pause_s
    while time.monotonic() < deadline and not stop:
        time.sleep(0.1)
    if stop:
        return
    for path in remove_stale_pools():
        print(f"removed the dead instance's KV pool {path}", flush=True)
    instance.num_restarts += 1
    assert instance.command is not None
    with instance.log_path.open("a") as log:
        log.write(f"\n--- restart {instance.num_restarts} by pd-serve cluster ---\n")
    instance.process = _spawn(instance.command, instance.log_path, "a")
    print(
        f"{instance.role} instance on port {instance.port} restarted "
        f"({instance.num_restarts} of at most {max_restarts}) as pid "
        f"{instance.process.pid}",
        flush=True,
    )


def _report_exit(instance: Instance, consequence: str) -> None:
    code = instance.process.returncode
    print(
        f"{instance.role} instance on port {instance.port} exited with {code}{consequence}:\n"
        f"{instance.log_tail()}",
        file=sys.stderr,
    )


def _stop_all(instances: list[Instance]) -> None:
    for instance in instances:
        if instance.process.poll() is None:
            instance.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + _STOP_TIMEOUT_S
    for instance in instances:
        try:
            instance.process.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            instance.process.kill()
            instance.process.wait()
