//! The test rig: run KVM tests directly where /dev/kvm runs an ordinary guest, and inside a
//! nested "test host" (L1) otherwise.
//!
//! Tests are written once:
//!
//! ```ignore
//! #[test]
//! fn guest_boots() {
//!     if !skip::require_kvm_env() { return; }
//!     rig::in_kvm_env("guest_boots", || {
//!         // here /dev/kvm works: start mqvmm, assert on the guest's output
//!     });
//! }
//! ```
//!
//! In [`Mode::Direct`] (or when already inside L1, `MQVMM_IN_L1=1`) the body runs in-process. In
//! [`Mode::Nested`] the test process boots L1 once (QEMU TCG with emulated SVM, Debian's generic
//! kernel, kvm_amd loaded, the host's root shared read-only over 9p) and re-runs this very test
//! executable inside it with `--exact <test_name>`; its output is streamed to the test's stdout and
//! the outer test fails when the inner one does. The L1 is shared by all tests of the process.
//!
//! Inside the body, [`run_guest`] runs a VMM to completion with a time bound and timestamps every
//! console line ([`GuestRun::time_of`], [`GuestRun::value_of`] for the guest's `MQVMM-*` lines, see
//! resources/README.md); `tests/boot_rig.rs` is the template. [`note`] prints lines that must show
//! even for passing tests (timings). [`exec_in_l1`] / [`exec_in_kvm_env`] run shell commands
//! (benchmarks); `MQVMM_RIG_SCRATCH` is a directory they can write that the host sees.
//!
//! Environment: `MQVMM_RIG=direct|nested` forces the mode; `MQVMM_BUILD` is the build directory
//! (default `<workspace>/build`); `MQVMM_BIN_DIR` where mqvmm binaries are (default: next to
//! the running executable); `MQVMM_RIG_TEST_TIMEOUT` / `MQVMM_RIG_BOOT_TIMEOUT` (seconds) bound a
//! nested test run and an L1 boot; `MQVMM_RIG_L1_CPUS` / `MQVMM_RIG_L1_MEM_MIB` size L1.

mod l1;
pub mod probe;

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

pub use l1::{base64_encode, L1Config, RigError, L1};

/// Where KVM tests run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// On this host's /dev/kvm.
    Direct,
    /// Inside L1, a Linux test host under QEMU TCG with emulated SVM.
    Nested,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Direct => "direct",
            Mode::Nested => "nested",
        })
    }
}

/// Print one line on stderr, bypassing libtest's output capture, so that it shows for passing
/// tests too (the mode decision, L1 boots, timings). Boot tests print their timings with
/// `note("timing: ...")`; such lines from a test run inside L1 are passed on the same way.
pub fn note(line: &str) {
    use std::io::Write;
    let mut stderr = std::io::stderr().lock();
    let _ = writeln!(stderr, "{line}");
}

/// The mode and why it was chosen.
#[derive(Clone, Debug)]
pub struct Decision {
    pub mode: Mode,
    pub reason: String,
}

/// Decide the mode once per process (probe /dev/kvm unless `MQVMM_RIG` forces it) and print the
/// decision once.
pub fn decision() -> &'static Decision {
    static DECISION: OnceLock<Decision> = OnceLock::new();
    DECISION.get_or_init(|| {
        let decision = decide();
        note(&format!("rig: {} mode: {}", decision.mode, decision.reason));
        decision
    })
}

fn decide() -> Decision {
    match std::env::var("MQVMM_RIG").as_deref() {
        Ok("direct") => {
            return Decision {
                mode: Mode::Direct,
                reason: "forced by MQVMM_RIG=direct".into(),
            }
        }
        Ok("nested") => {
            return Decision {
                mode: Mode::Nested,
                reason: "forced by MQVMM_RIG=nested".into(),
            }
        }
        Ok(other) if !other.is_empty() => note(&format!(
            "rig: ignoring MQVMM_RIG={other:?} (expected direct or nested); probing /dev/kvm"
        )),
        _ => {}
    }
    let started = Instant::now();
    match probe::probe("/dev/kvm") {
        Ok(()) => Decision {
            mode: Mode::Direct,
            reason: format!(
                "/dev/kvm ran the probe guest (cmpxchg16b, xsave/xrstor, int3, out) in {} ms",
                started.elapsed().as_millis()
            ),
        },
        Err(why) => Decision {
            mode: Mode::Nested,
            reason: format!("/dev/kvm cannot run an ordinary guest: {why}"),
        },
    }
}

