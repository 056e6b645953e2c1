//! Signals as events: the VMM blocks the signals it handles in every thread and reads them from a
//! signalfd in the main loop, so no code runs in signal context.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot block signals {signals:?}")]
    Block {
        signals: Vec<i32>,
        #[source]
        source: io::Error,
    },
    #[error("cannot create a signalfd")]
    Create(#[source] io::Error),
}

pub struct SignalFd {
    file: File,
}

fn sigset(signals: &[i32]) -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it before use and sigaddset only
    // writes into it. Both only fail for invalid signal numbers, which are not in our lists.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for &sig in signals {
            libc::sigaddset(&mut set, sig);
        }
        set
    }
}

impl SignalFd {
    /// Blocks `signals` for the calling thread (and every thread it spawns afterwards) and
    /// returns a non-blocking fd that reports them.
    pub fn new(signals: &[i32]) -> Result<Self, Error> {
        let set = sigset(signals);
        // SAFETY: `set` is a valid, initialised sigset; the old mask is not requested.
        let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(Error::Block {
                signals: signals.to_vec(),
                source: io::Error::from_raw_os_error(rc),
            });
        }
        // SAFETY: `set` is valid; -1 asks for a new fd, which we own from here on.
        let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
        if fd < 0 {
            return Err(Error::Create(io::Error::last_os_error()));
        }
        // SAFETY: signalfd returned a new fd that nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        Ok(SignalFd { file })
    }

    /// The next pending signal, if any.
    pub fn read(&mut self) -> io::Result<Option<i32>> {
        let mut info = [0u8; std::mem::size_of::<libc::signalfd_siginfo>()];
        match self.file.read(&mut info) {
            Ok(n) if n == info.len() => {
                let signo = u32::from_ne_bytes([info[0], info[1], info[2], info[3]]);
                Ok(Some(signo as i32))
            }
            Ok(_) => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }
}

impl AsRawFd for SignalFd {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}
