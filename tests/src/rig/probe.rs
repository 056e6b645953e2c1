//! Can this host's /dev/kvm run an ordinary guest?
//!
//! Some sandboxes expose a paravirtual KVM ("PVM") that only runs specially built guests: an
//! unmodified kernel stalls and ends in KVM_EXIT_INTERNAL_ERROR on instructions such as cmpxchg16b,
//! xrstor or int3. The probe runs a few bytes of 64-bit code that use exactly those (with a real
//! IDT for the int3) and then write one byte to an I/O port. Success is that KVM_EXIT_IO with the
//! expected byte; anything else, or no exit within the time bound, means "cannot".

use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_segment, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuExit};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

/// Guest-physical layout of the probe (all inside one identity-mapped 2 MiB page).
const MEM_SIZE: usize = 0x20_0000;
const PML4: usize = 0x1000;
const PDPT: usize = 0x2000;
const PD: usize = 0x3000;
const GDT: usize = 0x4000;
const IDT: usize = 0x5000;
const CODE: usize = 0x6000;
const INT3_HANDLER: usize = 0x6800;
const FAULT_HANDLER: usize = 0x6900;
const STACK_TOP: u64 = 0x1f_0000;

const OK_PORT: u16 = 0x10;
const OK_BYTE: u8 = 0x42;
const FAULT_PORT: u16 = 0x11;

/// How long the vCPU may take to reach the OUT.
const RUN_TIMEOUT: Duration = Duration::from_secs(3);

#[rustfmt::skip]
const PROBE_CODE: &[u8] = &[
    0xbf, 0x00, 0x80, 0x00, 0x00,       // mov edi, 0x8000
    0x31, 0xc0, 0x31, 0xd2,             // xor eax, eax; xor edx, edx
    0x31, 0xdb, 0x31, 0xc9,             // xor ebx, ebx; xor ecx, ecx
    0xf0, 0x48, 0x0f, 0xc7, 0x0f,       // lock cmpxchg16b [rdi]
    0x31, 0xc9,                         // xor ecx, ecx          (XCR0)
    0xb8, 0x03, 0x00, 0x00, 0x00,       // mov eax, 3            (x87 | SSE)
    0x31, 0xd2,                         // xor edx, edx
    0x0f, 0x01, 0xd1,                   // xsetbv
    0xbf, 0x00, 0x90, 0x00, 0x00,       // mov edi, 0x9000       (64-byte aligned area)
    0xb8, 0x03, 0x00, 0x00, 0x00,       // mov eax, 3
    0x31, 0xd2,                         // xor edx, edx
    0x0f, 0xae, 0x27,                   // xsave [rdi]
    0x0f, 0xae, 0x2f,                   // xrstor [rdi]
    0xcc,                               // int3 -> IDT vector 3 -> iretq
    0xb0, OK_BYTE,                      // mov al, OK_BYTE
    0xe6, OK_PORT as u8,                // out OK_PORT, al
    0xf4,                               // hlt
];

#[rustfmt::skip]
const INT3_CODE: &[u8] = &[0x48, 0xcf]; // iretq

#[rustfmt::skip]
const FAULT_CODE: &[u8] = &[
    0xb0, 0xee,                         // mov al, 0xee
    0xe6, FAULT_PORT as u8,             // out FAULT_PORT, al
    0xf4,                               // hlt
];

/// Anonymous host memory backing the probe guest; unmapped on drop.
struct GuestRam {
    addr: *mut u8,
}

impl GuestRam {
    fn new() -> Result<Self, String> {
        // SAFETY: anonymous private mapping with no address hint; the result is checked.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                MEM_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(format!(
                "mmap of {MEM_SIZE} bytes failed: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(GuestRam {
            addr: addr.cast::<u8>(),
        })
    }

    fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: `addr` is a live MEM_SIZE-byte read-write mapping owned by self; the borrow of
        // self keeps it alive and unaliased on the host side for the slice's lifetime.
        unsafe { std::slice::from_raw_parts_mut(self.addr, MEM_SIZE) }
    }

    fn write(&mut self, at: usize, data: &[u8]) {
        self.bytes()[at..at + data.len()].copy_from_slice(data);
    }

    fn write_u64(&mut self, at: usize, value: u64) {
        self.write(at, &value.to_le_bytes());
    }
}

impl Drop for GuestRam {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping created in new(); nothing references it any more
        // (the VM that used it is closed before the GuestRam is dropped).
        unsafe { libc::munmap(self.addr.cast(), MEM_SIZE) };
    }
}

fn segment(selector: u16, code: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 0xb } else { 0x3 },
        present: 1,
        dpl: 0,
        db: u8::from(!code),
        s: 1,
        l: u8::from(code),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

fn idt_gate(handler: usize) -> [u8; 16] {
    let h = handler as u64;
    let mut gate = [0u8; 16];
    gate[0..2].copy_from_slice(&(h as u16).to_le_bytes());
    gate[2..4].copy_from_slice(&0x08u16.to_le_bytes()); // code segment selector
    gate[5] = 0x8e; // present, DPL 0, 64-bit interrupt gate
    gate[6..8].copy_from_slice(&((h >> 16) as u16).to_le_bytes());
    gate[8..12].copy_from_slice(&((h >> 32) as u32).to_le_bytes());
    gate
}

fn build_guest(ram: &mut GuestRam) {
    ram.write_u64(PML4, PDPT as u64 | 0x3);
    ram.write_u64(PDPT, PD as u64 | 0x3);
    ram.write_u64(PD, 0x83); // 2 MiB page at 0, present + writable + PS
    ram.write_u64(GDT, 0);
    ram.write_u64(GDT + 8, 0x00af_9b00_0000_ffff); // 64-bit code
    ram.write_u64(GDT + 16, 0x00cf_9300_0000_ffff); // data
    for vector in 0..256 {
        let handler = if vector == 3 {
            INT3_HANDLER
        } else {
            FAULT_HANDLER
        };
        ram.write(IDT + vector * 16, &idt_gate(handler));
    }
    ram.write(CODE, PROBE_CODE);
    ram.write(INT3_HANDLER, INT3_CODE);
    ram.write(FAULT_HANDLER, FAULT_CODE);
}

