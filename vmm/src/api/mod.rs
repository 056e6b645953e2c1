//! The operator's control socket (`--api-socket PATH`) and its small JSON protocol.
//!
//! # Protocol
//! A unix stream socket, mode 0600, owned by mqvmm's user: who may open it may operate the VM
//! (mqvmm-launch creates its directory 0700 for that user). **One request per connection**:
//! the client sends one JSON object, ended by a newline or by shutting down its sending side,
//! and reads one JSON object, ended by a newline, after which mqvmm closes the connection.
//! Anything after the first newline is ignored. A request may have at most [`MAX_REQUEST`]
//! bytes and must arrive within [`REQUEST_TIMEOUT`]; the reply must be taken within the same
//! time. Connections are served one at a time, by the `api` thread.
//!
//! | request | reply |
//! |---|---|
//! | `{"command":"counters"}` | `{"ok":true,"counters":{...}}`: every device counter, per pair and per queue (what SIGUSR1 prints) |
//! | `{"command":"queues"}` | `{"ok":true,"queues":{...}}`: per pair the device's `attached`/`parked` and the tap's own `host_attached`; `host_attached_queues` |
//! | `{"command":"link","up":false}` | `{"ok":true,"link":{"up":false}}`: the link the guest sees (config-space STATUS and a config interrupt) |
//! | `{"command":"shutdown"}` | `{"ok":true,"shutdown":{"exit_code":0}}`, then mqvmm stops the VM and exits 0 |
//!
//! Anything else gets `{"ok":false,"error":"..."}`: not JSON, an unknown command, a missing
//! or unknown field, a request too long or too slow, no network device. Nothing a client
//! sends stops mqvmm but `shutdown`.
//!
//! The layers: [`handle`] turns request bytes into reply bytes against a [`Vmm`] (pure, what
//! the unit tests and the fuzz target drive), `server` reads and writes one connection at a
//! time with deadlines and runs the thread, `socket` creates and removes the socket file,
//! [`NetVmm`] is the [`Vmm`] of a running mqvmm, and [`client`] is the other end
//! (`mqvmm-ctl`).

pub mod client;
mod server;
mod socket;

use std::time::Duration;

use serde::{Deserialize, Serialize};
use virtio_net::metrics::NetSnapshot;
use virtio_net::NetControl;

pub use server::{serve_connection, spawn, Error as ServerError};
pub use socket::{ApiSocket, Error as SocketError};

/// The longest request the server reads, in bytes (the newline not counted).
pub const MAX_REQUEST: usize = 64 * 1024;

/// How long a client may take to send its request, and then to take the reply.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// What a client may ask.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Every counter of the network device.
    Counters,
    /// The queue pairs: the device's view and the tap's.
    Queues,
    /// Sets the link the guest sees.
    Link {
        /// Carrier on (`true`) or off.
        up: bool,
    },
    /// Stops the VM; mqvmm exits 0.
    Shutdown,
}

/// Why a request got an error reply.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("request longer than {MAX_REQUEST} bytes")]
    TooLong,
    #[error("no complete request within {0:?}")]
    Timeout(Duration),
    #[error("invalid request")]
    Parse(#[source] serde_json::Error),
    #[error("mqvmm has no network device")]
    NoNetworkDevice,
    #[error("the tap is gone (deleted while mqvmm runs): the link stays down")]
    TapGone,
}

/// The queue pairs as the device and the host see them (`queues`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct QueueReport {
    /// Queue pairs the device has (one tap queue each).
    pub max_pairs: usize,
    /// Pairs the guest enabled (VQ_PAIRS_SET).
    pub active_pairs: u64,
    /// Pairs whose tap queue the device attached.
    pub attached_pairs: usize,
    /// Tap queues the kernel reports attached (TUNGETIFF per queue).
    pub host_attached_queues: usize,
    /// One entry per pair.
    pub pairs: Vec<PairQueues>,
}

/// One queue pair in a [`QueueReport`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PairQueues {
    pub pair: usize,
    /// The device attached the pair's tap queue.
    pub attached: bool,
    /// The pair's worker does not touch its tap queue.
    pub parked: bool,
    /// The kernel has the tap queue attached; `null` when it cannot say (`host_error`).
    pub host_attached: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_error: Option<String>,
}

