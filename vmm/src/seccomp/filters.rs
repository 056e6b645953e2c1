//! The allow-lists: one per thread kind, built from what each thread does once the VM runs
//! (measured with `strace -f` on a networked guest walking `ethtool -L`, iperf3 both ways,
//! SIGUSR1, reboot and power-off). Everything not listed traps.
//!
//! Shared by every thread ([`base`]): `write` (log lines go to stderr, and only there),
//! `futex` (locks, channels, joins), memory for the allocator without `PROT_EXEC`
//! (`mmap`, `mprotect`, `munmap`, `madvise`, `brk`, `mremap`), `clock_gettime` (the vDSO
//! falls back to it on hosts without a stable TSC, as in the nested rig), `getrandom`
//! (hash-map seeds of a thread's first map), what a thread does when it ends (`close`,
//! `sigaltstack`, `rt_sigprocmask`, `exit`, `exit_group`), what `abort()` needs (`getpid`,
//! `gettid`, and `tgkill` with SIGABRT to a thread of mqvmm itself, see [`abort_rule`]), and
//! TCSETS plus TCGETS on fd 0 (the terminal is restored at exit, and by the panic hook from
//! whichever thread panics; glibc's tcsetattr reads the settings back).
//!
//! Not allowed anywhere after setup: opening files or sockets, `execve`, `fork`-style
//! `clone`, `ptrace`, `kill`, signals to other processes, signal handler changes
//! (`rt_sigaction`: the SIGSYS handler cannot be replaced), `rt_sigreturn`, any tun ioctl
//! but TUNSETQUEUE, TUNSETOFFLOAD, TUNSETVNETHDRSZ and TUNGETIFF, any KVM ioctl but KVM_RUN
//! and the two register reads of the vCPU's error reports (plus, on a machine with
//! virtio-pci, the two a vCPU needs when the guest programs an MSI-X vector or moves a BAR).

use std::collections::BTreeMap;
use std::os::fd::RawFd;

use kvm_bindings::{kvm_ioeventfd, kvm_irq_routing, kvm_regs, kvm_sregs, KVMIO};
use seccompiler::{
    BackendError, SeccompCmpArgLen as Len, SeccompCmpOp as Op, SeccompCondition as Cond,
    SeccompRule,
};
use tap::ioctl::{TUNGETIFF, TUNSETOFFLOAD, TUNSETQUEUE, TUNSETVNETHDRSZ};
use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iow_nr};

ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_regs);
ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_sregs);
ioctl_iow_nr!(KVM_SET_GSI_ROUTING, KVMIO, 0x6a, kvm_irq_routing);
ioctl_iow_nr!(KVM_IOEVENTFD, KVMIO, 0x79, kvm_ioeventfd);

/// Syscall number -> rules; an empty rule list allows the call whatever its arguments.
pub type Rules = BTreeMap<i64, Vec<SeccompRule>>;

/// The tun ioctls a queue-pair worker may issue: TUNGETIFF only, to tell a deleted tap from a
/// transient error.
pub fn worker_tun_ioctls() -> [u64; 1] {
    [TUNGETIFF()]
}

/// The tun ioctls of VQ_PAIRS_SET, activation and reset. TUNSETVNETHDRSZ is among them
/// because the header size depends on the features the driver acks at each activation, and
/// VQ_PAIRS_SET applies it again to a queue it attaches.
pub fn ctrl_tun_ioctls() -> [u64; 4] {
    [
        TUNSETQUEUE(),
        TUNSETOFFLOAD(),
        TUNSETVNETHDRSZ(),
        TUNGETIFF(),
    ]
}

/// The KVM ioctls of a vCPU thread once it runs.
pub fn vcpu_kvm_ioctls() -> [u64; 3] {
    [KVM_RUN(), KVM_GET_REGS(), KVM_GET_SREGS()]
}

