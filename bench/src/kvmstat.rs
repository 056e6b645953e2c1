// SPDX-License-Identifier: Apache-2.0
//! KVM's own per-vCPU statistics of a running VMM, read from outside the VMM.
//!
//! Issue 12 asks for exits, kicks and interrupts per MB. The tracepoints it names
//! (`kvm:kvm_exit`, `kvm:kvm_userspace_exit`, interrupt injection) increment counters KVM keeps
//! anyway, per vCPU: `exits`, `mmio_exits`/`io_exits` (exits to the VMM for an MMIO or port
//! access, e.g. a virtio kick without an ioeventfd), `insn_emulation`, `irq_injections`,
//! `halt_exits`. Reading those needs no new package (`perf` would) and costs nothing while the
//! guest runs (tracing every exit in the nested rig's L1, itself an emulator, would slow exactly
//! what is measured). Of KVM's two ways to export them, this reads the binary statistics fd
//! (`KVM_GET_STATS_FD` on each vCPU fd, Linux >= 5.14): the debugfs files need debugfs mounted
//! and are keyed by the VMM's pid and VM fd number, while the stats fd needs only the vCPU fd,
//! which root takes from the VMM with `pidfd_getfd` (the VMM does not cooperate or notice; the
//! duplicated fds are closed right after the read). Both give the same counters.
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
use std::fs::File;
use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// `KVM_GET_STATS_FD`: `_IO(KVMIO, 0xce)`.
const KVM_GET_STATS_FD: libc::c_ulong = 0xAECE;
/// `struct kvm_stats_header`: flags, name_size, num_desc, id_offset, desc_offset, data_offset.
const HEADER_LEN: usize = 24;
/// `struct kvm_stats_desc` without its name: flags (u32), exponent (s16), size (u16),
/// offset (u32), bucket_size (u32).
const DESC_LEN: usize = 16;

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
    /// The VMM has no vCPU fd (not a KVM VMM, or it exited).
    #[error("process {pid} holds no kvm-vcpu fd")]
    NoVcpu {
        /// The VMM.
        pid: u32,
    },
    /// pidfd_open on the VMM failed.
    #[error("pidfd_open({pid}) failed")]
    PidfdOpen {
        /// The VMM.
        pid: u32,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// pidfd_getfd of one of its vCPU fds failed.
    #[error("pidfd_getfd of fd {fd} of process {pid} failed")]
    GetFd {
        /// The VMM.
        pid: u32,
        /// Its fd.
        fd: RawFd,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// KVM_GET_STATS_FD failed.
    #[error("KVM_GET_STATS_FD on fd {fd} of process {pid} failed")]
    StatsFd {
        /// The VMM.
        pid: u32,
        /// Its vCPU fd.
        fd: RawFd,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The statistics could not be read.
    #[error("cannot read the statistics of fd {fd} of process {pid}")]
    Read {
        /// The VMM.
        pid: u32,
        /// Its vCPU fd.
        fd: RawFd,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The statistics are not in the format this reads.
    #[error("malformed KVM statistics: {0}")]
    Format(String),
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

fn u32_at(buf: &[u8], at: usize) -> Result<u32, Error> {
    buf.get(at..at + 4)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_ne_bytes)
        .ok_or_else(|| Error::Format(format!("u32 at {at} beyond {} bytes", buf.len())))
}

fn u16_at(buf: &[u8], at: usize) -> Result<u16, Error> {
    buf.get(at..at + 2)
        .and_then(|b| b.try_into().ok())
        .map(u16::from_ne_bytes)
        .ok_or_else(|| Error::Format(format!("u16 at {at} beyond {} bytes", buf.len())))
}

fn u64_at(buf: &[u8], at: usize) -> Result<u64, Error> {
    buf.get(at..at + 8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_ne_bytes)
        .ok_or_else(|| Error::Format(format!("u64 at {at} beyond {} bytes", buf.len())))
}

/// Parses the whole content of a KVM statistics fd (header, id, descriptors, data, as read from
/// offset 0) into its single-value counters; histograms (size > 1) are skipped.
pub fn parse(buf: &[u8]) -> Result<Counters, Error> {
    if buf.len() < HEADER_LEN {
        return Err(Error::Format(format!("{} bytes, no header", buf.len())));
    }
    let name_size = u32_at(buf, 4)? as usize;
    let num_desc = u32_at(buf, 8)? as usize;
    let desc_offset = u32_at(buf, 16)? as usize;
    let data_offset = u32_at(buf, 20)? as usize;
    let mut out = Counters::new();
    for i in 0..num_desc {
        let at = desc_offset + i * (DESC_LEN + name_size);
        let size = u16_at(buf, at + 6)?;
        let offset = u32_at(buf, at + 8)? as usize;
        let name = buf
            .get(at + DESC_LEN..at + DESC_LEN + name_size)
            .ok_or_else(|| Error::Format(format!("descriptor {i} beyond the data")))?;
        let name = name.split(|&b| b == 0).next().unwrap_or_default();
        let name = String::from_utf8_lossy(name).into_owned();
        if size != 1 {
            continue;
        }
        out.insert(name, u64_at(buf, data_offset + offset)?);
    }
    Ok(out)
}

/// The fd numbers of `pid`'s vCPUs (`anon_inode:kvm-vcpu:N` in /proc/PID/fd).
pub fn vcpu_fds(pid: u32) -> Result<Vec<RawFd>, Error> {
    let dir = format!("/proc/{pid}/fd");
    let entries = std::fs::read_dir(&dir).map_err(|source| Error::ListFds { pid, source })?;
    let mut fds: Vec<RawFd> = entries
        .filter_map(Result::ok)
        .filter(|e| {
            std::fs::read_link(e.path())
                .is_ok_and(|t| t.to_string_lossy().starts_with("anon_inode:kvm-vcpu:"))
        })
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    fds.sort_unstable();
    if fds.is_empty() {
        return Err(Error::NoVcpu { pid });
    }
    Ok(fds)
}

fn owned(ret: libc::c_long) -> std::io::Result<OwnedFd> {
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd = RawFd::try_from(ret).map_err(|_| std::io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: the kernel just returned this new fd to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The KVM counters of `pid`'s vCPUs, summed. Needs the right to ptrace `pid` (root here).
pub fn snapshot(pid: u32) -> Result<Counters, Error> {
    let fds = vcpu_fds(pid)?;
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let pidfd = owned(unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) })
        .map_err(|source| Error::PidfdOpen { pid, source })?;
    let mut sum = Counters::new();
    for fd in fds {
        use std::os::fd::AsRawFd;
        // SAFETY: pidfd_getfd takes a pidfd we own, a target fd number and flags, and returns a
        // new fd (a duplicate of the target's) or -1.
        let vcpu = owned(unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) })
            .map_err(|source| Error::GetFd { pid, fd, source })?;
        // SAFETY: KVM_GET_STATS_FD takes no argument and returns a new fd or -1; on a fd that
        // is not a vCPU after all (reused since the listing) it fails with ENOTTY.
        let stats = owned(unsafe {
            libc::ioctl(vcpu.as_raw_fd(), KVM_GET_STATS_FD as _, 0) as libc::c_long
        })
        .map_err(|source| Error::StatsFd { pid, fd, source })?;
        let mut buf = Vec::new();
        File::from(stats)
            .read_to_end(&mut buf)
            .map_err(|source| Error::Read { pid, fd, source })?;
        for (name, value) in parse(&buf)? {
            *sum.entry(name).or_default() += value;
        }
    }
    Ok(sum)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    /// A stats file as KVM lays it out: header, id string, descriptors, data.
    fn stats_file(name_size: usize, stats: &[(&str, &[u64])]) -> Vec<u8> {
        let id = b"kvm-1234/vcpu-0\0";
        let desc_offset = HEADER_LEN + id.len();
        let data_offset = desc_offset + stats.len() * (DESC_LEN + name_size);
        let mut buf = Vec::new();
        for v in [
            0u32,
            name_size as u32,
            stats.len() as u32,
            HEADER_LEN as u32,
            desc_offset as u32,
            data_offset as u32,
        ] {
            buf.extend_from_slice(&v.to_ne_bytes());
        }
        buf.extend_from_slice(id);
        let mut offset = 0u32;
        for (name, values) in stats {
            buf.extend_from_slice(&0u32.to_ne_bytes());
            buf.extend_from_slice(&0i16.to_ne_bytes());
            buf.extend_from_slice(&(values.len() as u16).to_ne_bytes());
            buf.extend_from_slice(&offset.to_ne_bytes());
            buf.extend_from_slice(&0u32.to_ne_bytes());
            let mut n = name.as_bytes().to_vec();
            n.resize(name_size, 0);
            buf.extend_from_slice(&n);
            offset += 8 * values.len() as u32;
        }
        for (_, values) in stats {
            for v in *values {
                buf.extend_from_slice(&v.to_ne_bytes());
            }
        }
        buf
    }

    #[test]
    fn parse_reads_counters_and_skips_histograms() {
        let buf = stats_file(
            48,
            &[
                ("exits", &[1234]),
                ("halt_wait_hist", &[1, 2, 3]),
                ("mmio_exits", &[7]),
            ],
        );
        let c = parse(&buf).unwrap();
        assert_eq!(c.get("exits"), Some(&1234));
        assert_eq!(c.get("mmio_exits"), Some(&7));
        assert_eq!(c.get("halt_wait_hist"), None);
        assert_eq!(c.len(), 2);
    }

    #[test]
    fn parse_refuses_a_truncated_file() {
        let buf = stats_file(48, &[("exits", &[1]), ("io_exits", &[2])]);
        assert!(matches!(
            parse(&buf[..buf.len() - 4]),
            Err(Error::Format(_))
        ));
        assert!(matches!(parse(&buf[..10]), Err(Error::Format(_))));
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

    /// The whole path on a real VM of this process: its vCPU fds are found in /proc, taken
    /// with pidfd_getfd, and their statistics read and summed.
    #[test]
    fn snapshot_sums_the_vcpus_of_a_real_vm() {
        if !std::path::Path::new("/dev/kvm").exists() {
            eprintln!("skipped: no /dev/kvm");
            return;
        }
        let Ok(kvm) = File::options().read(true).write(true).open("/dev/kvm") else {
            eprintln!("skipped: cannot open /dev/kvm");
            return;
        };
        const KVM_CREATE_VM: libc::c_ulong = 0xAE01;
        const KVM_CREATE_VCPU: libc::c_ulong = 0xAE41;
        // SAFETY: KVM_CREATE_VM takes a machine type and returns a new fd or -1.
        let vm = match owned(
            unsafe { libc::ioctl(kvm.as_raw_fd(), KVM_CREATE_VM as _, 0) } as libc::c_long,
        ) {
            Ok(vm) => vm,
            Err(e) => {
                eprintln!("skipped: KVM_CREATE_VM: {e}");
                return;
            }
        };
        let create_vcpu = |id: libc::c_ulong| {
            // SAFETY: KVM_CREATE_VCPU takes a vCPU id and returns a new fd or -1.
            let ret = unsafe { libc::ioctl(vm.as_raw_fd(), KVM_CREATE_VCPU as _, id) };
            owned(ret as libc::c_long)
        };
        let vcpus: Vec<OwnedFd> = (0..2).map(create_vcpu).collect::<Result<_, _>>().unwrap();
        let listed = vcpu_fds(std::process::id()).unwrap();
        for v in &vcpus {
            assert!(listed.contains(&v.as_raw_fd()), "{listed:?}");
        }
        let c = match snapshot(std::process::id()) {
            Err(Error::StatsFd { source, .. }) if source.raw_os_error() == Some(libc::ENOTTY) => {
                eprintln!("skipped: this KVM has no KVM_GET_STATS_FD");
                return;
            }
            other => other.unwrap(),
        };
        for name in [
            "exits",
            "mmio_exits",
            "io_exits",
            "insn_emulation",
            "irq_injections",
            "halt_exits",
        ] {
            assert!(c.contains_key(name), "no {name} in {c:?}");
        }
    }
}
