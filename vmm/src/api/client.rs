//! The client side of the API socket, for `mqvmm-ctl` and tests: one request per
//! connection, the reply read to the end of the stream.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use super::Request;

/// The largest reply read (a `counters` reply of 64 pairs is about 25 KiB).
const MAX_REPLY: u64 = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot connect to {path}")]
    Connect {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("sending the request failed")]
    Send(#[source] io::Error),
    #[error("receiving the reply failed")]
    Receive(#[source] io::Error),
    #[error("the reply is not JSON")]
    Reply(#[source] serde_json::Error),
}

/// Sends `request` to the API socket at `path` and returns the reply, waiting at most
/// `timeout` for each step.
pub fn call(path: &Path, request: &Request, timeout: Duration) -> Result<serde_json::Value, Error> {
    let mut conn = UnixStream::connect(path).map_err(|source| Error::Connect {
        path: path.display().to_string(),
        source,
    })?;
    let mut line = serde_json::to_vec(request).map_err(|e| Error::Send(io::Error::other(e)))?;
    line.push(b'\n');
    call_raw(&mut conn, &line, timeout)
}

/// Sends `bytes` as they are on `conn` (a request, or anything a test wants the server to
/// see), closes the sending side and parses the reply. A server that answers before it read
/// everything (a request too long) may close the connection under the send: its reply is
/// still read.
pub fn call_raw(
    conn: &mut UnixStream,
    bytes: &[u8],
    timeout: Duration,
) -> Result<serde_json::Value, Error> {
    conn.set_read_timeout(Some(timeout)).map_err(Error::Send)?;
    conn.set_write_timeout(Some(timeout)).map_err(Error::Send)?;
    let sent = conn
        .write_all(bytes)
        .and_then(|()| conn.shutdown(std::net::Shutdown::Write));
    let mut reply = Vec::new();
    let received = conn.take(MAX_REPLY).read_to_end(&mut reply);
    match (sent, received) {
        (Err(e), _) if reply.is_empty() => Err(Error::Send(e)),
        (_, Err(e)) if reply.is_empty() => Err(Error::Receive(e)),
        _ => serde_json::from_slice(&reply).map_err(Error::Reply),
    }
}
