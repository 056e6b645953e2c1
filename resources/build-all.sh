#!/usr/bin/env bash
# Build every image mqvmm's tests and `make run` use, from Debian packages only:
#   BUILD/guest/vmlinux, bzImage, initramfs.cpio.gz, cmdline   (L2 guest: Debian's cloud kernel)
#   BUILD/l1/bzImage, initramfs.cpio.gz                          (nested-rig test host: Debian's generic kernel)
# Kernel versions are resolved from the meta packages linux-image-cloud-amd64 and linux-image-amd64 at
# every run. Each output set carries a stamp (hash of the resolved package versions, the host tool
# versions and these scripts); when the stamp matches, nothing is rebuilt. See resources/README.md.
set -euo pipefail

usage() { echo "usage: $0 BUILD_DIR" >&2; exit 2; }
[[ $# -eq 1 ]] || usage

RES=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
BUILD=$(realpath -m "$1")
DEBS="$BUILD/debs"
WORK="$BUILD/work"
mkdir -p "$DEBS" "$WORK"

log() { echo "resources: $*" >&2; }
die() { echo "resources: error: $*" >&2; exit 1; }

# --- package resolution -------------------------------------------------------------------------

apt_updated=0
apt_update_once() {
    if ((apt_updated == 0)); then
        log "refreshing package lists"
        apt-get update -q >&2 || die "apt-get update failed"
        apt_updated=1
    fi
}

# Print the linux-image-<abi> package a meta package depends on today.
resolve_meta() {
    local meta=$1 dep
    dep=$(apt-cache depends "$meta" 2>/dev/null | awk '/Depends: linux-image-/ {print $2; exit}')
    if [[ -z "$dep" ]]; then
        apt_update_once
        dep=$(apt-cache depends "$meta" 2>/dev/null | awk '/Depends: linux-image-/ {print $2; exit}')
    fi
    [[ -n "$dep" ]] || die "cannot resolve the kernel package behind $meta (apt-cache depends $meta)"
    echo "$dep"
}

candidate_version() {
    apt-cache policy "$1" | awk '/Candidate:/ {print $2; exit}'
}

# Download PKG (at its candidate version) into $DEBS unless already there; print the .deb path.
fetch_deb() {
    local pkg=$1 ver file
    ver=$(candidate_version "$pkg")
    [[ -n "$ver" && "$ver" != "(none)" ]] || die "no candidate version for $pkg"
    # Debian encodes an epoch colon as %3a in .deb file names.
    file="$DEBS/${pkg}_${ver//:/%3a}_amd64.deb"
    if [[ ! -s "$file" ]]; then
        log "downloading $pkg=$ver"
        (cd "$DEBS" && apt-get download -q -o APT::Sandbox::User=root "$pkg=$ver" >&2) || return 1
    fi
    [[ -s "$file" ]] || die "downloaded $pkg=$ver but $file is missing"
    echo "$file"
}

# Resolve META to a kernel package and download it; when the download fails (stale package
# lists on a machine that was not updated for a while), refresh the lists once and resolve again.
# Sets PKG, VER, DEB.
resolve_and_fetch() {
    local meta=$1
    PKG=$(resolve_meta "$meta")
    VER=$(candidate_version "$PKG")
    if ! DEB=$(fetch_deb "$PKG"); then
        apt_update_once
        PKG=$(resolve_meta "$meta")
        VER=$(candidate_version "$PKG")
        DEB=$(fetch_deb "$PKG") || die "apt-get download $PKG=$VER failed"
    fi
}

# Extract a kernel .deb into $WORK/<pkg> (cached by the .deb's name) and generate modules.dep there.
extract_kernel_deb() {
    local deb=$1 pkg=$2 release=$3 dir="$WORK/$pkg"
    if [[ ! -f "$dir/.extracted-$(basename "$deb")" ]]; then
        rm -rf "$dir"
        mkdir -p "$dir"
        dpkg-deb -x "$deb" "$dir"
        # Debian generates modules.dep in postinst; we do it for the extracted tree.
        depmod -b "$dir" -F "$dir/boot/System.map-$release" "$release"
        touch "$dir/.extracted-$(basename "$deb")"
    fi
    echo "$dir"
}

# --- kernel payload ----------------------------------------------------------------------------

u8_at() { od -An -tu1 -j "$2" -N1 "$1" | tr -d ' '; }
u32_at() { od -An -tu4 -j "$2" -N4 "$1" | tr -d ' '; }

# Name the compression format of a file from its magic bytes.
detect_format() {
    local magic
    magic=$(od -An -tx1 -N6 "$1" | tr -d ' \n')
    case "$magic" in
        1f8b*) echo gzip ;;
        fd377a585a00) echo xz ;;
        5d0000*) echo lzma ;;
        425a68*) echo bzip2 ;;
        894c5a4f*) echo lzo ;;
        02214c18*) echo lz4 ;;
        28b52ffd*) echo zstd ;;
        *) echo "unknown:$magic" ;;
    esac
}

