//! vCPU state at the 64-bit kernel entry point, and the CPUID the guest sees.

use kvm_bindings::{
    kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, CpuId, Msrs,
    KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuFd};

use super::boot::GDT;
use super::layout::*;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("KVM_GET_SUPPORTED_CPUID failed")]
    SupportedCpuid(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_CPUID2 on vCPU {cpu} failed")]
    SetCpuid {
        cpu: u8,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("{what} on vCPU {cpu} failed")]
    Register {
        what: &'static str,
        cpu: u8,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("KVM_SET_MSRS on vCPU {cpu} set {set} of {wanted} MSRs")]
    Msrs { cpu: u8, set: usize, wanted: usize },
    #[error("cannot build the MSR list")]
    MsrList,
}

pub type Result<T> = std::result::Result<T, Error>;

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Segment descriptor fields from a GDT entry, as KVM wants them.
fn segment_from_gdt(entry: u64, index: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let limit = (entry & 0xffff) | ((entry >> 32) & 0x000f_0000);
    let g = ((entry >> 55) & 1) as u8;
    kvm_segment {
        base,
        // With 4 KiB granularity KVM expects the byte-granular limit.
        limit: if g == 1 {
            ((limit << 12) | 0xfff) as u32
        } else {
            limit as u32
        },
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

/// Long mode with paging, flat segments from our GDT.
pub fn setup_sregs(vcpu: &VcpuFd, cpu: u8) -> Result<()> {
    let err = |what| move |source| Error::Register { what, cpu, source };
    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(err("KVM_GET_SREGS"))?;
    let code = segment_from_gdt(GDT[1], 1);
    let data = segment_from_gdt(GDT[2], 2);
    let tss = segment_from_gdt(GDT[3], 3);
    sregs.gdt.base = GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&GDT) - 1) as u16;
    sregs.idt.base = IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr3 = PML4_START;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
    vcpu.set_sregs(&sregs).map_err(err("KVM_SET_SREGS"))
}

/// RIP at the kernel's 64-bit entry, RSI pointing to the zero page (boot protocol).
pub fn setup_regs(vcpu: &VcpuFd, cpu: u8, entry: u64) -> Result<()> {
    let regs = kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(|source| Error::Register {
        what: "KVM_SET_REGS",
        cpu,
        source,
    })
}

pub fn setup_fpu(vcpu: &VcpuFd, cpu: u8) -> Result<()> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(|source| Error::Register {
        what: "KVM_SET_FPU",
        cpu,
        source,
    })
}

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_IA32_MISC_ENABLE_FAST_STRING: u64 = 1;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// MTRRs enabled, default memory type write-back.
const MTRR_DEF_TYPE_ENABLE_WB: u64 = (1 << 11) | 6;

pub fn setup_msrs(vcpu: &VcpuFd, cpu: u8) -> Result<()> {
    let entry = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    let entries = [
        entry(MSR_IA32_SYSENTER_CS, 0),
        entry(MSR_IA32_SYSENTER_ESP, 0),
        entry(MSR_IA32_SYSENTER_EIP, 0),
        entry(MSR_STAR, 0),
        entry(MSR_CSTAR, 0),
        entry(MSR_KERNEL_GS_BASE, 0),
        entry(MSR_SYSCALL_MASK, 0),
        entry(MSR_LSTAR, 0),
        entry(MSR_IA32_TSC, 0),
        entry(MSR_IA32_MISC_ENABLE, MSR_IA32_MISC_ENABLE_FAST_STRING),
        entry(MSR_MTRR_DEF_TYPE, MTRR_DEF_TYPE_ENABLE_WB),
    ];
    let msrs = Msrs::from_entries(&entries).map_err(|_| Error::MsrList)?;
    let set = vcpu.set_msrs(&msrs).map_err(|source| Error::Register {
        what: "KVM_SET_MSRS",
        cpu,
        source,
    })?;
    if set != entries.len() {
        return Err(Error::Msrs {
            cpu,
            set,
            wanted: entries.len(),
        });
    }
    Ok(())
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn lapic_reg(state: &kvm_lapic_state, offset: usize) -> u32 {
    let b = &state.regs[offset..offset + 4];
    u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8])
}

