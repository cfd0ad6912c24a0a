"""The FastDeploy command lines of the seeds, verbatim, and what the tests change in them.

From ``seeds/002_*`` (FastDeploy's data-parallel page, zh) and ``seeds/004_*`` (en):
each text is the doc's, continuation lines and quoting included; only the program
(``python -m fastdeploy.entrypoints.openai.api_server`` / ``.multi_api_server``) is
mapped to ours (``PROGRAMS``). A test that starts a command changes three things
(README, "FastDeploy's command lines"):

- the model: a generated tiny one (the ERNIE checkpoint is 300B parameters);
- device counts: ``--data-parallel-size`` 8 or 4 -> 2, and ``--num-servers`` with its
  one-per-server ``--ports``/``--metrics-ports`` 8 -> 2; the per-DP-rank port lists
  keep their eight entries, as typed;
- port numbers: every port moves to a free one, each list keeping its length and a
  single port its form (``--pd-comm-port 2334`` stays one port, counted up with free
  ports above it): a test machine runs other tests, and the prefill and decode
  commands, written for two hosts, share their ports.
"""

from __future__ import annotations

import shlex
import socket
import sys

from pd.args import pick_free_port

PROGRAMS = {
    "python -m fastdeploy.entrypoints.openai.api_server": [sys.executable, "-m", "pd.serve"],
    "python -m fastdeploy.entrypoints.openai.multi_api_server": [
        sys.executable, "-m", "pd.multi_api_server",
    ],
}  # fmt: skip

# 002: "在线推理" under "专家并行 + 混合式部署": one API server, DP 8, splitwise scheduler.
ONLINE_SPLITWISE = r"""
python -m fastdeploy.entrypoints.openai.api_server \
       --model ERNIE-4_5-300B-A47B-FP8-Paddle \
       --port 8184 --metrics-port 8185 \
       --engine-worker-queue-port "6077,6078,6079,6080,6081,6082,6083,6084"  \
       --data-parallel-size 8 --tensor-parallel-size 1\
       --enable-expert-parallel \
       --scheduler-name "splitwise" \
       --scheduler-host "127.0.0.1" \
       --scheduler-port 6379 \
       --scheduler-topic "test" \
       --scheduler-ttl 9000
"""

# 002: "用户自行调度": one API server per DP rank.
MULTI_API_SERVER_002 = r"""
python -m fastdeploy.entrypoints.openai.multi_api_server \
  --ports "1811,1822,1833,1844,1855,1866,1877,1888" \
  --num-servers 8 \
  --metrics-ports "3101,3201,3301,3401,3501,3601,3701,3801" \
  --args --model ERNIE-4_5-300B-A47B-FP8-Paddle \
  --engine-worker-queue-port "25611,25621,25631,25641,25651,25661,25671,25681" \
  --tensor-parallel-size 1 \
  --data-parallel-size 8 \
  --max-model-len 12288 \
  --max-num-seqs 64 \
  --num-gpu-blocks-override 256 \
  --enable-expert-parallel
"""

# 004: "Launching FastDeploy Services": the same flags, --num-servers first.
MULTI_API_SERVER_004 = r"""
python -m fastdeploy.entrypoints.openai.multi_api_server \
--num-servers 8 \
--ports "1811,1822,1833,1844,1855,1866,1877,1888" \
--metrics-ports "3101,3201,3301,3401,3501,3601,3701,3801" \
--args --model ERNIE-4_5-300B-A47B-FP8-Paddle \
--engine-worker-queue-port "25611,25621,25631,25641,25651,25661,25671,25681" \
--tensor-parallel-size 1 \
--data-parallel-size 8 \
--max-model-len 12288 \
--max-num-seqs 64 \
--num-gpu-blocks-override 256 \
--enable-expert-parallel
"""

# 004: "Launching DP Services with Router".
MULTI_API_SERVER_ROUTER = r"""
python -m fastdeploy.entrypoints.openai.multi_api_server \
--num-servers 8 \
--ports "1811,1822,1833,1844,1855,1866,1877,1888" \
--metrics-ports "3101,3201,3301,3401,3501,3601,3701,3801" \
--args --model ERNIE-4_5-300B-A47B-FP8-Paddle \
--tensor-parallel-size 1 \
--data-parallel-size 8 \
--max-model-len 12288 \
--max-num-seqs 64 \
--num-gpu-blocks-override 256 \
--enable-expert-parallel \
--router "0.0.0.0:30000"
"""

