//! Component tests of the privilege split: `mqvmm-launch` end to end (with the tap-fdcheck
//! stand-in and with the real mqvmm), and mqvmm's refusal of fds it cannot use.
//! Use the release binaries (`cargo build --release`); tests that create taps need root and
//! /dev/net/tun and run in a network namespace of their own. Each skips with one line otherwise.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::io::{BufRead, Read};
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use mqvmm_tests::netns::{self, FdCheck, NOBODY};
use tap::{MultiQueueTap, TapConfig};
use virtio_net::MAX_QUEUE_PAIRS;

const FDCHECK: &str = env!("CARGO_BIN_EXE_tap-fdcheck");
const PROBE: &str = env!("CARGO_BIN_EXE_same-uid-probe");
const TIMEOUT: Duration = Duration::from_secs(30);

fn launcher() -> Option<PathBuf> {
    let bin = netns::release_bin("mqvmm-launch");
    if bin.is_none() {
        eprintln!("skip: mqvmm-launch is not built (cargo build --release)");
    }
    bin
}

fn mqvmm() -> Option<PathBuf> {
    let bin = netns::release_bin("mqvmm");
    if bin.is_none() {
        eprintln!("skip: mqvmm is not built (cargo build --release)");
    }
    bin
}

/// The launcher with `args`, running `vmm` (the launcher's default, the `mqvmm` next to it, if
/// `None`), without /dev/kvm when the host has none.
fn launch(launcher: &Path, vmm: Option<&Path>, args: &[&str], vmm_args: &[&str]) -> Command {
    let mut cmd = Command::new(launcher);
    cmd.args(args);
    if let Some(vmm) = vmm {
        cmd.arg("--mqvmm").arg(vmm);
    }
    if !Path::new("/dev/kvm").exists() {
        cmd.arg("--no-kvm");
    }
    cmd.arg("--").args(vmm_args);
    cmd
}

/// The launcher with `args`, running tap-fdcheck instead of mqvmm.
fn launch_fdcheck(launcher: &Path, args: &[&str], vmm_args: &[&str]) -> Command {
    launch(launcher, Some(Path::new(FDCHECK)), args, vmm_args)
}

fn run(mut cmd: Command) -> Output {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    netns::wait_with_timeout(cmd.spawn().expect("spawn"), TIMEOUT)
}

/// Exit code `code` and exactly one line on stderr, starting with `prefix` and containing `needle`.
fn assert_one_line_error(out: &Output, code: i32, prefix: &str, needle: &str) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(code),
        "exit status; stderr: {stderr}"
    );
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with(prefix)).collect();
    assert_eq!(errors.len(), 1, "want one {prefix:?} line: {stderr}");
    assert!(
        errors[0].contains(needle),
        "{:?} lacks {needle:?}",
        errors[0]
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    errors[0].to_owned()
}