/// The mode KVM tests run in (see [`decision`]).
pub fn mode() -> Mode {
    decision().mode
}

/// True inside the rig's L1 (the agent sets `MQVMM_IN_L1=1`).
pub fn in_l1() -> bool {
    std::env::var_os("MQVMM_IN_L1").is_some_and(|v| v == "1")
}

/// The workspace root (parent of this crate).
pub fn workspace_dir() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// The build directory of `make resources` (`MQVMM_BUILD`, default `<workspace>/build`).
pub fn build_dir() -> PathBuf {
    match std::env::var_os("MQVMM_BUILD") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => workspace_dir().join("build"),
    }
}

/// A writable directory that is the same path on the host and inside L1 (a 9p share there).
pub fn scratch_dir() -> PathBuf {
    build_dir().join("rig").join("scratch")
}

/// The L2 guest images built by `resources/build-all.sh`.
#[derive(Clone, Debug)]
pub struct GuestImages {
    /// ELF vmlinux extracted from the cloud kernel's bzImage.
    pub vmlinux: PathBuf,
    pub bzimage: PathBuf,
    pub initramfs: PathBuf,
    /// The default kernel command line (console, panic, eth0 address); see resources/README.md.
    pub cmdline: String,
}

/// The guest's eth0 address in the default command line (`mqvmm.ip=`), and its name `guest`
/// in the image's /etc/hosts (both from resources/build-all.sh).
pub const GUEST_IP: &str = "10.0.2.15";
/// The host end of the guest's tap (`mqvmm.gw=`, `host` in the image's /etc/hosts); a /24 with
/// [`GUEST_IP`].
pub const HOST_IP: &str = "10.0.2.1";

pub fn guest_images() -> GuestImages {
    let dir = build_dir().join("guest");
    let cmdline = std::fs::read_to_string(dir.join("cmdline"))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| {
            format!("console=ttyS0 reboot=k panic=-1 mqvmm.ip={GUEST_IP}/24 mqvmm.gw={HOST_IP}")
        });
    GuestImages {
        vmlinux: dir.join("vmlinux"),
        bzimage: dir.join("bzImage"),
        initramfs: dir.join("initramfs.cpio.gz"),
        cmdline,
    }
}

/// The nested rig's L1 images.
#[derive(Clone, Debug)]
pub struct L1Images {
    pub bzimage: PathBuf,
    pub initramfs: PathBuf,
}

pub fn l1_images() -> L1Images {
    let dir = build_dir().join("l1");
    L1Images {
        bzimage: dir.join("bzImage"),
        initramfs: dir.join("initramfs.cpio.gz"),
    }
}

/// Path of a binary of this workspace (`mqvmm`, `mqvmm-launch`): `MQVMM_BIN_DIR`, else the
/// directory of the running executable (`target/<profile>/`, also for tests in `.../deps/`).
pub fn bin_path(name: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os("MQVMM_BIN_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join(name);
    }
    let exe_dir = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| workspace_dir().join("target").join("release"));
    if exe_dir.file_name().is_some_and(|n| n == "deps") {
        if let Some(profile_dir) = exe_dir.parent() {
            return profile_dir.join(name);
        }
    }
    exe_dir.join(name)
}

