//! L1, the nested rig's test host: QEMU (TCG, emulated AMD SVM) running Debian's generic kernel
//! with kvm_amd, the host's root shared read-only over 9p, and a command agent on a virtio-serial
//! port (protocol in resources/l1/agent) reached through a unix socket.

/// The L1 CPU model: EPYC with SVM but without nested paging (`-npt`: L1's KVM shadows L2's
/// page tables), because QEMU's emulated nested paging loses L2 vCPU state under network load;
/// the price is a rarer L1 hang or crash, which the harness retries on a fresh L1
/// ([`crate::rig`]). The measurements are in docs/rig.md. `MQVMM_RIG_L1_CPU` and
/// `MQVMM_RIG_ACCEL` override the model and the accelerator.
pub const L1_CPU: &str = "EPYC,+svm,-npt,-rdseed,-sha-ni,-fxsr-opt,-misalignsse,-3dnowprefetch,-osvw,-topoext,-nrip-save,-xsavec";

use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use super::{build_dir, l1_images, note, scratch_dir, Output};

/// Console lines that mean L1 itself died (an emulator fault, not the test's fault).
const CRASH_PATTERNS: &[&str] = &[
    "Kernel panic",
    "stack guard page was hit",
    "Oops: ",
    "MQVMM-L1-ERROR",
];

const READY_PREFIX: &str = "@@MQVMM-AGENT-READY ";
const DONE_PREFIX: &str = "@@MQVMM-AGENT-DONE ";

#[derive(Debug, thiserror::Error)]
pub enum RigError {
    #[error("the nested rig needs {path} (run `make resources`)")]
    MissingImage { path: PathBuf },
    #[error("cannot create the rig directory {path}")]
    Dir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot start qemu-system-x86_64 for L1")]
    Spawn {
        #[source]
        source: io::Error,
    },
    #[error("cannot connect to the L1 agent socket {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("I/O on the L1 agent channel failed")]
    Channel {
        #[source]
        source: io::Error,
    },
    #[error("L1 did not become ready within {secs} s (console log {console})")]
    BootTimeout { secs: u64, console: PathBuf },
    #[error("L1 booted without /dev/kvm (kvm_amd did not load; console log {console})")]
    NoKvm { console: PathBuf },
    #[error("L1 crashed: {reason} (console log {console})")]
    Crashed { reason: String, console: PathBuf },
    #[error("L1 crashed twice in a row; giving up")]
    CrashedTwice,
    #[error("the command did not finish within {secs} s in L1 (console log {console})")]
    Timeout { secs: u64, console: PathBuf },
    #[error("L1 exited with {status}")]
    Exited { status: ExitStatus },
}

/// How L1 is started.
#[derive(Clone, Debug)]
pub struct L1Config {
    pub cpus: u32,
    pub memory_mib: u32,
    pub boot_timeout: Duration,
}

impl Default for L1Config {
    fn default() -> Self {
        L1Config {
            cpus: 2,
            memory_mib: 3072,
            boot_timeout: Duration::from_secs(180),
        }
    }
}

impl L1Config {
    /// Defaults, overridden by MQVMM_RIG_L1_CPUS, MQVMM_RIG_L1_MEM_MIB, MQVMM_RIG_BOOT_TIMEOUT.
    pub fn from_env() -> Self {
        fn env_num(name: &str) -> Option<u64> {
            std::env::var(name).ok().and_then(|v| v.parse().ok())
        }
        let mut config = L1Config::default();
        if let Some(n) = env_num("MQVMM_RIG_L1_CPUS").and_then(|n| u32::try_from(n).ok()) {
            config.cpus = n;
        }
        if let Some(n) = env_num("MQVMM_RIG_L1_MEM_MIB").and_then(|n| u32::try_from(n).ok()) {
            config.memory_mib = n;
        }
        if let Some(n) = env_num("MQVMM_RIG_BOOT_TIMEOUT") {
            config.boot_timeout = Duration::from_secs(n);
        }
        config
    }
}

/// A unique number per L1 started by this process (names its files).
fn next_instance() -> u32 {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    COUNTER.fetch_add(1, Ordering::Relaxed)
}

