//! ACPI tables: how the guest learns its CPUs (MADT), its virtio-mmio devices and PCI root
//! (DSDT), and how to power off and reset (hardware-reduced FADT sleep and reset registers).
//!
//! Debian's kernels are built without `CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES`, and the cloud kernel
//! without MP-table parsing, so neither `virtio_mmio.device=` nor an MP table would work: ACPI is
//! the interface every stock distribution kernel understands. Devices appear as `LNRO0005`
//! (the ACPI id the Linux virtio-mmio driver matches). With virtio-pci, the DSDT also has a PCI
//! root `PCI0` (`PNP0A08`, compatible `PNP0A03`): segment 0, bus 0, the conf1 ports
//! 0xCF8-0xCFF it consumes, and the 32-bit MMIO window its BARs live in; and the FADT does not
//! say "MSI not supported", as it does without PCI (Linux would then refuse MSI-X).

use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::*;

const OEM_ID: [u8; 6] = *b"MQVMM ";
const OEM_REVISION: u32 = 1;

/// FADT IA-PC boot architecture flags.
const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;
const IAPC_MSI_NOT_SUPPORTED: u16 = 1 << 3;
const IAPC_PCIE_ASPM_CONTROLS: u16 = 1 << 4;
const IAPC_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("ACPI tables need {needed} bytes but only {available} fit below 1 MiB")]
    TooLarge { needed: usize, available: u64 },
    #[error("cannot write ACPI table {table} into guest memory")]
    Write {
        table: &'static str,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

/// A virtio-mmio device as the DSDT announces it.
#[derive(Debug, Clone, Copy)]
pub struct MmioDeviceInfo {
    pub base: u64,
    pub size: u64,
    pub gsi: u32,
}

/// The PCI root as the DSDT announces it: segment 0, bus 0, conf1, one 32-bit MMIO window.
#[derive(Debug, Clone, Copy)]
pub struct PciRootInfo {
    pub mmio32_start: u64,
    pub mmio32_size: u64,
}

/// Ports of the conf1 mechanism (CONFIG_ADDRESS and CONFIG_DATA).
const PCI_CONFIG_PORT: u16 = 0xcf8;
const PCI_CONFIG_PORTS: u8 = 8;

fn io_gas(port: u16) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(port),
    )
}

/// AML of the PCI root device `PCI0`.
fn pci_root_aml(pci: &PciRootInfo) -> Vec<u8> {
    let hid = aml::EISAName::new("PNP0A08");
    let cid = aml::EISAName::new("PNP0A03");
    let bus = aml::AddressSpace::<u16>::new_bus_number(0, 0);
    let config_ports = aml::IO::new(PCI_CONFIG_PORT, PCI_CONFIG_PORT, 1, PCI_CONFIG_PORTS);
    let window = aml::AddressSpace::<u32>::new_memory(
        aml::AddressSpaceCacheable::NotCacheable,
        true,
        pci.mmio32_start as u32,
        (pci.mmio32_start + pci.mmio32_size - 1) as u32,
        None,
    );
    let crs = aml::ResourceTemplate::new(vec![&bus, &config_ports, &window]);
    let hid_name = aml::Name::new("_HID".into(), &hid);
    let cid_name = aml::Name::new("_CID".into(), &cid);
    let adr_name = aml::Name::new("_ADR".into(), &aml::ZERO);
    let seg_name = aml::Name::new("_SEG".into(), &aml::ZERO);
    let uid_name = aml::Name::new("_UID".into(), &aml::ZERO);
    let bbn_name = aml::Name::new("_BBN".into(), &aml::ZERO);
    let crs_name = aml::Name::new("_CRS".into(), &crs);
    let device = aml::Device::new(
        "PCI0".into(),
        vec![
            &hid_name, &cid_name, &adr_name, &seg_name, &uid_name, &bbn_name, &crs_name,
        ],
    );
    let mut bytes = Vec::new();
    device.to_aml_bytes(&mut bytes);
    bytes
}

