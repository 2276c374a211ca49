//! What the bench puts between client and server, how each is started and stopped, and how
//! its CPU and memory are counted (over its whole process group: socat forks per client).

use std::{
    fs,
    io::{BufRead, BufReader},
    os::unix::process::CommandExt as _,
    path::Path,
    process::{Child, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use super::scene::{Role, Scene};

pub const RELAY_PORT: u16 = 15200;
pub const IPERF_PORT: u16 = 15201;
pub const ECHO_PORT: u16 = 15202;
pub const PUSH_PORT: u16 = 15203;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Direct,
    Relay(&'static str),
    Haproxy { splice: bool },
    Socat,
    Tokio,
}

impl Target {
    pub const ALL: [Self; 9] = [
        Self::Direct,
        Self::Relay("kernel"),
        // The default: kernel after a userspace warm-up per connection.
        Self::Relay("auto"),
        Self::Relay("splice"),
        Self::Relay("copy"),
        Self::Haproxy { splice: true },
        Self::Haproxy { splice: false },
        Self::Socat,
        Self::Tokio,
    ];

    /// Descriptors the relay process holds per connection (each endpoint process holds one
    /// for a direct connection); None where it forks a process per connection instead.
    fn descriptors_per_connection(self) -> Option<f64> {
        match self {
            Self::Direct => Some(1.0),
            // Two sockets, plus two pipes for splice.
            Self::Relay("splice") => Some(6.0),
            Self::Relay(_) | Self::Tokio => Some(2.0),
            // What HAProxy reserves per maxconn.
            Self::Haproxy { .. } => Some(2.5),
            Self::Socat => None,
        }
    }

    /// How many connections this target can hold open within the descriptor limit that
    /// every process of the bench inherits (a little room kept for everything else).
    pub fn connection_capacity(self) -> Option<usize> {
        let spare = fd_limit().saturating_sub(128) as f64;
        self.descriptors_per_connection()
            .map(|per| (spare / per) as usize)
    }

    /// How `--targets` names it.
    pub fn key(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Relay(plane) => plane,
            Self::Haproxy { splice: true } => "haproxy-splice",
            Self::Haproxy { splice: false } => "haproxy",
            Self::Socat => "socat",
            Self::Tokio => "tokio",
        }
    }

    pub fn name(self) -> String {
        match self {
            Self::Direct => "direct".into(),
            Self::Relay(plane) => format!("ebpf-proxy {plane}"),
            Self::Haproxy { splice: true } => "HAProxy splice".into(),
            Self::Haproxy { splice: false } => "HAProxy".into(),
            Self::Socat => "socat".into(),
            Self::Tokio => "tokio copy_bidirectional".into(),
        }
    }
}

/// What a client connects to for `upstream_port` through `target`.
pub fn client_address(scene: &Scene, target: Target, upstream_port: u16) -> String {
    match target {
        Target::Direct => format!("{}:{upstream_port}", scene.topology.server_ip()),
        _ => format!("{}:{RELAY_PORT}", scene.topology.relay_ip()),
    }
}

/// A running relay, in its own process group; stopped on drop.
pub struct Running {
    child: Child,
    target: Target,
}

/// Starts `target` in `scene` forwarding to `upstream_port`; None for a direct connection.
pub fn start(
    scene: &Scene,
    target: Target,
    upstream_port: u16,
    binary: &Path,
    helper: &Path,
    scratch: &Path,
) -> Result<Option<Running>> {
    let listen = format!("{}:{RELAY_PORT}", scene.topology.relay_ip());
    let upstream = format!("{}:{upstream_port}", scene.topology.server_ip());
    let mut command = match target {
        Target::Direct => return Ok(None),
        Target::Relay(plane) => {
            let mut command = scene.command(Role::Relay, binary);
            command
                .args(["--forward", &format!("{listen}={upstream}")])
                .args(["--dataplane", plane])
                // The bench is one client address opening thousands of connections.
                .args(["--max-connections", "30000"])
                .args(["--per-ip-connections", "0", "--per-ip-rate", "0"])
                .env("RUST_LOG", "info");
            command
        }
        Target::Haproxy { splice } => {
            // Debian's HAProxy 2.6, tcp mode, one thread per CPU (its default).
            let config = scratch.join(format!("haproxy-{splice}.cfg"));
            fs::write(
                &config,
                format!(
                    "global\n  maxconn {}\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 1m\n  timeout server 1m\n{}\
                     frontend f\n  bind {listen}\n  default_backend b\nbackend b\n  server s {upstream}\n",
                    target.connection_capacity().unwrap_or(1000).min(30_000),
                    if splice { "  option splice-auto\n" } else { "" }
                ),
            )?;
            let mut command = scene.command(Role::Relay, "haproxy");
            command.arg("-db").arg("-f").arg(config);
            command
        }
        Target::Socat => {
            let mut command = scene.command(Role::Relay, "socat");
            command.args([
                format!(
                    "TCP-LISTEN:{RELAY_PORT},bind={},reuseaddr,fork,backlog=4096",
                    scene.topology.relay_ip()
                ),
                format!("TCP:{upstream}"),
            ]);
            command
        }
        Target::Tokio => {
            let mut command = scene.command(Role::Relay, helper);
            command.args(["tokio-relay", &listen, &upstream]);
            command
        }
    };
    let mut child = command
        .process_group(0)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", target.name()))?;
    let stderr = child.stderr.take().context("relay stderr")?;
    let mut running = Running { child, target };
    if matches!(target, Target::Relay(_)) {
        // ebpf-proxy says when it listens (and why not, if it cannot).
        let mut lines = BufReader::new(stderr).lines();
        let mut log = String::new();
        loop {
            match lines.next() {
                Some(Ok(line)) if line.contains("listening on") => break,
                Some(Ok(line)) => log.push_str(&line),
                _ => bail!("{} did not start: {log}", target.name()),
            }
        }
        // Keep draining the log so the relay never blocks on a full pipe.
        thread::spawn(move || lines.for_each(drop));
    } else {
        let log = Arc::new(Mutex::new(String::new()));
        let collected = Arc::clone(&log);
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut log = collected.lock().unwrap_or_else(|e| e.into_inner());
                if log.len() < 4096 {
                    log.push_str(&line);
                    log.push('\n');
                }
            }
        });
        if let Err(e) = wait_listening(&mut running.child, RELAY_PORT, &target.name()) {
            let log = log.lock().unwrap_or_else(|e| e.into_inner()).clone();
            return Err(e.context(log));
        }
    }
    Ok(Some(running))
}

