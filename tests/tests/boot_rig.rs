//! Self-test of the test rig: the mode decision, the command channel to where KVM works, and the
//! L2 guest image booting under Debian's QEMU with KVM there (directly, or inside the nested
//! rig's L1). This is the template for boot tests of mqvmm itself.

use std::process::Command;
use std::time::Duration;

use mqvmm_tests::{rig, skip};

/// Where KVM works, /dev/kvm exists and commands report output and exit codes faithfully.
#[test]
fn kvm_env_runs_commands_and_has_dev_kvm() {
    if !skip::require_kvm_env() {
        return;
    }
    let out = rig::exec_in_kvm_env(
        "test -c /dev/kvm && echo kvm-present; echo to-stderr >&2; exit 3",
        Duration::from_secs(60),
    );
    assert_eq!(
        out.code,
        Some(3),
        "exit code not propagated:\n{}",
        out.output
    );
    assert!(
        out.output.contains("kvm-present"),
        "no /dev/kvm where KVM tests run:\n{}",
        out.output
    );
    assert!(
        out.output.contains("to-stderr"),
        "stderr lost:\n{}",
        out.output
    );
}

/// The guest image boots on real KVM (Debian's QEMU, microvm, 2 vCPUs, 512 MiB) and its init
/// reports what the boot tests assert: readiness, vCPU count and memory size.
#[test]
fn guest_image_boots_under_qemu_kvm() {
    if !skip::require_kvm_env() || !skip::require_qemu() || !skip::require_guest_images() {
        return;
    }
    rig::in_kvm_env("guest_image_boots_under_qemu_kvm", || {
        let images = rig::guest_images();
        let mut qemu = Command::new("qemu-system-x86_64");
        qemu.args(["-enable-kvm", "-cpu", "host", "-M", "microvm"])
            .args(["-smp", "2", "-m", "512", "-nographic", "-no-reboot"])
            .arg("-kernel")
            .arg(&images.bzimage)
            .arg("-initrd")
            .arg(&images.initramfs)
            .args([
                "-append",
                "console=ttyS0 quiet panic=-1 mqvmm.scenario=poweroff",
            ]);
        let run = rig::run_guest(qemu, Duration::from_secs(120), false).expect("start qemu");
        let transcript = run.transcript();
        assert!(
            !run.timed_out,
            "guest did not power off within 120 s:\n{transcript}"
        );
        let ready = run
            .time_of("MQVMM-READY")
            .unwrap_or_else(|| panic!("no readiness marker:\n{transcript}"));
        assert_eq!(
            run.value_of("MQVMM-NPROC").as_deref(),
            Some("2"),
            "{transcript}"
        );
        let mem_kb: u64 = run
            .value_of("MQVMM-MEMTOTAL-KB")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no MemTotal:\n{transcript}"));
        let expected_kb = 512 * 1024;
        assert!(
            mem_kb * 10 >= expected_kb * 9 && mem_kb <= expected_kb,
            "MemTotal {mem_kb} kB is not within 10% of 512 MiB:\n{transcript}"
        );
        assert_eq!(
            run.code,
            Some(0),
            "qemu did not exit 0 after poweroff:\n{transcript}"
        );
        rig::note(&format!(
            "timing: QEMU start to MQVMM-READY {:.2} s wall (guest uptime {} s), to exit {:.2} s",
            ready.as_secs_f64(),
            run.value_of("MQVMM-UPTIME").unwrap_or_default(),
            run.elapsed.as_secs_f64()
        ));
    });
}
