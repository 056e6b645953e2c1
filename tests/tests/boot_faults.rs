//! Hostile guests and broken hosts with a real guest, where KVM works (directly, or inside the
//! nested rig's L1, where these tests are root):
//! - the seccomp filters are on by default: a forbidden system call from a queue-pair worker
//!   ends mqvmm with a line naming the call and the thread (the hidden `--seccomp-selftest`
//!   makes the worker issue one); the same run with `--seccomp=off` warns loudly and lives;
//! - the operator deletes the tap while the guest runs: the guest sees NO-CARRIER, the next
//!   `ethtool -L` is refused, mqvmm logs one error line, uses no CPU for it, and stays up and
//!   responsive on the console.

use std::process::Command;
use std::time::{Duration, Instant};

use mqvmm_tests::console::GuestConsole;
use mqvmm_tests::rig::{self, GUEST_IP, HOST_IP};
use mqvmm_tests::{netns, skip};

const STEP: Duration = Duration::from_secs(60);
const BOOT: Duration = Duration::from_secs(180);

fn sh(cmd: &str) {
    let status = Command::new("sh")
        .args(["-c", cmd])
        .status()
        .expect("run sh");
    assert!(status.success(), "`{cmd}` failed: {status}");
}

/// Root and /dev/net/tun where the body runs (inside L1 the tests are root).
fn requirements() -> bool {
    if !skip::require_kvm_env() || !skip::require_guest_images() || !skip::require_binary("mqvmm") {
        return false;
    }
    if rig::in_l1() || rig::mode() == rig::Mode::Nested {
        return true;
    }
    skip::require_root() && skip::require_tun()
}

/// A persistent multiqueue tap with the host's address; removed on drop if still there.
struct HostTap {
    name: String,
}

impl HostTap {
    fn new(name: &str) -> HostTap {
        let _ = Command::new("ip").args(["link", "del", name]).status();
        sh(&format!(
            "ip tuntap add dev {name} mode tap multi_queue vnet_hdr && ip addr add {HOST_IP}/24 dev {name} && ip link set {name} up"
        ));
        HostTap {
            name: name.to_string(),
        }
    }

    fn attached(&self) -> u32 {
        netns::tun_info(&self.name)
            .unwrap_or_else(|e| panic!("netlink query of {}: {e}", self.name))
            .num_queues
    }
}

impl Drop for HostTap {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.name])
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// mqvmm on `tap` with 2 vCPUs; `guest_extra` goes to the guest's command line.
fn mqvmm_cmd(tap: &HostTap, queues: u16, guest_extra: &str, extra: &[&str]) -> Command {
    let images = rig::guest_images();
    let mut cmd = Command::new(rig::bin_path("mqvmm"));
    cmd.arg("--kernel")
        .arg(&images.vmlinux)
        .arg("--initramfs")
        .arg(&images.initramfs)
        .args(["--cpus", "2", "--memory", "512"])
        .args([
            "--cmdline",
            &format!("console=ttyS0 quiet panic=-1 mqvmm.ip={GUEST_IP}/24 {guest_extra}"),
        ])
        .args(["--net", &format!("tap={},queues={queues}", tap.name)])
        .args(extra);
    cmd
}

/// Waits for the guest's readiness marker, then until its shell answers.
fn wait_for_shell(console: &mut GuestConsole) {
    if console.wait_for("MQVMM-READY", BOOT).is_none() {
        panic!("guest never became ready:\n{}", console.transcript());
    }
    let deadline = Instant::now() + STEP;
    loop {
        console.send("echo MQSYNC:$((20+22))\n").expect("type");
        if console
            .wait_for("MQSYNC:42", Duration::from_secs(3))
            .is_some()
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "guest shell does not answer:\n{}",
            console.transcript()
        );
    }
}

#[test]
fn forbidden_syscall_in_a_queue_pair_worker_kills_mqvmm_naming_the_syscall() {
    if !requirements() {
        return;
    }
    rig::in_kvm_env(
        "forbidden_syscall_in_a_queue_pair_worker_kills_mqvmm_naming_the_syscall",
        || {
            let tap = HostTap::new("mqsec0");
            // The guest's driver activates the device at boot: net-pair0 starts, enters its
            // filter and issues openat(2).
            let cmd = mqvmm_cmd(&tap, 2, "", &["--seccomp-selftest", "net-pair"]);
            let run = rig::run_guest(cmd, BOOT, false).expect("start mqvmm");
            let transcript = run.transcript();
            assert!(!run.timed_out, "mqvmm was not stopped:\n{transcript}");
            assert_eq!(
                run.code,
                Some(159),
                "exit code is not 128 + SIGSYS:\n{transcript}"
            );
            assert!(
                transcript
                    .contains("mqvmm: seccomp violation: syscall 257 (openat) in thread net-pair0"),
                "no line naming the syscall and the thread:\n{transcript}"
            );
            assert!(
                run.time_of("MQVMM-READY").is_none(),
                "the guest got to userspace: the worker was not stopped at activation:\n{transcript}"
            );
        },
    );
}

