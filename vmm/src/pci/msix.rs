//! MSI-X: the capability's message control, the vector table and the pending-bit array (PBA),
//! with delivery through one irqfd per vector.
//!
//! Two sides share each vector's state:
//! - the guest side ([`Msix`], behind the device's lock, on vCPU threads) writes table entries,
//!   per-vector masks, the function mask and the enable bit, and keeps KVM's MSI route of each
//!   vector equal to its table entry (pushed when the vector is unmasked with a new message);
//! - the device side ([`MsixVectors::trigger`], on device threads, lock-free) writes the
//!   vector's irqfd, or sets its pending bit while the vector or the function is masked.
//!
//! The state of a vector is one atomic byte (masked, function-masked, bus mastering off,
//! disabled, pending), so an unmask racing with a trigger can neither lose the interrupt nor
//! deliver it twice: whichever of the two comes second sees the other's update and fires. While
//! MSI-X is disabled interrupts are dropped (this transport has no INTx to fall back on) and
//! nothing is pending. An MSI-X message is a memory write by the function, so while bus-master
//! enable is off in the command register a vector holds its interrupt pending, as if the
//! function were masked, and sends it when bus mastering comes back.

use std::io;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use super::{MsiMessage, PciPlatform};

pub const CAPABILITY_ID: u8 = 0x11;
/// Bytes of capability after the id and next pointer: message control, table and PBA pointers.
pub const CAPABILITY_BODY_LEN: usize = 10;
pub const ENTRY_SIZE: u64 = 16;
/// The table size field has 11 bits.
pub const MAX_VECTORS: usize = 2048;
pub const CONTROL_ENABLE: u16 = 1 << 15;
pub const CONTROL_FUNCTION_MASK: u16 = 1 << 14;
const ENTRY_ADDRESS_LOW: usize = 0;
const ENTRY_ADDRESS_HIGH: usize = 4;
const ENTRY_DATA: usize = 8;
const ENTRY_VECTOR_CONTROL: usize = 12;
const VECTOR_CONTROL_MASKED: u32 = 1;

const MASKED: u8 = 1;
const FUNCTION_MASKED: u8 = 2;
const DISABLED: u8 = 4;
const PENDING: u8 = 8;
const NO_BUS_MASTER: u8 = 16;
const BLOCKED: u8 = MASKED | FUNCTION_MASKED | DISABLED | NO_BUS_MASTER;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("MSI-X needs 1 to {MAX_VECTORS} vectors, not {0}")]
    VectorCount(usize),
}

/// The device side: one irqfd and one state byte per vector.
pub struct MsixVectors {
    states: Box<[AtomicU8]>,
    irqfds: Vec<EventFd>,
}

impl MsixVectors {
    /// Sends `vector`: writes its irqfd, or sets its pending bit while it is masked. Dropped
    /// while MSI-X is disabled; a vector the table does not have is ignored.
    pub fn trigger(&self, vector: u16) -> io::Result<()> {
        let index = usize::from(vector);
        let Some(state) = self.states.get(index) else {
            return Ok(());
        };
        let mut fire = false;
        let _ = state.fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| {
            fire = false;
            if s & DISABLED != 0 {
                None
            } else if s & BLOCKED != 0 {
                Some(s | PENDING)
            } else {
                fire = true;
                None
            }
        });
        if fire {
            self.irqfds[index].write(1)?;
        }
        Ok(())
    }

    pub fn is_pending(&self, vector: usize) -> bool {
        self.states
            .get(vector)
            .is_some_and(|s| s.load(Ordering::Acquire) & PENDING != 0)
    }

    /// Sets the mask flags of `vector` to `flags`; fires a pending interrupt the change
    /// unblocks, and forgets it when MSI-X is being disabled.
    fn set_flags(&self, vector: usize, flags: u8) -> io::Result<()> {
        let Some(state) = self.states.get(vector) else {
            return Ok(());
        };
        let mut fire = false;
        let _ = state.fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| {
            fire = false;
            let mut new = flags | (s & PENDING);
            if flags & DISABLED != 0 {
                new &= !PENDING;
            } else if new & BLOCKED == 0 && new & PENDING != 0 {
                new &= !PENDING;
                fire = true;
            }
            Some(new)
        });
        if fire {
            self.irqfds[vector].write(1)?;
        }
        Ok(())
    }
}

