//! The seccomp sandbox: once the VM is built, every thread of mqvmm runs under a filter that
//! allows only the system calls its job needs (built with `seccompiler`).
//!
//! # Threads and their filters
//! | thread | filter (`filters`) | installed |
//! |---|---|---|
//! | `main` | main loop: epoll, read, write, TCSETS on fd 0; with `--api-socket`, removing the socket from its directory at exit | in [`crate::vm::Vm::run`], after the vCPUs and the `api` thread started |
//! | `vcpuN` | KVM_RUN (+ register reads for error reports), MMIO device work: eventfds, the tun ioctls of activation and reset; with virtio-pci also KVM_SET_GSI_ROUTING (MSI-X table writes) and KVM_IOEVENTFD (BAR moves) | first thing on the vCPU thread |
//! | `spawner` | thread creation (`clone` with CLONE_THREAD; `clone3` fails with ENOSYS, see below), plus everything the device threads need | first thing on the spawner thread, started while the VM is built |
//! | `net-pairN` | epoll, eventfds, readv/writev on its tap queue, TUNGETIFF | by the new thread itself, before it runs the device's code |
//! | `net-ctrl` | epoll, eventfds, TUNSETQUEUE, TUNSETOFFLOAD, TUNSETVNETHDRSZ, TUNGETIFF | likewise |
//! | `api` | with `--api-socket`: accept4 on the listening socket only, recv/send and poll on the connection, TUNGETIFF | first thing on the thread, started by the main thread before its own filter |
//!
//! Everything that needs more (opening /dev/kvm or the tap, creating the VM, memory, vCPUs,
//! ioeventfds and irqfds, loading the kernel, blocking signals for the signalfd, reading the
//! terminal settings) happens before any filter is installed.
//!
//! # Why a spawner thread
//! A seccomp filter is inherited by every thread created afterwards, and filters stack: a
//! thread can only narrow what it inherited. The network device starts its threads when the
//! driver sets DRIVER_OK, which is an MMIO write handled on a vCPU thread; threads spawned
//! there would run under the vCPU's filter, so the vCPU filter would have to allow thread
//! creation and everything the workers do. Instead the device gets a
//! [`virtio_net::ThreadSpawner`] ([`Spawner`]) that hands the request to the dedicated
//! `spawner` thread: the vCPU filter allows neither `clone` nor `seccomp`, and each device
//! thread installs its own, narrower filter on top of the spawner's before it runs any device
//! code. Pre-creating parked device threads before the filters would also work but would keep
//! threads for queues a driver never sets up, and ties the device's thread lifecycle (start at
//! activation, join at reset) to the VMM; a spawner keeps the device unchanged. The spawner
//! reads no guest memory and no device state; it only creates threads.
//!
//! `clone3` takes its flags in memory, where a filter cannot read them, so the spawner could
//! not tell a thread from a fork. The spawner therefore enters a second filter that makes
//! `clone3` fail with ENOSYS (`filters::spawner_enosys`); glibc then creates the thread with
//! `clone`, whose flags the spawner's filter checks. Both filters stay on the threads it
//! creates, and both apply in [`Mode::Log`] too: ENOSYS is an answer, not a violation.
//!
//! Per-thread filters narrow what code running in that thread can ask the kernel for; they
//! are not a boundary between threads of the same process (they share memory). The union of
//! all filters is what the process as a whole can do: no open, socket, exec, fork or ptrace.
//!
//! # A violation
//! [`Mode::On`] (the default): a syscall outside the filter returns SECCOMP_RET_TRAP, which
//! delivers SIGSYS to the offending thread. Its handler writes one line with async-signal-safe
//! `write(2)` only, e.g.
//! `mqvmm: seccomp violation: syscall 257 (openat) in thread net-pair0`,
//! and ends the whole process with `_exit(159)` (128 + SIGSYS), the effect of
//! SECCOMP_RET_KILL_PROCESS plus the name of the call. No filter allows `rt_sigaction`, so the
//! handler cannot be replaced; blocking SIGSYS does not help either (the kernel then kills
//! the process with the default action).
//! The line also gives the call's first two arguments (an ioctl's fd and request). A panic
//! with `RUST_BACKTRACE` set prints its message and then ends the same way: symbolizing the
//! backtrace opens files.
//! [`Mode::Log`] (debugging): the calls are allowed and the kernel logs them (SECCOMP_RET_LOG,
//! in the kernel log / audit). [`Mode::Off`]: no filters; mqvmm says so loudly at start.
//!
//! A hidden option, `--seccomp-selftest=THREAD`, makes the named thread kind issue a forbidden
//! call (`openat`) right after it entered its filter, for the test that proves the filters
//! are active. It is read from the command line at start only; nothing a guest does reaches it.