#[test]
fn with_seccomp_off_the_same_call_succeeds_and_mqvmm_warns_loudly() {
    if !requirements() {
        return;
    }
    rig::in_kvm_env(
        "with_seccomp_off_the_same_call_succeeds_and_mqvmm_warns_loudly",
        || {
            let tap = HostTap::new("mqsec1");
            let cmd = mqvmm_cmd(
                &tap,
                2,
                "mqvmm.scenario=poweroff",
                &[
                    "--seccomp=off",
                    "--seccomp-selftest",
                    "net-pair",
                    "--log-level",
                    "error",
                ],
            );
            let run = rig::run_guest(cmd, BOOT, false).expect("start mqvmm");
            let transcript = run.transcript();
            assert_eq!(run.code, Some(0), "{transcript}");
            assert!(run.time_of("MQVMM-READY").is_some(), "{transcript}");
            assert!(
                transcript.contains("--seccomp=off: NO SYSTEM CALL FILTERS"),
                "no loud warning even at --log-level error:\n{transcript}"
            );
            assert!(!transcript.contains("seccomp violation"), "{transcript}");
        },
    );
}

/// utime + stime of `pid` in clock ticks, and of its threads whose name starts with `prefix`.
fn cpu_ticks(pid: u32, prefix: &str) -> (u64, u64) {
    fn ticks(stat: &str) -> u64 {
        // After the parenthesised name: field 3 (state) first; utime and stime are 14 and 15.
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let field = |i: usize| {
            fields
                .get(i - 3)
                .and_then(|f| f.parse::<u64>().ok())
                .unwrap_or(0)
        };
        field(14) + field(15)
    }
    let process = ticks(&std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default());
    let mut threads = 0;
    if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for task in dir.flatten() {
            let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            if comm.starts_with(prefix) {
                threads +=
                    ticks(&std::fs::read_to_string(task.path().join("stat")).unwrap_or_default());
            }
        }
    }
    (process, threads)
}

/// CPU ticks used by mqvmm, and by its device threads, over `window`.
fn cpu_over(pid: u32, window: Duration) -> (u64, u64) {
    let (p0, t0) = cpu_ticks(pid, "net-");
    std::thread::sleep(window);
    let (p1, t1) = cpu_ticks(pid, "net-");
    (p1.saturating_sub(p0), t1.saturating_sub(t0))
}

fn metrics_line(console: &mut GuestConsole) -> String {
    let pid = console.pid() as i32;
    // SAFETY: kill only sends a signal to the mqvmm child this test started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGUSR1) }, 0);
    console
        .wait_for("mqvmm-metrics:", Duration::from_secs(10))
        .unwrap_or_else(|| panic!("no metrics line after SIGUSR1:\n{}", console.transcript()))
}

