//! Building the VM (KVM objects, memory, kernel, devices, vCPUs) and running its main loop.

use std::io::{self, Read};
use std::mem::ManuallyDrop;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use kvm_bindings::{
    kvm_enable_cap, kvm_pit_config, kvm_userspace_memory_region, KVM_API_VERSION,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VmFd};
use vm_memory::{
    Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    MemoryRegionAddress,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::api;
use crate::arch::{acpi, boot, cpu, layout};
use crate::bus::{self, Bus};
use crate::devices::legacy::{AcpiPm, Sink, I8042};
use crate::devices::serial::{ConsoleOut, SerialConsole};
use crate::exit::{self, ExitHandle, VmExit};
use crate::pci::kvm::KvmPlatform;
use crate::pci::{self, HostBridge, PciConfigIo, PciMmioWindow, PciPlatform, PciRoot};
use crate::seccomp::{self, Sandbox, Spawner, ThreadKind};
use crate::signals::{self, SignalFd};
use crate::vcpu::{self, Vcpu};
use crate::virtio::mmio::{self, MmioTransport, REG_QUEUE_NOTIFY};
use crate::virtio::pci::{self as virtio_pci, PciTransportConfig, VirtioPciDevice};
use crate::virtio::VirtioDevice;

/// Where /dev/kvm comes from.
pub enum KvmSource {
    /// Open /dev/kvm ourselves.
    Open,
    /// An already-open /dev/kvm (the launcher's `--kvm-fd`), adopted by [`adopt_kvm_fd`].
    Fd(Kvm),
}

/// The network device: one validated tap queue per queue pair.
pub struct NetSetup {
    pub queues: Vec<tap::TapQueue>,
    pub mac: tap::MacAddr,
    pub mtu: Option<u16>,
    pub mq: bool,
    /// Link speed (Mbit/s) and duplex shown to the guest.
    pub speed_mbps: u32,
    pub duplex: virtio_net::Duplex,
    /// The tap's steering program's map, when the launcher set one up (RSS, lossless
    /// VQ_PAIRS_SET).
    pub steering: Option<tap::steering::SteeringMap>,
    /// Worker threads the queue pairs share (`io-threads=`); `None`: [`auto_io_threads`].
    pub io_threads: Option<usize>,
}

/// Worker threads for `pairs` queue pairs when the operator leaves it open: the CPUs this
/// process may run on (affinity and cgroup quota, `cpus`) beyond its `vcpus`, at least one,
/// at most one per pair. A worker thread per pair on a host whose CPUs the vCPUs already
/// fill only adds wake-ups that take CPU time from the vCPUs; one thread serving several
/// queues batches their work (measured in bench/results: guest->host with 4 pairs on 2 CPUs).
pub fn auto_io_threads(pairs: usize, vcpus: usize, cpus: usize) -> usize {
    cpus.saturating_sub(vcpus).clamp(1, pairs.max(1))
}

/// How the network device is attached to the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// virtio-mmio: one interrupt line for all queues, InterruptStatus read and ack per interrupt.
    Mmio,
    /// virtio-pci with MSI-X: one vector per queue, no status read or ack.
    Pci,
}

impl Transport {
    pub fn parse(s: &str) -> Option<Transport> {
        match s {
            "mmio" => Some(Transport::Mmio),
            "pci" => Some(Transport::Pci),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Transport::Mmio => "mmio",
            Transport::Pci => "pci",
        }
    }
}

/// PCI slots: the host bridge, then the network function.
const HOST_BRIDGE_SLOT: usize = 0;
const NET_PCI_SLOT: usize = 1;