fn set_lapic_reg(state: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (i, b) in value.to_le_bytes().iter().enumerate() {
        state.regs[offset + i] = *b as _;
    }
}

/// LINT0 delivers the PIC's ExtINT and LINT1 NMIs, as firmware would leave them.
pub fn setup_lint(vcpu: &VcpuFd, cpu: u8) -> Result<()> {
    let err = |what| move |source| Error::Register { what, cpu, source };
    let mut lapic = vcpu.get_lapic().map_err(err("KVM_GET_LAPIC"))?;
    let lvt0 = lapic_reg(&lapic, APIC_LVT0);
    set_lapic_reg(
        &mut lapic,
        APIC_LVT0,
        (lvt0 & !0x700) | (APIC_MODE_EXTINT << 8),
    );
    let lvt1 = lapic_reg(&lapic, APIC_LVT1);
    set_lapic_reg(
        &mut lapic,
        APIC_LVT1,
        (lvt1 & !0x700) | (APIC_MODE_NMI << 8),
    );
    vcpu.set_lapic(&lapic).map_err(err("KVM_SET_LAPIC"))
}

/// What KVM can offer, read once and patched per vCPU.
pub fn supported_cpuid(kvm: &Kvm) -> Result<CpuId> {
    kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(Error::SupportedCpuid)
}

const CPUID_HYPERVISOR: u32 = 1 << 31;
const CPUID_HTT: u32 = 1 << 28;
const CPUID_AMD_CMP_LEGACY: u32 = 1 << 1;

fn bits_for(count: u32) -> u32 {
    // Number of bits needed to number `count` items (0 for one).
    32 - count.saturating_sub(1).leading_zeros()
}

/// One socket, `cpus` cores, one thread per core; APIC id = vCPU index.
pub fn patch_cpuid(cpuid: &mut CpuId, cpu: u8, cpus: u8) {
    let cpus32 = u32::from(cpus);
    let apic_id = u32::from(cpu);
    let core_bits = bits_for(cpus32);
    for entry in cpuid.as_mut_slice().iter_mut() {
        match entry.function {
            0x1 => {
                entry.ebx = (apic_id << 24) | (cpus32 << 16) | (entry.ebx & 0xffff);
                entry.ecx |= CPUID_HYPERVISOR;
                if cpus > 1 {
                    entry.edx |= CPUID_HTT;
                } else {
                    entry.edx &= !CPUID_HTT;
                }
            }
            0x4 => {
                // Deterministic cache parameters: cores per package, and threads sharing
                // each cache (one for private levels, all for the last level).
                let level = (entry.eax >> 5) & 0x7;
                let sharing = if level >= 3 { cpus32 - 1 } else { 0 };
                entry.eax = (entry.eax & 0x3fff)
                    | (sharing << 14)
                    | ((cpus32.saturating_sub(1) & 0x3f) << 26);
            }
            0xb | 0x1f => {
                // Extended topology: level 0 = SMT (1 thread), level 1 = core (all vCPUs).
                match entry.index {
                    0 => {
                        entry.eax = 0;
                        entry.ebx = 1;
                        entry.ecx = 1 << 8;
                    }
                    1 => {
                        entry.eax = core_bits;
                        entry.ebx = cpus32;
                        entry.ecx = (2 << 8) | 1;
                    }
                    index => {
                        entry.eax = 0;
                        entry.ebx = 0;
                        entry.ecx = index & 0xff;
                    }
                }
                entry.edx = apic_id;
            }
            0x8000_0001 => {
                if cpus > 1 {
                    entry.ecx |= CPUID_AMD_CMP_LEGACY;
                } else {
                    entry.ecx &= !CPUID_AMD_CMP_LEGACY;
                }
            }
            0x8000_0008 => {
                // AMD: number of cores - 1 and the APIC id bits that number them.
                entry.ecx = (entry.ecx & !0xf0ff) | (core_bits << 12) | (cpus32 - 1);
            }
            0x8000_001e => {
                entry.eax = apic_id;
                entry.ebx = apic_id & 0xff;
                entry.ecx = 0;
            }
            _ => {}
        }
    }
}

