#!/usr/bin/env bash
# Which NICs should carry the KV cache on this machine.
#
#   export $(bash scripts/get_rdma_nics.sh gpu)   # KVCACHE_RDMA_NICS=mlx5_0,mlx5_1,...
#   export $(bash scripts/get_rdma_nics.sh cpu)   # KVCACHE_SOCKET_IFNAME=eth0
#
# gpu: active RDMA devices whose PCI device sits under the same PCIe root complex as a
#      GPU, in PCI order (GPU rank i then uses NIC i mod n).
# cpu: the first interface that is up, has an IPv4 address and is not under a GPU's
#      root complex (a bond counts by its slaves).
# Nothing found: a message on stderr and exit status 1.
#
# Reads only sysfs and `ip`, both overridable so that tests run it on fake trees:
#   PD_SYSFS_ROOT (default /sys), PD_IP_CMD (default "ip"). It writes no files.
set -euo pipefail

SYS="${PD_SYSFS_ROOT:-/sys}"
IP_CMD="${PD_IP_CMD:-ip}"

usage() {
    echo "usage: $0 {gpu|cpu}" >&2
    exit 2
}

# The root complex (e.g. pci0000:3a) a PCI device path resolves under; empty if none.
pci_root() {
    local path
    path="$(readlink -f "$1" 2>/dev/null)" || return 0
    case "$path" in
        "$(readlink -f "$SYS")"/devices/pci*) ;;
        *) return 0 ;;
    esac
    path="${path#"$(readlink -f "$SYS")"/devices/}"
    echo "${path%%/*}"
}

is_gpu() {  # $1: a PCI device dir
    local class vendor
    class="$(cat "$1/class" 2>/dev/null || true)"
    vendor="$(cat "$1/vendor" 2>/dev/null || true)"
    case "$class" in
        0x0302*|0x1200*) return 0 ;;                       # 3D controller, accelerator
        0x0300*) [[ "$vendor" == 0x10de || "$vendor" == 0x1002 ]] && return 0 ;;
    esac
    return 1
}

gpu_roots() {  # one root complex per line, unique
    local dev
    for dev in "$SYS"/bus/pci/devices/*; do
        if [[ -e "$dev" ]] && is_gpu "$dev"; then
            pci_root "$dev"
        fi
    done | sort -u
}

is_active() {  # $1: /sys/class/infiniband/<dev>
    local state
    for state in "$1"/ports/*/state; do
        [[ -r "$state" ]] && grep -q "ACTIVE" "$state" && return 0
    done
    return 1
}

gpu_nics() {
    local roots ib nics=()
    roots="$(gpu_roots)"
    if [[ -z "$roots" ]]; then
        echo "get_rdma_nics.sh: no GPU found under $SYS/bus/pci/devices" >&2
        return 1
    fi
    for ib in "$SYS"/class/infiniband/*; do
        [[ -e "$ib/device" ]] || continue
        is_active "$ib" || continue
        if grep -qxF "$(pci_root "$ib/device")" <<<"$roots"; then
            nics+=("$(basename "$ib")")
        fi
    done
    if ((${#nics[@]} == 0)); then
        echo "get_rdma_nics.sh: no active RDMA device shares a PCIe root with a GPU" \
             "(looked in $SYS/class/infiniband)" >&2
        return 1
    fi
    local IFS=,
    echo "KVCACHE_RDMA_NICS=${nics[*]}"
}

# Root complexes of a network interface: its own device, or its bond slaves'.
iface_roots() {
    local net="$SYS/class/net/$1" slave
    if [[ -e "$net/device" ]]; then
        pci_root "$net/device"
    elif [[ -r "$net/bonding/slaves" ]]; then
        for slave in $(cat "$net/bonding/slaves"); do
            pci_root "$SYS/class/net/$slave/device"
        done
    fi
}

cpu_nic() {
    local roots iface state root
    roots="$(gpu_roots)"
    while read -r iface; do
        [[ "$iface" == lo ]] && continue
        state="$(cat "$SYS/class/net/$iface/operstate" 2>/dev/null || echo down)"
        [[ "$state" == up ]] || continue
        local on_gpu_root=0
        while read -r root; do
            if [[ -n "$root" ]] && grep -qxF "$root" <<<"$roots"; then
                on_gpu_root=1
            fi
        done < <(iface_roots "$iface")
        if ((on_gpu_root == 0)); then
            echo "KVCACHE_SOCKET_IFNAME=$iface"
            return 0
        fi
    done < <($IP_CMD -o -4 addr show 2>/dev/null | awk '{sub(/@.*/, "", $2); if (!seen[$2]++) print $2}')
    echo "get_rdma_nics.sh: no interface is up with an IPv4 address off the GPUs' PCIe roots" >&2
    return 1
}

case "${1:-}" in
    gpu) gpu_nics ;;
    cpu) cpu_nic ;;
    *) usage ;;
esac