/// The KVM ioctls a vCPU thread needs for virtio-pci: an MSI-X table write that unmasks a
/// vector with a new message replaces KVM's GSI routing table (KVM_SET_GSI_ROUTING); a BAR
/// the guest moves (or switches off and on while sizing it) moves the queue-notify ioeventfds
/// (KVM_IOEVENTFD).
pub fn vcpu_pci_kvm_ioctls() -> [u64; 2] {
    [KVM_SET_GSI_ROUTING(), KVM_IOEVENTFD()]
}

struct Builder {
    rules: Rules,
}

impl Builder {
    fn new() -> Self {
        Builder {
            rules: Rules::new(),
        }
    }

    /// Allows `syscalls` whatever their arguments.
    fn allow(&mut self, syscalls: &[libc::c_long]) -> &mut Self {
        for &nr in syscalls {
            self.rules.insert(nr, Vec::new());
        }
        self
    }

    /// Allows `syscall` when all `conditions` hold (one more alternative if it already had
    /// conditional rules; no change if it is allowed unconditionally).
    fn allow_if(
        &mut self,
        syscall: libc::c_long,
        conditions: Vec<Cond>,
    ) -> Result<&mut Self, BackendError> {
        let rule = SeccompRule::new(conditions)?;
        match self.rules.get_mut(&syscall) {
            Some(rules) if rules.is_empty() => {}
            Some(rules) => rules.push(rule),
            None => {
                self.rules.insert(syscall, vec![rule]);
            }
        }
        Ok(self)
    }

    /// `ioctl(_, request)` for each of `requests` (the request is a 32-bit `unsigned int` in
    /// the kernel's ioctl entry, so the comparison looks at the low 32 bits).
    fn ioctls(&mut self, requests: &[u64]) -> Result<&mut Self, BackendError> {
        for &request in requests {
            self.allow_if(libc::SYS_ioctl, vec![arg_eq(1, request)?])?;
        }
        Ok(self)
    }

    /// Everything `other` allows, too.
    fn merge(&mut self, other: Rules) -> &mut Self {
        for (nr, rules) in other {
            match self.rules.get_mut(&nr) {
                Some(mine) if mine.is_empty() => {}
                Some(mine) if rules.is_empty() => mine.clear(),
                Some(mine) => {
                    for rule in rules {
                        if !mine.contains(&rule) {
                            mine.push(rule);
                        }
                    }
                }
                None => {
                    self.rules.insert(nr, rules);
                }
            }
        }
        self
    }

    fn build(&mut self) -> Rules {
        std::mem::take(&mut self.rules)
    }
}

fn arg_eq(arg: u8, value: u64) -> Result<Cond, BackendError> {
    Cond::new(arg, Len::Dword, Op::Eq, value)
}

/// `(arg & mask) == 0`
fn arg_clear(arg: u8, mask: u64) -> Result<Cond, BackendError> {
    Cond::new(arg, Len::Dword, Op::MaskedEq(mask), 0)
}

/// `tgkill(getpid(), _, SIGABRT)`, the call of glibc's `abort()` (through `raise`), with which
/// Rust ends a failed allocation or a panic during a panic. Only to mqvmm's own thread group:
/// with any target, a confined thread could send SIGABRT to any process the user may signal.
/// The filters are built at run time in the process they confine ([`crate::seccomp::Sandbox`]
/// at start; mqvmm does not fork), so its pid is known.
fn abort_rule() -> Result<Vec<Cond>, BackendError> {
    Ok(vec![
        arg_eq(0, u64::from(std::process::id()))?,
        arg_eq(2, libc::SIGABRT as u64)?,
    ])
}

