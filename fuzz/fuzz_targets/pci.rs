// SPDX-License-Identifier: Apache-2.0
//! The virtio-pci transport as the guest reaches it: the PCI root (`vmm::pci::PciRoot`) with
//! the host bridge at 00:00.0 and `vmm::virtio::pci::VirtioPciDevice` at 00:01.0, wired as
//! `vm.rs` wires them — `PciConfigIo` on a port bus at 0xCF8, `PciMmioWindow` on an MMIO bus
//! over the 32-bit BAR window — with the real `Net` behind the function (fake backends), so
//! that conf1, configuration space (BAR sizing and relocation, capability list, MSI-X message
//! control, the PCI_CFG access window), every region of BAR 0 (common configuration, ISR,
//! device configuration, notify, MSI-X table and PBA), feature negotiation, activation
//! (worker and control threads), kicks, interrupts and reset all run.
//!
//! KVM is replaced by a fake [`PciPlatform`] (the trait the function's unit tests fake too):
//! it keeps the MSI routes and the ioeventfds the function registers, like KVM it turns a
//! guest write to a registered notify address into a write of that eventfd, which never
//! reaches the function, and it refuses a route, an ioeventfd or an ioeventfd removal when
//! the input says so. The MSI-X irqfds are eventfds the harness reads.
//!
//! Input: device byte (pairs, MQ, MTU), queue-size byte, initially attached backends, then
//! operations (tag % 16, names in `mqvmm_fuzz::pci_op`):
//! 0/1 configuration read/write through 0xCF8/0xCFC (function, register, width 1/2/4, any
//! value), 2 any access to ports 0xCF8-0xCFF, 3/4 read/write in the BAR window (a region of
//! BAR 0 at wherever the guest programmed it, or anywhere; widths 1/2/4/8), 5 handshake up to
//! FEATURES_OK with an input-chosen feature mask (bus mastering turned on first, unless the
//! input says not to), 6 set up one queue with an MSI-X vector,
//! 7 write the device status (reset, DRIVER_OK, FAILED, anything), 8 write an MSI-X table
//! entry, 9 write MSI-X message control (enable, function mask), 10 mask/unmask one vector,
//! 11 set the configuration or a queue vector, 12 shape the memory of a set-up queue
//! (`ring_op`), 13 notify a queue, 14 queue a frame or an error in a backend, or make a
//! backend call or a KVM call fail, 15 size and relocate BAR 0 as Linux does (memory decode
//! off, all ones, new address, decode on). The driver-side operations (5-8, 10, 11, 13) go
//! through the BAR or, as the input chooses, through the PCI_CFG capability's window.
//!
//! Checks, after every operation: both functions keep their vendor and device ids; the status
//! only holds a prefix of the handshake plus NEEDS_RESET/FAILED; a status or queue count read
//! through the BAR agrees with the function; a queue's vector reads back as a vector the
//! table has or NO_VECTOR; all-ones in BAR 0 reads back its size and type; each queue has at
//! most one ioeventfd, its own eventfd at its notify address where the root decodes BAR 0
//! now (unless KVM refused to add it, or to remove one elsewhere), never two at one address,
//! none removed that was not added, none outside the window; MSI routes only for the
//! function's GSIs; an irqfd fires only for a vector with a route; a vector the guest let go
//! (MSI-X on, neither it nor the function masked, bus mastering on) is routed to its table
//! entry unless KVM refused that route; a pending bit is only set while MSI-X is enabled and
//! the vector is held back (masked, function masked, bus mastering off, or its route
//! refused). Dropping everything leaves no thread and no fd behind.
#![no_main]

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use mqvmm_fuzz::pci_op as op;
use mqvmm_fuzz::{
    assert_status_prefix, guest_memory, net_from_input, read_fault, ring_op, thread_and_fd_count,
    trace, FuzzNet, Input, Ring, RxEvent,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_net::features::bit;
use vm_memory::GuestMemoryMmap;
use vmm::arch::layout::{MSI_GSI_BASE, PCI_MMIO32_SIZE, PCI_MMIO32_START};
use vmm::bus::Bus;
use vmm::pci::config::{BAR0, CAPABILITIES_POINTER, COMMAND, COMMAND_BUS_MASTER, COMMAND_MEMORY};
use vmm::pci::msix::{self, CONTROL_ENABLE, CONTROL_FUNCTION_MASK, ENTRY_SIZE};
use vmm::pci::root::{CONFIG_IO_LEN, CONFIG_IO_PORT, HOST_BRIDGE_DEVICE_ID, HOST_BRIDGE_VENDOR_ID};
use vmm::pci::{
    HostBridge, MsiMessage, PciConfigIo, PciDevice, PciMmioWindow, PciPlatform, PciRoot,
};
use vmm::virtio::mmio::{
    STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FAILED, STATUS_FEATURES_OK,
};
use vmm::virtio::pci::{
    vector_count, PciTransportConfig, VirtioPciDevice, CAP_PCI_CFG, DEVICE_CFG_OFFSET, ISR_OFFSET,
    MSIX_TABLE_OFFSET, NOTIFY_OFFSET, NOTIFY_OFF_MULTIPLIER, NO_VECTOR, VIRTIO_PCI_DEVICE_ID_BASE,
    VIRTIO_PCI_VENDOR_ID,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Slots as `vm.rs` fills them.
const HOST_BRIDGE_SLOT: usize = 0;
const NET_SLOT: usize = 1;
const CONFIG_DATA_PORT: u64 = CONFIG_IO_PORT as u64 + 4;
const ADDRESS_ENABLE: u32 = 1 << 31;

/// `struct virtio_pci_common_cfg` (virtio 1.2, 4.1.4.3), as a driver knows it.
const DEVICE_FEATURE_SELECT: u64 = 0x00;
const DEVICE_FEATURE: u64 = 0x04;
const DRIVER_FEATURE_SELECT: u64 = 0x08;
const DRIVER_FEATURE: u64 = 0x0c;
const CONFIG_MSIX_VECTOR: u64 = 0x10;
const NUM_QUEUES: u64 = 0x12;
const DEVICE_STATUS: u64 = 0x14;
const QUEUE_SELECT: u64 = 0x16;
const QUEUE_SIZE: u64 = 0x18;
const QUEUE_MSIX_VECTOR: u64 = 0x1a;
const QUEUE_ENABLE: u64 = 0x1c;
const QUEUE_DESC: u64 = 0x20;
const QUEUE_DRIVER: u64 = 0x28;
const QUEUE_DEVICE: u64 = 0x30;
const COMMON_FIELDS: [u64; 21] = [
    0x00, 0x04, 0x08, 0x0c, 0x10, 0x12, 0x14, 0x15, 0x16, 0x18, 0x1a, 0x1c, 0x1e, 0x20, 0x24, 0x28,
    0x2c, 0x30, 0x34, 0x38, 0x3a,
];
/// `struct virtio_pci_cfg_cap`: bar, offset, length and data, from the capability's start.
const PCI_CFG_BAR: usize = 4;
const PCI_CFG_OFFSET: usize = 8;
const PCI_CFG_LENGTH: usize = 12;
const PCI_CFG_DATA: usize = 16;
/// MSI-X table entry: vector control's mask bit.
const ENTRY_VECTOR_CONTROL: u64 = 12;

/// What the fake KVM holds.
#[derive(Default)]
struct KvmState {
    vectors: u32,
    routes: BTreeMap<u32, MsiMessage>,
    /// (address, the function's fd number, our copy of the eventfd).
    ioevents: Vec<(u64, RawFd, EventFd)>,
    /// The k-th next call fails (0: none pending).
    fail_route_in: u32,
    fail_register_in: u32,
    fail_unregister_in: u32,
    route_failed: bool,
    register_failed: bool,
    unregister_failed: bool,
}

/// KVM as the PCI code sees it, with KVM's refusals turned into assertions where a refusal
/// would mean the function lost track of what it registered.
#[derive(Default)]
struct FakeKvm(Mutex<KvmState>);

impl FakeKvm {
    fn state(&self) -> MutexGuard<'_, KvmState> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn countdown(k: &mut u32) -> bool {
    if *k == 0 {
        return false;
    }
    *k -= 1;
    *k == 0
}

impl PciPlatform for FakeKvm {
    fn set_msi_route(&self, gsi: u32, message: MsiMessage) -> io::Result<()> {
        let mut s = self.state();
        assert!(
            (MSI_GSI_BASE..MSI_GSI_BASE + s.vectors).contains(&gsi),
            "route for GSI {gsi}, not one of the function's {} vectors",
            s.vectors
        );
        if countdown(&mut s.fail_route_in) {
            s.route_failed = true;
            return Err(io::Error::from_raw_os_error(libc::ENOMEM));
        }
        s.routes.insert(gsi, message);
        Ok(())
    }

    fn register_ioevent(&self, fd: &EventFd, addr: u64) -> io::Result<()> {
        let mut s = self.state();
        assert!(
            (PCI_MMIO32_START..PCI_MMIO32_START + PCI_MMIO32_SIZE).contains(&addr),
            "ioeventfd at {addr:#x}, outside the BAR window"
        );
        // KVM refuses a second ioeventfd at an address (EEXIST).
        assert!(
            !s.ioevents.iter().any(|e| e.0 == addr),
            "a second ioeventfd at {addr:#x}"
        );
        if countdown(&mut s.fail_register_in) {
            s.register_failed = true;
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        let copy = fd.try_clone()?;
        s.ioevents.push((addr, fd.as_raw_fd(), copy));
        Ok(())
    }

    fn unregister_ioevent(&self, fd: &EventFd, addr: u64) -> io::Result<()> {
        let mut s = self.state();
        let at = s
            .ioevents
            .iter()
            .position(|e| e.0 == addr && e.1 == fd.as_raw_fd());
        // KVM: ENOENT. The function only removes what it registered.
        let at = at.unwrap_or_else(|| {
            panic!(
                "unregister of fd {} at {addr:#x}, never registered",
                fd.as_raw_fd()
            )
        });
        if countdown(&mut s.fail_unregister_in) {
            // Still registered, as in KVM.
            s.unregister_failed = true;
            return Err(io::Error::from_raw_os_error(libc::ENOMEM));
        }
        s.ioevents.remove(at);
        Ok(())
    }
}

/// The function as the root sees it; records where the root decodes BAR 0.
struct Function {
    dev: Arc<Mutex<VirtioPciDevice>>,
    mapped: Arc<Mutex<Option<u64>>>,
}

fn relock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl PciDevice for Function {
    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        relock(&self.dev).config_read(offset, data)
    }
    fn config_write(&mut self, offset: usize, data: &[u8]) {
        relock(&self.dev).config_write(offset, data)
    }
    fn memory_bars(&self) -> Option<Vec<(u8, u64, u64)>> {
        relock(&self.dev).memory_bars()
    }
    fn bar_mapped(&mut self, bar: u8, address: Option<u64>) {
        if bar == 0 {
            *relock(&self.mapped) = address;
        }
        relock(&self.dev).bar_mapped(bar, address)
    }
    fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
        relock(&self.dev).bar_read(bar, offset, data)
    }
    fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]) {
        relock(&self.dev).bar_write(bar, offset, data)
    }
}