# Extract the ELF vmlinux from a bzImage: the setup header (boot protocol >= 2.08) locates the
# compressed payload; the kernel build appends the uncompressed size (u32 LE) after it.
extract_vmlinux() {
    local bz=$1 out=$2 setup_sects payload_offset payload_length start fmt expected tmp
    [[ "$(od -An -c -j $((0x202)) -N4 "$bz" | tr -d ' ')" == "HdrS" ]] || die "$bz: no bzImage setup header"
    setup_sects=$(u8_at "$bz" $((0x1f1)))
    ((setup_sects == 0)) && setup_sects=4
    payload_offset=$(u32_at "$bz" $((0x248)))
    payload_length=$(u32_at "$bz" $((0x24c)))
    start=$(((setup_sects + 1) * 512 + payload_offset))
    tmp="$out.payload"
    dd if="$bz" of="$tmp" iflag=skip_bytes,count_bytes skip="$start" count=$((payload_length - 4)) bs=1M status=none
    expected=$(u32_at "$bz" $((start + payload_length - 4)))
    fmt=$(detect_format "$tmp")
    log "kernel payload: $fmt, $((payload_length - 4)) bytes, $expected bytes uncompressed"
    case "$fmt" in
        gzip) gzip -dc <"$tmp" >"$out" ;;
        xz) xz -dc <"$tmp" >"$out" ;;
        lzma) xz --format=lzma -dc <"$tmp" >"$out" ;;
        bzip2) bzip2 -dc <"$tmp" >"$out" ;;
        lzo) lzop -dc <"$tmp" >"$out" ;;
        lz4) lz4 -dc <"$tmp" >"$out" ;;
        zstd) zstd -q -dc <"$tmp" >"$out" ;;
        *) die "$bz: unsupported kernel payload format ($fmt)" ;;
    esac
    rm -f "$tmp"
    [[ "$(od -An -tx1 -N4 "$out" | tr -d ' \n')" == "7f454c46" ]] || die "$out: decompressed payload is not ELF"
    [[ "$(stat -c %s "$out")" == "$expected" ]] ||
        die "$out: decompressed to $(stat -c %s "$out") bytes, the bzImage says $expected"
}

# --- initramfs helpers -------------------------------------------------------------------------

# Install busybox (static) with a symlink per applet.
install_busybox() {
    local root=$1 applet
    mkdir -p "$root/bin" "$root/sbin" "$root/usr/bin" "$root/usr/sbin"
    cp /bin/busybox "$root/bin/busybox"
    while read -r applet; do
        [[ -e "$root/$applet" ]] || ln -s /bin/busybox "$root/$applet"
    done < <(/bin/busybox --list-full)
}

