"""``pd-serve cluster --router``: the command lines it starts (spawning is faked, nothing
runs) and the instance counts it refuses."""

from __future__ import annotations

import pytest

import cache_transfer.shm_pools
from pd import cluster
from pd.cluster_router import flag_values


class _Exited:
    """A process that has already exited."""

    returncode = 0

    def poll(self) -> int:
        return 0

    def wait(self, timeout: float | None = None) -> int:
        return 0


def launched(monkeypatch, tmp_path, *argv: str) -> list[list[str]]:
    """The commands ``pd-serve cluster ARGV`` starts, the router's first (it gives up
    at once: nothing gets ready)."""
    commands: list[list[str]] = []

    def spawn(command, log_path, mode):  # type: ignore[no-untyped-def]
        commands.append(command)
        return _Exited()

    monkeypatch.setattr(cluster, "_spawn", spawn)
    monkeypatch.setattr(cluster, "_wait_ready", lambda instances, stop: False)
    monkeypatch.setattr(cluster, "_install_stop_handlers", lambda: [])
    monkeypatch.setattr(cache_transfer.shm_pools, "remove_stale_pools", lambda: [])
    monkeypatch.delenv("PD_CLUSTER_SECRET", raising=False)
    flags = ["--model", str(tmp_path), "--log-dir", str(tmp_path), "--port", "18000"]
    assert cluster.main([*argv, *flags]) == 1
    return commands


def test_prefill_and_decode_behind_a_splitwise_router_and_no_redis(monkeypatch, tmp_path):
    router, *instances = launched(monkeypatch, tmp_path, "--router", "--prefill", "1",
                                  "--decode", "2", "--router-policy", "least_load")  # fmt: skip
    assert router[1:3] == ["-m", "pd.router"] and "--splitwise" in router
    assert flag_values(router, "--policy") == ["--policy", "least_load"]
    assert [flag_values(c, "--splitwise-role")[1] for c in instances] == [
        "prefill", "decode", "decode"]  # fmt: skip
    assert [flag_values(c, "--port")[1] for c in instances] == ["18001", "18002", "18003"]
    for command in instances:
        assert flag_values(command, "--router") == ["--router", "127.0.0.1:18000"]
        assert not [arg for arg in command if arg.startswith("--scheduler")], command


def test_mixed_instances_behind_a_plain_router(monkeypatch, tmp_path):
    router, *instances = launched(monkeypatch, tmp_path, "--router", "--mixed", "2")
    assert "--splitwise" not in router
    assert [flag_values(c, "--splitwise-role")[1] for c in instances] == ["mixed", "mixed"]


@pytest.mark.parametrize(("argv", "message"), [
    (["--router"], "--router needs --mixed >= 1, or --prefill >= 1 and --decode >= 1"),
    (["--router", "--mixed", "1", "--prefill", "1", "--decode", "1"],
     "one router serves mixed instances or prefill/decode pairs, not both"),
    (["--router", "--prefill", "1"], "needs --prefill >= 1 and --decode >= 1"),
])  # fmt: skip
def test_impossible_router_counts_exit_with_one_line(argv, message):
    with pytest.raises(SystemExit) as exit_:
        cluster.main(argv)
    assert message in str(exit_.value.code)