mod filters;
mod names;
mod spawner;

use std::cell::Cell;
use std::io;

use seccompiler::{BackendError, BpfProgram, SeccompAction, SeccompFilter, TargetArch};

pub use spawner::Spawner;

/// Exit code after a violation: 128 + SIGSYS, as for a process killed by that signal.
pub const VIOLATION_EXIT_CODE: i32 = 128 + libc::SIGSYS;

/// How the filters act on a syscall they do not allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Trap, name the syscall on stderr, end the process.
    On,
    /// Allow, but have the kernel log it (debugging).
    Log,
    /// No filters at all (debugging).
    Off,
}

impl Mode {
    /// Parses `on`, `log` or `off`.
    pub fn parse(s: &str) -> Option<Mode> {
        match s {
            "on" => Some(Mode::On),
            "log" => Some(Mode::Log),
            "off" => Some(Mode::Off),
            _ => None,
        }
    }
}

/// The kinds of threads, each with its own filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    Main,
    Vcpu,
    Spawner,
    NetPair,
    NetCtrl,
    Api,
}

impl ThreadKind {
    pub const ALL: [ThreadKind; 6] = [
        ThreadKind::Main,
        ThreadKind::Vcpu,
        ThreadKind::Spawner,
        ThreadKind::NetPair,
        ThreadKind::NetCtrl,
        ThreadKind::Api,
    ];

    /// The name used on the command line and in messages.
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Main => "main",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Spawner => "spawner",
            ThreadKind::NetPair => "net-pair",
            ThreadKind::NetCtrl => "net-ctrl",
            ThreadKind::Api => "api",
        }
    }

    pub fn parse(s: &str) -> Option<ThreadKind> {
        ThreadKind::ALL.into_iter().find(|k| k.name() == s)
    }

    fn index(self) -> usize {
        self as usize
    }

    fn rules(self, machine: Machine) -> Result<filters::Rules, BackendError> {
        match self {
            ThreadKind::Main => filters::main_thread(machine.api.map(|api| api.dir)),
            ThreadKind::Vcpu => filters::vcpu(machine.pci),
            ThreadKind::Spawner => filters::spawner(),
            ThreadKind::NetPair => filters::net_pair(),
            ThreadKind::NetCtrl => filters::net_ctrl(),
            ThreadKind::Api => filters::api(machine.api.map(|api| api.listener)),
        }
    }

    /// The calls this thread kind's second filter answers with ENOSYS, if it has one.
    fn enosys_rules(self) -> Option<filters::Rules> {
        match self {
            ThreadKind::Spawner => Some(filters::spawner_enosys()),
            _ => None,
        }
    }

    /// The filters a thread of this kind enters, in order: its allow-list, whose other calls
    /// get `mismatch`, then the ENOSYS filter if it has one.
    fn programs(
        self,
        machine: Machine,
        mismatch: SeccompAction,
    ) -> Result<Vec<BpfProgram>, BackendError> {
        let mut filters = vec![SeccompFilter::new(
            self.rules(machine)?,
            mismatch,
            SeccompAction::Allow,
            TargetArch::x86_64,
        )?];
        if let Some(rules) = self.enosys_rules() {
            filters.push(SeccompFilter::new(
                rules,
                SeccompAction::Allow,
                SeccompAction::Errno(libc::ENOSYS as u32),
                TargetArch::x86_64,
            )?);
        }
        filters.into_iter().map(BpfProgram::try_from).collect()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot build the seccomp filter of the {thread} threads")]
    Build {
        thread: &'static str,
        #[source]
        source: BackendError,
    },
    #[error("cannot install the SIGSYS handler for seccomp violations")]
    Handler(#[source] io::Error),
    #[error(
        "cannot install the seccomp filter of thread {thread} (--seccomp=off runs without filters)"
    )]
    Install {
        thread: String,
        #[source]
        source: seccompiler::Error,
    },
    #[error("cannot start the spawner thread")]
    StartSpawner(#[source] io::Error),
}