impl Running {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Running {
    /// ebpf-proxy closes at once on SIGINT (SIGTERM would drain); the others stop on
    /// SIGTERM (a shell that starts the bench in the background makes them ignore SIGINT).
    /// SIGKILL after 5 s; then waits until the whole group is gone, so the port is free.
    fn drop(&mut self) {
        let signal = match self.target {
            Target::Relay(_) => libc::SIGINT,
            _ => libc::SIGTERM,
        };
        let group = self.child.id() as i32;
        // SAFETY: signalling our own child's process group.
        unsafe { libc::kill(-group, signal) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
        // SAFETY: as above; ESRCH when everything already exited.
        unsafe { libc::kill(-group, libc::SIGKILL) };
        let _ = self.child.wait();
        // SAFETY: signal 0 only checks whether any process of the group is left.
        while unsafe { libc::kill(-group, 0) } == 0 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
    }
}

/// The iperf3, echo and push servers of one scene; stopped on drop.
pub struct Servers(Vec<Child>);

impl Servers {
    pub fn start(scene: &Scene, helper: &Path) -> Result<Self> {
        let ip = scene.topology.server_ip();
        let mut servers = Self(Vec::new());
        let mut iperf = scene.command(Role::Server, "iperf3");
        iperf.args(["-s", "-p", &IPERF_PORT.to_string(), "-B", ip]);
        let mut echo = scene.command(Role::Server, helper);
        echo.args(["bench-echo", &format!("{ip}:{ECHO_PORT}")]);
        let mut push = scene.command(Role::Server, helper);
        push.args(["bench-push", &format!("{ip}:{PUSH_PORT}")]);
        for (mut command, port) in [(iperf, IPERF_PORT), (echo, ECHO_PORT), (push, PUSH_PORT)] {
            let child = command
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("starting a bench server (apt-get install iperf3)")?;
            servers.0.push(child);
            let child = servers.0.last_mut().expect("just pushed");
            wait_listening(child, port, "bench server")?;
        }
        Ok(servers)
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Waits (up to 10 s) until `child` has a socket listening on `port`, reading the TCP
/// table of the child's own network namespace.
fn wait_listening(child: &mut Child, port: u16, what: &str) -> Result<()> {
    let pid = child.id();
    let wanted = format!(":{port:04X}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            bail!("{what} exited ({status}) instead of listening on port {port}");
        }
        let listening = fs::read_to_string(format!("/proc/{pid}/net/tcp")).is_ok_and(|table| {
            table.lines().any(|l| {
                let fields: Vec<&str> = l.split_whitespace().collect();
                fields.len() > 3 && fields[1].ends_with(&wanted) && fields[3] == "0A"
            })
        });
        if listening {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{what} did not listen on port {port}");
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Busy jiffies of all CPUs (everything but idle and iowait), softirq included.
pub fn system_busy_ticks() -> Result<u64> {
    let stat = fs::read_to_string("/proc/stat")?;
    let cpu = stat.lines().next().context("/proc/stat is empty")?;
    let fields: Vec<u64> = cpu
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...
    Ok(fields
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, v)| v)
        .sum())
}

/// Fields of /proc/PID/stat after the command name (state is index 0, pgrp index 2).
fn stat_fields(pid: u32) -> Vec<u64> {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return Vec::new();
    };
    let Some(end) = stat.rfind(')') else {
        return Vec::new();
    };
    stat[end + 2..]
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0))
        .collect()
}

/// Live processes of process group `group`.
fn group_members(group: u32) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&p| stat_fields(p).get(2).copied() == Some(u64::from(group)))
        .collect()
}

/// CPU ticks of a process group: every member's own, plus what its reaped children used.
pub fn group_ticks(group: u32) -> u64 {
    group_members(group)
        .into_iter()
        .map(|pid| stat_fields(pid).iter().skip(11).take(4).sum::<u64>())
        .sum()
}

/// Resident memory of a process group, in KiB (shared pages counted once per process).
pub fn group_rss_kib(group: u32) -> u64 {
    group_members(group)
        .into_iter()
        .filter_map(|pid| {
            let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
            let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .sum()
}

/// The soft RLIMIT_NOFILE, which the bench's children inherit.
pub fn fd_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return 1024;
    }
    limit.rlim_cur
}

pub fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }) as f64
}

/// A plain tokio relay: accept, connect, copy_bidirectional. What a Rust developer gets
/// for free, as a baseline.
pub fn tokio_relay(listen: &str, upstream: &str) -> Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(listen).await?;
        loop {
            let (mut client, _) = listener.accept().await?;
            let upstream = upstream.to_owned();
            tokio::spawn(async move {
                if let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }
            });
        }
    })
}
