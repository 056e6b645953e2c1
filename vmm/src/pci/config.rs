//! A type-0 (endpoint) PCI configuration space: 256 bytes of registers and, per bit, whether the
//! guest may write it. BAR sizing needs no special case: the address bits below a BAR's size
//! and its type bits are read-only, so writing all ones reads back the size mask and the type.

pub const VENDOR_ID: usize = 0x00;
pub const DEVICE_ID: usize = 0x02;
pub const COMMAND: usize = 0x04;
pub const STATUS: usize = 0x06;
pub const REVISION_ID: usize = 0x08;
pub const CLASS_CODE: usize = 0x09;
pub const CACHE_LINE_SIZE: usize = 0x0c;
pub const LATENCY_TIMER: usize = 0x0d;
pub const HEADER_TYPE: usize = 0x0e;
pub const BAR0: usize = 0x10;
pub const SUBSYSTEM_VENDOR_ID: usize = 0x2c;
pub const SUBSYSTEM_ID: usize = 0x2e;
pub const CAPABILITIES_POINTER: usize = 0x34;
pub const INTERRUPT_LINE: usize = 0x3c;
pub const INTERRUPT_PIN: usize = 0x3d;

/// Size of the space conf1 reaches.
pub const CONFIG_SPACE_SIZE: usize = 256;
/// Number of BAR registers of a type-0 header.
pub const BAR_COUNT: usize = 6;
/// Capabilities start after the standard header.
const FIRST_CAPABILITY: usize = 0x40;

pub const COMMAND_IO: u16 = 1 << 0;
pub const COMMAND_MEMORY: u16 = 1 << 1;
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
const COMMAND_PARITY_ERROR_RESPONSE: u16 = 1 << 6;
const COMMAND_SERR: u16 = 1 << 8;
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
/// What the guest can change in the command register (the rest are hardwired to 0).
const COMMAND_WRITABLE: u16 = COMMAND_IO
    | COMMAND_MEMORY
    | COMMAND_BUS_MASTER
    | COMMAND_PARITY_ERROR_RESPONSE
    | COMMAND_SERR
    | COMMAND_INTX_DISABLE;
pub const STATUS_CAPABILITIES_LIST: u16 = 1 << 4;

/// Memory BAR type bits: 64-bit address.
pub const BAR_MEMORY_64: u32 = 0b100;
/// Low bits of a memory BAR that are type information, not address.
const BAR_MEMORY_FLAGS: u64 = 0xf;

/// What identifies a function.
#[derive(Debug, Clone, Copy)]
pub struct Identity {
    pub vendor_id: u16,
    pub device_id: u16,
    pub revision_id: u8,
    /// Base class, subclass and programming interface: 0xCCSSPP.
    pub class_code: u32,
    pub subsystem_vendor_id: u16,
    pub subsystem_id: u16,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("BAR {index} cannot hold a 64-bit BAR (registers {index} and {index}+1 must be free, index below 5)")]
    BarSlot { index: usize },
    #[error("BAR size {size:#x} is not a power of two of at least 4 KiB")]
    BarSize { size: u64 },
    #[error("BAR address {address:#x} is not aligned to the BAR size {size:#x}")]
    BarAlignment { address: u64, size: u64 },
    #[error("a capability of {len} bytes does not fit in configuration space at {offset:#x}")]
    NoRoom { len: usize, offset: usize },
}

pub struct ConfigSpace {
    regs: [u8; CONFIG_SPACE_SIZE],
    writable: [u8; CONFIG_SPACE_SIZE],
    /// Size of each memory BAR by its (lower) register index.
    bar_sizes: [Option<u64>; BAR_COUNT],
    /// Registers taken by BARs (64-bit BARs take two).
    bar_taken: [bool; BAR_COUNT],
    next_capability: usize,
    last_capability: Option<usize>,
}