/// How a driver-side access reaches BAR 0.
#[derive(Debug, Clone, Copy)]
enum Via {
    Bar,
    /// The VIRTIO_PCI_CAP_PCI_CFG window in configuration space.
    PciCfg,
}

struct Vm {
    pio: Bus,
    mmio: Bus,
    root: Arc<Mutex<PciRoot>>,
    dev: Arc<Mutex<VirtioPciDevice>>,
    mapped: Arc<Mutex<Option<u64>>>,
    kvm: Arc<FakeKvm>,
    /// Our copies of the MSI-X irqfds.
    irqfds: Vec<EventFd>,
    queues: usize,
    vectors: usize,
    bar_size: u64,
    pci_cfg_cap: usize,
    msix_cap: usize,
    pba_offset: u64,
    /// Configuration registers worth aiming at: the header's and every capability's fields.
    cfg_registers: Vec<usize>,
}

fn address(slot: usize, register: usize) -> u32 {
    ADDRESS_ENABLE | (slot as u32) << 11 | (register as u32 & 0xfc)
}

impl Vm {
    fn new(net: Box<dyn vmm::virtio::VirtioDevice>, mem: GuestMemoryMmap) -> Vm {
        let queues = net.queue_max_sizes().len();
        let vectors = vector_count(queues);
        let kvm = Arc::new(FakeKvm::default());
        kvm.state().vectors = vectors as u32;
        let irqfds: Vec<EventFd> = (0..vectors)
            .map(|_| EventFd::new(EFD_NONBLOCK).expect("irqfd"))
            .collect();
        let ours = irqfds
            .iter()
            .map(|e| e.try_clone().expect("irqfd copy"))
            .collect();
        let function = VirtioPciDevice::new(
            net,
            mem,
            PciTransportConfig {
                bar_address: PCI_MMIO32_START,
                msi_gsi_base: MSI_GSI_BASE,
                irqfds,
            },
            kvm.clone(),
        )
        .expect("virtio-pci function over a valid device");
        let bar_size = function.bar_size();
        let dev = Arc::new(Mutex::new(function));
        let mapped = Arc::new(Mutex::new(None));
        let mut root = PciRoot::new(PCI_MMIO32_START, PCI_MMIO32_SIZE);
        root.add(HOST_BRIDGE_SLOT, Box::new(HostBridge::new()))
            .expect("host bridge slot");
        root.add(
            NET_SLOT,
            Box::new(Function {
                dev: dev.clone(),
                mapped: mapped.clone(),
            }),
        )
        .expect("net slot");
        let root = Arc::new(Mutex::new(root));
        let mut pio = Bus::new();
        pio.insert(
            u64::from(CONFIG_IO_PORT),
            CONFIG_IO_LEN,
            Arc::new(Mutex::new(PciConfigIo::new(root.clone()))),
        )
        .expect("conf1 ports");
        let mut mmio = Bus::new();
        mmio.insert(
            PCI_MMIO32_START,
            PCI_MMIO32_SIZE,
            Arc::new(Mutex::new(PciMmioWindow::new(
                root.clone(),
                PCI_MMIO32_START,
            ))),
        )
        .expect("BAR window");
        let mut vm = Vm {
            pio,
            mmio,
            root,
            dev,
            mapped,
            kvm,
            irqfds: ours,
            queues,
            vectors,
            bar_size,
            pci_cfg_cap: 0,
            msix_cap: 0,
            pba_offset: 0,
            cfg_registers: vec![
                0x00, 0x02, 0x04, 0x06, 0x08, 0x0c, 0x0e, 0x10, 0x14, 0x18, 0x1c, 0x20, 0x24, 0x2c,
                0x2e, 0x34, 0x3c, 0x3d,
            ],
        };
        // Walk the capability list as a driver does.
        let mut at = vm.cfg_read(NET_SLOT, CAPABILITIES_POINTER, 1) as usize;
        let mut seen = 0;
        while at != 0 && seen < 48 {
            let id = vm.cfg_read(NET_SLOT, at, 1) as u8;
            let cfg_type = vm.cfg_read(NET_SLOT, at + 3, 1) as u8;
            if id == msix::CAPABILITY_ID {
                vm.msix_cap = at;
            } else if cfg_type == CAP_PCI_CFG {
                vm.pci_cfg_cap = at;
            }
            vm.cfg_registers
                .extend([0, 1, 2, 3, 4, 8, 12, 16].map(|d| at + d));
            at = vm.cfg_read(NET_SLOT, at + 1, 1) as usize;
            seen += 1;
        }
        assert!(vm.msix_cap != 0 && vm.pci_cfg_cap != 0, "capability list");
        vm.pba_offset = u64::from(vm.cfg_read(NET_SLOT, vm.msix_cap + 8, 4) & !7);
        vm
    }

