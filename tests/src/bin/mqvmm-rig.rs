//! mqvmm-rig: run mqvmm where KVM works — directly, or inside the nested rig's L1.
//!
//!   mqvmm-rig probe                 print the mode decision and why
//!   mqvmm-rig run [-- MQVMM ARGS]   boot the default guest interactively (what `make run` does)
//!   mqvmm-rig exec -- CMD...        run CMD where KVM works (inside L1 in nested mode)

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Duration;

use clap::{Parser, Subcommand};
use mqvmm_tests::rig::{self, shell_quote, L1Config, Mode, HOST_IP, L1};

#[derive(Parser)]
#[command(
    name = "mqvmm-rig",
    about = "Run mqvmm directly on KVM, or inside the nested test rig (L1) when /dev/kvm cannot run an ordinary guest"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Print whether KVM tests run directly or nested, and why.
    Probe,
    /// Boot the default guest (2 vCPUs, 512 MiB, 2-pair multiqueue net on tap mqtap0 with
    /// 10.0.2.1/24 on the host side, guest 10.0.2.15) with a shell on this terminal.
    Run {
        /// Guest vCPUs.
        #[arg(long, default_value_t = 2)]
        cpus: u32,
        /// Guest memory in MiB.
        #[arg(long, default_value_t = 512)]
        memory: u32,
        /// Queue pairs of the multiqueue tap and the virtio-net device.
        #[arg(long, default_value_t = 2)]
        queues: u32,
        /// Kernel command line (default: BUILD/guest/cmdline plus `quiet`).
        #[arg(long)]
        cmdline: Option<String>,
        /// Extra arguments for mqvmm.
        #[arg(last = true)]
        extra: Vec<String>,
    },
    /// Run a command where KVM works: inside L1 in nested mode (as root, in the host's root
    /// filesystem, read-only but for /tmp, /run and the rig's scratch dir), else directly.
    Exec {
        /// Time bound in seconds.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Probe => {
            let decision = rig::decision();
            println!("{}: {}", decision.mode, decision.reason);
            ExitCode::SUCCESS
        }
        Cmd::Run {
            cpus,
            memory,
            queues,
            cmdline,
            extra,
        } => run(cpus, memory, queues, cmdline, &extra),
        Cmd::Exec { timeout, cmd } => exec(Duration::from_secs(timeout), &cmd),
    }
}

fn exit_code(code: Option<i32>) -> ExitCode {
    match code {
        Some(c) => ExitCode::from(u8::try_from(c.clamp(0, 255)).unwrap_or(1)),
        None => ExitCode::from(1),
    }
}

fn exec(timeout: Duration, cmd: &[String]) -> ExitCode {
    let line = cmd
        .iter()
        .map(|a| shell_quote(a))
        .collect::<Vec<_>>()
        .join(" ");
    let decision = rig::decision();
    if decision.mode == Mode::Direct || rig::in_l1() {
        let status = Command::new("/bin/sh").arg("-c").arg(&line).status();
        return match status {
            Ok(status) => exit_code(status.code()),
            Err(e) => {
                eprintln!("mqvmm-rig: cannot run /bin/sh: {e}");
                ExitCode::from(1)
            }
        };
    }
    let result = rig::try_exec_in_l1_streaming(&line, timeout, &mut |chunk| print!("{chunk}"));
    match result {
        Ok(out) => {
            if out.timed_out {
                eprintln!("mqvmm-rig: timed out after {} s", timeout.as_secs());
            }
            exit_code(out.code)
        }
        Err(e) => {
            eprintln!("mqvmm-rig: {e}");
            ExitCode::from(1)
        }
    }
}

