//! The `api` thread: accepts one connection at a time, reads one request within
//! [`REQUEST_TIMEOUT`], answers it within as long again, and closes the connection.

use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use super::{error_reply, handle, RequestError, Vmm, MAX_REQUEST, REQUEST_TIMEOUT};
use crate::seccomp::{self, Sandbox, ThreadKind};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot start the api thread")]
    Spawn(#[source] io::Error),
    #[error(transparent)]
    Seccomp(#[from] seccomp::Error),
    #[error("the api thread ended during its setup")]
    Setup,
}

/// How long the thread pauses after an accept error that may persist (out of fds or
/// memory), so that it never spins.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Starts the `api` thread on `listener`: it enters its seccomp filter, then serves
/// connections until a `shutdown` request, after whose reply it calls `on_shutdown`.
/// Returns once the thread is in its filter, or with the reason it could not enter it.
pub fn spawn(
    listener: UnixListener,
    vmm: Box<dyn Vmm + Send>,
    sandbox: Arc<Sandbox>,
    on_shutdown: Box<dyn FnOnce() + Send>,
) -> Result<(), Error> {
    let (ready_tx, ready_rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            if let Err(e) = sandbox.enter(ThreadKind::Api) {
                let _ = ready_tx.send(Err(e));
                return;
            }
            let _ = ready_tx.send(Ok(()));
            serve(&listener, vmm.as_ref());
            on_shutdown();
        })
        .map_err(Error::Spawn)?;
    match ready_rx.recv() {
        Ok(result) => Ok(result?),
        Err(_) => Err(Error::Setup),
    }
}

/// Serves connections one after another until one asks for `shutdown`.
fn serve(listener: &UnixListener, vmm: &dyn Vmm) {
    loop {
        let mut conn = match accept(listener) {
            Ok(conn) => conn,
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::ECONNABORTED)) => {
                continue
            }
            Err(e) => {
                log::warn!("api: accepting a connection failed: {e}");
                pause(ACCEPT_BACKOFF);
                continue;
            }
        };
        if serve_connection(&mut conn, vmm, REQUEST_TIMEOUT) {
            return;
        }
    }
}

/// Reads one request from `conn`, answers it and returns whether it asked for `shutdown`.
/// Every failure is the client's: an error reply where one can still be sent, a debug line
/// where not (a client that went away), and never more than `timeout` ([`REQUEST_TIMEOUT`]
/// in mqvmm) for the request plus as long for the reply.
pub fn serve_connection(conn: &mut UnixStream, vmm: &dyn Vmm, timeout: Duration) -> bool {
    let handled = match read_request(conn, timeout) {
        Ok(request) => handle(&request, vmm),
        Err(ReadError::Request(e)) => super::Handled {
            reply: error_reply(&e),
            shutdown: false,
        },
        Err(ReadError::Io(e)) => {
            log::debug!("api: reading a request failed: {e}");
            return false;
        }
    };
    if let Err(e) = send_all(conn, &handled.reply, Instant::now() + timeout) {
        log::debug!("api: sending a reply failed: {e}");
    }
    // A client that asked for shutdown and left before the reply still asked for it.
    handled.shutdown
}

enum ReadError {
    /// Answered with an error reply.
    Request(RequestError),
    /// The connection failed: nobody to answer.
    Io(io::Error),
}

/// The bytes of one request: up to the first newline, or to the end of the stream.
fn read_request(conn: &mut UnixStream, timeout: Duration) -> Result<Vec<u8>, ReadError> {
    let deadline = Instant::now() + timeout;
    let mut request = Vec::new();
    let mut chunk = [0u8; 4096];
    let mut scanned = 0;
    loop {
        if let Some(end) = request[scanned..].iter().position(|&b| b == b'\n') {
            request.truncate(scanned + end);
            return Ok(request);
        }
        scanned = request.len();
        if request.len() > MAX_REQUEST {
            return Err(ReadError::Request(RequestError::TooLong));
        }
        match wait(conn.as_raw_fd(), libc::POLLIN, deadline) {
            Ok(true) => {}
            Ok(false) => return Err(ReadError::Request(RequestError::Timeout(timeout))),
            Err(e) => return Err(ReadError::Io(e)),
        }
        match conn.read(&mut chunk) {
            Ok(0) => return Ok(request),
            Ok(n) => request.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(ReadError::Io(e)),
        }
    }
}

/// Sends all of `bytes` by `deadline`. MSG_NOSIGNAL: a client that closed its end gets
/// EPIPE here, never a SIGPIPE to mqvmm.
fn send_all(conn: &UnixStream, mut bytes: &[u8], deadline: Instant) -> io::Result<()> {
    while !bytes.is_empty() {
        // SAFETY: send reads at most `bytes.len()` bytes from the live slice; the fd is
        // the connection's, open for the call.
        let sent = unsafe {
            libc::send(
                conn.as_raw_fd(),
                bytes.as_ptr().cast(),
                bytes.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        if sent >= 0 {
            bytes = &bytes[sent as usize..];
            continue;
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::Interrupted => {}
            io::ErrorKind::WouldBlock => {
                if !wait(conn.as_raw_fd(), libc::POLLOUT, deadline)? {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the client did not take the reply in time",
                    ));
                }
            }
            _ => return Err(e),
        }
    }
    Ok(())
}

/// Waits until `fd` has one of `events` (or an error or hang-up, which the next read or
/// send reports); `false` when `deadline` passed first.
fn wait(fd: RawFd, events: libc::c_short, deadline: Instant) -> io::Result<bool> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(false);
        }
        let ms = libc::c_int::try_from(left.as_millis().max(1)).unwrap_or(libc::c_int::MAX);
        let mut pfd = libc::pollfd {
            fd,
            events,
            revents: 0,
        };
        // SAFETY: one valid pollfd, live for the call.
        match unsafe { libc::poll(&mut pfd, 1, ms) } {
            0 => {}
            n if n > 0 => return Ok(true),
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
}

/// Sleeps without nanosleep, which the thread's filter does not allow: a poll on no fds.
fn pause(duration: Duration) {
    let ms = libc::c_int::try_from(duration.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: poll with no fds reads no memory.
    unsafe { libc::poll(std::ptr::null_mut(), 0, ms) };
}

/// The next connection, non-blocking and close-on-exec.
fn accept(listener: &UnixListener) -> io::Result<UnixStream> {
    // SAFETY: accept4 with null address pointers writes no memory; the listener's fd is open
    // for the call.
    let fd = unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: accept4 returned a new fd that nothing else owns.
    Ok(UnixStream::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}
