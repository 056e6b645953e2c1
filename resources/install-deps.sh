#!/usr/bin/env bash
# Install the Debian packages mqvmm's build, tests and nested rig need.
# Idempotent: apt-get runs only when something is missing; `apt-get update` runs once,
# and only when an install fails (e.g. a fresh machine with no package lists).
set -euo pipefail

PACKAGES=(
    # nested rig (L1 under TCG) and the QEMU peer for benchmarks
    qemu-system-x86
    # guest and L1 initramfs contents
    busybox-static ethtool iperf3 iproute2
    # image building: .deb extraction, kernel payload formats, cpio archives, module metadata
    dpkg cpio gzip xz-utils lz4 zstd bzip2 lzop kmod binutils file
    # build: clang compiles the eBPF steering program (steering/bpf/steer.c) for the bpf target
    # (linux/bpf.h comes from linux-libc-dev, which clang pulls in through libc6-dev)
    clang
    # tools the tests run on the host or inside L1 (it chroots into the host's root)
    coreutils util-linux procps
)

missing=()
for pkg in "${PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
    [[ "$status" == "install ok installed" ]] || missing+=("$pkg")
done

if ((${#missing[@]} == 0)); then
    exit 0
fi

if [[ $(id -u) -ne 0 ]]; then
    echo "install-deps: missing Debian packages: ${missing[*]} (run as root, or: sudo apt-get install ${missing[*]})" >&2
    exit 1
fi

echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
install() { apt-get install -y -q --no-install-recommends "${missing[@]}"; }
if ! install; then
    echo "install-deps: install failed; refreshing package lists once and retrying"
    apt-get update -q
    install
fi
