"""scripts/get_rdma_nics.sh on fake sysfs trees (and a fake `ip`)."""

from __future__ import annotations

import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "get_rdma_nics.sh"
NVIDIA, MELLANOX = "0x10de", "0x15b3"
GPU_3D, ETHERNET, INFINIBAND = "0x030200", "0x020000", "0x020700"


class FakeMachine:
    """A sysfs tree: PCI devices under root complexes, IB devices, network interfaces."""

    def __init__(self, root: Path):
        self.sys = root / "sys"
        self.ip_output: list[str] = []
        (self.sys / "bus/pci/devices").mkdir(parents=True)
        (self.sys / "class/infiniband").mkdir(parents=True)
        (self.sys / "class/net").mkdir(parents=True)
        self.fake_ip = root / "ip"

    def pci(self, bdf: str, root: str, pci_class: str, vendor: str) -> Path:
        device = self.sys / "devices" / f"pci{root}" / f"{root}:00.0" / bdf
        device.mkdir(parents=True)
        (device / "class").write_text(pci_class + "\n")
        (device / "vendor").write_text(vendor + "\n")
        os.symlink(os.path.relpath(device, self.sys / "bus/pci/devices"),
                   self.sys / "bus/pci/devices" / bdf)  # fmt: skip
        return device

    def gpu(self, bdf: str, root: str) -> None:
        self.pci(bdf, root, GPU_3D, NVIDIA)

    def rdma(self, name: str, bdf: str, root: str, state: str = "4: ACTIVE") -> Path:
        device = self.pci(bdf, root, INFINIBAND, MELLANOX)
        ib = self.sys / "class/infiniband" / name
        (ib / "ports/1").mkdir(parents=True)
        (ib / "ports/1/state").write_text(state + "\n")
        os.symlink(os.path.relpath(device, ib), ib / "device")
        return device

    def iface(self, name: str, device: Path | None, up: bool = True, ipv4: bool = True) -> Path:
        net = self.sys / "class/net" / name
        net.mkdir()
        (net / "operstate").write_text("up\n" if up else "down\n")
        if device is not None:
            os.symlink(os.path.relpath(device, net), net / "device")
        if ipv4:
            index = len(self.ip_output) + 2
            self.ip_output.append(f"{index}: {name}    inet 10.0.0.{index}/24 scope global {name}")
        return net

    def bond(self, name: str, slaves: list[str]) -> None:
        net = self.iface(name, None)
        (net / "bonding").mkdir()
        (net / "bonding/slaves").write_text(" ".join(slaves) + "\n")

    def run(self, mode: str, write_ip: bool = True) -> subprocess.CompletedProcess:
        if write_ip:
            lines = ["1: lo    inet 127.0.0.1/8 scope host lo", *self.ip_output]
            self.fake_ip.write_text("#!/bin/sh\ncat <<'END'\n" + "\n".join(lines) + "\nEND\n")
            self.fake_ip.chmod(0o755)
        env = {**os.environ, "PD_SYSFS_ROOT": str(self.sys), "PD_IP_CMD": str(self.fake_ip)}
        return subprocess.run(
            ["bash", str(SCRIPT), mode], env=env, capture_output=True, text=True, timeout=30
        )


@pytest.fixture
def machine(tmp_path: Path) -> FakeMachine:
    return FakeMachine(tmp_path)


def test_gpu_lists_active_nics_on_a_gpu_root_in_pci_order(machine: FakeMachine) -> None:
    machine.gpu("0000:1a:00.0", "0000:17")
    machine.gpu("0000:9a:00.0", "0000:97")
    machine.rdma("mlx5_1", "0000:9c:00.0", "0000:97")
    machine.rdma("mlx5_0", "0000:1c:00.0", "0000:17")
    machine.rdma("mlx5_2", "0000:1d:00.0", "0000:17", state="1: DOWN")
    machine.rdma("mlx5_3", "0000:5c:00.0", "0000:5d")  # a NIC on a root without GPU
    result = machine.run("gpu")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "KVCACHE_RDMA_NICS=mlx5_0,mlx5_1\n"


def test_gpu_fails_clearly_when_no_nic_shares_a_gpu_root(machine: FakeMachine) -> None:
    machine.gpu("0000:1a:00.0", "0000:17")
    machine.rdma("mlx5_0", "0000:5c:00.0", "0000:5d")
    result = machine.run("gpu")
    assert result.returncode == 1 and result.stdout == ""
    assert "no active RDMA device shares a PCIe root with a GPU" in result.stderr


def test_gpu_fails_clearly_without_nics_or_gpus(machine: FakeMachine) -> None:
    result = machine.run("gpu")
    assert result.returncode == 1 and "no GPU found" in result.stderr
    machine.gpu("0000:1a:00.0", "0000:17")
    result = machine.run("gpu")
    assert result.returncode == 1 and "no active RDMA device" in result.stderr


def test_cpu_picks_the_first_up_interface_off_the_gpu_roots(machine: FakeMachine) -> None:
    machine.gpu("0000:1a:00.0", "0000:17")
    on_gpu_root = machine.pci("0000:1b:00.0", "0000:17", ETHERNET, MELLANOX)
    elsewhere = machine.pci("0000:5b:00.0", "0000:5d", ETHERNET, MELLANOX)
    machine.iface("ens1", on_gpu_root)
    machine.iface("ens2", elsewhere, up=False)
    machine.iface("ens3", elsewhere, ipv4=False)
    machine.iface("ens4", elsewhere)
    result = machine.run("cpu")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "KVCACHE_SOCKET_IFNAME=ens4\n"


def test_cpu_judges_a_bond_by_its_slaves(machine: FakeMachine) -> None:
    machine.gpu("0000:1a:00.0", "0000:17")
    on_gpu_root = machine.pci("0000:1b:00.0", "0000:17", ETHERNET, MELLANOX)
    elsewhere = machine.pci("0000:5b:00.0", "0000:5d", ETHERNET, MELLANOX)
    machine.iface("eth0", on_gpu_root, ipv4=False)
    machine.iface("eth1", elsewhere, ipv4=False)
    machine.bond("bond0", ["eth0"])
    machine.bond("bond1", ["eth1"])
    assert machine.run("cpu").stdout == "KVCACHE_SOCKET_IFNAME=bond1\n"


def test_gpu_accepts_a_bonded_rdma_device(machine: FakeMachine) -> None:
    machine.gpu("0000:1a:00.0", "0000:17")
    machine.rdma("mlx5_bond_0", "0000:1c:00.0", "0000:17")
    assert machine.run("gpu").stdout == "KVCACHE_RDMA_NICS=mlx5_bond_0\n"


def test_concurrent_runs_agree_and_leave_no_files(machine: FakeMachine, tmp_path: Path) -> None:
    machine.gpu("0000:1a:00.0", "0000:17")
    machine.rdma("mlx5_0", "0000:1c:00.0", "0000:17")
    machine.run("gpu")  # writes the fake ip once
    before = sorted(p for p in tmp_path.rglob("*"))
    with ThreadPoolExecutor(8) as pool:
        outputs = list(pool.map(lambda _: machine.run("gpu", write_ip=False).stdout, range(16)))
    assert set(outputs) == {"KVCACHE_RDMA_NICS=mlx5_0\n"}
    assert sorted(p for p in tmp_path.rglob("*")) == before


def test_usage_error() -> None:
    result = subprocess.run(["bash", str(SCRIPT), "npu"], capture_output=True, text=True)
    assert result.returncode == 2 and "usage" in result.stderr
