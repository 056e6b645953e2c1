//! Loading the guest kernel and initramfs, and the Linux 64-bit boot protocol's zero page.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::{FromRawFd, RawFd};
use std::path::{Path, PathBuf};

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{self, BzImage, Cmdline, Elf, KernelLoader};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::*;

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;
/// Offset of the 64-bit entry point (startup_64) from the start of a bzImage's protected-mode code.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// boot_params.hdr.xloadflags: the kernel has a 64-bit entry point.
const XLF_KERNEL_64: u16 = 1 << 0;
const PAGE_SIZE: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open {kind} {path}")]
    OpenImage {
        kind: ImageKind,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{option} {fd} is not an open file descriptor")]
    ImageFdNotOpen { option: &'static str, fd: RawFd },
    #[error("{option} {fd} is standard input, output or error, which mqvmm keeps for the console")]
    ImageFdStdio { option: &'static str, fd: RawFd },
    #[error("cannot inspect {option} {fd}")]
    ImageFdStat {
        option: &'static str,
        fd: RawFd,
        #[source]
        source: std::io::Error,
    },
    #[error("{option} {fd} is not a regular file: it is {what}")]
    ImageFdNotAFile {
        option: &'static str,
        fd: RawFd,
        what: &'static str,
    },
    #[error("cannot read kernel image {image}")]
    ReadKernel {
        image: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{image} is neither an ELF vmlinux nor a bzImage (no ELF magic, no \"HdrS\" header)")]
    UnknownKernelFormat { image: String },
    #[error("bzImage {image} has no 64-bit entry point (boot protocol {version:#x}, xloadflags {xloadflags:#x})")]
    NoLongModeEntry {
        image: String,
        version: u16,
        xloadflags: u16,
    },
    #[error("cannot load kernel image {image}")]
    LoadKernel {
        image: String,
        #[source]
        source: loader::Error,
    },
    #[error("guest memory of {memory_mib} MiB is too small for the kernel, which needs memory up to {needed:#x}")]
    KernelTooBig { memory_mib: u64, needed: u64 },
    #[error("guest memory of {memory_mib} MiB is too small to hold the kernel image")]
    KernelDoesNotFit { memory_mib: u64 },
    #[error("cannot read initramfs {image}")]
    ReadInitramfsFile {
        image: String,
        #[source]
        source: std::io::Error,
    },
    #[error("guest memory of {memory_mib} MiB leaves no room for the {size}-byte initramfs above the kernel (kernel ends at {kernel_end:#x})")]
    InitramfsTooBig {
        memory_mib: u64,
        size: u64,
        kernel_end: u64,
    },
    #[error("cannot read initramfs {image} into guest memory")]
    ReadInitramfs {
        image: String,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("kernel command line is invalid: {0}")]
    Cmdline(String),
    #[error("cannot write {what} into guest memory")]
    GuestWrite {
        what: &'static str,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

/// Which guest image a file is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageKind {
    Kernel,
    Initramfs,
}

impl ImageKind {
    /// The option that passes this image in as an open fd.
    pub fn fd_option(self) -> &'static str {
        match self {
            ImageKind::Kernel => "--kernel-fd",
            ImageKind::Initramfs => "--initramfs-fd",
        }
    }
}

impl std::fmt::Display for ImageKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ImageKind::Kernel => "kernel image",
            ImageKind::Initramfs => "initramfs",
        })
    }
}

/// An open guest image and the name its errors give it: the path mqvmm opened it at, or
/// `fd N` when it was passed in open (a launcher opens images that mqvmm's own uid may not).
#[derive(Debug)]
pub struct Image {
    file: File,
    name: String,
}

impl Image {
    /// Opens the image at `path`.
    pub fn open(kind: ImageKind, path: &Path) -> Result<Image> {
        let file = File::open(path).map_err(|source| Error::OpenImage {
            kind,
            path: path.to_owned(),
            source,
        })?;
        Ok(Image {
            file,
            name: path.display().to_string(),
        })
    }

