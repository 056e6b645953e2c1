//! Component tests of the tap crate against the real kernel: multiqueue taps in a network
//! namespace each test creates for itself, an unprivileged child (uid/gid 65534, no
//! capabilities) switching queues through its fds alone, frames from the host side.
//! Need root and /dev/net/tun; skip with one line otherwise.

use std::os::unix::io::{AsFd, AsRawFd, IntoRawFd, OwnedFd, RawFd};
use std::process::Command;
use std::time::{Duration, Instant};

use mqvmm_tests::netns::{self, FdCheck, NOBODY};
use tap::{MultiQueueTap, TapConfig};

const FDCHECK: &str = env!("CARGO_BIN_EXE_tap-fdcheck");

/// Asserts the kernel's own view of `tap`: `attached` queues in sysfs (tx-* and rx-*) and in
/// netlink, and `disabled` detached ones in netlink.
fn expect_queues(tap: &str, attached: u32, disabled: u32, step: &str) {
    let tx = netns::tx_queue_count(tap).unwrap();
    let rx = netns::rx_queue_count(tap).unwrap();
    let info = netns::tun_info(tap).unwrap();
    // A net device always has at least one tx/rx queue in sysfs, even with no queue attached.
    let sysfs = attached.max(1) as usize;
    assert_eq!(
        (tx, rx, info.num_queues, info.num_disabled),
        (sysfs, sysfs, attached, disabled),
        "after {step}: (tx-*, rx-*, IFLA_TUN_NUM_QUEUES, IFLA_TUN_NUM_DISABLED_QUEUES)"
    );
}

/// Creates a 4-queue tap owned by root and hands its queue fds (as 100-103) and one spare,
/// unbound /dev/net/tun fd (as 110) to tap-fdcheck, which drops to 65534:65534 with no
/// capabilities before touching them. This process keeps none of the fds.
fn unprivileged_child(tap: &str) -> FdCheck {
    let mq = netns::root_owned_tap(tap, 4);
    let spare = netns::open_unbound_tun().unwrap();
    let mut map: Vec<(RawFd, RawFd)> = mq
        .queues()
        .iter()
        .zip(100..)
        .map(|(q, target)| (q.as_raw_fd(), target))
        .collect();
    map.push((spare.as_raw_fd(), 110));
    let mut cmd = Command::new(FDCHECK);
    netns::pass_fds(&mut cmd, &map, &[]);
    cmd.args([
        "--drop-to",
        &format!("{NOBODY}:{NOBODY}"),
        "--tun-fd",
        "110",
        "--net",
        "fds=100,101,102,103",
    ]);
    let child = FdCheck::spawn(cmd);
    drop((mq, spare));

    // The kernel's account of the child, not the child's own.
    let status = netns::proc_status(child.pid()).unwrap();
    assert_eq!(netns::single_id(&status, "Uid"), NOBODY);
    assert_eq!(netns::single_id(&status, "Gid"), NOBODY);
    assert_eq!(status["Groups"], "", "supplementary groups remain");
    for key in ["CapEff", "CapPrm", "CapInh", "CapAmb", "CapBnd"] {
        assert_eq!(netns::cap_mask(&status, key), 0, "{key} of the child");
    }
    assert_eq!(child.ready["tap"], tap);
    assert_eq!(child.ready["queues"], "4");
    child
}