/// What every thread needs; see the module documentation.
fn base() -> Result<Builder, BackendError> {
    let mut b = Builder::new();
    b.allow(&[
        libc::SYS_write,
        libc::SYS_futex,
        libc::SYS_munmap,
        libc::SYS_madvise,
        libc::SYS_brk,
        libc::SYS_mremap,
        libc::SYS_clock_gettime,
        libc::SYS_getrandom,
        libc::SYS_close,
        libc::SYS_sigaltstack,
        libc::SYS_rt_sigprocmask,
        libc::SYS_sched_yield,
        libc::SYS_exit,
        libc::SYS_exit_group,
        libc::SYS_getpid,
        libc::SYS_gettid,
    ]);
    let prot_exec = libc::PROT_EXEC as u64;
    b.allow_if(libc::SYS_mmap, vec![arg_clear(2, prot_exec)?])?
        .allow_if(libc::SYS_mprotect, vec![arg_clear(2, prot_exec)?])?
        .allow_if(libc::SYS_tgkill, abort_rule()?)?
        .allow_if(
            libc::SYS_ioctl,
            vec![arg_eq(0, 0)?, arg_eq(1, libc::TCSETS)?],
        )?
        // glibc's tcsetattr reads the settings back to check them.
        .allow_if(
            libc::SYS_ioctl,
            vec![arg_eq(0, 0)?, arg_eq(1, libc::TCGETS)?],
        )?;
    Ok(b)
}

/// An event-manager loop: its epoll set, and the eventfds in it.
fn event_loop(b: &mut Builder) -> &mut Builder {
    b.allow(&[
        libc::SYS_epoll_create1,
        libc::SYS_epoll_ctl,
        libc::SYS_epoll_wait,
        libc::SYS_epoll_pwait,
        libc::SYS_read,
    ])
}

/// `fcntl(_, F_GETFD)`, a query: built with debug assertions, std checks that an fd is open
/// when an `OwnedFd` takes it (an accepted connection) or closes it (the socket's directory).
fn fd_open_check(b: &mut Builder) -> Result<&mut Builder, BackendError> {
    b.allow_if(libc::SYS_fcntl, vec![arg_eq(1, libc::F_GETFD as u64)?])
}

/// The main thread: the main loop (stdin to the serial console, the exit eventfd, the
/// signalfd, SIGUSR1 metrics) and the way out (terminal restored, fds closed). With an API
/// socket whose directory is open on `api_dir`, also what removes the socket at exit, and
/// only relative to that directory: `newfstatat` (is the file still the socket mqvmm
/// created?) and `unlinkat` without flags (no directories).
pub fn main_thread(api_dir: Option<RawFd>) -> Result<Rules, BackendError> {
    let mut b = base()?;
    event_loop(&mut b);
    if let Some(dir) = api_dir {
        fd_open_check(&mut b)?;
        let dir = dir as u64;
        b.allow_if(libc::SYS_newfstatat, vec![arg_eq(0, dir)?])?
            .allow_if(libc::SYS_unlinkat, vec![arg_eq(0, dir)?, arg_eq(2, 0)?])?;
    }
    Ok(b.build())
}

/// The `api` thread: accepts connections on the listening socket `listener` (accept4 on no
/// other fd: it cannot take connections from sockets a compromised thread might have), reads
/// and writes them (recvfrom, sendto) with deadlines (poll), closes them, and asks the tap
/// queues whether they are attached (TUNGETIFF, for `queues`). It opens nothing, creates no
/// socket and sends no fds. Without a listener (no `--api-socket`) no such thread runs, and
/// the filter allows no accept4 at all.
pub fn api(listener: Option<RawFd>) -> Result<Rules, BackendError> {
    let mut b = base()?;
    b.allow(&[
        libc::SYS_recvfrom,
        libc::SYS_sendto,
        libc::SYS_poll,
        libc::SYS_ppoll,
    ])
    .ioctls(&worker_tun_ioctls())?;
    fd_open_check(&mut b)?;
    if let Some(fd) = listener {
        b.allow_if(libc::SYS_accept4, vec![arg_eq(0, fd as u64)?])?;
    }
    Ok(b.build())
}

