//! vCPU threads: KVM_RUN and exit dispatch. Exits that end the VM are reported through the
//! [`ExitHandle`] with a paragraph an operator can act on.

use std::sync::Arc;
use std::thread;

use kvm_bindings::{
    KVM_INTERNAL_ERROR_DELIVERY_EV, KVM_INTERNAL_ERROR_EMULATION,
    KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES, KVM_INTERNAL_ERROR_SIMUL_EX,
    KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET,
    KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::bus::Bus;
use crate::exit::{ExitHandle, VmExit};
use crate::seccomp::{Sandbox, ThreadKind};

/// Advice appended to errors that a paravirtual or otherwise limited /dev/kvm produces.
const LIMITED_KVM_HINT: &str = "If this host's /dev/kvm cannot run ordinary guests (e.g. a paravirtual KVM in a sandbox), run the guest in the nested rig instead (see README, \"The nested rig\").";

pub struct Vcpu {
    pub index: u8,
    pub fd: VcpuFd,
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub exit: ExitHandle,
    /// The vCPU thread enters its seccomp filter before its first KVM_RUN.
    pub sandbox: Arc<Sandbox>,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot spawn the thread of vCPU {index}")]
pub struct SpawnError {
    index: u8,
    #[source]
    source: std::io::Error,
}

impl Vcpu {
    pub fn spawn(self) -> Result<thread::JoinHandle<()>, SpawnError> {
        let index = self.index;
        thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || self.run())
            .map_err(|source| SpawnError { index, source })
    }

    fn run(mut self) {
        if let Err(e) = self.sandbox.enter(ThreadKind::Vcpu) {
            let mut message = format!("vCPU {}: {e}", self.index);
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                message.push_str(&format!(": {s}"));
                source = s.source();
            }
            self.exit.request(VmExit::Error(message));
            return;
        }
        loop {
            match self.run_once() {
                Ok(None) => {}
                Ok(Some(exit)) => {
                    self.exit.request(exit);
                    return;
                }
                Err(message) => {
                    self.exit.request(VmExit::Error(message));
                    return;
                }
            }
        }
    }

    /// Runs the vCPU until its next exit; returns the VM exit it causes, if any.
    fn run_once(&mut self) -> Result<Option<VmExit>, String> {
        let index = self.index;
        match self.fd.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                if !self.pio.read(u64::from(port), data) {
                    data.fill(0xff);
                }
                Ok(None)
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                if !self.pio.write(u64::from(port), data) {
                    log::trace!("vCPU {index}: write to unclaimed port {port:#x}");
                }
                Ok(None)
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if !self.mmio.read(addr, data) {
                    log::debug!("vCPU {index}: read of unclaimed MMIO {addr:#x}");
                    data.fill(0xff);
                }
                Ok(None)
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                if !self.mmio.write(addr, data) {
                    log::debug!("vCPU {index}: write to unclaimed MMIO {addr:#x}");
                }
                Ok(None)
            }
            Ok(VcpuExit::Hlt) => {
                // With the in-kernel LAPIC, HLT only exits here if the guest halted with
                // interrupts disabled: it will never run again.
                Err(format!("vCPU {index} halted with interrupts disabled (KVM_EXIT_HLT) at {}; the guest stopped without powering off.", self.where_()))
            }
            Ok(VcpuExit::Shutdown) => Err(format!(
                "vCPU {index}: the guest triple-faulted (KVM_EXIT_SHUTDOWN) at {}. The kernel crashed before it could handle exceptions, or the kernel image is not bootable by the 64-bit boot protocol. {LIMITED_KVM_HINT}",
                self.where_()
            )),
            Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN => Ok(Some(VmExit::PowerOff)),
                KVM_SYSTEM_EVENT_RESET => Ok(Some(VmExit::Reset)),
                KVM_SYSTEM_EVENT_CRASH => Err(format!("vCPU {index}: the guest reported a crash (KVM_SYSTEM_EVENT_CRASH).")),
                other => {
                    log::warn!("vCPU {index}: ignoring KVM system event {other}");
                    Ok(None)
                }
            },
            Ok(VcpuExit::InternalError) => Err(self.internal_error()),
            Ok(VcpuExit::FailEntry(reason, cpu)) => Err(format!(
                "vCPU {index}: KVM could not enter the guest (KVM_EXIT_FAIL_ENTRY, hardware entry failure reason {reason:#x} on host CPU {cpu}) at {}. The vCPU state is invalid for this host's virtualization extensions. {LIMITED_KVM_HINT}",
                self.where_()
            )),
            Ok(VcpuExit::Intr) | Ok(VcpuExit::IrqWindowOpen) => Ok(None),
            Ok(other) => {
                log::warn!("vCPU {index}: unexpected exit {other:?}; resuming");
                Ok(None)
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Ok(None),
            Err(e) => Err(format!("vCPU {index}: KVM_RUN failed: {e}.")),
        }
    }

    /// "RIP 0x... (CR0 ..., CR3 ..., CR4 ..., EFER ...)" for error paragraphs.
    fn where_(&self) -> String {
        let rip = self
            .fd
            .get_regs()
            .map(|r| format!("RIP {:#x}", r.rip))
            .unwrap_or_else(|e| format!("unknown RIP ({e})"));
        match self.fd.get_sregs() {
            Ok(s) => format!(
                "{rip} (CR0 {:#x}, CR3 {:#x}, CR4 {:#x}, EFER {:#x})",
                s.cr0, s.cr3, s.cr4, s.efer
            ),
            Err(_) => rip,
        }
    }

    fn internal_error(&mut self) -> String {
        let index = self.index;
        let run = self.fd.get_kvm_run();
        // SAFETY: KVM set exit_reason to KVM_EXIT_INTERNAL_ERROR (that is how we got here), so
        // the `internal` member of the exit union is the one KVM filled in.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        let suberror = internal.suberror;
        let name = match suberror {
            KVM_INTERNAL_ERROR_EMULATION => "emulation failure",
            KVM_INTERNAL_ERROR_SIMUL_EX => "exception while delivering an exception",
            KVM_INTERNAL_ERROR_DELIVERY_EV => "event delivery failed",
            KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON => "unexpected exit reason",
            _ => "unknown",
        };
        let mut detail = String::new();
        if suberror == KVM_INTERNAL_ERROR_EMULATION {
            // SAFETY: for emulation failures KVM fills the `emulation_failure` layout of the same
            // union (suberror and ndata are shared with `internal`).
            let emulation = unsafe { run.__bindgen_anon_1.emulation_failure };
            if emulation.flags & u64::from(KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES) != 0
            {
                // SAFETY: the flag says the instruction-bytes member of the inner union is valid.
                let insn = unsafe { emulation.__bindgen_anon_1.__bindgen_anon_1 };
                let size = usize::from(insn.insn_size).min(insn.insn_bytes.len());
                let bytes: Vec<String> = insn.insn_bytes[..size]
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect();
                detail = format!(", instruction bytes [{}]", bytes.join(" "));
            }
        }
        let ndata = (internal.ndata as usize).min(internal.data.len());
        if detail.is_empty() && ndata > 0 {
            let data: Vec<String> = internal.data[..ndata]
                .iter()
                .map(|d| format!("{d:#x}"))
                .collect();
            detail = format!(", data [{}]", data.join(", "));
        }
        format!(
            "vCPU {index}: KVM internal error (KVM_EXIT_INTERNAL_ERROR, suberror {suberror}: {name}{detail}) at {}. KVM could not run an instruction of the guest. {LIMITED_KVM_HINT}",
            self.where_()
        )
    }
}
