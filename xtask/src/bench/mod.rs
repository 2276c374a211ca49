//! `cargo xtask bench`: the same workloads directly, through each ebpf-proxy data plane and
//! through the alternatives (HAProxy with and without splice, socat, a tokio
//! copy_bidirectional relay), side by side in one run: over loopback and across three network
//! namespaces, with the endpoints on different CPUs and all on one CPU. Workloads: iperf3
//! throughput (1 and 8 streams, each direction) with CPU per GB, request/response latency,
//! connection rate, the memory of 10,000 idle connections, and the memory held for slow
//! clients (slow readers and never-readers). Writes a Markdown report, one CSV per workload
//! and a PNG chart to target/bench.

mod chart;
mod csv;
mod probe;
mod report;
mod scene;
mod slow;
mod targets;
mod verdict;

use std::{
    io::{BufRead as _, BufReader},
    path::Path,
    process::Stdio,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

pub use csv::verdict_of_csvs;
pub use probe::{Probe, echo_server, probe, push_server};
use scene::{Placement, Role, Scene, Topology};
use slow::SlowRow;
pub use targets::tokio_relay;
use targets::{ECHO_PORT, IPERF_PORT, Running, Servers, Target};

/// How much of everything to measure, and where.
pub struct Plan {
    pub runs: u32,
    pub seconds: u32,
    pub latency_round_trips: usize,
    pub rate_seconds: f64,
    pub rate_workers: usize,
    pub idle_connections: usize,
    /// Clients per slow-clients run, and how long the slow readers read before memory is
    /// sampled.
    pub slow_clients: usize,
    pub slow_settle: Duration,
    /// The workloads measured (all by default).
    pub workloads: Vec<Workload>,
    /// The paths measured, in the report's order (all by default).
    pub targets: Vec<Target>,
    /// The topology and placement pairs measured, in the report's order (all by default).
    pub scenes: Vec<Scene>,
    /// With the endpoints apart, spread the relay namespace's receive processing over every
    /// CPU (RPS).
    pub steer_receive: bool,
    /// Every path in every scene with the default plan: its report becomes
    /// docs/performance.md.
    pub publish: bool,
}

/// Which cells `cargo xtask bench` measures: every path in every scene unless narrowed.
#[derive(Default)]
pub struct Selection {
    /// Path keys (`direct`, `kernel`, `haproxy-splice`, ...); empty: all.
    pub targets: Vec<String>,
    /// Scene keys (`loopback-spread`, `namespaces-one-cpu`, ...); empty: all.
    pub scenes: Vec<String>,
    /// Workload keys (`throughput`, `slow-clients`, ...); empty: all.
    pub workloads: Vec<String>,
}

/// What the bench measures in each scene.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    Throughput,
    Latency,
    Rate,
    Idle,
    SlowClients,
}

impl Workload {
    pub const ALL: [Self; 5] = [
        Self::Throughput,
        Self::Latency,
        Self::Rate,
        Self::Idle,
        Self::SlowClients,
    ];

    /// How `--workloads` names it.
    pub fn key(self) -> &'static str {
        match self {
            Self::Throughput => "throughput",
            Self::Latency => "latency",
            Self::Rate => "rate",
            Self::Idle => "idle",
            Self::SlowClients => "slow-clients",
        }
    }
}

impl Plan {
    pub fn new(
        quick: bool,
        runs: Option<u32>,
        seconds: Option<u32>,
        selection: &Selection,
    ) -> Result<Self> {
        let targets = select("--targets", &selection.targets, Target::ALL.to_vec(), |t| {
            t.key().to_owned()
        })?;
        let scenes = select("--scenes", &selection.scenes, Scene::all(), Scene::key)?;
        let workloads = select(
            "--workloads",
            &selection.workloads,
            Workload::ALL.to_vec(),
            |w| w.key().to_owned(),
        )?;
        let publish = !quick
            && selection.targets.is_empty()
            && selection.scenes.is_empty()
            && selection.workloads.is_empty()
            && runs.is_none()
            && seconds.is_none();
        let base = if quick {
            Self {
                runs: 1,
                seconds: 1,
                latency_round_trips: 1_000,
                rate_seconds: 0.5,
                rate_workers: 4,
                idle_connections: 1_000,
                slow_clients: 10,
                slow_settle: Duration::from_secs(1),
                workloads,
                targets,
                scenes,
                steer_receive: false,
                publish,
            }
        } else {
            Self {
                runs: 5,
                seconds: 3,
                latency_round_trips: 10_000,
                rate_seconds: 2.0,
                rate_workers: 4,
                idle_connections: 10_000,
                slow_clients: 100,
                slow_settle: Duration::from_secs(4),
                workloads,
                targets,
                scenes,
                steer_receive: false,
                publish,
            }
        };
        Ok(Self {
            runs: runs.unwrap_or(base.runs).max(1),
            seconds: seconds.unwrap_or(base.seconds).max(1),
            ..base
        })
    }

