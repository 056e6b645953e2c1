// SPDX-License-Identifier: Apache-2.0
//! Device options and the device-specific configuration space (`struct virtio_net_config`).

use virtio_bindings::virtio_net::VIRTIO_NET_S_LINK_UP;

/// Default queue size of every virtqueue.
pub const DEFAULT_QUEUE_SIZE: u16 = 256;
/// Largest number of queue pairs a device accepts (one worker thread each).
pub const MAX_QUEUE_PAIRS: usize = 64;
/// Largest queue size virtio-queue supports.
pub const MAX_QUEUE_SIZE: u16 = 32768;
/// Smallest MTU the device reports (IPv4 minimum).
pub const MIN_MTU: u16 = 68;

/// Options of one virtio-net device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// MAC address in the config space (unicast, not all-zero).
    pub mac: [u8; 6],
    /// MTU advertised with VIRTIO_NET_F_MTU; `None` offers no MTU.
    pub mtu: Option<u16>,
    /// Offer VIRTIO_NET_F_MQ and VIRTIO_NET_F_CTRL_VQ (and the control features that need
    /// the control queue). With `false` the guest runs on pair 0 only.
    pub mq: bool,
    /// Maximum size of every virtqueue (power of two).
    pub queue_size: u16,
    /// Link speed in Mbit/s shown to the guest (VIRTIO_NET_F_SPEED_DUPLEX; `ethtool eth0`).
    /// A tap has no speed of its own, so this is what the operator says it is.
    pub speed_mbps: u32,
    /// Duplex shown to the guest.
    pub duplex: Duplex,
}

/// Duplex of the link shown to the guest (`struct virtio_net_config.duplex`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Duplex {
    /// DUPLEX_HALF.
    Half,
    /// DUPLEX_FULL.
    Full,
}

impl Duplex {
    /// The value in the config space (Linux's DUPLEX_HALF = 0, DUPLEX_FULL = 1).
    pub fn config_value(self) -> u8 {
        match self {
            Duplex::Half => 0,
            Duplex::Full => 1,
        }
    }
}

impl std::str::FromStr for Duplex {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "full" => Ok(Duplex::Full),
            "half" => Ok(Duplex::Half),
            _ => Err(format!("duplex {s:?} is neither full nor half")),
        }
    }
}

/// Link speed shown when none is configured: 10 Gbit/s, full duplex.
pub const DEFAULT_SPEED_MBPS: u32 = 10_000;
/// Largest speed Linux's ethtool accepts from a driver (INT_MAX Mbit/s).
pub const MAX_SPEED_MBPS: u32 = i32::MAX as u32;

impl NetConfig {
    /// A stable, locally administered unicast MAC (02:6d:71:76:6d:00, "mqvm").
    pub const DEFAULT_MAC: [u8; 6] = [0x02, 0x6d, 0x71, 0x76, 0x6d, 0x00];
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig {
            mac: Self::DEFAULT_MAC,
            mtu: None,
            mq: true,
            queue_size: DEFAULT_QUEUE_SIZE,
            speed_mbps: DEFAULT_SPEED_MBPS,
            duplex: Duplex::Full,
        }
    }
}

/// Why a [`NetConfig`] or backend count was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// No backend, or more than the device supports.
    #[error("{count} queue pairs requested; between 1 and {MAX_QUEUE_PAIRS} are supported")]
    QueuePairCount {
        /// The number of backends given.
        count: usize,
    },
    /// The queue size is zero, not a power of two, or too large.
    #[error("queue size {size} is not a power of two between 2 and {MAX_QUEUE_SIZE}")]
    QueueSize {
        /// The size given.
        size: u16,
    },
    /// The MAC is a multicast or all-zero address.
    #[error("MAC {} is not a unicast address", tap::MacAddr::from(*.mac))]
    Mac {
        /// The address given.
        mac: [u8; 6],
    },
    /// The MTU is below the IPv4 minimum.
    #[error("MTU {mtu} is below {MIN_MTU}")]
    Mtu {
        /// The MTU given.
        mtu: u16,
    },
    /// The speed is zero or above what Linux accepts.
    #[error("speed {speed} Mbit/s is not between 1 and {MAX_SPEED_MBPS}")]
    Speed {
        /// The speed given.
        speed: u32,
    },
}