# Copy host binaries and the shared libraries ldd says they need.
install_binaries() {
    local root=$1 bin lib
    shift
    for bin in "$@"; do
        [[ -x "$bin" ]] || die "$bin not found (run resources/install-deps.sh)"
        mkdir -p "$root/$(dirname "$bin")"
        cp -L "$bin" "$root/$bin"
        while read -r lib; do
            mkdir -p "$root/$(dirname "$lib")"
            [[ -e "$root/$lib" ]] || cp -L "$lib" "$root/$lib"
        done < <(ldd "$bin" | grep -o '/[^ ]*')
    done
}

# Copy the named modules and their dependencies, flat, into ROOT/lib/modules, and write
# ROOT/lib/modules/load-order (module file names, dependencies first, each once).
install_modules() {
    local root=$1 kdir=$2 release=$3 mod path base
    shift 3
    mkdir -p "$root/lib/modules"
    : >"$root/lib/modules/load-order"
    for mod in "$@"; do
        modprobe -d "$kdir" -S "$release" --show-depends "$mod" >"$WORK/deps" ||
            die "module $mod not found in $release"
        while read -r verb path _; do
            [[ "$verb" == insmod ]] || continue # "builtin X" needs nothing
            base=$(basename "$path")
            case "$base" in
                *.ko) cp "$path" "$root/lib/modules/$base" ;;
                *.ko.xz) base=${base%.xz}; xz -dc "$path" >"$root/lib/modules/$base" ;;
                *.ko.zst) base=${base%.zst}; zstd -q -dc "$path" >"$root/lib/modules/$base" ;;
                *.ko.gz) base=${base%.gz}; gzip -dc "$path" >"$root/lib/modules/$base" ;;
                *) die "unexpected module file $path" ;;
            esac
            grep -qx "$base" "$root/lib/modules/load-order" || echo "$base" >>"$root/lib/modules/load-order"
        done <"$WORK/deps"
    done
}

make_cpio_gz() {
    local root=$1 out=$2
    (cd "$root" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc --owner=0:0 --reproducible --quiet) |
        gzip -9 -n >"$out.tmp"
    mv "$out.tmp" "$out"
}

stamp_key() {
    { printf '%s\n' "$@"; cat "${BASH_SOURCE[0]}"; } | sha256sum | cut -d' ' -f1
}

up_to_date() {
    local dir=$1 key=$2 f
    shift 2
    [[ -f "$dir/.stamp" && "$(cat "$dir/.stamp")" == "$key" ]] || return 1
    for f in "$@"; do [[ -s "$dir/$f" ]] || return 1; done
}

host_versions() {
    dpkg-query -W -f='${Package}=${Version}\n' busybox-static ethtool iperf3 2>/dev/null
}

tree_hash() { (cd "$1" && find . -type f | LC_ALL=C sort | xargs sha256sum) | sha256sum | cut -d' ' -f1; }

# --- the L2 guest ------------------------------------------------------------------------------

GUEST_MODULES=(virtio_mmio virtio_pci virtio_net)
GUEST_CMDLINE="console=ttyS0 reboot=k panic=-1 mqvmm.ip=10.0.2.15/24 mqvmm.gw=10.0.2.1"

