//! Skip helpers shared by every integration test.
//!
//! Each `require_*` returns `true` when the requirement holds. When it does not, it prints one line
//! `skip: <reason>` and returns `false`, and the test returns early:
//!
//! ```ignore
//! if !mqvmm_tests::skip::require_root() { return; }
//! ```
//!
//! With `MQVMM_NO_SKIP=1` in the environment a missing requirement panics instead, so that a CI
//! run that is supposed to have everything cannot pass by skipping.

use std::fs::OpenOptions;
use std::path::Path;

use crate::rig;

/// Report a missing requirement: one `skip:` line, or a panic under `MQVMM_NO_SKIP=1`.
/// Always returns `false` so callers can `return skip(...)`.
pub fn skip(reason: &str) -> bool {
    if std::env::var_os("MQVMM_NO_SKIP").is_some_and(|v| v == "1") {
        panic!("MQVMM_NO_SKIP=1 but a requirement is missing: {reason}");
    }
    // Bypasses libtest's capture so the reason shows even though the test "passes".
    rig::note(&format!("skip: {reason}"));
    false
}

/// The test runs as root (uid 0).
pub fn require_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    euid == 0 || skip(&format!("needs root (running as euid {euid})"))
}

/// /dev/net/tun exists and can be opened read-write.
pub fn require_tun() -> bool {
    match OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
    {
        Ok(_) => true,
        Err(e) => skip(&format!("needs /dev/net/tun ({e})")),
    }
}

/// A program is on PATH.
pub fn require_program(name: &str) -> bool {
    find_in_path(name).is_some() || skip(&format!("needs `{name}` on PATH (run `make deps`)"))
}

/// Debian's QEMU (qemu-system-x86_64) is installed.
pub fn require_qemu() -> bool {
    require_program("qemu-system-x86_64")
}

/// The guest images built by `make resources` exist (vmlinux, bzImage, initramfs).
pub fn require_guest_images() -> bool {
    let images = rig::guest_images();
    for path in [&images.vmlinux, &images.bzimage, &images.initramfs] {
        if !path.is_file() {
            return skip(&format!("needs {} (run `make resources`)", path.display()));
        }
    }
    true
}

/// A KVM environment is available: /dev/kvm runs an ordinary guest here (direct mode), or the
/// nested rig can be used (qemu-system-x86_64 and the L1 images from `make resources`).
/// Inside L1 this is true once /dev/kvm exists.
pub fn require_kvm_env() -> bool {
    if rig::in_l1() {
        return Path::new("/dev/kvm").exists() || skip("inside L1 but /dev/kvm is missing");
    }
    match rig::mode() {
        rig::Mode::Direct => true,
        rig::Mode::Nested => {
            if !require_qemu() {
                return false;
            }
            let l1 = rig::l1_images();
            for path in [&l1.bzimage, &l1.initramfs] {
                if !path.is_file() {
                    return skip(&format!(
                        "the nested rig needs {} (run `make resources`)",
                        path.display()
                    ));
                }
            }
            true
        }
    }
}

/// A binary of this workspace (e.g. `mqvmm`) has been built next to the test executable.
pub fn require_binary(name: &str) -> bool {
    let path = rig::bin_path(name);
    path.is_file()
        || skip(&format!(
            "needs {} (run `make build`, i.e. cargo build --release --workspace --bins)",
            path.display()
        ))
}

/// Look a program up on PATH.
pub fn find_in_path(name: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}