impl NetConfig {
    /// Checks the options for a device with `pairs` queue pairs.
    pub fn validate(&self, pairs: usize) -> Result<(), ConfigError> {
        if pairs == 0 || pairs > MAX_QUEUE_PAIRS {
            return Err(ConfigError::QueuePairCount { count: pairs });
        }
        if self.queue_size < 2
            || self.queue_size > MAX_QUEUE_SIZE
            || !self.queue_size.is_power_of_two()
        {
            return Err(ConfigError::QueueSize {
                size: self.queue_size,
            });
        }
        if self.mac[0] & 1 != 0 || self.mac == [0; 6] {
            return Err(ConfigError::Mac { mac: self.mac });
        }
        if let Some(mtu) = self.mtu {
            if mtu < MIN_MTU {
                return Err(ConfigError::Mtu { mtu });
            }
        }
        if self.speed_mbps == 0 || self.speed_mbps > MAX_SPEED_MBPS {
            return Err(ConfigError::Speed {
                speed: self.speed_mbps,
            });
        }
        Ok(())
    }
}

/// Size of the config space we expose: mac, status, max_virtqueue_pairs, mtu, speed,
/// duplex, rss_max_key_size, rss_max_indirection_table_length, supported_hash_types.
pub const CONFIG_SPACE_LEN: usize = 24;

/// The live config space. Fields are little endian (virtio 1.x).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigSpace {
    /// Current MAC (CTRL_MAC_ADDR_SET may change it).
    pub mac: [u8; 6],
    /// VIRTIO_NET_S_* bits.
    pub status: u16,
    /// Number of queue pairs the device has.
    pub max_virtqueue_pairs: u16,
    /// Advertised MTU (0 when not offered).
    pub mtu: u16,
    /// Link speed in Mbit/s.
    pub speed: u32,
    /// Link duplex.
    pub duplex: Duplex,
    /// RSS limits (key size, table length, hash types); zero when RSS is not offered.
    pub rss: (u8, u16, u32),
}

impl ConfigSpace {
    /// The config space of a freshly reset device.
    pub fn new(mac: [u8; 6], max_virtqueue_pairs: u16, mtu: Option<u16>, link_up: bool) -> Self {
        ConfigSpace {
            mac,
            status: if link_up {
                VIRTIO_NET_S_LINK_UP as u16
            } else {
                0
            },
            max_virtqueue_pairs,
            mtu: mtu.unwrap_or(0),
            speed: DEFAULT_SPEED_MBPS,
            duplex: Duplex::Full,
            rss: (0, 0, 0),
        }
    }

    /// The same with the RSS fields filled in, for a device that offers VIRTIO_NET_F_RSS.
    pub fn with_rss(mut self, offered: bool) -> Self {
        use crate::steer::{RSS_MAX_KEY_SIZE, RSS_MAX_TABLE_LEN, SUPPORTED_HASH_TYPES};
        self.rss = if offered {
            (RSS_MAX_KEY_SIZE, RSS_MAX_TABLE_LEN, SUPPORTED_HASH_TYPES)
        } else {
            (0, 0, 0)
        };
        self
    }

    /// The same with the link speed and duplex of `cfg`.
    pub fn with_link(mut self, speed: u32, duplex: Duplex) -> Self {
        self.speed = speed;
        self.duplex = duplex;
        self
    }

    /// The config space as the driver sees it.
    pub fn bytes(&self) -> [u8; CONFIG_SPACE_LEN] {
        let mut b = [0u8; CONFIG_SPACE_LEN];
        b[0..6].copy_from_slice(&self.mac);
        b[6..8].copy_from_slice(&self.status.to_le_bytes());
        b[8..10].copy_from_slice(&self.max_virtqueue_pairs.to_le_bytes());
        b[10..12].copy_from_slice(&self.mtu.to_le_bytes());
        b[12..16].copy_from_slice(&self.speed.to_le_bytes());
        b[16] = self.duplex.config_value();
        b[17] = self.rss.0;
        b[18..20].copy_from_slice(&self.rss.1.to_le_bytes());
        b[20..24].copy_from_slice(&self.rss.2.to_le_bytes());
        b
    }

    /// Copies `data.len()` bytes starting at `offset`; bytes beyond the config space read
    /// as zero. Never panics, whatever `offset` and `data.len()` are.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let bytes = self.bytes();
        let Ok(start) = usize::try_from(offset) else {
            return;
        };
        if start >= bytes.len() {
            return;
        }
        let n = data.len().min(bytes.len() - start);
        data[..n].copy_from_slice(&bytes[start..start + n]);
    }

    /// Sets or clears VIRTIO_NET_S_LINK_UP; returns whether the status changed.
    pub fn set_link_up(&mut self, up: bool) -> bool {
        let old = self.status;
        if up {
            self.status |= VIRTIO_NET_S_LINK_UP as u16;
        } else {
            self.status &= !(VIRTIO_NET_S_LINK_UP as u16);
        }
        old != self.status
    }
}