    fn cfg_read(&mut self, slot: usize, register: usize, len: usize) -> u32 {
        self.pio.write(
            u64::from(CONFIG_IO_PORT),
            &address(slot, register).to_le_bytes(),
        );
        let mut d = [0u8; 4];
        self.pio
            .read(CONFIG_DATA_PORT + (register as u64 & 3), &mut d[..len]);
        u32::from_le_bytes(d)
    }

    fn cfg_write(&mut self, slot: usize, register: usize, data: &[u8]) {
        self.pio.write(
            u64::from(CONFIG_IO_PORT),
            &address(slot, register).to_le_bytes(),
        );
        self.pio
            .write(CONFIG_DATA_PORT + (register as u64 & 3), data);
    }

    /// Where the guest believes BAR 0 is: what it programmed, whether or not decoded.
    fn bar_base(&self) -> u64 {
        let mut dev = relock(&self.dev);
        let mut lo = [0u8; 4];
        let mut hi = [0u8; 4];
        dev.config_read(BAR0, &mut lo);
        dev.config_read(BAR0 + 4, &mut hi);
        (u64::from(u32::from_le_bytes(hi)) << 32 | u64::from(u32::from_le_bytes(lo))) & !0xf
    }

    fn mmio_read(&mut self, addr: u64, data: &mut [u8]) {
        self.mmio.read(addr, data);
    }

