//! Runs the real `ebpf-proxy` binary and reads its log and /proc entries.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

/// The data planes every behaviour is tested on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plane {
    Kernel,
    /// The default: kernel after a userspace warm-up per connection (splice without BPF).
    Auto,
    Splice,
    Copy,
}

impl Plane {
    /// Whether connections end up in the sockhash (for auto, when BPF is required to load).
    pub fn uses_kernel(self) -> bool {
        self == Self::Kernel || (self == Self::Auto && bpf_required())
    }

    pub fn arg(self) -> &'static str {
        match self {
            Self::Kernel => "kernel",
            Self::Auto => "auto",
            Self::Splice => "splice",
            Self::Copy => "copy",
        }
    }
}

pub fn relay_binary() -> PathBuf {
    std::env::var_os("EBPF_PROXY_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release/ebpf-proxy")
        })
}

/// True when kernel-mode tests must run rather than skip (`.ci/run` sets it).
pub fn bpf_required() -> bool {
    std::env::var("PROXY_REQUIRE_BPF").is_ok_and(|v| v == "1")
}

/// How many of its last log lines a relay prints when the test that ran it fails.
const LOG_SHOWN_ON_FAILURE: usize = 80;

/// A running relay; killed (SIGKILL) if the test did not stop it. If the test fails, its
/// last [`LOG_SHOWN_ON_FAILURE`] log lines go to stderr.
pub struct Relay {
    child: Child,
    /// The first listener's address.
    pub addr: SocketAddr,
    /// Every listener's address, in configuration order.
    pub addrs: Vec<SocketAddr>,
    /// The metrics endpoint, when one was asked for.
    pub metrics: Option<SocketAddr>,
    log: mpsc::Receiver<String>,
    pub lines: Vec<String>,
}

/// What a relay prints on SIGUSR1.
#[derive(Debug, PartialEq, Eq)]
pub struct Status {
    pub connections: u64,
    pub sockets_in_map: Option<u64>,
    /// Flow states and controls in the kernel maps (two of each per connection).
    pub flow_records: Option<u64>,
    pub userspace_fallbacks: Option<u64>,
    /// Times a kernel-mode direction left the kernel, and came back.
    pub detached: Option<u64>,
    pub resumed: Option<u64>,
    pub tasks: u64,
}

impl Relay {
    /// Starts a relay from an ephemeral loopback port to `upstream`, or returns `None` when
    /// the kernel plane cannot load here and the run does not require it.
    pub fn start(plane: Plane, upstream: &str, extra: &[&str]) -> Option<Self> {
        Self::start_on(plane, "127.0.0.1:0", upstream, extra)
    }

    /// As [`Relay::start`], listening on `listen` (port 0 for an ephemeral one).
    pub fn start_on(plane: Plane, listen: &str, upstream: &str, extra: &[&str]) -> Option<Self> {
        Self::start_with(plane, &[], listen, upstream, extra)
    }

    /// As [`Relay::start`], run through a wrapper command (e.g. `env NAME=VALUE`).
    pub fn start_via(
        plane: Plane,
        wrapper: &[&str],
        upstream: &str,
        extra: &[&str],
    ) -> Option<Self> {
        Self::start_with(plane, wrapper, "127.0.0.1:0", upstream, extra)
    }

    fn start_with(
        plane: Plane,
        wrapper: &[&str],
        listen: &str,
        upstream: &str,
        extra: &[&str],
    ) -> Option<Self> {
        let forward = format!("{listen}={upstream}");
        let mut args = vec!["--forward", forward.as_str(), "--dataplane", plane.arg()];
        // Every test client is 127.0.0.1: data-plane tests run without per-IP limits.
        for limit in ["--per-ip-rate", "--per-ip-connections"] {
            if !extra.contains(&limit) {
                args.extend([limit, "0"]);
            }
        }
        args.extend_from_slice(extra);
        match Self::spawn_via(wrapper, &args) {
            Ok(relay) => Some(relay),
            Err(output) if plane == Plane::Kernel && !bpf_required() => {
                eprintln!(
                    "SKIPPED: kernel data plane unavailable (set PROXY_REQUIRE_BPF=1 to fail instead):\n{output}"
                );
                None
            }
            Err(output) => panic!("relay did not start with {args:?}:\n{output}"),
        }
    }

    /// Spawns the binary with `args`; Err carries everything it printed if it never
    /// reported a listening socket.
    pub fn spawn(args: &[&str]) -> Result<Self, String> {
        Self::spawn_via(&[], args)
    }

    /// As [`Relay::spawn`], run through a wrapper command (e.g. `setpriv ...`).
    pub fn spawn_via(wrapper: &[&str], args: &[&str]) -> Result<Self, String> {
        Self::spawn_logging(wrapper, args, "info")
    }

