//! The bench's outputs in target/bench: bench.md (the tables, medians with min-max), one CSV
//! per workload with every run, and bench.png (a chart drawn by gnuplot).

use std::{fmt::Write as _, fs, path::Path, process::Command, time::Duration};

use anyhow::{Context as _, Result};

use super::{
    Plan, Results,
    scene::{Placement, Scene, Topology},
    slow::{self, SlowKind},
    targets::Target,
    verdict,
};

/// (streams, reverse) in the order of the throughput columns.
pub(super) const DIRECTIONS: [(u32, bool); 4] = [(1, false), (1, true), (8, false), (8, true)];

/// Median, min and max (NaN for no values).
fn spread(mut values: Vec<f64>) -> (f64, f64, f64) {
    if values.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    values.sort_by(f64::total_cmp);
    (
        values[values.len() / 2],
        values[0],
        values[values.len() - 1],
    )
}

pub(super) fn median(values: Vec<f64>) -> f64 {
    spread(values).0
}

/// Writes every output; returns the Markdown report.
pub fn write(dir: &Path, plan: &Plan, results: &Results, took: Duration) -> Result<String> {
    let markdown = markdown(plan, results, took)?;
    fs::write(dir.join("bench.md"), &markdown)?;
    super::csv::write_csvs(dir, results)?;
    super::chart::chart(dir, plan, results)?;
    Ok(markdown)
}

/// Makes a full run's report the project's docs/performance.md, below the fixed text on
/// how to reproduce it.
pub fn publish(root: &Path, markdown: &str) -> Result<()> {
    let path = root.join("docs/performance.md");
    fs::write(
        &path,
        format!("{}{markdown}", include_str!("performance_intro.md")),
    )
    .with_context(|| format!("writing {}", path.display()))
}

pub(super) fn machine() -> String {
    let read = |path| fs::read_to_string(path).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name")?.split(':').nth(1))
        .unwrap_or("unknown CPU")
        .trim()
        .to_owned();
    let cpus = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    let memory_gib = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0 / 1024.0);
    format!(
        "Linux {}, {cpus} x {model}, {memory_gib:.0} GiB",
        read("/proc/sys/kernel/osrelease").trim()
    )
}

pub(super) fn today() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// The slow-clients table: the memory held per path, with what it adds over direct and how
/// that compares with HAProxy's.
fn slow_clients(
    md: &mut String,
    plan: &Plan,
    results: &Results,
    topologies: &[Topology],
) -> Result<()> {
    writeln!(md, "\n#### Slow clients\n")?;
    let mut header = String::from("| path ");
    for topology in topologies {
        for kind in SlowKind::ALL {
            write!(
                header,
                "| {}: {} ",
                topology.name(),
                kind.label(plan.slow_clients)
            )?;
        }
    }
    writeln!(md, "{header}|")?;
    writeln!(
        md,
        "|---|{}",
        "---|".repeat(topologies.len() * SlowKind::ALL.len())
    )?;
    for &target in &plan.targets {
        let mut row = format!("| {} ", target.name());
        for &topology in topologies {
            for kind in SlowKind::ALL {
                let runs = results
                    .slow
                    .iter()
                    .find(|r| r.topology == topology && r.target == target && r.kind == kind)
                    .map(|r| &r.runs);
                match runs {
                    Some(Ok(runs)) => {
                        let (held, lo, hi) = spread(runs.iter().map(slow::Run::held_mib).collect());
                        write!(row, "| {held:.0} ({lo:.0}-{hi:.0}) MiB")?;
                        let resets: usize = runs.iter().map(|r| r.resets).sum();
                        if resets > 0 {
                            write!(row, ", {resets} reset in all")?;
                        }
                        let compared = slow::against_haproxy(results, topology, target, kind);
                        if let Some(held) =
                            compared.filter(|h| h.over_direct && target != Target::Direct)
                        {
                            write!(row, ", +{:.0} over direct", held.ours)?;
                        }
                        if let Some(held) =
                            compared.filter(|_| ![slow::HAPROXY, Target::Direct].contains(&target))
                        {
                            write!(row, ", {:.2}x HAProxy", held.ours / held.haproxy)?;
                        }
                        row.push(' ');
                    }
                    Some(Err(why)) => write!(row, "| {why} ")?,
                    None => row.push_str("| - "),
                }
            }
        }
        writeln!(md, "{row}|")?;
    }
    writeln!(
        md,
        "\nMemory held while the clients were held: the fall of available memory \
         (MemAvailable plus the per-CPU free page lists; medians of 1 s before and 2 s \
         during, each run with a relay of its own) less what the clients' and the \
         upstream's sockets held. Readers read {} KiB/s each while the \
         upstream pushes as fast as it can, and were held after reading for {:.0} s; \
         never-readers send to an echo until a send cannot start for 2 s, or the relay resets \
         them (counted over the runs). Direct is what \
         connecting straight costs beyond those sockets; the ratio compares what each path adds over direct with \
         what HAProxy (without splice, as WhatsApp's relay runs it) adds.",
        slow::READ_RATE >> 10,
        plan.slow_settle.as_secs_f64()
    )?;
    Ok(())
}