/// AML for the DSDT body: COM1, one `LNRO0005` device per virtio-mmio transport, the PCI root
/// if there is one, `\_S5`.
pub fn dsdt_aml(devices: &[MmioDeviceInfo], pci: Option<&PciRootInfo>) -> Vec<u8> {
    let mut body = Vec::new();

    let com1_hid = aml::EISAName::new("PNP0501");
    let com1_io = aml::IO::new(SERIAL_PORT, SERIAL_PORT, 1, 8);
    let com1_irq = aml::Interrupt::new(true, true, false, false, SERIAL_GSI);
    let com1_crs = aml::ResourceTemplate::new(vec![&com1_io, &com1_irq]);
    let com1_hid_name = aml::Name::new("_HID".into(), &com1_hid);
    let com1_uid_name = aml::Name::new("_UID".into(), &aml::ZERO);
    let com1_crs_name = aml::Name::new("_CRS".into(), &com1_crs);
    let com1 = aml::Device::new(
        "COM1".into(),
        vec![&com1_hid_name, &com1_uid_name, &com1_crs_name],
    );

    let hid = "LNRO0005";
    let mut device_aml: Vec<Vec<u8>> = Vec::new();
    for (i, dev) in devices.iter().enumerate() {
        let mem = aml::Memory32Fixed::new(true, dev.base as u32, dev.size as u32);
        let irq = aml::Interrupt::new(true, true, false, false, dev.gsi);
        let crs = aml::ResourceTemplate::new(vec![&mem, &irq]);
        let uid = i as u32;
        let hid_name = aml::Name::new("_HID".into(), &hid);
        let uid_name = aml::Name::new("_UID".into(), &uid);
        let crs_name = aml::Name::new("_CRS".into(), &crs);
        let name = format!("V{i:03X}");
        let device = aml::Device::new(name.as_str().into(), vec![&hid_name, &uid_name, &crs_name]);
        let mut bytes = Vec::new();
        device.to_aml_bytes(&mut bytes);
        device_aml.push(bytes);
    }
    if let Some(pci) = pci {
        device_aml.push(pci_root_aml(pci));
    }
    let raw: Vec<RawAml> = device_aml.iter().map(|b| RawAml(b)).collect();
    let mut children: Vec<&dyn Aml> = vec![&com1];
    children.extend(raw.iter().map(|r| r as &dyn Aml));
    aml::Scope::new("\\_SB_".into(), children).to_aml_bytes(&mut body);

    let s5_type = ACPI_S5_SLEEP_TYPE;
    let s5 = aml::Package::new(vec![&s5_type, &aml::ZERO]);
    aml::Name::new("_S5_".into(), &s5).to_aml_bytes(&mut body);
    body
}

/// Pre-serialized AML, so that devices built in a loop can sit in one Scope.
struct RawAml<'a>(&'a [u8]);

impl Aml for RawAml<'_> {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(self.0);
    }
}

fn table_bytes(table: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    table.to_aml_bytes(&mut bytes);
    bytes
}

