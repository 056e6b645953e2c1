// SPDX-License-Identifier: Apache-2.0
//! The API socket's request handler (`vmm::api::handle`), and in one mode the whole
//! connection (`vmm::api::serve_connection` over a socket pair: framing by newline or end of
//! stream, the 64 KiB bound), fed arbitrary bytes against a fake VM whose link changes are
//! recorded.
//!
//! Input: a mode byte (bit 0: the VM has a network device, bit 1: its tap is gone, bit 2:
//! through a connection, the request sent in pieces whose sizes come from bits 3..7), then
//! the request bytes.
//!
//! Checks: every reply is one line of JSON, an object of exactly `ok` and one more member;
//! an error reply has an `error` string, asks for no shutdown and changed no link; a
//! successful reply is exactly the one the request asks for (serde's own parse of it): the
//! link set as asked, `shutdown` only for a shutdown request; a request over 64 KiB is
//! refused as too long.
#![no_main]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Mutex;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use mqvmm_fuzz::{trace, Input};
use serde_json::Value;
use vmm::api::testing::FakeVmm;
use vmm::api::{handle, serve_connection, Request, MAX_REQUEST};

/// The request the server takes from `sent` on a connection: up to the first newline.
fn framed(sent: &[u8]) -> &[u8] {
    match sent.iter().position(|&b| b == b'\n') {
        Some(end) => &sent[..end],
        None => sent,
    }
}

/// Sends `request` over a socket pair in pieces of `piece` bytes and serves it.
fn over_a_connection(vmm: &FakeVmm, request: &[u8], piece: usize) -> (Vec<u8>, bool) {
    let (mut server, mut client) = UnixStream::pair().unwrap();
    server.set_nonblocking(true).unwrap();
    let sent = request.to_vec();
    let writer = std::thread::spawn(move || {
        for chunk in sent.chunks(piece) {
            if client.write_all(chunk).is_err() {
                break;
            }
        }
        let _ = client.shutdown(std::net::Shutdown::Write);
        let mut reply = Vec::new();
        let _ = client.read_to_end(&mut reply);
        reply
    });
    let shutdown = serve_connection(&mut server, vmm, Duration::from_secs(10));
    drop(server);
    (writer.join().unwrap(), shutdown)
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let mode = input.u8();
    let request = input.bytes(usize::MAX);
    let vmm = FakeVmm {
        has_net: mode & 1 != 0,
        tap_gone: mode & 2 != 0,
        links: Mutex::new(Vec::new()),
    };
    let connection = mode & 4 != 0;
    let (reply, shutdown, taken) = if connection {
        let piece = usize::from(mode >> 3) + 1;
        let (reply, shutdown) = over_a_connection(&vmm, request, piece);
        (reply, shutdown, framed(request))
    } else {
        let handled = handle(request, &vmm);
        (handled.reply, handled.shutdown, request)
    };
    trace!(
        "api: mode {mode:#x}, {} request bytes -> {:?}",
        taken.len(),
        String::from_utf8_lossy(&reply)
    );

    let text = std::str::from_utf8(&reply).expect("the reply is UTF-8");
    assert!(
        text.ends_with('\n') && text.matches('\n').count() == 1,
        "{text:?}"
    );
    let reply: Value = serde_json::from_str(text).expect("the reply is JSON");
    let members = reply.as_object().expect("the reply is an object");
    assert_eq!(members.len(), 2, "{reply}");
    let links = vmm.links.lock().unwrap().clone();
    let asked = if taken.len() > MAX_REQUEST {
        None
    } else {
        serde_json::from_slice::<Request>(taken).ok()
    };
    match reply["ok"].as_bool().expect("ok is a boolean") {
        false => {
            assert!(reply["error"].is_string(), "{reply}");
            assert!(!shutdown && links.is_empty(), "{reply}");
            if taken.len() > MAX_REQUEST {
                assert_eq!(reply["error"], "request longer than 65536 bytes");
            }
            if let Some(request) = asked {
                // Only what the fake VM refuses.
                let refused = !vmm.has_net && request != Request::Shutdown
                    || request == Request::Link { up: true } && vmm.tap_gone;
                assert!(refused, "{request:?} refused: {reply}");
            }
        }
        true => {
            let request = asked.unwrap_or_else(|| panic!("ok for an invalid request: {reply}"));
            assert_eq!(shutdown, request == Request::Shutdown, "{reply}");
            match request {
                Request::Counters => assert!(reply["counters"].is_object(), "{reply}"),
                Request::Queues => assert!(reply["queues"].is_object(), "{reply}"),
                Request::Link { up } => {
                    assert_eq!(reply["link"]["up"], up, "{reply}");
                    assert_eq!(links, [up]);
                }
                Request::Shutdown => assert_eq!(reply["shutdown"]["exit_code"], 0, "{reply}"),
            }
            if request != (Request::Link { up: true }) && request != (Request::Link { up: false }) {
                assert!(links.is_empty());
            }
        }
    }
});