/// The QEMU command line for L1; `extra_cmdline` is appended to the kernel command line.
fn qemu_command(config: &L1Config, extra_cmdline: &str) -> Result<Command, RigError> {
    let images = l1_images();
    for path in [&images.bzimage, &images.initramfs] {
        if !path.is_file() {
            return Err(RigError::MissingImage { path: path.clone() });
        }
    }
    let scratch = scratch_dir();
    fs::create_dir_all(&scratch).map_err(|source| RigError::Dir {
        path: scratch.clone(),
        source,
    })?;
    let mut cmd = Command::new("qemu-system-x86_64");
    // EPYC with SVM (see L1_CPU), minus the features TCG cannot emulate anyway (asking for them
    // only makes QEMU print a warning per vCPU on the user's terminal).
    let accel = std::env::var("MQVMM_RIG_ACCEL").unwrap_or_else(|_| "tcg,thread=multi".into());
    let cpu = std::env::var("MQVMM_RIG_L1_CPU").unwrap_or_else(|_| L1_CPU.into());
    cmd.args(["-accel", &accel, "-cpu", &cpu])
        .args(["-smp", &config.cpus.to_string()])
        .args(["-m", &config.memory_mib.to_string()])
        .args(["-nographic", "-no-reboot", "-nic", "none"])
        .arg("-kernel")
        .arg(&images.bzimage)
        .arg("-initrd")
        .arg(&images.initramfs)
        .arg("-append")
        // transparent_hugepage=never: under shadow paging (`-npt`) khugepaged can block L1 for
        // minutes in a long network run; hung_task_panic=1 turns a hang that is left into an L1
        // crash after 120 s, which the harness recognises and retries, instead of a test that
        // waits for its time limit (docs/rig.md).
        .arg(format!(
            "console=ttyS0 quiet panic=-1 nowatchdog transparent_hugepage=never hung_task_panic=1 mqvmm.l1scratch={}{} {extra_cmdline}",
            scratch.display(),
            keep_param()
        ))
        .arg("-virtfs")
        .arg("local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap")
        .arg("-virtfs")
        .arg(format!(
            "local,path={},mount_tag=scratch,security_model=none,multidevs=remap",
            scratch.display()
        ));
    Ok(cmd)
}

/// L1 puts tmpfs on /tmp and /run (its scratch space). Directories this process needs that live
/// there on the host (a checkout or target dir under /tmp) are kept visible: ` mqvmm.l1keep=...`.
fn keep_param() -> String {
    let mut candidates: Vec<PathBuf> = vec![build_dir(), super::workspace_dir()];
    candidates.extend(std::env::current_exe().ok());
    candidates.extend(std::env::current_dir().ok());
    for var in ["CARGO_TARGET_DIR", "MQVMM_BIN_DIR"] {
        candidates.extend(std::env::var_os(var).map(PathBuf::from));
    }
    let keep = dirs_to_keep(&candidates);
    if keep.is_empty() {
        String::new()
    } else {
        format!(" mqvmm.l1keep={}", keep.join(":"))
    }
}

/// The distinct `/tmp/X` and `/run/X` directories containing the given absolute paths.
fn dirs_to_keep(paths: &[PathBuf]) -> Vec<String> {
    let mut keep: Vec<String> = Vec::new();
    for path in paths {
        if !path.is_absolute() {
            continue;
        }
        let mut parts = path.components().skip(1); // the root
        let (Some(top), Some(sub)) = (parts.next(), parts.next()) else {
            continue;
        };
        let top = top.as_os_str().to_string_lossy();
        if top != "tmp" && top != "run" {
            continue;
        }
        let dir = format!("/{top}/{}", sub.as_os_str().to_string_lossy());
        // The kernel command line splits on spaces and the init script on ':'.
        if dir.contains([' ', ':']) || keep.contains(&dir) {
            continue;
        }
        keep.push(dir);
    }
    keep
}