#[test]
fn unprivileged_child_detaches_and_reattaches_queues() {
    if !netns::require_netns() {
        return;
    }
    netns::run_in_netns("unprivileged_child_detaches_and_reattaches_queues", || {
        let tap = "mqdet0";
        let mut child = unprivileged_child(tap);
        expect_queues(tap, 4, 0, "creation");
        for (queue, left) in [(3, 3), (2, 2), (1, 1)] {
            assert_eq!(
                child.cmd(&format!("detach {queue}")),
                "ok",
                "detach {queue}"
            );
            expect_queues(tap, left, 4 - left, &format!("detach {queue}"));
        }
        assert_eq!(child.cmd("state"), "attached=1,0,0,0");
        for (queue, attached) in [(1, 2), (2, 3), (3, 4)] {
            assert_eq!(
                child.cmd(&format!("attach {queue}")),
                "ok",
                "attach {queue}"
            );
            expect_queues(tap, attached, 4 - attached, &format!("attach {queue}"));
        }
        assert_eq!(child.cmd("state"), "attached=1,1,1,1");
        // Order does not matter: detach the first queue, re-attach it.
        assert_eq!(child.cmd("detach 0"), "ok");
        expect_queues(tap, 3, 1, "detach 0");
        assert_eq!(child.cmd("state"), "attached=0,1,1,1");
        assert_eq!(child.cmd("attach 0"), "ok");
        expect_queues(tap, 4, 0, "attach 0");
        child.quit();
        // The child held the only fds of a non-persistent tap: it is gone.
        assert!(netns::if_index(tap).is_err(), "tap {tap} outlived its fds");
    });
}

#[test]
fn unprivileged_child_gets_eperm_from_tunsetiff_and_einval_from_double_attach() {
    if !netns::require_netns() {
        return;
    }
    netns::run_in_netns(
        "unprivileged_child_gets_eperm_from_tunsetiff_and_einval_from_double_attach",
        || {
            let tap = "mqperm0";
            let mut child = unprivileged_child(tap);
            // Creating a tap needs CAP_NET_ADMIN.
            let reply = child.cmd("bind-new mqnew0");
            assert!(reply.starts_with("err SetIff errno=1 "), "{reply}");
            assert!(reply.contains("TUNSETIFF for tap mqnew0"), "{reply}");
            assert!(netns::if_index("mqnew0").is_err(), "mqnew0 was created");
            // Joining the tap (owned by root) needs CAP_NET_ADMIN too.
            let reply = child.cmd(&format!("bind-join {tap}"));
            assert!(reply.starts_with("err SetIff errno=1 "), "{reply}");
            expect_queues(tap, 4, 0, "the refused join");
            // Attaching an attached queue, detaching a detached one: EINVAL, typed.
            let reply = child.cmd("attach 2");
            assert!(reply.starts_with("err Attach errno=22 "), "{reply}");
            assert!(reply.contains(&format!("tap {tap} queue 2")), "{reply}");
            // The refused attach left the queue usable (EAGAIN: attached, nothing pending).
            assert!(child.cmd("read 2").starts_with("err io errno=11 "));
            assert_eq!(child.cmd("detach 2"), "ok");
            let reply = child.cmd("detach 2");
            assert!(reply.starts_with("err Detach errno=22 "), "{reply}");
            // ... and the refused detach left it refusing I/O (EBADFD).
            assert!(child.cmd("read 2").starts_with("err io errno=77 "));
            expect_queues(tap, 3, 1, "the refused second detach");
            // And the refusals changed nothing: the queue still comes back.
            assert_eq!(child.cmd("attach 2"), "ok");
            expect_queues(tap, 4, 0, "re-attach");
            child.quit();
        },
    );
}