    /// A guest write: an ioeventfd at `addr` takes it whatever its length (KVM's
    /// KVM_IOEVENTFD without datamatch), else it exits to the bus.
    fn mmio_write(&mut self, addr: u64, data: &[u8]) {
        {
            let kvm = self.kvm.state();
            if let Some(e) = kvm.ioevents.iter().find(|e| e.0 == addr) {
                let _ = e.2.write(1);
                return;
            }
        }
        self.mmio.write(addr, data);
    }

    fn pci_cfg_window(&mut self, offset: u64, len: usize) {
        let cap = self.pci_cfg_cap;
        self.cfg_write(NET_SLOT, cap + PCI_CFG_BAR, &[0]);
        self.cfg_write(
            NET_SLOT,
            cap + PCI_CFG_OFFSET,
            &(offset as u32).to_le_bytes(),
        );
        self.cfg_write(NET_SLOT, cap + PCI_CFG_LENGTH, &(len as u32).to_le_bytes());
    }

    /// A driver read of BAR 0 at `offset` (len 1, 2, 4 or 8).
    fn reg_read(&mut self, via: Via, offset: u64, len: usize) -> u64 {
        let mut d = [0u8; 8];
        match via {
            Via::Bar => {
                let addr = self.bar_base().wrapping_add(offset);
                self.mmio_read(addr, &mut d[..len]);
            }
            Via::PciCfg => {
                for (i, chunk) in d[..len].chunks_mut(4).enumerate() {
                    self.pci_cfg_window(offset + 4 * i as u64, chunk.len());
                    let v = self.cfg_read(NET_SLOT, self.pci_cfg_cap + PCI_CFG_DATA, chunk.len());
                    chunk.copy_from_slice(&v.to_le_bytes()[..chunk.len()]);
                }
            }
        }
        u64::from_le_bytes(d)
    }

    fn reg_write(&mut self, via: Via, offset: u64, len: usize, value: u64) {
        let v = value.to_le_bytes();
        match via {
            Via::Bar => {
                let addr = self.bar_base().wrapping_add(offset);
                self.mmio_write(addr, &v[..len]);
            }
            Via::PciCfg => {
                for (i, chunk) in v[..len].chunks(4).enumerate() {
                    self.pci_cfg_window(offset + 4 * i as u64, chunk.len());
                    self.cfg_write(NET_SLOT, self.pci_cfg_cap + PCI_CFG_DATA, chunk);
                }
            }
        }
    }

    fn set_status(&mut self, via: Via, status: u32) {
        self.reg_write(via, DEVICE_STATUS, 1, u64::from(status));
    }

    fn status(&self) -> u32 {
        u32::from(relock(&self.dev).status())
    }

    /// A vector: one the table has, one past it, NO_VECTOR, or anything.
    fn vector(&self, inp: &mut Input) -> u16 {
        let b = inp.u8();
        match b % 4 {
            0 => NO_VECTOR,
            1 | 2 => u16::from(b >> 2) % (self.vectors as u16 + 1),
            _ => inp.u16(),
        }
    }

