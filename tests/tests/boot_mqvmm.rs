//! mqvmm boots Debian's cloud kernel: directly on KVM, or inside the nested rig.
//! Argument errors are checked on the host itself: mqvmm refuses them before touching KVM.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use mqvmm_tests::{rig, skip};

const BOOT_TIMEOUT: Duration = Duration::from_secs(180);

fn mqvmm() -> Command {
    Command::new(rig::bin_path("mqvmm"))
}

/// Boots `kernel` with the guest initramfs and returns the run; the guest powers itself off.
fn boot(kernel: &Path, cpus: u8, memory_mib: u64, extra_cmdline: &str) -> rig::GuestRun {
    let images = rig::guest_images();
    let mut cmd = mqvmm();
    cmd.arg("--kernel")
        .arg(kernel)
        .arg("--initramfs")
        .arg(&images.initramfs)
        .args(["--cpus", &cpus.to_string()])
        .args(["--memory", &memory_mib.to_string()])
        .args([
            "--cmdline",
            &format!("console=ttyS0 quiet panic=-1 {extra_cmdline}"),
        ]);
    rig::run_guest(cmd, BOOT_TIMEOUT, false).expect("start mqvmm")
}

fn assert_booted(run: &rig::GuestRun, cpus: u8, memory_mib: u64) {
    let transcript = run.transcript();
    assert!(
        !run.timed_out,
        "guest did not finish within {} s:\n{transcript}",
        BOOT_TIMEOUT.as_secs()
    );
    assert!(
        run.time_of("MQVMM-READY").is_some(),
        "no readiness marker:\n{transcript}"
    );
    assert_eq!(
        run.value_of("MQVMM-NPROC"),
        Some(cpus.to_string()),
        "guest saw the wrong number of CPUs:\n{transcript}"
    );
    let mem_kb: u64 = run
        .value_of("MQVMM-MEMTOTAL-KB")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no MemTotal:\n{transcript}"));
    let expected_kb = memory_mib * 1024;
    assert!(
        mem_kb * 10 >= expected_kb * 9 && mem_kb <= expected_kb,
        "MemTotal {mem_kb} kB is not within 10% of {memory_mib} MiB:\n{transcript}"
    );
}

fn print_timing(what: &str, run: &rig::GuestRun) {
    if let Some(ready) = run.time_of("MQVMM-READY") {
        println!(
            "timing: {what}: mqvmm exec to MQVMM-READY {:.2} s wall, guest uptime at the marker {} s, to exit {:.2} s",
            ready.as_secs_f64(),
            run.value_of("MQVMM-UPTIME").unwrap_or_default(),
            run.elapsed.as_secs_f64()
        );
    }
}

#[test]
fn boots_debian_cloud_vmlinux_and_powers_off() {
    if !skip::require_kvm_env() || !skip::require_guest_images() || !skip::require_binary("mqvmm") {
        return;
    }
    rig::in_kvm_env("boots_debian_cloud_vmlinux_and_powers_off", || {
        let images = rig::guest_images();
        let run = boot(&images.vmlinux, 2, 512, "mqvmm.scenario=poweroff");
        assert_booted(&run, 2, 512);
        assert_eq!(
            run.code,
            Some(0),
            "mqvmm did not exit 0 after the guest powered off:\n{}",
            run.transcript()
        );
        print_timing("vmlinux, 2 vCPUs, 512 MiB", &run);
    });
}

#[test]
fn boots_bzimage_with_eight_cpus_and_exits_on_guest_reboot() {
    if !skip::require_kvm_env() || !skip::require_guest_images() || !skip::require_binary("mqvmm") {
        return;
    }
    rig::in_kvm_env(
        "boots_bzimage_with_eight_cpus_and_exits_on_guest_reboot",
        || {
            let images = rig::guest_images();
            // `reboot` goes through busybox init and the ACPI reset register.
            let snippet = rig::base64_encode(b"reboot");
            let run = boot(&images.bzimage, 8, 512, &format!("mqvmm.run={snippet}"));
            assert_booted(&run, 8, 512);
            assert_eq!(
                run.code,
                Some(0),
                "mqvmm did not exit 0 after the guest rebooted:\n{}",
                run.transcript()
            );
            print_timing("bzImage, 8 vCPUs, 512 MiB", &run);
        },
    );
}

/// A minimal ELF64 executable whose entry point executes `ud2` with no usable IDT: the
/// exception cannot be delivered, the CPU triple-faults.
fn triple_fault_kernel(path: &Path) {
    let load_addr: u64 = 0x100_0000;
    let code: &[u8] = &[0x0f, 0x0b]; // ud2
    let mut elf = Vec::new();
    // e_ident: magic, 64-bit, little endian, version 1, System V.
    elf.extend_from_slice(b"\x7fELF\x02\x01\x01\x00");
    elf.extend_from_slice(&[0; 8]);
    elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf.extend_from_slice(&0x3eu16.to_le_bytes()); // EM_X86_64
    elf.extend_from_slice(&1u32.to_le_bytes()); // EV_CURRENT
    elf.extend_from_slice(&load_addr.to_le_bytes()); // e_entry
    elf.extend_from_slice(&64u64.to_le_bytes()); // e_phoff
    elf.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    elf.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    elf.extend_from_slice(&64u16.to_le_bytes()); // e_ehsize
    elf.extend_from_slice(&56u16.to_le_bytes()); // e_phentsize
    elf.extend_from_slice(&1u16.to_le_bytes()); // e_phnum
    elf.extend_from_slice(&64u16.to_le_bytes()); // e_shentsize
    elf.extend_from_slice(&0u16.to_le_bytes()); // e_shnum
    elf.extend_from_slice(&0u16.to_le_bytes()); // e_shstrndx
    let data_offset = 64u64 + 56;
    elf.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    elf.extend_from_slice(&5u32.to_le_bytes()); // R+X
    elf.extend_from_slice(&data_offset.to_le_bytes()); // p_offset
    elf.extend_from_slice(&load_addr.to_le_bytes()); // p_vaddr
    elf.extend_from_slice(&load_addr.to_le_bytes()); // p_paddr
    elf.extend_from_slice(&(code.len() as u64).to_le_bytes()); // p_filesz
    elf.extend_from_slice(&(code.len() as u64).to_le_bytes()); // p_memsz
    elf.extend_from_slice(&0x1000u64.to_le_bytes()); // p_align
    elf.extend_from_slice(code);
    std::fs::write(path, elf).expect("write test kernel");
}

