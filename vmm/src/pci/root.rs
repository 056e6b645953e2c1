//! The root bus: functions by slot on bus 0, configuration access through conf1 (ports
//! 0xCF8-0xCFF), and the MMIO window in which their memory BARs are decoded.

use std::sync::{Arc, Mutex};

use super::config::{ConfigSpace, Identity};
use super::PciDevice;
use crate::bus::BusDevice;

/// Slots (device numbers) on a bus.
pub const SLOTS: usize = 32;
/// First port of the conf1 mechanism: CONFIG_ADDRESS at 0xCF8, CONFIG_DATA at 0xCFC.
pub const CONFIG_IO_PORT: u16 = 0xcf8;
pub const CONFIG_IO_LEN: u64 = 8;
/// CONFIG_ADDRESS: enable bit, bus, device, function, register (dword aligned).
const ADDRESS_ENABLE: u32 = 1 << 31;
const ADDRESS_MASK: u32 = 0x80ff_fffc;

/// Host bridge identity: Red Hat's generic PCIe host bridge id (1b36:0008), which no Linux
/// driver binds to; class 0x0600 is what Linux's conf1 sanity check looks for on a machine
/// without DMI.
pub const HOST_BRIDGE_VENDOR_ID: u16 = 0x1b36;
pub const HOST_BRIDGE_DEVICE_ID: u16 = 0x0008;
pub const HOST_BRIDGE_CLASS: u32 = 0x06_00_00;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("PCI slot {slot} does not exist or is taken")]
    Slot { slot: usize },
}

/// Where one BAR is decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Mapping {
    start: u64,
    len: u64,
    slot: usize,
    bar: u8,
}

pub struct PciRoot {
    window_start: u64,
    window_len: u64,
    slots: Vec<Option<Box<dyn PciDevice>>>,
    mappings: Vec<Mapping>,
}

impl PciRoot {
    /// A bus whose memory BARs are decoded only inside `window_start..window_start + window_len`.
    pub fn new(window_start: u64, window_len: u64) -> PciRoot {
        PciRoot {
            window_start,
            window_len,
            slots: (0..SLOTS).map(|_| None).collect(),
            mappings: Vec::new(),
        }
    }

    pub fn add(&mut self, slot: usize, device: Box<dyn PciDevice>) -> Result<(), Error> {
        match self.slots.get_mut(slot) {
            Some(entry @ None) => *entry = Some(device),
            _ => return Err(Error::Slot { slot }),
        }
        self.remap(slot);
        Ok(())
    }

    /// A configuration read; absent functions read all ones.
    pub fn config_read(
        &mut self,
        bus: u8,
        slot: usize,
        function: u8,
        offset: usize,
        data: &mut [u8],
    ) {
        match self.function(bus, slot, function) {
            Some(device) => device.config_read(offset, data),
            None => data.fill(0xff),
        }
    }

    pub fn config_write(&mut self, bus: u8, slot: usize, function: u8, offset: usize, data: &[u8]) {
        if let Some(device) = self.function(bus, slot, function) {
            device.config_write(offset, data);
            // The written function first, against what the others decode now (on an overlap
            // theirs stay and its BAR is not decoded); then the others, since a BAR refused
            // earlier may now fit where this one's was.
            self.remap(slot);
            for other in (0..SLOTS).filter(|&s| s != slot) {
                self.remap(other);
            }
        }
    }

    fn function(&mut self, bus: u8, slot: usize, function: u8) -> Option<&mut Box<dyn PciDevice>> {
        // One bus, single-function devices.
        if bus != 0 || function != 0 {
            return None;
        }
        self.slots.get_mut(slot)?.as_mut()
    }