    fn measures(&self, workload: Workload) -> bool {
        self.workloads.contains(&workload)
    }
}

/// The members of `all` that `wanted` names by key, in `all`'s order; all of them when
/// `wanted` is empty. An unknown name is an error that lists the known ones.
fn select<T: Copy>(
    flag: &str,
    wanted: &[String],
    all: Vec<T>,
    key: impl Fn(&T) -> String,
) -> Result<Vec<T>> {
    if let Some(unknown) = wanted.iter().find(|w| !all.iter().any(|t| key(t) == **w)) {
        let known: Vec<String> = all.iter().map(&key).collect();
        bail!("{flag}: no {unknown:?}; choose from {}", known.join(", "));
    }
    Ok(all
        .into_iter()
        .filter(|t| wanted.is_empty() || wanted.contains(&key(t)))
        .collect())
}

/// One iperf3 run.
#[derive(Clone, Copy)]
pub struct Transfer {
    pub gbit_per_s: f64,
    pub system_cpu_s_per_gb: f64,
    pub relay_cpu_s_per_gb: f64,
}

pub struct ThroughputRow {
    pub scene: Scene,
    pub target: Target,
    pub streams: u32,
    pub reverse: bool,
    pub runs: Vec<Transfer>,
}

pub struct LatencyRow {
    pub scene: Scene,
    pub target: Target,
    pub size: usize,
    /// p50, p99, p99.9 in microseconds, per run.
    pub runs: Vec<[f64; 3]>,
}

pub struct RateRow {
    pub scene: Scene,
    pub target: Target,
    /// Connections per second and failed connections, per run.
    pub runs: Vec<(f64, u64)>,
}

pub struct IdleRow {
    pub topology: Topology,
    pub target: Target,
    /// The measurement, or why there is none.
    pub measured: Result<IdleMemory, String>,
}

pub struct IdleMemory {
    pub connections: usize,
    /// The relay's RSS with the connections open, and before they were.
    pub relay_rss_mib: Option<(f64, f64)>,
    pub slab_growth_mib: f64,
}

#[derive(Default)]
pub struct Results {
    pub throughput: Vec<ThroughputRow>,
    pub latency: Vec<LatencyRow>,
    pub rate: Vec<RateRow>,
    pub idle: Vec<IdleRow>,
    pub slow: Vec<SlowRow>,
}

impl Results {
    /// The latency runs of one cell and message size; none if it was not measured.
    pub fn latency_runs(&self, scene: &Scene, target: Target, size: usize) -> &[[f64; 3]] {
        self.latency
            .iter()
            .find(|r| r.scene == *scene && r.target == target && r.size == size)
            .map_or(&[], |r| &r.runs)
    }

    /// The connection-rate runs of one cell; none if it was not measured.
    pub fn rate_runs(&self, scene: &Scene, target: Target) -> &[(f64, u64)] {
        self.rate
            .iter()
            .find(|r| r.scene == *scene && r.target == target)
            .map_or(&[], |r| &r.runs)
    }
}

