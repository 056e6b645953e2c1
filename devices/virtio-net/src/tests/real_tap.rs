// SPDX-License-Identifier: Apache-2.0
//! The device over a real 4-queue tap (`impl Backend for tap::TapQueue`), in a private
//! network namespace. Needs root and /dev/net/tun; skips otherwise.

use std::os::fd::{FromRawFd, OwnedFd};

use super::device::{f_mq, rig_over, QSIZE, RX_BUF};
use super::*;
use crate::ctrl::ACK_OK;
use crate::NetConfig;

/// Why this machine cannot run the test, if it cannot.
pub(super) fn skip_reason() -> Option<&'static str> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root (tap creation and a private netns)");
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        return Some("/dev/net/tun is missing");
    }
    None
}

/// Runs `f` on a thread moved into a new network namespace (the host's stays untouched).
/// Returns false if the namespace cannot be created.
pub(super) fn in_private_netns(f: impl FnOnce() + Send + 'static) -> bool {
    let handle = std::thread::spawn(move || {
        // SAFETY: unshare only changes this thread's namespace membership.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            return false;
        }
        // No IPv6 in the namespace: a tap coming up would otherwise send its own router
        // solicitations and MLD reports, which the test would take for the frames it provokes.
        // (/proc/sys/net is the opening thread's namespace; the files are absent without IPv6.)
        for knob in ["all", "default"] {
            let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{knob}/disable_ipv6"), "1");
        }
        f();
        true
    });
    match handle.join() {
        Ok(ran) => ran,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    ifr
}

fn sockaddr_in(addr: [u8; 4]) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(addr),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size; the kernel reads it as sockaddr_in.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

/// Gives `name` the address 10.201.0.1/24 and brings it up (this thread's netns).
pub(super) fn configure(name: &str) {
    // SAFETY: plain socket creation.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
    assert!(fd >= 0);
    // SAFETY: fd was just created and is owned by nobody else.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let ioctl = |req: libc::c_ulong, ifr: &mut libc::ifreq| {
        // SAFETY: `ifr` is a valid ifreq for these SIOCSIF* requests.
        let rc = unsafe { libc::ioctl(sock.as_raw_fd(), req as _, ifr as *mut libc::ifreq) };
        assert_eq!(rc, 0, "ioctl {req:#x}: {}", io::Error::last_os_error());
    };
    let mut ifr = ifreq(name);
    ifr.ifr_ifru.ifru_addr = sockaddr_in([10, 201, 0, 1]);
    ioctl(libc::SIOCSIFADDR, &mut ifr);
    let mut ifr = ifreq(name);
    ifr.ifr_ifru.ifru_netmask = sockaddr_in([255, 255, 255, 0]);
    ioctl(libc::SIOCSIFNETMASK, &mut ifr);
    let mut ifr = ifreq(name);
    ifr.ifr_ifru.ifru_flags = (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    ioctl(libc::SIOCSIFFLAGS, &mut ifr);
}

/// Frames the kernel received from the tap (what the guest transmitted).
pub(super) fn kernel_rx_packets(name: &str) -> u64 {
    let dev = std::fs::read_to_string("/proc/thread-self/net/dev").unwrap();
    let line = dev
        .lines()
        .find(|l| l.trim_start().starts_with(&format!("{name}:")))
        .unwrap();
    let fields: Vec<&str> = line.split(':').nth(1).unwrap().split_whitespace().collect();
    fields[1].parse().unwrap()
}

/// Makes the kernel transmit on the tap: a UDP datagram to an unresolved neighbour triggers
/// an ARP request out of the tap.
fn provoke_arp() {
    // SAFETY: plain socket creation.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
    assert!(fd >= 0);
    // SAFETY: fd was just created and is owned by nobody else.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut dst = sockaddr_in([10, 201, 0, 2]);
    // SAFETY: sockaddr_in layout: the port follows the family.
    unsafe {
        let sin = &mut dst as *mut libc::sockaddr as *mut libc::sockaddr_in;
        (*sin).sin_port = 9u16.to_be();
    }
    // SAFETY: the buffer and address are valid for the call.
    let rc = unsafe {
        libc::sendto(
            sock.as_raw_fd(),
            b"x".as_ptr().cast(),
            1,
            0,
            &dst,
            std::mem::size_of::<libc::sockaddr_in>() as u32,
        )
    };
    assert_eq!(rc, 1, "sendto: {}", io::Error::last_os_error());
}

