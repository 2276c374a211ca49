//! The slow-clients workload: what a path makes the machine hold for clients that read
//! slowly while their upstream pushes, and for clients that send to an echo and never read.
//! Measured as the fall of available memory while they are held (it counts what the relay
//! makes the kernel hold outside socket accounting) less what the clients' and the
//! upstream's own sockets hold, against the same clients connected directly.

use std::{
    io::{BufRead as _, BufReader},
    path::Path,
    process::Stdio,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use super::{
    Plan,
    scene::{Role, Scene, Topology},
    targets::{self, ECHO_PORT, PUSH_PORT, Target},
};

/// What each slow reader reads a second: a phone on a link of about 2 Mbit/s.
pub const READ_RATE: u64 = 256 << 10;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum SlowKind {
    /// Reads [`READ_RATE`] while the upstream pushes as fast as it can.
    Readers,
    /// Sends to an echo and never reads: both directions back up.
    NeverReaders,
}

impl SlowKind {
    pub const ALL: [Self; 2] = [Self::Readers, Self::NeverReaders];

    /// How the CSV names it.
    pub fn key(self) -> &'static str {
        match self {
            Self::Readers => "slow-readers",
            Self::NeverReaders => "never-readers",
        }
    }

    pub fn label(self, clients: usize) -> String {
        match self {
            Self::Readers => format!("{clients} readers at {} KiB/s", READ_RATE >> 10),
            Self::NeverReaders => format!("{clients} never-readers"),
        }
    }

    fn upstream_port(self) -> u16 {
        match self {
            Self::Readers => PUSH_PORT,
            Self::NeverReaders => ECHO_PORT,
        }
    }

    fn read_rate(self) -> u64 {
        match self {
            Self::Readers => READ_RATE,
            Self::NeverReaders => 0,
        }
    }
}

pub struct SlowRow {
    pub topology: Topology,
    pub target: Target,
    pub kind: SlowKind,
    pub clients: usize,
    /// Every run; or why there is none.
    pub runs: Result<Vec<Run>, String>,
}

#[derive(Clone, Copy)]
pub struct Run {
    /// The fall of [`available_kib`] while the clients were held.
    pub fall_mib: f64,
    /// What the clients' and the upstream's sockets held meanwhile: on a real relay they sit
    /// on other machines.
    pub ends_mib: f64,
    /// Clients the relay reset rather than held.
    pub resets: usize,
}

impl Run {
    /// What the machine held for the path itself.
    pub fn held_mib(&self) -> f64 {
        self.fall_mib - self.ends_mib
    }
}

/// Every run of each kind through each target, each with a relay of its own, the targets
/// interleaved run by run: what the kernel keeps from one run (autotuning, caches) then
/// weighs on every target alike. A target whose run fails has no figures.
pub fn measure(scene: &Scene, paths: (&Path, &Path, &Path), plan: &Plan) -> Vec<SlowRow> {
    let mut rows: Vec<SlowRow> = SlowKind::ALL
        .into_iter()
        .flat_map(|kind| {
            plan.targets.iter().map(move |&target| SlowRow {
                topology: scene.topology,
                target,
                kind,
                clients: plan.slow_clients,
                runs: Ok(Vec::new()),
            })
        })
        .collect();
    for run in 0..plan.runs {
        for row in &mut rows {
            let Ok(runs) = &mut row.runs else { continue };
            println!(
                "{}: {}, {}, run {}",
                scene.label(),
                row.target.name(),
                row.kind.key(),
                run + 1
            );
            match one_run(scene, row.target, row.kind, paths, plan) {
                Ok(fall) => runs.push(fall),
                Err(e) => row.runs = Err(format!("failed: {e:#}")),
            }
        }
    }
    rows
}