/// A vCPU: KVM_RUN and the devices it drives. MMIO writes activate and reset the network
/// device on this thread: eventfds are created and duplicated (F_DUPFD_CLOEXEC), tap queues
/// attached, detached and configured, device threads requested from the spawner and joined.
/// With `pci`, also the MSI route and ioeventfd updates of [`vcpu_pci_kvm_ioctls`].
pub fn vcpu(pci: bool) -> Result<Rules, BackendError> {
    let mut b = base()?;
    b.allow(&[libc::SYS_read, libc::SYS_eventfd2])
        .allow_if(
            libc::SYS_fcntl,
            vec![arg_eq(1, libc::F_DUPFD_CLOEXEC as u64)?],
        )?
        .ioctls(&vcpu_kvm_ioctls())?
        .ioctls(&ctrl_tun_ioctls())?;
    if pci {
        b.ioctls(&vcpu_pci_kvm_ioctls())?;
    }
    Ok(b.build())
}

/// A queue-pair worker (`net-pairN`): its epoll loop, readv/writev on its tap queue,
/// eventfd kicks and irqfd writes, and its one timer fd, which releases used-buffer
/// notifications the driver asked to coalesce (`ethtool -C ... rx-usecs N`) on time.
pub fn net_pair() -> Result<Rules, BackendError> {
    let mut b = base()?;
    event_loop(&mut b)
        .allow(&[
            libc::SYS_readv,
            libc::SYS_writev,
            libc::SYS_timerfd_create,
            libc::SYS_timerfd_settime,
        ])
        .ioctls(&worker_tun_ioctls())?;
    Ok(b.build())
}

/// The control-queue thread (`net-ctrl`): its epoll loop, bounded waits for the workers, and
/// the tun ioctls of VQ_PAIRS_SET and GUEST_OFFLOADS_SET.
pub fn net_ctrl() -> Result<Rules, BackendError> {
    let mut b = base()?;
    event_loop(&mut b).ioctls(&ctrl_tun_ioctls())?;
    Ok(b.build())
}

/// The spawner thread: creates the device threads. A new thread inherits this filter and runs
/// glibc's and std's thread start (robust list, rseq, stack guard and signal stack, its name)
/// under it before it installs its own, which can only narrow what it inherited: so this
/// filter also allows everything the device threads need. The spawner never touches guest
/// memory or device state.
pub fn spawner() -> Result<Rules, BackendError> {
    let mut b = base()?;
    b.allow(&[
        libc::SYS_set_robust_list,
        libc::SYS_rseq,
        libc::SYS_sched_getaffinity,
    ])
    // Not allowed in effect: clone3 fails with ENOSYS ([`spawner_enosys`]). It is on this list
    // only because the kernel keeps the strictest answer of a thread's filters, and a trap
    // here would win over that ENOSYS.
    .allow(&[libc::SYS_clone3])
    // Threads only: a fork-style clone (no CLONE_THREAD) traps.
    .allow_if(
        libc::SYS_clone,
        vec![Cond::new(
            0,
            Len::Dword,
            Op::MaskedEq(libc::CLONE_THREAD as u64),
            libc::CLONE_THREAD as u64,
        )?],
    )?
    .allow_if(libc::SYS_prctl, vec![arg_eq(0, libc::PR_SET_NAME as u64)?])?
    .allow_if(
        libc::SYS_prctl,
        vec![arg_eq(0, libc::PR_SET_NO_NEW_PRIVS as u64)?],
    )?
    .allow_if(
        libc::SYS_seccomp,
        vec![arg_eq(0, libc::SECCOMP_SET_MODE_FILTER as u64)?],
    )?
    .merge(net_pair()?)
    .merge(net_ctrl()?);
    Ok(b.build())
}

