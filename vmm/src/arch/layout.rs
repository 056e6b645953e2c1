//! Guest physical memory map (x86_64).
//!
//! ```text
//! 0x0000_0500  GDT                      0x0000_0520  IDT (empty)
//! 0x0000_7000  boot_params (zero page)  0x0000_8ff0  boot stack top
//! 0x0000_9000  PML4, PDPT, PD           (identity map of the first 1 GiB, 2 MiB pages)
//! 0x0002_0000  kernel command line
//! 0x0009_fc00  EBDA .. 0x000f_ffff      reserved; ACPI tables at 0x000e_0000
//! 0x0010_0000  high memory: kernel, then RAM up to the 32-bit MMIO gap
//! 0xc000_0000  MMIO gap: virtio-mmio devices at 0xd000_0000, the PCI root's 32-bit BAR
//!              window at 0xe000_0000 (256 MiB), IOAPIC, LAPIC
//! 0x1_0000_0000 RAM above 4 GiB for guests larger than the gap start
//! ```

pub const GDT_START: u64 = 0x500;
pub const IDT_START: u64 = 0x520;
pub const ZERO_PAGE_START: u64 = 0x7000;
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
pub const CMDLINE_START: u64 = 0x20000;
/// Linux on x86 truncates longer command lines (COMMAND_LINE_SIZE).
pub const CMDLINE_MAX_SIZE: usize = 2048;
pub const EBDA_START: u64 = 0x9fc00;
pub const ACPI_START: u64 = 0xe0000;
pub const ACPI_END: u64 = 0x100000;
pub const HIMEM_START: u64 = 0x100000;
/// Where a CPU (and a kernel doing a "BIOS reboot") jumps in real mode: F000:FFF0.
pub const RESET_VECTOR: u64 = 0xffff0;

pub const MMIO_GAP_START: u64 = 0xc000_0000;
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// The PCI root's 32-bit MMIO window (DSDT `_CRS`): memory BARs are assigned and decoded here.
pub const PCI_MMIO32_START: u64 = 0xe000_0000;
pub const PCI_MMIO32_SIZE: u64 = 0x1000_0000;
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
pub const LAPIC_ADDR: u64 = 0xfee0_0000;

/// KVM needs three pages for the TSS and one for the identity map just below the LAPIC/BIOS area.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// The first GSI handed to virtio-mmio devices; 0-4 are the PIT, keyboard, cascade, COM2 and COM1.
pub const VIRTIO_GSI_BASE: u32 = 5;
pub const SERIAL_GSI: u32 = 4;
/// Pins of KVM's in-kernel IOAPIC.
pub const IOAPIC_PINS: u32 = 24;
/// MSI-X vectors get GSIs from here up (KVM routes them with MSI entries).
pub const MSI_GSI_BASE: u32 = IOAPIC_PINS;

/// I/O ports of the platform devices mqvmm emulates.
pub const SERIAL_PORT: u16 = 0x3f8;
pub const I8042_PORT: u16 = 0x60;
/// ACPI hardware-reduced sleep control / status and reset registers (see the FADT).
pub const ACPI_SLEEP_CONTROL_PORT: u16 = 0x600;
pub const ACPI_SLEEP_STATUS_PORT: u16 = 0x601;
pub const ACPI_RESET_PORT: u16 = 0x602;
pub const ACPI_RESET_VALUE: u8 = 0x1;
/// The `\_S5` sleep type our DSDT announces; the guest writes it into SLP_TYP on poweroff.
pub const ACPI_S5_SLEEP_TYPE: u8 = 5;

// The devices must sit inside the gap, above RAM; the PCI window between the virtio-mmio
// devices and the IOAPIC.
const _: () = assert!(VIRTIO_MMIO_START >= MMIO_GAP_START && IOAPIC_ADDR < MMIO_GAP_END);
const _: () = assert!(
    PCI_MMIO32_START >= VIRTIO_MMIO_START + 0x100_0000
        && PCI_MMIO32_START + PCI_MMIO32_SIZE <= IOAPIC_ADDR
);

/// Guest RAM regions for a guest of `size` bytes: split around the 32-bit MMIO gap.
pub fn ram_regions(size: u64) -> Vec<(u64, u64)> {
    if size <= MMIO_GAP_START {
        vec![(0, size)]
    } else {
        vec![(0, MMIO_GAP_START), (MMIO_GAP_END, size - MMIO_GAP_START)]
    }
}

/// End of RAM below the MMIO gap (exclusive).
pub fn low_ram_end(size: u64) -> u64 {
    size.min(MMIO_GAP_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_is_one_region() {
        assert_eq!(ram_regions(512 << 20), vec![(0, 512 << 20)]);
    }

    #[test]
    fn large_guest_is_split_around_the_gap() {
        let size = 4u64 << 30;
        let regions = ram_regions(size);
        assert_eq!(
            regions,
            vec![(0, MMIO_GAP_START), (MMIO_GAP_END, size - MMIO_GAP_START)]
        );
        assert_eq!(regions.iter().map(|r| r.1).sum::<u64>(), size);
    }
}
