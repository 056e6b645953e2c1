//! The steering program on a real multiqueue tap, in a network namespace the test creates:
//! frames the host sends into the tap (AF_PACKET, through the tap's transmit path) arrive on
//! the queue the published configuration names, with no fd of the program left open.
//! Needs root and /dev/net/tun; skips with one line otherwise.

use std::os::fd::{AsFd, AsRawFd};
use std::time::{Duration, Instant};

use mqvmm_tests::netns;
use tap::steering::{
    toeplitz, SteerConfig, SteeringMap, HASH_UDPV4, KEY_LEN, SUPPORTED_HASH_TYPES,
};
use tap::TapQueue;

const HDR_LEN: usize = 12;

/// Sends one UDP frame per source port and returns, per frame, the queue it arrived on.
fn send_and_locate(tap: &str, queues: &[TapQueue], ports: &[u16]) -> Vec<u16> {
    let sock = netns::PacketSocket::bind(tap).unwrap();
    let sent: Vec<Vec<u8>> = ports
        .iter()
        .map(|&port| netns::udp_broadcast_frame(port, format!("steer {port}").as_bytes()))
        .collect();
    for frame in &sent {
        sock.send(frame).unwrap();
    }
    let mut arrived: Vec<Option<u16>> = vec![None; sent.len()];
    let mut buf = vec![0u8; 65_562];
    let deadline = Instant::now() + Duration::from_secs(5);
    while arrived.iter().any(Option::is_none) && Instant::now() < deadline {
        let mut pollfds: Vec<libc::pollfd> = queues
            .iter()
            .map(|q| libc::pollfd {
                fd: q.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: `pollfds` is a valid array of that many pollfds for the call.
        let n = unsafe { libc::poll(pollfds.as_mut_ptr(), pollfds.len() as libc::nfds_t, 100) };
        assert!(n >= 0, "poll: {}", std::io::Error::last_os_error());
        for (pfd, queue) in pollfds.iter().zip(queues) {
            if pfd.revents & libc::POLLIN == 0 {
                continue;
            }
            loop {
                match queue.read(&mut buf) {
                    Ok(n) => {
                        let frame = &buf[HDR_LEN..n];
                        // Anything else is the kernel's own traffic on a new link (DAD, MLD).
                        if let Some(i) = sent.iter().position(|s| s[..] == *frame) {
                            assert_eq!(arrived[i], None, "frame {i} delivered twice");
                            arrived[i] = Some(queue.queue());
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => panic!("read from queue {}: {e}", queue.queue()),
                }
            }
        }
    }
    arrived
        .into_iter()
        .enumerate()
        .map(|(i, q)| q.unwrap_or_else(|| panic!("frame {i} (port {}) never arrived", ports[i])))
        .collect()
}

#[test]
fn frames_from_the_host_arrive_on_the_queue_the_published_table_names() {
    if !netns::require_netns() {
        return;
    }
    netns::run_in_netns(
        "frames_from_the_host_arrive_on_the_queue_the_published_table_names",
        || {
            let tap = "mqsteer0";
            let mq = netns::root_owned_tap(tap, 4);
            let queues = mq.queues();
            queues[0].set_vnet_hdr_size(HDR_LEN as i32).unwrap();
            netns::set_link_up(tap).unwrap();
            let ports: Vec<u16> = (0..32).map(|i| 40_000 + i).collect();

            // The kernel's own flow hash spreads 32 flows over several queues.
            let unsteered = send_and_locate(tap, queues, &ports);
            assert!(
                unsteered.iter().any(|&q| q != unsteered[0]),
                "without steering: {unsteered:?}"
            );

            // attach() closes every fd of the program: the tap's reference keeps it running.
            let map_fd = steering::attach(queues[0].as_fd()).expect("attach steering");
            let map = SteeringMap::from_fd(map_fd).expect("map the steering map");
            let everything_to_2 = SteerConfig {
                hash_types: SUPPORTED_HASH_TYPES,
                key: [0x5a; KEY_LEN],
                table: vec![2; 8],
                unclassified: 2,
            };
            map.publish(&everything_to_2).unwrap();
            let steered = send_and_locate(tap, queues, &ports);
            assert!(steered.iter().all(|&q| q == 2), "table of 2s: {steered:?}");

            // An RSS table: each frame on table[toeplitz(addresses, ports) & 3].
            let mut key = [0u8; KEY_LEN];
            key.iter_mut()
                .enumerate()
                .for_each(|(i, k)| *k = (i as u8).wrapping_mul(37) ^ 0x6d);
            let rss = SteerConfig {
                hash_types: HASH_UDPV4,
                key,
                table: vec![3, 1, 0, 2],
                unclassified: 0,
            };
            map.publish(&rss).unwrap();
            let expected: Vec<u16> = ports
                .iter()
                .map(|&port| {
                    let mut input = vec![10, 0, 0, 1, 10, 0, 0, 2];
                    input.extend(port.to_be_bytes());
                    input.extend(9u16.to_be_bytes());
                    rss.table[toeplitz(&key, &input) as usize & 3]
                })
                .collect();
            assert!(
                expected.iter().any(|&q| q != expected[0]),
                "a degenerate case: {expected:?}"
            );
            assert_eq!(send_and_locate(tap, queues, &ports), expected);

            // Detached: the kernel's flow hash again, whatever the map says.
            map.publish(&everything_to_2).unwrap();
            steering::detach(queues[0].as_fd()).unwrap();
            let detached = send_and_locate(tap, queues, &ports);
            assert!(
                detached.iter().any(|&q| q != 2),
                "after detach: {detached:?}"
            );
        },
    );
}

#[test]
fn attaching_to_something_that_is_no_tap_fails_with_the_fd_in_the_message() {
    if !mqvmm_tests::skip::require_root() {
        return;
    }
    let file = std::fs::File::open("/dev/null").unwrap();
    let err = steering::attach(file.as_fd()).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains(&format!(
            "TUNSETSTEERINGEBPF on tap queue fd {}",
            file.as_raw_fd()
        )),
        "{msg}"
    );
}