/// Spawn `cmd` so that it is killed when this process exits: PR_SET_PDEATHSIG fires when the
/// spawning *thread* exits, so all spawns happen on one thread that lives as long as the process.
fn spawn_tied(cmd: Command) -> io::Result<Child> {
    type Request = (Command, mpsc::Sender<io::Result<Child>>);
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<Request>>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Request>();
        thread::Builder::new()
            .name("rig-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    // SAFETY: the closure runs in the child between fork and exec and only calls
                    // prctl, which is async-signal-safe.
                    unsafe {
                        cmd.pre_exec(|| {
                            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                                return Err(io::Error::last_os_error());
                            }
                            Ok(())
                        });
                    }
                    let _ = reply.send(cmd.spawn());
                }
            })
            .map(|_| ())
            .unwrap_or_else(|e| eprintln!("rig: cannot start the spawner thread: {e}"));
        Mutex::new(tx)
    });
    let (reply_tx, reply_rx) = mpsc::channel();
    spawner
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .send((cmd, reply_tx))
        .map_err(|_| io::Error::other("the rig spawner thread is gone"))?;
    reply_rx
        .recv()
        .map_err(|_| io::Error::other("the rig spawner thread is gone"))?
}

/// Keep only the newest `keep` console logs in `dir`.
fn prune_logs(dir: &Path, keep: usize) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let mut logs: Vec<(std::time::SystemTime, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("l1-console-"))
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    logs.sort();
    let excess = logs.len().saturating_sub(keep);
    for (_, path) in logs.into_iter().take(excess) {
        let _ = fs::remove_file(path);
    }
}

/// Watches the console log for crash patterns, reading only what was appended since last time.
struct ConsoleWatch {
    path: PathBuf,
    offset: u64,
    tail: String,
}

impl ConsoleWatch {
    fn new(path: PathBuf) -> Self {
        ConsoleWatch {
            path,
            offset: 0,
            tail: String::new(),
        }
    }

    fn crash_reason(&mut self) -> Option<String> {
        let mut file = File::open(&self.path).ok()?;
        file.seek(SeekFrom::Start(self.offset)).ok()?;
        let mut fresh = Vec::new();
        file.read_to_end(&mut fresh).ok()?;
        self.offset += fresh.len() as u64;
        let text = format!("{}{}", self.tail, String::from_utf8_lossy(&fresh));
        let found = text.lines().find_map(|line| {
            CRASH_PATTERNS
                .iter()
                .any(|p| line.contains(p))
                .then(|| line.trim().to_string())
        });
        // Keep the last partial line so a pattern split across reads is still seen.
        self.tail = text
            .rsplit_once('\n')
            .map_or(text.clone(), |(_, rest)| rest.to_string());
        found
    }
}

/// A running L1 with its agent connected. Dropping it kills QEMU.
pub struct L1 {
    child: Child,
    stream: UnixStream,
    pending: Vec<u8>,
    console: ConsoleWatch,
    run_dir: PathBuf,
    next_id: u64,
    /// Wall time from starting QEMU to the agent's readiness.
    pub boot_time: Duration,
    /// L1's own uptime (seconds, as L1 printed it) when the agent was ready (/dev/kvm exists).
    pub l1_uptime_at_ready: String,
}

impl L1 {
    /// Path of the console log of this L1.
    pub fn console_log(&self) -> &Path {
        &self.console.path
    }