pub fn bench(root: &Path, binary: &Path, helper: &Path, plan: &Plan) -> Result<()> {
    crate::packages::ensure(crate::packages::FOR_BENCH)?;
    if thread::available_parallelism().map_or(1, |n| n.get()) < 2 {
        bail!("the bench places endpoints on two CPUs; this machine has one");
    }
    // Children inherit it: relays and probes hold thousands of sockets in the idle run.
    probe::raise_fd_limit()?;
    let scratch = root.join("target/bench");
    std::fs::create_dir_all(&scratch)?;
    let started = Instant::now();
    let mut results = Results::default();
    for topology in Topology::ALL {
        let scenes: Vec<Scene> = plan
            .scenes
            .iter()
            .copied()
            .filter(|s| s.topology == topology)
            .collect();
        if scenes.is_empty() {
            continue;
        }
        let namespaces = topology.set_up()?;
        for scene in scenes {
            let placement = scene.placement;
            if let Some(namespaces) = &namespaces {
                namespaces.steer_receive(plan.steer_receive && placement == Placement::Spread)?;
            }
            let _servers = Servers::start(&scene, helper)?;
            for &target in &plan.targets {
                println!("{}: {}", scene.label(), target.name());
                if plan.measures(Workload::Throughput) {
                    let relay =
                        targets::start(&scene, target, IPERF_PORT, binary, helper, &scratch)?;
                    for streams in [1, 8] {
                        for reverse in [false, true] {
                            let runs = (0..plan.runs)
                                .map(|_| {
                                    throughput(
                                        &scene,
                                        target,
                                        relay.as_ref(),
                                        streams,
                                        reverse,
                                        plan,
                                    )
                                })
                                .collect::<Result<_>>()?;
                            results.throughput.push(ThroughputRow {
                                scene,
                                target,
                                streams,
                                reverse,
                                runs,
                            });
                        }
                    }
                }
                let on_echo = [Workload::Latency, Workload::Rate, Workload::Idle];
                if on_echo.iter().any(|&w| plan.measures(w)) {
                    let relay =
                        targets::start(&scene, target, ECHO_PORT, binary, helper, &scratch)?;
                    if plan.measures(Workload::Latency) {
                        for size in [1, 1024] {
                            let runs = (0..plan.runs)
                                .map(|_| latency(&scene, target, helper, size, plan))
                                .collect::<Result<_>>()?;
                            results.latency.push(LatencyRow {
                                scene,
                                target,
                                size,
                                runs,
                            });
                        }
                    }
                    if plan.measures(Workload::Rate) {
                        let runs = (0..plan.runs)
                            .map(|_| rate(&scene, target, helper, plan))
                            .collect::<Result<_>>()?;
                        results.rate.push(RateRow {
                            scene,
                            target,
                            runs,
                        });
                    }
                    if placement == Placement::Spread && plan.measures(Workload::Idle) {
                        results.idle.push(IdleRow {
                            topology,
                            target,
                            measured: idle(&scene, target, relay.as_ref(), helper, plan),
                        });
                    }
                }
            }
            // Memory for slow clients does not depend on where the CPUs are: measured once,
            // over loopback. Across the namespaces, 10 never-readers through kernel mode
            // exhausted the machine's memory (docs/reliability.md, known issues).
            if scene.key() == "loopback-spread" && plan.measures(Workload::SlowClients) {
                let paths = (binary, helper, scratch.as_path());
                results.slow.extend(slow::measure(&scene, paths, plan));
            }
        }
    }
    let markdown = report::write(&scratch, plan, &results, started.elapsed())?;
    println!(
        "{markdown}\nwritten to target/bench: bench.md, bench.png, throughput.csv, latency.csv, rate.csv, idle.csv, slow.csv"
    );
    if plan.publish {
        report::publish(root, &markdown)?;
        println!("and to docs/performance.md");
    }
    Ok(())
}

fn split_address(address: &str) -> (&str, &str) {
    address.rsplit_once(':').expect("addresses are ip:port")
}

fn throughput(
    scene: &Scene,
    target: Target,
    relay: Option<&Running>,
    streams: u32,
    reverse: bool,
    plan: &Plan,
) -> Result<Transfer> {
    let address = targets::client_address(scene, target, IPERF_PORT);
    let (ip, port) = split_address(&address);
    let relay_ticks = || relay.map_or(0, |r| targets::group_ticks(r.pid()));
    let relay_before = relay_ticks();
    let system_before = targets::system_busy_ticks()?;
    let mut client = scene.command(Role::Client, "iperf3");
    client.args(["-c", ip, "-p", port, "-J"]);
    client.args(["-t", &plan.seconds.to_string(), "-P", &streams.to_string()]);
    if reverse {
        client.arg("-R");
    }
    let output = client.output().context("running iperf3")?;
    let system_ticks = targets::system_busy_ticks()?.saturating_sub(system_before);
    let relay_ticks = relay_ticks().saturating_sub(relay_before);
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).with_context(|| {
        format!(
            "iperf3 through {} printed no JSON: {}",
            target.name(),
            String::from_utf8_lossy(&output.stderr)
        )
    })?;
    if let Some(error) = report.get("error") {
        bail!("iperf3 through {} failed: {error}", target.name());
    }
    let received = &report["end"]["sum_received"];
    let gb = received["bytes"].as_f64().context("iperf3 bytes")? / 1e9;
    let gbit_per_s = received["bits_per_second"]
        .as_f64()
        .context("iperf3 rate")?
        / 1e9;
    let hz = targets::clock_ticks_per_second();
    Ok(Transfer {
        gbit_per_s,
        system_cpu_s_per_gb: system_ticks as f64 / hz / gb,
        relay_cpu_s_per_gb: relay_ticks as f64 / hz / gb,
    })
}