fn one_run(
    scene: &Scene,
    target: Target,
    kind: SlowKind,
    (binary, helper, scratch): (&Path, &Path, &Path),
    plan: &Plan,
) -> Result<Run> {
    wait_for_sockets_freed()?;
    let relay = targets::start(scene, target, kind.upstream_port(), binary, helper, scratch)?;
    let before = available_median(Duration::from_secs(1))?;
    let mut probe = scene
        .command(Role::Client, helper)
        .arg("bench-probe")
        .args([
            "slow",
            &targets::client_address(scene, target, kind.upstream_port()),
        ])
        .args([
            plan.slow_clients.to_string(),
            kind.read_rate().to_string(),
            plan.slow_settle.as_secs_f64().to_string(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting the slow-clients probe")?;
    let stdout = probe.stdout.take().context("probe stdout")?;
    let mut line = String::new();
    let _ = BufReader::new(stdout).read_line(&mut line);
    let resets = line.trim().strip_prefix("ready ").map(str::parse::<usize>);
    let held = match resets {
        Some(Ok(resets)) => available_median(Duration::from_secs(2)).and_then(|m| {
            let ends = ends_memory(scene, target, kind)?;
            Ok((m, ends, resets))
        }),
        _ => Err(anyhow::anyhow!("the probe never held its clients")),
    };
    // Closing stdin lets the probe close its connections and exit.
    drop(probe.stdin.take());
    let output = probe.wait_with_output()?;
    if !output.status.success() {
        // Its first line says what failed; a backtrace may follow.
        let stderr = String::from_utf8_lossy(&output.stderr);
        bail!(
            "through {}: {}",
            target.name(),
            stderr.lines().next().unwrap_or("no error printed").trim()
        );
    }
    drop(relay);
    let (held, ends, resets) = held?;
    Ok(Run {
        fall_mib: (before - held) / 1024.0,
        ends_mib: ends as f64 / f64::from(1 << 20),
        resets,
    })
}

/// How long TCP's memory must stop falling before a run starts.
const SETTLED_FOR: Duration = Duration::from_millis(500);

/// Waits (up to 30 s) until the sockets of the previous run have given their buffers back:
/// until TCP's memory in /proc/net/sockstat (global to every namespace) stops falling, so
/// that memory freed during this run's samples does not hide what it holds.
fn wait_for_sockets_freed() -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut lowest = tcp_memory_pages()?;
    let mut since = Instant::now();
    while since.elapsed() < SETTLED_FOR {
        if Instant::now() > deadline {
            bail!("TCP's memory still fell 30 s after the previous run ({lowest} pages)");
        }
        // Polling pace, not a synchroniser: the condition is the memory itself.
        thread::sleep(Duration::from_millis(50));
        let pages = tcp_memory_pages()?;
        if pages < lowest {
            lowest = pages;
            since = Instant::now();
        }
    }
    Ok(())
}

/// The pages TCP sockets hold: the `mem` field of /proc/net/sockstat's TCP line.
fn tcp_memory_pages() -> Result<u64> {
    let sockstat = std::fs::read_to_string("/proc/net/sockstat")?;
    sockstat
        .lines()
        .find_map(|l| {
            let fields = l.strip_prefix("TCP:")?;
            let mut words = fields.split_whitespace();
            while let Some(word) = words.next() {
                if word == "mem" {
                    return words.next()?.parse().ok();
                }
            }
            None
        })
        .context("no TCP mem in /proc/net/sockstat")
}

/// The median of [`available_kib`] sampled 8 times a second for `over`: it moves with the
/// whole machine.
fn available_median(over: Duration) -> Result<f64> {
    let samples = (over.as_millis() / 125).max(1);
    let mut values = Vec::new();
    for _ in 0..samples {
        values.push(available_kib()? as f64);
        // Sampling pace, not a synchroniser.
        thread::sleep(Duration::from_millis(125));
    }
    Ok(super::report::median(values))
}

/// Memory the machine has available, in KiB: MemAvailable plus the free pages parked on the
/// per-CPU lists, which MemFree leaves out and which since Linux 6.7 grow and shrink by
/// hundreds of MiB with the rate network traffic frees pages.
fn available_kib() -> Result<u64> {
    let zoneinfo = std::fs::read_to_string("/proc/zoneinfo")?;
    // SAFETY: sysconf has no preconditions.
    let page_kib = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64 / 1024;
    Ok(super::meminfo_kib("MemAvailable")? + per_cpu_free_pages(&zoneinfo) * page_kib)
}

/// The sum of the per-CPU page lists' `count:` lines in a /proc/zoneinfo text.
fn per_cpu_free_pages(zoneinfo: &str) -> u64 {
    zoneinfo
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("count:"))
        .filter_map(|v| v.trim().parse::<u64>().ok())
        .sum()
}

/// Bytes queued in the clients' sockets (towards the address they connect to) and in the
/// upstream's (on its port), each counted in its own namespace.
fn ends_memory(scene: &Scene, target: Target, kind: SlowKind) -> Result<u64> {
    let address = targets::client_address(scene, target, kind.upstream_port());
    let port = address.rsplit(':').next().unwrap_or_default();
    let clients = socket_memory(scene, Role::Client, &format!("dport = :{port}"))?;
    let upstream = socket_memory(
        scene,
        Role::Server,
        &format!("sport = :{}", kind.upstream_port()),
    )?;
    Ok(clients + upstream)
}

/// The sum of `ss` skmem's r, w and bl over the TCP sockets `filter` picks in `role`'s
/// namespace.
fn socket_memory(scene: &Scene, role: Role, filter: &str) -> Result<u64> {
    let output = scene
        .command(role, "ss")
        .arg("-tmnHa")
        .args(filter.split(' '))
        .output()
        .context("running ss (iproute2)")?;
    if !output.status.success() {
        bail!("ss: {}", String::from_utf8_lossy(&output.stderr).trim());
    }
    Ok(skmem_bytes(&String::from_utf8_lossy(&output.stdout)))
}

/// The r, w and bl fields of every `skmem:(...)` in `ss -m` output.
fn skmem_bytes(ss: &str) -> u64 {
    ss.split("skmem:(")
        .skip(1)
        .filter_map(|rest| rest.split(')').next())
        .flat_map(|fields| fields.split(','))
        .filter_map(|field| {
            let digits_at = field.find(|c: char| c.is_ascii_digit())?;
            let (name, value) = field.split_at(digits_at);
            matches!(name, "r" | "w" | "bl").then(|| value.parse::<u64>().ok())?
        })
        .sum()
}

/// HAProxy as WhatsApp's own relay runs it: without splice.
pub const HAPROXY: Target = Target::Haproxy { splice: false };

/// The median of what a cell's runs held for the path, in MiB; none if it was not
/// measured or failed.
pub fn median_held(
    results: &super::Results,
    topology: Topology,
    target: Target,
    kind: SlowKind,
) -> Option<f64> {
    let row = results
        .slow
        .iter()
        .find(|r| r.topology == topology && r.target == target && r.kind == kind)?;
    let runs = row.runs.as_ref().ok().filter(|runs| !runs.is_empty())?;
    Some(super::report::median(
        runs.iter().map(Run::held_mib).collect(),
    ))
}

/// What `target` and HAProxy hold for the same clients, in MiB: over what the clients
/// connected directly held when direct was measured (the path's own cost), else in all.
pub fn against_haproxy(
    results: &super::Results,
    topology: Topology,
    target: Target,
    kind: SlowKind,
) -> Option<Held> {
    let ours = median_held(results, topology, target, kind)?;
    let haproxy = median_held(results, topology, HAPROXY, kind)?;
    let direct = median_held(results, topology, Target::Direct, kind);
    let base = direct.unwrap_or(0.0);
    Some(Held {
        ours: ours - base,
        haproxy: haproxy - base,
        over_direct: direct.is_some(),
    })
}

#[derive(Clone, Copy)]
pub struct Held {
    pub ours: f64,
    pub haproxy: f64,
    /// Whether both are over direct's.
    pub over_direct: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_cpu_free_pages_sum_every_zone_and_cpu() {
        let zoneinfo = "Node 0, zone   Normal\n  pages free     5000\n  pagesets\n    cpu: 0\n              count:    9989\n              high:     10207\n    cpu: 1\n              count:    11\nNode 0, zone    DMA32\n    cpu: 0\n              count: 2\n";
        assert_eq!(per_cpu_free_pages(zoneinfo), 10002);
    }

    #[test]
    fn skmem_counts_queued_bytes_not_buffer_sizes() {
        let ss = "ESTAB 0 0 127.0.0.1:1 127.0.0.1:2 skmem:(r10,rb131072,t0,tb16384,f0,w20,o0,bl30,d0)\n\
                  ESTAB 0 0 127.0.0.1:2 127.0.0.1:1 skmem:(r1,rb131072,t0,tb16384,f4096,w0,o0,bl0,d0)";
        assert_eq!(skmem_bytes(ss), 61);
    }
}