/// What the protocol reads and changes of the VM.
pub trait Vmm {
    fn counters(&self) -> Result<NetSnapshot, RequestError>;
    fn queues(&self) -> Result<QueueReport, RequestError>;
    fn set_link(&self, up: bool) -> Result<(), RequestError>;
}

/// A reply: `ok` and one more member, named after what it holds.
#[derive(Debug, Serialize)]
struct Reply {
    ok: bool,
    #[serde(flatten)]
    body: Body,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "snake_case")]
enum Body {
    Counters(NetSnapshot),
    Queues(QueueReport),
    Link { up: bool },
    Shutdown { exit_code: i32 },
    Error(String),
}

/// A reply to send, and whether mqvmm stops once it is sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handled {
    /// One line of JSON, newline included.
    pub reply: Vec<u8>,
    pub shutdown: bool,
}

/// The error reply for `error`: its message and its sources', `: `-separated.
pub fn error_reply(error: &RequestError) -> Vec<u8> {
    let mut message = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    encode(&Reply {
        ok: false,
        body: Body::Error(message),
    })
}

fn encode(reply: &Reply) -> Vec<u8> {
    // Strings, integers and booleans only: serialising cannot fail, but should it, the
    // client still gets a reply.
    let mut line = serde_json::to_vec(reply)
        .unwrap_or_else(|_| br#"{"ok":false,"error":"cannot encode the reply"}"#.to_vec());
    line.push(b'\n');
    line
}

/// Answers one request (its bytes without the newline that ended it).
pub fn handle(request: &[u8], vmm: &dyn Vmm) -> Handled {
    let answer = || -> Result<(Body, bool), RequestError> {
        if request.len() > MAX_REQUEST {
            return Err(RequestError::TooLong);
        }
        let request: Request = serde_json::from_slice(request).map_err(RequestError::Parse)?;
        Ok(match request {
            Request::Counters => (Body::Counters(vmm.counters()?), false),
            Request::Queues => (Body::Queues(vmm.queues()?), false),
            Request::Link { up } => {
                vmm.set_link(up)?;
                (Body::Link { up }, false)
            }
            Request::Shutdown => (
                Body::Shutdown {
                    exit_code: crate::exit::VmExit::Shutdown.exit_code(),
                },
                true,
            ),
        })
    };
    match answer() {
        Ok((body, shutdown)) => Handled {
            reply: encode(&Reply { ok: true, body }),
            shutdown,
        },
        Err(e) => Handled {
            reply: error_reply(&e),
            shutdown: false,
        },
    }
}

/// The [`Vmm`] of a running mqvmm: its network device, if it has one.
pub struct NetVmm {
    pub net: Option<NetControl<tap::TapQueue>>,
}

impl NetVmm {
    fn net(&self) -> Result<&NetControl<tap::TapQueue>, RequestError> {
        self.net.as_ref().ok_or(RequestError::NoNetworkDevice)
    }
}

impl Vmm for NetVmm {
    fn counters(&self) -> Result<NetSnapshot, RequestError> {
        Ok(self.net()?.metrics().snapshot())
    }

    fn queues(&self) -> Result<QueueReport, RequestError> {
        let net = self.net()?;
        let device = net.metrics().snapshot();
        let pairs: Vec<PairQueues> = device
            .pairs
            .iter()
            .zip(net.backends())
            .map(|(p, queue)| {
                let host = queue.kernel_attached();
                PairQueues {
                    pair: p.pair,
                    attached: p.attached,
                    parked: p.parked,
                    host_error: host.as_ref().err().map(|e| {
                        let mut message = e.to_string();
                        if let Some(source) = std::error::Error::source(e) {
                            message.push_str(&format!(": {source}"));
                        }
                        message
                    }),
                    host_attached: host.ok(),
                }
            })
            .collect();
        Ok(QueueReport {
            max_pairs: pairs.len(),
            active_pairs: device.active_pairs,
            attached_pairs: pairs.iter().filter(|p| p.attached).count(),
            host_attached_queues: pairs
                .iter()
                .filter(|p| p.host_attached == Some(true))
                .count(),
            pairs,
        })
    }

    fn set_link(&self, up: bool) -> Result<(), RequestError> {
        if self.net()?.set_link_up(up) {
            Ok(())
        } else {
            Err(RequestError::TapGone)
        }
    }
}

#[cfg(any(test, feature = "test-utils"))]
pub mod testing;
#[cfg(test)]
mod tests;