/// A directory of its own under the system temp dir, with `mode`, removed on drop.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn new(name: &str, mode: u32) -> ScratchDir {
        let dir = std::env::temp_dir().join(format!("mqvmm-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(mode)).unwrap();
        ScratchDir(dir)
    }

    /// `name` in the directory, as a string for command lines.
    fn file(&self, name: &str) -> String {
        self.0.join(name).display().to_string()
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------------------------------------
// mqvmm-launch with the tap-fdcheck stand-in.

#[test]
fn launcher_runs_the_vmm_as_nobody_without_capabilities() {
    let Some(launcher) = launcher() else { return };
    if !netns::require_netns() {
        return;
    }
    netns::run_in_netns(
        "launcher_runs_the_vmm_as_nobody_without_capabilities",
        || {
            let tap = "mql0";
            // Images only root can reach: the launcher opens them, the VMM reads them as nobody.
            let images = ScratchDir::new("launch-images", 0o700);
            let (kernel, initramfs) = (images.file("vmlinux"), images.file("initrd"));
            std::fs::write(&kernel, b"KERNEL-1").unwrap();
            std::fs::write(&initramfs, b"INITRD-1").unwrap();
            let initramfs_arg = format!("--initramfs={initramfs}");
            let mut cmd = launch_fdcheck(
                &launcher,
                &[
                    "--tap",
                    tap,
                    "--queues",
                    "4",
                    "--user",
                    "nobody",
                    "--mac",
                    "52:54:00:12:34:56",
                ],
                &["--kernel", &kernel, "--cpus", "2", &initramfs_arg],
            );
            // An fd the launcher inherits without CLOEXEC must not reach the VMM.
            let stray = std::fs::File::open("/proc/self/status").unwrap();
            netns::pass_fds(&mut cmd, &[(stray.as_raw_fd(), 50)], &[]);
            cmd.stderr(Stdio::piped());
            let mut vmm = FdCheck::spawn(cmd);
            let ready = vmm.ready.clone();

            // What the kernel says about the running VMM process.
            let status = netns::proc_status(vmm.pid()).unwrap();
            assert_eq!(status["Name"], "tap-fdcheck");
            assert_eq!(netns::single_id(&status, "Uid"), NOBODY);
            assert_eq!(netns::single_id(&status, "Gid"), NOBODY);
            assert_eq!(status["Groups"], "");
            assert_eq!(status["NoNewPrivs"], "1");
            for key in ["CapEff", "CapPrm", "CapInh", "CapAmb", "CapBnd"] {
                assert_eq!(
                    netns::cap_mask(&status, key),
                    0,
                    "{key} of the VMM: {status:?}"
                );
            }

            // The command line it got, and exactly the fds it needs.
            assert_eq!(ready["tap"], tap);
            assert_eq!(ready["queues"], "4");
            assert_eq!(ready["mac"], "52:54:00:12:34:56");
            let mut expected: BTreeSet<RawFd> = [0, 1, 2].into();
            for fd in ready["fds"].split(',') {
                expected.insert(fd.parse().unwrap());
            }
            if Path::new("/dev/kvm").exists() {
                assert_eq!(ready["kvm"], "/dev/kvm");
                expected.insert(ready["kvmfd"].parse().unwrap());
            } else {
                assert_eq!(ready["kvm"], "none");
            }
            // The images, readable through their fds by a VMM that could not open them.
            assert_eq!(ready["kernel"], kernel);
            assert_eq!(ready["kernelhead"], "4b45524e454c2d31", "KERNEL-1");
            assert_eq!(ready["initramfs"], initramfs);
            assert_eq!(ready["initramfshead"], "494e495452442d31", "INITRD-1");
            expected.insert(ready["kernelfd"].parse().unwrap());
            expected.insert(ready["initramfsfd"].parse().unwrap());
            // The tap's eBPF steering map (4 queues), which nobody can map and publish into.
            expected.insert(ready["steermap"].parse().unwrap());
            assert_eq!(ready["steer"], "ok");
            let open: BTreeSet<RawFd> = ready["open"]
                .split(',')
                .map(|s| s.parse().unwrap())
                .collect();
            assert_eq!(open, expected, "fds open in the VMM (50 is the stray one)");

            // The tap: created non-persistent and owned by root, so the VMM cannot add queues.
            let info = netns::tun_info(tap).unwrap();
            assert_eq!(
                (
                    info.owner,
                    info.persist,
                    info.multi_queue,
                    info.vnet_hdr,
                    info.pi
                ),
                (Some(0), false, true, true, false)
            );
            assert_eq!(info.num_queues, 4);

            // Unprivileged, through its fds alone, the VMM switches queues.
            assert_eq!(vmm.cmd("detach 3"), "ok");
            assert_eq!(
                (
                    netns::tx_queue_count(tap).unwrap(),
                    netns::tun_info(tap).unwrap().num_disabled
                ),
                (3, 1)
            );
            assert_eq!(vmm.cmd("attach 3"), "ok");
            assert_eq!(netns::tx_queue_count(tap).unwrap(), 4);

            let stderr_pipe = vmm.child.stderr.take();
            vmm.quit();
            let mut log = String::new();
            stderr_pipe.unwrap().read_to_string(&mut log).unwrap();
            assert!(
                log.contains(&format!(
                    "mqvmm-launch: tap {tap}: created (non-persistent, owner uid 0)"
                )),
                "{log}"
            );
            assert!(log.contains("mqvmm-launch: running as uid 65534 gid 65534: no supplementary groups, no capabilities"), "{log}");
            assert!(log.contains("--net fds="), "{log}");
            let (kernel_fd, initramfs_fd) = (&ready["kernelfd"], &ready["initramfsfd"]);
            assert!(
                log.contains(&format!(
                    "mqvmm-launch: kernel image {kernel} on fd {kernel_fd}"
                )) && log.contains(&format!(
                    "mqvmm-launch: initramfs {initramfs} on fd {initramfs_fd}"
                )),
                "{log}"
            );
            let exec = log.lines().find(|l| l.contains(": exec ")).unwrap_or("");
            assert!(
                exec.contains(&format!(
                    " --kernel-fd {kernel_fd} --cpus 2 --initramfs-fd {initramfs_fd} "
                )) && !exec.contains(&kernel),
                "the paths are replaced by fds, in place: {exec}"
            );
            assert!(
                log.contains(&format!(
                    "mqvmm-launch: tap {tap}: eBPF steering attached; its map on fd {}",
                    ready["steermap"]
                )),
                "{log}"
            );
            assert!(
                log.lines().count() <= 7,
                "the launcher should log a line per thing it opens, the drop and the exec: {log}"
            );
            assert!(
                netns::if_index(tap).is_err(),
                "the launcher's tap outlived the VMM"
            );
        },
    );
}

#[test]
fn launcher_never_passes_a_standard_stream_fd_number() {
    let Some(launcher) = launcher() else { return };
    if !netns::require_netns() {
        return;
    }
    netns::run_in_netns("launcher_never_passes_a_standard_stream_fd_number", || {
        let dir = ScratchDir::new("launch-stdfds", 0o755);
        let kernel = dir.file("vmlinux");
        std::fs::write(&kernel, b"KERNEL-1").unwrap();
        let initramfs = format!("--initramfs={kernel}");
        let mut cmd = launch_fdcheck(
            &launcher,
            &["--tap", "mqstd0", "--queues", "2", "--user", "nobody"],
            &["--kernel", &kernel, &initramfs],
        );
        // Started with stdin and stdout closed: the first files it opens would get 0 and 1.
        netns::pass_fds(&mut cmd, &[], &[0, 1]);
        let out = run(cmd);
        let log = String::from_utf8_lossy(&out.stderr);
        // The stand-in (its stdin at EOF) validated the tap fds and quit.
        assert!(out.status.success(), "{}: {log}", out.status);
        let exec = log
            .lines()
            .find(|l| l.starts_with("mqvmm-launch: exec "))
            .unwrap_or_else(|| panic!("no exec line: {log}"));
        let words: Vec<&str> = exec.split_whitespace().collect();
        let mut passed = Vec::new();
        for (option, value) in words.iter().zip(words.iter().skip(1)) {
            match *option {
                "--kernel-fd" | "--initramfs-fd" | "--kvm-fd" => passed.push(*value),
                "--net" => {
                    passed.extend(
                        value
                            .trim_start_matches("fds=")
                            .split(',')
                            .take_while(|p| !p.contains('=')),
                    );
                    passed.extend(
                        value
                            .split(',')
                            .filter_map(|p| p.strip_prefix("steer-map=")),
                    );
                }
                _ => {}
            }
        }
        let passed: Vec<RawFd> = passed.iter().map(|fd| fd.parse().unwrap()).collect();
        // Two queues, the images, the steering map, and /dev/kvm if there is one.
        let expected = if Path::new("/dev/kvm").exists() { 6 } else { 5 };
        assert_eq!(passed.len(), expected, "{exec}");
        assert!(passed.iter().all(|&fd| fd > 2), "{passed:?} in {exec}");
    });
}

#[test]
fn launcher_adopts_an_existing_multiqueue_tap() {
    let Some(launcher) = launcher() else { return };
    if !netns::require_netns() {
        return;
    }
    netns::run_in_netns("launcher_adopts_an_existing_multiqueue_tap", || {
        let tap = "mqadopt0";
        let cfg = TapConfig {
            name: Some(tap.into()),
            queues: 1,
            owner: Some(0),
            persist: true,
            ..TapConfig::default()
        };
        drop(MultiQueueTap::create(&cfg).unwrap());
        let mut cmd = launch_fdcheck(
            &launcher,
            &[
                "--tap", tap, "--queues", "2", "--user", "65534", "--group", "65534",
            ],
            &[],
        );
        cmd.stderr(Stdio::piped());
        let mut vmm = FdCheck::spawn(cmd);
        assert_eq!(
            (vmm.ready["tap"].as_str(), vmm.ready["queues"].as_str()),
            (tap, "2")
        );
        assert_eq!(vmm.ready["uid"], "65534,65534,65534,65534");
        assert_eq!(netns::tun_info(tap).unwrap().num_queues, 2);
        let log = {
            let pipe = vmm.child.stderr.take();
            vmm.quit();
            let mut s = String::new();
            pipe.unwrap().read_to_string(&mut s).unwrap();
            s
        };
        assert!(
            log.contains(&format!("tap {tap}: adopted the existing multiqueue tap")),
            "{log}"
        );
        // Persistent, so it stays; the launcher did not change that.
        let info = netns::tun_info(tap).unwrap();
        assert_eq!((info.persist, info.num_queues), (true, 0));
    });
}

#[test]
fn launcher_runs_the_vmm_as_root_only_when_told() {
    let Some(launcher) = launcher() else { return };
    if !netns::require_netns() {
        return;
    }
    netns::run_in_netns("launcher_runs_the_vmm_as_root_only_when_told", || {
        for (user, group) in [("0", None), ("nobody", Some("0"))] {
            let mut args = vec!["--tap", "mqroot0", "--queues", "1", "--user", user];
            if let Some(g) = group {
                args.extend(["--group", g]);
            }
            let out = run(launch_fdcheck(&launcher, &args, &[]));
            assert_one_line_error(&out, 2, "mqvmm-launch: error:", "refusing to run mqvmm");
            assert!(
                netns::if_index("mqroot0").is_err(),
                "tap created before refusing"
            );
        }
        // Root runs mqvmm only, not whatever --mqvmm names.
        let root = ["--tap", "mqroot0", "--queues", "1", "--user", "root"];
        for other in ["/bin/sh", FDCHECK] {
            let out = run(launch(&launcher, Some(Path::new(other)), &root, &[]));
            let canonical = std::fs::canonicalize(other).unwrap();
            assert_one_line_error(
                &out,
                2,
                "mqvmm-launch: error:",
                &format!(
                    "refusing to run {} as root: only the mqvmm next to mqvmm-launch",
                    canonical.display()
                ),
            );
            assert!(
                netns::if_index("mqroot0").is_err(),
                "tap created before refusing"
            );
        }

        // A launcher with the stand-in as its own mqvmm: its default, also named through a
        // symlink, runs as root (with no capabilities).
        let dir = ScratchDir::new("launch-root", 0o755);
        let own_launcher = dir.0.join("mqvmm-launch");
        std::fs::copy(&launcher, &own_launcher).unwrap();
        std::fs::copy(FDCHECK, dir.0.join("mqvmm")).unwrap();
        std::os::unix::fs::symlink(dir.0.join("mqvmm"), dir.0.join("vmm-link")).unwrap();
        let own = std::fs::canonicalize(dir.0.join("mqvmm")).unwrap();
        for vmm in [None, Some(dir.0.join("vmm-link"))] {
            let mut cmd = launch(&own_launcher, vmm.as_deref(), &root, &[]);
            cmd.stderr(Stdio::piped());
            let mut vmm = FdCheck::spawn(cmd);
            assert_eq!(vmm.ready["uid"], "0,0,0,0");
            let status = netns::proc_status(vmm.pid()).unwrap();
            for key in ["CapEff", "CapPrm", "CapInh", "CapAmb", "CapBnd"] {
                assert_eq!(netns::cap_mask(&status, key), 0, "{key} of a root VMM");
            }
            assert_eq!(vmm.cmd("state"), "attached=1");
            let stderr_pipe = vmm.child.stderr.take();
            vmm.quit();
            let mut log = String::new();
            stderr_pipe.unwrap().read_to_string(&mut log).unwrap();
            assert!(
                log.contains(&format!("mqvmm-launch: exec {} --", own.display())),
                "the checked, canonical path is executed: {log}"
            );
        }
    });
}

#[test]
fn launcher_takes_only_an_absolute_mqvmm_path() {
    let Some(launcher) = launcher() else { return };
    let check = || {
        let fdcheck_dir = Path::new(FDCHECK).parent().unwrap();
        for relative in ["tap-fdcheck", "./tap-fdcheck"] {
            // The relative name would resolve, from here or through PATH, to the stand-in.
            let mut cmd = Command::new(&launcher);
            cmd.args(["--tap", "mqrel0", "--queues", "1", "--user", "nobody"])
                .args(["--no-kvm", "--mqvmm", relative])
                .current_dir(fdcheck_dir)
                .env("PATH", fdcheck_dir);
            let out = run(cmd);
            assert_one_line_error(
                &out,
                2,
                "mqvmm-launch: error:",
                &format!("--mqvmm {relative} is not an absolute path"),
            );
            assert!(netns::if_index("mqrel0").is_err(), "a tap was created");
        }
    };
    if netns::skip_reason().is_none() {
        netns::run_in_netns("launcher_takes_only_an_absolute_mqvmm_path", check);
    } else {
        check();
    }
}

#[test]
fn launcher_passes_seccomp_off_only_when_allowed() {
    let Some(launcher) = launcher() else { return };
    if !netns::require_netns() {
        return;
    }
    netns::run_in_netns("launcher_passes_seccomp_off_only_when_allowed", || {
        let args = ["--tap", "mqsec0", "--queues", "1", "--user", "nobody"];
        for vmm_args in [&["--seccomp", "off"][..], &["--seccomp=log"]] {
            let out = run(launch_fdcheck(&launcher, &args, vmm_args));
            assert_one_line_error(
                &out,
                2,
                "mqvmm-launch: error:",
                "leaves mqvmm without working system call filters: pass --allow-unsandboxed",
            );
            assert!(netns::if_index("mqsec0").is_err(), "a tap was created");
        }
        let mut cmd = launch_fdcheck(
            &launcher,
            &[&args[..], &["--allow-unsandboxed"]].concat(),
            &["--seccomp=off"],
        );
        cmd.stderr(Stdio::piped());
        let mut vmm = FdCheck::spawn(cmd);
        assert_eq!(vmm.ready["uid"], "65534,65534,65534,65534");
        let stderr_pipe = vmm.child.stderr.take();
        vmm.quit();
        let mut log = String::new();
        stderr_pipe.unwrap().read_to_string(&mut log).unwrap();
        let exec = log.lines().find(|l| l.contains(": exec ")).unwrap_or("");
        assert!(exec.contains(" --seccomp=off "), "{log}");
    });
}

#[test]
fn launcher_setup_failures_exit_1_with_one_line() {
    let Some(launcher) = launcher() else { return };
    if !netns::require_netns() {
        return;
    }
    netns::run_in_netns("launcher_setup_failures_exit_1_with_one_line", || {
        use libc::{IFF_NO_PI, IFF_TAP, IFF_VNET_HDR};
        let _single = netns::open_raw_tun("sq0", IFF_TAP | IFF_NO_PI | IFF_VNET_HDR).unwrap();
        let out = run(launch_fdcheck(
            &launcher,
            &["--tap", "sq0", "--queues", "2", "--user", "nobody"],
            &[],
        ));
        let line = assert_one_line_error(
            &out,
            1,
            "mqvmm-launch: error:",
            "cannot set up 2 queues of tap sq0",
        );
        assert!(
            line.contains("interface sq0 exists but is not a multiqueue tap"),
            "{line}"
        );

        let mut cmd = Command::new(&launcher);
        cmd.args([
            "--tap",
            "mqx0",
            "--queues",
            "1",
            "--user",
            "nobody",
            "--mqvmm",
            "/nonexistent/mqvmm",
        ]);
        let out = run(cmd);
        assert_one_line_error(
            &out,
            1,
            "mqvmm-launch: error:",
            "mqvmm binary /nonexistent/mqvmm not found",
        );

        // A VMM binary the target user may not execute: the failure names path and uid.
        let dir = std::env::temp_dir().join(format!("mqvmm-launch-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let vmm = dir.join("mqvmm");
        std::fs::copy(FDCHECK, &vmm).unwrap();
        std::fs::set_permissions(&vmm, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .unwrap();
        let mut cmd = Command::new(&launcher);
        cmd.args([
            "--tap", "mqx0", "--queues", "1", "--user", "nobody", "--no-kvm", "--mqvmm",
        ])
        .arg(&vmm);
        let out = run(cmd);
        let _ = std::fs::remove_dir_all(&dir);
        let line = assert_one_line_error(
            &out,
            1,
            "mqvmm-launch: error:",
            &format!("cannot execute {} as uid 65534", vmm.display()),
        );
        assert!(line.contains("Permission denied"), "{line}");
        assert!(
            netns::if_index("mqx0").is_err(),
            "the tap outlived the failed launch"
        );
    });
}

#[test]
fn launcher_refuses_images_it_cannot_open_before_creating_the_tap() {
    let Some(launcher) = launcher() else { return };
    if !netns::require_netns() {
        return;
    }
    netns::run_in_netns(
        "launcher_refuses_images_it_cannot_open_before_creating_the_tap",
        || {
            let dir = ScratchDir::new("launch-bad-images", 0o755);
            let fifo = dir.file("fifo");
            let fifo_c = std::ffi::CString::new(fifo.as_str()).unwrap();
            // SAFETY: mkfifo reads a NUL-terminated path that outlives the call.
            assert_eq!(unsafe { libc::mkfifo(fifo_c.as_ptr(), 0o644) }, 0);
            let fifo_arg = format!("--initramfs={fifo}");
            let cases: &[(&[&str], &str)] = &[
                (
                    &["--kernel", "/nonexistent/vmlinux"],
                    "cannot open kernel image /nonexistent/vmlinux: No such file or directory",
                ),
                (
                    &["--kernel", FDCHECK, "--initramfs", "/"],
                    "initramfs / is not a regular file",
                ),
                // A FIFO with no writer: refused, not waited on.
                (
                    &["--kernel", FDCHECK, &fifo_arg],
                    &format!("initramfs {fifo} is not a regular file"),
                ),
            ];
            for (vmm_args, needle) in cases {
                let out = run(launch_fdcheck(
                    &launcher,
                    &["--tap", "mqimg0", "--queues", "1", "--user", "nobody"],
                    vmm_args,
                ));
                assert_one_line_error(&out, 2, "mqvmm-launch: error:", needle);
                assert!(
                    netns::if_index("mqimg0").is_err(),
                    "tap created before refusing {vmm_args:?}"
                );
            }
        },
    );
}

/// `cmd` running as uid and gid 65534 with no supplementary groups and (uid 0 left, no
/// keep-caps) no capabilities; without no_new_privs, so setuid bits and file capabilities work.
fn as_nobody(mut cmd: Command) -> Command {
    std::os::unix::process::CommandExt::uid(&mut cmd, NOBODY);
    std::os::unix::process::CommandExt::gid(&mut cmd, NOBODY);
    cmd
}

/// Gives `path` the file capability cap_net_admin+ep (what `setcap cap_net_admin+ep` writes).
fn set_file_cap_net_admin(path: &Path) {
    // struct vfs_cap_data, revision 2: magic_etc, then permitted/inheritable for caps 0-31
    // and 32-63, little endian.
    const VFS_CAP_REVISION_2: u32 = 0x0200_0000;
    const VFS_CAP_FLAGS_EFFECTIVE: u32 = 1;
    const CAP_NET_ADMIN: u32 = 12;
    let words = [
        VFS_CAP_REVISION_2 | VFS_CAP_FLAGS_EFFECTIVE,
        1 << CAP_NET_ADMIN,
        0,
        0,
        0,
    ];
    let value: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: the path and the value are valid for reads of their lengths for the call.
    let rc = unsafe {
        libc::setxattr(
            c_path.as_ptr(),
            c"security.capability".as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(rc, 0, "setxattr: {}", std::io::Error::last_os_error());
}

#[test]
fn launcher_refuses_callers_without_root_or_cap_net_admin() {
    let Some(launcher) = launcher() else { return };
    if !netns::require_netns() {
        return;
    }
    netns::run_in_netns(
        "launcher_refuses_callers_without_root_or_cap_net_admin",
        || {
            let args = ["--tap", "mqpriv0", "--queues", "1", "--user", "nobody"];
            let out = run(as_nobody(launch_fdcheck(&launcher, &args, &[])));
            assert_one_line_error(
                &out,
                2,
                "mqvmm-launch: error:",
                "mqvmm-launch needs root or CAP_NET_ADMIN (running as uid 65534 with effective \
                 capabilities 0x0)",
            );
            assert!(netns::if_index("mqpriv0").is_err(), "a tap was created");

            // Copies of the launcher that gain privileges when nobody runs them.
            let dir = ScratchDir::new("launch-setid", 0o755);
            let cases: [(&str, u32, &str); 3] = [
                (
                    "setuid",
                    0o4755,
                    "(uid 65534 euid 0, gid 65534 egid 65534, AT_SECURE 1)",
                ),
                (
                    "setgid",
                    0o2755,
                    "(uid 65534 euid 65534, gid 65534 egid 0, AT_SECURE 1)",
                ),
                (
                    "filecap",
                    0o755,
                    "(uid 65534 euid 65534, gid 65534 egid 65534, AT_SECURE 1)",
                ),
            ];
            for (name, mode, ids) in cases {
                let copy = dir.0.join(name);
                std::fs::copy(&launcher, &copy).unwrap();
                std::fs::set_permissions(&copy, std::os::unix::fs::PermissionsExt::from_mode(mode))
                    .unwrap();
                if name == "filecap" {
                    set_file_cap_net_admin(&copy);
                }
                let out = run(as_nobody(launch_fdcheck(&copy, &args, &[])));
                let line = assert_one_line_error(
                    &out,
                    2,
                    "mqvmm-launch: error:",
                    "refusing to run setuid, setgid or with file capabilities",
                );
                assert!(line.contains(ids), "{name}: {line}");
                assert_eq!(
                    String::from_utf8_lossy(&out.stderr).lines().count(),
                    1,
                    "{name}: nothing but the refusal"
                );
                assert!(
                    netns::if_index("mqpriv0").is_err(),
                    "{name}: a tap was created"
                );
            }
        },
    );
}

#[test]
fn launcher_runs_for_a_caller_with_only_cap_net_admin() {
    let Some(launcher) = launcher() else { return };
    if !netns::require_netns() || !mqvmm_tests::skip::require_program("setpriv") {
        return;
    }
    netns::run_in_netns("launcher_runs_for_a_caller_with_only_cap_net_admin", || {
        netns::world_usable_tun().unwrap();
        let tap = "mqcap0";
        // What the README suggests for running the launcher without root.
        let mut cmd = Command::new("setpriv");
        cmd.args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
            .args(["--inh-caps", "+net_admin", "--ambient-caps", "+net_admin"])
            .arg(&launcher)
            .args([
                "--tap", tap, "--queues", "2", "--user", "nobody", "--no-kvm",
            ])
            .args(["--mqvmm", FDCHECK])
            .stderr(Stdio::piped());
        let mut vmm = FdCheck::spawn(cmd);
        let ready = vmm.ready.clone();
        assert_eq!(ready["uid"], "65534,65534,65534,65534");
        assert_eq!(ready["groups"], "none");
        assert_eq!(ready["nnp"], "1");
        for key in ["capinh", "capprm", "capeff", "capamb"] {
            assert_eq!(
                u64::from_str_radix(&ready[key], 16),
                Ok(0),
                "{key}: {ready:?}"
            );
        }
        let info = netns::tun_info(tap).unwrap();
        assert_eq!((info.owner, info.num_queues), (Some(NOBODY), 2));
        assert_eq!(vmm.cmd("detach 1"), "ok");
        let stderr_pipe = vmm.child.stderr.take();
        vmm.quit();
        let mut log = String::new();
        stderr_pipe.unwrap().read_to_string(&mut log).unwrap();
        assert!(
            log.contains(
                "running as uid 65534 gid 65534: no supplementary groups, no capabilities, \
                 no_new_privs (bounding set left as it was: emptying it needs CAP_SETPCAP)"
            ),
            "{log}"
        );
        // No CAP_BPF: steering is off, said in one line, and the launch goes on without it.
        assert_eq!(ready["steermap"], "none");
        let off: Vec<&str> = log.lines().filter(|l| l.contains("steering")).collect();
        assert_eq!(off.len(), 1, "{log}");
        assert!(
            off[0].starts_with(&format!("mqvmm-launch: tap {tap}: steering is off: ")),
            "{log}"
        );
    });
}

/// The launcher's log and the stand-in VMM's `ready` fields for a launch on a new tap.
fn launch_and_report(
    launcher: &Path,
    tap: &str,
    queues: &str,
    extra: &[&str],
) -> (String, std::collections::HashMap<String, String>) {
    let mut args = vec!["--tap", tap, "--queues", queues, "--user", "nobody"];
    args.extend(extra);
    let mut cmd = launch_fdcheck(launcher, &args, &[]);
    cmd.stderr(Stdio::piped());
    let mut vmm = FdCheck::spawn(cmd);
    let ready = vmm.ready.clone();
    let stderr_pipe = vmm.child.stderr.take();
    vmm.quit();
    let mut log = String::new();
    stderr_pipe.unwrap().read_to_string(&mut log).unwrap();
    (log, ready)
}

fn open_fds(ready: &std::collections::HashMap<String, String>) -> BTreeSet<RawFd> {
    ready["open"]
        .split(',')
        .map(|s| s.parse().unwrap())
        .collect()
}

#[test]
fn launcher_passes_the_steering_map_as_its_only_extra_fd_unless_told_not_to() {
    let Some(launcher) = launcher() else { return };
    if !netns::require_netns() {
        return;
    }
    netns::run_in_netns(
        "launcher_passes_the_steering_map_as_its_only_extra_fd_unless_told_not_to",
        || {
            let (log, steered) = launch_and_report(&launcher, "mqsm0", "4", &[]);
            let map: RawFd = steered["steermap"]
                .parse()
                .unwrap_or_else(|_| panic!("no steering map passed: {log}"));
            assert!(map > 2, "{map}");
            assert_eq!(steered["steer"], "ok", "mapped and published as nobody");
            let exec = log.lines().find(|l| l.contains(": exec ")).unwrap_or("");
            assert!(exec.contains(&format!(",steer-map={map}")), "{exec}");
            let attached: Vec<&str> = log.lines().filter(|l| l.contains("steering")).collect();
            assert_eq!(
                attached,
                [format!(
                    "mqvmm-launch: tap mqsm0: eBPF steering attached; its map on fd {map}"
                )],
                "{log}"
            );

            let (log, plain) = launch_and_report(&launcher, "mqsm1", "4", &["--no-steering"]);
            assert_eq!(plain["steermap"], "none");
            assert!(!log.contains("steer"), "{log}");
            let mut with_map = open_fds(&plain);
            with_map.insert(map);
            assert_eq!(open_fds(&steered), with_map, "the map is the only extra fd");

            // One queue: nothing to steer between, and nothing said about it.
            let (log, single) = launch_and_report(&launcher, "mqsm2", "1", &[]);
            assert_eq!(single["steermap"], "none");
            assert!(!log.contains("steer"), "{log}");
        },
    );
}

#[test]
fn launcher_rejects_bad_arguments_with_exit_2() {
    let Some(launcher) = launcher() else { return };
    let check = || {
        // The device's limit, not the tap's (256 queues).
        let too_many = (MAX_QUEUE_PAIRS + 1).to_string();
        let queue_limit = |queues: &str| {
            format!("{queues} is not a number from 1 to {MAX_QUEUE_PAIRS} (the most queue pairs")
        };
        let cases: &[(&[&str], &str)] = &[
            (&["--tap", "mqbad0", "--user", "nobody"], "--queues"),
            (
                &["--tap", "mqbad0", "--queues", "0", "--user", "nobody"],
                &queue_limit("0"),
            ),
            (
                &["--tap", "mqbad0", "--queues", &too_many, "--user", "nobody"],
                &queue_limit(&too_many),
            ),
            (
                &[
                    "--tap", "mqbad0", "--queues", "2", "--user", "nobody", "--mac", "zz",
                ],
                "not a MAC address",
            ),
            (
                &[
                    "--tap",
                    "mqbad0",
                    "--queues",
                    "2",
                    "--user",
                    "nobody",
                    "--mac",
                    "01:00:5e:00:00:01",
                ],
                "multicast",
            ),
            (
                &[
                    "--tap",
                    "mqbad0",
                    "--queues",
                    "2",
                    "--user",
                    "no-such-user-mqvmm",
                ],
                "unknown user \"no-such-user-mqvmm\"",
            ),
            (
                &[
                    "--tap",
                    "mqbad0",
                    "--queues",
                    "2",
                    "--user",
                    "nobody",
                    "--group",
                    "no-such-group-mqvmm",
                ],
                "unknown group",
            ),
            (
                &["--tap", "mqbad0", "--queues", "2", "--user", "0"],
                "refusing to run mqvmm as root",
            ),
            (
                &["--tap", "a/b", "--queues", "2", "--user", "nobody"],
                "invalid interface name \"a/b\"",
            ),
            (
                &[
                    "--tap", "mqbad0", "--queues", "2", "--user", "nobody", "--", "--net", "fds=3",
                ],
                "--net is added by mqvmm-launch",
            ),
            (
                &[
                    "--tap",
                    "mqbad0",
                    "--queues",
                    "2",
                    "--user",
                    "nobody",
                    "--",
                    "--kvm-fd=3",
                ],
                "--kvm-fd is added by mqvmm-launch",
            ),
            (
                &[
                    "--tap",
                    "mqbad0",
                    "--queues",
                    "2",
                    "--user",
                    "nobody",
                    "--",
                    "--kernel-fd",
                    "3",
                ],
                "--kernel-fd is added by mqvmm-launch",
            ),
            (
                &[
                    "--tap",
                    "mqbad0",
                    "--queues",
                    "2",
                    "--user",
                    "nobody",
                    "--",
                    "--initramfs-fd=4",
                ],
                "--initramfs-fd is added by mqvmm-launch",
            ),
            (
                &[
                    "--tap", "mqbad0", "--queues", "2", "--user", "nobody", "--", "--kernel",
                ],
                "--kernel after -- needs a value",
            ),
        ];
        for (args, needle) in cases {
            let mut cmd = Command::new(&launcher);
            // Launcher options first: after a `--` in `args`, everything is mqvmm's.
            cmd.args(["--mqvmm", FDCHECK]).args(*args);
            let out = run(cmd);
            assert_one_line_error(&out, 2, "mqvmm-launch: error:", needle);
            assert_eq!(
                String::from_utf8_lossy(&out.stderr).lines().count(),
                1,
                "{args:?}"
            );
        }
        assert!(
            netns::if_index("mqbad0").is_err(),
            "a refused launch created its tap"
        );
        // --help: exit 0 with the operator's example.
        let out = run({
            let mut c = Command::new(&launcher);
            c.arg("--help");
            c
        });
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success());
        for needle in [
            "mqvmm-launch --tap mq0 --queues 4 --user nobody",
            "ip addr add",
            "ip link set mq0 up",
            "--kvm-fd",
        ] {
            assert!(help.contains(needle), "--help lacks {needle:?}");
        }
    };
    // These fail before anything is created; as root, still keep any accident out of the host.
    if netns::skip_reason().is_none() {
        netns::run_in_netns("launcher_rejects_bad_arguments_with_exit_2", check);
    } else {
        check();
    }
}

// ---------------------------------------------------------------------------------------------
// The real mqvmm.

/// A guest kernel from `make resources`, if there is one.
fn guest_kernel() -> Option<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(build) = std::env::var_os("MQVMM_BUILD") {
        dirs.push(PathBuf::from(build));
    }
    dirs.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("../build"));
    dirs.iter()
        .flat_map(|d| [d.join("guest/vmlinux"), d.join("guest/bzImage")])
        .find(|p| p.is_file())
}

/// What the tests of the real mqvmm need: the launcher, mqvmm, /dev/kvm, a guest kernel and
/// network namespaces. Prints one `skip:` line and returns `None` if anything is missing.
fn real_mqvmm_setup() -> Option<(PathBuf, PathBuf, PathBuf)> {
    let launcher = launcher()?;
    let mqvmm = mqvmm()?;
    if !netns::require_netns() {
        return None;
    }
    if !Path::new("/dev/kvm").exists() {
        eprintln!("skip: needs /dev/kvm");
        return None;
    }
    let Some(kernel) = guest_kernel() else {
        eprintln!("skip: no guest kernel (make resources, or set MQVMM_BUILD)");
        return None;
    };
    Some((launcher, mqvmm, kernel))
}

/// The real mqvmm started by the launcher as `nobody` on a 2-queue tap, with its log (the
/// launcher's and mqvmm's stderr) and console drained by threads so it never blocks on them.
struct LaunchedVmm {
    child: std::process::Child,
    log: std::sync::Arc<std::sync::Mutex<String>>,
    log_drain: std::thread::JoinHandle<()>,
    console_drain: std::thread::JoinHandle<String>,
}

impl LaunchedVmm {
    /// `mqvmm-launch --tap TAP --queues 2 --user nobody --mqvmm MQVMM -- --memory 128
    /// --cmdline 'console=ttyS0 panic=-1' VMM_ARGS`.
    fn spawn(launcher: &Path, mqvmm: &Path, tap: &str, vmm_args: &[&OsStr]) -> LaunchedVmm {
        let mut cmd = Command::new(launcher);
        cmd.args(["--tap", tap, "--queues", "2", "--user", "nobody", "--mqvmm"])
            .arg(mqvmm)
            .args([
                "--",
                "--memory",
                "128",
                "--cmdline",
                "console=ttyS0 panic=-1",
            ])
            .args(vmm_args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn mqvmm-launch");
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let stderr = child.stderr.take().expect("piped stderr");
        let log_drain = {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    let mut log = log.lock().unwrap_or_else(|e| e.into_inner());
                    log.push_str(&line);
                    log.push('\n');
                }
            })
        };
        let mut stdout = child.stdout.take().expect("piped stdout");
        let console_drain = std::thread::spawn(move || {
            let mut s = Vec::new();
            let _ = stdout.read_to_end(&mut s);
            String::from_utf8_lossy(&s).into_owned()
        });
        LaunchedVmm {
            child,
            log,
            log_drain,
            console_drain,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log(&self) -> String {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Waits up to `timeout` for `needle` in the log; false if it never came or the process
    /// ended first.
    fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log().contains(needle) {
                return true;
            }
            if Instant::now() > deadline || !matches!(self.child.try_wait(), Ok(None)) {
                // One last look: the line may have come with the exit.
                std::thread::sleep(Duration::from_millis(50));
                return self.log().contains(needle);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// /proc/PID/status as soon as the process is mqvmm (its credentials are final from exec
    /// on), `None` if it never got there within 10 s.
    fn status_once_mqvmm(&self) -> Option<std::collections::HashMap<String, String>> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let status = netns::proc_status(self.pid())
                .ok()
                .filter(|s| s.get("State").is_some_and(|st| !st.starts_with('Z')));
            match status {
                Some(s) if s["Name"] == "mqvmm" => return Some(s),
                Some(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(2))
                }
                _ => return None,
            }
        }
    }

    /// The tap queue fds the launcher passed (from its exec line).
    fn tap_fds(&self) -> Vec<RawFd> {
        let log = self.log();
        let Some(net) = log
            .lines()
            .filter(|l| l.starts_with("mqvmm-launch: exec "))
            .find_map(|l| l.split_once("--net fds=").map(|(_, rest)| rest.to_owned()))
        else {
            panic!("no exec line with --net fds= in the log:\n{log}");
        };
        net.split(',')
            .map_while(|part| part.split_whitespace().next()?.parse().ok())
            .collect()
    }

    /// Kills it; returns how it ended, its log and its console.
    fn stop(self) -> (std::process::ExitStatus, String, String) {
        let LaunchedVmm {
            mut child,
            log,
            log_drain,
            console_drain,
        } = self;
        let _ = child.kill();
        let exit = child.wait().expect("wait for mqvmm");
        let _ = log_drain.join();
        let console = console_drain.join().unwrap_or_default();
        let log = log.lock().unwrap_or_else(|e| e.into_inner()).clone();
        (exit, log, console)
    }
}

#[test]
fn launcher_runs_the_real_mqvmm_unprivileged() {
    let Some((launcher, mqvmm, kernel)) = real_mqvmm_setup() else {
        return;
    };
    netns::run_in_netns("launcher_runs_the_real_mqvmm_unprivileged", || {
        let vmm = LaunchedVmm::spawn(
            &launcher,
            &mqvmm,
            "mqreal0",
            &["--kernel".as_ref(), kernel.as_os_str()],
        );
        let pid = vmm.pid();
        let status = vmm.status_once_mqvmm();
        let fd_targets: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| {
                d.filter_map(|e| {
                    Some(
                        std::fs::read_link(e.ok()?.path())
                            .ok()?
                            .display()
                            .to_string(),
                    )
                })
                .collect()
            })
            .unwrap_or_default();
        let (exit, log, console) = vmm.stop();
        let Some(status) = status else {
            panic!("mqvmm never ran ({exit}); stderr:\n{log}\nconsole:\n{console}");
        };
        assert_eq!(netns::single_id(&status, "Uid"), NOBODY, "{log}");
        assert_eq!(netns::single_id(&status, "Gid"), NOBODY);
        assert_eq!(status["NoNewPrivs"], "1");
        for key in ["CapEff", "CapPrm", "CapInh", "CapAmb", "CapBnd"] {
            assert_eq!(
                netns::cap_mask(&status, key),
                0,
                "{key} of the running mqvmm"
            );
        }
        // It runs on the launcher's fds (it could open neither itself).
        assert!(fd_targets.iter().any(|t| t == "/dev/kvm"), "{fd_targets:?}");
        assert!(
            fd_targets.iter().filter(|t| *t == "/dev/net/tun").count() >= 2,
            "{fd_targets:?}"
        );
        assert!(
            !log.contains("holds capabilities"),
            "mqvmm warned about capabilities: {log}"
        );
    });
}

#[test]
fn an_unprivileged_mqvmm_boots_images_only_root_can_open() {
    let Some((launcher, mqvmm, kernel)) = real_mqvmm_setup() else {
        return;
    };
    netns::run_in_netns(
        "an_unprivileged_mqvmm_boots_images_only_root_can_open",
        || {
            let dir = ScratchDir::new("root-only-images", 0o700);
            let (vmlinux, initrd) = (dir.file("vmlinux"), dir.file("initrd"));
            std::fs::copy(&kernel, &vmlinux).unwrap();
            std::fs::write(&initrd, vec![0u8; 4096]).unwrap();
            let mut vmm = LaunchedVmm::spawn(
                &launcher,
                &mqvmm,
                "mqimg1",
                &[
                    "--log-level".as_ref(),
                    "info".as_ref(),
                    "--kernel".as_ref(),
                    vmlinux.as_ref(),
                    "--initramfs".as_ref(),
                    initrd.as_ref(),
                ],
            );
            // Logged once the kernel and the initramfs are in guest memory.
            let loaded = vmm.wait_for_log("mqvmm: info: kernel fd ", TIMEOUT);
            let (exit, log, console) = vmm.stop();
            assert!(
                loaded,
                "mqvmm as nobody did not load the images ({exit}):\n{log}\nconsole:\n{console}"
            );
            assert!(!log.contains("Permission denied"), "{log}");
            let fd_of = |what: &str, path: &str| -> String {
                let prefix = format!("mqvmm-launch: {what} {path} on fd ");
                log.lines()
                    .find_map(|l| l.strip_prefix(&prefix))
                    .unwrap_or_else(|| panic!("no line {prefix:?}:\n{log}"))
                    .to_owned()
            };
            let (kernel_fd, initrd_fd) =
                (fd_of("kernel image", &vmlinux), fd_of("initramfs", &initrd));
            let loaded_line = log
                .lines()
                .find(|l| l.starts_with("mqvmm: info: kernel fd "))
                .unwrap_or_default();
            assert!(
                loaded_line.starts_with(&format!("mqvmm: info: kernel fd {kernel_fd} ("))
                    && loaded_line.contains("; initramfs 4096 bytes at "),
                "{loaded_line}"
            );
            assert_ne!(kernel_fd, initrd_fd);
        },
    );
}

#[test]
fn another_process_of_the_vmm_uid_cannot_take_its_fds() {
    let Some((launcher, mqvmm, kernel)) = real_mqvmm_setup() else {
        return;
    };
    netns::run_in_netns("another_process_of_the_vmm_uid_cannot_take_its_fds", || {
        let mut vmm = LaunchedVmm::spawn(
            &launcher,
            &mqvmm,
            "mqdump0",
            &[
                "--log-level".as_ref(),
                "info".as_ref(),
                "--kernel".as_ref(),
                kernel.as_os_str(),
            ],
        );
        // mqvmm logs this line after making itself non-dumpable, before it builds the VM.
        let started = vmm.wait_for_log("mqvmm: info: starting as uid 65534", TIMEOUT);
        let pid = vmm.pid();
        let tap_fds = vmm.tap_fds();
        let status_owner = std::os::unix::fs::MetadataExt::uid(
            &std::fs::metadata(format!("/proc/{pid}/status")).expect("stat /proc/PID/status"),
        );
        let probe = Command::new(PROBE)
            .arg(format!("{NOBODY}:{NOBODY}"))
            .arg(pid.to_string())
            .arg(tap_fds[0].to_string())
            .output()
            .expect("run same-uid-probe");
        let still_running = matches!(vmm.child.try_wait(), Ok(None));
        let (exit, log, console) = vmm.stop();
        assert!(
            started && still_running,
            "mqvmm did not start or did not keep running ({exit}):\n{log}\nconsole:\n{console}"
        );
        let report = String::from_utf8_lossy(&probe.stdout);
        assert!(probe.status.success(), "{report} {probe:?}");
        let fields = netns::parse_fields(&report);
        // The pidfd is fine (it only names the process); the fd behind it is not.
        assert_eq!(fields["pidfd_open"], "ok", "{report}");
        assert_eq!(
            fields["pidfd_getfd"],
            format!("errno:{}", libc::EPERM),
            "a process of uid 65534 copied mqvmm's tap fd {}: {report}",
            tap_fds[0]
        );
        assert_eq!(
            fields["proc_fd"],
            format!("errno:{}", libc::EACCES),
            "a process of uid 65534 listed /proc/{pid}/fd: {report}"
        );
        // The kernel's account of it: a non-dumpable process's /proc files belong to root.
        assert_eq!(
            status_owner, 0,
            "owner of /proc/{pid}/status, mqvmm running as 65534"
        );
    });
}

// ---------------------------------------------------------------------------------------------
// mqvmm refuses fds it cannot use: exit 2, one line naming the fd.

/// Runs `mqvmm ARGS` with `pass` fds inherited at the given numbers and `closed` fds closed.
fn mqvmm_with(mqvmm: &Path, args: &[&str], pass: &[(RawFd, RawFd)], closed: &[RawFd]) -> Output {
    let mut cmd = Command::new(mqvmm);
    cmd.args(args);
    netns::pass_fds(&mut cmd, pass, closed);
    run(cmd)
}

/// Runs `mqvmm --kernel <existing file> --net fds=<fds>` with `pass` fds inherited at the given
/// numbers and `closed` fds closed.
fn mqvmm_with_fds(mqvmm: &Path, pass: &[(RawFd, RawFd)], closed: &[RawFd], fds: &str) -> Output {
    // Any existing file: --net is validated before the kernel is read.
    let net = format!("fds={fds}");
    mqvmm_with(mqvmm, &["--kernel", FDCHECK, "--net", &net], pass, closed)
}

#[test]
fn mqvmm_refuses_image_fds_that_are_not_open_regular_files() {
    let Some(mqvmm) = mqvmm() else { return };
    let (r, _w) = netns::pipe().unwrap();
    let out = mqvmm_with(
        &mqvmm,
        &["--kernel-fd", "100"],
        &[(r.as_raw_fd(), 100)],
        &[],
    );
    let line = assert_one_line_error(&out, 2, "mqvmm: error:", "--kernel-fd 100");
    assert!(
        line.ends_with("is not a regular file: it is a pipe"),
        "{line}"
    );

    let out = mqvmm_with(&mqvmm, &["--kernel-fd", "100"], &[], &[100]);
    assert_one_line_error(
        &out,
        2,
        "mqvmm: error:",
        "--kernel-fd 100 is not an open file descriptor",
    );

    let kernel = std::fs::File::open(FDCHECK).unwrap();
    let out = mqvmm_with(
        &mqvmm,
        &["--kernel-fd", "100", "--initramfs-fd", "100"],
        &[(kernel.as_raw_fd(), 100)],
        &[],
    );
    assert_one_line_error(
        &out,
        2,
        "mqvmm: error:",
        "--kernel-fd and --initramfs-fd are both fd 100",
    );

    // A regular file is adopted and read (a deleted one too: only the fd names it).
    let junk = std::env::temp_dir().join(format!("mqvmm-junk-kernel-{}", std::process::id()));
    std::fs::write(&junk, b"no kernel here").unwrap();
    let file = std::fs::File::open(&junk).unwrap();
    let _ = std::fs::remove_file(&junk);
    let out = mqvmm_with(
        &mqvmm,
        &["--kernel-fd", "100"],
        &[(file.as_raw_fd(), 100)],
        &[],
    );
    assert_one_line_error(
        &out,
        2,
        "mqvmm: error:",
        "fd 100 is neither an ELF vmlinux nor a bzImage",
    );
}

#[test]
fn mqvmm_refuses_a_non_tap_fd() {
    let Some(mqvmm) = mqvmm() else { return };
    let (r, _w) = netns::pipe().unwrap();
    let out = mqvmm_with_fds(&mqvmm, &[(r.as_raw_fd(), 100)], &[], "100");
    let line = assert_one_line_error(&out, 2, "mqvmm: error:", "fd 100 (queue 0)");
    assert!(
        line.contains("is not a tap queue fd: it is a pipe"),
        "{line}"
    );
}

#[test]
fn mqvmm_refuses_a_closed_fd() {
    let Some(mqvmm) = mqvmm() else { return };
    let out = mqvmm_with_fds(&mqvmm, &[], &[100], "100");
    let line = assert_one_line_error(&out, 2, "mqvmm: error:", "fd 100 (queue 0)");
    assert!(line.contains("is not an open file descriptor"), "{line}");
}

#[test]
fn mqvmm_refuses_a_single_queue_tap_fd() {
    let Some(mqvmm) = mqvmm() else { return };
    if !netns::require_netns() {
        return;
    }
    netns::run_in_netns("mqvmm_refuses_a_single_queue_tap_fd", || {
        use libc::{IFF_NO_PI, IFF_TAP, IFF_VNET_HDR};
        let single = netns::open_raw_tun("sq0", IFF_TAP | IFF_NO_PI | IFF_VNET_HDR).unwrap();
        let out = mqvmm_with_fds(&mqvmm, &[(single.as_raw_fd(), 100)], &[], "100");
        let line = assert_one_line_error(&out, 2, "mqvmm: error:", "fd 100 (queue 0)");
        assert!(
            line.contains("belongs to tap sq0, which is single-queue"),
            "{line}"
        );
    });
}

#[test]
fn mqvmm_refuses_fds_of_two_taps() {
    let Some(mqvmm) = mqvmm() else { return };
    if !netns::require_netns() {
        return;
    }
    netns::run_in_netns("mqvmm_refuses_fds_of_two_taps", || {
        let cfg = |name: &str| TapConfig {
            name: Some(name.into()),
            queues: 1,
            owner: Some(0),
            ..TapConfig::default()
        };
        let x = MultiQueueTap::create(&cfg("mqx0")).unwrap();
        let y = MultiQueueTap::create(&cfg("mqy0")).unwrap();
        let pass = [
            (x.queues()[0].as_raw_fd(), 100),
            (y.queues()[0].as_raw_fd(), 101),
        ];
        let out = mqvmm_with_fds(&mqvmm, &pass, &[], "100,101");
        let line = assert_one_line_error(&out, 2, "mqvmm: error:", "fd 101 (queue 1)");
        assert!(
            line.contains("belongs to tap mqy0, but fd 100 (queue 0) belongs to tap mqx0"),
            "{line}"
        );
    });
}

/// `--api-socket PATH`: the launcher creates PATH's missing directory for the VMM's user
/// (mode 0700, owner nobody), leaves an existing one alone, passes `--api-socket PATH` on, and
/// refuses the option after `--`.
#[test]
fn launcher_creates_the_api_socket_directory_for_the_vmm_user_and_passes_the_path() {
    let Some(launcher) = launcher() else { return };
    if !netns::require_netns() {
        return;
    }
    netns::run_in_netns(
        "launcher_creates_the_api_socket_directory_for_the_vmm_user_and_passes_the_path",
        || {
            use std::os::unix::fs::MetadataExt;
            let scratch = ScratchDir::new("api-dir", 0o755);
            let socket = scratch.file("vm1/api.sock");
            let args = ["--tap", "mqapi0", "--queues", "1", "--user", "nobody"];
            for round in ["created", "exists"] {
                let mut cmd = launch_fdcheck(
                    &launcher,
                    &[&args[..], &["--api-socket", &socket]].concat(),
                    &[],
                );
                cmd.stderr(Stdio::piped());
                let mut vmm = FdCheck::spawn(cmd);
                let stderr_pipe = vmm.child.stderr.take();
                vmm.quit();
                let mut log = String::new();
                stderr_pipe.unwrap().read_to_string(&mut log).unwrap();
                let exec = log.lines().find(|l| l.contains(": exec ")).unwrap_or("");
                assert!(exec.ends_with(&format!(" --api-socket {socket}")), "{log}");
                assert!(
                    log.contains(&format!("directory {}: {round}", scratch.file("vm1"))),
                    "{log}"
                );
                let meta = std::fs::metadata(scratch.0.join("vm1")).unwrap();
                assert!(meta.is_dir());
                assert_eq!(meta.mode() & 0o7777, 0o700);
                assert_eq!((meta.uid(), meta.gid()), (NOBODY, NOBODY));
            }
            let out = run(launch_fdcheck(&launcher, &args, &["--api-socket", &socket]));
            assert_one_line_error(
                &out,
                2,
                "mqvmm-launch: error:",
                "--api-socket is added by mqvmm-launch: do not pass it after --",
            );
            let out = run(launch_fdcheck(
                &launcher,
                &[
                    &args[..],
                    &["--api-socket", &scratch.file("no/such/api.sock")],
                ]
                .concat(),
                &[],
            ));
            assert_one_line_error(
                &out,
                1,
                "mqvmm-launch: error:",
                "cannot create the --api-socket directory",
            );
        },
    );
}
