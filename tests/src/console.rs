//! Driving a guest's shell through the VMM's serial console (its stdin/stdout), for boot tests
//! that interleave guest commands with host-side checks.

use std::io::Write;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use crate::rig::TimedLine;

/// A running VMM whose console we type into and read from.
pub struct GuestConsole {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<TimedLine>,
    /// Everything seen so far (stdout and stderr, in arrival order), for failure messages.
    transcript: Vec<String>,
    next_marker: u32,
    started: Instant,
}

/// What a guest command printed, and its exit status.
#[derive(Debug, Clone)]
pub struct CommandOutput {
    pub output: String,
    pub status: i32,
}

impl GuestConsole {
    /// Spawns `cmd` with piped stdio. Both output streams feed one line queue.
    pub fn spawn(mut cmd: Command) -> std::io::Result<GuestConsole> {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let stdin = child
            .stdin
            .take()
            .ok_or_else(|| std::io::Error::other("no stdin"))?;
        let started = Instant::now();
        let (tx, rx) = mpsc::channel();
        crate::rig::read_lines_of(&mut child, started, tx);
        Ok(GuestConsole {
            child,
            stdin,
            lines: rx,
            transcript: Vec::new(),
            next_marker: 1,
            started,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// The console so far, one line each, for assertion messages.
    pub fn transcript(&mut self) -> String {
        self.drain();
        self.transcript.join("\n")
    }

    fn drain(&mut self) {
        while let Ok(line) = self.lines.try_recv() {
            self.transcript.push(line.line);
        }
    }

    /// Waits for a line containing `needle`; returns it, or None after `timeout` or when the
    /// VMM closed its output.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            match self.lines.recv_timeout(left) {
                Ok(TimedLine { line, .. }) => {
                    let hit = line.contains(needle);
                    self.transcript.push(line.clone());
                    if hit {
                        return Some(line);
                    }
                }
                Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => {
                    return None
                }
            }
        }
    }

    /// Types `text` into the console.
    pub fn send(&mut self, text: &str) -> std::io::Result<()> {
        self.stdin.write_all(text.as_bytes())?;
        self.stdin.flush()
    }

    /// Runs `command` in the guest shell and returns its output and exit status. The end
    /// marker is computed by the guest's shell (`$((...))`), so the echo of the typed command
    /// line can never be mistaken for it.
    pub fn run(&mut self, command: &str, timeout: Duration) -> Result<CommandOutput, String> {
        let id = self.next_marker;
        self.next_marker += 1;
        let begin = format!("MQB:{}:", 700_000 + id);
        let end = format!("MQE:{}:", 700_000 + id);
        let line = format!("echo MQB:$((700000+{id})):; {command}; echo MQE:$((700000+{id})):$?\n");
        self.send(&line)
            .map_err(|e| format!("cannot type into the console: {e}"))?;
        let deadline = Instant::now() + timeout;
        let mut output = Vec::new();
        let mut started = false;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match self.lines.recv_timeout(left) {
                Ok(timed) => timed.line,
                Err(_) => {
                    return Err(format!(
                        "`{command}` did not finish within {} s; console:\n{}",
                        timeout.as_secs(),
                        self.transcript()
                    ))
                }
            };
            self.transcript.push(line.clone());
            if let Some(pos) = line.find(&end) {
                let status = line[pos + end.len()..]
                    .trim()
                    .parse()
                    .map_err(|_| format!("unreadable exit status in {line:?}"))?;
                return Ok(CommandOutput {
                    output: output.join("\n"),
                    status,
                });
            }
            if line.contains(&begin) {
                started = true;
            } else if started {
                output.push(line);
            }
        }
    }

    /// Like [`run`](Self::run), but the command must succeed.
    pub fn check(&mut self, command: &str, timeout: Duration) -> String {
        match self.run(command, timeout) {
            Ok(out) if out.status == 0 => out.output,
            Ok(out) => panic!(
                "guest command `{command}` failed with status {}:\n{}\nconsole:\n{}",
                out.status,
                out.output,
                self.transcript()
            ),
            Err(e) => panic!("{e}"),
        }
    }

    /// Waits for the VMM to exit; kills it after `timeout`. Returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            self.drain();
            match self.child.try_wait() {
                Ok(Some(status)) => return status.code(),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(100))
                }
                _ => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    return None;
                }
            }
        }
    }
}

impl Drop for GuestConsole {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