/// Quote a string for POSIX sh.
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"@%+=:,./_-".contains(&b))
    {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// What a command printed and how it ended.
#[derive(Clone, Debug)]
pub struct Output {
    /// Exit code; `None` when it was killed by a signal or by the time bound.
    pub code: Option<i32>,
    /// stdout and stderr, interleaved as they came.
    pub output: String,
    pub elapsed: Duration,
    pub timed_out: bool,
}

impl Output {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

/// Environment passed from the test process to commands run in L1.
fn forwarded_env() -> Vec<(String, String)> {
    let mut vars: Vec<(String, String)> = std::env::vars()
        .filter(|(k, _)| {
            (k.starts_with("MQVMM_") || k.starts_with("CARGO_") || k.starts_with("RUST_"))
                && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                && k != "MQVMM_RIG"
                && k != "MQVMM_IN_L1"
        })
        .collect();
    for k in ["CI", "TERM"] {
        if let Ok(v) = std::env::var(k) {
            vars.push((k.to_string(), v));
        }
    }
    if std::env::var_os("MQVMM_BUILD").is_none() {
        vars.push((
            "MQVMM_BUILD".to_string(),
            build_dir().to_string_lossy().into_owned(),
        ));
    }
    vars.push((
        "MQVMM_RIG_SCRATCH".to_string(),
        scratch_dir().to_string_lossy().into_owned(),
    ));
    vars
}

/// The script the agent runs for `cmd`: forwarded environment, the current directory, and an
/// in-L1 time bound (exit code 124 when it expires).
fn l1_script(cmd: &str, timeout: Duration) -> String {
    let mut script = String::new();
    for (k, v) in forwarded_env() {
        script.push_str(&format!("export {k}={}\n", shell_quote(&v)));
    }
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
    script.push_str(&format!(
        "cd {} 2>/dev/null || cd /\n",
        shell_quote(&cwd.to_string_lossy())
    ));
    script.push_str(&format!(
        "exec timeout --kill-after=10 {} /bin/sh -c {}\n",
        timeout.as_secs().max(1),
        shell_quote(cmd)
    ));
    script
}

fn shared_l1() -> &'static Mutex<Option<L1>> {
    static SHARED: Mutex<Option<L1>> = Mutex::new(None);
    &SHARED
}

/// Run `cmd` (a shell snippet) in the shared L1, booting it if needed; `sink` receives the output
/// as it arrives. An L1 crash (kernel panic, QEMU gone) or an L1 that stops answering (the
/// command's own `timeout` inside L1 would have reported by then: L1 itself is wedged, an
/// emulator fault, see docs/rig.md) is reported and the command is retried once on a fresh L1;
/// a second failure is an error.
pub fn try_exec_in_l1_streaming(
    cmd: &str,
    timeout: Duration,
    sink: &mut dyn FnMut(&str),
) -> Result<Output, RigError> {
    let script = l1_script(cmd, timeout);
    let mut guard = shared_l1().lock().unwrap_or_else(|e| e.into_inner());
    for attempt in 1..=2 {
        if guard.is_none() {
            *guard = Some(L1::boot(&L1Config::from_env())?);
        }
        let Some(l1) = guard.as_mut() else {
            continue;
        };
        // Grace beyond the in-L1 `timeout`, which reports 124 itself.
        match l1.exec(&script, timeout + Duration::from_secs(30), sink) {
            Ok(out) => return Ok(out),
            Err(RigError::Crashed { reason, console }) if attempt == 1 => {
                note(&format!(
                    "rig: L1 crashed ({reason}); console log {}; retrying once on a fresh L1",
                    console.display()
                ));
                *guard = None;
            }
            Err(RigError::Timeout { secs, console }) if attempt == 1 => {
                note(&format!(
                    "rig: L1 stopped answering ({secs} s without the command's own time limit \
                     reporting); console log {}; retrying once on a fresh L1",
                    console.display()
                ));
                *guard = None;
            }
            Err(e) => {
                *guard = None;
                return Err(e);
            }
        }
    }
    Err(RigError::CrashedTwice)
}

/// Run `cmd` (a shell snippet, run by /bin/sh in the host's root inside L1, as root, in the
/// current directory, with MQVMM_*/CARGO_*/RUST_* forwarded) and return its output.
/// Panics when the rig itself fails (L1 does not boot, crashes twice, or the time bound expires).
pub fn exec_in_l1(cmd: &str, timeout: Duration) -> Output {
    try_exec_in_l1_streaming(cmd, timeout, &mut |_| {})
        .unwrap_or_else(|e| panic!("rig: cannot run {cmd:?} in L1: {e}"))
}

/// Run `cmd` where KVM works: directly (`sh -c`) in direct mode or inside L1, else in L1.
pub fn exec_in_kvm_env(cmd: &str, timeout: Duration) -> Output {
    if in_l1() || mode() == Mode::Direct {
        exec_here(cmd, timeout)
    } else {
        exec_in_l1(cmd, timeout)
    }
}

/// Run `cmd` with /bin/sh here, bounded by `timeout` (killed with its process group on expiry).
pub fn exec_here(cmd: &str, timeout: Duration) -> Output {
    let started = Instant::now();
    let full = format!(
        "exec timeout --kill-after=10 {} /bin/sh -c {} 2>&1",
        timeout.as_secs().max(1),
        shell_quote(cmd)
    );
    match Command::new("/bin/sh")
        .arg("-c")
        .arg(full)
        .stdin(Stdio::null())
        .output()
    {
        Ok(out) => {
            let code = out.status.code();
            Output {
                code,
                output: String::from_utf8_lossy(&out.stdout).into_owned(),
                elapsed: started.elapsed(),
                timed_out: code == Some(124),
            }
        }
        Err(e) => Output {
            code: None,
            output: format!("cannot run /bin/sh: {e}"),
            elapsed: started.elapsed(),
            timed_out: false,
        },
    }
}

fn test_timeout() -> Duration {
    let secs = std::env::var("MQVMM_RIG_TEST_TIMEOUT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    Duration::from_secs(secs)
}

/// What mqvmm reports when a running L2 vCPU is suddenly in its power-on reset state (RIP
/// 0xfff0, CR0 0x10) and triple-faults fetching from the top of the address space: no guest
/// kernel leaves a vCPU like that while it runs, and Debian's QEMU ends the same way in L1, so
/// it is the nested rig's emulator (TCG's SVM) losing L2 state, not the VMM (docs/rig.md). Like
/// an L1 crash, it is said and retried once; a second one is a real failure.
pub const EMULATOR_FAULT: &str = "triple-faulted (KVM_EXIT_SHUTDOWN) at RIP 0xfff0 (CR0 0x10,";

/// Run a KVM test body where KVM works. `test_name` is the test's name as libtest knows it
/// (the function name for a top-level test in `tests/*.rs`, `module::name` otherwise).
///
/// Direct mode, or inside L1: `body()` runs here. Nested mode: this test executable is run inside
/// L1 with `--exact <test_name>`; the outer test panics, with the inner output, unless exactly
/// that one test ran and passed (an [`EMULATOR_FAULT`] earns one more run).
pub fn in_kvm_env(test_name: &str, body: impl FnOnce()) {
    if in_l1() || mode() == Mode::Direct {
        body();
        return;
    }
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => panic!("rig: cannot find the running test executable: {e}"),
    };
    let cmd = format!(
        "{} --exact {} --nocapture --test-threads=1 --include-ignored",
        shell_quote(&exe.to_string_lossy()),
        shell_quote(test_name)
    );
    note(&format!("rig: running {test_name} inside L1"));
    let mut sink = |line: &str| {
        // Rig and timing lines of the inner run reach the terminal even when output is captured.
        // (libtest prints "test NAME ... " before the test's own output, on the same line.)
        if let Some(pos) = line.find("timing: ") {
            note(line[pos..].trim_end());
        } else if line.starts_with("rig: ") {
            note(line.trim_end());
        } else {
            print!("{line}");
        }
    };
    let mut out = try_exec_in_l1_streaming(&cmd, test_timeout(), &mut sink)
        .unwrap_or_else(|e| panic!("rig: cannot run {test_name} inside L1: {e}"));
    if !out.success() && out.output.contains(EMULATOR_FAULT) {
        note(&format!(
            "rig: an L2 vCPU of {test_name} was found in its power-on reset state and triple-faulted: \
             the nested rig's emulator loses L2 vCPU state now and then (Debian's QEMU in L1 dies \
             the same way); running the test once more"
        ));
        out = try_exec_in_l1_streaming(&cmd, test_timeout(), &mut sink)
            .unwrap_or_else(|e| panic!("rig: cannot run {test_name} inside L1: {e}"));
    }
    let ran_one = out.output.contains("running 1 test");
    let passed = out.output.contains("test result: ok. 1 passed");
    if !(out.success() && ran_one && passed) {
        let why = if out.timed_out {
            format!("timed out after {} s", test_timeout().as_secs())
        } else if !ran_one {
            format!("the inner run did not run exactly one test named {test_name:?}")
        } else {
            format!("exit code {:?}", out.code)
        };
        panic!(
            "{test_name} failed inside L1 ({why}); its output:\n{}",
            out.output
        );
    }
    note(&format!(
        "rig: {test_name} passed inside L1 in {:.1} s",
        out.elapsed.as_secs_f64()
    ));
}

/// One line a guest (or any child) printed, with when it arrived.
#[derive(Clone, Debug)]
pub struct TimedLine {
    pub at: Duration,
    pub line: String,
}

/// The result of [`run_guest`].
#[derive(Debug)]
pub struct GuestRun {
    /// stdout and stderr lines, in arrival order, timestamped from the spawn.
    pub lines: Vec<TimedLine>,
    /// Exit code; `None` if killed (by a signal or the time bound).
    pub code: Option<i32>,
    pub elapsed: Duration,
    pub timed_out: bool,
}

impl GuestRun {
    /// When the first line containing `marker` arrived.
    pub fn time_of(&self, marker: &str) -> Option<Duration> {
        self.lines
            .iter()
            .find(|l| l.line.contains(marker))
            .map(|l| l.at)
    }

    /// The value after `KEY=` on the first line that starts with it (e.g. `MQVMM-NPROC`).
    pub fn value_of(&self, key: &str) -> Option<String> {
        let prefix = format!("{key}=");
        self.lines.iter().find_map(|l| {
            l.line
                .trim()
                .strip_prefix(&prefix)
                .map(|v| v.trim().to_string())
        })
    }

    /// Everything printed, for failure messages.
    pub fn transcript(&self) -> String {
        self.lines
            .iter()
            .map(|l| format!("[{:7.3}] {}\n", l.at.as_secs_f64(), l.line))
            .collect()
    }
}

/// Reads a child's stdout and stderr line by line (one thread each) into `tx`, timestamped
/// from `started`. The threads end when the streams close or the receiver is gone.
pub fn read_lines_of(
    child: &mut std::process::Child,
    started: Instant,
    tx: std::sync::mpsc::Sender<TimedLine>,
) -> Vec<std::thread::JoinHandle<()>> {
    use std::io::BufRead;
    let streams: [Option<Box<dyn std::io::Read + Send>>; 2] = [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
    ];
    streams
        .into_iter()
        .flatten()
        .map(|stream| {
            let tx = tx.clone();
            std::thread::spawn(move || {
                let mut reader = std::io::BufReader::new(stream);
                let mut buf = Vec::new();
                while matches!(reader.read_until(b'\n', &mut buf), Ok(n) if n > 0) {
                    let line = String::from_utf8_lossy(&buf)
                        .trim_end_matches(['\n', '\r'])
                        .to_string();
                    buf.clear();
                    let at = started.elapsed();
                    if tx.send(TimedLine { at, line }).is_err() {
                        break;
                    }
                }
            })
        })
        .collect()
}

/// Run a VMM (or any program printing a guest console) to completion, bounded by `timeout`
/// (killed on expiry), collecting its stdout and stderr line by line with arrival times.
/// Lines are also echoed to the test's stdout as they arrive when `echo` is set.
pub fn run_guest(mut cmd: Command, timeout: Duration, echo: bool) -> std::io::Result<GuestRun> {
    use std::sync::mpsc;

    let started = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let (tx, rx) = mpsc::channel::<TimedLine>();
    let readers = read_lines_of(&mut child, started, tx);
    let mut lines = Vec::new();
    let mut timed_out = false;
    let deadline = started + timeout;
    loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(line) => {
                if echo {
                    println!("{}", line.line);
                }
                lines.push(line);
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        if !timed_out && Instant::now() > deadline {
            timed_out = true;
            let _ = child.kill();
        }
    }
    let status = child.wait()?;
    for reader in readers {
        let _ = reader.join();
    }
    Ok(GuestRun {
        lines,
        code: status.code(),
        elapsed: started.elapsed(),
        timed_out,
    })
}

#[cfg(test)]
mod tests {
    use super::{shell_quote, GuestRun, TimedLine};
    use std::time::Duration;

    #[test]
    fn shell_quote_leaves_plain_words_and_quotes_the_rest() {
        assert_eq!(shell_quote("/work/a-b_c.d"), "/work/a-b_c.d");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's $HOME"), r"'it'\''s $HOME'");
    }

    #[test]
    fn shell_quote_round_trips_through_sh() {
        let nasty = "a'b\"c $x `y` \\ *";
        let out = std::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(format!("printf %s {}", shell_quote(nasty)))
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), nasty);
    }

    #[test]
    fn guest_run_finds_markers_and_values() {
        let line = |at: u64, text: &str| TimedLine {
            at: Duration::from_millis(at),
            line: text.to_string(),
        };
        let run = GuestRun {
            lines: vec![
                line(10, "[    0.1] booting"),
                line(20, "MQVMM-NPROC=2"),
                line(30, "MQVMM-MEMTOTAL-KB=481184 "),
                line(40, "MQVMM-READY"),
            ],
            code: Some(0),
            elapsed: Duration::from_millis(50),
            timed_out: false,
        };
        assert_eq!(run.time_of("MQVMM-READY"), Some(Duration::from_millis(40)));
        assert_eq!(run.time_of("MQVMM-NOPE"), None);
        assert_eq!(run.value_of("MQVMM-NPROC").as_deref(), Some("2"));
        assert_eq!(run.value_of("MQVMM-MEMTOTAL-KB").as_deref(), Some("481184"));
        assert_eq!(run.value_of("MQVMM-UPTIME"), None);
        assert!(run.transcript().contains("MQVMM-READY"));
    }
}