extern "C" fn ignore_signal(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Run the probe against the KVM device at `kvm_path`. `Ok(())` means an ordinary guest runs;
/// `Err(reason)` says why not, in one line.
pub fn probe(kvm_path: &str) -> Result<(), String> {
    let c_path = std::ffi::CString::new(kvm_path)
        .map_err(|_| format!("KVM device path {kvm_path:?} contains a NUL byte"))?;
    let kvm = Kvm::new_with_path(c_path).map_err(|e| format!("cannot open {kvm_path}: {e}"))?;
    let vm = kvm
        .create_vm()
        .map_err(|e| format!("KVM_CREATE_VM failed: {e}"))?;
    let mut ram = GuestRam::new()?;
    build_guest(&mut ram);
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: MEM_SIZE as u64,
        userspace_addr: ram.addr as u64,
    };
    // SAFETY: the region is a live mapping of MEM_SIZE bytes that outlives the VM (`ram` is
    // declared before `vm`'s users and dropped after the vCPU thread has been joined).
    unsafe { vm.set_user_memory_region(region) }
        .map_err(|e| format!("KVM_SET_USER_MEMORY_REGION failed: {e}"))?;

    let mut vcpu = vm
        .create_vcpu(0)
        .map_err(|e| format!("KVM_CREATE_VCPU failed: {e}"))?;
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| format!("KVM_GET_SUPPORTED_CPUID failed: {e}"))?;
    vcpu.set_cpuid2(&cpuid)
        .map_err(|e| format!("KVM_SET_CPUID2 failed: {e}"))?;

    let mut sregs = vcpu
        .get_sregs()
        .map_err(|e| format!("KVM_GET_SREGS failed: {e}"))?;
    sregs.cs = segment(0x08, true);
    let data = segment(0x10, false);
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    sregs.gdt.base = GDT as u64;
    sregs.gdt.limit = 23;
    sregs.idt.base = IDT as u64;
    sregs.idt.limit = 256 * 16 - 1;
    sregs.cr3 = PML4 as u64;
    sregs.cr4 = 0x20 | 0x200 | 0x400 | 0x4_0000; // PAE, OSFXSR, OSXMMEXCPT, OSXSAVE
    sregs.cr0 = 0x8005_0033; // PG, WP, NE, ET, MP, PE
    sregs.efer = 0x500; // LME, LMA
    vcpu.set_sregs(&sregs)
        .map_err(|e| format!("KVM_SET_SREGS (64-bit mode) failed: {e}"))?;
    let mut regs = vcpu
        .get_regs()
        .map_err(|e| format!("KVM_GET_REGS failed: {e}"))?;
    regs.rip = CODE as u64;
    regs.rsp = STACK_TOP;
    regs.rflags = 0x2;
    vcpu.set_regs(&regs)
        .map_err(|e| format!("KVM_SET_REGS failed: {e}"))?;

    // The vCPU runs on its own thread so that a guest that never exits can be interrupted: a
    // signal (no-op handler) makes KVM_RUN return EINTR.
    let kick = SIGRTMIN() + 3;
    register_signal_handler(kick, ignore_signal)
        .map_err(|e| format!("cannot install the probe's signal handler: {e}"))?;
    let (done_tx, done_rx) = mpsc::channel();
    let runner = thread::spawn(move || {
        let verdict = match vcpu.run() {
            Ok(VcpuExit::IoOut(OK_PORT, data)) if data == [OK_BYTE] => Ok(()),
            Ok(VcpuExit::IoOut(FAULT_PORT, _)) => {
                let rip = vcpu.get_regs().map(|r| r.rip).unwrap_or(0);
                Err(format!(
                    "the probe guest took an exception (handler reached, rip {rip:#x})"
                ))
            }
            Ok(VcpuExit::InternalError) => {
                let rip = vcpu.get_regs().map(|r| r.rip).unwrap_or(0);
                Err(format!(
                    "KVM_EXIT_INTERNAL_ERROR at rip {rip:#x} (emulation failure: a paravirtual KVM?)"
                ))
            }
            Ok(other) => Err(format!("unexpected exit {other:?}")),
            Err(e) if e.errno() == libc::EINTR => Err(format!(
                "no exit within {} s (KVM_RUN interrupted)",
                RUN_TIMEOUT.as_secs()
            )),
            Err(e) => Err(format!("KVM_RUN failed: {e}")),
        };
        let _ = done_tx.send(());
        verdict
    });
    let deadline = Instant::now() + RUN_TIMEOUT;
    let give_up = deadline + Duration::from_secs(5);
    loop {
        let wait = deadline.saturating_duration_since(Instant::now());
        match done_rx.recv_timeout(wait.max(Duration::from_millis(50))) {
            Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() >= give_up => {
                // The vCPU thread ignores signals: leave it (and the memory it may still use).
                std::mem::forget(ram);
                std::mem::forget(vm);
                return Err("the probe vCPU neither exited nor stopped on a signal".to_string());
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if Instant::now() >= deadline {
                    // Repeat: a signal that lands just before KVM_RUN is entered is lost.
                    let _ = runner.kill(kick);
                }
            }
        }
    }
    let verdict = runner
        .join()
        .unwrap_or_else(|_| Err("the probe thread panicked".to_string()));
    drop(vm);
    drop(ram);
    verdict
}