    /// A BAR-window address: a region of BAR 0 where the guest put it, or anywhere in the
    /// window.
    fn bar_address(&self, inp: &mut Input) -> (u64, u64) {
        let b = inp.u8();
        let low = u64::from(b & 0x1f);
        let offset = match b >> 5 {
            0 => COMMON_FIELDS[usize::from(b) % COMMON_FIELDS.len()],
            1 => ISR_OFFSET + low,
            2 => DEVICE_CFG_OFFSET + low,
            3 => NOTIFY_OFFSET + low,
            4 => MSIX_TABLE_OFFSET + u64::from(inp.u8()),
            5 => self.pba_offset + low,
            6 => u64::from(inp.u16()),
            _ => {
                let addr = PCI_MMIO32_START + u64::from(inp.u32()) % PCI_MMIO32_SIZE;
                return (addr, addr.wrapping_sub(self.bar_base()));
            }
        };
        (self.bar_base().wrapping_add(offset), offset)
    }

    /// The configuration address register value for a config access: mostly the net
    /// function, sometimes the host bridge, any slot, or any bus/function/enable bits.
    fn cfg_target(&self, inp: &mut Input, register: usize) -> u32 {
        let b = inp.u8();
        match b % 8 {
            0..=4 => address(NET_SLOT, register),
            5 => address(HOST_BRIDGE_SLOT, register),
            6 => address(usize::from(b >> 3) % 32, register),
            _ => (inp.u32() & !0xff) | (register as u32 & 0xfc),
        }
    }

    fn cfg_register(&self, inp: &mut Input) -> usize {
        let b = inp.u8();
        if b < 0xc0 {
            self.cfg_registers[usize::from(b) % self.cfg_registers.len()]
        } else {
            usize::from(inp.u8())
        }
    }

    /// BAR sizing and relocation, as Linux's `__pci_read_base` and a reassignment do it.
    fn relocate(&mut self, inp: &mut Input) {
        let b = inp.u8();
        let command = self.cfg_read(NET_SLOT, COMMAND, 2) as u16;
        if b & 1 != 0 {
            self.cfg_write(
                NET_SLOT,
                COMMAND,
                &(command & !COMMAND_MEMORY).to_le_bytes(),
            );
        }
        let old = self.bar_base();
        if b & 2 != 0 {
            self.cfg_write(NET_SLOT, BAR0, &u32::MAX.to_le_bytes());
            self.cfg_write(NET_SLOT, BAR0 + 4, &u32::MAX.to_le_bytes());
            let lo = self.cfg_read(NET_SLOT, BAR0, 4);
            let hi = self.cfg_read(NET_SLOT, BAR0 + 4, 4);
            let size = (!(u64::from(hi) << 32 | u64::from(lo & !0xf))).wrapping_add(1);
            assert_eq!(lo & 0xf, 0b0100, "BAR 0 type: 64-bit memory");
            assert_eq!(size, self.bar_size, "BAR 0 sizes to {size:#x}");
        }
        let new = match b >> 2 & 3 {
            0 => old,
            1 => PCI_MMIO32_START + u64::from(inp.u16()) * self.bar_size % PCI_MMIO32_SIZE,
            2 => inp.u64(),
            _ => match inp.u8() % 4 {
                0 => PCI_MMIO32_START - self.bar_size,
                1 => PCI_MMIO32_START + PCI_MMIO32_SIZE - self.bar_size,
                2 => PCI_MMIO32_START + PCI_MMIO32_SIZE,
                _ => PCI_MMIO32_START + self.bar_size / 2,
            },
        };
        self.cfg_write(NET_SLOT, BAR0, &(new as u32).to_le_bytes());
        self.cfg_write(NET_SLOT, BAR0 + 4, &((new >> 32) as u32).to_le_bytes());
        if b & 0x10 != 0 {
            let on = command | COMMAND_MEMORY | COMMAND_BUS_MASTER;
            self.cfg_write(NET_SLOT, COMMAND, &on.to_le_bytes());
        } else if b & 1 != 0 && b & 0x20 != 0 {
            self.cfg_write(NET_SLOT, COMMAND, &command.to_le_bytes());
        }
        trace!(
            "pci: BAR 0 programmed {:#x}, decoded {:?}",
            self.bar_base(),
            *relock(&self.mapped)
        );
    }