    /// Recomputes where the BARs of `slot` are decoded and tells the device what changed.
    fn remap(&mut self, slot: usize) {
        let Some(Some(device)) = self.slots.get_mut(slot) else {
            return;
        };
        let programmed = device.memory_bars().unwrap_or_default();
        let others: Vec<Mapping> = self
            .mappings
            .iter()
            .filter(|m| m.slot != slot)
            .copied()
            .collect();
        let window_end = self.window_start + self.window_len;
        let mut wanted = Vec::new();
        for (bar, start, len) in programmed {
            let end = start.checked_add(len);
            let usable = len > 0
                && start % len == 0
                && start >= self.window_start
                && end.is_some_and(|end| end <= window_end)
                && !others
                    .iter()
                    .chain(wanted.iter())
                    .any(|m| start < m.start + m.len && m.start < start + len);
            if usable {
                wanted.push(Mapping {
                    start,
                    len,
                    slot,
                    bar,
                });
            }
        }
        let current: Vec<Mapping> = self
            .mappings
            .iter()
            .filter(|m| m.slot == slot)
            .copied()
            .collect();
        for old in &current {
            if !wanted
                .iter()
                .any(|w| w.bar == old.bar && w.start == old.start)
            {
                device.bar_mapped(old.bar, None);
            }
        }
        for new in &wanted {
            if !current
                .iter()
                .any(|c| c.bar == new.bar && c.start == new.start)
            {
                if current.iter().any(|c| c.bar == new.bar) {
                    log::debug!(
                        "pci: 00:{slot:02x}.0 BAR {} moves to {:#x}",
                        new.bar,
                        new.start
                    );
                }
                device.bar_mapped(new.bar, Some(new.start));
            }
        }
        self.mappings.retain(|m| m.slot != slot);
        self.mappings.extend(wanted);
    }

    fn mapping_at(&self, addr: u64) -> Option<Mapping> {
        self.mappings
            .iter()
            .find(|m| addr >= m.start && addr - m.start < m.len)
            .copied()
    }

    /// A read in the MMIO window; false if no BAR decodes `addr`.
    pub fn mmio_read(&mut self, addr: u64, data: &mut [u8]) -> bool {
        let Some(m) = self.mapping_at(addr) else {
            return false;
        };
        match self.slots.get_mut(m.slot) {
            Some(Some(device)) => {
                device.bar_read(m.bar, addr - m.start, data);
                true
            }
            _ => false,
        }
    }

    pub fn mmio_write(&mut self, addr: u64, data: &[u8]) -> bool {
        let Some(m) = self.mapping_at(addr) else {
            return false;
        };
        match self.slots.get_mut(m.slot) {
            Some(Some(device)) => {
                device.bar_write(m.bar, addr - m.start, data);
                true
            }
            _ => false,
        }
    }
}

fn lock(root: &Mutex<PciRoot>) -> std::sync::MutexGuard<'_, PciRoot> {
    root.lock().unwrap_or_else(|e| e.into_inner())
}

/// Ports 0xCF8-0xCFF: CONFIG_ADDRESS (32-bit accesses only) and CONFIG_DATA (any width).
pub struct PciConfigIo {
    root: Arc<Mutex<PciRoot>>,
    address: u32,
}

impl PciConfigIo {
    pub fn new(root: Arc<Mutex<PciRoot>>) -> PciConfigIo {
        PciConfigIo { root, address: 0 }
    }

