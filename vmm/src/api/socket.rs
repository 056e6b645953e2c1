//! The socket file of `--api-socket PATH`: created at start, before any filter, and removed
//! at exit if it is still the one mqvmm created.
//!
//! mqvmm keeps its directory open: the removal at exit is an `unlinkat` relative to that fd,
//! which is all the main thread's filter allows of `unlinkat` (see `seccomp::filters`).

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// The longest socket path: `sun_path` holds 108 bytes with the terminating NUL.
const MAX_PATH: usize = 107;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("--api-socket {path}: a socket path has at most {MAX_PATH} bytes")]
    TooLong { path: String },
    #[error("--api-socket {path}: not a path of a file")]
    NoFileName { path: String },
    #[error("--api-socket {path}: cannot open its directory")]
    Directory {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("--api-socket {path} exists and is not a socket; refusing to replace it")]
    NotASocket { path: String },
    #[error("--api-socket {path} is in use: another process answers on it")]
    InUse { path: String },
    #[error("--api-socket {path}: cannot look at the existing file")]
    Inspect {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("--api-socket {path}: cannot remove the stale socket")]
    RemoveStale {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("--api-socket {path}: cannot create the socket")]
    Bind {
        path: String,
        #[source]
        source: io::Error,
    },
}

/// The listening API socket and what removes its file at drop.
#[derive(Debug)]
pub struct ApiSocket {
    listener: Option<UnixListener>,
    path: PathBuf,
    /// The directory the socket is in, and the socket's name in it.
    dir: OwnedFd,
    name: CString,
    /// The socket file mqvmm created (device, inode): only that file is removed.
    created: (u64, u64),
}

impl ApiSocket {
    /// Creates the socket at `path`, mode 0600. A stale socket there (nobody answers on it:
    /// left by an mqvmm that was killed) is replaced; a socket somebody answers on, or any
    /// other kind of file, is refused.
    pub fn bind(path: &Path) -> Result<ApiSocket, Error> {
        let shown = path.display().to_string();
        if path.as_os_str().len() > MAX_PATH {
            return Err(Error::TooLong { path: shown });
        }
        let name = path
            .file_name()
            .and_then(|n| CString::new(n.as_bytes()).ok())
            .ok_or_else(|| Error::NoFileName {
                path: shown.clone(),
            })?;
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let dir = open_directory(parent).map_err(|source| Error::Directory {
            path: shown.clone(),
            source,
        })?;
        match stat_at(&dir, &name) {
            Ok(st) if st.st_mode & libc::S_IFMT != libc::S_IFSOCK => {
                return Err(Error::NotASocket { path: shown })
            }
            Ok(_) => match UnixStream::connect(path) {
                Ok(_) => return Err(Error::InUse { path: shown }),
                Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
                    unlink_at(&dir, &name).map_err(|source| Error::RemoveStale {
                        path: shown.clone(),
                        source,
                    })?;
                    log::info!("--api-socket {shown}: replaced a stale socket");
                }
                Err(source) => {
                    return Err(Error::Inspect {
                        path: shown,
                        source,
                    })
                }
            },
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(source) => {
                return Err(Error::Inspect {
                    path: shown,
                    source,
                })
            }
        }
        // Mode 0600 from the start: umask is per process, and no other thread exists yet.
        // SAFETY: umask only swaps the process's file mode mask.
        let old = unsafe { libc::umask(0o177) };
        let bound = UnixListener::bind(path);
        // SAFETY: as above, restoring the caller's mask.
        unsafe { libc::umask(old) };
        let listener = bound.map_err(|source| Error::Bind {
            path: shown.clone(),
            source,
        })?;
        let st = stat_at(&dir, &name).map_err(|source| Error::Bind {
            path: shown.clone(),
            source,
        })?;
        Ok(ApiSocket {
            listener: Some(listener),
            path: path.to_path_buf(),
            dir,
            name,
            created: (st.st_dev, st.st_ino),
        })
    }

    /// The listening socket, for the `api` thread (once).
    pub fn take_listener(&mut self) -> Option<UnixListener> {
        self.listener.take()
    }

    /// The listening socket's fd, while this owns it.
    pub fn listener_fd(&self) -> Option<RawFd> {
        self.listener.as_ref().map(AsRawFd::as_raw_fd)
    }

    /// The fd of the socket's directory, which the removal at exit is relative to.
    pub fn dir_fd(&self) -> RawFd {
        self.dir.as_raw_fd()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ApiSocket {
    fn drop(&mut self) {
        match stat_at(&self.dir, &self.name) {
            Ok(st) if (st.st_dev, st.st_ino) == self.created => {
                if let Err(e) = unlink_at(&self.dir, &self.name) {
                    log::warn!("cannot remove the API socket {}: {e}", self.path.display());
                }
            }
            _ => log::debug!(
                "the API socket {} is gone or was replaced; left alone",
                self.path.display()
            ),
        }
    }
}

fn open_directory(path: &Path) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: a NUL-terminated path that outlives the call; the new fd is ours.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: open returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `fstatat(dir, name, AT_SYMLINK_NOFOLLOW)`: the file itself, never where a link points.
fn stat_at(dir: &OwnedFd, name: &CString) -> io::Result<libc::stat> {
    // SAFETY: stat is plain data, fully written by a successful fstatat.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated name and a live stat buffer; the directory fd is open.
    let rc = unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            name.as_ptr(),
            &mut st,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st)
}

fn unlink_at(dir: &OwnedFd, name: &CString) -> io::Result<()> {
    // SAFETY: a NUL-terminated name; the directory fd is open.
    if unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