/// Reads whatever is pending on `queue` into `got` (frame payload after the vnet header).
fn drain(queue: &tap::TapQueue, hdr_len: usize, got: &mut Vec<(u16, Vec<u8>)>) {
    let mut buf = vec![0u8; 65_562];
    loop {
        match queue.read(&mut buf) {
            Ok(n) => {
                assert!(n >= hdr_len + 14, "short frame of {n} bytes");
                got.push((queue.queue(), buf[..n].to_vec()));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
            Err(e) => panic!("read from queue {}: {e}", queue.queue()),
        }
    }
}

#[test]
fn frames_from_the_host_reach_attached_queues_only() {
    if !netns::require_netns() {
        return;
    }
    netns::run_in_netns("frames_from_the_host_reach_attached_queues_only", || {
        let tap = "mqrx0";
        let mq = netns::root_owned_tap(tap, 4);
        let queues = mq.queues();
        // A 12-byte header (with num_buffers), set on one queue, applies to the whole device.
        queues[0].set_vnet_hdr_size(12).unwrap();
        assert_eq!(queues[3].vnet_hdr_size().unwrap(), 12);
        netns::set_link_up(tap).unwrap();
        queues[1].detach().unwrap();
        queues[3].detach().unwrap();
        expect_queues(tap, 2, 2, "detaching queues 1 and 3");

        let sock = netns::PacketSocket::bind(tap).unwrap();
        const FRAMES: u16 = 64;
        let mut sent = Vec::new();
        for i in 0..FRAMES {
            let frame =
                netns::udp_broadcast_frame(40_000 + i, format!("mqvmm frame {i}").as_bytes());
            sock.send(&frame).unwrap();
            sent.push(frame);
        }

        let mut pollfds: Vec<libc::pollfd> = queues
            .iter()
            .map(|q| libc::pollfd {
                fd: q.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            let ours = got
                .iter()
                .filter(|(_, f): &&(u16, Vec<u8>)| sent.iter().any(|s| f[12..] == s[..]))
                .count();
            if ours == usize::from(FRAMES) {
                break;
            }
            // SAFETY: `pollfds` is a valid array of that many pollfds for the call.
            let n = unsafe { libc::poll(pollfds.as_mut_ptr(), pollfds.len() as libc::nfds_t, 100) };
            assert!(n >= 0, "poll: {}", std::io::Error::last_os_error());
            for (pfd, queue) in pollfds.iter().zip(queues) {
                if queue.queue() == 1 || queue.queue() == 3 {
                    assert_eq!(
                        pfd.revents & libc::POLLIN,
                        0,
                        "detached queue {} polled readable",
                        queue.queue()
                    );
                } else if pfd.revents & libc::POLLIN != 0 {
                    drain(queue, 12, &mut got);
                }
            }
        }
        // Detached queues: nothing pending, and this crate refuses to read them.
        for q in [&queues[1], &queues[3]] {
            let err = q.read(&mut [0u8; 2048]).unwrap_err();
            assert_eq!(
                err.raw_os_error(),
                Some(libc::EBADFD),
                "read on detached queue {}",
                q.queue()
            );
        }

        let mut per_queue = [0usize; 4];
        let mut seen = vec![false; sent.len()];
        for (queue, frame) in &got {
            // The kernel fills the 10-byte virtio_net_hdr: no checksum offload, no GSO for a
            // frame from a raw socket.
            assert_eq!(&frame[..10], &[0u8; 10], "vnet header on queue {queue}");
            let Some(i) = sent.iter().position(|s| frame[12..] == s[..]) else {
                continue; // the kernel's own traffic on a link that just came up (IPv6 DAD, MLD)
            };
            assert!(!seen[i], "frame {i} delivered twice");
            seen[i] = true;
            per_queue[usize::from(*queue)] += 1;
        }
        assert!(
            seen.iter().all(|&s| s),
            "frames lost: {per_queue:?} of {FRAMES}"
        );
        assert_eq!((per_queue[1], per_queue[3]), (0, 0), "{per_queue:?}");
        // 64 distinct flows hash onto both attached queues (all on one: probability 2^-63).
        assert!(per_queue[0] > 0 && per_queue[2] > 0, "{per_queue:?}");
        eprintln!("frames per queue (1 and 3 detached): {per_queue:?}");
    });
}

#[test]
fn detaching_purges_pending_frames_and_refuses_io() {
    if !netns::require_netns() {
        return;
    }
    netns::run_in_netns("detaching_purges_pending_frames_and_refuses_io", || {
        let tap = "mqpurge0";
        let mq = netns::root_owned_tap(tap, 1);
        let queue = &mq.queues()[0];
        netns::set_link_up(tap).unwrap();
        let sock = netns::PacketSocket::bind(tap).unwrap();
        for i in 0..8 {
            sock.send(&netns::udp_broadcast_frame(50_000 + i, b"pending"))
                .unwrap();
        }
        // Wait until the frames are queued, then detach without reading them.
        let mut pfd = libc::pollfd {
            fd: queue.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the call.
        let ready = unsafe { libc::poll(&mut pfd, 1, 2000) };
        assert_eq!(ready, 1, "nothing arrived");
        queue.detach().unwrap();
        assert!(!queue.is_attached().unwrap());
        expect_queues(tap, 0, 1, "detaching the only queue");

        // The kernel would take this frame from a detached queue and hand it to the host;
        // TapQueue refuses instead.
        let rx_before = netns::link_stat(tap, "rx_packets").unwrap();
        let frame = [vec![0u8; 10], netns::udp_broadcast_frame(1, b"leak")].concat();
        assert_eq!(
            queue.write(&frame).unwrap_err().raw_os_error(),
            Some(libc::EBADFD)
        );
        assert_eq!(
            queue.read(&mut [0u8; 2048]).unwrap_err().raw_os_error(),
            Some(libc::EBADFD)
        );
        assert_eq!(netns::link_stat(tap, "rx_packets").unwrap(), rx_before);

        queue.attach().unwrap();
        assert!(queue.is_attached().unwrap());
        let mut buf = [0u8; 2048];
        let err = queue.read(&mut buf).unwrap_err();
        assert_eq!(
            err.kind(),
            std::io::ErrorKind::WouldBlock,
            "pending frames survived detach: {err}"
        );
        // Attached again: frames flow both ways.
        queue.write(&frame).unwrap();
        assert_eq!(netns::link_stat(tap, "rx_packets").unwrap(), rx_before + 1);
    });
}

/// Adoption of `fds` fails with the expected variant, the message names the fd, and every open
/// fd stays open (a failed adoption takes ownership of nothing).
fn assert_refused(fds: &[RawFd], expect: &str, check: impl Fn(&tap::Error) -> bool) {
    // SAFETY: the fds stay owned by the caller's taps and files, which the contract allows only
    // because nothing is adopted: each call is refused (asserted here) before any fd is taken.
    let err = unsafe { tap::adopt_queues(fds) }.unwrap_err();
    assert!(check(&err), "{fds:?}: unexpected {err:?}");
    let msg = err.to_string();
    assert!(msg.contains(expect), "{fds:?}: {msg:?} lacks {expect:?}");
    for &fd in fds {
        // SAFETY: fcntl(F_GETFD) takes no pointer.
        let open = unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0;
        assert!(
            open || fd > 100_000,
            "fd {fd} was closed by a failed adoption"
        );
    }
}

#[test]
fn adoption_refuses_fds_mqvmm_cannot_use() {
    if !netns::require_netns() {
        return;
    }
    netns::run_in_netns("adoption_refuses_fds_mqvmm_cannot_use", || {
        use libc::{
            IFF_MULTI_QUEUE as MQ, IFF_NO_PI as NO_PI, IFF_TAP as TAP, IFF_TUN as TUN,
            IFF_VNET_HDR as VNET,
        };
        let single = netns::open_raw_tun("sq0", TAP | NO_PI | VNET).unwrap();
        let tun = netns::open_raw_tun("tun0", TUN | NO_PI | VNET | MQ).unwrap();
        let novnet = netns::open_raw_tun("novnet0", TAP | NO_PI | MQ).unwrap();
        let unbound = netns::open_unbound_tun().unwrap();
        let a = netns::root_owned_tap("mqa0", 2);
        let b = netns::root_owned_tap("mqb0", 1);
        let (a0, a1) = (a.queues()[0].as_raw_fd(), a.queues()[1].as_raw_fd());
        let b0 = b.queues()[0].as_raw_fd();

        let fd = single.as_raw_fd();
        assert_refused(
            &[a0, fd],
            &format!("fd {fd} (queue 1) belongs to tap sq0, which is single-queue"),
            |e| matches!(e, tap::Error::NotMultiQueue { queue: 1, .. }),
        );
        let fd = tun.as_raw_fd();
        assert_refused(
            &[fd],
            &format!("fd {fd} (queue 0) belongs to tun0, a layer-3 tun device"),
            |e| matches!(e, tap::Error::NotTap { .. }),
        );
        let fd = novnet.as_raw_fd();
        assert_refused(
            &[fd],
            &format!("fd {fd} (queue 0) belongs to tap novnet0, which has no virtio-net header"),
            |e| matches!(e, tap::Error::NoVnetHdr { .. }),
        );
        let fd = unbound.as_raw_fd();
        assert_refused(
            &[fd],
            &format!("fd {fd} (queue 0) is an open /dev/net/tun fd that is not attached"),
            |e| matches!(e, tap::Error::NotAttachedToDevice { .. }),
        );
        assert_refused(
            &[a0, b0],
            &format!(
                "fd {b0} (queue 1) belongs to tap mqb0, but fd {a0} (queue 0) belongs to tap mqa0"
            ),
            |e| matches!(e, tap::Error::DifferentDevice { .. }),
        );
        let dup = a.queues()[0].as_fd().try_clone_to_owned().unwrap();
        let d = dup.as_raw_fd();
        assert_refused(
            &[a0, d],
            &format!("fds {a0} (queue 0) and {d} (queue 1) are the same open file"),
            |e| matches!(e, tap::Error::SameOpenFile { .. }),
        );
        assert_refused(
            &[a0, a1, 999_999],
            "fd 999999 (queue 2) is not an open file descriptor",
            |e| matches!(e, tap::Error::FdNotOpen { .. }),
        );

        // The good case, from fds this process does not otherwise own.
        let fresh = netns::root_owned_tap("mqc0", 3).into_queues();
        let raw: Vec<RawFd> = fresh
            .into_iter()
            .map(|q| OwnedFd::from(q).into_raw_fd())
            .collect();
        // SAFETY: `raw` came from into_raw_fd just above: nothing else owns these fds.
        let adopted = unsafe { tap::adopt_queues(&raw) }.unwrap();
        assert_eq!(adopted.len(), 3);
        for (i, q) in adopted.iter().enumerate() {
            assert_eq!((q.if_name(), usize::from(q.queue())), ("mqc0", i));
            assert!(q.is_attached().unwrap());
            // SAFETY: fcntl(F_GETFL) takes no pointer.
            let fl = unsafe { libc::fcntl(q.as_raw_fd(), libc::F_GETFL) };
            assert_ne!(fl & libc::O_NONBLOCK, 0, "queue {i} is blocking");
        }
        // A passed queue that is detached is adopted as detached.
        adopted[2].detach().unwrap();
        let raw2: Vec<RawFd> = adopted
            .into_iter()
            .map(|q| OwnedFd::from(q).into_raw_fd())
            .collect();
        // SAFETY: as above, released by the queues just before.
        let again = unsafe { tap::adopt_queues(&raw2) }.unwrap();
        assert!(!again[2].is_attached().unwrap());
        assert_eq!(
            again[2].read(&mut [0u8; 64]).unwrap_err().raw_os_error(),
            Some(libc::EBADFD)
        );
    });
}

#[test]
fn create_joins_existing_taps_and_applies_settings() {
    if !netns::require_netns() {
        return;
    }
    netns::run_in_netns("create_joins_existing_taps_and_applies_settings", || {
        let cfg = TapConfig {
            name: Some("mqp0".into()),
            queues: 2,
            owner: Some(1234),
            group: Some(4321),
            persist: true,
        };
        let first = MultiQueueTap::create(&cfg).unwrap();
        assert!(first.created());
        assert_eq!(first.name(), "mqp0");
        let info = netns::tun_info("mqp0").unwrap();
        assert_eq!(
            (
                info.tun_type,
                info.pi,
                info.vnet_hdr,
                info.multi_queue,
                info.persist
            ),
            (libc::IFF_TAP as u8, false, true, true, true),
            "{info:?}"
        );
        assert_eq!(
            (info.owner, info.group, info.num_queues),
            (Some(1234), Some(4321), 2)
        );
        drop(first);
        // Persistent: the device outlives its fds.
        assert_eq!(netns::tun_info("mqp0").unwrap().num_queues, 0);

        // Joining the existing tap with more queues.
        let joined = MultiQueueTap::create(&TapConfig {
            name: Some("mqp0".into()),
            queues: 3,
            ..TapConfig::default()
        })
        .unwrap();
        assert!(!joined.created());
        expect_queues("mqp0", 3, 0, "joining");

        // Interface queries by name.
        let q = &joined.queues()[1];
        assert_eq!(q.mtu().unwrap(), 1500);
        assert_eq!(
            q.link_state().unwrap(),
            tap::LinkState {
                up: false,
                running: false
            }
        );
        netns::set_link_up("mqp0").unwrap();
        assert_eq!(
            q.link_state().unwrap(),
            tap::LinkState {
                up: true,
                running: true
            }
        );

        // Offloads and header size are per device; the kernel validates them.
        let all = tap::TUN_F_CSUM
            | tap::TUN_F_TSO4
            | tap::TUN_F_TSO6
            | tap::TUN_F_TSO_ECN
            | tap::TUN_F_UFO;
        q.set_offload(all).unwrap();
        q.set_offload(0).unwrap();
        let err = q.set_offload(tap::TUN_F_TSO4 | 0x8000).unwrap_err();
        assert!(
            matches!(err, tap::Error::SetOffload { queue: 1, .. }),
            "{err:?}"
        );
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL));
        assert_eq!(q.vnet_hdr_size().unwrap(), 10);
        joined.queues()[2].set_vnet_hdr_size(12).unwrap();
        assert_eq!(joined.queues()[0].vnet_hdr_size().unwrap(), 12);
        let err = q.set_vnet_hdr_size(8).unwrap_err();
        assert!(
            matches!(err, tap::Error::SetVnetHdrSize { size: 8, .. }),
            "{err:?}"
        );
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL));
        joined.set_persist(false).unwrap();
        drop(joined);
        assert!(
            netns::if_index("mqp0").is_err(),
            "non-persistent tap outlived its fds"
        );

        // Kernel-chosen name.
        let auto = MultiQueueTap::create(&TapConfig {
            queues: 2,
            ..TapConfig::default()
        })
        .unwrap();
        assert!(auto.name().starts_with("tap"), "{}", auto.name());
        expect_queues(
            auto.name(),
            2,
            0,
            "creating a tap with a kernel-chosen name",
        );
        drop(auto);

        // A name taken by something that is not a multiqueue tap.
        let _single =
            netns::open_raw_tun("sq1", libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR)
                .unwrap();
        for taken in ["sq1", "lo"] {
            let err = MultiQueueTap::create(&TapConfig {
                name: Some(taken.into()),
                queues: 2,
                ..TapConfig::default()
            })
            .unwrap_err();
            assert!(
                matches!(err, tap::Error::ExistsNotMultiQueueTap { .. }),
                "{taken}: {err:?}"
            );
            assert_eq!(
                err.to_string(),
                format!("interface {taken} exists but is not a multiqueue tap")
            );
        }
    });
}