    /// (bus, slot, function, register offset) for a data-port access at `port_offset` (0-3),
    /// if the address register enables configuration cycles.
    fn target(&self, port_offset: u64, len: usize) -> Option<(u8, usize, u8, usize)> {
        if self.address & ADDRESS_ENABLE == 0 || port_offset as usize + len > 4 {
            return None;
        }
        let bus = (self.address >> 16) as u8;
        let slot = ((self.address >> 11) & 0x1f) as usize;
        let function = ((self.address >> 8) & 0x7) as u8;
        let register = (self.address & 0xfc) as usize + port_offset as usize;
        Some((bus, slot, function, register))
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset < 4 {
            if offset == 0 && data.len() == 4 {
                data.copy_from_slice(&self.address.to_le_bytes());
            } else {
                data.fill(0xff);
            }
            return;
        }
        match self.target(offset - 4, data.len()) {
            Some((bus, slot, function, register)) => {
                lock(&self.root).config_read(bus, slot, function, register, data)
            }
            None => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset < 4 {
            // Only a dword write at 0xCF8 is CONFIG_ADDRESS; Linux's type-1 probe writes a byte
            // to 0xCFB first, which must change nothing.
            if offset == 0 && data.len() == 4 {
                self.address =
                    u32::from_le_bytes([data[0], data[1], data[2], data[3]]) & ADDRESS_MASK;
            }
            return;
        }
        if let Some((bus, slot, function, register)) = self.target(offset - 4, data.len()) {
            lock(&self.root).config_write(bus, slot, function, register, data);
        }
    }
}

/// The MMIO window, on the MMIO bus: hands each access to the BAR that decodes it.
pub struct PciMmioWindow {
    root: Arc<Mutex<PciRoot>>,
    base: u64,
}

impl PciMmioWindow {
    pub fn new(root: Arc<Mutex<PciRoot>>, base: u64) -> PciMmioWindow {
        PciMmioWindow { root, base }
    }
}

impl BusDevice for PciMmioWindow {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if !lock(&self.root).mmio_read(self.base + offset, data) {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if !lock(&self.root).mmio_write(self.base + offset, data) {
            log::debug!(
                "pci: write to {:#x}, which no BAR decodes",
                self.base + offset
            );
        }
    }
}

/// 00:00.0: the host bridge, a header and nothing else.
pub struct HostBridge {
    config: ConfigSpace,
}

impl HostBridge {
    pub fn new() -> HostBridge {
        HostBridge {
            config: ConfigSpace::new(&Identity {
                vendor_id: HOST_BRIDGE_VENDOR_ID,
                device_id: HOST_BRIDGE_DEVICE_ID,
                revision_id: 0,
                class_code: HOST_BRIDGE_CLASS,
                subsystem_vendor_id: HOST_BRIDGE_VENDOR_ID,
                subsystem_id: 0,
            }),
        }
    }
}

impl Default for HostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl PciDevice for HostBridge {
    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        self.config.read(offset, data);
    }
    fn config_write(&mut self, offset: usize, data: &[u8]) {
        self.config.write(offset, data);
    }
    fn memory_bars(&self) -> Option<Vec<(u8, u64, u64)>> {
        None
    }
    fn bar_mapped(&mut self, _bar: u8, _address: Option<u64>) {}
    fn bar_read(&mut self, _bar: u8, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn bar_write(&mut self, _bar: u8, _offset: u64, _data: &[u8]) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::config::{BAR0, COMMAND, COMMAND_MEMORY};

    const WINDOW: u64 = 0xe000_0000;
    const WINDOW_LEN: u64 = 0x1000_0000;

    type MappedLog = Arc<Mutex<Vec<(u8, Option<u64>)>>>;
    type WriteLog = Arc<Mutex<Vec<(u64, Vec<u8>)>>>;

    /// An endpoint with one 64-bit BAR that records what it is told and serves its offset.
    struct Endpoint {
        config: ConfigSpace,
        mapped: MappedLog,
        writes: WriteLog,
    }

    impl PciDevice for Endpoint {
        fn config_read(&mut self, offset: usize, data: &mut [u8]) {
            self.config.read(offset, data);
        }
        fn config_write(&mut self, offset: usize, data: &[u8]) {
            self.config.write(offset, data);
        }
        fn memory_bars(&self) -> Option<Vec<(u8, u64, u64)>> {
            self.config
                .memory_enabled()
                .then(|| self.config.memory_bars())
        }
        fn bar_mapped(&mut self, bar: u8, address: Option<u64>) {
            self.mapped.lock().unwrap().push((bar, address));
        }
        fn bar_read(&mut self, _bar: u8, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn bar_write(&mut self, _bar: u8, offset: u64, data: &[u8]) {
            self.writes.lock().unwrap().push((offset, data.to_vec()));
        }
    }

    fn endpoint(addr: u64, size: u64) -> Endpoint {
        let mut config = ConfigSpace::new(&Identity {
            vendor_id: 0x1af4,
            device_id: 0x1041,
            revision_id: 1,
            class_code: 0x02_00_00,
            subsystem_vendor_id: 0x1af4,
            subsystem_id: 0x40,
        });
        config.add_memory_bar64(0, addr, size).unwrap();
        config.set(COMMAND, &COMMAND_MEMORY.to_le_bytes());
        Endpoint {
            config,
            mapped: MappedLog::default(),
            writes: WriteLog::default(),
        }
    }

    struct Bus {
        root: Arc<Mutex<PciRoot>>,
        io: PciConfigIo,
        mapped: MappedLog,
        writes: WriteLog,
    }

    /// The host bridge in slot 0, an endpoint with a 32 KiB BAR at the window's start in slot 1.
    fn bus() -> Bus {
        let mut root = PciRoot::new(WINDOW, WINDOW_LEN);
        root.add(0, Box::new(HostBridge::new())).unwrap();
        let ep = endpoint(WINDOW, 0x8000);
        let (mapped, writes) = (ep.mapped.clone(), ep.writes.clone());
        root.add(1, Box::new(ep)).unwrap();
        let root = Arc::new(Mutex::new(root));
        Bus {
            io: PciConfigIo::new(root.clone()),
            root,
            mapped,
            writes,
        }
    }

    fn address(slot: u32, register: u32) -> u32 {
        ADDRESS_ENABLE | slot << 11 | register
    }

    fn cfg_read32(io: &mut PciConfigIo, slot: u32, register: u32) -> u32 {
        io.write(0, &address(slot, register).to_le_bytes());
        let mut d = [0u8; 4];
        io.read(4, &mut d);
        u32::from_le_bytes(d)
    }

    fn cfg_write32(io: &mut PciConfigIo, slot: u32, register: u32, value: u32) {
        io.write(0, &address(slot, register).to_le_bytes());
        io.write(4, &value.to_le_bytes());
    }

    #[test]
    fn conf1_probe_finds_the_host_bridge() {
        let mut io = bus().io;
        // Linux's type-1 check: a byte to 0xCFB, then 0x80000000 reads back from 0xCF8.
        io.write(3, &[1]);
        io.write(0, &0x8000_0000u32.to_le_bytes());
        let mut d = [0u8; 4];
        io.read(0, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x8000_0000);
        // pci_sanity_check: the 16-bit class at 0x0a of 00:00.0 is "host bridge".
        io.write(0, &address(0, 0x08).to_le_bytes());
        let mut class = [0u8; 2];
        io.read(6, &mut class);
        assert_eq!(u16::from_le_bytes(class), 0x0600);
        assert_eq!(cfg_read32(&mut io, 0, 0), 0x0008_1b36);
        assert_eq!(cfg_read32(&mut io, 1, 0), 0x1041_1af4);
    }

    #[test]
    fn absent_functions_and_disabled_cycles_read_all_ones() {
        let mut io = bus().io;
        assert_eq!(cfg_read32(&mut io, 2, 0), u32::MAX);
        // Function 1 of slot 1, bus 1: absent.
        io.write(0, &(ADDRESS_ENABLE | 1 << 11 | 1 << 8).to_le_bytes());
        let mut d = [0u8; 4];
        io.read(4, &mut d);
        assert_eq!(d, [0xff; 4]);
        io.write(0, &(ADDRESS_ENABLE | 1 << 16 | 1 << 11).to_le_bytes());
        io.read(4, &mut d);
        assert_eq!(d, [0xff; 4]);
        // Enable bit clear: no configuration cycle.
        io.write(0, &(1u32 << 11).to_le_bytes());
        io.read(4, &mut d);
        assert_eq!(d, [0xff; 4]);
        // A data access crossing the dword is refused.
        io.write(0, &address(1, 0).to_le_bytes());
        io.read(7, &mut d[..2]);
        assert_eq!(&d[..2], &[0xff, 0xff]);
    }

    #[test]
    fn bars_are_decoded_where_programmed_and_move_with_the_guest() {
        let Bus {
            root,
            mut io,
            mapped,
            writes,
        } = bus();
        assert_eq!(*mapped.lock().unwrap(), vec![(0, Some(WINDOW))]);
        mapped.lock().unwrap().clear();
        let mut window = PciMmioWindow::new(root.clone(), WINDOW);
        let mut d = [0u8; 1];
        window.read(0x10, &mut d);
        assert_eq!(d, [0x10]);

        // Linux's sizing: decode off, all ones, restore, decode on.
        cfg_write32(&mut io, 1, COMMAND as u32, 0);
        assert_eq!(*mapped.lock().unwrap(), vec![(0, None)]);
        window.read(0x10, &mut d);
        assert_eq!(d, [0xff], "decode off: nothing answers");
        cfg_write32(&mut io, 1, BAR0 as u32, u32::MAX);
        assert_eq!(cfg_read32(&mut io, 1, BAR0 as u32), 0xffff_8004);
        cfg_write32(&mut io, 1, BAR0 as u32, WINDOW as u32);
        cfg_write32(&mut io, 1, COMMAND as u32, u32::from(COMMAND_MEMORY));
        assert_eq!(*mapped.lock().unwrap(), vec![(0, None), (0, Some(WINDOW))]);
        mapped.lock().unwrap().clear();

        // Relocation with decode on: the old range goes quiet, the new one answers.
        cfg_write32(&mut io, 1, BAR0 as u32, (WINDOW + 0x10_0000) as u32);
        assert_eq!(
            *mapped.lock().unwrap(),
            vec![(0, None), (0, Some(WINDOW + 0x10_0000))]
        );
        window.write(0x10_0004, &[7]);
        window.write(0x4, &[8]);
        assert_eq!(*writes.lock().unwrap(), vec![(4, vec![7])]);
        mapped.lock().unwrap().clear();

        // Outside the window, or misaligned (low bits do not stick, so use the high dword):
        // not decoded at all.
        cfg_write32(&mut io, 1, BAR0 as u32 + 4, 1);
        assert_eq!(*mapped.lock().unwrap(), vec![(0, None)]);
        cfg_write32(&mut io, 1, BAR0 as u32 + 4, 0);
        assert_eq!(
            mapped.lock().unwrap().last(),
            Some(&(0, Some(WINDOW + 0x10_0000)))
        );
        mapped.lock().unwrap().clear();
        cfg_write32(&mut io, 1, BAR0 as u32, 0xd000_0000);
        assert_eq!(*mapped.lock().unwrap(), vec![(0, None)], "below the window");
        cfg_write32(
            &mut io,
            1,
            BAR0 as u32,
            (WINDOW + WINDOW_LEN - 0x8000) as u32,
        );
        assert_eq!(
            mapped.lock().unwrap().last(),
            Some(&(0, Some(WINDOW + WINDOW_LEN - 0x8000)))
        );
    }

    #[test]
    fn overlapping_bars_are_not_both_decoded() {
        let Bus { root, mut io, .. } = bus();
        let ep = endpoint(WINDOW + 0x8000, 0x8000);
        let mapped2 = ep.mapped.clone();
        root.lock().unwrap().add(2, Box::new(ep)).unwrap();
        assert_eq!(*mapped2.lock().unwrap(), vec![(0, Some(WINDOW + 0x8000))]);
        // Slot 2 moves onto slot 1's BAR: not decoded while slot 1 is there, decoded once
        // slot 1 leaves.
        cfg_write32(&mut io, 2, BAR0 as u32, WINDOW as u32);
        assert_eq!(mapped2.lock().unwrap().last(), Some(&(0, None)));
        cfg_write32(&mut io, 1, BAR0 as u32, (WINDOW + 0x10_0000) as u32);
        assert_eq!(mapped2.lock().unwrap().last(), Some(&(0, Some(WINDOW))));
        assert!(root
            .lock()
            .unwrap()
            .add(2, Box::new(HostBridge::new()))
            .is_err());
        assert!(root
            .lock()
            .unwrap()
            .add(32, Box::new(HostBridge::new()))
            .is_err());
    }
}