    /// Takes ownership of `fd`, passed in open with `kind`'s fd option: it must be an open
    /// regular file other than the standard streams (the console keeps those). On error the
    /// fd is left alone.
    ///
    /// # Safety
    /// `fd` must be open and owned by nobody else in this process (no `OwnedFd`, `File` or other
    /// holder uses or closes it): on success the image owns it and closes it on drop. A number
    /// that is not open is refused ([`Error::ImageFdNotOpen`]), not adopted.
    pub unsafe fn from_fd(kind: ImageKind, fd: RawFd) -> Result<Image> {
        let option = kind.fd_option();
        if (0..=2).contains(&fd) {
            return Err(Error::ImageFdStdio { option, fd });
        }
        // SAFETY: an all-zero `struct stat` is valid (plain integers).
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: fstat writes into `st`, a live local; any fd number is a safe argument.
        if unsafe { libc::fstat(fd, &mut st) } != 0 {
            let source = std::io::Error::last_os_error();
            return Err(if source.raw_os_error() == Some(libc::EBADF) {
                Error::ImageFdNotOpen { option, fd }
            } else {
                Error::ImageFdStat { option, fd, source }
            });
        }
        let what = match st.st_mode & libc::S_IFMT {
            libc::S_IFREG => None,
            libc::S_IFDIR => Some("a directory"),
            libc::S_IFIFO => Some("a pipe"),
            libc::S_IFSOCK => Some("a socket"),
            libc::S_IFCHR => Some("a character device"),
            libc::S_IFBLK => Some("a block device"),
            _ => Some("no file (eventfd, epoll, ...)"),
        };
        if let Some(what) = what {
            return Err(Error::ImageFdNotAFile { option, fd, what });
        }
        // SAFETY: the fd is open (fstat succeeded) and nobody else owns it (our contract).
        let file = unsafe { File::from_raw_fd(fd) };
        Ok(Image {
            file,
            name: format!("fd {fd}"),
        })
    }

    /// The path it was opened at, or `fd N`.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// Kernel image formats mqvmm boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    Elf,
    BzImage,
}

/// Where the kernel landed and how to enter it.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    pub format: KernelFormat,
    /// 64-bit entry point (RIP at reset).
    pub entry: GuestAddress,
    /// First byte after the kernel image (including bss for ELF).
    pub end: u64,
    setup_header: Option<linux_loader::loader::bootparam::setup_header>,
}