#[test]
fn guest_triple_fault_ends_mqvmm_with_an_error_paragraph() {
    if !skip::require_kvm_env() || !skip::require_binary("mqvmm") {
        return;
    }
    rig::in_kvm_env(
        "guest_triple_fault_ends_mqvmm_with_an_error_paragraph",
        || {
            let dir = scratch("triple");
            let kernel = dir.join("ud2.elf");
            triple_fault_kernel(&kernel);
            let mut cmd = mqvmm();
            cmd.arg("--kernel").arg(&kernel);
            let run = rig::run_guest(cmd, Duration::from_secs(60), false).expect("start mqvmm");
            let transcript = run.transcript();
            assert!(!run.timed_out, "mqvmm did not stop:\n{transcript}");
            assert_eq!(run.code, Some(1), "{transcript}");
            assert!(
                transcript.contains("triple-faulted") && transcript.contains("RIP 0x"),
                "error does not explain the triple fault:\n{transcript}"
            );
            assert!(
                !transcript.contains("panicked"),
                "mqvmm panicked:\n{transcript}"
            );
        },
    );
}

#[test]
fn memory_too_small_for_the_kernel_is_a_usage_error() {
    if !skip::require_kvm_env() || !skip::require_guest_images() || !skip::require_binary("mqvmm") {
        return;
    }
    rig::in_kvm_env("memory_too_small_for_the_kernel_is_a_usage_error", || {
        let images = rig::guest_images();
        let out = mqvmm()
            .arg("--kernel")
            .arg(&images.vmlinux)
            .args(["--memory", "16"])
            .output()
            .expect("run mqvmm");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains("too small"), "{stderr}");
        assert_one_error_line(&stderr);
    });
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mqvmm-boot-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// Exactly one `mqvmm: error:` line, and nothing else but warnings (running as root in CI,
/// mqvmm rightly warns that it holds capabilities it does not need).
fn assert_one_error_line(stderr: &str) {
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    let errors = lines
        .iter()
        .filter(|l| l.starts_with("mqvmm: error:"))
        .count();
    let other = lines
        .iter()
        .filter(|l| !l.starts_with("mqvmm: error:") && !l.starts_with("mqvmm: warning:"))
        .count();
    assert!(
        errors == 1 && other == 0,
        "expected exactly one error line:\n{stderr}"
    );
}

/// Runs mqvmm with `args` and checks the exit code 2 and a single line that contains `needle`.
fn assert_usage_error(args: &[&std::ffi::OsStr], needle: &str) {
    let out = mqvmm().args(args).output().expect("run mqvmm");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(2),
        "expected exit code 2 for {args:?}, stderr:\n{stderr}"
    );
    assert!(
        stderr.contains(needle),
        "error for {args:?} does not mention {needle:?}:\n{stderr}"
    );
    assert_one_error_line(&stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn wrong_kernel_path_is_a_clear_usage_error() {
    if !skip::require_binary("mqvmm") {
        return;
    }
    let missing = scratch("missing").join("no-such-vmlinux");
    assert_usage_error(
        &["--kernel".as_ref(), missing.as_os_str()],
        "cannot open kernel image",
    );
}

#[test]
fn corrupt_kernel_files_are_clear_usage_errors() {
    if !skip::require_binary("mqvmm") {
        return;
    }
    let dir = scratch("corrupt");
    let garbage = dir.join("garbage");
    std::fs::File::create(&garbage)
        .and_then(|mut f| f.write_all(&[0x5a; 4096]))
        .expect("write");
    assert_usage_error(
        &["--kernel".as_ref(), garbage.as_os_str()],
        "neither an ELF vmlinux nor a bzImage",
    );
    let empty = dir.join("empty");
    std::fs::write(&empty, b"").expect("write");
    assert_usage_error(
        &["--kernel".as_ref(), empty.as_os_str()],
        "neither an ELF vmlinux nor a bzImage",
    );
}

#[test]
fn bad_cpu_count_and_missing_initramfs_are_usage_errors() {
    if !skip::require_binary("mqvmm") {
        return;
    }
    let out = mqvmm()
        .args(["--kernel", "/bin/true", "--cpus", "0"])
        .output()
        .expect("run mqvmm");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--cpus"));
    let dir = scratch("initrd");
    let kernel = dir.join("ud2.elf");
    triple_fault_kernel(&kernel);
    let missing = dir.join("no-initramfs");
    assert_usage_error(
        &[
            "--kernel".as_ref(),
            kernel.as_os_str(),
            "--initramfs".as_ref(),
            missing.as_os_str(),
        ],
        "cannot open initramfs",
    );
}