    fn check(&mut self) {
        let mut id = [0u8; 4];
        relock(&self.root).config_read(0, HOST_BRIDGE_SLOT, 0, 0, &mut id);
        assert_eq!(
            u32::from_le_bytes(id),
            u32::from(HOST_BRIDGE_DEVICE_ID) << 16 | u32::from(HOST_BRIDGE_VENDOR_ID),
            "host bridge ids"
        );
        relock(&self.root).config_read(0, NET_SLOT, 0, 0, &mut id);
        assert_eq!(
            u32::from_le_bytes(id),
            u32::from(VIRTIO_PCI_DEVICE_ID_BASE + 1) << 16 | u32::from(VIRTIO_PCI_VENDOR_ID),
            "virtio-net function ids"
        );
        let mapped = *relock(&self.mapped);
        let mut dev = relock(&self.dev);
        assert_status_prefix(u32::from(dev.status()));

        // ioeventfds: at most one per queue, its own eventfd at its notify address where
        // BAR 0 is decoded. One KVM refused to remove stays where it was; one KVM refused to
        // add is missing.
        let kvm = self.kvm.state();
        let kicks: Vec<RawFd> = dev.queue_kicks().iter().map(|k| k.as_raw_fd()).collect();
        for e in &kvm.ioevents {
            assert!(
                kicks.contains(&e.1),
                "ioeventfd of fd {} at {:#x} is no queue's",
                e.1,
                e.0
            );
        }
        for (q, &fd) in kicks.iter().enumerate() {
            let at: Vec<u64> = kvm
                .ioevents
                .iter()
                .filter(|e| e.1 == fd)
                .map(|e| e.0)
                .collect();
            assert!(at.len() <= 1, "queue {q} has ioeventfds at {at:x?}");
            let wanted = mapped
                .map(|base| base + NOTIFY_OFFSET + q as u64 * u64::from(NOTIFY_OFF_MULTIPLIER));
            match at.first() {
                Some(&at) => assert!(
                    Some(at) == wanted || kvm.unregister_failed,
                    "queue {q}'s ioeventfd at {at:#x}, BAR 0 decoded at {mapped:x?}"
                ),
                None => assert!(
                    wanted.is_none() || kvm.register_failed,
                    "queue {q} has no ioeventfd, BAR 0 decoded at {mapped:x?}"
                ),
            }
        }

        // Interrupts go out only through a route (a vector whose route KVM refused stays
        // masked).
        for (v, irqfd) in self.irqfds.iter().enumerate() {
            if let Ok(n) = irqfd.read() {
                trace!("pci: vector {v} fired {n} times");
                let gsi = MSI_GSI_BASE + v as u32;
                assert!(
                    kvm.routes.contains_key(&gsi),
                    "vector {v} fired with no MSI route for GSI {gsi}"
                );
            }
        }

        // A vector the guest let go (MSI-X on, neither it nor the function masked, bus
        // mastering on) is routed to its table entry, unless KVM refused that route; a
        // pending bit is only set while the vector is held back by one of those, or by a
        // route KVM refused.
        let mut control = [0u8; 2];
        dev.config_read(self.msix_cap + 2, &mut control);
        let control = u16::from_le_bytes(control);
        let mut command = [0u8; 2];
        dev.config_read(COMMAND, &mut command);
        let bus_master = u16::from_le_bytes(command) & COMMAND_BUS_MASTER != 0;
        let mut pba = [0u8; 8];
        for v in 0..self.vectors {
            if v.is_multiple_of(64) {
                dev.bar_read(0, self.pba_offset + v as u64 / 8, &mut pba);
            }
            let pending = u64::from_le_bytes(pba) & 1 << (v % 64) != 0;
            let mut entry = [0u8; ENTRY_SIZE as usize];
            dev.bar_read(0, MSIX_TABLE_OFFSET + v as u64 * ENTRY_SIZE, &mut entry);
            let word =
                |i: usize| u32::from_le_bytes([entry[i], entry[i + 1], entry[i + 2], entry[i + 3]]);
            let message = MsiMessage {
                address: u64::from(word(4)) << 32 | u64::from(word(0)),
                data: word(8),
            };
            let masked = word(ENTRY_VECTOR_CONTROL as usize) & 1 != 0;
            let enabled = control & CONTROL_ENABLE != 0;
            let held = control & CONTROL_FUNCTION_MASK != 0 || masked || !bus_master;
            let routed = kvm.routes.get(&(MSI_GSI_BASE + v as u32)) == Some(&message);
            if enabled && !held {
                assert!(
                    routed || kvm.route_failed,
                    "vector {v} is live with table entry {message:x?} but routed to {:x?}",
                    kvm.routes.get(&(MSI_GSI_BASE + v as u32))
                );
            }
            if pending {
                assert!(enabled, "vector {v} pending while MSI-X is disabled");
                assert!(held || !routed, "vector {v} pending while live and routed");
            }
        }
        if !self.vectors.is_multiple_of(64) {
            let beyond = u64::from_le_bytes(pba) >> (self.vectors % 64);
            assert_eq!(
                beyond, 0,
                "pending bits beyond the table's {}",
                self.vectors
            );
        }
    }
}