/// The shell script that sets up the tap and starts the VMM (as root, directly or in L1).
fn vmm_script(cpus: u32, memory: u32, queues: u32, cmdline: &str, extra: &[String]) -> String {
    let images = rig::guest_images();
    let launch = rig::bin_path("mqvmm-launch");
    let mqvmm = rig::bin_path("mqvmm");
    let q = |p: &Path| shell_quote(&p.to_string_lossy());
    let mut vm_args = format!(
        "--kernel {} --initramfs {} --cmdline {} --cpus {cpus} --memory {memory}",
        q(&images.vmlinux),
        q(&images.initramfs),
        shell_quote(cmdline)
    );
    for arg in extra {
        vm_args.push(' ');
        vm_args.push_str(&shell_quote(arg));
    }
    let vmm = if launch.is_file() {
        format!(
            "{} --tap mqtap0 --queues {queues} --user nobody -- {vm_args}",
            q(&launch)
        )
    } else {
        // Without mqvmm-launch built: mqvmm opens the tap itself (it runs as root here).
        format!("{} {vm_args} --net tap=mqtap0,queues={queues}", q(&mqvmm))
    };
    format!(
        "set -e\n\
         ip link show mqtap0 >/dev/null 2>&1 || ip tuntap add dev mqtap0 mode tap multi_queue vnet_hdr\n\
         ip addr replace {HOST_IP}/24 dev mqtap0\n\
         ip link set mqtap0 up\n\
         set +e\n\
         echo \"mqvmm-rig: $ {vmm_display}\"\n\
         {vmm}\n",
        vmm_display = vmm.replace(['"', '$', '`', '\\'], "")
    )
}

fn run(cpus: u32, memory: u32, queues: u32, cmdline: Option<String>, extra: &[String]) -> ExitCode {
    let images = rig::guest_images();
    for path in [&images.vmlinux, &images.initramfs] {
        if !path.is_file() {
            eprintln!(
                "mqvmm-rig: {} is missing (run `make resources`)",
                path.display()
            );
            return ExitCode::from(2);
        }
    }
    let cmdline = cmdline.unwrap_or_else(|| format!("{} quiet", images.cmdline));
    let script = vmm_script(cpus, memory, queues, &cmdline, extra);
    let decision = rig::decision();
    if decision.mode == Mode::Direct || rig::in_l1() {
        println!(
            "mqvmm-rig: {} mode ({}); starting the VMM here",
            decision.mode, decision.reason
        );
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("mqvmm-rig: creating the tap mqtap0 needs root");
            return ExitCode::from(2);
        }
        return match Command::new("/bin/sh").arg("-c").arg(&script).status() {
            Ok(status) => exit_code(status.code()),
            Err(e) => {
                eprintln!("mqvmm-rig: cannot run /bin/sh: {e}");
                ExitCode::from(1)
            }
        };
    }

    // Nested: L1 reads the script through its read-only view of the host's root and runs it with
    // the console (this terminal) as controlling tty; the VMM's exit code comes back through the
    // writable scratch share.
    let scratch = rig::scratch_dir();
    let pid = std::process::id();
    let script_path = scratch.join(format!("run-{pid}.sh"));
    let rc_path: PathBuf = scratch.join(format!("run-{pid}.rc"));
    let full = format!(
        "{script}rc=$?\necho $rc > {}\nexit $rc\n",
        shell_quote(&rc_path.to_string_lossy())
    );
    if let Err(e) =
        std::fs::create_dir_all(&scratch).and_then(|()| std::fs::write(&script_path, full))
    {
        eprintln!("mqvmm-rig: cannot write {}: {e}", script_path.display());
        return ExitCode::from(1);
    }
    println!(
        "mqvmm-rig: nested mode ({}); booting L1 under QEMU TCG, the guest's console follows \
         (`poweroff` in the guest ends everything; Ctrl-A x kills QEMU)",
        decision.reason
    );
    let status = L1::run_interactive(&L1Config::from_env(), &script_path);
    let rc = std::fs::read_to_string(&rc_path)
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok());
    let _ = std::fs::remove_file(&script_path);
    let _ = std::fs::remove_file(&rc_path);
    match (status, rc) {
        (Ok(_), Some(rc)) => {
            println!("mqvmm-rig: the VMM exited with {rc}");
            exit_code(Some(rc))
        }
        (Ok(status), None) => {
            eprintln!("mqvmm-rig: L1 ended ({status}) before the VMM reported an exit code");
            ExitCode::from(1)
        }
        (Err(e), _) => {
            eprintln!("mqvmm-rig: {e}");
            ExitCode::from(1)
        }
    }
}