# 002: "数据并行 + 分离式部署", the prefill instance.
PREFILL = r"""
python -m fastdeploy.entrypoints.openai.api_server \
       --model ERNIE-4_5-300B-A47B-FP8-Paddle \
       --port 8180 --metrics-port 8181 \
       --engine-worker-queue-port "25611,25621,25631,25641,25651,25661,25671,25681" \
       --cache-queue-port 8183 \
       --tensor-parallel-size 1 \
       --data-parallel-size 4 \
       --enable-expert-parallel \
       --cache-transfer-protocol "rdma,ipc" \
       --rdma-comm-ports "7671,7672,7673,7674,7675,7676,7677,7678" \
       --pd-comm-port "2334" \
       --splitwise-role "prefill" \
       --scheduler-name "splitwise" \
       --scheduler-host "127.0.0.1" \
       --scheduler-port 6379 \
       --scheduler-topic "test" \
       --scheduler-ttl 9000
"""

# 002, the decode instance: the doc's line after ``--scheduler-ttl 9000`` has no
# backslash, so a shell ends the command there (``shell_argv``); joined, the lines are
# what the doc means (``doc_argv``).
DECODE = r"""
python -m fastdeploy.entrypoints.openai.api_server \
       --model ERNIE-4_5-300B-A47B-FP8-Paddle \
       --port 8184 --metrics-port 8185 \
       --engine-worker-queue-port "25611,25621,25631,25641,25651,25661,25671,25681" \
       --cache-queue-port 8187 \
       --tensor-parallel-size 1 \
       --data-parallel-size 4 \
       --enable-expert-parallel \
       --scheduler-name "splitwise" \
       --cache-transfer-protocol "rdma,ipc" \
       --rdma-comm-ports "7671,7672,7673,7674,7675,7676,7677,7678" \
       --pd-comm-port "2334" \
       --scheduler-host "127.0.0.1" \
       --scheduler-port 6379 \
       --scheduler-ttl 9000
       --scheduler-topic "test" \
       --splitwise-role "decode"
"""

# Flags whose value is a port or a list of ports; those read "one to count up from".
PORT_FLAGS = (
    "--port", "--metrics-port", "--ports", "--metrics-ports", "--engine-worker-queue-port",
    "--cache-queue-port", "--rdma-comm-ports", "--pd-comm-port",
)  # fmt: skip
COUNTED_UP = ("--cache-queue-port", "--pd-comm-port")
PER_SERVER = ("--ports", "--metrics-ports")  # multi-api-server: one per --num-servers


def doc_argv(text: str) -> list[str]:
    """The flags of ``text`` with every line joined (the program left out)."""
    return _flags(shlex.split(text.replace("\\\n", "")))


def shell_argv(text: str) -> list[str]:
    """The flags a shell passes: a backslash-newline joins two lines, and the command
    ends at the first newline without one."""
    joined = text.strip().replace("\\\n", "")
    return _flags(shlex.split(joined.splitlines()[0]))


def command(text: str, argv: list[str]) -> list[str]:
    """Our program for ``text``'s, then ``argv``."""
    program = next(ours for theirs, ours in PROGRAMS.items() if theirs in text)
    return [*program, *argv]


def _flags(words: list[str]) -> list[str]:
    assert " ".join(words[:3]) in PROGRAMS, words[:3]
    return words[3:]


def adapt(argv: list[str], model: str, num_ranks: int, scheduler_port: int | None = None,
          taken: set[int] | None = None) -> list[str]:  # fmt: skip
    """``argv`` on this machine: ``model``, ``num_ranks`` DP ranks (and servers), free
    ports (none of ``taken``, which grows), Redis on ``scheduler_port``."""
    taken = set() if taken is None else taken
    out = list(argv)
    for index in range(len(out) - 1):
        flag, value = out[index], out[index + 1]
        if flag == "--model":
            out[index + 1] = model
        elif flag in ("--data-parallel-size", "--num-servers"):
            out[index + 1] = str(num_ranks)
        elif flag == "--scheduler-port" and scheduler_port is not None:
            out[index + 1] = str(scheduler_port)
        elif flag in PORT_FLAGS:
            count = len(value.split(","))
            if flag in PER_SERVER:
                count = num_ranks
            if flag in COUNTED_UP and count == 1:
                out[index + 1] = str(free_run(num_ranks, taken))
            else:
                out[index + 1] = ",".join(str(free_run(1, taken)) for _ in range(count))
    return out


def free_run(length: int, taken: set[int]) -> int:
    """The first of ``length`` consecutive ports that are free now and not ``taken``."""
    for _ in range(200):
        base = pick_free_port()
        run = range(base, base + length)
        if base + length <= 65535 and taken.isdisjoint(run) and all(map(_is_free, run[1:])):
            taken.update(run)
            return base
    raise RuntimeError(f"no {length} consecutive free ports")


def _is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