fn run(data: &[u8]) {
    mqvmm_fuzz::tracing();
    let mut inp = Input::new(data);
    let Some(FuzzNet {
        net,
        plan,
        handles,
        queue_size,
    }) = net_from_input(&mut inp)
    else {
        return;
    };
    let pairs = handles.len();
    let mem = guest_memory();
    let mut vm = Vm::new(Box::new(net), mem.clone());
    let queues = vm.queues;
    let vectors = vm.vectors;
    let mut rings: Vec<Option<Ring>> = vec![None; queues];
    let via = |b: u8| if b & 1 != 0 { Via::PciCfg } else { Via::Bar };

    let mut last_status = 0;
    while !inp.is_empty() {
        let tag = inp.u8() % op::COUNT;
        match tag {
            op::CFG_READ | op::CFG_WRITE => {
                let register = vm.cfg_register(&mut inp);
                let target = vm.cfg_target(&mut inp, register);
                let width = 1usize << (inp.u8() % 3);
                let port = CONFIG_DATA_PORT + (register as u64 & 3);
                vm.pio
                    .write(u64::from(CONFIG_IO_PORT), &target.to_le_bytes());
                if tag == op::CFG_READ {
                    let mut d = [0u8; 4];
                    vm.pio.read(port, &mut d[..width]);
                } else {
                    let v = inp.value().to_le_bytes();
                    vm.pio.write(port, &v[..width]);
                }
            }
            op::PORT => {
                let b = inp.u8();
                let port = u64::from(CONFIG_IO_PORT) + u64::from(b % 8);
                let width = 1usize << (b >> 3 & 3).min(2);
                if b & 0x80 != 0 {
                    let v = inp.value().to_le_bytes();
                    vm.pio.write(port, &v[..width]);
                } else {
                    let mut d = [0u8; 4];
                    vm.pio.read(port, &mut d[..width]);
                }
            }
            op::BAR_READ => {
                let (addr, offset) = vm.bar_address(&mut inp);
                let width = 1usize << (inp.u8() & 3);
                let mut d = [0u8; 8];
                vm.mmio_read(addr, &mut d[..width]);
                let decoded = *relock(&vm.mapped) == Some(vm.bar_base());
                if decoded && offset == DEVICE_STATUS && width == 1 {
                    assert_eq!(u32::from(d[0]), vm.status(), "status read through BAR 0");
                }
                if decoded && offset == NUM_QUEUES && width == 2 {
                    assert_eq!(usize::from(u16::from_le_bytes([d[0], d[1]])), queues);
                }
            }
            op::BAR_WRITE => {
                let (addr, _) = vm.bar_address(&mut inp);
                let width = 1usize << (inp.u8() & 3);
                let v = inp.value().to_le_bytes();
                vm.mmio_write(addr, &v[..width]);
            }
            op::HANDSHAKE => {
                let b = inp.u8();
                let mask = inp.u64();
                if b & 2 == 0 {
                    // pci_set_master, as Linux's probe does before the handshake.
                    let command = vm.cfg_read(NET_SLOT, COMMAND, 2) as u16;
                    let on = command | COMMAND_BUS_MASTER;
                    vm.cfg_write(NET_SLOT, COMMAND, &on.to_le_bytes());
                }
                let via = via(b);
                vm.set_status(via, STATUS_ACKNOWLEDGE);
                vm.set_status(via, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
                vm.reg_write(via, DEVICE_FEATURE_SELECT, 4, 0);
                let lo = vm.reg_read(via, DEVICE_FEATURE, 4);
                vm.reg_write(via, DEVICE_FEATURE_SELECT, 4, 1);
                let hi = vm.reg_read(via, DEVICE_FEATURE, 4);
                let offered = lo | hi << 32;
                // VERSION_1 is needed for FEATURES_OK; keep it unless the mask's top bit asks
                // for a legacy-only driver.
                let version = if mask >> 63 == 0 {
                    bit(VIRTIO_F_VERSION_1)
                } else {
                    0
                };
                let acked = offered & (mask | version);
                vm.reg_write(via, DRIVER_FEATURE_SELECT, 4, 0);
                vm.reg_write(via, DRIVER_FEATURE, 4, acked & 0xffff_ffff);
                vm.reg_write(via, DRIVER_FEATURE_SELECT, 4, 1);
                vm.reg_write(via, DRIVER_FEATURE, 4, acked >> 32);
                vm.set_status(via, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
            }
            op::QUEUE => {
                let b = inp.u8();
                let via = via(b);
                let q = usize::from(inp.u8()) % (queues + 1);
                let ring = Ring::read(&mut inp, queue_size);
                let vector = vm.vector(&mut inp);
                vm.reg_write(via, QUEUE_SELECT, 2, q as u64);
                vm.reg_write(via, QUEUE_SIZE, 2, u64::from(ring.layout.size));
                for (field, addr) in [
                    (QUEUE_DESC, ring.layout.desc.0),
                    (QUEUE_DRIVER, ring.layout.avail.0),
                    (QUEUE_DEVICE, ring.layout.used.0),
                ] {
                    if b & 2 != 0 {
                        vm.reg_write(via, field, 8, addr);
                    } else {
                        vm.reg_write(via, field, 4, addr & 0xffff_ffff);
                        vm.reg_write(via, field + 4, 4, addr >> 32);
                    }
                }
                vm.reg_write(via, QUEUE_MSIX_VECTOR, 2, u64::from(vector));
                let back = vm.reg_read(via, QUEUE_MSIX_VECTOR, 2) as u16;
                assert!(
                    back == NO_VECTOR || usize::from(back) < vectors,
                    "queue {q} reads back vector {back} of {vectors}"
                );
                vm.reg_write(via, QUEUE_ENABLE, 2, 1);
                if let Some(slot) = rings.get_mut(q) {
                    *slot = Some(ring);
                }
            }
            op::STATUS => {
                let b = inp.u8();
                let value = match b >> 1 & 3 {
                    0 => 0,
                    1 => STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
                    2 => vm.status() | STATUS_FAILED,
                    _ => u32::from(inp.u8()),
                };
                vm.set_status(via(b), value);
            }
            op::MSIX_ENTRY => {
                let via = via(inp.u8());
                let v = u64::from(inp.u8()) % (vectors as u64 + 1);
                let address = match inp.u8() {
                    0xff => inp.u64(),
                    b => 0xfee0_0000 | u64::from(b) << 12,
                };
                let data = u64::from(inp.u16());
                let masked = u64::from(inp.u8() & 1);
                let entry = MSIX_TABLE_OFFSET + v * ENTRY_SIZE;
                vm.reg_write(via, entry, 4, address & 0xffff_ffff);
                vm.reg_write(via, entry + 4, 4, address >> 32);
                vm.reg_write(via, entry + 8, 4, data);
                vm.reg_write(via, entry + ENTRY_VECTOR_CONTROL, 4, masked);
            }
            op::MSIX_CONTROL => {
                let b = inp.u8();
                let mut control = 0u16;
                if b & 0x80 != 0 {
                    control |= CONTROL_ENABLE;
                }
                if b & 0x40 != 0 {
                    control |= CONTROL_FUNCTION_MASK;
                }
                let cap = vm.msix_cap;
                if b & 1 != 0 {
                    vm.cfg_write(NET_SLOT, cap + 3, &[(control >> 8) as u8]);
                } else {
                    vm.cfg_write(NET_SLOT, cap + 2, &control.to_le_bytes());
                }
            }
            op::MSIX_MASK => {
                let b = inp.u8();
                let v = u64::from(inp.u8()) % (vectors as u64 + 1);
                let at = MSIX_TABLE_OFFSET + v * ENTRY_SIZE + ENTRY_VECTOR_CONTROL;
                vm.reg_write(via(b), at, 4, u64::from(b >> 1 & 1));
            }
            op::VECTOR => {
                let b = inp.u8();
                let vector = vm.vector(&mut inp);
                if b & 2 != 0 {
                    vm.reg_write(via(b), CONFIG_MSIX_VECTOR, 2, u64::from(vector));
                } else {
                    let q = u64::from(b >> 2) % (queues as u64 + 1);
                    vm.reg_write(via(b), QUEUE_SELECT, 2, q);
                    vm.reg_write(via(b), QUEUE_MSIX_VECTOR, 2, u64::from(vector));
                }
            }
            op::RING => {
                let q = usize::from(inp.u8()) % queues;
                let tag = inp.u8() % 6;
                if let Some(ring) = rings[q].as_mut() {
                    ring_op(tag, &mut inp, &mem, ring);
                }
            }
            op::NOTIFY => {
                let b = inp.u8();
                let q = u64::from(inp.u8()) % (queues as u64 + 1);
                let width = 1usize << (b >> 1 & 3);
                let at = NOTIFY_OFFSET + q * u64::from(NOTIFY_OFF_MULTIPLIER);
                vm.reg_write(via(b), at, width.min(4), q);
            }
            op::BACKEND => {
                let b = inp.u8();
                match b % 4 {
                    0 | 1 => {
                        let backend = &handles[usize::from(inp.u8()) % pairs];
                        let len = usize::from(inp.u16());
                        backend.push(RxEvent::Frame { len, fill: b });
                    }
                    2 => {
                        let backend = &handles[usize::from(inp.u8()) % pairs];
                        let errno = [libc::EIO, libc::EAGAIN, libc::EINTR][usize::from(b >> 2) % 3];
                        backend.push(RxEvent::Error(errno));
                    }
                    _ => {
                        if (b >> 2) % 5 < 2 {
                            read_fault(&mut inp, &plan);
                        } else {
                            let k = 1 + u32::from(inp.u8() % 8);
                            let mut kvm = vm.kvm.state();
                            match (b >> 2) % 5 {
                                2 => kvm.fail_route_in = k,
                                3 => kvm.fail_register_in = k,
                                _ => kvm.fail_unregister_in = k,
                            }
                        }
                    }
                }
            }
            _ => vm.relocate(&mut inp),
        }
        vm.check();
        let status = vm.status();
        if status != last_status {
            last_status = status;
            trace!("pci: status {last_status:#x}");
        }
    }
    drop(vm);
    for (p, b) in handles.iter().enumerate() {
        trace!(
            "pci: backend {p}: tx {} rx {} attached {}",
            b.tx_frames.load(Ordering::SeqCst),
            b.rx_frames.load(Ordering::SeqCst),
            b.attached_now()
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let before = thread_and_fd_count();
    run(data);
    // Dropping the root dropped the function and the device, which joins its threads.
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let now = thread_and_fd_count();
        if now == before {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "threads/fds left behind: {now:?}, was {before:?}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
});