/// What the spawner thread (and every thread it creates) is refused with ENOSYS instead of
/// a trap: `clone3`. It passes its flags in memory, out of a filter's reach, so an allowed
/// clone3 could fork; refused with ENOSYS, it makes glibc's thread creation fall back to
/// `clone` (as on kernels before 5.3), whose flags [`spawner`] checks.
///
/// These rules make a filter of their own, whose match action is ERRNO(ENOSYS) and whose
/// mismatch action is allow: seccompiler compiles one match action per filter. A thread
/// under both filters gets the strictest of their answers, ENOSYS for clone3.
pub fn spawner_enosys() -> Rules {
    Rules::from([(libc::SYS_clone3, Vec::new())])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allows(rules: &Rules, nr: libc::c_long) -> bool {
        rules.contains_key(&nr)
    }

    #[test]
    fn ioctl_numbers_match_the_kernel_headers() {
        assert_eq!(KVM_RUN(), 0xae80);
        assert_eq!(KVM_GET_REGS(), 0x8090_ae81);
        assert_eq!(KVM_GET_SREGS(), 0x8138_ae83);
        assert_eq!(KVM_SET_GSI_ROUTING(), 0x4008_ae6a);
        assert_eq!(KVM_IOEVENTFD(), 0x4040_ae79);
        assert_eq!(TUNSETQUEUE(), libc::TUNSETQUEUE);
        assert_eq!(TUNGETIFF(), libc::TUNGETIFF);
        assert_eq!(TUNSETOFFLOAD(), libc::TUNSETOFFLOAD);
        assert_eq!(TUNSETVNETHDRSZ(), libc::TUNSETVNETHDRSZ);
    }

    #[test]
    fn no_thread_may_open_exec_or_change_signal_handlers() {
        for (name, rules) in [
            ("main", main_thread(None).unwrap()),
            ("main with an API socket", main_thread(Some(9)).unwrap()),
            ("api", api(Some(7)).unwrap()),
            ("vcpu", vcpu(false).unwrap()),
            ("vcpu with pci", vcpu(true).unwrap()),
            ("net-pair", net_pair().unwrap()),
            ("net-ctrl", net_ctrl().unwrap()),
            ("spawner", spawner().unwrap()),
        ] {
            for nr in [
                libc::SYS_open,
                libc::SYS_openat,
                libc::SYS_socket,
                libc::SYS_execve,
                libc::SYS_fork,
                libc::SYS_ptrace,
                libc::SYS_kill,
                libc::SYS_rt_sigaction,
                libc::SYS_rt_sigreturn,
            ] {
                assert!(!allows(&rules, nr), "{name} allows syscall {nr}");
            }
            assert!(allows(&rules, libc::SYS_write), "{name}");
            assert!(allows(&rules, libc::SYS_exit_group), "{name}");
            assert_eq!(
                rules[&libc::SYS_tgkill],
                vec![SeccompRule::new(abort_rule().unwrap()).unwrap()],
                "{name}: tgkill only as abort() sends it"
            );
        }
    }

    #[test]
    fn only_the_spawner_creates_threads_and_installs_filters() {
        for rules in [
            main_thread(Some(9)),
            api(Some(7)),
            vcpu(false),
            vcpu(true),
            net_pair(),
            net_ctrl(),
        ] {
            let rules = rules.unwrap();
            for nr in [
                libc::SYS_clone,
                libc::SYS_clone3,
                libc::SYS_seccomp,
                libc::SYS_prctl,
            ] {
                assert!(!allows(&rules, nr));
            }
        }
        let spawner = spawner().unwrap();
        assert!(allows(&spawner, libc::SYS_clone));
        assert!(
            !spawner[&libc::SYS_clone].is_empty(),
            "clone stays conditional"
        );
        assert!(allows(&spawner, libc::SYS_seccomp));
        // clone3 passes this filter only to meet the ENOSYS of the spawner's second filter.
        assert!(allows(&spawner, libc::SYS_clone3));
        assert_eq!(
            spawner_enosys().into_iter().collect::<Vec<_>>(),
            vec![(libc::SYS_clone3, Vec::new())]
        );
    }

    /// The spawner's filter stays on the device threads it creates (filters stack), so it
    /// must allow at least what theirs allow, rule for rule.
    #[test]
    fn spawner_allows_everything_the_device_threads_need() {
        let spawner = spawner().unwrap();
        for rules in [net_pair().unwrap(), net_ctrl().unwrap()] {
            for (nr, conditional) in rules {
                let mine = spawner
                    .get(&nr)
                    .unwrap_or_else(|| panic!("syscall {nr} missing"));
                if mine.is_empty() {
                    continue;
                }
                assert!(!conditional.is_empty(), "syscall {nr} is narrower");
                for rule in conditional {
                    assert!(mine.contains(&rule), "rule of syscall {nr} missing");
                }
            }
        }
    }

    /// The PCI ioctls are allowed on vCPUs only, only on PCI machines, and only by request
    /// number (KVM_SET_GSI_ROUTING and KVM_IOEVENTFD, not any other KVM ioctl).
    #[test]
    fn pci_ioctls_only_for_vcpus_of_pci_machines() {
        let has = |rules: &Rules, request: u64| {
            let rule = SeccompRule::new(vec![arg_eq(1, request).unwrap()]).unwrap();
            rules
                .get(&libc::SYS_ioctl)
                .is_some_and(|r| r.contains(&rule))
        };
        for request in vcpu_pci_kvm_ioctls() {
            assert!(has(&vcpu(true).unwrap(), request));
            assert!(!has(&vcpu(false).unwrap(), request));
            for rules in [
                main_thread(None),
                api(Some(7)),
                net_pair(),
                net_ctrl(),
                spawner(),
            ] {
                assert!(!has(&rules.unwrap(), request));
            }
        }
        assert!(
            !vcpu(true).unwrap()[&libc::SYS_ioctl].is_empty(),
            "ioctl stays conditional"
        );
    }

    /// Accepting connections is the `api` thread's alone, on the listening socket only;
    /// removing a file is the main thread's alone, in the socket's directory only, never a
    /// directory; and only with an API socket.
    #[test]
    fn only_the_api_thread_accepts_and_only_main_unlinks_in_the_sockets_directory() {
        let rule = |conditions: Vec<Cond>| vec![SeccompRule::new(conditions).unwrap()];
        let api_rules = api(Some(7)).unwrap();
        assert_eq!(
            api_rules[&libc::SYS_accept4],
            rule(vec![arg_eq(0, 7).unwrap()])
        );
        assert!(!allows(&api(None).unwrap(), libc::SYS_accept4));
        let main = main_thread(Some(9)).unwrap();
        assert_eq!(
            main[&libc::SYS_unlinkat],
            rule(vec![arg_eq(0, 9).unwrap(), arg_eq(2, 0).unwrap()])
        );
        assert_eq!(
            main[&libc::SYS_newfstatat],
            rule(vec![arg_eq(0, 9).unwrap()])
        );
        let plain_main = main_thread(None).unwrap();
        assert!(!allows(&plain_main, libc::SYS_unlinkat));
        assert!(!allows(&plain_main, libc::SYS_newfstatat));
        for (name, rules) in [
            ("main", main),
            ("vcpu", vcpu(true).unwrap()),
            ("net-pair", net_pair().unwrap()),
            ("net-ctrl", net_ctrl().unwrap()),
            ("spawner", spawner().unwrap()),
        ] {
            for nr in [libc::SYS_accept, libc::SYS_accept4] {
                assert!(!allows(&rules, nr), "{name} allows syscall {nr}");
            }
        }
        for nr in [
            libc::SYS_accept,
            libc::SYS_connect,
            libc::SYS_sendmsg,
            libc::SYS_recvmsg,
            libc::SYS_unlink,
            libc::SYS_unlinkat,
            libc::SYS_rename,
            libc::SYS_nanosleep,
        ] {
            assert!(!allows(&api_rules, nr), "api allows syscall {nr}");
        }
    }

    #[test]
    fn merge_keeps_unconditional_rules_unconditional() {
        let mut a = Builder::new();
        a.allow_if(libc::SYS_ioctl, vec![arg_eq(1, 1).unwrap()])
            .unwrap();
        let mut b = Builder::new();
        b.allow(&[libc::SYS_ioctl]);
        let merged = a.merge(b.build()).build();
        assert!(merged[&libc::SYS_ioctl].is_empty());
    }
}
