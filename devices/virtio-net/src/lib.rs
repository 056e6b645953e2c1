// SPDX-License-Identifier: Apache-2.0
//! Multiqueue virtio-net device model: one backend queue (a tap queue) per virtqueue pair,
//! with VQ_PAIRS_SET applied to the backends.
//!
//! The device knows nothing about KVM or the transport. A transport (virtio-mmio in the vmm)
//! negotiates features through [`Net`], builds the `virtio_queue::Queue`s, and hands them to
//! [`Net::activate`] with one kick [`EventFd`](vmm_sys_util::eventfd::EventFd) each (what
//! KVM signals as ioeventfd) and an [`Interrupt`] sink (irqfd + interrupt status).
//!
//! # Layers
//! Modules depend one way, from the device down to the ring:
//! - [`Net`] (`device.rs`): features, config space, activation, reset, link state.
//! - `worker.rs`: the threads and their epoll loops (event-manager subscribers); the control
//!   thread runs any [`ctrl::CtrlTarget`].
//! - `state.rs`: what the device and its threads share, the queue-pair switch over the real
//!   workers and backends, and the control commands' target (rate-limited).
//! - `control.rs`: the channel through which the control thread parks, resumes and stops a
//!   worker and waits, bounded, for its confirmation.
//! - [`rxtx::QueuePair`]: the pure data path of one pair (`process_tx` / `process_rx`),
//!   callable without threads.
//! - [`ctrl`]: control-queue parsing and the VQ_PAIRS_SET sequence, over small traits.
//! - [`ring::Ring`]: the device side of a split virtqueue, used by every queue.
//! - [`chain`]: descriptor chains to iovecs, every malformed case told apart.
//!
//! # Threads
//! - `net-pairN` (or `net-pair0+2` for a thread serving pairs 0 and 2), the workers: one
//!   per queue pair whose queues the driver set up, by default on a thread of its own;
//!   [`Net::set_io_threads`] puts them on fewer threads (pair `p` on thread
//!   `p % threads`), each pair still its own epoll subscriber of the thread's one loop, so
//!   everything below holds per pair. A pair's epoll set holds the rx kick, the tx kick, a reschedule eventfd (work left after a budget of 256
//!   frames or 8192 descriptors, so rx and tx of a pair cannot starve each other or the
//!   control eventfd, whatever chains the guest builds), a control eventfd, and —
//!   only while the pair is enabled — the backend fd, `EPOLLIN | EPOLLET`. Tx: each
//!   available chain goes to the backend with one `writev` straight from guest memory.
//!   Rx: on backend readability or an rx kick, frames are `readv`'d straight into guest
//!   buffers until the backend says EAGAIN (edge-triggered) or the guest has no buffers
//!   left; then the worker asks for an rx kick and resumes when the guest adds buffers.
//!   A parked worker still serves kicks but never touches its own (detached) backend: rx
//!   waits, and tx chains the guest still queued (racing its own VQ_PAIRS_SET) are written
//!   through pair 0's backend, so nothing the guest sent is lost; before it parks, a worker
//!   flushes its transmit queue to its own backend.
//! - `net-ctrl`, the control queue. It runs on its own thread, not the vCPU (the kick is an
//!   ioeventfd, so the vCPU never waits for it) and not the VMM main loop: a VQ_PAIRS_SET
//!   waits (bounded, 2 s per step) for workers to confirm they parked or resumed, and does
//!   TUNSETQUEUE ioctls; none of that may stall a vCPU or the VMM's other devices, and the
//!   transport needs to know nothing about it. It answers at most 64 commands per wake-up
//!   and none once the device is stopping; a reset raises a stop signal that ends every
//!   wait of this thread, and every device thread is joined with a bound.
//! - Both kinds are started through a [`ThreadSpawner`] ([`Net::set_thread_spawner`]); the
//!   default spawns them from the activating thread. mqvmm passes one that creates them on
//!   its spawner thread, so each enters its own seccomp filter (see `vmm::seccomp`).
//!
//! # A tap deleted under the device
//! When the operator deletes the tap while the VM runs, the kernel wakes every poller of its
//! queue fds; from then on each fd polls as an error and every tun ioctl fails (TUNGETIFF
//! with EBADFD, TUNSETQUEUE with EINVAL). A running worker that sees the error asks its
//! backend [`Backend::is_gone`], stops polling the fd (no busy loop), and the device logs one
//! error line, clears VIRTIO_NET_S_LINK_UP and raises a config interrupt: the guest sees
//! NO-CARRIER. Frames the guest still sends are dropped and counted; a later VQ_PAIRS_SET
//! fails at TUNSETQUEUE, is rolled back and answered ERR (and also detects the loss, should
//! no worker have polled). The link stays down, also across a device reset. The VM runs on.
//!
//! # VQ_PAIRS_SET(n)
//! 1. Validate `1 <= n <= max_virtqueue_pairs` and that MQ was negotiated, else ERR with
//!    nothing changed (n = 0, n = 0x8001, ...). The same n as now is a no-op answered OK.
//!    Then wait, if need be, for the host-operation limit ([`limit`]): every TUNSETQUEUE,
//!    TUNSETVNETHDRSZ and TUNSETOFFLOAD a command causes takes the host's RTNL lock, so a
//!    device may cause a burst of them and then 32 per second; a command beyond that waits
//!    and is then carried out and answered as usual.
//! 2. Shrinking, for each pair from the highest down to n: ask its worker to park and wait
//!    for its confirmation (it has removed the backend fd from its epoll set), then detach
//!    the backend queue (TUNSETQUEUE IFF_DETACH_QUEUE).
//! 3. Growing, for each pair from the current count up to n - 1: attach the backend queue
//!    (IFF_ATTACH_QUEUE, then the header size and offloads again), then ask the worker to
//!    resume and wait for its confirmation (it polls the fd again and reads what queued).
//! 4. If any step fails, the steps already done are undone in reverse (re-attach and
//!    resume, or park and re-detach), the active count stays what it was, and the reply is
//!    ERR. An undo step that fails is logged and counted (`rollback_failures`); the metrics'
//!    per-pair `attached` / `parked` always show the real state.
//! 5. Only then is the ack byte written, the chain returned (`add_used`) and the interrupt
//!    sent. `last_vq_pairs_set_ns` records kick-to-used latency.
//!
//! At activation and after reset only pair 0 is attached (the spec uses receiveq1 only
//! until VQ_PAIRS_SET); without MQ negotiated only pair 0 ever runs.
//!
//! # Metrics
//! [`NetMetrics`] holds per-queue atomics (packets, bytes, drops, bad chains, kicks,
//! interrupts), per-pair `attached` / `parked`, and device counters; it renders one text
//! line ([`NetMetrics::to_text`]) or JSON ([`NetMetrics::to_json`]) for the VMM to print.

pub mod backend;
pub mod chain;
pub mod coalesce;
pub mod config;
mod control;
pub mod ctrl;
mod device;
pub mod features;
pub mod filter;
pub mod limit;
pub mod metrics;
pub mod ring;
pub mod rxtx;
mod state;
pub mod steer;
mod tap_backend;
#[cfg(any(test, feature = "test-utils"))]
pub mod test_utils;
mod worker;

#[cfg(test)]
mod tests;

pub use backend::{Backend, BackendError, BackendOp};
pub use config::{ConfigError, Duplex, NetConfig, DEFAULT_QUEUE_SIZE, MAX_QUEUE_PAIRS};
pub use device::{Error, Net, NetControl};
pub use metrics::{NetMetrics, PairMetrics, QueueMetrics};
pub use worker::{DeviceThread, StdSpawner, ThreadSpawner};

/// Where the device sends notifications; implemented by the transport (irqfd plus the
/// interrupt status register).
pub trait Interrupt: Send + Sync {
    /// The device put buffers into the used ring of queue `queue_index`.
    fn signal_used_queue(&self, queue_index: u16) -> std::io::Result<()>;
    /// The config space changed (link status).
    fn signal_config(&self) -> std::io::Result<()>;
}
