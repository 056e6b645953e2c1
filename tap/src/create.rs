//! Creating (or joining) a multiqueue tap: the privileged side, used by the launcher.

use std::fs::File;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::OwnedFd;

use crate::iface;
use crate::sys::{self, TunValue};
use crate::{Error, TapQueue, MAX_QUEUES};

const TUN_PATH: &str = "/dev/net/tun";

/// What [`MultiQueueTap::create`] should make.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TapConfig {
    /// Interface name (or a template such as `mq%d`); `None` lets the kernel choose `tapN`.
    pub name: Option<String>,
    /// Number of queues to open, 1 to [`MAX_QUEUES`].
    pub queues: u16,
    /// TUNSETOWNER: only this uid (or CAP_NET_ADMIN) may attach further queues.
    pub owner: Option<u32>,
    /// TUNSETGROUP: only members of this group (or CAP_NET_ADMIN) may attach further queues.
    pub group: Option<u32>,
    /// TUNSETPERSIST: keep the device when the last queue fd closes.
    pub persist: bool,
}

/// A multiqueue tap with all its queue fds open (IFF_TAP|IFF_NO_PI|IFF_VNET_HDR|IFF_MULTI_QUEUE).
#[derive(Debug)]
pub struct MultiQueueTap {
    name: String,
    queues: Vec<TapQueue>,
    created: bool,
}

impl MultiQueueTap {
    /// Opens `/dev/net/tun` once per queue and binds each to the tap with TUNSETIFF, creating the
    /// tap unless an interface of that name exists, in which case it must be a multiqueue tap
    /// (joining keeps its flags; every queue is checked). Then applies owner, group, persist.
    /// Needs CAP_NET_ADMIN, or ownership of an existing tap.
    ///
    /// Note: the kernel lets any process that can open /dev/net/tun attach queues to a tap with
    /// neither owner nor group set; set one to keep others out.
    pub fn create(cfg: &TapConfig) -> Result<Self, Error> {
        if cfg.queues == 0 || cfg.queues > MAX_QUEUES {
            return Err(Error::QueueCount {
                count: usize::from(cfg.queues),
                max: MAX_QUEUES,
            });
        }
        let requested = cfg.name.clone().unwrap_or_default();
        if !requested.is_empty() {
            iface::validate_name(&requested)?;
        }
        let existed = !requested.is_empty()
            && !requested.contains('%')
            && sys::if_nametoindex(&requested).is_some();
        let mut name = requested;
        let mut queues = Vec::with_capacity(usize::from(cfg.queues));
        for queue in 0..cfg.queues {
            let tun = open_tun()?;
            let tap_queue = TapQueue::bind(tun, &name, queue)?;
            // The first bind fixed the name (kernel-chosen or template): later queues join it.
            name = tap_queue.if_name().to_owned();
            queues.push(tap_queue);
        }
        let tap = MultiQueueTap {
            name,
            queues,
            created: !existed,
        };
        if let Some(uid) = cfg.owner {
            tap.set_owner(uid)?;
        }
        if let Some(gid) = cfg.group {
            tap.set_group(gid)?;
        }
        if cfg.persist {
            tap.set_persist(true)?;
        }
        log::debug!(
            "{} multiqueue tap {} with {} queues",
            if tap.created { "created" } else { "joined" },
            tap.name,
            tap.queues.len()
        );
        Ok(tap)
    }

    /// The interface name (the kernel's choice if none was given).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether `create` made a new device (false: it joined an existing multiqueue tap).
    pub fn created(&self) -> bool {
        self.created
    }

    pub fn queues(&self) -> &[TapQueue] {
        &self.queues
    }

    pub fn into_queues(self) -> Vec<TapQueue> {
        self.queues
    }

    /// TUNSETOWNER: only `uid` (or CAP_NET_ADMIN) may attach further queues with TUNSETIFF.
    pub fn set_owner(&self, uid: u32) -> Result<(), Error> {
        self.set(TunValue::Owner, libc::c_ulong::from(uid))
            .map_err(|source| Error::SetOwner {
                name: self.name.clone(),
                uid,
                source,
            })
    }

    /// TUNSETGROUP: only members of `gid` (or CAP_NET_ADMIN) may attach further queues.
    pub fn set_group(&self, gid: u32) -> Result<(), Error> {
        self.set(TunValue::Group, libc::c_ulong::from(gid))
            .map_err(|source| Error::SetGroup {
                name: self.name.clone(),
                gid,
                source,
            })
    }

    /// TUNSETPERSIST: whether the device outlives its last queue fd.
    pub fn set_persist(&self, persist: bool) -> Result<(), Error> {
        self.set(TunValue::Persist, libc::c_ulong::from(persist))
            .map_err(|source| Error::SetPersist {
                name: self.name.clone(),
                persist,
                source,
            })
    }

    fn set(&self, which: TunValue, value: libc::c_ulong) -> std::io::Result<()> {
        // `create` guarantees at least one queue; these are per-device settings.
        match self.queues.first() {
            Some(queue) => sys::tun_set_value(queue.raw(), which, value),
            None => Err(std::io::Error::from_raw_os_error(libc::EBADFD)),
        }
    }
}

fn open_tun() -> Result<OwnedFd, Error> {
    File::options()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(TUN_PATH)
        .map(OwnedFd::from)
        .map_err(|source| Error::OpenTun {
            path: TUN_PATH,
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_is_checked_before_touching_the_kernel() {
        let cfg = TapConfig {
            name: Some("tap0".into()),
            queues: 0,
            ..TapConfig::default()
        };
        assert!(matches!(
            MultiQueueTap::create(&cfg),
            Err(Error::QueueCount { count: 0, .. })
        ));
        let cfg = TapConfig {
            queues: MAX_QUEUES + 1,
            ..cfg
        };
        assert!(matches!(
            MultiQueueTap::create(&cfg),
            Err(Error::QueueCount { count: 257, .. })
        ));
        let cfg = TapConfig {
            name: Some("way-too-long-name".into()),
            queues: 1,
            ..TapConfig::default()
        };
        let err = MultiQueueTap::create(&cfg).unwrap_err();
        assert!(matches!(err, Error::InvalidName { .. }), "{err:?}");
        assert!(err.to_string().contains("way-too-long-name"), "{err}");
    }
}