impl ConfigSpace {
    pub fn new(id: &Identity) -> Self {
        let mut space = ConfigSpace {
            regs: [0; CONFIG_SPACE_SIZE],
            writable: [0; CONFIG_SPACE_SIZE],
            bar_sizes: [None; BAR_COUNT],
            bar_taken: [false; BAR_COUNT],
            next_capability: FIRST_CAPABILITY,
            last_capability: None,
        };
        space.set(VENDOR_ID, &id.vendor_id.to_le_bytes());
        space.set(DEVICE_ID, &id.device_id.to_le_bytes());
        space.set(REVISION_ID, &[id.revision_id]);
        space.set(CLASS_CODE, &id.class_code.to_le_bytes()[..3]);
        space.set(SUBSYSTEM_VENDOR_ID, &id.subsystem_vendor_id.to_le_bytes());
        space.set(SUBSYSTEM_ID, &id.subsystem_id.to_le_bytes());
        space.writable[COMMAND..COMMAND + 2].copy_from_slice(&COMMAND_WRITABLE.to_le_bytes());
        space.writable[CACHE_LINE_SIZE] = 0xff;
        space.writable[LATENCY_TIMER] = 0xff;
        space.writable[INTERRUPT_LINE] = 0xff;
        space
    }

    /// A 64-bit, non-prefetchable memory BAR in registers `index` and `index + 1`, already
    /// assigned `address` (as firmware would).
    pub fn add_memory_bar64(&mut self, index: usize, address: u64, size: u64) -> Result<(), Error> {
        if index + 1 >= BAR_COUNT || self.bar_taken[index] || self.bar_taken[index + 1] {
            return Err(Error::BarSlot { index });
        }
        if !size.is_power_of_two() || size < 0x1000 {
            return Err(Error::BarSize { size });
        }
        if address & (size - 1) != 0 {
            return Err(Error::BarAlignment { address, size });
        }
        let reg = BAR0 + 4 * index;
        let value = address | u64::from(BAR_MEMORY_64);
        self.set(reg, &value.to_le_bytes());
        let mask = !(size - 1) & !BAR_MEMORY_FLAGS;
        self.writable[reg..reg + 8].copy_from_slice(&mask.to_le_bytes());
        self.bar_sizes[index] = Some(size);
        self.bar_taken[index] = true;
        self.bar_taken[index + 1] = true;
        Ok(())
    }

    /// Appends a capability with id `id`; `body` follows the id and next-pointer bytes, and
    /// `writable` (same length as `body`, or shorter: the rest is read-only) says which of its
    /// bits the guest may change. Returns the capability's offset.
    pub fn add_capability(&mut self, id: u8, body: &[u8], writable: &[u8]) -> Result<usize, Error> {
        let offset = self.next_capability;
        let len = 2 + body.len();
        if offset + len > CONFIG_SPACE_SIZE {
            return Err(Error::NoRoom { len, offset });
        }
        self.regs[offset] = id;
        self.regs[offset + 1] = 0;
        self.regs[offset + 2..offset + len].copy_from_slice(body);
        let writable = &writable[..writable.len().min(body.len())];
        self.writable[offset + 2..offset + 2 + writable.len()].copy_from_slice(writable);
        match self.last_capability {
            Some(last) => self.regs[last + 1] = offset as u8,
            None => {
                self.regs[CAPABILITIES_POINTER] = offset as u8;
                let status = self.read_u16(STATUS) | STATUS_CAPABILITIES_LIST;
                self.set(STATUS, &status.to_le_bytes());
            }
        }
        self.last_capability = Some(offset);
        // Capabilities are dword aligned.
        self.next_capability = (offset + len + 3) & !3;
        Ok(offset)
    }

