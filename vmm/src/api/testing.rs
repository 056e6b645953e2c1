//! A fake [`Vmm`] for the API's unit tests and its fuzz target (feature `test-utils`).

use std::sync::atomic::Ordering;
use std::sync::Mutex;

use virtio_net::metrics::NetSnapshot;
use virtio_net::NetMetrics;

use super::{PairQueues, QueueReport, RequestError, Vmm};

/// A VM with a two-pair device whose link changes are recorded, or no device at all.
pub struct FakeVmm {
    /// Whether the VM has a network device (else every command fails with no device).
    pub has_net: bool,
    /// Whether its tap is gone (`link up` is refused).
    pub tap_gone: bool,
    /// Every link change asked for, in order.
    pub links: Mutex<Vec<bool>>,
}

impl Default for FakeVmm {
    fn default() -> Self {
        Self::new()
    }
}

impl FakeVmm {
    /// A VM with a network device whose tap is there.
    pub fn new() -> FakeVmm {
        FakeVmm {
            has_net: true,
            tap_gone: false,
            links: Mutex::new(Vec::new()),
        }
    }

    fn check(&self) -> Result<(), RequestError> {
        if self.has_net {
            Ok(())
        } else {
            Err(RequestError::NoNetworkDevice)
        }
    }
}

impl Vmm for FakeVmm {
    fn counters(&self) -> Result<NetSnapshot, RequestError> {
        self.check()?;
        let metrics = NetMetrics::new(2);
        metrics.pairs[1].rx.packets.store(7, Ordering::Relaxed);
        Ok(metrics.snapshot())
    }

    fn queues(&self) -> Result<QueueReport, RequestError> {
        self.check()?;
        Ok(QueueReport {
            max_pairs: 2,
            active_pairs: 1,
            attached_pairs: 1,
            host_attached_queues: 1,
            pairs: vec![
                PairQueues {
                    pair: 0,
                    attached: true,
                    parked: false,
                    host_attached: Some(true),
                    host_error: None,
                },
                PairQueues {
                    pair: 1,
                    attached: false,
                    parked: true,
                    host_attached: None,
                    host_error: Some("TUNGETIFF failed".into()),
                },
            ],
        })
    }

    fn set_link(&self, up: bool) -> Result<(), RequestError> {
        self.check()?;
        if up && self.tap_gone {
            return Err(RequestError::TapGone);
        }
        self.links.lock().unwrap().push(up);
        Ok(())
    }
}
