//! The slow-clients workload: what a path makes the machine hold for clients that read
//! slowly while their upstream pushes, and for clients that send to an echo and never read.
//! Measured as the fall of MemAvailable while they are held (it counts what the relay makes
//! the kernel hold outside socket accounting), against the same clients connected directly.

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
    /// MemAvailable's fall while the clients were held.
    pub fall_mib: f64,
    /// Clients the relay reset rather than held.
    pub resets: usize,
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
    let before = mem_available_median(Duration::from_secs(1))?;
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
        Some(Ok(resets)) => mem_available_median(Duration::from_secs(2)).map(|m| (m, resets)),
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
    let (held, resets) = held?;
    Ok(Run {
        fall_mib: (before - held) / 1024.0,
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

/// The median of MemAvailable (KiB) sampled 8 times a second for `over`: it moves with the
/// whole machine.
fn mem_available_median(over: Duration) -> Result<f64> {
    let samples = (over.as_millis() / 125).max(1);
    let mut values = Vec::new();
    for _ in 0..samples {
        values.push(super::meminfo_kib("MemAvailable")? as f64);
        // Sampling pace, not a synchroniser.
        thread::sleep(Duration::from_millis(125));
    }
    Ok(super::report::median(values))
}

/// HAProxy as WhatsApp's own relay runs it: without splice.
pub const HAPROXY: Target = Target::Haproxy { splice: false };

/// The median of a cell's runs in MiB; none if it was not measured or failed.
pub fn median_fall(
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
        runs.iter().map(|r| r.fall_mib).collect(),
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
    let ours = median_fall(results, topology, target, kind)?;
    let haproxy = median_fall(results, topology, HAPROXY, kind)?;
    let direct = median_fall(results, topology, Target::Direct, kind);
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