#[test]
fn deleting_the_tap_under_a_running_guest_takes_its_link_down_and_mqvmm_stays_up() {
    if !requirements() {
        return;
    }
    rig::in_kvm_env(
        "deleting_the_tap_under_a_running_guest_takes_its_link_down_and_mqvmm_stays_up",
        || {
            let tap = HostTap::new("mqfault0");
            let mut console =
                GuestConsole::spawn(mqvmm_cmd(&tap, 4, "", &[])).expect("start mqvmm");
            wait_for_shell(&mut console);
            console.check("ethtool -L eth0 combined 2", STEP);
            assert_eq!(tap.attached(), 2);
            console.check(&format!("ping -c 2 -W 5 {HOST_IP}"), STEP);
            let carrier = console.check("cat /sys/class/net/eth0/carrier", STEP);
            assert_eq!(carrier.trim(), "1", "carrier before");
            let pid = console.pid();
            let window = Duration::from_secs(5);
            let (idle_process, idle_threads) = cpu_over(pid, window);

            // The operator deletes the tap.
            let deleted_at = Instant::now();
            sh(&format!("ip link del {}", tap.name));

            let link = console.check(
                "i=0; while [ \"$(cat /sys/class/net/eth0/carrier)\" != 0 ] && [ $i -lt 150 ]; do sleep 0.2; i=$((i+1)); done; \
                 echo carrier=$(cat /sys/class/net/eth0/carrier); ip link show eth0",
                STEP,
            );
            let noticed = deleted_at.elapsed();
            assert!(
                link.contains("carrier=0") && link.contains("NO-CARRIER"),
                "the guest did not see the link go down:\n{link}\nconsole:\n{}",
                console.transcript()
            );

            // No busy loop: the device threads stay idle; the whole VMM stays near idle.
            let (process, threads) = cpu_over(pid, window);
            println!(
                "timing: tap deleted: guest saw NO-CARRIER after {:.2} s; mqvmm CPU over {} s: {idle_process} ticks before, {process} after (device threads {idle_threads} before, {threads} after)",
                noticed.as_secs_f64(),
                window.as_secs()
            );
            assert!(
                threads <= 5,
                "device threads used {threads} ticks in {} s after the tap was deleted",
                window.as_secs()
            );
            assert!(
                process <= idle_process * 2 + 25,
                "mqvmm used {process} ticks in {} s after the tap was deleted ({idle_process} before)",
                window.as_secs()
            );

            // The next VQ_PAIRS_SET fails at TUNSETQUEUE: refused, nothing changes.
            let set = console
                .run("ethtool -L eth0 combined 3", STEP)
                .expect("run ethtool");
            assert_ne!(set.status, 0, "ethtool -L succeeded:\n{}", set.output);
            let l = console.check("ethtool -l eth0", STEP);
            assert!(
                l.split("Current hardware settings:")
                    .nth(1)
                    .is_some_and(|c| c.contains("Combined:\t2")),
                "the guest's queue count changed:\n{l}"
            );

            // mqvmm logged the loss once, and its counters agree.
            let transcript = console.transcript();
            let lost_lines = transcript
                .lines()
                .filter(|l| l.contains("mqvmm: error: virtio-net: the tap queue of pair"))
                .count();
            assert_eq!(lost_lines, 1, "error lines about the tap:\n{transcript}");
            let metrics = metrics_line(&mut console);
            assert!(metrics.contains(" link_up=0"), "{metrics}");
            assert!(metrics.contains(" active_pairs=2 "), "{metrics}");
            assert!(metrics.contains(" vq_pairs_set_errors=1 "), "{metrics}");

            // Still up and answering on the console.
            let answer = console.check("echo alive-$((6*7)); uname -r", STEP);
            assert!(answer.contains("alive-42"), "{answer}");
            console.send("poweroff\n").expect("type");
            assert_eq!(
                console.wait_exit(STEP),
                Some(0),
                "mqvmm did not exit 0:\n{}",
                console.transcript()
            );
        },
    );
}

/// On a terminal mqvmm puts it in raw mode and restores it at exit (TCSETS, which glibc
/// follows with TCGETS): the main thread's filter allows both, so the run ends cleanly.
#[test]
fn on_a_terminal_the_filters_let_mqvmm_restore_it_and_exit_cleanly() {
    if !requirements() || !skip::require_program("script") {
        return;
    }
    rig::in_kvm_env(
        "on_a_terminal_the_filters_let_mqvmm_restore_it_and_exit_cleanly",
        || {
            let tap = HostTap::new("mqsec2");
            let mqvmm = mqvmm_cmd(&tap, 2, "mqvmm.scenario=poweroff", &[]);
            let line = std::iter::once(mqvmm.get_program())
                .chain(mqvmm.get_args())
                .map(|a| rig::shell_quote(&a.to_string_lossy()))
                .collect::<Vec<_>>()
                .join(" ");
            // `script` runs the command with a pseudo-terminal as its stdin, stdout and stderr.
            let mut cmd = Command::new("script");
            cmd.args(["-qec", &format!("{line}; echo MQVMM-EXIT=$?"), "/dev/null"]);
            let run = rig::run_guest(cmd, BOOT, false).expect("start script");
            let transcript = run.transcript();
            assert!(run.time_of("MQVMM-READY").is_some(), "{transcript}");
            assert_eq!(
                run.value_of("MQVMM-EXIT").as_deref(),
                Some("0"),
                "mqvmm on a terminal did not exit 0:\n{transcript}"
            );
            assert!(!transcript.contains("seccomp violation"), "{transcript}");
        },
    );
}