#[test]
fn vq_pairs_set_switches_real_tap_queues() {
    if let Some(why) = skip_reason() {
        eprintln!("skip: {why}");
        return;
    }
    let ran = in_private_netns(|| {
        let tap = tap::MultiQueueTap::create(&tap::TapConfig {
            name: Some("vnt%d".into()),
            queues: 4,
            ..Default::default()
        })
        .unwrap();
        let name = tap.name().to_owned();
        configure(&name);
        let mem = guest_memory();
        let cfg = NetConfig {
            queue_size: QSIZE,
            ..Default::default()
        };
        let mut rig = rig_over(&mem, tap.into_queues(), cfg, f_mq(), |_| true).unwrap();
        assert_eq!(rig.attached(), [true, false, false, false]);
        assert_eq!(rig.net.backends()[0].vnet_hdr_size().unwrap(), 12);

        for n in [4u16, 1, 3, 2, 4, 1, 3] {
            assert_eq!(rig.set_pairs(n), ACK_OK, "n = {n}");
            let expected: Vec<bool> = (0..4).map(|p| p < usize::from(n)).collect();
            assert_eq!(rig.attached(), expected, "n = {n}");
            let parked: Vec<bool> = expected.iter().map(|a| !a).collect();
            assert_eq!(rig.parked(), parked, "n = {n}");
        }

        // Guest -> host: a broadcast frame with the vnet header reaches the kernel.
        let before = kernel_rx_packets(&name);
        let mut eth = vec![0xff; 6];
        eth.extend_from_slice(&NetConfig::DEFAULT_MAC);
        eth.extend_from_slice(&[0x88, 0xb5]);
        eth.extend_from_slice(&payload(100, 1));
        rig.transmit(0, &frame(&eth));
        assert!(
            wait_for(|| kernel_rx_packets(&name) > before),
            "tap counted the frame"
        );

        // Host -> guest: the kernel's ARP request arrives on one of the 3 enabled pairs.
        for p in 0..4 {
            rig.fill_rx(p);
            rig.kick(2 * p);
        }
        provoke_arp();
        let arrived = wait_for(|| (0..3).any(|p| rig.q[2 * p].used_idx() > 0));
        assert!(arrived, "ARP request received");
        let p = (0..3).find(|&p| rig.q[2 * p].used_idx() > 0).unwrap();
        let base = RX_BUF + p as u64 * 0x10000;
        let eth_type = read_guest(&mem, base + 12 + 12, 2);
        assert_eq!(eth_type, [0x08, 0x06], "an ARP frame on pair {p}");
        assert_eq!(rig.q[6].used_idx(), 0, "nothing on the disabled pair");
        let m = rig.net.metrics();
        assert_eq!(get(&m.pairs[3].rx.packets), 0);
        for pair in &m.pairs {
            assert_eq!(get(&pair.rx.bad_chains) + get(&pair.tx.bad_chains), 0);
        }
    });
    if !ran {
        eprintln!("skip: cannot create a network namespace");
    }
}

/// (major, minor) of the running kernel.
fn kernel_version() -> (u32, u32) {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let mut parts = release.trim().split(['.', '-']);
    let mut next = || parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    (next(), next())
}

#[test]
fn uso_and_the_tap_mtu_are_learned_from_the_real_tap() {
    if let Some(why) = skip_reason() {
        eprintln!("skip: {why}");
        return;
    }
    let ran = in_private_netns(|| {
        let tap = tap::MultiQueueTap::create(&tap::TapConfig {
            name: Some("vnu%d".into()),
            queues: 2,
            ..Default::default()
        })
        .unwrap();
        let name = tap.name().to_owned();
        std::process::Command::new("ip")
            .args(["link", "set", &name, "mtu", "9000"])
            .status()
            .unwrap();
        let net = crate::Net::new(NetConfig::default(), tap.into_queues()).unwrap();
        let offered = net.avail_features();
        // Linux takes and hands over UDP_L4 GSO frames on a tap from 6.2 on.
        let uso = kernel_version() >= (6, 2);
        let f = crate::features::bit(virtio_bindings::virtio_net::VIRTIO_NET_F_HOST_USO);
        assert_eq!(
            offered & f != 0,
            uso,
            "HOST_USO offered on {:?}",
            kernel_version()
        );
        let mut mtu = [0u8; 2];
        net.read_config(10, &mut mtu);
        assert_eq!(u16::from_le_bytes(mtu), 9000, "the tap's MTU is advertised");
    });
    if !ran {
        eprintln!("skip: cannot create a network namespace");
    }
}
