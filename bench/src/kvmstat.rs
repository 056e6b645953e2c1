// SPDX-License-Identifier: Apache-2.0
//! KVM's own per-vCPU statistics of a running VMM, read from outside the VMM.
//!
//! Issue 12 asks for exits, kicks and interrupts per MB. The tracepoints it names
//! (`kvm:kvm_exit`, `kvm:kvm_userspace_exit`, interrupt injection) increment counters KVM keeps
//! anyway, per vCPU: `exits`, `mmio_exits`/`io_exits` (exits to the VMM for an MMIO or port
//! access, e.g. a virtio kick without an ioeventfd), `insn_emulation`, `irq_injections`,
//! `halt_exits`. Reading those needs no new package (`perf` would) and costs nothing while the
//! guest runs (tracing every exit in the nested rig's L1, itself an emulator, would slow exactly
//! what is measured). KVM exports them two ways. The binary statistics fd (`KVM_GET_STATS_FD`)
//! would be the tidier one, but KVM answers that ioctl, like every vCPU ioctl, only to the
//! process whose mm created the VM: from the bench, on a vCPU fd taken with `pidfd_getfd`, it
//! fails with EIO (seen in L1's 6.1 kernel), and the VMMs would have to hand the fd out. So
//! this reads debugfs, `/sys/kernel/debug/kvm/<pid>-<vm fd>/<counter>`, where every vCPU
//! counter of the VM is already summed over its vCPUs; the bench mounts debugfs where it is
//! not (L1's init does not). The VM fd number comes from /proc/PID/fd (`anon_inode:kvm-vm`).
//!
//! What KVM does not count: kicks an ioeventfd took (no exit to the VMM, no counter of its own).
//! Under the rig's shadow paging (L1 runs with `-npt`) such a kick is an MMIO page fault KVM
//! decodes and emulates in the kernel: it counts in `insn_emulation` (once per decoded
//! instruction) but not in `mmio_exits`, while an MMIO exit to the VMM counts in both. So
//! `insn_emulation - mmio_exits` is what KVM emulated and completed itself: ioeventfd kicks,
//! plus, under shadow paging, the guest's writes to its own write-protected page tables (and
//! any in-kernel xAPIC/IOAPIC MMIO; the guests here use x2APIC, MSRs, and MSI-X). mqvmm's own
//! kick counter, recorded over the same run, tells how much of it is kicks.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Where debugfs is mounted.
const DEBUGFS: &str = "/sys/kernel/debug";
/// The counters read (every one a vCPU counter, summed over the VM's vCPUs by KVM).
pub const COUNTERS: [&str; 6] = [
    "exits",
    "mmio_exits",
    "io_exits",
    "insn_emulation",
    "irq_injections",
    "halt_exits",
];

/// Reading a VMM's KVM statistics failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The VMM's fd table could not be listed.
    #[error("cannot list /proc/{pid}/fd")]
    ListFds {
        /// The VMM.
        pid: u32,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The VMM has no VM fd (not a KVM VMM, or it exited).
    #[error("process {pid} holds no kvm-vm fd")]
    NoVm {
        /// The VMM.
        pid: u32,
    },
    /// debugfs has no directory for KVM and could not be mounted.
    #[error("no {DEBUGFS}/kvm, and `mount -t debugfs` failed: {0}")]
    NoDebugfs(String),
    /// A counter could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A counter file does not hold a number.
    #[error("{path} holds {text:?}, not a count")]
    Format {
        /// The file.
        path: PathBuf,
        /// What it holds.
        text: String,
    },
}

/// Counters by name, each summed over the vCPUs; histograms are left out.
pub type Counters = BTreeMap<String, u64>;

/// The counters this benchmark derives its figures from, as per-MB values of one run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PerMb {
    /// Every exit from the guest.
    pub exits: f64,
    /// Exits to the VMM for MMIO or port I/O (`mmio_exits + io_exits`): kicks without an
    /// ioeventfd, MSI-X table and config accesses, the serial port.
    pub vmm_io_exits: f64,
    /// Instructions KVM emulated and completed itself (`insn_emulation - mmio_exits`):
    /// ioeventfd kicks and shadow page-table writes.
    pub kernel_emulation: f64,
    /// Interrupts injected into the guest (`irq_injections`: every vector, virtio MSIs, timer,
    /// IPIs).
    pub irq_injections: f64,
    /// HLT exits.
    pub halt_exits: f64,
}

impl PerMb {
    /// The figures of the counters' change from `before` to `after` over `mbytes` MB.
    pub fn between(before: &Counters, after: &Counters, mbytes: f64) -> Option<PerMb> {
        if mbytes <= 0.0 {
            return None;
        }
        let delta = |name: &str| -> Option<u64> {
            Some(after.get(name)?.saturating_sub(*before.get(name)?))
        };
        let mmio = delta("mmio_exits")?;
        let per = |n: u64| n as f64 / mbytes;
        Some(PerMb {
            exits: per(delta("exits")?),
            vmm_io_exits: per(mmio + delta("io_exits")?),
            kernel_emulation: per(delta("insn_emulation")?.saturating_sub(mmio)),
            irq_injections: per(delta("irq_injections")?),
            halt_exits: per(delta("halt_exits")?),
        })
    }