/// The guest side: table, PBA, message control, KVM routes.
pub struct Msix {
    table: Vec<[u8; ENTRY_SIZE as usize]>,
    vectors: Arc<MsixVectors>,
    gsi_base: u32,
    /// What KVM routes each vector's GSI to, as far as we told it.
    routed: Vec<Option<MsiMessage>>,
    platform: Arc<dyn PciPlatform>,
    control: u16,
    /// Bus-master enable of the function's command register.
    bus_master: bool,
}

impl Msix {
    /// One vector per irqfd; vector `i` is GSI `gsi_base + i`, the irqfd already registered
    /// for it. Every vector starts masked, MSI-X disabled, bus mastering off (the reset
    /// state).
    pub fn new(
        irqfds: Vec<EventFd>,
        gsi_base: u32,
        platform: Arc<dyn PciPlatform>,
    ) -> Result<Msix, Error> {
        let count = irqfds.len();
        if count == 0 || count > MAX_VECTORS {
            return Err(Error::VectorCount(count));
        }
        let mut entry = [0u8; ENTRY_SIZE as usize];
        entry[ENTRY_VECTOR_CONTROL..].copy_from_slice(&VECTOR_CONTROL_MASKED.to_le_bytes());
        let states = (0..count)
            .map(|_| AtomicU8::new(MASKED | DISABLED | NO_BUS_MASTER))
            .collect();
        Ok(Msix {
            table: vec![entry; count],
            vectors: Arc::new(MsixVectors { states, irqfds }),
            gsi_base,
            routed: vec![None; count],
            platform,
            control: 0,
            bus_master: false,
        })
    }

    pub fn count(&self) -> u16 {
        self.table.len() as u16
    }

    pub fn vectors(&self) -> Arc<MsixVectors> {
        self.vectors.clone()
    }

    pub fn table_len(&self) -> u64 {
        self.table.len() as u64 * ENTRY_SIZE
    }

    /// One bit per vector, in 64-bit words.
    pub fn pba_len(&self) -> u64 {
        self.table.len().div_ceil(64) as u64 * 8
    }

    /// The capability body (message control, table and PBA offsets in BAR `bar`) and which of
    /// its bits the guest may write (enable and function mask).
    pub fn capability(
        &self,
        bar: u8,
        table_offset: u32,
        pba_offset: u32,
    ) -> ([u8; CAPABILITY_BODY_LEN], [u8; CAPABILITY_BODY_LEN]) {
        let mut body = [0u8; CAPABILITY_BODY_LEN];
        body[0..2].copy_from_slice(&(self.count() - 1).to_le_bytes());
        body[2..6].copy_from_slice(&(table_offset | u32::from(bar)).to_le_bytes());
        body[6..10].copy_from_slice(&(pba_offset | u32::from(bar)).to_le_bytes());
        let mut writable = [0u8; CAPABILITY_BODY_LEN];
        writable[0..2].copy_from_slice(&(CONTROL_ENABLE | CONTROL_FUNCTION_MASK).to_le_bytes());
        (body, writable)
    }

    /// The guest wrote message control.
    pub fn set_control(&mut self, control: u16) {
        let control = control & (CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
        if control == self.control {
            return;
        }
        self.control = control;
        for vector in 0..self.table.len() {
            self.sync(vector);
        }
    }

    /// The guest changed bus-master enable in the command register.
    pub fn set_bus_master(&mut self, enabled: bool) {
        if enabled == self.bus_master {
            return;
        }
        self.bus_master = enabled;
        for vector in 0..self.table.len() {
            self.sync(vector);
        }
    }

    pub fn table_read(&self, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            let at = offset + i as u64;
            *byte = self
                .table
                .get((at / ENTRY_SIZE) as usize)
                .map_or(0, |e| e[(at % ENTRY_SIZE) as usize]);
        }
    }

