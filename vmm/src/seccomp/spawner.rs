//! The `spawner` thread: creates the network device's threads on behalf of the vCPU that
//! activates the device, so that no vCPU needs to be allowed to create threads (see the
//! module documentation of [`crate::seccomp`], "Why a spawner thread").

use std::io;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::{self, JoinHandle};

use virtio_net::{DeviceThread, ThreadSpawner};

use super::{Error, Sandbox, ThreadKind};

struct Request {
    kind: ThreadKind,
    name: String,
    body: Box<dyn FnOnce() + Send + 'static>,
    reply: mpsc::Sender<io::Result<JoinHandle<()>>>,
}

/// The device's [`ThreadSpawner`]: requests go to the spawner thread, which creates the
/// thread; the new thread enters the filter of its kind and only then runs the device's code.
/// If it cannot enter its filter it logs why and ends without running it, which fails the
/// activation (the device reports DEVICE_NEEDS_RESET) instead of running unconfined.
pub struct Spawner {
    requests: mpsc::Sender<Request>,
}

impl Spawner {
    /// Starts the spawner thread, which enters its own filter before serving requests. It
    /// ends when the last `Spawner` handle is dropped.
    pub fn start(sandbox: Arc<Sandbox>) -> Result<Spawner, Error> {
        let (requests, incoming) = mpsc::channel::<Request>();
        let (ready_tx, ready_rx) = mpsc::channel();
        thread::Builder::new()
            .name("spawner".into())
            .spawn(move || {
                if let Err(e) = sandbox.enter(ThreadKind::Spawner) {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
                let _ = ready_tx.send(Ok(()));
                for request in incoming {
                    serve(&sandbox, request);
                }
            })
            .map_err(Error::StartSpawner)?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Spawner { requests }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(Error::StartSpawner(io::Error::other(
                "the spawner thread ended during setup",
            ))),
        }
    }
}

fn serve(sandbox: &Arc<Sandbox>, request: Request) {
    let Request {
        kind,
        name,
        body,
        reply,
    } = request;
    let sandbox = sandbox.clone();
    let result = thread::Builder::new().name(name).spawn(move || {
        if let Err(e) = sandbox.enter(kind) {
            let mut message = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                message.push_str(&format!(": {s}"));
                source = s.source();
            }
            log::error!("{message}; the thread does not start");
            return;
        }
        body();
    });
    let _ = reply.send(result);
}

impl ThreadSpawner for Spawner {
    fn spawn(
        &self,
        kind: DeviceThread,
        name: String,
        body: Box<dyn FnOnce() + Send + 'static>,
    ) -> io::Result<JoinHandle<()>> {
        let kind = match kind {
            DeviceThread::QueuePair(_) => ThreadKind::NetPair,
            DeviceThread::Control => ThreadKind::NetCtrl,
        };
        let gone = || io::Error::other("the spawner thread has ended");
        let (reply, result) = mpsc::channel();
        self.requests
            .send(Request {
                kind,
                name,
                body,
                reply,
            })
            .map_err(|_| gone())?;
        result.recv().map_err(|_| gone())?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spawned_threads_run_their_body_with_their_name() {
        let spawner = Spawner::start(Arc::new(Sandbox::disabled())).unwrap();
        let (tx, rx) = mpsc::channel();
        let handle = spawner
            .spawn(
                DeviceThread::QueuePair(3),
                "net-pair3".into(),
                Box::new(move || {
                    let _ = tx.send(thread::current().name().map(str::to_string));
                }),
            )
            .unwrap();
        handle.join().unwrap();
        assert_eq!(rx.recv().unwrap().as_deref(), Some("net-pair3"));
    }
}