    /// A guest read; bytes beyond the space read as 0xff.
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = self.regs.get(offset + i).copied().unwrap_or(0xff);
        }
    }

    /// A guest write: only the writable bits change.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        for (i, &byte) in data.iter().enumerate() {
            let Some(reg) = self.regs.get_mut(offset + i) else {
                return;
            };
            let mask = self.writable[offset + i];
            *reg = (*reg & !mask) | (byte & mask);
        }
    }

    /// A device-side update that ignores the write masks (read-only fields the device owns).
    pub fn set(&mut self, offset: usize, data: &[u8]) {
        let end = (offset + data.len()).min(CONFIG_SPACE_SIZE);
        if offset < end {
            self.regs[offset..end].copy_from_slice(&data[..end - offset]);
        }
    }

    pub fn read_u8(&self, offset: usize) -> u8 {
        self.regs.get(offset).copied().unwrap_or(0xff)
    }

    pub fn read_u16(&self, offset: usize) -> u16 {
        let mut b = [0u8; 2];
        self.read(offset, &mut b);
        u16::from_le_bytes(b)
    }

    pub fn read_u32(&self, offset: usize) -> u32 {
        let mut b = [0u8; 4];
        self.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    pub fn memory_enabled(&self) -> bool {
        self.read_u16(COMMAND) & COMMAND_MEMORY != 0
    }

    /// Bus-master enable: without it the function may neither access guest memory nor send
    /// MSI-X messages (which are memory writes).
    pub fn bus_master_enabled(&self) -> bool {
        self.read_u16(COMMAND) & COMMAND_BUS_MASTER != 0
    }

    /// The programmed address of the memory BAR at `index` (type bits removed).
    pub fn bar_address(&self, index: usize) -> Option<u64> {
        self.bar_sizes.get(index).copied().flatten()?;
        let reg = BAR0 + 4 * index;
        let low = u64::from(self.read_u32(reg));
        let high = u64::from(self.read_u32(reg + 4));
        Some(((high << 32) | low) & !BAR_MEMORY_FLAGS)
    }

    /// (index, programmed address, size) of every memory BAR.
    pub fn memory_bars(&self) -> Vec<(u8, u64, u64)> {
        (0..BAR_COUNT)
            .filter_map(|i| {
                let size = self.bar_sizes[i]?;
                Some((i as u8, self.bar_address(i)?, size))
            })
            .collect()
    }

    /// True if the access `offset..offset + len` touches `start..start + size`.
    pub fn overlaps(offset: usize, len: usize, start: usize, size: usize) -> bool {
        offset < start + size && start < offset + len
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn space() -> ConfigSpace {
        ConfigSpace::new(&Identity {
            vendor_id: 0x1af4,
            device_id: 0x1041,
            revision_id: 1,
            class_code: 0x02_00_00,
            subsystem_vendor_id: 0x1af4,
            subsystem_id: 0x40,
        })
    }

    #[test]
    fn header_identifies_the_function_and_is_read_only() {
        let mut s = space();
        assert_eq!(s.read_u32(0), 0x1041_1af4);
        assert_eq!(s.read_u32(REVISION_ID), 0x0200_0001);
        s.write(VENDOR_ID, &[0, 0, 0, 0]);
        s.write(CLASS_CODE, &[9, 9, 9]);
        assert_eq!(s.read_u32(0), 0x1041_1af4);
        assert_eq!(s.read_u32(REVISION_ID), 0x0200_0001);
        assert_eq!(s.read_u16(SUBSYSTEM_ID), 0x40);
        // Only the defined command bits stick; interrupt line is scratch, pin stays 0.
        s.write(COMMAND, &0xffffu16.to_le_bytes());
        assert_eq!(s.read_u16(COMMAND), COMMAND_WRITABLE);
        s.write(INTERRUPT_LINE, &[0x0b, 0x01]);
        assert_eq!(s.read_u8(INTERRUPT_LINE), 0x0b);
        assert_eq!(s.read_u8(INTERRUPT_PIN), 0);
        // Beyond the space: all ones, writes ignored.
        let mut d = [0u8; 2];
        s.read(255, &mut d);
        assert_eq!(d, [0, 0xff]);
        s.write(255, &[1, 1]);
    }

    #[test]
    fn bar_sizing_and_relocation() {
        let mut s = space();
        s.add_memory_bar64(0, 0xe000_0000, 0x8000).unwrap();
        assert_eq!(s.read_u32(BAR0), 0xe000_0004, "address | 64-bit type");
        assert_eq!(s.read_u32(BAR0 + 4), 0);
        assert_eq!(s.memory_bars(), vec![(0, 0xe000_0000, 0x8000)]);
        // Sizing, as Linux does it: all ones into each half, read back, restore.
        s.write(BAR0, &u32::MAX.to_le_bytes());
        assert_eq!(s.read_u32(BAR0), 0xffff_8004);
        s.write(BAR0 + 4, &u32::MAX.to_le_bytes());
        assert_eq!(s.read_u32(BAR0 + 4), 0xffff_ffff);
        let size =
            !(u64::from(s.read_u32(BAR0 + 4)) << 32 | u64::from(s.read_u32(BAR0) & !0xf)) + 1;
        assert_eq!(size, 0x8000);
        s.write(BAR0, &0xe000_0000u32.to_le_bytes());
        s.write(BAR0 + 4, &0u32.to_le_bytes());
        assert_eq!(s.bar_address(0), Some(0xe000_0000));
        // Relocation, including above 4 GiB; low bits below the size do not stick.
        s.write(BAR0, &0xe123_4567u32.to_le_bytes());
        s.write(BAR0 + 4, &1u32.to_le_bytes());
        assert_eq!(s.bar_address(0), Some(0x1_e123_0000));
        // Unimplemented BARs read 0 and size to 0.
        s.write(BAR0 + 8, &u32::MAX.to_le_bytes());
        assert_eq!(s.read_u32(BAR0 + 8), 0);
        assert_eq!(s.bar_address(2), None);
    }

    #[test]
    fn bad_bars_are_refused() {
        let mut s = space();
        assert!(s.add_memory_bar64(5, 0, 0x1000).is_err());
        assert!(s.add_memory_bar64(0, 0, 0x1800).is_err());
        assert!(s.add_memory_bar64(0, 0x1000, 0x2000).is_err());
        s.add_memory_bar64(0, 0, 0x1000).unwrap();
        assert!(
            s.add_memory_bar64(1, 0x2000, 0x1000).is_err(),
            "register 1 is taken"
        );
        s.add_memory_bar64(2, 0x2000, 0x1000).unwrap();
    }

    #[test]
    fn capability_list_links_in_order_with_write_masks() {
        let mut s = space();
        assert_eq!(s.read_u16(STATUS) & STATUS_CAPABILITIES_LIST, 0);
        let a = s.add_capability(0x09, &[3, 1, 2], &[0, 0xff]).unwrap();
        let b = s.add_capability(0x11, &[0; 10], &[0, 0xc0]).unwrap();
        assert_eq!((a, b), (0x40, 0x48));
        assert_ne!(s.read_u16(STATUS) & STATUS_CAPABILITIES_LIST, 0);
        // Walk the list as a driver does.
        let mut found = Vec::new();
        let mut at = usize::from(s.read_u8(CAPABILITIES_POINTER));
        while at != 0 {
            found.push((at, s.read_u8(at)));
            at = usize::from(s.read_u8(at + 1));
        }
        assert_eq!(found, vec![(0x40, 0x09), (0x48, 0x11)]);
        s.write(a + 2, &[0xaa, 0xbb, 0xcc]);
        assert_eq!(
            [s.read_u8(a + 2), s.read_u8(a + 3), s.read_u8(a + 4)],
            [3, 0xbb, 2]
        );
        s.write(b + 1, &[0]);
        assert_eq!(s.read_u8(b + 1), 0, "next pointer is read-only");
        s.write(a + 1, &[0]);
        assert_eq!(s.read_u8(a + 1), 0x48, "next pointer is read-only");
        assert!(s.add_capability(0x09, &[0; 250], &[]).is_err());
    }
}