/// Builds every table and writes them at [`ACPI_START`]; returns the RSDP address.
pub fn write_tables(
    mem: &GuestMemoryMmap,
    cpus: u8,
    devices: &[MmioDeviceInfo],
    pci: Option<&PciRootInfo>,
) -> Result<GuestAddress> {
    let body = dsdt_aml(devices, pci);
    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, *b"MQVMDSDT", OEM_REVISION);
    dsdt.append_slice(&body);
    let dsdt_bytes = dsdt.as_slice().to_vec();

    let rsdp_addr = ACPI_START;
    let dsdt_addr = rsdp_addr + 64;
    let fadt_addr = align8(dsdt_addr + dsdt_bytes.len() as u64);

    let mut fadt = FADTBuilder::new(OEM_ID, *b"MQVMFACP", OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .flag(Flags::ResetRegSup);
    fadt.iapc_boot_arch = iapc_boot_arch(pci.is_some()).into();
    fadt.reset_reg = io_gas(ACPI_RESET_PORT);
    fadt.reset_value = ACPI_RESET_VALUE;
    fadt.sleep_control_reg = io_gas(ACPI_SLEEP_CONTROL_PORT);
    fadt.sleep_status_reg = io_gas(ACPI_SLEEP_STATUS_PORT);
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(*b"MQVMMKVM").into();
    let fadt_bytes = table_bytes(&fadt.finalize());

    let madt_addr = align8(fadt_addr + fadt_bytes.len() as u64);
    let mut madt = MADT::new(
        OEM_ID,
        *b"MQVMAPIC",
        OEM_REVISION,
        LocalInterruptController::Address(LAPIC_ADDR as u32),
    );
    for cpu in 0..cpus {
        madt.add_structure(ProcessorLocalApic::new(cpu, cpu, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(0, IOAPIC_ADDR as u32, 0));
    let madt_bytes = table_bytes(&madt);

    let xsdt_addr = align8(madt_addr + madt_bytes.len() as u64);
    let mut xsdt = XSDT::new(OEM_ID, *b"MQVMXSDT", OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt_bytes = table_bytes(&xsdt);

    let end = xsdt_addr + xsdt_bytes.len() as u64;
    if end > ACPI_END {
        return Err(Error::TooLarge {
            needed: (end - ACPI_START) as usize,
            available: ACPI_END - ACPI_START,
        });
    }
    let rsdp_bytes = table_bytes(&Rsdp::new(OEM_ID, xsdt_addr));
    for (table, addr, bytes) in [
        ("RSDP", rsdp_addr, &rsdp_bytes),
        ("DSDT", dsdt_addr, &dsdt_bytes),
        ("FACP", fadt_addr, &fadt_bytes),
        ("APIC", madt_addr, &madt_bytes),
        ("XSDT", xsdt_addr, &xsdt_bytes),
    ] {
        mem.write_slice(bytes, GuestAddress(addr))
            .map_err(|source| Error::Write { table, source })?;
    }
    Ok(GuestAddress(rsdp_addr))
}

/// IA-PC boot flags: MSI is supported only where there is PCI to use it.
fn iapc_boot_arch(pci: bool) -> u16 {
    let mut flags = IAPC_VGA_NOT_PRESENT | IAPC_PCIE_ASPM_CONTROLS | IAPC_CMOS_RTC_NOT_PRESENT;
    if !pci {
        flags |= IAPC_MSI_NOT_SUPPORTED;
    }
    flags
}

fn align8(addr: u64) -> u64 {
    (addr + 7) & !7
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checksum_ok(bytes: &[u8]) -> bool {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
    }

    fn read_table(mem: &GuestMemoryMmap, addr: u64) -> Vec<u8> {
        let mut header = [0u8; 8];
        mem.read_slice(&mut header, GuestAddress(addr)).unwrap();
        let len = u32::from_le_bytes(header[4..8].try_into().unwrap()) as usize;
        let mut table = vec![0u8; len];
        mem.read_slice(&mut table, GuestAddress(addr)).unwrap();
        table
    }

    #[test]
    fn tables_chain_from_rsdp_with_valid_checksums() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let devices = [
            MmioDeviceInfo {
                base: VIRTIO_MMIO_START,
                size: VIRTIO_MMIO_SIZE,
                gsi: VIRTIO_GSI_BASE,
            },
            MmioDeviceInfo {
                base: VIRTIO_MMIO_START + VIRTIO_MMIO_SIZE,
                size: VIRTIO_MMIO_SIZE,
                gsi: VIRTIO_GSI_BASE + 1,
            },
        ];
        let rsdp = write_tables(&mem, 4, &devices, None).unwrap();
        let mut r = [0u8; 36];
        mem.read_slice(&mut r, rsdp).unwrap();
        assert_eq!(&r[..8], b"RSD PTR ");
        assert!(checksum_ok(&r[..20]) && checksum_ok(&r));
        let xsdt = read_table(&mem, u64::from_le_bytes(r[24..32].try_into().unwrap()));
        assert_eq!(&xsdt[..4], b"XSDT");
        assert!(checksum_ok(&xsdt));
        let entries: Vec<u64> = xsdt[36..]
            .chunks(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(entries.len(), 2);
        let fadt = read_table(&mem, entries[0]);
        assert_eq!(&fadt[..4], b"FACP");
        assert!(checksum_ok(&fadt));
        let madt = read_table(&mem, entries[1]);
        assert_eq!(&madt[..4], b"APIC");
        assert!(checksum_ok(&madt));
        // Four enabled local APICs (type 0) and one IOAPIC (type 1).
        let mut lapics = 0;
        let mut ioapics = 0;
        let mut off = 44;
        while off < madt.len() {
            match madt[off] {
                0 => lapics += 1,
                1 => ioapics += 1,
                t => panic!("unexpected MADT structure {t}"),
            }
            off += madt[off + 1] as usize;
        }
        assert_eq!((lapics, ioapics), (4, 1));
        // The DSDT (pointed to by X_DSDT at offset 140) names both devices and \_S5.
        let dsdt_addr = u64::from_le_bytes(fadt[140..148].try_into().unwrap());
        let dsdt = read_table(&mem, dsdt_addr);
        assert!(checksum_ok(&dsdt));
        let text = String::from_utf8_lossy(&dsdt);
        assert_eq!(text.matches("LNRO0005").count(), 2);
        assert!(text.contains("_S5_") && text.contains("V000") && text.contains("V001"));
        assert!(!text.contains("PCI0"), "no PCI root without PCI devices");
        // IAPC_BOOT_ARCH (offset 109): MSI not supported, without PCI.
        let flags = u16::from_le_bytes(fadt[109..111].try_into().unwrap());
        assert_ne!(flags & IAPC_MSI_NOT_SUPPORTED, 0);
    }

    /// The resource descriptors of PCI0's `_CRS` buffer, as (tag, bytes) pairs.
    fn crs_descriptors(dsdt: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let pci0 = dsdt.windows(4).position(|w| w == b"PCI0").unwrap();
        let crs = pci0 + dsdt[pci0..].windows(4).position(|w| w == b"_CRS").unwrap();
        // _CRS: BufferOp (0x11), PkgLength (one byte here), BufferSize (ByteConst 0x0a n).
        assert_eq!(dsdt[crs + 4], 0x11);
        assert_eq!(dsdt[crs + 6], 0x0a);
        let len = usize::from(dsdt[crs + 7]);
        let buf = &dsdt[crs + 8..crs + 8 + len];
        let mut out = Vec::new();
        let mut at = 0;
        while at < buf.len() {
            let tag = buf[at];
            let (header, body) = if tag & 0x80 != 0 {
                (
                    3,
                    usize::from(u16::from_le_bytes([buf[at + 1], buf[at + 2]])),
                )
            } else {
                (1, usize::from(tag & 7))
            };
            out.push((tag, buf[at + header..at + header + body].to_vec()));
            if tag == 0x79 {
                break; // end tag
            }
            at += header + body;
        }
        out
    }

    #[test]
    fn pci_root_is_announced_with_its_resources_and_msi_allowed() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let pci = PciRootInfo {
            mmio32_start: PCI_MMIO32_START,
            mmio32_size: PCI_MMIO32_SIZE,
        };
        let rsdp = write_tables(&mem, 2, &[], Some(&pci)).unwrap();
        let mut r = [0u8; 36];
        mem.read_slice(&mut r, rsdp).unwrap();
        let xsdt = read_table(&mem, u64::from_le_bytes(r[24..32].try_into().unwrap()));
        let fadt = read_table(&mem, u64::from_le_bytes(xsdt[36..44].try_into().unwrap()));
        let flags = u16::from_le_bytes(fadt[109..111].try_into().unwrap());
        assert_eq!(flags & IAPC_MSI_NOT_SUPPORTED, 0);
        let dsdt = read_table(&mem, u64::from_le_bytes(fadt[140..148].try_into().unwrap()));
        assert!(checksum_ok(&dsdt));
        let text = String::from_utf8_lossy(&dsdt);
        for name in ["PCI0", "_SEG", "_BBN", "_UID", "_ADR", "_CID"] {
            assert!(text.contains(name), "{name}");
        }
        // EISA ids: PNP0A08 = 0x41d0 0x0a08, PNP0A03 = 0x41d0 0x0a03 (compressed, big endian).
        assert!(dsdt.windows(4).any(|w| w == [0x41, 0xd0, 0x0a, 0x08]));
        assert!(dsdt.windows(4).any(|w| w == [0x41, 0xd0, 0x0a, 0x03]));
        let crs = crs_descriptors(&dsdt);
        // Word bus number 0-0.
        let bus = crs.iter().find(|d| d.0 == 0x88).unwrap();
        assert_eq!(bus.1[0], 2, "bus number range");
        assert_eq!(&bus.1[5..9], &[0, 0, 0, 0]);
        // conf1 ports: IO 0xcf8-0xcf8, 8 ports.
        let io = crs.iter().find(|d| d.0 == 0x47).unwrap();
        assert_eq!(io.1, vec![1, 0xf8, 0x0c, 0xf8, 0x0c, 1, 8]);
        // DWord memory window, read-write.
        let window = crs.iter().find(|d| d.0 == 0x87).unwrap();
        assert_eq!(window.1[0], 0, "memory range");
        let min = u32::from_le_bytes(window.1[7..11].try_into().unwrap());
        let max = u32::from_le_bytes(window.1[11..15].try_into().unwrap());
        assert_eq!(
            (u64::from(min), u64::from(max)),
            (PCI_MMIO32_START, PCI_MMIO32_START + PCI_MMIO32_SIZE - 1)
        );
    }
}