/// An observer's query (what mqvmm's API thread asks for `queues`) reports the kernel's
/// state and leaves the queue's I/O gate alone; `is_attached` resynchronises it. Shown with a
/// second holder of the same open file that detaches the queue behind the first one's back.
#[test]
fn kernel_attached_reports_the_kernel_state_without_moving_the_io_gate() {
    if !netns::require_netns() {
        return;
    }
    netns::run_in_netns(
        "kernel_attached_reports_the_kernel_state_without_moving_the_io_gate",
        || {
            let tap = "mqobs0";
            let mq = netns::root_owned_tap(tap, 2);
            let queue = &mq.queues()[1];
            let dup = queue.as_fd().try_clone_to_owned().unwrap();
            // SAFETY: `dup` was just created and is handed over; nothing else owns it.
            let other = unsafe { tap::TapQueue::from_raw_fd(dup.into_raw_fd(), 1) }.unwrap();
            assert!(queue.kernel_attached().unwrap());
            other.detach().unwrap();
            expect_queues(tap, 1, 1, "detaching through the second holder");
            assert!(!queue.kernel_attached().unwrap());
            // The gate still says attached: a read reaches the kernel (nothing queued).
            let err = queue.read(&mut [0u8; 2048]).unwrap_err();
            assert_eq!(err.kind(), std::io::ErrorKind::WouldBlock, "{err}");
            assert!(!queue.is_attached().unwrap());
            let err = queue.read(&mut [0u8; 2048]).unwrap_err();
            assert_eq!(err.raw_os_error(), Some(libc::EBADFD), "{err}");
        },
    );
}