    /// (metric stem, value) in report order; the stems match the report's
    /// `kvm_<stem>_per_mb_<dir>` metrics.
    pub fn fields(&self) -> [(&'static str, f64); 5] {
        [
            ("exits", self.exits),
            ("vmm_io_exits", self.vmm_io_exits),
            ("kernel_emulation", self.kernel_emulation),
            ("irq_injections", self.irq_injections),
            ("halt_exits", self.halt_exits),
        ]
    }
}

/// The fd number of `pid`'s VM (`anon_inode:kvm-vm` in /proc/PID/fd).
pub fn vm_fd(pid: u32) -> Result<u32, Error> {
    let dir = format!("/proc/{pid}/fd");
    let entries = std::fs::read_dir(&dir).map_err(|source| Error::ListFds { pid, source })?;
    entries
        .filter_map(Result::ok)
        .filter(|e| {
            std::fs::read_link(e.path()).is_ok_and(|t| t.as_os_str() == "anon_inode:kvm-vm")
        })
        .find_map(|e| e.file_name().to_str()?.parse().ok())
        .ok_or(Error::NoVm { pid })
}

/// Mounts debugfs where KVM's directory is missing (L1's init mounts only proc and sysfs).
fn ensure_debugfs() -> Result<(), Error> {
    if Path::new(DEBUGFS).join("kvm").is_dir() {
        return Ok(());
    }
    let out = Command::new("mount")
        .args(["-t", "debugfs", "debugfs", DEBUGFS])
        .output()
        .map_err(|e| Error::NoDebugfs(e.to_string()))?;
    if !out.status.success() || !Path::new(DEBUGFS).join("kvm").is_dir() {
        return Err(Error::NoDebugfs(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    Ok(())
}

/// Reads [`COUNTERS`] from a VM's debugfs directory.
pub fn read_dir(dir: &Path) -> Result<Counters, Error> {
    let mut out = Counters::new();
    for name in COUNTERS {
        let path = dir.join(name);
        let text = std::fs::read_to_string(&path).map_err(|source| Error::Read {
            path: path.clone(),
            source,
        })?;
        let value = text.trim().parse().map_err(|_| Error::Format {
            path: path.clone(),
            text: text.clone(),
        })?;
        out.insert(name.to_string(), value);
    }
    Ok(out)
}

/// The KVM counters of `pid`'s VM, summed over its vCPUs. Needs root (debugfs).
pub fn snapshot(pid: u32) -> Result<Counters, Error> {
    let fd = vm_fd(pid)?;
    ensure_debugfs()?;
    read_dir(&Path::new(DEBUGFS).join("kvm").join(format!("{pid}-{fd}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    #[test]
    fn read_dir_reads_every_counter_and_names_a_bad_file() {
        let dir = std::env::temp_dir().join(format!("kvmstat-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (i, name) in COUNTERS.iter().enumerate() {
            std::fs::write(dir.join(name), format!("{}\n", 100 + i)).unwrap();
        }
        let c = read_dir(&dir).unwrap();
        assert_eq!(c.get("exits"), Some(&100));
        assert_eq!(c.get("halt_exits"), Some(&105));
        std::fs::write(dir.join("io_exits"), "n/a\n").unwrap();
        let err = read_dir(&dir).unwrap_err().to_string();
        assert!(err.contains("io_exits") && err.contains("n/a"), "{err}");
        std::fs::remove_file(dir.join("mmio_exits")).unwrap();
        assert!(matches!(read_dir(&dir), Err(Error::Read { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn per_mb_splits_exits_to_the_vmm_from_emulation_in_kvm() {
        let c = |exits, mmio, io, emul, irqs, halts| -> Counters {
            [
                ("exits", exits),
                ("mmio_exits", mmio),
                ("io_exits", io),
                ("insn_emulation", emul),
                ("irq_injections", irqs),
                ("halt_exits", halts),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect()
        };
        let before = c(100, 10, 5, 20, 30, 40);
        let after = c(1100, 30, 25, 240, 130, 90);
        let f = PerMb::between(&before, &after, 10.0).unwrap();
        assert_eq!(
            f,
            PerMb {
                exits: 100.0,
                vmm_io_exits: 4.0,
                kernel_emulation: 20.0,
                irq_injections: 10.0,
                halt_exits: 5.0,
            }
        );
        assert_eq!(PerMb::between(&before, &after, 0.0), None);
        let mut missing = after.clone();
        missing.remove("insn_emulation");
        assert_eq!(PerMb::between(&before, &missing, 1.0), None);
    }

    /// The VM fd of a real VM in this process is found in /proc (the number debugfs names its
    /// directory by); where debugfs is mounted, its counters read.
    #[test]
    fn a_real_vm_is_found_by_its_fd() {
        let Ok(kvm) = File::options().read(true).write(true).open("/dev/kvm") else {
            eprintln!("skipped: cannot open /dev/kvm");
            return;
        };
        const KVM_CREATE_VM: libc::c_ulong = 0xAE01;
        // SAFETY: KVM_CREATE_VM takes a machine type and returns a new fd or -1.
        let ret = unsafe { libc::ioctl(kvm.as_raw_fd(), KVM_CREATE_VM as _, 0) };
        if ret < 0 {
            eprintln!(
                "skipped: KVM_CREATE_VM: {}",
                std::io::Error::last_os_error()
            );
            return;
        }
        // SAFETY: the kernel just returned this new fd; nothing else owns it.
        let vm = unsafe { OwnedFd::from_raw_fd(ret) };
        let pid = std::process::id();
        assert_eq!(vm_fd(pid).unwrap(), vm.as_raw_fd() as u32);
        let dir = Path::new(DEBUGFS)
            .join("kvm")
            .join(format!("{pid}-{}", vm.as_raw_fd()));
        if dir.is_dir() {
            let c = read_dir(&dir).unwrap();
            assert_eq!(c.len(), COUNTERS.len());
        } else {
            eprintln!("not read: no {}", dir.display());
        }
        drop(vm);
        assert!(matches!(vm_fd(pid), Err(Error::NoVm { .. })));
    }
}