    /// Boot L1 with the agent and wait until it is ready and /dev/kvm exists in it.
    pub fn boot(config: &L1Config) -> Result<L1, RigError> {
        let instance = next_instance();
        let pid = std::process::id();
        let log_dir = build_dir().join("rig");
        fs::create_dir_all(&log_dir).map_err(|source| RigError::Dir {
            path: log_dir.clone(),
            source,
        })?;
        prune_logs(&log_dir, 20);
        let console_path = log_dir.join(format!("l1-console-{pid}-{instance}.log"));
        // A short path: unix socket paths are limited to 107 bytes.
        let run_dir = std::env::temp_dir().join(format!("mqvmm-rig-{pid}-{instance}"));
        let _ = fs::remove_dir_all(&run_dir);
        fs::create_dir_all(&run_dir).map_err(|source| RigError::Dir {
            path: run_dir.clone(),
            source,
        })?;
        let socket = run_dir.join("agent.sock");
        let console_file = File::create(&console_path).map_err(|source| RigError::Dir {
            path: console_path.clone(),
            source,
        })?;
        let console_err = console_file
            .try_clone()
            .map_err(|source| RigError::Spawn { source })?;

        let mut cmd = qemu_command(config, "")?;
        cmd.args(["-device", "virtio-serial-pci"])
            .arg("-chardev")
            .arg(format!(
                "socket,id=agent,path={},server=on,wait=off",
                socket.display()
            ))
            .args([
                "-device",
                "virtserialport,chardev=agent,name=org.mqvmm.agent",
            ])
            .stdin(Stdio::null())
            .stdout(console_file)
            .stderr(console_err);
        let started = Instant::now();
        note(&format!(
            "rig: booting L1 ({} CPUs, {} MiB, TCG); console log {}",
            config.cpus,
            config.memory_mib,
            console_path.display()
        ));
        let mut child = spawn_tied(cmd).map_err(|source| RigError::Spawn { source })?;

        let stream = loop {
            match UnixStream::connect(&socket) {
                Ok(stream) => break stream,
                Err(e) => {
                    if let Ok(Some(status)) = child.try_wait() {
                        let _ = fs::remove_dir_all(&run_dir);
                        return Err(RigError::Crashed {
                            reason: format!(
                                "QEMU exited with {status} before the agent socket appeared"
                            ),
                            console: console_path,
                        });
                    }
                    if started.elapsed() > Duration::from_secs(30) {
                        let _ = child.kill();
                        let _ = child.wait();
                        let _ = fs::remove_dir_all(&run_dir);
                        return Err(RigError::Connect {
                            path: socket,
                            source: e,
                        });
                    }
                    thread::sleep(Duration::from_millis(50));
                }
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_millis(250)))
            .map_err(|source| RigError::Channel { source })?;
        let mut l1 = L1 {
            child,
            stream,
            pending: Vec::new(),
            console: ConsoleWatch::new(console_path.clone()),
            run_dir,
            next_id: 1,
            boot_time: Duration::ZERO,
            l1_uptime_at_ready: String::new(),
        };

        let deadline = started + config.boot_timeout;
        let ready = loop {
            if let Some(line) = l1.take_line() {
                if let Some(rest) = line.strip_prefix(READY_PREFIX) {
                    break rest.trim_end_matches('@').to_string();
                }
                continue;
            }
            if Instant::now() > deadline {
                return Err(RigError::BootTimeout {
                    secs: config.boot_timeout.as_secs(),
                    console: console_path,
                });
            }
            l1.fill()?;
        };
        l1.boot_time = started.elapsed();
        for field in ready.split_whitespace() {
            if let Some(uptime) = field.strip_prefix("uptime=") {
                l1.l1_uptime_at_ready = uptime.to_string();
            }
        }
        if !ready.split_whitespace().any(|f| f == "kvm=yes") {
            return Err(RigError::NoKvm {
                console: console_path,
            });
        }
        note(&format!(
            "rig: L1 ready with /dev/kvm in {:.1} s wall ({} s of L1 uptime)",
            l1.boot_time.as_secs_f64(),
            l1.l1_uptime_at_ready
        ));
        Ok(l1)
    }

    /// Pop one complete line from what was received, if any.
    fn take_line(&mut self) -> Option<String> {
        let pos = self.pending.iter().position(|&b| b == b'\n')?;
        let line: Vec<u8> = self.pending.drain(..=pos).collect();
        Some(String::from_utf8_lossy(&line[..pos]).into_owned())
    }

    /// Wait up to the read timeout for more bytes from the agent; detect a dead L1.
    fn fill(&mut self) -> Result<(), RigError> {
        let mut buf = [0u8; 16384];
        match self.stream.read(&mut buf) {
            Ok(0) => {
                // QEMU closed the channel: give it a moment to exit, then say why if we can.
                let mut status = None;
                for _ in 0..20 {
                    status = self.child.try_wait().ok().flatten();
                    if status.is_some() {
                        break;
                    }
                    thread::sleep(Duration::from_millis(50));
                }
                let reason = match (self.console.crash_reason(), status) {
                    (Some(line), _) => format!("console: {line}"),
                    (None, Some(status)) => format!("QEMU exited with {status}"),
                    (None, None) => "the agent channel closed".to_string(),
                };
                return Err(self.crashed(reason));
            }
            Ok(n) => self.pending.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(source) => return Err(RigError::Channel { source }),
        }
        if let Ok(Some(status)) = self.child.try_wait() {
            return Err(self.crashed(format!("QEMU exited with {status}")));
        }
        if let Some(line) = self.console.crash_reason() {
            return Err(self.crashed(format!("console: {line}")));
        }
        Ok(())
    }