/// Runs probe `name` as the client of `scene` against `address` and parses the N numbers
/// of its one line of output.
fn run_probe<const N: usize>(
    scene: &Scene,
    helper: &Path,
    name: &str,
    address: String,
    args: [String; 2],
) -> Result<[f64; N]> {
    let output = scene
        .command(Role::Client, helper)
        .args(["bench-probe", name, &address])
        .args(&args)
        .output()
        .context("running the bench probe")?;
    if !output.status.success() {
        bail!(
            "bench-probe {name} {address} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let line = String::from_utf8_lossy(&output.stdout);
    let numbers = line
        .split_whitespace()
        .map(|v| {
            v.parse::<f64>()
                .with_context(|| format!("probe printed {line:?}"))
        })
        .collect::<Result<Vec<_>>>()?;
    numbers
        .try_into()
        .map_err(|_| anyhow::anyhow!("bench-probe {name} printed {line:?}"))
}

/// p50, p99 and p99.9 in microseconds.
fn latency(
    scene: &Scene,
    target: Target,
    helper: &Path,
    size: usize,
    plan: &Plan,
) -> Result<[f64; 3]> {
    let address = targets::client_address(scene, target, ECHO_PORT);
    let args = [size.to_string(), plan.latency_round_trips.to_string()];
    run_probe(scene, helper, "latency", address, args)
}

/// Connections per second, and how many failed.
fn rate(scene: &Scene, target: Target, helper: &Path, plan: &Plan) -> Result<(f64, u64)> {
    let address = targets::client_address(scene, target, ECHO_PORT);
    let args = [plan.rate_seconds.to_string(), plan.rate_workers.to_string()];
    let [per_second, failed] = run_probe(scene, helper, "rate", address, args)?;
    Ok((per_second, failed as u64))
}

/// Opens the idle connections (as many as the plan asks, or as the descriptor limit lets
/// this target hold) and reads the relay's RSS and the kernel's Slab while they are held.
fn idle(
    scene: &Scene,
    target: Target,
    relay: Option<&Running>,
    helper: &Path,
    plan: &Plan,
) -> Result<IdleMemory, String> {
    let capacity = target
        .connection_capacity()
        .ok_or("not measured: socat forks a process per connection")?;
    let connections = plan.idle_connections.min(capacity);
    let relay_rss_mib = || relay.map(|r| targets::group_rss_kib(r.pid()) as f64 / 1024.0);
    let rss_before = relay_rss_mib();
    let slab_before = meminfo_kib("Slab").map_err(|e| e.to_string())?;
    let mut probe = scene
        .command(Role::Client, helper)
        .arg("bench-probe")
        .args(["idle", &targets::client_address(scene, target, ECHO_PORT)])
        .arg(connections.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting the idle probe: {e}"))?;
    let stdout = probe.stdout.take().ok_or("probe stdout")?;
    let mut line = String::new();
    let _ = BufReader::new(stdout).read_line(&mut line);
    if line.trim() != "ready" {
        let _ = probe.kill();
        let output = probe.wait_with_output().map_err(|e| e.to_string())?;
        return Err(format!(
            "failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    let slab_now = meminfo_kib("Slab").map_err(|e| e.to_string())?;
    let measured = IdleMemory {
        connections,
        relay_rss_mib: relay_rss_mib().zip(rss_before),
        slab_growth_mib: (slab_now as f64 - slab_before as f64) / 1024.0,
    };
    // Closing stdin lets the probe close its connections and exit.
    drop(probe.stdin.take());
    probe.wait().map_err(|e| e.to_string())?;
    Ok(measured)
}

pub(super) fn meminfo_kib(field: &str) -> Result<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo")?;
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no {field} in /proc/meminfo"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(targets: &[&str], scenes: &[&str]) -> Result<Plan> {
        let owned = |names: &[&str]| names.iter().map(|n| (*n).to_owned()).collect();
        Plan::new(
            true,
            None,
            None,
            &Selection {
                targets: owned(targets),
                scenes: owned(scenes),
                workloads: Vec::new(),
            },
        )
    }

    #[test]
    fn no_selection_measures_every_cell() {
        let plan = plan(&[], &[]).expect("plan");
        assert_eq!(plan.targets.len(), Target::ALL.len());
        assert_eq!(plan.scenes.len(), 4);
    }

    #[test]
    fn a_selection_keeps_the_report_order() {
        let plan = plan(&["haproxy-splice", "kernel"], &["namespaces-one-cpu"]).expect("plan");
        let names: Vec<&str> = plan.targets.iter().map(|t| t.key()).collect();
        assert_eq!(names, ["kernel", "haproxy-splice"]);
        let scenes: Vec<String> = plan.scenes.iter().map(Scene::key).collect();
        assert_eq!(scenes, ["namespaces-one-cpu"]);
    }

    #[test]
    fn an_unknown_name_lists_the_known_ones() {
        let error = plan(&["nginx"], &[]).err().expect("refused").to_string();
        assert!(error.contains("--targets: no \"nginx\""), "{error}");
        assert!(error.contains("haproxy-splice"), "{error}");
        let error = plan(&[], &["loopback"]).err().expect("refused").to_string();
        assert!(error.contains("loopback-spread"), "{error}");
    }
}
