//! Port I/O and MMIO dispatch from vCPU exits to devices.

use std::sync::{Arc, Mutex};

/// A device on the PIO or MMIO bus. Offsets are relative to the device's base.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("bus range {base:#x}+{len:#x} overlaps a device already at {other:#x}")]
    Overlap { base: u64, len: u64, other: u64 },
    #[error("bus range {base:#x}+{len:#x} is empty or wraps around")]
    BadRange { base: u64, len: u64 },
}

struct Entry {
    base: u64,
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// A sorted list of non-overlapping ranges; lookups are a binary search.
#[derive(Default)]
pub struct Bus {
    entries: Vec<Entry>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(
        &mut self,
        base: u64,
        len: u64,
        device: Arc<Mutex<dyn BusDevice>>,
    ) -> Result<(), Error> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(Error::BadRange { base, len })?;
        if let Some(other) = self
            .entries
            .iter()
            .find(|e| base < e.base + e.len && e.base < end)
        {
            return Err(Error::Overlap {
                base,
                len,
                other: other.base,
            });
        }
        let pos = self.entries.partition_point(|e| e.base < base);
        self.entries.insert(pos, Entry { base, len, device });
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(&Entry, u64)> {
        let pos = self.entries.partition_point(|e| e.base <= addr);
        let entry = self.entries.get(pos.checked_sub(1)?)?;
        let offset = addr - entry.base;
        (offset < entry.len).then_some((entry, offset))
    }

    /// Runs `f` on the device claiming `addr` with the offset into it; false if none does.
    fn with_device(&self, addr: u64, f: impl FnOnce(&mut dyn BusDevice, u64)) -> bool {
        match self.find(addr) {
            Some((entry, offset)) => {
                let mut device = entry.device.lock().unwrap_or_else(|e| e.into_inner());
                f(&mut *device, offset);
                true
            }
            None => false,
        }
    }

    /// Returns false when no device claims `addr` (the caller decides what the guest reads).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        self.with_device(addr, |device, offset| device.read(offset, data))
    }

    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        self.with_device(addr, |device, offset| device.write(offset, data))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder(Vec<(u64, Vec<u8>)>);
    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_by_range_and_refuses_overlaps() {
        let mut bus = Bus::new();
        let a = Arc::new(Mutex::new(Recorder::default()));
        let b = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(0x100, 0x10, a.clone()).unwrap();
        bus.insert(0x200, 0x10, b.clone()).unwrap();
        assert!(bus.insert(0x108, 0x10, b.clone()).is_err());
        assert!(bus.insert(0x1f8, 0x10, b.clone()).is_err());
        assert!(bus.insert(0x300, 0, b.clone()).is_err());
        assert!(bus.insert(u64::MAX, 2, b.clone()).is_err());
        let mut d = [0u8; 2];
        assert!(bus.read(0x105, &mut d));
        assert_eq!(d, [5, 5]);
        assert!(!bus.read(0x110, &mut d));
        assert!(!bus.read(0xff, &mut d));
        assert!(bus.write(0x20f, &[1]));
        assert_eq!(b.lock().unwrap().0, vec![(0xf, vec![1])]);
        assert!(a.lock().unwrap().0.is_empty());
    }
}