    fn crashed(&self, reason: String) -> RigError {
        RigError::Crashed {
            reason,
            console: self.console.path.clone(),
        }
    }

    /// Run a shell script in L1 (as root, in the host's root; see resources/l1/agent). Complete
    /// output lines go to `sink` as they arrive. `limit` bounds the wait; when it expires L1 is
    /// in an unknown state and the caller must drop it.
    pub fn exec(
        &mut self,
        script: &str,
        limit: Duration,
        sink: &mut dyn FnMut(&str),
    ) -> Result<Output, RigError> {
        let id = self.next_id;
        self.next_id += 1;
        let request = format!("{id} {}\n", base64_encode(script.as_bytes()));
        self.stream
            .write_all(request.as_bytes())
            .map_err(|source| RigError::Channel { source })?;
        let started = Instant::now();
        let marker = format!("{DONE_PREFIX}{id} ");
        let mut output = String::new();
        // The agent puts a newline before the marker: an empty line is passed on only once a
        // line that is not the marker follows it.
        let mut held_empty = false;
        loop {
            while let Some(line) = self.take_line() {
                if let Some(rest) = line.strip_prefix(&marker) {
                    let code = rest.trim_end_matches('@').trim().parse::<i32>().ok();
                    if !held_empty && output.ends_with('\n') {
                        output.pop();
                    }
                    return Ok(Output {
                        code,
                        timed_out: code == Some(124),
                        output,
                        elapsed: started.elapsed(),
                    });
                }
                if held_empty {
                    sink("\n");
                    output.push('\n');
                    held_empty = false;
                }
                if line.is_empty() {
                    held_empty = true;
                    continue;
                }
                let line = format!("{line}\n");
                sink(&line);
                output.push_str(&line);
            }
            if started.elapsed() > limit {
                return Err(RigError::Timeout {
                    secs: limit.as_secs(),
                    console: self.console.path.clone(),
                });
            }
            if let Err(e) = self.fill() {
                // Pass on what arrived before the failure, then report it.
                while let Some(line) = self.take_line() {
                    let line = format!("{line}\n");
                    sink(&line);
                    output.push_str(&line);
                }
                return Err(e);
            }
        }
    }

    /// Boot L1 with the console on this terminal and run `script_path` (a host path, seen through
    /// the read-only share) in the host's root with the console as its controlling terminal.
    /// L1 powers off when the script ends. Returns QEMU's exit status.
    pub fn run_interactive(config: &L1Config, script_path: &Path) -> Result<ExitStatus, RigError> {
        // loglevel=1: only emergencies (panics) from L1's kernel interleave with the guest's console.
        let mut cmd = qemu_command(
            config,
            &format!("loglevel=1 mqvmm.l1run={}", script_path.display()),
        )?;
        cmd.stdin(Stdio::inherit())
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit());
        let mut child = spawn_tied(cmd).map_err(|source| RigError::Spawn { source })?;
        child.wait().map_err(|source| RigError::Spawn { source })
    }
}

impl Drop for L1 {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.run_dir);
    }
}

/// Standard base64 (RFC 4648, with padding), as `base64 -d` in L1 expects.
pub fn base64_encode(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::{base64_encode, dirs_to_keep};
    use std::path::PathBuf;

    #[test]
    fn only_dirs_under_tmp_and_run_are_kept_once() {
        let paths: Vec<PathBuf> = [
            "/tmp/ci-clone/target/release/deps/boot_x",
            "/tmp/ci-clone/build",
            "/run/user",
            "/work/main/build",
            "/tmp",
            "relative/tmp/x",
            "/tmp/has space/x",
        ]
        .iter()
        .map(PathBuf::from)
        .collect();
        assert_eq!(dirs_to_keep(&paths), vec!["/tmp/ci-clone", "/run/user"]);
    }

    #[test]
    fn base64_matches_rfc4648_vectors() {
        let cases = [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ];
        for (input, expected) in cases {
            assert_eq!(base64_encode(input.as_bytes()), expected, "input {input:?}");
        }
    }
}
