//! mqvmm-ctl: the operator's client of a running mqvmm's API socket (`mqvmm --api-socket
//! PATH`, or `mqvmm-launch --api-socket PATH`). Sends one request, prints the reply as
//! indented JSON on stdout. Exit status: 0 for an `ok` reply, 1 for an error reply or when
//! mqvmm cannot be reached, 2 for bad arguments.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use vmm::api::{client, Request};

/// How long each step (connect aside: it does not wait) may take: a little more than the
/// server allows itself, so that its own timeout error arrives first.
const TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Parser, Debug)]
#[command(
    name = "mqvmm-ctl",
    version,
    about = "Ask a running mqvmm for its counters and queues, set its guest's link, or stop it",
    after_help = "Protocol: one JSON request per connection, e.g. {\"command\":\"link\",\"up\":false}, \
        answered with one line {\"ok\":true,...} or {\"ok\":false,\"error\":\"...\"}.\n\
        Exit status: 0 ok, 1 error reply or mqvmm unreachable, 2 bad arguments."
)]
struct Args {
    /// The API socket mqvmm was started with (`--api-socket PATH`).
    #[arg(long, value_name = "PATH")]
    api_socket: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Every network device counter, per queue pair and per queue.
    Counters,
    /// Per queue pair: attached/parked in the device, attached in the host's tap.
    Queues,
    /// Carrier on or off for the guest (it sees a link change).
    Link {
        #[arg(value_enum)]
        state: LinkState,
    },
    /// Stop the VM; mqvmm exits 0.
    Shutdown,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum LinkState {
    Up,
    Down,
}

fn request(command: &Command) -> Request {
    match command {
        Command::Counters => Request::Counters,
        Command::Queues => Request::Queues,
        Command::Link { state } => Request::Link {
            up: matches!(state, LinkState::Up),
        },
        Command::Shutdown => Request::Shutdown,
    }
}

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    match client::call(&args.api_socket, &request(&args.command), TIMEOUT) {
        Ok(reply) => {
            let text = serde_json::to_string_pretty(&reply).unwrap_or_else(|_| reply.to_string());
            println!("{text}");
            if reply.get("ok") == Some(&serde_json::Value::Bool(true)) {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            let mut line = format!("mqvmm-ctl: error: {e}");
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                line.push_str(&format!(": {s}"));
                source = s.source();
            }
            eprintln!("{line}");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_become_requests_and_anything_else_is_a_usage_error() {
        let parse = |args: &[&str]| {
            Args::try_parse_from([&["mqvmm-ctl", "--api-socket", "/run/x"], args].concat())
        };
        for (args, expected) in [
            (&["counters"][..], Request::Counters),
            (&["queues"], Request::Queues),
            (&["link", "up"], Request::Link { up: true }),
            (&["link", "down"], Request::Link { up: false }),
            (&["shutdown"], Request::Shutdown),
        ] {
            assert_eq!(request(&parse(args).unwrap().command), expected, "{args:?}");
        }
        for bad in [&["link"][..], &["link", "sideways"], &["reboot"], &[]] {
            let err = parse(bad).unwrap_err();
            assert!(err.use_stderr(), "{bad:?}");
        }
        assert!(Args::try_parse_from(["mqvmm-ctl", "counters"]).is_err());
    }
}
