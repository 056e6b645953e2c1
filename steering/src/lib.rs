//! eBPF steering for mqvmm's multiqueue tap: the privileged half.
//!
//! The launcher loads the steering program (`bpf/steer.c`, compiled by build.rs and embedded)
//! and its map with [`attach`] while it still holds CAP_BPF/CAP_SYS_ADMIN, attaches the program
//! to the tap with `TUNSETSTEERINGEBPF`, and passes the map's fd to mqvmm, which maps it with
//! [`tap::steering::SteeringMap::from_fd`] and publishes the guest's RSS configuration there —
//! no bpf() call on mqvmm's side. The tap keeps its own reference to the program: it stays
//! attached after every fd of it is closed, until the tap goes away or another program (or -1)
//! replaces it.
//!
//! [`Loaded`] is the lower-level handle (program and map fds), also what the tests run the
//! program through with `BPF_PROG_TEST_RUN`.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use aya::maps::Map;
use aya::programs::SocketFilter;
use aya::Ebpf;

/// The compiled steering program (ELF for the bpf target).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/steer.o"));

/// The program's name in the object (its C function).
pub const PROGRAM: &str = "mq_steer_prog";
/// The map's name in the object.
pub const MAP: &str = "mq_steer";

/// `TUNSETSTEERINGEBPF`, `_IOR('T', 224, int)` in linux/if_tun.h: takes a pointer to a program
/// fd, or to -1 to detach. Linux 4.16 and later.
pub const TUNSETSTEERINGEBPF: libc::c_ulong = ior(b'T', 224, std::mem::size_of::<libc::c_int>());

const fn ior(ty: u8, nr: u8, size: usize) -> libc::c_ulong {
    // _IOC(_IOC_READ = 2, type, nr, size) on x86, arm64, riscv: dir << 30 | size << 16 | type << 8 | nr.
    (2 << 30) | ((size as libc::c_ulong) << 16) | ((ty as libc::c_ulong) << 8) | nr as libc::c_ulong
}

const ETH_HLEN: usize = 14;
/// `BPF_PROG_TEST_RUN` in linux/bpf.h.
const BPF_PROG_TEST_RUN: libc::c_long = 10;

/// The `test` member of `union bpf_attr` (linux/bpf.h), up to `batch_size`, padded to 8 bytes.
#[repr(C)]
#[derive(Default)]
struct BpfTestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    /// Explicit, so that it is zero: the kernel refuses non-zero bytes after the fields it knows.
    padding: u32,
}

