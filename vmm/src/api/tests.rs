//! The protocol against a recording [`Vmm`]; one connection over a socket pair; the socket
//! file; and the whole `api` thread under its seccomp filter, in a child process.

use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::testing::FakeVmm;
use super::*;

/// The reply as JSON, checked to be one line ending in a newline.
fn parse(handled: &Handled) -> Value {
    let text = std::str::from_utf8(&handled.reply).unwrap();
    assert!(text.ends_with('\n'), "{text:?}");
    assert_eq!(text.matches('\n').count(), 1, "{text:?}");
    serde_json::from_str(text).unwrap()
}

fn ask(request: &str, vmm: &FakeVmm) -> (Value, bool) {
    let handled = handle(request.as_bytes(), vmm);
    (parse(&handled), handled.shutdown)
}

fn error_of(reply: &Value) -> &str {
    assert_eq!(reply["ok"], false, "{reply}");
    assert_eq!(reply.as_object().unwrap().len(), 2, "{reply}");
    reply["error"].as_str().unwrap()
}

#[test]
fn each_command_gets_its_reply() {
    let vmm = FakeVmm::new();
    let (reply, shutdown) = ask(r#"{"command":"counters"}"#, &vmm);
    assert!(!shutdown);
    assert_eq!(reply["ok"], true);
    assert_eq!(reply["counters"]["max_pairs"], 2);
    assert_eq!(reply["counters"]["pairs"][1]["rx"]["packets"], 7);
    assert_eq!(reply["counters"]["link_up"], true);

    let (reply, _) = ask(r#" {"command": "queues"} "#, &vmm);
    assert_eq!(
        reply,
        json!({"ok": true, "queues": {
        "max_pairs": 2, "active_pairs": 1, "attached_pairs": 1, "host_attached_queues": 1,
        "pairs": [
            {"pair": 0, "attached": true, "parked": false, "host_attached": true},
            {"pair": 1, "attached": false, "parked": true, "host_attached": null,
             "host_error": "TUNGETIFF failed"},
        ]}})
    );

    let (reply, _) = ask(r#"{"command":"link","up":false}"#, &vmm);
    assert_eq!(reply, json!({"ok": true, "link": {"up": false}}));
    let (reply, _) = ask(r#"{"up":true,"command":"link"}"#, &vmm);
    assert_eq!(reply, json!({"ok": true, "link": {"up": true}}));
    assert_eq!(*vmm.links.lock().unwrap(), [false, true]);

    let (reply, shutdown) = ask(r#"{"command":"shutdown"}"#, &vmm);
    assert!(shutdown);
    assert_eq!(reply, json!({"ok": true, "shutdown": {"exit_code": 0}}));
}

#[test]
fn bad_requests_get_an_error_that_says_what_is_wrong_and_change_nothing() {
    let vmm = FakeVmm::new();
    for (request, says) in [
        ("", "invalid request: EOF while parsing a value"),
        ("{", "invalid request: EOF while parsing an object"),
        ("counters", "invalid request: expected value"),
        ("null", "invalid request: invalid type: null"),
        ("[1,2]", "invalid request"),
        (r#"{}"#, "invalid request: missing field `command`"),
        (
            r#"{"command":"reboot"}"#,
            "invalid request: unknown variant `reboot`, expected one of `counters`, `queues`, \
             `link`, `shutdown`",
        ),
        (
            r#"{"command":"link"}"#,
            "invalid request: missing field `up`",
        ),
        (
            r#"{"command":"link","up":"no"}"#,
            "invalid request: invalid type: string \"no\", expected a boolean",
        ),
        (
            r#"{"command":"link","up":false,"mtu":9000}"#,
            "invalid request: unknown field `mtu`",
        ),
        (
            r#"{"command":"counters"} {}"#,
            "invalid request: trailing characters",
        ),
        (r#"{"command":7}"#, "invalid request"),
        ("\u{0}\u{1}", "invalid request"),
    ] {
        let (reply, shutdown) = ask(request, &vmm);
        let error = error_of(&reply);
        assert!(error.starts_with(says), "{request:?}: {error}");
        assert!(!shutdown, "{request:?}");
    }
    let (reply, _) = (parse(&handle(b"\xff\xfe{", &vmm)), ());
    assert!(error_of(&reply).starts_with("invalid request"), "{reply}");
    assert!(vmm.links.lock().unwrap().is_empty());
}

#[test]
fn a_request_over_64_kib_is_refused_unread() {
    let vmm = FakeVmm::new();
    let mut long = br#"{"command":"counters"}"#.to_vec();
    long.resize(MAX_REQUEST, b' ');
    assert_eq!(parse(&handle(&long, &vmm))["ok"], true);
    long.push(b' ');
    let reply = parse(&handle(&long, &vmm));
    assert_eq!(error_of(&reply), "request longer than 65536 bytes");
}

#[test]
fn without_a_network_device_or_with_its_tap_gone_the_error_says_so() {
    let none = FakeVmm {
        has_net: false,
        ..FakeVmm::new()
    };
    for request in [
        r#"{"command":"counters"}"#,
        r#"{"command":"queues"}"#,
        r#"{"command":"link","up":true}"#,
    ] {
        let (reply, _) = ask(request, &none);
        assert_eq!(error_of(&reply), "mqvmm has no network device");
    }
    // Shutdown needs no device.
    assert!(ask(r#"{"command":"shutdown"}"#, &none).1);

    let gone = FakeVmm {
        tap_gone: true,
        ..FakeVmm::new()
    };
    let (reply, _) = ask(r#"{"command":"link","up":true}"#, &gone);
    assert_eq!(
        error_of(&reply),
        "the tap is gone (deleted while mqvmm runs): the link stays down"
    );
    assert_eq!(ask(r#"{"command":"link","up":false}"#, &gone).0["ok"], true);
}

/// A connection served on one end of a socket pair while `client` runs on the other.
fn over_a_connection(
    vmm: &FakeVmm,
    timeout: Duration,
    client: impl FnOnce(UnixStream) -> Vec<u8> + Send + 'static,
) -> (Vec<u8>, bool) {
    let (mut server, client_end) = UnixStream::pair().unwrap();
    server.set_nonblocking(true).unwrap();
    let client = std::thread::spawn(move || client(client_end));
    let shutdown = serve_connection(&mut server, vmm, timeout);
    drop(server);
    (client.join().unwrap(), shutdown)
}

fn reply_of(bytes: &[u8]) -> Value {
    let text = std::str::from_utf8(bytes).unwrap();
    assert!(text.ends_with('\n'), "{text:?}");
    serde_json::from_str(text).unwrap()
}

fn read_all(mut conn: UnixStream) -> Vec<u8> {
    let mut reply = Vec::new();
    std::io::Read::read_to_end(&mut conn, &mut reply).unwrap();
    reply
}

#[test]
fn a_connection_takes_one_request_ended_by_a_newline_or_the_end_of_the_stream() {
    let vmm = FakeVmm::new();
    // In pieces, ended by a newline; what follows it is ignored.
    let (reply, shutdown) = over_a_connection(&vmm, Duration::from_secs(5), |mut c| {
        for piece in [
            &b"{\"comm"[..],
            b"and\":\"link\",",
            b"\"up\":false}\n{\"command\":\"shutdown\"}\n",
        ] {
            c.write_all(piece).unwrap();
            std::thread::sleep(Duration::from_millis(20));
        }
        read_all(c)
    });
    assert_eq!(reply_of(&reply), json!({"ok": true, "link": {"up": false}}));
    assert!(!shutdown);
    // Ended by shutting down the sending side.
    let (reply, shutdown) = over_a_connection(&vmm, Duration::from_secs(5), |mut c| {
        c.write_all(br#"{"command":"shutdown"}"#).unwrap();
        c.shutdown(std::net::Shutdown::Write).unwrap();
        read_all(c)
    });
    assert_eq!(reply_of(&reply)["ok"], true);
    assert!(shutdown);
}

#[test]
fn a_slow_an_endless_or_a_vanishing_client_costs_a_bounded_time_and_no_more() {
    let vmm = FakeVmm::new();
    let timeout = Duration::from_millis(300);
    // Half a request, then nothing.
    let started = Instant::now();
    let (reply, _) = over_a_connection(&vmm, timeout, |mut c| {
        c.write_all(b"{\"command\":").unwrap();
        read_all(c)
    });
    let took = started.elapsed();
    assert_eq!(
        error_of(&reply_of(&reply)),
        "no complete request within 300ms"
    );
    assert!(took < Duration::from_secs(2), "{took:?}");
    // 1 MiB without a newline: refused after 64 KiB, whatever the client still sends.
    let (reply, _) = over_a_connection(&vmm, Duration::from_secs(5), |c| {
        client::call_raw(&mut { c }, &vec![b' '; 1 << 20], Duration::from_secs(5))
            .map(|v| serde_json::to_vec(&v).unwrap())
            .unwrap_or_default()
    });
    let reply: Value = serde_json::from_slice(&reply).unwrap();
    assert_eq!(error_of(&reply), "request longer than 65536 bytes");
    // A client that leaves before the reply: the server goes on (and a shutdown it asked
    // for still counts).
    let (_, shutdown) = over_a_connection(&vmm, timeout, |mut c| {
        c.write_all(b"{\"command\":\"shutdown\"}\n").unwrap();
        drop(c);
        Vec::new()
    });
    assert!(shutdown);
    let (_, shutdown) = over_a_connection(&vmm, timeout, |c| {
        drop(c);
        Vec::new()
    });
    assert!(!shutdown);
}

static UNIQUE: AtomicUsize = AtomicUsize::new(0);

/// A fresh directory under the system's temporary directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        let dir = std::env::temp_dir().join(format!(
            "mqvmm-api-{}-{}",
            std::process::id(),
            UNIQUE.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn the_socket_file_is_created_0600_refused_over_other_files_and_removed_if_still_ours() {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let dir = TempDir::new();
    let path = dir.0.join("api.sock");

    let socket = ApiSocket::bind(&path).unwrap();
    let meta = std::fs::symlink_metadata(&path).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    // Somebody answers on it: refused.
    let err = ApiSocket::bind(&path).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "--api-socket {} is in use: another process answers on it",
            path.display()
        )
    );
    drop(socket);
    assert!(!path.exists(), "not removed at drop");

    // A stale socket (its listener gone) is replaced.
    drop(UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let socket = ApiSocket::bind(&path).unwrap();
    // Replaced behind mqvmm's back: left alone at drop.
    std::fs::remove_file(&path).unwrap();
    std::fs::write(&path, b"not ours").unwrap();
    drop(socket);
    assert_eq!(std::fs::read(&path).unwrap(), b"not ours");

    // Anything but a socket is refused, and left alone.
    let err = ApiSocket::bind(&path).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "--api-socket {} exists and is not a socket; refusing to replace it",
            path.display()
        )
    );
    std::os::unix::fs::symlink("/etc/hostname", dir.0.join("link")).unwrap();
    assert!(matches!(
        ApiSocket::bind(&dir.0.join("link")),
        Err(SocketError::NotASocket { .. })
    ));
    assert_eq!(std::fs::read(&path).unwrap(), b"not ours");

    let long = dir.0.join("x".repeat(120));
    assert!(ApiSocket::bind(&long)
        .unwrap_err()
        .to_string()
        .ends_with("a socket path has at most 107 bytes"));
    let err = ApiSocket::bind(&dir.0.join("missing/api.sock")).unwrap_err();
    assert!(
        err.to_string().ends_with("cannot open its directory"),
        "{err}"
    );
}

/// The `api` thread under its filter and the main thread under its own, in a child process
/// (filters stay with the process, and a violation ends it): requests good and bad are
/// answered, `shutdown` calls back, and the main thread then removes the socket file.
#[test]
fn the_api_thread_serves_under_its_filter_and_main_removes_the_socket_under_its_own() {
    const NAME: &str =
        "api::tests::the_api_thread_serves_under_its_filter_and_main_removes_the_socket_under_its_own";
    if let Ok(path) = std::env::var("MQVMM_API_CHILD") {
        let path = PathBuf::from(path);
        let mut socket = ApiSocket::bind(&path).unwrap();
        let machine = crate::seccomp::Machine {
            pci: false,
            api: Some(crate::seccomp::ApiFds {
                listener: socket.listener_fd().unwrap(),
                dir: socket.dir_fd(),
            }),
        };
        let sandbox = std::sync::Arc::new(
            crate::seccomp::Sandbox::for_machine(crate::seccomp::Mode::On, None, machine).unwrap(),
        );
        let (stopped_tx, stopped_rx) = std::sync::mpsc::channel();
        spawn(
            socket.take_listener().unwrap(),
            Box::new(FakeVmm::new()),
            sandbox.clone(),
            Box::new(move || {
                let _ = stopped_tx.send(());
            }),
        )
        .unwrap();
        let client = std::thread::spawn(move || {
            let call = |request: &Request| client::call(&path, request, Duration::from_secs(5));
            let counters = call(&Request::Counters).unwrap();
            println!("counters ok={}", counters["ok"]);
            let link = call(&Request::Link { up: false }).unwrap();
            println!("link ok={}", link["ok"]);
            let mut conn = UnixStream::connect(&path).unwrap();
            let bad = client::call_raw(
                &mut conn,
                b"{\"command\":\"fly\"}\n",
                Duration::from_secs(5),
            )
            .unwrap();
            println!("bad ok={}", bad["ok"]);
            let mut conn = UnixStream::connect(&path).unwrap();
            let long =
                client::call_raw(&mut conn, &vec![b'{'; 200_000], Duration::from_secs(5)).unwrap();
            println!("long error={}", long["error"]);
            let shutdown = call(&Request::Shutdown).unwrap();
            println!("shutdown ok={}", shutdown["ok"]);
        });
        stopped_rx.recv_timeout(Duration::from_secs(20)).unwrap();
        client.join().unwrap();
        sandbox.enter(crate::seccomp::ThreadKind::Main).unwrap();
        drop(socket);
        eprintln!("main thread done");
        return;
    }
    let dir = TempDir::new();
    let path = dir.0.join("api.sock");
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([NAME, "--exact", "--nocapture"])
        .env("MQVMM_API_CHILD", &path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    for line in [
        "counters ok=true",
        "link ok=true",
        "bad ok=false",
        "long error=\"request longer than 65536 bytes\"",
        "shutdown ok=true",
    ] {
        assert!(stdout.contains(line), "{line}: {stdout}{stderr}");
    }
    assert!(stderr.contains("main thread done"), "{stderr}");
    assert!(!path.exists(), "the socket was not removed");
}