pub struct VmConfig {
    /// The guest kernel, open (mqvmm opened it, or it was passed in as `--kernel-fd`).
    pub kernel: boot::Image,
    pub initramfs: Option<boot::Image>,
    pub cmdline: String,
    pub cpus: u8,
    pub memory_mib: u64,
    pub kvm: KvmSource,
    pub net: Option<NetSetup>,
    /// The network device's transport.
    pub transport: Transport,
    /// Seccomp filters, entered by every thread once the VM is built.
    pub sandbox: Arc<Sandbox>,
    /// The listening API socket (`--api-socket`), served by the `api` thread.
    pub api: Option<std::os::unix::net::UnixListener>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open /dev/kvm")]
    OpenKvm(#[source] kvm_ioctls::Error),
    #[error("--kvm-fd {fd} is not an open file descriptor")]
    KvmFdNotOpen { fd: RawFd },
    #[error("--kvm-fd {fd} is not /dev/kvm (KVM_GET_API_VERSION failed)")]
    KvmFdNotKvm {
        fd: RawFd,
        #[source]
        source: io::Error,
    },
    #[error("KVM API version {0} is not the supported version {KVM_API_VERSION}")]
    KvmApiVersion(i32),
    #[error("KVM lacks a capability mqvmm needs: {0}")]
    MissingCap(&'static str),
    #[error("cannot create the VM")]
    CreateVm(#[source] kvm_ioctls::Error),
    #[error("{what} failed")]
    VmSetup {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot allocate {mib} MiB of guest memory")]
    Memory {
        mib: u64,
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    #[error("cannot register guest memory region {slot} with KVM")]
    RegisterMemory {
        slot: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Boot(#[from] boot::Error),
    #[error(transparent)]
    Acpi(#[from] acpi::Error),
    #[error(transparent)]
    Cpu(#[from] cpu::Error),
    #[error("cannot create vCPU {index}")]
    CreateVcpu {
        index: u8,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    SpawnVcpu(#[from] vcpu::SpawnError),
    #[error(transparent)]
    Bus(#[from] bus::Error),
    #[error("cannot create an eventfd for {what}")]
    EventFd {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("cannot register the irqfd for GSI {gsi}")]
    Irqfd {
        gsi: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot register the ioeventfd of queue {queue} at {addr:#x}")]
    Ioeventfd {
        queue: usize,
        addr: u64,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot create the network device")]
    Net(#[source] virtio_net::Error),
    #[error(transparent)]
    Transport(#[from] mmio::Error),
    #[error("cannot create the virtio-pci network function at 00:01.0")]
    PciTransport(#[source] virtio_pci::Error),
    #[error("cannot add {what} to the PCI root bus")]
    PciBus {
        what: &'static str,
        #[source]
        source: pci::root::Error,
    },
    #[error(transparent)]
    Exit(#[from] exit::Error),
    #[error(transparent)]
    Signals(#[from] signals::Error),
    #[error("main event loop failed")]
    EventLoop(#[source] event_manager::Error),
    #[error(transparent)]
    Seccomp(#[from] seccomp::Error),
    #[error(transparent)]
    Api(#[from] api::ServerError),
}

impl Error {
    /// Errors caused by what the user asked for (exit code 2) rather than by the host or KVM.
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            Error::Boot(_)
                | Error::KvmFdNotOpen { .. }
                | Error::KvmFdNotKvm { .. }
                | Error::KvmApiVersion(_)
                | Error::Memory { .. }
        )
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// Adopts an already-open /dev/kvm passed in by number (`--kvm-fd`): it must be open and
/// answer KVM_GET_API_VERSION. On error the fd is left open and still the caller's.
///
/// # Safety
/// `fd` must be open and owned by nobody else in this process (no `OwnedFd`, `File` or other
/// holder uses or closes it): on success the returned `Kvm` owns it and closes it on drop. A
/// number that is not open is refused ([`Error::KvmFdNotOpen`]), not adopted.
pub unsafe fn adopt_kvm_fd(fd: RawFd) -> Result<Kvm> {
    // SAFETY: F_GETFD only queries the descriptor table.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(Error::KvmFdNotOpen { fd });
    }
    // SAFETY: the fd is open (checked above) and nobody else owns it (our contract). Until it
    // answers as /dev/kvm, ManuallyDrop keeps it open for the caller.
    let kvm = ManuallyDrop::new(unsafe { Kvm::from_raw_fd(fd) });
    // KVM_GET_API_VERSION takes no argument: on any other file it fails (ENOTTY) and does nothing.
    if kvm.get_api_version() < 0 {
        return Err(Error::KvmFdNotKvm {
            fd,
            source: io::Error::last_os_error(),
        });
    }
    Ok(ManuallyDrop::into_inner(kvm))
}

fn open_kvm(source: KvmSource) -> Result<Kvm> {
    let kvm = match source {
        KvmSource::Open => Kvm::new().map_err(Error::OpenKvm)?,
        KvmSource::Fd(kvm) => kvm,
    };
    let version = kvm.get_api_version();
    if u32::try_from(version) != Ok(KVM_API_VERSION) {
        return Err(Error::KvmApiVersion(version));
    }
    for (cap, name) in [
        (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
        (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
        (Cap::Irqfd, "KVM_CAP_IRQFD"),
        (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
        (Cap::Pit2, "KVM_CAP_PIT2"),
        (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(Error::MissingCap(name));
        }
    }
    Ok(kvm)
}

fn create_memory(vm: &VmFd, memory_size: u64) -> Result<GuestMemoryMmap> {
    let ranges: Vec<(GuestAddress, usize)> = layout::ram_regions(memory_size)
        .into_iter()
        .map(|(start, size)| (GuestAddress(start), size as usize))
        .collect();
    let mem = GuestMemoryMmap::from_ranges(&ranges).map_err(|source| Error::Memory {
        mib: memory_size >> 20,
        source,
    })?;
    for (slot, region) in mem.iter().enumerate() {
        let slot = slot as u32;
        let host = region
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|_| Error::RegisterMemory {
                slot,
                source: kvm_ioctls::Error::new(libc::EFAULT),
            })?;
        let region_info = kvm_userspace_memory_region {
            slot,
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: host as u64,
            flags: 0,
        };
        // SAFETY: the region is a live mmap owned by `mem`, which outlives the VM (the VM object
        // keeps a clone); its host address and length come from vm-memory itself.
        unsafe { vm.set_user_memory_region(region_info) }
            .map_err(|source| Error::RegisterMemory { slot, source })?;
    }
    Ok(mem)
}

/// A VM ready to run: memory loaded, devices on their buses, vCPUs configured but not started.
pub struct Vm {
    _kvm: Kvm,
    vm: Arc<VmFd>,
    _mem: GuestMemoryMmap,
    exit: ExitHandle,
    vcpus: Vec<Vcpu>,
    serial: Arc<Mutex<SerialConsole<ConsoleOut>>>,
    serial_drained: EventFd,
    net_metrics: Option<Arc<virtio_net::NetMetrics>>,
    net_control: Option<virtio_net::NetControl<tap::TapQueue>>,
    api: Option<std::os::unix::net::UnixListener>,
    sandbox: Arc<Sandbox>,
}

impl Vm {
    pub fn new(config: VmConfig) -> Result<Vm> {
        let kvm = open_kvm(config.kvm)?;
        let vm = Arc::new(kvm.create_vm().map_err(Error::CreateVm)?);
        let setup = |what| move |source| Error::VmSetup { what, source };
        vm.set_tss_address(layout::KVM_TSS_ADDRESS as usize)
            .map_err(setup("KVM_SET_TSS_ADDR"))?;
        vm.set_identity_map_address(layout::KVM_IDENTITY_MAP_ADDRESS)
            .map_err(setup("KVM_SET_IDENTITY_MAP_ADDR"))?;
        vm.create_irq_chip().map_err(setup("KVM_CREATE_IRQCHIP"))?;
        vm.create_pit2(kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        })
        .map_err(setup("KVM_CREATE_PIT2"))?;
        // Instruction bytes in emulation-failure reports, where the host supports it.
        let cap = kvm_enable_cap {
            cap: kvm_bindings::KVM_CAP_EXIT_ON_EMULATION_FAILURE,
            args: [1, 0, 0, 0],
            ..Default::default()
        };
        if let Err(e) = vm.enable_cap(&cap) {
            log::debug!("KVM_CAP_EXIT_ON_EMULATION_FAILURE unavailable: {e}");
        }

        let memory_size = config.memory_mib << 20;
        let mem = create_memory(&vm, memory_size)?;

        let mut kernel_image = config.kernel;
        let kernel = boot::load_kernel(&mem, &mut kernel_image, memory_size)?;
        let initramfs = match config.initramfs {
            Some(mut image) => Some(boot::load_initramfs(
                &mem,
                &mut image,
                &kernel,
                memory_size,
            )?),
            None => None,
        };
        let cmdline = boot::build_cmdline(&config.cmdline)?;
        log::info!(
            "kernel {} ({:?}) entry {:#x}; initramfs {}; {} vCPUs, {} MiB",
            kernel_image.name(),
            kernel.format,
            kernel.entry.raw_value(),
            initramfs.map_or_else(
                || "none".to_string(),
                |i| format!("{} bytes at {:#x}", i.size, i.address.raw_value())
            ),
            config.cpus,
            config.memory_mib
        );

        let exit = ExitHandle::new()?;
        let mut pio = Bus::new();
        let mut mmio_bus = Bus::new();

        let event =
            |what| EventFd::new(EFD_NONBLOCK).map_err(|source| Error::EventFd { what, source });
        let serial_irq = event("the serial interrupt")?;
        vm.register_irqfd(&serial_irq, layout::SERIAL_GSI)
            .map_err(|source| Error::Irqfd {
                gsi: layout::SERIAL_GSI,
                source,
            })?;
        let serial_drained = event("serial input")?;
        let serial = Arc::new(Mutex::new(SerialConsole::new(
            serial_irq,
            serial_drained
                .try_clone()
                .map_err(|source| Error::EventFd {
                    what: "serial input",
                    source,
                })?,
            ConsoleOut,
        )));
        pio.insert(
            u64::from(layout::SERIAL_PORT),
            SerialConsole::<ConsoleOut>::LEN,
            serial.clone(),
        )?;
        pio.insert(
            u64::from(layout::I8042_PORT),
            I8042::LEN,
            Arc::new(Mutex::new(I8042::new(exit.clone()))),
        )?;
        pio.insert(
            u64::from(AcpiPm::BASE),
            AcpiPm::LEN,
            Arc::new(Mutex::new(AcpiPm::new(exit.clone()))),
        )?;
        // The other COM ports and the POST port: present-but-empty, without log noise.
        for (port, len) in [(0x2f8u64, 8u64), (0x3e8, 8), (0x2e8, 8), (0x80, 1)] {
            pio.insert(port, len, Arc::new(Mutex::new(Sink)))?;
        }

        let mut mmio_devices = Vec::new();
        let mut pci_root = None;
        let mut net_metrics = None;
        let mut net_control = None;
        if let Some(net) = config.net {
            let steering = net
                .steering
                .map(|m| Arc::new(m) as Arc<dyn virtio_net::steer::Steering>);
            let mut device = virtio_net::Net::with_steering(
                virtio_net::NetConfig {
                    mac: net.mac.octets(),
                    mtu: net.mtu,
                    mq: net.mq,
                    speed_mbps: net.speed_mbps,
                    duplex: net.duplex,
                    ..Default::default()
                },
                net.queues,
                steering,
            )
            .map_err(Error::Net)?;
            // The device clamps the count to the pairs it runs and says what it chose.
            device.set_io_threads(net.io_threads.unwrap_or_else(|| {
                let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
                auto_io_threads(device.max_queue_pairs().into(), config.cpus.into(), cpus)
            }));
            // The device starts its threads at activation, on a vCPU; they are created by the
            // spawner thread instead, so each enters its own filter (see seccomp).
            device.set_thread_spawner(Arc::new(Spawner::start(config.sandbox.clone())?));
            net_metrics = Some(device.metrics());
            net_control = Some(device.control());
            match config.transport {
                Transport::Mmio => {
                    mmio_devices.push(attach_mmio(&vm, &mem, &mut mmio_bus, Box::new(device))?);
                }
                Transport::Pci => {
                    let root = attach_pci(&vm, &mem, &mut pio, &mut mmio_bus, Box::new(device))?;
                    pci_root = Some(root);
                }
            }
        }

        let rsdp = acpi::write_tables(&mem, config.cpus, &mmio_devices, pci_root.as_ref())?;
        boot::write_boot_params(&mem, &kernel, &cmdline, initramfs, rsdp, memory_size)?;
        boot::write_page_tables(&mem)?;
        boot::write_gdt_idt(&mem)?;
        boot::write_reset_vector(&mem)?;

        let base_cpuid = cpu::supported_cpuid(&kvm)?;
        let pio = Arc::new(pio);
        let mmio_bus = Arc::new(mmio_bus);
        let mut vcpus = Vec::with_capacity(usize::from(config.cpus));
        for index in 0..config.cpus {
            let fd = vm
                .create_vcpu(u64::from(index))
                .map_err(|source| Error::CreateVcpu { index, source })?;
            cpu::configure_vcpu(
                &fd,
                index,
                config.cpus,
                &base_cpuid,
                kernel.entry.raw_value(),
            )?;
            vcpus.push(Vcpu {
                index,
                fd,
                pio: pio.clone(),
                mmio: mmio_bus.clone(),
                exit: exit.clone(),
                sandbox: config.sandbox.clone(),
            });
        }

        Ok(Vm {
            _kvm: kvm,
            vm,
            _mem: mem,
            exit,
            vcpus,
            serial,
            serial_drained,
            net_metrics,
            net_control,
            api: config.api,
            sandbox: config.sandbox,
        })
    }

    pub fn vm_fd(&self) -> &VmFd {
        &self.vm
    }

    /// Starts the vCPUs and runs the main loop until the VM ends.
    pub fn run(mut self, signals: SignalFd) -> Result<VmExit> {
        let mut events = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new()
            .map_err(Error::EventLoop)?;
        let console = Arc::new(Mutex::new(ConsoleInput {
            serial: self.serial.clone(),
            drained: self.serial_drained,
            pending: Vec::new(),
            stdin_registered: false,
            stdin_closed: false,
        }));
        events.add_subscriber(console);
        events.add_subscriber(Arc::new(Mutex::new(ExitWatcher {
            exit: self.exit.clone(),
        })));
        events.add_subscriber(Arc::new(Mutex::new(SignalWatcher {
            signals,
            exit: self.exit.clone(),
            net_metrics: self.net_metrics.clone(),
        })));

        for vcpu in self.vcpus.drain(..) {
            vcpu.spawn()?;
        }
        if let Some(listener) = self.api.take() {
            let exit = self.exit.clone();
            api::spawn(
                listener,
                Box::new(api::NetVmm {
                    net: self.net_control.take(),
                }),
                self.sandbox.clone(),
                Box::new(move || {
                    log::info!("shutdown requested on the API socket; stopping the VM");
                    exit.request(VmExit::Shutdown);
                }),
            )?;
        }
        // Everything the main loop needs exists (its epoll set included); from here on it only
        // waits, reads, writes and ends.
        self.sandbox.enter(ThreadKind::Main)?;
        while self.exit.reason().is_none() {
            match events.run() {
                Ok(_) => {}
                Err(event_manager::Error::Epoll(e)) if e.errno() == libc::EINTR => {}
                Err(e) => return Err(Error::EventLoop(e)),
            }
        }
        Ok(self
            .exit
            .reason()
            .unwrap_or(VmExit::Error("the VM stopped without a reason".to_string())))
    }
}

fn event_fd(what: &'static str) -> Result<EventFd> {
    EventFd::new(EFD_NONBLOCK).map_err(|source| Error::EventFd { what, source })
}

/// The device behind a virtio-mmio transport at the first slot: one irqfd for the line, one
/// ioeventfd per queue on the QueueNotify register (matching the queue index).
fn attach_mmio(
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    mmio_bus: &mut Bus,
    device: Box<dyn VirtioDevice>,
) -> Result<acpi::MmioDeviceInfo> {
    let base = layout::VIRTIO_MMIO_START;
    let gsi = layout::VIRTIO_GSI_BASE;
    let irq = event_fd("the network interrupt")?;
    vm.register_irqfd(&irq, gsi)
        .map_err(|source| Error::Irqfd { gsi, source })?;
    let transport = MmioTransport::new(device, mem.clone(), irq)?;
    for (queue, kick) in transport.queue_kicks().iter().enumerate() {
        let addr = base + REG_QUEUE_NOTIFY;
        vm.register_ioevent(kick, &IoEventAddress::Mmio(addr), queue as u32)
            .map_err(|source| Error::Ioeventfd {
                queue,
                addr,
                source,
            })?;
    }
    mmio_bus.insert(
        base,
        layout::VIRTIO_MMIO_SIZE,
        Arc::new(Mutex::new(transport)),
    )?;
    Ok(acpi::MmioDeviceInfo {
        base,
        size: layout::VIRTIO_MMIO_SIZE,
        gsi,
    })
}

/// A PCI root (host bridge at 00:00.0, conf1 ports, the 32-bit BAR window) with the device
/// behind a virtio-pci function at 00:01.0: one irqfd and MSI GSI per MSI-X vector; the
/// ioeventfds are registered by the function itself where its BAR is decoded.
fn attach_pci(
    vm: &Arc<VmFd>,
    mem: &GuestMemoryMmap,
    pio: &mut Bus,
    mmio_bus: &mut Bus,
    device: Box<dyn VirtioDevice>,
) -> Result<acpi::PciRootInfo> {
    let vectors = virtio_pci::vector_count(device.queue_max_sizes().len());
    let mut irqfds = Vec::with_capacity(vectors);
    for vector in 0..vectors {
        let irqfd = event_fd("an MSI-X vector")?;
        let gsi = layout::MSI_GSI_BASE + vector as u32;
        vm.register_irqfd(&irqfd, gsi)
            .map_err(|source| Error::Irqfd { gsi, source })?;
        irqfds.push(irqfd);
    }
    let platform: Arc<dyn PciPlatform> = Arc::new(KvmPlatform::new(vm.clone()));
    let function = VirtioPciDevice::new(
        device,
        mem.clone(),
        PciTransportConfig {
            bar_address: layout::PCI_MMIO32_START,
            msi_gsi_base: layout::MSI_GSI_BASE,
            irqfds,
        },
        platform,
    )
    .map_err(Error::PciTransport)?;
    let mut root = PciRoot::new(layout::PCI_MMIO32_START, layout::PCI_MMIO32_SIZE);
    root.add(HOST_BRIDGE_SLOT, Box::new(HostBridge::new()))
        .map_err(|source| Error::PciBus {
            what: "the host bridge at 00:00.0",
            source,
        })?;
    // Adding it maps its BAR, which registers the notify ioeventfds (still on this thread,
    // before any filter).
    root.add(NET_PCI_SLOT, Box::new(function))
        .map_err(|source| Error::PciBus {
            what: "the virtio-pci network function at 00:01.0",
            source,
        })?;
    let root = Arc::new(Mutex::new(root));
    pio.insert(
        u64::from(pci::root::CONFIG_IO_PORT),
        pci::root::CONFIG_IO_LEN,
        Arc::new(Mutex::new(PciConfigIo::new(root.clone()))),
    )?;
    mmio_bus.insert(
        layout::PCI_MMIO32_START,
        layout::PCI_MMIO32_SIZE,
        Arc::new(Mutex::new(PciMmioWindow::new(
            root,
            layout::PCI_MMIO32_START,
        ))),
    )?;
    Ok(acpi::PciRootInfo {
        mmio32_start: layout::PCI_MMIO32_START,
        mmio32_size: layout::PCI_MMIO32_SIZE,
    })
}

/// Moves stdin to the serial receive FIFO, pausing stdin while the guest has not drained it.
struct ConsoleInput {
    serial: Arc<Mutex<SerialConsole<ConsoleOut>>>,
    drained: EventFd,
    pending: Vec<u8>,
    stdin_registered: bool,
    stdin_closed: bool,
}

const STDIN: RawFd = libc::STDIN_FILENO;

impl ConsoleInput {
    fn push_pending(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let taken = self
            .serial
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .enqueue_input(&self.pending);
        self.pending.drain(..taken);
    }

    /// Watch stdin only while nothing is pending, so a slow guest applies back-pressure.
    fn update_stdin(&mut self, ops: &mut EventOps) {
        let want = self.pending.is_empty() && !self.stdin_closed;
        if want && !self.stdin_registered {
            match ops.add(Events::new_raw(STDIN, EventSet::IN)) {
                Ok(()) => self.stdin_registered = true,
                Err(e) => {
                    // /dev/null and regular files cannot be polled: the guest gets no input.
                    log::debug!("stdin cannot be watched ({e:?}); console input disabled");
                    self.stdin_closed = true;
                }
            }
        } else if !want && self.stdin_registered {
            if let Err(e) = ops.remove(Events::new_raw(STDIN, EventSet::IN)) {
                log::warn!("cannot stop watching stdin: {e:?}");
            }
            self.stdin_registered = false;
        }
    }

    fn read_stdin(&mut self) {
        let mut buf = [0u8; 64];
        // SAFETY: fd 0 stays open for the life of the process; ManuallyDrop keeps this
        // temporary File from closing it.
        let mut stdin = std::mem::ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(STDIN) });
        match stdin.read(&mut buf) {
            Ok(0) => self.stdin_closed = true,
            Ok(n) => self.pending.extend_from_slice(&buf[..n]),
            Err(e)
                if e.kind() == io::ErrorKind::Interrupted
                    || e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => {
                log::warn!("reading stdin failed: {e}; console input disabled");
                self.stdin_closed = true;
            }
        }
    }
}

impl MutEventSubscriber for ConsoleInput {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.drained, EventSet::IN)) {
            log::error!("cannot watch serial input events: {e:?}");
        }
        self.update_stdin(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == self.drained.as_raw_fd() {
            let _ = self.drained.read();
        } else if events.fd() == STDIN {
            if events.event_set().contains(EventSet::IN) {
                self.read_stdin();
            } else {
                self.stdin_closed = true;
            }
        }
        self.push_pending();
        self.update_stdin(ops);
    }
}

struct ExitWatcher {
    exit: ExitHandle,
}

impl MutEventSubscriber for ExitWatcher {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.exit.event(), EventSet::IN)) {
            log::error!("cannot watch the exit event: {e:?}");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.exit.event().read();
    }
}

struct SignalWatcher {
    signals: SignalFd,
    exit: ExitHandle,
    net_metrics: Option<Arc<virtio_net::NetMetrics>>,
}

impl MutEventSubscriber for SignalWatcher {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.signals, EventSet::IN)) {
            log::error!("cannot watch signals: {e:?}");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        loop {
            match self.signals.read() {
                Ok(Some(libc::SIGUSR1)) => match &self.net_metrics {
                    Some(metrics) => eprintln!("mqvmm-metrics: {}", metrics.to_text()),
                    None => eprintln!("mqvmm-metrics: no network device"),
                },
                Ok(Some(sig)) => {
                    log::info!("received signal {sig}; stopping the VM");
                    self.exit.request(VmExit::Signal(sig));
                }
                Ok(None) => return,
                Err(e) => {
                    log::error!("reading signals failed: {e}");
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    #[test]
    fn auto_io_threads_uses_the_cpus_left_beside_the_vcpus() {
        // This rig: 2 CPUs, 2 vCPUs: one thread for every pair count.
        for pairs in 1..=4 {
            assert_eq!(auto_io_threads(pairs, 2, 2), 1);
        }
        // More vCPUs than CPUs still gets a thread.
        assert_eq!(auto_io_threads(4, 8, 2), 1);
        // A large host: one per pair, never more.
        assert_eq!(auto_io_threads(4, 2, 64), 4);
        assert_eq!(auto_io_threads(8, 4, 8), 4);
        assert_eq!(auto_io_threads(1, 1, 64), 1);
    }

    #[test]
    fn pci_errors_name_the_function_and_keep_their_cause() {
        let e = Error::PciTransport(virtio_pci::Error::Irqfds {
            irqfds: 1,
            vectors: 4,
        });
        assert_eq!(
            e.to_string(),
            "cannot create the virtio-pci network function at 00:01.0"
        );
        assert_eq!(
            e.source().unwrap().to_string(),
            "1 irqfds given for 4 MSI-X vectors"
        );
        let e = Error::PciBus {
            what: "the virtio-pci network function at 00:01.0",
            source: pci::root::Error::Slot { slot: NET_PCI_SLOT },
        };
        assert_eq!(
            e.to_string(),
            "cannot add the virtio-pci network function at 00:01.0 to the PCI root bus"
        );
        assert_eq!(
            e.source().unwrap().to_string(),
            "PCI slot 1 does not exist or is taken"
        );
    }

    #[test]
    fn a_kvm_fd_must_be_an_open_dev_kvm_and_is_left_alone_otherwise() {
        // Far above any fd this test process opens, so never taken by a parallel test.
        let closed = 1 << 20;
        // SAFETY: `closed` is not open, so nothing owns it; it is refused, not adopted.
        let err = unsafe { adopt_kvm_fd(closed) }.unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("--kvm-fd {closed} is not an open file descriptor")
        );
        assert!(err.is_usage());

        let null = std::fs::File::open("/dev/null").unwrap();
        let fd = null.as_raw_fd();
        // SAFETY: `null` keeps the fd, which the contract allows only because nothing is
        // adopted: /dev/null does not answer KVM_GET_API_VERSION (asserted below).
        let err = unsafe { adopt_kvm_fd(fd) }.unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("--kvm-fd {fd} is not /dev/kvm (KVM_GET_API_VERSION failed)")
        );
        assert_eq!(
            err.source()
                .and_then(|e| e.downcast_ref::<io::Error>())
                .and_then(io::Error::raw_os_error),
            Some(libc::ENOTTY)
        );
        assert!(err.is_usage());
        // SAFETY: F_GETFD only queries the descriptor table.
        let still_open = unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0;
        assert!(still_open, "closed by a refusal");
        drop(null);

        match std::fs::File::options()
            .read(true)
            .write(true)
            .open("/dev/kvm")
        {
            Ok(kvm) => {
                let fd = std::os::fd::IntoRawFd::into_raw_fd(kvm);
                // SAFETY: `fd` was just released by its File and is owned by nothing else.
                let kvm = unsafe { adopt_kvm_fd(fd) }.unwrap();
                assert_eq!(kvm.as_raw_fd(), fd);
            }
            Err(e) => eprintln!("skip: the /dev/kvm case: cannot open /dev/kvm ({e})"),
        }
    }
}
