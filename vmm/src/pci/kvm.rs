//! [`PciPlatform`] on KVM: MSI routes through KVM_SET_GSI_ROUTING and ioeventfds through
//! KVM_IOEVENTFD, both issued from vCPU threads while the guest programs its devices.

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI, KVM_MAX_IRQ_ROUTES,
};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use vmm_sys_util::eventfd::EventFd;

use super::{MsiMessage, PciPlatform};
use crate::arch::layout::IOAPIC_PINS;

pub struct KvmPlatform {
    vm: Arc<VmFd>,
    msi_routes: Mutex<BTreeMap<u32, MsiMessage>>,
}

impl KvmPlatform {
    pub fn new(vm: Arc<VmFd>) -> KvmPlatform {
        KvmPlatform {
            vm,
            msi_routes: Mutex::new(BTreeMap::new()),
        }
    }
}

fn irqchip_route(gsi: u32, irqchip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut entry = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        ..Default::default()
    };
    entry.u.irqchip.irqchip = irqchip;
    entry.u.irqchip.pin = pin;
    entry
}

/// The whole routing table: KVM_SET_GSI_ROUTING replaces every route, so the ones KVM sets up
/// with its in-kernel irqchip (GSI 0-15 to both PICs and the IOAPIC pin of the same number,
/// 16-23 to the IOAPIC only) go along with the MSI routes.
pub fn routing_table(msi_routes: &BTreeMap<u32, MsiMessage>) -> Vec<kvm_irq_routing_entry> {
    let mut table = Vec::with_capacity(40 + msi_routes.len());
    for gsi in 0..IOAPIC_PINS {
        if gsi < 16 {
            let pic = if gsi < 8 {
                KVM_IRQCHIP_PIC_MASTER
            } else {
                KVM_IRQCHIP_PIC_SLAVE
            };
            table.push(irqchip_route(gsi, pic, gsi % 8));
        }
        table.push(irqchip_route(gsi, KVM_IRQCHIP_IOAPIC, gsi));
    }
    for (&gsi, message) in msi_routes {
        let mut entry = kvm_irq_routing_entry {
            gsi,
            type_: KVM_IRQ_ROUTING_MSI,
            ..Default::default()
        };
        entry.u.msi.address_lo = message.address as u32;
        entry.u.msi.address_hi = (message.address >> 32) as u32;
        entry.u.msi.data = message.data;
        table.push(entry);
    }
    table
}

/// The table in the form KVM_SET_GSI_ROUTING takes.
fn routing(msi_routes: &BTreeMap<u32, MsiMessage>) -> io::Result<KvmIrqRouting> {
    let table = routing_table(msi_routes);
    // The wrapper's only error: more entries than KVM_MAX_IRQ_ROUTES.
    KvmIrqRouting::from_entries(&table).map_err(|_| {
        io::Error::other(format!(
            "a GSI routing table of {} entries is more than KVM takes ({KVM_MAX_IRQ_ROUTES})",
            table.len()
        ))
    })
}

fn to_io(e: kvm_ioctls::Error) -> io::Error {
    io::Error::from_raw_os_error(e.errno())
}

impl PciPlatform for KvmPlatform {
    fn set_msi_route(&self, gsi: u32, message: MsiMessage) -> io::Result<()> {
        let mut routes = self.msi_routes.lock().unwrap_or_else(|e| e.into_inner());
        let previous = routes.insert(gsi, message);
        let result = routing(&routes).and_then(|t| self.vm.set_gsi_routing(&t).map_err(to_io));
        if result.is_err() {
            // Keep our copy equal to what KVM has.
            match previous {
                Some(m) => routes.insert(gsi, m),
                None => routes.remove(&gsi),
            };
        }
        result
    }

    fn register_ioevent(&self, fd: &EventFd, addr: u64) -> io::Result<()> {
        self.vm
            .register_ioevent(fd, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(to_io)
    }

    fn unregister_ioevent(&self, fd: &EventFd, addr: u64) -> io::Result<()> {
        self.vm
            .unregister_ioevent(fd, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(to_io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_keeps_the_irqchip_routes_and_adds_msi() {
        let mut msi = BTreeMap::new();
        msi.insert(
            25,
            MsiMessage {
                address: 0x1_fee0_1000,
                data: 0x4031,
            },
        );
        let table = routing_table(&msi);
        // 16 PIC + 24 IOAPIC + 1 MSI.
        assert_eq!(table.len(), 41);
        let chips: Vec<(u32, u32, u32)> = table
            .iter()
            .filter(|e| e.type_ == KVM_IRQ_ROUTING_IRQCHIP)
            // SAFETY: irqchip entries use the `irqchip` member of the union.
            .map(|e| unsafe { (e.gsi, e.u.irqchip.irqchip, e.u.irqchip.pin) })
            .collect();
        assert!(chips.contains(&(4, KVM_IRQCHIP_PIC_MASTER, 4)), "COM1");
        assert!(chips.contains(&(4, KVM_IRQCHIP_IOAPIC, 4)));
        assert!(chips.contains(&(10, KVM_IRQCHIP_PIC_SLAVE, 2)));
        assert!(chips.contains(&(23, KVM_IRQCHIP_IOAPIC, 23)));
        assert!(!chips
            .iter()
            .any(|&(gsi, chip, _)| gsi >= 16 && chip != KVM_IRQCHIP_IOAPIC));
        let last = table.last().unwrap();
        assert_eq!((last.gsi, last.type_), (25, KVM_IRQ_ROUTING_MSI));
        // SAFETY: MSI entries use the `msi` member of the union.
        let m = unsafe { last.u.msi };
        assert_eq!(
            (m.address_lo, m.address_hi, m.data),
            (0xfee0_1000, 1, 0x4031)
        );
        assert!(routing(&msi).is_ok());
    }

    #[test]
    fn a_table_kvm_cannot_take_is_refused_with_a_readable_message() {
        let message = MsiMessage {
            address: 0xfee0_0000,
            data: 0x30,
        };
        let msi: BTreeMap<u32, MsiMessage> = (0..KVM_MAX_IRQ_ROUTES as u32)
            .map(|i| (IOAPIC_PINS + i, message))
            .collect();
        let err = routing(&msi).unwrap_err().to_string();
        assert_eq!(
            err,
            format!(
                "a GSI routing table of {} entries is more than KVM takes (4096)",
                40 + KVM_MAX_IRQ_ROUTES
            )
        );
    }
}