/// Tells an ELF vmlinux from a bzImage by their magic numbers.
pub fn detect_format(kernel: &mut Image) -> Result<KernelFormat> {
    let Image { file, name } = kernel;
    let read_err = |source| Error::ReadKernel {
        image: name.clone(),
        source,
    };
    let mut head = [0u8; 0x206];
    file.seek(SeekFrom::Start(0)).map_err(read_err)?;
    let mut filled = 0;
    while filled < head.len() {
        match file.read(&mut head[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(read_err(e)),
        }
    }
    file.seek(SeekFrom::Start(0)).map_err(read_err)?;
    if filled >= 4 && head[..4] == *b"\x7fELF" {
        return Ok(KernelFormat::Elf);
    }
    if filled >= 0x206 && head[0x202..0x206] == KERNEL_HDR_MAGIC.to_le_bytes() {
        return Ok(KernelFormat::BzImage);
    }
    Err(Error::UnknownKernelFormat {
        image: name.clone(),
    })
}

/// Loads an ELF vmlinux or a bzImage into guest memory.
pub fn load_kernel(
    mem: &GuestMemoryMmap,
    kernel: &mut Image,
    memory_size: u64,
) -> Result<LoadedKernel> {
    let format = detect_format(kernel)?;
    let Image { file, name } = kernel;
    let load_err = |source| match source {
        // The loaders report a kernel that does not fit as an I/O failure writing guest memory.
        loader::Error::Elf(loader::elf::Error::ReadKernelImage)
        | loader::Error::Bzimage(loader::bzimage::Error::ReadBzImageCompressedKernel)
        | loader::Error::MemoryOverflow => Error::KernelDoesNotFit {
            memory_mib: memory_size >> 20,
        },
        source => Error::LoadKernel {
            image: name.clone(),
            source,
        },
    };
    let result = match format {
        KernelFormat::Elf => {
            Elf::load(mem, None, file, Some(GuestAddress(HIMEM_START))).map_err(load_err)?
        }
        KernelFormat::BzImage => {
            BzImage::load(mem, None, file, Some(GuestAddress(HIMEM_START))).map_err(load_err)?
        }
    };
    let end = match format {
        KernelFormat::Elf => result.kernel_end,
        KernelFormat::BzImage => {
            let hdr = result.setup_header.unwrap_or_default();
            // The decompressor needs init_size bytes from the load address.
            result.kernel_load.raw_value() + u64::from(hdr.init_size).max(result.kernel_end)
        }
    };
    if end > low_ram_end(memory_size) {
        return Err(Error::KernelTooBig {
            memory_mib: memory_size >> 20,
            needed: end,
        });
    }
    let entry = match format {
        KernelFormat::Elf => result.kernel_load,
        KernelFormat::BzImage => {
            let hdr = result.setup_header.unwrap_or_default();
            if hdr.version < 0x020c || hdr.xloadflags & XLF_KERNEL_64 == 0 {
                return Err(Error::NoLongModeEntry {
                    image: name.clone(),
                    version: hdr.version,
                    xloadflags: hdr.xloadflags,
                });
            }
            result.kernel_load.unchecked_add(BZIMAGE_64BIT_ENTRY_OFFSET)
        }
    };
    Ok(LoadedKernel {
        format,
        entry,
        end,
        setup_header: result.setup_header,
    })
}

/// A loaded initramfs.
#[derive(Debug, Clone, Copy)]
pub struct LoadedInitramfs {
    pub address: GuestAddress,
    pub size: u64,
}

/// Places the initramfs as high as possible below the MMIO gap (and below 4 GiB, where the
/// 32-bit `ramdisk_image` field can reach it), page aligned, above the kernel.
pub fn load_initramfs(
    mem: &GuestMemoryMmap,
    initramfs: &mut Image,
    kernel: &LoadedKernel,
    memory_size: u64,
) -> Result<LoadedInitramfs> {
    let Image { file, name } = initramfs;
    let file_err = |source| Error::ReadInitramfsFile {
        image: name.clone(),
        source,
    };
    let size = file.metadata().map_err(file_err)?.len();
    // A passed-in fd shares its offset with whoever opened it: read from the start.
    file.seek(SeekFrom::Start(0)).map_err(file_err)?;
    let mut top = low_ram_end(memory_size);
    if let Some(hdr) = kernel.setup_header {
        if hdr.initrd_addr_max != 0 {
            top = top.min(u64::from(hdr.initrd_addr_max) + 1);
        }
    }
    let too_big = || Error::InitramfsTooBig {
        memory_mib: memory_size >> 20,
        size,
        kernel_end: kernel.end,
    };
    let address = top.checked_sub(size).ok_or_else(too_big)? & !(PAGE_SIZE - 1);
    if address < kernel.end {
        return Err(too_big());
    }
    mem.read_exact_volatile_from(GuestAddress(address), file, size as usize)
        .map_err(|source| Error::ReadInitramfs {
            image: name.clone(),
            source,
        })?;
    Ok(LoadedInitramfs {
        address: GuestAddress(address),
        size,
    })
}

/// Builds the command line, checking the length limit of the guest kernel.
pub fn build_cmdline(cmdline: &str) -> Result<Cmdline> {
    let mut c = Cmdline::new(CMDLINE_MAX_SIZE).map_err(|e| Error::Cmdline(e.to_string()))?;
    c.insert_str(cmdline)
        .map_err(|e| Error::Cmdline(format!("{e} (at most {} bytes)", CMDLINE_MAX_SIZE - 1)))?;
    Ok(c)
}

/// The e820 map: low RAM, the EBDA/BIOS hole (holding the ACPI tables), high RAM split around
/// the MMIO gap.
pub fn e820_map(memory_size: u64) -> Vec<boot_e820_entry> {
    let entry = |addr, size, r#type| boot_e820_entry { addr, size, r#type };
    let mut map = vec![
        entry(0, EBDA_START, E820_RAM),
        entry(EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
    ];
    for (start, size) in ram_regions(memory_size) {
        if start == 0 {
            map.push(entry(HIMEM_START, size - HIMEM_START, E820_RAM));
        } else {
            map.push(entry(start, size, E820_RAM));
        }
    }
    map
}

/// Writes the command line and the zero page (boot_params) for the 64-bit boot protocol.
pub fn write_boot_params(
    mem: &GuestMemoryMmap,
    kernel: &LoadedKernel,
    cmdline: &Cmdline,
    initramfs: Option<LoadedInitramfs>,
    rsdp: GuestAddress,
    memory_size: u64,
) -> Result<()> {
    loader::load_cmdline(mem, GuestAddress(CMDLINE_START), cmdline).map_err(|e| {
        Error::Cmdline(format!(
            "cannot place the command line in guest memory: {e}"
        ))
    })?;
    let cmdline_len = cmdline
        .as_cstring()
        .map(|c| c.as_bytes().len())
        .map_err(|e| Error::Cmdline(e.to_string()))?;

    let mut params = boot_params::default();
    if let Some(hdr) = kernel.setup_header {
        params.hdr = hdr;
    } else {
        // An ELF vmlinux carries no setup header: describe a modern bootloader ourselves.
        params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
        params.hdr.header = KERNEL_HDR_MAGIC;
        params.hdr.version = 0x020f;
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32 + 1;
    if let Some(initramfs) = initramfs {
        params.hdr.ramdisk_image = initramfs.address.raw_value() as u32;
        params.hdr.ramdisk_size = initramfs.size as u32;
    }
    params.acpi_rsdp_addr = rsdp.raw_value();
    let map = e820_map(memory_size);
    for (slot, entry) in params.e820_table.iter_mut().zip(map.iter()) {
        *slot = *entry;
    }
    params.e820_entries = map.len() as u8;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_START))
        .map_err(|source| Error::GuestWrite {
            what: "boot parameters",
            source,
        })
}

/// Identity-maps the first GiB with 2 MiB pages: the kernel, zero page and command line must
/// be reachable when the 64-bit entry point runs.
pub fn write_page_tables(mem: &GuestMemoryMmap) -> Result<()> {
    let write = |value: u64, addr: u64| {
        mem.write_obj(value, GuestAddress(addr))
            .map_err(|source| Error::GuestWrite {
                what: "page tables",
                source,
            })
    };
    write(PDPTE_START | 0x03, PML4_START)?;
    write(PDE_START | 0x03, PDPTE_START)?;
    for i in 0..512u64 {
        // Present, writable, 2 MiB page.
        write((i << 21) | 0x83, PDE_START + i * 8)?;
    }
    Ok(())
}

/// Real-mode code at the reset vector: write the ACPI reset value to the reset register, then
/// halt. Linux on a hardware-reduced ACPI platform without EFI reboots through the "BIOS" (it
/// jumps to F000:FFF0 in real mode), so this is where `reboot` ends up unless `reboot=` says
/// otherwise.
pub fn reset_vector_code() -> [u8; 10] {
    let [port_lo, port_hi] = ACPI_RESET_PORT.to_le_bytes();
    [
        0xba,
        port_lo,
        port_hi, // mov dx, ACPI_RESET_PORT
        0xb0,
        ACPI_RESET_VALUE, // mov al, ACPI_RESET_VALUE
        0xee,             // out dx, al
        0xfa,             // cli
        0xf4,             // hlt
        0xeb,
        0xfd, // jmp back to the hlt
    ]
}

pub fn write_reset_vector(mem: &GuestMemoryMmap) -> Result<()> {
    mem.write_slice(&reset_vector_code(), GuestAddress(RESET_VECTOR))
        .map_err(|source| Error::GuestWrite {
            what: "reset vector",
            source,
        })
}

/// GDT entries: null, 64-bit code, data, TSS (the TSS is only there so TR is valid).
pub const GDT: [u64; 4] = [
    0,
    0x00af_9b00_0000_ffff,
    0x00cf_9300_0000_ffff,
    0x008f_8b00_0000_ffff,
];

pub fn write_gdt_idt(mem: &GuestMemoryMmap) -> Result<()> {
    for (i, entry) in GDT.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(GDT_START + i as u64 * 8))
            .map_err(|source| Error::GuestWrite {
                what: "GDT",
                source,
            })?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_START))
        .map_err(|source| Error::GuestWrite {
            what: "IDT",
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn tmpfile(name: &str, bytes: &[u8]) -> PathBuf {
        let path = std::env::temp_dir().join(format!("mqvmm-boot-{}-{name}", std::process::id()));
        let mut f = File::create(&path).unwrap();
        f.write_all(bytes).unwrap();
        path
    }

    fn kernel_at(path: &Path) -> Image {
        Image::open(ImageKind::Kernel, path).unwrap()
    }

    #[test]
    fn detects_elf_and_bzimage_and_rejects_garbage() {
        let p = tmpfile("elf", b"\x7fELF\x02\x01\x01");
        assert_eq!(
            detect_format(&mut kernel_at(&p)).unwrap(),
            KernelFormat::Elf
        );
        let mut bz = vec![0u8; 0x300];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        let p = tmpfile("bz", &bz);
        assert_eq!(
            detect_format(&mut kernel_at(&p)).unwrap(),
            KernelFormat::BzImage
        );
        let p = tmpfile("junk", b"this is not a kernel");
        let err = detect_format(&mut kernel_at(&p)).unwrap_err();
        assert!(err
            .to_string()
            .contains("neither an ELF vmlinux nor a bzImage"));
        let p = tmpfile("empty", b"");
        assert!(detect_format(&mut kernel_at(&p)).is_err());
    }

    #[test]
    fn an_image_that_cannot_be_opened_is_named_with_its_kind_and_path() {
        let err = Image::open(ImageKind::Initramfs, Path::new("/nonexistent/initrd")).unwrap_err();
        assert_eq!(err.to_string(), "cannot open initramfs /nonexistent/initrd");
        assert!(matches!(err, Error::OpenImage { .. }));
    }

    /// `file`'s fd, duplicated to a fresh number that `Image::from_fd` may take.
    fn dup_fd(file: &impl std::os::fd::AsRawFd) -> RawFd {
        // SAFETY: dup takes an integer; the new fd is owned by the caller.
        let fd = unsafe { libc::dup(file.as_raw_fd()) };
        assert!(fd > 2, "dup: {}", std::io::Error::last_os_error());
        fd
    }

    #[test]
    fn an_image_fd_must_be_an_open_regular_file() {
        let p = tmpfile("fd-elf", b"\x7fELF\x02\x01\x01");
        let fd = dup_fd(&File::open(&p).unwrap());
        // SAFETY: `fd` is a fresh duplicate owned by nothing else.
        let mut image = unsafe { Image::from_fd(ImageKind::Kernel, fd) }.unwrap();
        assert_eq!(image.name(), format!("fd {fd}"));
        assert_eq!(detect_format(&mut image).unwrap(), KernelFormat::Elf);
        drop(image);

        // Far above any fd this test process opens, so never taken by a parallel test.
        let closed = 1 << 20;
        // SAFETY: `closed` is not open, so nothing owns it; it is refused, not adopted.
        let err = unsafe { Image::from_fd(ImageKind::Kernel, closed) }.unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("--kernel-fd {closed} is not an open file descriptor")
        );

        let dir = dup_fd(&File::open("/").unwrap());
        // SAFETY: `dir` is a fresh duplicate owned by nothing else (a directory: refused).
        let err = unsafe { Image::from_fd(ImageKind::Initramfs, dir) }.unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("--initramfs-fd {dir} is not a regular file: it is a directory")
        );
        // Left open on error, still the caller's.
        // SAFETY: `dir` is open and owned by this test.
        drop(unsafe { File::from_raw_fd(dir) });

        let mut ends = [0; 2];
        // SAFETY: pipe2 writes two fds into `ends`, valid for the call.
        let rc = unsafe { libc::pipe2(ends.as_mut_ptr(), libc::O_CLOEXEC) };
        assert_eq!(rc, 0);
        // SAFETY: the read end was just created and is owned by nothing else (a pipe: refused).
        let err = unsafe { Image::from_fd(ImageKind::Kernel, ends[0]) }.unwrap_err();
        assert!(err.to_string().ends_with("it is a pipe"), "{err}");
        for end in ends {
            // SAFETY: both ends are open and owned by this test.
            drop(unsafe { File::from_raw_fd(end) });
        }

        for fd in 0..=2 {
            // SAFETY: fds 0-2 are the harness's, which the contract allows only because nothing
            // is adopted: the standard streams are refused by number, before anything else.
            let err = unsafe { Image::from_fd(ImageKind::Kernel, fd) }.unwrap_err();
            assert!(matches!(err, Error::ImageFdStdio { .. }), "{err}");
        }
    }

    #[test]
    fn e820_covers_ram_and_skips_the_gap() {
        let map = e820_map(512 << 20);
        let ram: u64 = map
            .iter()
            .filter(|e| e.r#type == E820_RAM)
            .map(|e| e.size)
            .sum();
        assert_eq!(ram, (512 << 20) - (HIMEM_START - EBDA_START));
        let big = e820_map(6 << 30);
        assert!(big
            .iter()
            .all(|e| e.addr + e.size <= MMIO_GAP_START || e.addr >= MMIO_GAP_END));
        let last_addr = { big.last().unwrap().addr };
        assert_eq!(last_addr, MMIO_GAP_END);
    }

    #[test]
    fn reset_vector_fits_below_1_mib_and_targets_the_reset_port() {
        let code = reset_vector_code();
        assert!(RESET_VECTOR + code.len() as u64 <= HIMEM_START);
        assert_eq!(&code[1..3], &ACPI_RESET_PORT.to_le_bytes());
        assert_eq!(code[4], ACPI_RESET_VALUE);
        // The final short jump lands on the hlt.
        let jump_target = code.len() as i64 + i64::from(code[9] as i8);
        assert_eq!(code[jump_target as usize], 0xf4);
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        write_reset_vector(&mem).unwrap();
        let mut back = [0u8; 10];
        mem.read_slice(&mut back, GuestAddress(RESET_VECTOR))
            .unwrap();
        assert_eq!(back, code);
    }

    #[test]
    fn cmdline_longer_than_the_kernel_limit_is_refused() {
        assert!(build_cmdline("console=ttyS0").is_ok());
        let long = "x".repeat(CMDLINE_MAX_SIZE + 10);
        assert!(build_cmdline(&long).is_err());
    }

    /// 64 MiB of guest memory and an ELF kernel loaded at 16..32 MiB.
    fn memory_and_elf_kernel() -> (u64, GuestMemoryMmap, LoadedKernel) {
        let size = 64u64 << 20;
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size as usize)]).unwrap();
        let kernel = LoadedKernel {
            format: KernelFormat::Elf,
            entry: GuestAddress(0x100_0000),
            end: 0x200_0000,
            setup_header: None,
        };
        (size, mem, kernel)
    }

    #[test]
    fn initramfs_goes_high_and_never_over_the_kernel() {
        let (size, mem, kernel) = memory_and_elf_kernel();
        let p = tmpfile("initrd", &[7u8; 10000]);
        let mut image = Image::open(ImageKind::Initramfs, &p).unwrap();
        let loaded = load_initramfs(&mem, &mut image, &kernel, size).unwrap();
        assert_eq!(loaded.address.raw_value() % PAGE_SIZE, 0);
        assert!(loaded.address.raw_value() + loaded.size <= size);
        assert!(loaded.address.raw_value() >= kernel.end);
        let p = tmpfile("initrd-big", &vec![0u8; 40 << 20]);
        let mut image = Image::open(ImageKind::Initramfs, &p).unwrap();
        let err = load_initramfs(&mem, &mut image, &kernel, size).unwrap_err();
        assert!(matches!(err, Error::InitramfsTooBig { .. }), "{err}");
    }

    #[test]
    fn an_initramfs_fd_is_read_from_its_start_whatever_its_offset() {
        let (size, mem, kernel) = memory_and_elf_kernel();
        let bytes: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
        let p = tmpfile("initrd-fd", &bytes);
        let mut file = File::open(&p).unwrap();
        // Whoever opened it may have read some of it: the offset is shared across the exec.
        file.seek(SeekFrom::Start(1234)).unwrap();
        // SAFETY: the duplicate is fresh and owned by nothing else.
        let mut image = unsafe { Image::from_fd(ImageKind::Initramfs, dup_fd(&file)) }.unwrap();
        let loaded = load_initramfs(&mem, &mut image, &kernel, size).unwrap();
        assert_eq!(loaded.size, bytes.len() as u64);
        let mut back = vec![0u8; bytes.len()];
        mem.read_slice(&mut back, loaded.address).unwrap();
        assert_eq!(back, bytes);
    }
}