/// Everything a vCPU needs before its first KVM_RUN.
pub fn configure_vcpu(
    vcpu: &VcpuFd,
    cpu: u8,
    cpus: u8,
    base_cpuid: &CpuId,
    entry: u64,
) -> Result<()> {
    let mut cpuid = base_cpuid.clone();
    patch_cpuid(&mut cpuid, cpu, cpus);
    vcpu.set_cpuid2(&cpuid)
        .map_err(|source| Error::SetCpuid { cpu, source })?;
    setup_msrs(vcpu, cpu)?;
    setup_regs(vcpu, cpu, entry)?;
    setup_sregs(vcpu, cpu)?;
    setup_fpu(vcpu, cpu)?;
    setup_lint(vcpu, cpu)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    fn cpuid_with(entries: &[(u32, u32)]) -> CpuId {
        let e: Vec<kvm_cpuid_entry2> = entries
            .iter()
            .map(|&(function, index)| kvm_cpuid_entry2 {
                function,
                index,
                ebx: 0x0000_0800,
                ..Default::default()
            })
            .collect();
        CpuId::from_entries(&e).unwrap()
    }

    fn find(c: &CpuId, function: u32, index: u32) -> kvm_cpuid_entry2 {
        *c.as_slice()
            .iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap()
    }

    #[test]
    fn apic_ids_topology_and_hypervisor_bit() {
        for (cpu, cpus) in [(0u8, 1u8), (1, 2), (3, 4), (5, 8)] {
            let mut c = cpuid_with(&[(1, 0), (0xb, 0), (0xb, 1), (0xb, 2), (0x8000_0008, 0)]);
            patch_cpuid(&mut c, cpu, cpus);
            let leaf1 = find(&c, 1, 0);
            assert_eq!(leaf1.ebx >> 24, u32::from(cpu), "initial APIC id");
            assert_eq!((leaf1.ebx >> 16) & 0xff, u32::from(cpus), "logical count");
            assert_eq!(leaf1.ebx & 0xffff, 0x0800, "clflush size kept");
            assert_ne!(leaf1.ecx & CPUID_HYPERVISOR, 0);
            assert_eq!(leaf1.edx & CPUID_HTT != 0, cpus > 1);
            let core = find(&c, 0xb, 1);
            assert_eq!(core.ebx, u32::from(cpus));
            assert_eq!(core.edx, u32::from(cpu));
            assert!(1u32 << core.eax >= u32::from(cpus));
            assert_eq!(
                find(&c, 0xb, 2).ecx >> 8 & 0xff,
                0,
                "invalid level ends the list"
            );
            assert_eq!(find(&c, 0x8000_0008, 0).ecx & 0xff, u32::from(cpus) - 1);
        }
    }

    #[test]
    fn gdt_segments_decode() {
        let cs = segment_from_gdt(GDT[1], 1);
        assert_eq!(
            (cs.l, cs.db, cs.present, cs.type_, cs.selector),
            (1, 0, 1, 0xb, 8)
        );
        assert_eq!(cs.limit, 0xffff_ffff);
        let ds = segment_from_gdt(GDT[2], 2);
        assert_eq!((ds.l, ds.db, ds.type_, ds.selector), (0, 1, 3, 16));
        let tr = segment_from_gdt(GDT[3], 3);
        assert_eq!((tr.s, tr.type_), (0, 0xb));
    }
}