    /// As [`Relay::spawn_via`], with RUST_LOG set to `log`.
    pub fn spawn_logging(wrapper: &[&str], args: &[&str], log: &str) -> Result<Self, String> {
        let mut child = command_via(wrapper)
            .args(args)
            .env("RUST_LOG", log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run {}: {e} (build it with cargo xtask build)",
                    relay_binary().display()
                )
            });
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, log) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { return };
                if tx.send(strip_ansi(&line)).is_err() {
                    return;
                }
            }
        });
        let mut relay = Self {
            child,
            addr: "0.0.0.0:0".parse().expect("placeholder"),
            addrs: Vec::new(),
            metrics: None,
            log,
            lines: Vec::new(),
        };
        // "ready" comes once every listener is bound.
        if relay
            .wait_for_line("ready: ", Duration::from_secs(20))
            .is_none()
        {
            let _ = relay.child.kill();
            let _ = relay.child.wait();
            relay.drain_log(Duration::from_millis(500));
            return Err(relay.lines.join("\n"));
        }
        let address_after = |line: &str, marker: &str| -> Option<SocketAddr> {
            let rest = line.split(marker).nth(1)?;
            rest.split(|c: char| c.is_whitespace() || c == '/')
                .next()?
                .parse()
                .ok()
        };
        relay.addrs = relay
            .lines
            .iter()
            .filter_map(|l| address_after(l, "listening on "))
            .collect();
        relay.metrics = relay
            .lines
            .iter()
            .find_map(|l| address_after(l, "metrics on http://"));
        relay.addr = *relay.addrs.first().expect("a listening address in the log");
        Ok(relay)
    }

    /// Waits for a log line containing `needle`; keeps every line read.
    pub fn wait_for_line(&mut self, needle: &str, within: Duration) -> Option<String> {
        let end = Instant::now() + within;
        loop {
            let left = end.checked_duration_since(Instant::now())?;
            let line = self.log.recv_timeout(left).ok()?;
            self.lines.push(line.clone());
            if line.contains(needle) {
                return Some(line);
            }
        }
    }

    fn drain_log(&mut self, within: Duration) {
        let end = Instant::now() + within;
        while let Some(left) = end.checked_duration_since(Instant::now()) {
            match self.log.recv_timeout(left) {
                Ok(line) => self.lines.push(line),
                Err(_) => return,
            }
        }
    }

    /// GETs /metrics from the relay's metrics endpoint.
    pub fn scrape(&self) -> String {
        let addr = self.metrics.expect("relay started with --metrics");
        crate::http_get(addr, "/metrics")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, signal: libc::c_int) {
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(self.pid() as libc::pid_t, signal) };
    }

    /// Asks for a status line (SIGUSR1) and parses it.
    pub fn status(&mut self) -> Status {
        self.signal(libc::SIGUSR1);
        let line = self
            .wait_for_line("status:", Duration::from_secs(5))
            .expect("relay answers SIGUSR1 with a status line");
        let field = |name: &str| -> Option<u64> {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(name)?.strip_prefix('='))
                .and_then(|v| v.parse().ok())
        };
        Status {
            connections: field("connections").expect("connections in status"),
            sockets_in_map: field("sockets_in_map"),
            flow_records: field("flow_records"),
            userspace_fallbacks: field("userspace_fallbacks"),
            detached: field("detached"),
            resumed: field("resumed"),
            tasks: field("tasks").expect("tasks in status"),
        }
    }

    /// utime + stime of the relay process, in clock ticks.
    pub fn cpu_ticks(&self) -> u64 {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).expect("relay stat");
        // Fields after the ")" that ends the command name: utime is the 12th, stime the 13th.
        let after = &stat[stat.rfind(')').expect("stat format") + 2..];
        let fields: Vec<&str> = after.split_whitespace().collect();
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime")
    }

    pub fn rss_kib(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("relay status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .expect("VmRSS")
    }

    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .expect("relay fds")
            .count()
    }

    /// Sends `signal` and waits for the process to exit.
    pub fn stop(self, signal: libc::c_int) -> (ExitStatus, Vec<String>) {
        self.signal(signal);
        self.wait_exit(Duration::from_secs(10))
    }

    /// Waits for the process to exit by itself (panics after `within`).
    pub fn wait_exit(mut self, within: Duration) -> (ExitStatus, Vec<String>) {
        let end = Instant::now() + within;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("wait for relay") {
                break status;
            }
            assert!(Instant::now() < end, "relay did not exit within {within:?}");
            thread::sleep(Duration::from_millis(20));
        };
        self.drain_log(Duration::from_millis(500));
        (status, std::mem::take(&mut self.lines))
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // A failed test shows the relay's side: its log is the first thing to read.
        if thread::panicking() {
            self.drain_log(Duration::from_millis(500));
            let from = self.lines.len().saturating_sub(LOG_SHOWN_ON_FAILURE);
            eprintln!(
                "--- the relay's last {} log lines ---",
                self.lines.len() - from
            );
            for line in &self.lines[from..] {
                eprintln!("{line}");
            }
        }
    }
}

fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Runs the binary to completion (for bad-input tests): exit status and stderr.
pub fn run_to_exit(args: &[&str]) -> (ExitStatus, String) {
    run_to_exit_via(&[], args)
}

/// As [`run_to_exit`], through a wrapper command (e.g. `setpriv ...`).
pub fn run_to_exit_via(wrapper: &[&str], args: &[&str]) -> (ExitStatus, String) {
    let output = command_via(wrapper)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run ebpf-proxy");
    (
        output.status,
        strip_ansi(&String::from_utf8_lossy(&output.stderr)),
    )
}

/// The relay binary, run through `wrapper` (e.g. `setpriv ...`) when one is given.
fn command_via(wrapper: &[&str]) -> Command {
    match wrapper.split_first() {
        Some((program, rest)) => {
            let mut command = Command::new(program);
            command.args(rest).arg(relay_binary());
            command
        }
        None => Command::new(relay_binary()),
    }
}

/// The single `error...` line of `stderr`; panics unless there is exactly one.
pub fn one_error_line(stderr: &str) -> &str {
    let lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(
        lines.len(),
        1,
        "exactly one error line expected in:\n{stderr}"
    );
    lines[0]
}