/// What the VM has that some thread's filter must allow for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Machine {
    /// A PCI bus with MSI-X devices: vCPUs update KVM's MSI routes when the guest programs a
    /// vector, and move ioeventfds when it moves a BAR.
    pub pci: bool,
    /// The API socket (`--api-socket`): the `api` thread accepts on its listening fd, and the
    /// main thread removes it from its directory at exit.
    pub api: Option<ApiFds>,
}

/// The fds of the API socket that filters name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApiFds {
    /// The listening socket.
    pub listener: std::os::fd::RawFd,
    /// The directory the socket file is in.
    pub dir: std::os::fd::RawFd,
}

/// The compiled filters and how to apply them; shared by every thread.
pub struct Sandbox {
    mode: Mode,
    /// Per thread kind (in [`ThreadKind::ALL`] order), the filters it enters.
    programs: Vec<Vec<BpfProgram>>,
    selftest: Option<ThreadKind>,
}

impl Sandbox {
    /// Compiles every filter and, in [`Mode::On`], installs the SIGSYS handler. No filter is
    /// installed yet: each thread calls [`Sandbox::enter`] once its setup is done.
    pub fn new(mode: Mode, selftest: Option<ThreadKind>) -> Result<Sandbox, Error> {
        Sandbox::for_machine(mode, selftest, Machine::default())
    }

    /// [`Sandbox::new`] for a VM with `machine`'s devices.
    pub fn for_machine(
        mode: Mode,
        selftest: Option<ThreadKind>,
        machine: Machine,
    ) -> Result<Sandbox, Error> {
        let mut programs = Vec::new();
        if mode != Mode::Off {
            let mismatch = match mode {
                Mode::Log => SeccompAction::Log,
                _ => SeccompAction::Trap,
            };
            for kind in ThreadKind::ALL {
                let kind_programs =
                    kind.programs(machine, mismatch.clone())
                        .map_err(|source| Error::Build {
                            thread: kind.name(),
                            source,
                        })?;
                programs.push(kind_programs);
            }
        }
        if mode != Mode::Off {
            fix_malloc_arena_limit();
        }
        if mode == Mode::On {
            install_sigsys_handler().map_err(Error::Handler)?;
        }
        Ok(Sandbox {
            mode,
            programs,
            selftest,
        })
    }

    /// No filters (library users and tests that run no VM).
    pub fn disabled() -> Sandbox {
        Sandbox {
            mode: Mode::Off,
            programs: Vec::new(),
            selftest: None,
        }
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Puts the calling thread under the filter of `kind`, for the rest of its life.
    pub fn enter(&self, kind: ThreadKind) -> Result<(), Error> {
        let current = std::thread::current();
        let thread = current.name().unwrap_or(kind.name());
        remember_thread_name(thread);
        for program in self.programs.get(kind.index()).into_iter().flatten() {
            seccompiler::apply_filter(program).map_err(|source| Error::Install {
                thread: thread.to_string(),
                source,
            })?;
        }
        if self.selftest == Some(kind) {
            forbidden_syscall(thread);
        }
        Ok(())
    }
}

/// glibc's malloc computes its arena limit the first time a thread needs a new arena after the
/// eighth, from the CPU count it reads in /sys/devices/system/cpu/online: an `openat` that no
/// filter allows, in whichever thread comes first (with 4 vCPUs, a `net-pair` thread at its
/// start). Setting the limit now, to glibc's own default of 8 arenas per CPU, takes that
/// lookup out of the running VM.
fn fix_malloc_arena_limit() {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let limit = libc::c_int::try_from(cpus.saturating_mul(8)).unwrap_or(libc::c_int::MAX);
    // SAFETY: mallopt only changes a malloc tunable, under malloc's own lock.
    if unsafe { libc::mallopt(libc::M_ARENA_MAX, limit) } != 1 {
        log::debug!("mallopt(M_ARENA_MAX, {limit}) failed");
    }
}

/// The `--seccomp-selftest` trigger: what a compromised device thread might try first.
fn forbidden_syscall(thread: &str) {
    let path = c"/etc/hostname";
    // SAFETY: openat with a NUL-terminated path that outlives the call; a returned fd is
    // closed right away.
    let fd = unsafe {
        libc::openat(
            libc::AT_FDCWD,
            path.as_ptr(),
            libc::O_RDONLY | libc::O_CLOEXEC,
        )
    };
    if fd >= 0 {
        log::warn!("seccomp self-test: openat succeeded in thread {thread} (no filter traps it)");
        // SAFETY: `fd` was just opened here and is owned by nobody else.
        unsafe { libc::close(fd) };
    }
}

thread_local! {
    /// The thread's name for the violation message: plain bytes with a const initializer and
    /// no destructor, so the signal handler can read it without allocating or locking.
    static THREAD_NAME: Cell<[u8; 16]> = const { Cell::new([0; 16]) };
}

fn remember_thread_name(name: &str) {
    let mut bytes = [0u8; 16];
    let n = name.len().min(15);
    bytes[..n].copy_from_slice(&name.as_bytes()[..n]);
    let _ = THREAD_NAME.try_with(|cell| cell.set(bytes));
}

/// `si_syscall` of a SIGSYS siginfo on x86_64: after si_signo, si_errno, si_code and the
/// padding that aligns the union to 8 bytes (16 bytes), `_sigsys` starts with `_call_addr`
/// (8 bytes), then the `int _syscall`.
const SI_SYSCALL_OFFSET: usize = 24;
/// `si_code` of a SIGSYS sent by seccomp.
const SYS_SECCOMP: i32 = 1;

/// A fixed buffer for the violation line (no allocation in the handler).
struct Line {
    buf: [u8; 160],
    len: usize,
}

impl Line {
    fn push(&mut self, bytes: &[u8]) {
        let n = bytes.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
    }