fn markdown(plan: &Plan, results: &Results, took: Duration) -> Result<String> {
    let mut md = String::new();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    writeln!(
        md,
        "Measured {} at commit {} on {}.",
        today(),
        crate::commit(&root),
        machine()
    )?;
    writeln!(
        md,
        "Medians of {} runs (min-max in brackets): iperf3 for {} s per run, {} round trips per latency run, \
         new connections for {} s from {} threads per rate run, {} idle connections. \
         c->u is client to upstream, u->c the reverse (iperf3 -R). The whole run took {:.0} minutes.",
        plan.runs,
        plan.seconds,
        plan.latency_round_trips,
        plan.rate_seconds,
        plan.rate_workers,
        plan.idle_connections,
        took.as_secs_f64() / 60.0
    )?;
    if plan.steer_receive
        && plan
            .scenes
            .iter()
            .any(|s| s.topology == Topology::Namespaces && s.placement == Placement::Spread)
    {
        writeln!(
            md,
            "\nWith the endpoints apart in namespaces, the relay namespace received with RPS over \
             every CPU (`--rps`): each flow's packets on a CPU picked by its hash, not on the CPU \
             that sent them."
        )?;
    }
    // Only the workloads measured (`--workloads`) get tables.
    let per_scene =
        !(results.throughput.is_empty() && results.latency.is_empty() && results.rate.is_empty());
    if per_scene {
        writeln!(
            md,
            "\nThroughput cells: Gbit/s median (min-max), then CPU-seconds per GB moved: system-wide \
             (all CPUs, from /proc/stat, softirq included) / the relay's own processes."
        )?;
        for scene in &plan.scenes {
            writeln!(md, "\n#### {}\n", scene.label())?;
            writeln!(
                md,
                "| path | 1 stream c->u | 1 stream u->c | 8 streams c->u | 8 streams u->c |"
            )?;
            writeln!(md, "|---|---|---|---|---|")?;
            for &target in &plan.targets {
                let mut row = format!("| {} ", target.name());
                for (streams, reverse) in DIRECTIONS {
                    let runs = results
                        .throughput
                        .iter()
                        .find(|r| {
                            r.scene == *scene
                                && r.target == target
                                && r.streams == streams
                                && r.reverse == reverse
                        })
                        .map(|r| r.runs.clone())
                        .unwrap_or_default();
                    let (gbit, lo, hi) = spread(runs.iter().map(|t| t.gbit_per_s).collect());
                    let system = median(runs.iter().map(|t| t.system_cpu_s_per_gb).collect());
                    let relay = median(runs.iter().map(|t| t.relay_cpu_s_per_gb).collect());
                    let relay = if target == Target::Direct {
                        "-".to_owned()
                    } else {
                        format!("{relay:.3}")
                    };
                    write!(
                        row,
                        "| {gbit:.2} ({lo:.2}-{hi:.2}) · {system:.2} / {relay} "
                    )?;
                }
                writeln!(md, "{row}|")?;
            }
            writeln!(
                md,
                "\n| path | 1 B p50 / p99 / p99.9 µs | 1 KiB p50 / p99 / p99.9 µs | new connections/s |"
            )?;
            writeln!(md, "|---|---|---|---|")?;
            for &target in &plan.targets {
                let mut row = format!("| {} ", target.name());
                for size in [1, 1024] {
                    let runs = results.latency_runs(scene, target, size);
                    let q = |i: usize| median(runs.iter().map(|r| r[i]).collect());
                    write!(row, "| {:.0} / {:.0} / {:.0} ", q(0), q(1), q(2))?;
                }
                let runs = results.rate_runs(scene, target);
                let (per_second, lo, hi) = spread(runs.iter().map(|r| r.0).collect());
                let failed: u64 = runs.iter().map(|r| r.1).sum();
                let failed = if failed == 0 {
                    String::new()
                } else {
                    format!(", {failed} failed")
                };
                writeln!(md, "{row}| {per_second:.0} ({lo:.0}-{hi:.0}){failed} |")?;
            }
        }
    }
    // Idle connections are measured in the spread placement of each topology.
    let topologies: Vec<Topology> = Topology::ALL
        .into_iter()
        .filter(|&topology| {
            plan.scenes.contains(&Scene {
                topology,
                placement: Placement::Spread,
            })
        })
        .collect();
    if topologies.is_empty() {
        md.push_str(&verdict::markdown(&plan.scenes, results));
        return Ok(md);
    }
    if !results.idle.is_empty() {
        writeln!(md, "\n#### Idle connections\n")?;
        let names: Vec<&str> = topologies.iter().map(|t| t.name()).collect();
        writeln!(md, "| path | {} |", names.join(" | "))?;
        writeln!(md, "|---|{}", "---|".repeat(names.len()))?;
        for &target in &plan.targets {
            let mut row = format!("| {} ", target.name());
            for &topology in &topologies {
                let idle = results
                    .idle
                    .iter()
                    .find(|r| r.topology == topology && r.target == target)
                    .map(|r| &r.measured);
                match idle {
                    Some(Ok(m)) => {
                        let per_connection = |mib: f64| mib * 1024.0 / m.connections as f64;
                        let rss = m.relay_rss_mib.map_or("-".to_owned(), |(rss, before)| {
                            format!(
                                "{rss:.1} MiB (+{:.1} over none open: {:.2} KiB each)",
                                rss - before,
                                per_connection(rss - before)
                            )
                        });
                        write!(
                            row,
                            "| {} connections: relay RSS {rss}, Slab +{:.1} MiB ({:.2} KiB each) ",
                            m.connections,
                            m.slab_growth_mib,
                            per_connection(m.slab_growth_mib)
                        )?;
                    }
                    Some(Err(why)) => write!(row, "| {why} ")?,
                    None => row.push_str("| - "),
                }
            }
            writeln!(md, "{row}|")?;
        }
        writeln!(
            md,
            "\nEach connection carried one byte each way, then stayed open. Slab growth is /proc/meminfo's Slab while they are open minus before; \
             for direct it is what the two endpoints' sockets cost, so a relay's own kernel memory is its figure minus direct's. \
             Connections per path: {} asked, fewer where the descriptor limit ({}) does not leave room \
             (ebpf-proxy holds 2 descriptors per connection, 6 with splice; HAProxy reserves 2.5).",
            plan.idle_connections,
            super::targets::fd_limit()
        )?;
    }
    if !results.slow.is_empty() {
        slow_clients(&mut md, plan, results, &topologies)?;
    }
    md.push_str(&verdict::markdown(&plan.scenes, results));
    Ok(md)
}