build_guest() {
    local pkg deb ver release kdir out="$BUILD/guest" key root
    pkg=$(resolve_meta linux-image-cloud-amd64)
    ver=$(candidate_version "$pkg")
    release=${pkg#linux-image-}
    key=$(stamp_key "$pkg=$ver" "$(host_versions)" "$(tree_hash "$RES/guest")" "${GUEST_MODULES[*]}" "$GUEST_CMDLINE")
    if up_to_date "$out" "$key" vmlinux bzImage initramfs.cpio.gz cmdline; then
        log "guest images up to date ($release)"
        return
    fi
    resolve_and_fetch linux-image-cloud-amd64
    pkg=$PKG deb=$DEB release=${PKG#linux-image-}
    key=$(stamp_key "$PKG=$VER" "$(host_versions)" "$(tree_hash "$RES/guest")" "${GUEST_MODULES[*]}" "$GUEST_CMDLINE")
    log "building guest images for $release"
    kdir=$(extract_kernel_deb "$deb" "$pkg" "$release")
    rm -rf "$out.new" && mkdir -p "$out.new"
    cp "$kdir/boot/vmlinuz-$release" "$out.new/bzImage"
    extract_vmlinux "$out.new/bzImage" "$out.new/vmlinux"

    root="$WORK/guest-root"
    rm -rf "$root" && mkdir -p "$root"/{proc,sys,dev,tmp,run,etc/init.d,root,var/log}
    install_busybox "$root"
    install_binaries "$root" /usr/sbin/ethtool /usr/bin/iperf3
    install_modules "$root" "$kdir" "$release" "${GUEST_MODULES[@]}"
    echo "$release" >"$root/etc/mqvmm-kernel-release"
    cp "$RES/guest/inittab" "$root/etc/inittab"
    install -m 0755 "$RES/guest/rcS" "$root/etc/init.d/rcS"
    install -m 0755 "$RES/guest/main" "$root/etc/init.d/main"
    install -m 0755 "$RES/guest/shutdown" "$root/etc/init.d/shutdown"
    cp "$RES/guest/profile" "$root/etc/profile"
    mkdir -p "$root/scenarios"
    install -m 0755 "$RES"/guest/scenarios/* "$root/scenarios/"
    printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' >"$root/etc/passwd"
    printf 'root:x:0:\nnogroup:x:65534:\n' >"$root/etc/group"
    printf '127.0.0.1 localhost\n10.0.2.1 host\n10.0.2.15 guest\n' >"$root/etc/hosts"
    ln -s /bin/busybox "$root/init"
    make_cpio_gz "$root" "$out.new/initramfs.cpio.gz"
    echo "$GUEST_CMDLINE" >"$out.new/cmdline"
    echo "$key" >"$out.new/.stamp"
    rm -rf "$out" && mv "$out.new" "$out"
    log "guest: $out/vmlinux $(stat -c %s "$out/vmlinux") B, initramfs $(stat -c %s "$out/initramfs.cpio.gz") B"
}

# --- the L1 test host of the nested rig ---------------------------------------------------------

L1_MODULES=(virtio_pci virtio_console 9pnet_virtio 9p kvm_amd tun veth vhost_net bridge)

build_l1() {
    local pkg deb ver release kdir out="$BUILD/l1" key root
    pkg=$(resolve_meta linux-image-amd64)
    ver=$(candidate_version "$pkg")
    release=${pkg#linux-image-}
    key=$(stamp_key "$pkg=$ver" "$(host_versions)" "$(tree_hash "$RES/l1")" "${L1_MODULES[*]}")
    if up_to_date "$out" "$key" bzImage initramfs.cpio.gz; then
        log "L1 images up to date ($release)"
        return
    fi
    resolve_and_fetch linux-image-amd64
    pkg=$PKG deb=$DEB release=${PKG#linux-image-}
    key=$(stamp_key "$PKG=$VER" "$(host_versions)" "$(tree_hash "$RES/l1")" "${L1_MODULES[*]}")
    log "building L1 images for $release"
    kdir=$(extract_kernel_deb "$deb" "$pkg" "$release")
    rm -rf "$out.new" && mkdir -p "$out.new"
    cp "$kdir/boot/vmlinuz-$release" "$out.new/bzImage"

    root="$WORK/l1-root"
    rm -rf "$root" && mkdir -p "$root"/{proc,sys,dev,tmp,run,etc,host}
    install_busybox "$root"
    install_modules "$root" "$kdir" "$release" "${L1_MODULES[@]}"
    install -m 0755 "$RES/l1/init" "$root/init"
    install -m 0755 "$RES/l1/agent" "$root/bin/mqvmm-agent"
    make_cpio_gz "$root" "$out.new/initramfs.cpio.gz"
    echo "$key" >"$out.new/.stamp"
    rm -rf "$out" && mv "$out.new" "$out"
    log "L1: $out/bzImage, initramfs $(stat -c %s "$out/initramfs.cpio.gz") B"
}

build_guest
build_l1