    fn push_number(&mut self, value: i64) {
        if value < 0 {
            self.push(b"-");
        }
        let mut digits = [0u8; 20];
        let mut v = value.unsigned_abs();
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }

    fn push_hex(&mut self, value: u64) {
        let mut digits = [0u8; 16];
        let mut v = value;
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b"0123456789abcdef"[(v & 0xf) as usize];
            v >>= 4;
            if v == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }

    fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// The violation line for syscall `nr` in `thread` (a NUL-padded name), with the call's first
/// two arguments when known (an ioctl's fd and request, an openat's directory fd and path).
fn violation_line(nr: i64, thread: &[u8; 16], args: Option<[u64; 2]>) -> Line {
    let mut line = Line {
        buf: [0; 160],
        len: 0,
    };
    let name = usize::try_from(nr)
        .ok()
        .and_then(|i| names::SYSCALL_NAMES.get(i))
        .filter(|n| !n.is_empty())
        .copied()
        .unwrap_or("unknown");
    let thread_len = thread.iter().position(|&b| b == 0).unwrap_or(thread.len());
    line.push(b"mqvmm: seccomp violation: syscall ");
    line.push_number(nr);
    line.push(b" (");
    line.push(name.as_bytes());
    line.push(b") in thread ");
    if thread_len == 0 {
        // A thread that has not entered a filter of its own yet: one the spawner created,
        // still in its start-up code under the spawner's filter.
        line.push(b"? (starting)");
    } else {
        line.push(&thread[..thread_len]);
    }
    if let Some([a0, a1]) = args {
        line.push(b" (arguments 0x");
        line.push_hex(a0);
        line.push(b", 0x");
        line.push_hex(a1);
        line.push(b")");
    }
    line.push(b"\n");
    line
}

extern "C" fn on_sigsys(_signo: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    let (code, nr) = if info.is_null() {
        (0, -1)
    } else {
        // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers; si_code is a
        // field of the common header and `_syscall` lies within the 128-byte siginfo at the
        // offset of the SIGSYS layout (read unaligned-safe as a plain int).
        unsafe {
            let base = info.cast::<u8>();
            (
                (*info).si_code,
                std::ptr::read_unaligned(base.add(SI_SYSCALL_OFFSET).cast::<i32>()),
            )
        }
    };
    let thread = THREAD_NAME.try_with(|c| c.get()).unwrap_or([0; 16]);
    let args = (!ctx.is_null()).then(|| {
        // SAFETY: for an SA_SIGINFO handler the kernel passes the interrupted context as a
        // ucontext_t; at a seccomp trap its registers hold the system call's arguments.
        let gregs = unsafe { (*ctx.cast::<libc::ucontext_t>()).uc_mcontext.gregs };
        [
            gregs[libc::REG_RDI as usize] as u64,
            gregs[libc::REG_RSI as usize] as u64,
        ]
    });
    let line = if code == SYS_SECCOMP {
        violation_line(i64::from(nr), &thread, args)
    } else {
        let mut line = Line {
            buf: [0; 160],
            len: 0,
        };
        line.push(b"mqvmm: SIGSYS received (not from seccomp); stopping\n");
        line
    };
    let bytes = line.bytes();
    // SAFETY: write(2) and _exit(2) are async-signal-safe and allowed by every filter; the
    // buffer is valid for its length.
    unsafe {
        libc::write(libc::STDERR_FILENO, bytes.as_ptr().cast(), bytes.len());
        libc::_exit(VIOLATION_EXIT_CODE);
    }
}

fn install_sigsys_handler() -> io::Result<()> {
    // SAFETY: sigaction is plain data; every field we rely on is set below.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = on_sigsys as *const () as libc::sighandler_t;
    action.sa_flags = libc::SA_SIGINFO;
    // SAFETY: sa_mask is a valid sigset_t inside `action`; sigfillset only writes it.
    unsafe { libc::sigfillset(&mut action.sa_mask) };
    // SAFETY: `action` is fully initialised and the handler has the SA_SIGINFO signature; the
    // old action is not requested.
    if unsafe { libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name16(s: &str) -> [u8; 16] {
        let mut b = [0; 16];
        b[..s.len()].copy_from_slice(s.as_bytes());
        b
    }

    #[test]
    fn violation_line_names_syscall_and_thread() {
        let line = violation_line(257, &name16("net-pair0"), None);
        assert_eq!(
            std::str::from_utf8(line.bytes()).unwrap(),
            "mqvmm: seccomp violation: syscall 257 (openat) in thread net-pair0\n"
        );
        let line = violation_line(16, &name16("main"), Some([0, 0x5401]));
        assert_eq!(
            std::str::from_utf8(line.bytes()).unwrap(),
            "mqvmm: seccomp violation: syscall 16 (ioctl) in thread main (arguments 0x0, 0x5401)\n"
        );
        let line = violation_line(0, &[0; 16], None);
        assert_eq!(
            std::str::from_utf8(line.bytes()).unwrap(),
            "mqvmm: seccomp violation: syscall 0 (read) in thread ? (starting)\n"
        );
        let line = violation_line(9999, &name16("vcpu0"), None);
        assert!(std::str::from_utf8(line.bytes())
            .unwrap()
            .contains("syscall 9999 (unknown) in thread vcpu0"));
        let line = violation_line(-1, &name16("main"), Some([u64::MAX, 1]));
        let text = std::str::from_utf8(line.bytes()).unwrap().to_string();
        assert!(text.contains("-1 (unknown)"), "{text}");
        assert!(
            text.contains("(arguments 0xffffffffffffffff, 0x1)"),
            "{text}"
        );
    }

    #[test]
    fn syscall_table_matches_libc_numbers() {
        for (nr, name) in [
            (libc::SYS_read, "read"),
            (libc::SYS_openat, "openat"),
            (libc::SYS_ioctl, "ioctl"),
            (libc::SYS_clone3, "clone3"),
            (libc::SYS_socket, "socket"),
            (libc::SYS_execve, "execve"),
        ] {
            assert_eq!(names::SYSCALL_NAMES[nr as usize], name);
        }
    }

    #[test]
    fn every_filter_compiles() {
        let api = Some(ApiFds {
            listener: 7,
            dir: 8,
        });
        let machines = [
            Machine::default(),
            Machine {
                pci: true,
                api: None,
            },
            Machine { pci: true, api },
        ];
        for (kind, machine) in ThreadKind::ALL
            .into_iter()
            .flat_map(|k| machines.map(|m| (k, m)))
        {
            for program in kind.programs(machine, SeccompAction::Trap).unwrap() {
                // The kernel refuses programs longer than BPF_MAXINSNS (4096).
                assert!(program.len() < 4096, "{}: {}", kind.name(), program.len());
            }
        }
    }

    #[test]
    fn modes_and_thread_kinds_parse() {
        assert_eq!(Mode::parse("on"), Some(Mode::On));
        assert_eq!(Mode::parse("log"), Some(Mode::Log));
        assert_eq!(Mode::parse("off"), Some(Mode::Off));
        assert_eq!(Mode::parse("maybe"), None);
        for kind in ThreadKind::ALL {
            assert_eq!(ThreadKind::parse(kind.name()), Some(kind));
            assert_eq!(ThreadKind::ALL[kind.index()], kind);
        }
        assert_eq!(ThreadKind::parse("gpu"), None);
    }

    /// A filter really confines the thread that enters it, and only that thread: run in a
    /// child process (the SIGSYS handler ends the process).
    #[test]
    fn entered_filter_traps_a_forbidden_call_with_the_named_line() {
        if std::env::var_os("MQVMM_SECCOMP_CHILD").is_some() {
            let sandbox = Sandbox::new(Mode::On, None).unwrap();
            std::thread::Builder::new()
                .name("net-pair7".into())
                .spawn(move || {
                    sandbox.enter(ThreadKind::NetPair).unwrap();
                    // Allowed: write.
                    eprintln!("entered");
                    forbidden_syscall("net-pair7");
                    eprintln!("still alive");
                })
                .unwrap()
                .join()
                .unwrap();
            return;
        }
        let exe = std::env::current_exe().unwrap();
        let out = std::process::Command::new(exe)
            .args([
                "--exact",
                "seccomp::tests::entered_filter_traps_a_forbidden_call_with_the_named_line",
                "--nocapture",
            ])
            .env("MQVMM_SECCOMP_CHILD", "1")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(VIOLATION_EXIT_CODE), "{stderr}");
        assert!(stderr.contains("entered"), "{stderr}");
        assert!(
            stderr.contains("mqvmm: seccomp violation: syscall 257 (openat) in thread net-pair7"),
            "{stderr}"
        );
        assert!(!stderr.contains("still alive"), "{stderr}");
    }

    /// Runs test `name` of this module again in a child process with `MQVMM_SECCOMP_CHILD` set
    /// to `part`: the filters stay with the child, and a violation ends only the child.
    fn run_child(name: &str, part: &str) -> std::process::Output {
        let exe = std::env::current_exe().unwrap();
        std::process::Command::new(exe)
            .args([&format!("seccomp::tests::{name}"), "--exact", "--nocapture"])
            .env("MQVMM_SECCOMP_CHILD", part)
            .output()
            .unwrap()
    }

    fn child_part() -> Option<String> {
        std::env::var("MQVMM_SECCOMP_CHILD").ok()
    }

    /// clone3 passes its flags in memory, where no filter can check them: under the spawner's
    /// filters it fails with ENOSYS (not EINVAL, which the kernel answers to this call when a
    /// filter lets it through), and threads still start (glibc falls back to clone), both
    /// plain ones and the device threads the [`Spawner`] starts under their own filter.
    #[test]
    fn spawner_filter_refuses_clone3_with_enosys_and_threads_still_start() {
        const NAME: &str = "spawner_filter_refuses_clone3_with_enosys_and_threads_still_start";
        if child_part().is_some() {
            let sandbox = std::sync::Arc::new(Sandbox::new(Mode::On, None).unwrap());
            let confined = sandbox.clone();
            let (rc, errno, started) = std::thread::spawn(move || {
                confined.enter(ThreadKind::Spawner).unwrap();
                // SAFETY: clone3 with no argument structure (null, size 0) creates nothing:
                // the kernel refuses it with EINVAL when no filter answers first.
                let rc = unsafe { libc::syscall(libc::SYS_clone3, std::ptr::null::<u8>(), 0) };
                let errno = io::Error::last_os_error().raw_os_error();
                let started = std::thread::spawn(|| 7).join();
                (rc, errno, started.ok())
            })
            .join()
            .unwrap();
            println!("clone3 returned {rc}, errno {errno:?}; new thread returned {started:?}");
            let spawner = Spawner::start(sandbox).unwrap();
            let (tx, rx) = std::sync::mpsc::channel();
            let handle = virtio_net::ThreadSpawner::spawn(
                &spawner,
                virtio_net::DeviceThread::QueuePair(0),
                "net-pair0".into(),
                Box::new(move || {
                    let _ = tx.send(8);
                }),
            )
            .unwrap();
            handle.join().unwrap();
            println!("device thread sent {:?}", rx.recv().ok());
            return;
        }
        let out = run_child(NAME, "clone3");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
        assert!(
            stdout.contains(&format!(
                "clone3 returned -1, errno Some({}); new thread returned Some(7)",
                libc::ENOSYS
            )),
            "{stdout}{stderr}"
        );
        assert!(
            stdout.contains("device thread sent Some(8)"),
            "{stdout}{stderr}"
        );
    }

    /// `tgkill` with SIGABRT (what `abort()` sends) reaches mqvmm's own threads and no other
    /// process: a SIGABRT at another thread group is a violation. The second call would be
    /// harmless even if allowed: the thread it names is not in that group (ESRCH).
    #[test]
    fn tgkill_sigabrt_only_within_our_own_thread_group() {
        const NAME: &str = "tgkill_sigabrt_only_within_our_own_thread_group";
        if let Some(part) = child_part() {
            let sandbox = Sandbox::new(Mode::On, None).unwrap();
            let own = std::process::id() as libc::pid_t;
            let other = std::os::unix::process::parent_id() as libc::pid_t;
            std::thread::Builder::new()
                .name("vcpu3".into())
                .spawn(move || {
                    // SAFETY: a sigset_t filled by sigemptyset/sigaddset; blocking SIGABRT in
                    // this thread keeps the one sent to itself pending instead of fatal.
                    unsafe {
                        let mut set: libc::sigset_t = std::mem::zeroed();
                        libc::sigemptyset(&mut set);
                        libc::sigaddset(&mut set, libc::SIGABRT);
                        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
                    }
                    // SAFETY: gettid has no arguments.
                    let tid = unsafe { libc::syscall(libc::SYS_gettid) } as libc::pid_t;
                    sandbox.enter(ThreadKind::Vcpu).unwrap();
                    let tgkill = |tgid: libc::pid_t| {
                        // SAFETY: tgkill takes plain integers; SIGABRT is blocked in `tid`,
                        // and `tid` is not a thread of any other group.
                        let rc =
                            unsafe { libc::syscall(libc::SYS_tgkill, tgid, tid, libc::SIGABRT) };
                        (rc, io::Error::last_os_error().raw_os_error())
                    };
                    eprintln!("own thread group: {:?}", tgkill(own));
                    if part == "other" {
                        eprintln!("other thread group: {:?}", tgkill(other));
                    }
                    // The blocked, pending SIGABRT goes with the thread.
                })
                .unwrap()
                .join()
                .unwrap();
            eprintln!("still alive");
            return;
        }
        let out = run_child(NAME, "own");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{stderr}");
        assert!(stderr.contains("own thread group: (0, "), "{stderr}");
        assert!(stderr.contains("still alive"), "{stderr}");

        let out = run_child(NAME, "other");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(VIOLATION_EXIT_CODE), "{stderr}");
        assert!(stderr.contains("own thread group: (0, "), "{stderr}");
        assert!(
            stderr.contains("mqvmm: seccomp violation: syscall 234 (tgkill) in thread vcpu3"),
            "{stderr}"
        );
        assert!(!stderr.contains("other thread group"), "{stderr}");
        assert!(!stderr.contains("still alive"), "{stderr}");
    }

    /// What the tgkill rule is for: `abort()` in a confined thread still ends mqvmm with
    /// SIGABRT (glibc's raise sends tgkill(getpid(), gettid(), SIGABRT)), not with a violation.
    #[test]
    fn abort_in_a_confined_thread_ends_the_process_with_sigabrt() {
        const NAME: &str = "abort_in_a_confined_thread_ends_the_process_with_sigabrt";
        if child_part().is_some() {
            let sandbox = Sandbox::new(Mode::On, None).unwrap();
            // SAFETY: prctl(PR_SET_DUMPABLE, 0) only marks this child process as not to be
            // dumped: the abort below leaves no core file behind.
            unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
            std::thread::spawn(move || {
                sandbox.enter(ThreadKind::NetPair).unwrap();
                eprintln!("aborting");
                std::process::abort();
            })
            .join()
            .unwrap();
            return;
        }
        let out = run_child(NAME, "abort");
        let stderr = String::from_utf8_lossy(&out.stderr);
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(out.status.signal(), Some(libc::SIGABRT), "{stderr}");
        assert!(stderr.contains("aborting"), "{stderr}");
        assert!(!stderr.contains("seccomp violation"), "{stderr}");
    }
}