/// What went wrong while setting up steering; the launcher logs it in one line and carries on
/// without steering.
#[derive(Debug, thiserror::Error)]
pub enum SteerError {
    #[error("loading the steering object (map creation, BTF) failed")]
    Object(#[source] Box<aya::EbpfError>),
    #[error("the steering object has no {what} named {name}")]
    Missing {
        what: &'static str,
        name: &'static str,
    },
    #[error("the kernel refused the steering program")]
    Program(#[source] Box<aya::programs::ProgramError>),
    #[error("map {MAP} is not an array map")]
    MapType,
    #[error("TUNSETSTEERINGEBPF on tap queue fd {fd} failed")]
    Attach {
        fd: i32,
        #[source]
        source: io::Error,
    },
    #[error("cannot duplicate the fd of map {MAP}")]
    DupMap(#[source] io::Error),
    #[error("cannot duplicate the fd of program {PROGRAM}")]
    DupProgram(#[source] io::Error),
}

/// The steering program and its map, loaded into the kernel: our own duplicates of aya's fds,
/// which keep both alive after aya's objects are gone.
#[derive(Debug)]
pub struct Loaded {
    program: OwnedFd,
    map: OwnedFd,
}

/// Loads the embedded program and creates its map (zeroed: every frame to queue 0). Needs
/// CAP_BPF (or CAP_SYS_ADMIN), or unprivileged BPF, which Debian disables.
pub fn load() -> Result<Loaded, SteerError> {
    let mut ebpf = Ebpf::load(OBJECT).map_err(|e| SteerError::Object(Box::new(e)))?;
    let program: &mut SocketFilter = ebpf
        .program_mut(PROGRAM)
        .ok_or(SteerError::Missing {
            what: "program",
            name: PROGRAM,
        })?
        .try_into()
        .map_err(|e| SteerError::Program(Box::new(e)))?;
    program
        .load()
        .map_err(|e| SteerError::Program(Box::new(e)))?;
    let program = program
        .fd()
        .map_err(|e| SteerError::Program(Box::new(e)))?
        .as_fd()
        .try_clone_to_owned()
        .map_err(SteerError::DupProgram)?;
    let map = match ebpf.map(MAP) {
        Some(Map::Array(data)) => data
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .map_err(SteerError::DupMap)?,
        Some(_) => return Err(SteerError::MapType),
        None => {
            return Err(SteerError::Missing {
                what: "map",
                name: MAP,
            })
        }
    };
    Ok(Loaded { program, map })
}

impl Loaded {
    /// The program's fd.
    pub fn program_fd(&self) -> BorrowedFd<'_> {
        self.program.as_fd()
    }

    /// The map's fd.
    pub fn map_fd(&self) -> BorrowedFd<'_> {
        self.map.as_fd()
    }

    /// Makes the program the steering program of the tap `tap_queue` is a queue of (the
    /// setting is per tap, not per queue; it replaces any earlier one).
    pub fn attach_to(&self, tap_queue: BorrowedFd<'_>) -> Result<(), SteerError> {
        set_steering_program(tap_queue, self.program_fd().as_raw_fd())
    }

    /// Runs the program once on `frame` (starting with its Ethernet header, as the tap's transmit
    /// path presents it) with `BPF_PROG_TEST_RUN` and returns its answer: the tun queue index
    /// before the kernel's modulo. For tests; needs the same privilege as [`load`].
    pub fn test_run(&self, frame: &[u8]) -> io::Result<u32> {
        // The kernel's test run treats the data as a received frame and pulls an Ethernet
        // header (eth_type_trans) before running a socket filter: a dummy one goes first so
        // that the program sees `frame` from its first byte, as on the transmit path.
        let mut data = vec![0u8; ETH_HLEN];
        data[12..14].copy_from_slice(&0x88b5u16.to_be_bytes()); // IEEE local experimental
        data.extend_from_slice(frame);
        let mut attr = BpfTestRunAttr {
            prog_fd: self.program.as_raw_fd() as u32,
            data_size_in: u32::try_from(data.len())
                .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?,
            data_in: data.as_ptr() as u64,
            repeat: 1,
            ..BpfTestRunAttr::default()
        };
        // SAFETY: BPF_PROG_TEST_RUN reads `attr` (its size is passed) and the `data` buffer it
        // points at, which lives across the call; data_out and ctx are null, so the kernel
        // writes only into `attr` (retval, duration, sizes).
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_PROG_TEST_RUN,
                &mut attr as *mut BpfTestRunAttr,
                std::mem::size_of::<BpfTestRunAttr>() as u32,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(attr.retval)
    }

    /// The map's fd, for mqvmm; the program fd closes (the tap keeps the program).
    pub fn into_map_fd(self) -> OwnedFd {
        self.map
    }
}

/// Loads the steering program, attaches it to the tap of `tap_queue` and returns the fd of its
/// map, for mqvmm (`--net ...,steer-map=FD`).
pub fn attach(tap_queue: BorrowedFd<'_>) -> Result<OwnedFd, SteerError> {
    let loaded = load()?;
    loaded.attach_to(tap_queue)?;
    Ok(loaded.into_map_fd())
}

/// Removes the tap's steering program: the kernel's own flow hashing steers again.
pub fn detach(tap_queue: BorrowedFd<'_>) -> Result<(), SteerError> {
    set_steering_program(tap_queue, -1)
}

fn set_steering_program(tap_queue: BorrowedFd<'_>, prog_fd: libc::c_int) -> Result<(), SteerError> {
    let fd = tap_queue.as_raw_fd();
    // SAFETY: TUNSETSTEERINGEBPF reads one int through the pointer, which points at a live local;
    // `fd` is open for the call's duration (it is borrowed). On an fd that is not a tun fd the
    // kernel fails with ENOTTY or EBADFD.
    let rc = unsafe { libc::ioctl(fd, TUNSETSTEERINGEBPF as _, &prog_fd as *const libc::c_int) };
    if rc < 0 {
        return Err(SteerError::Attach {
            fd,
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ioctl_number_matches_linux_if_tun_h() {
        // _IOR('T', 224, int) as the kernel headers spell it out on x86-64.
        assert_eq!(TUNSETSTEERINGEBPF, 0x8004_54e0);
    }

    #[test]
    fn the_object_holds_the_program_and_the_map() {
        assert!(OBJECT.starts_with(b"\x7fELF"));
        let contains = |needle: &str| OBJECT.windows(needle.len()).any(|w| w == needle.as_bytes());
        assert!(contains(PROGRAM));
        assert!(contains(MAP));
    }
}