    pub fn table_write(&mut self, offset: u64, data: &[u8]) {
        let mut touched = Vec::with_capacity(1);
        for (i, &byte) in data.iter().enumerate() {
            let at = offset + i as u64;
            let vector = (at / ENTRY_SIZE) as usize;
            let Some(entry) = self.table.get_mut(vector) else {
                log::debug!("msix: write beyond the table at {at:#x}");
                continue;
            };
            let field = (at % ENTRY_SIZE) as usize;
            entry[field] = if field == ENTRY_VECTOR_CONTROL {
                byte & VECTOR_CONTROL_MASKED as u8
            } else if field > ENTRY_VECTOR_CONTROL {
                0 // reserved bits of vector control
            } else {
                byte
            };
            if touched.last() != Some(&vector) {
                touched.push(vector);
            }
        }
        for vector in touched {
            self.sync(vector);
        }
    }

    pub fn pba_read(&self, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            let first = (offset + i as u64) as usize * 8;
            *byte = (0..8).fold(0u8, |acc, bit| {
                acc | (u8::from(self.vectors.is_pending(first + bit)) << bit)
            });
        }
    }

    fn entry_u32(&self, vector: usize, field: usize) -> u32 {
        let e = &self.table[vector];
        u32::from_le_bytes([e[field], e[field + 1], e[field + 2], e[field + 3]])
    }

    fn message(&self, vector: usize) -> MsiMessage {
        MsiMessage {
            address: u64::from(self.entry_u32(vector, ENTRY_ADDRESS_HIGH)) << 32
                | u64::from(self.entry_u32(vector, ENTRY_ADDRESS_LOW)),
            data: self.entry_u32(vector, ENTRY_DATA),
        }
    }

    /// Brings KVM's route and the vector's delivery state in line with the table and control.
    fn sync(&mut self, vector: usize) {
        let mut flags = 0;
        if self.entry_u32(vector, ENTRY_VECTOR_CONTROL) & VECTOR_CONTROL_MASKED != 0 {
            flags |= MASKED;
        }
        if self.control & CONTROL_FUNCTION_MASK != 0 {
            flags |= FUNCTION_MASKED;
        }
        if self.control & CONTROL_ENABLE == 0 {
            flags |= DISABLED;
        }
        if !self.bus_master {
            flags |= NO_BUS_MASTER;
        }
        // The route must be right before an unmask can fire a pending interrupt through it.
        // Without it the vector stays masked (KVM would deliver to no or the old message):
        // interrupts latch in the PBA, and the next sync of the vector tries again.
        if flags == 0 {
            let message = self.message(vector);
            if self.routed[vector] != Some(message) {
                let gsi = self.gsi_base + vector as u32;
                match self.platform.set_msi_route(gsi, message) {
                    Ok(()) => self.routed[vector] = Some(message),
                    Err(e) => {
                        log::warn!(
                            "msix: cannot route vector {vector} (GSI {gsi}) to address {:#x} data {:#x}; it stays masked: {e}",
                            message.address,
                            message.data
                        );
                        flags |= MASKED;
                    }
                }
            }
        }
        if let Err(e) = self.vectors.set_flags(vector, flags) {
            log::warn!("msix: cannot deliver the pending interrupt of vector {vector}: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::testing::{Call, Recorder};
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    fn msix(count: usize) -> (Msix, Arc<Recorder>) {
        let recorder = Arc::new(Recorder::default());
        let irqfds = (0..count)
            .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
            .collect();
        let mut m = Msix::new(irqfds, 24, recorder.clone()).unwrap();
        // As a driver has it before it enables MSI-X.
        m.set_bus_master(true);
        (m, recorder)
    }

    fn fired(m: &Msix, vector: usize) -> u64 {
        m.vectors.irqfds[vector].read().unwrap_or(0)
    }

    fn write_entry(m: &mut Msix, vector: u64, address: u64, data: u32, masked: bool) {
        let base = vector * ENTRY_SIZE;
        m.table_write(base, &(address as u32).to_le_bytes());
        m.table_write(base + 4, &((address >> 32) as u32).to_le_bytes());
        m.table_write(base + 8, &data.to_le_bytes());
        m.table_write(base + 12, &u32::from(masked).to_le_bytes());
    }

    fn pba(m: &Msix) -> u64 {
        let mut d = [0u8; 8];
        m.pba_read(0, &mut d);
        u64::from_le_bytes(d)
    }

    #[test]
    fn capability_describes_table_and_pba() {
        let (m, _) = msix(10);
        let (body, writable) = m.capability(0, 0x4000, 0x5000);
        assert_eq!(u16::from_le_bytes([body[0], body[1]]), 9, "table size - 1");
        assert_eq!(u32::from_le_bytes(body[2..6].try_into().unwrap()), 0x4000);
        assert_eq!(u32::from_le_bytes(body[6..10].try_into().unwrap()), 0x5000);
        assert_eq!(u16::from_le_bytes([writable[0], writable[1]]), 0xc000);
        assert_eq!((m.table_len(), m.pba_len()), (160, 8));
        assert!(Msix::new(Vec::new(), 24, Arc::new(Recorder::default())).is_err());
    }

    #[test]
    fn table_starts_masked_and_reads_back() {
        let (mut m, _) = msix(4);
        let mut d = [0u8; 4];
        m.table_read(3 * ENTRY_SIZE + 12, &mut d);
        assert_eq!(u32::from_le_bytes(d), 1, "vector control: masked");
        write_entry(&mut m, 2, 0x1_fee0_1000, 0x4041, true);
        let mut e = [0u8; 16];
        m.table_read(2 * ENTRY_SIZE, &mut e);
        assert_eq!(
            &e[..12],
            &[0x00, 0x10, 0xe0, 0xfe, 1, 0, 0, 0, 0x41, 0x40, 0, 0]
        );
        // Reserved vector-control bits read 0; beyond the table reads 0.
        m.table_write(2 * ENTRY_SIZE + 12, &0xffff_fffeu32.to_le_bytes());
        m.table_read(2 * ENTRY_SIZE + 12, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0);
        m.table_read(4 * ENTRY_SIZE, &mut d);
        assert_eq!(d, [0; 4]);
        m.table_write(100 * ENTRY_SIZE, &[1, 2, 3, 4]);
    }

    #[test]
    fn unmasked_vector_fires_its_irqfd_through_its_route() {
        let (mut m, rec) = msix(3);
        m.set_control(CONTROL_ENABLE);
        write_entry(&mut m, 1, 0xfee0_0000, 0x31, false);
        assert_eq!(
            rec.take(),
            vec![Call::Route(
                25,
                MsiMessage {
                    address: 0xfee0_0000,
                    data: 0x31
                }
            )],
            "one route push, at unmask, not per dword"
        );
        m.vectors().trigger(1).unwrap();
        assert_eq!(fired(&m, 1), 1);
        assert_eq!(fired(&m, 0), 0);
        // Out-of-range vectors are ignored.
        m.vectors().trigger(7).unwrap();
        // Re-unmasking with the same message does not push the route again.
        m.table_write(ENTRY_SIZE + 12, &1u32.to_le_bytes());
        m.table_write(ENTRY_SIZE + 12, &0u32.to_le_bytes());
        assert!(rec.take().is_empty());
    }

    #[test]
    fn masked_vector_latches_pending_and_fires_on_unmask() {
        let (mut m, rec) = msix(3);
        m.set_control(CONTROL_ENABLE);
        write_entry(&mut m, 2, 0xfee0_0000, 0x41, true);
        assert!(rec.take().is_empty(), "masked: no route yet");
        m.vectors().trigger(2).unwrap();
        m.vectors().trigger(2).unwrap();
        assert_eq!(fired(&m, 2), 0);
        assert_eq!(pba(&m), 1 << 2);
        // A new message while masked, then unmask: route first, then one interrupt.
        write_entry(&mut m, 2, 0xfee0_1000, 0x42, true);
        m.table_write(2 * ENTRY_SIZE + 12, &0u32.to_le_bytes());
        assert_eq!(
            rec.take(),
            vec![Call::Route(
                26,
                MsiMessage {
                    address: 0xfee0_1000,
                    data: 0x42
                }
            )]
        );
        assert_eq!(fired(&m, 2), 1);
        assert_eq!(pba(&m), 0);
    }

    #[test]
    fn function_mask_holds_every_vector_and_disable_drops() {
        let (mut m, _) = msix(2);
        m.set_control(CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
        write_entry(&mut m, 0, 0xfee0_0000, 0x30, false);
        write_entry(&mut m, 1, 0xfee0_0000, 0x31, false);
        m.vectors().trigger(0).unwrap();
        assert_eq!(fired(&m, 0), 0);
        assert_eq!(pba(&m), 1);
        m.set_control(CONTROL_ENABLE);
        assert_eq!(fired(&m, 0), 1, "function unmask fires the pending vector");
        assert_eq!(fired(&m, 1), 0, "and only that one");
        // Disabled: nothing fires, nothing is pending, and enabling fires nothing old.
        m.set_control(0);
        m.vectors().trigger(1).unwrap();
        assert_eq!(pba(&m), 0);
        m.set_control(CONTROL_ENABLE);
        assert_eq!(fired(&m, 1), 0);
        // Pending is forgotten when MSI-X is disabled.
        m.table_write(12, &1u32.to_le_bytes());
        m.vectors().trigger(0).unwrap();
        assert_eq!(pba(&m), 1);
        m.set_control(0);
        assert_eq!(pba(&m), 0);
    }

    #[test]
    fn bus_master_off_holds_interrupts_pending_until_it_is_back_on() {
        let (mut m, rec) = msix(2);
        m.set_control(CONTROL_ENABLE);
        write_entry(&mut m, 0, 0xfee0_0000, 0x30, false);
        write_entry(&mut m, 1, 0xfee0_0000, 0x31, false);
        rec.take();
        m.set_bus_master(false);
        m.vectors().trigger(1).unwrap();
        assert_eq!(fired(&m, 1), 0, "no MSI write without bus mastering");
        assert_eq!(pba(&m), 1 << 1);
        m.set_bus_master(true);
        assert_eq!(fired(&m, 1), 1, "the held interrupt goes out");
        assert_eq!(fired(&m, 0), 0);
        assert_eq!(pba(&m), 0);
        assert!(rec.take().is_empty(), "the routes did not change");
        // Out of reset bus mastering is off.
        let irqfds = vec![EventFd::new(EFD_NONBLOCK).unwrap()];
        let mut m = Msix::new(irqfds, 24, Arc::new(Recorder::default())).unwrap();
        m.set_control(CONTROL_ENABLE);
        write_entry(&mut m, 0, 0xfee0_0000, 0x30, false);
        m.vectors().trigger(0).unwrap();
        assert_eq!((fired(&m, 0), pba(&m)), (0, 1));
    }

    #[test]
    fn a_vector_whose_route_failed_stays_masked_until_a_sync_routes_it() {
        let (mut m, rec) = msix(2);
        m.set_control(CONTROL_ENABLE);
        rec.fail_routes.store(true, Ordering::Relaxed);
        write_entry(&mut m, 1, 0xfee0_0000, 0x31, false);
        assert_eq!(rec.take().len(), 1, "the route was tried");
        m.vectors().trigger(1).unwrap();
        assert_eq!(fired(&m, 1), 0, "no interrupt through a missing route");
        assert_eq!(pba(&m), 1 << 1, "latched instead");
        // The next sync of the vector (here: the driver rewrites its control) retries.
        rec.fail_routes.store(false, Ordering::Relaxed);
        m.table_write(ENTRY_SIZE + 12, &0u32.to_le_bytes());
        assert_eq!(
            rec.take(),
            vec![Call::Route(
                25,
                MsiMessage {
                    address: 0xfee0_0000,
                    data: 0x31
                }
            )]
        );
        assert_eq!((fired(&m, 1), pba(&m)), (1, 0));
        m.vectors().trigger(1).unwrap();
        assert_eq!(fired(&m, 1), 1);
    }

    #[test]
    fn racing_unmask_and_trigger_never_lose_an_interrupt() {
        let (mut m, _) = msix(1);
        m.set_control(CONTROL_ENABLE);
        write_entry(&mut m, 0, 0xfee0_0000, 0x30, true);
        let vectors = m.vectors();
        for _ in 0..2000 {
            let v = vectors.clone();
            let t = std::thread::spawn(move || v.trigger(0).unwrap());
            m.table_write(12, &0u32.to_le_bytes());
            t.join().unwrap();
            assert_eq!(fired(&m, 0), 1, "exactly one interrupt per trigger");
            m.table_write(12, &1u32.to_le_bytes());
        }
    }
}
