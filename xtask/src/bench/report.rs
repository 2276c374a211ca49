//! The bench's outputs in target/bench: bench.md (the tables, medians with min-max), one CSV
//! per workload with every run, and bench.png (a chart drawn by gnuplot).

use std::{fmt::Write as _, fs, path::Path, process::Command, time::Duration};

use anyhow::{Context as _, Result, bail};

use super::{
    IdleMemory, IdleRow, LatencyRow, Plan, RateRow, Results, ThroughputRow, Transfer,
    scene::{Placement, Scene, Topology},
    targets::Target,
    verdict,
};

/// (streams, reverse) in the order of the throughput columns.
const DIRECTIONS: [(u32, bool); 4] = [(1, false), (1, true), (8, false), (8, true)];

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
    write_csvs(dir, results)?;
    chart(dir, plan, results)?;
    Ok(format!(
        "{markdown}\nwritten to target/bench: bench.md, bench.png, throughput.csv, latency.csv, rate.csv, idle.csv"
    ))
}

fn machine() -> String {
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

fn today() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

fn markdown(plan: &Plan, results: &Results, took: Duration) -> Result<String> {
    let mut md = String::new();
    writeln!(md, "Measured {} on {}.", today(), machine())?;
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
                let runs = results
                    .latency
                    .iter()
                    .find(|r| r.scene == *scene && r.target == target && r.size == size)
                    .map(|r| r.runs.clone())
                    .unwrap_or_default();
                let q = |i: usize| median(runs.iter().map(|r| r[i]).collect());
                write!(row, "| {:.0} / {:.0} / {:.0} ", q(0), q(1), q(2))?;
            }
            let runs = results
                .rate
                .iter()
                .find(|r| r.scene == *scene && r.target == target)
                .map(|r| r.runs.clone())
                .unwrap_or_default();
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
    md.push_str(&verdict::markdown(&plan.scenes, results));
    Ok(md)
}

/// The verdict on the run whose CSVs are in `dir`, judged again without measuring; also
/// written to `dir`/verdict.md.
pub fn verdict_of_csvs(dir: &Path) -> Result<String> {
    let (scenes, results) = read_csvs(dir)?;
    let markdown = verdict::markdown(&scenes, &results);
    fs::write(dir.join("verdict.md"), &markdown)?;
    Ok(markdown)
}

/// The results [`write_csvs`] wrote, and the scenes they cover in the report's order.
fn read_csvs(dir: &Path) -> Result<(Vec<Scene>, Results)> {
    let mut results = Results::default();
    let mut seen = Vec::new();
    for (fields, line) in csv_rows(dir, "throughput.csv", 9)? {
        let scene = scene_of(&fields[0], &fields[1]).with_context(|| line.clone())?;
        let (target, streams, reverse) = (
            target_of(&fields[2]).with_context(|| line.clone())?,
            fields[3].parse().with_context(|| line.clone())?,
            fields[4] == "u->c",
        );
        let run = Transfer {
            gbit_per_s: fields[6].parse().with_context(|| line.clone())?,
            system_cpu_s_per_gb: fields[7].parse().with_context(|| line.clone())?,
            relay_cpu_s_per_gb: fields[8].parse().with_context(|| line.clone())?,
        };
        seen.push(scene);
        match results.throughput.iter_mut().find(|r| {
            r.scene == scene && r.target == target && r.streams == streams && r.reverse == reverse
        }) {
            Some(row) => row.runs.push(run),
            None => results.throughput.push(ThroughputRow {
                scene,
                target,
                streams,
                reverse,
                runs: vec![run],
            }),
        }
    }
    for (fields, line) in csv_rows(dir, "latency.csv", 8)? {
        let scene = scene_of(&fields[0], &fields[1]).with_context(|| line.clone())?;
        let target = target_of(&fields[2]).with_context(|| line.clone())?;
        let size: usize = fields[3].parse().with_context(|| line.clone())?;
        let mut quantiles = [0.0; 3];
        for (q, field) in quantiles.iter_mut().zip(&fields[5..8]) {
            *q = field.parse().with_context(|| line.clone())?;
        }
        seen.push(scene);
        match results
            .latency
            .iter_mut()
            .find(|r| r.scene == scene && r.target == target && r.size == size)
        {
            Some(row) => row.runs.push(quantiles),
            None => results.latency.push(LatencyRow {
                scene,
                target,
                size,
                runs: vec![quantiles],
            }),
        }
    }
    for (fields, line) in csv_rows(dir, "rate.csv", 6)? {
        let scene = scene_of(&fields[0], &fields[1]).with_context(|| line.clone())?;
        let target = target_of(&fields[2]).with_context(|| line.clone())?;
        let run = (
            fields[4].parse().with_context(|| line.clone())?,
            fields[5].parse().with_context(|| line.clone())?,
        );
        seen.push(scene);
        match results
            .rate
            .iter_mut()
            .find(|r| r.scene == scene && r.target == target)
        {
            Some(row) => row.runs.push(run),
            None => results.rate.push(RateRow {
                scene,
                target,
                runs: vec![run],
            }),
        }
    }
    for (fields, line) in csv_rows(dir, "idle.csv", 6)? {
        let topology = Topology::ALL
            .into_iter()
            .find(|t| t.name() == fields[0])
            .with_context(|| format!("no topology {:?}: {line}", fields[0]))?;
        let relay_rss_mib = match (fields[3].as_str(), fields[4].as_str()) {
            ("", "") => None,
            (rss, before) => Some((
                rss.parse().with_context(|| line.clone())?,
                before.parse().with_context(|| line.clone())?,
            )),
        };
        results.idle.push(IdleRow {
            topology,
            target: target_of(&fields[1]).with_context(|| line.clone())?,
            measured: Ok(IdleMemory {
                connections: fields[2].parse().with_context(|| line.clone())?,
                relay_rss_mib,
                slab_growth_mib: fields[5].parse().with_context(|| line.clone())?,
            }),
        });
    }
    let scenes = Scene::all()
        .into_iter()
        .filter(|s| seen.contains(s))
        .collect();
    Ok((scenes, results))
}

/// The data rows of `dir`/`name`, split into `width` fields, each with its line for errors.
fn csv_rows(dir: &Path, name: &str, width: usize) -> Result<Vec<(Vec<String>, String)>> {
    let path = dir.join(name);
    let text = fs::read_to_string(&path)
        .with_context(|| format!("reading {} (run `cargo xtask bench` first)", path.display()))?;
    text.lines()
        .skip(1)
        .filter(|l| !l.is_empty())
        .map(|line| {
            let fields: Vec<String> = line.split(',').map(str::to_owned).collect();
            if fields.len() != width {
                bail!("{}: expected {width} fields: {line}", path.display());
            }
            Ok((fields, format!("{}: {line}", path.display())))
        })
        .collect()
}

fn scene_of(topology: &str, placement: &str) -> Result<Scene> {
    Scene::all()
        .into_iter()
        .find(|s| s.topology.name() == topology && s.placement.short_name() == placement)
        .with_context(|| format!("no scene {topology} {placement}"))
}

fn target_of(name: &str) -> Result<Target> {
    Target::ALL
        .into_iter()
        .find(|t| t.name() == name)
        .with_context(|| format!("no path named {name:?}"))
}

fn write_csvs(dir: &Path, results: &Results) -> Result<()> {
    let scene_fields = |s: &Scene| format!("{},{}", s.topology.name(), s.placement.short_name());
    let mut csv = String::from(
        "topology,placement,target,streams,direction,run,gbit_per_s,system_cpu_s_per_gb,relay_cpu_s_per_gb\n",
    );
    for r in &results.throughput {
        for (run, t) in r.runs.iter().enumerate() {
            writeln!(
                csv,
                "{},{},{},{},{run},{:.3},{:.3},{:.4}",
                scene_fields(&r.scene),
                r.target.name(),
                r.streams,
                if r.reverse { "u->c" } else { "c->u" },
                t.gbit_per_s,
                t.system_cpu_s_per_gb,
                t.relay_cpu_s_per_gb
            )?;
        }
    }
    fs::write(dir.join("throughput.csv"), csv)?;
    let mut csv = String::from("topology,placement,target,bytes,run,p50_us,p99_us,p999_us\n");
    for r in &results.latency {
        for (run, q) in r.runs.iter().enumerate() {
            writeln!(
                csv,
                "{},{},{},{run},{:.1},{:.1},{:.1}",
                scene_fields(&r.scene),
                r.target.name(),
                r.size,
                q[0],
                q[1],
                q[2]
            )?;
        }
    }
    fs::write(dir.join("latency.csv"), csv)?;
    let mut csv = String::from("topology,placement,target,run,connections_per_s,failed\n");
    for r in &results.rate {
        for (run, (per_second, failed)) in r.runs.iter().enumerate() {
            writeln!(
                csv,
                "{},{},{run},{per_second:.0},{failed}",
                scene_fields(&r.scene),
                r.target.name()
            )?;
        }
    }
    fs::write(dir.join("rate.csv"), csv)?;
    let mut csv = String::from(
        "topology,target,connections,relay_rss_mib,relay_rss_before_mib,slab_growth_mib\n",
    );
    for r in &results.idle {
        if let Ok(m) = &r.measured {
            writeln!(
                csv,
                "{},{},{},{},{:.1}",
                r.topology.name(),
                r.target.name(),
                m.connections,
                m.relay_rss_mib
                    .map_or(",".to_owned(), |(rss, before)| format!(
                        "{rss:.1},{before:.1}"
                    )),
                m.slab_growth_mib
            )?;
        }
    }
    fs::write(dir.join("idle.csv"), csv)?;
    Ok(())
}

/// bench.png: four panels of medians per path, one bar per scene.
fn chart(dir: &Path, plan: &Plan, results: &Results) -> Result<()> {
    let scenes = &plan.scenes;
    let mut data =
        String::from("# path, then per scene: Gbit/s, CPU overhead s/GB, p99 µs, conn/s\n");
    // Medians of one stream, client to upstream: (Gbit/s, system-wide CPU-s/GB).
    let one_stream = |scene: &Scene, target: Target| {
        let runs = results
            .throughput
            .iter()
            .find(|r| r.scene == *scene && r.target == target && r.streams == 1 && !r.reverse)
            .map(|r| r.runs.clone())
            .unwrap_or_default();
        (
            median(runs.iter().map(|t| t.gbit_per_s).collect()),
            median(runs.iter().map(|t| t.system_cpu_s_per_gb).collect()),
        )
    };
    // Whether each panel has a figure to draw: gnuplot fails on a plot with none.
    let mut drawn = [false; 4];
    for &target in &plan.targets {
        let mut row = format!("\"{}\"", target.name());
        let mut cell = |row: &mut String, panel: usize, value: f64| {
            drawn[panel] |= value.is_finite();
            write!(row, "\t{value}")
        };
        for scene in scenes {
            cell(&mut row, 0, one_stream(scene, target).0)?;
        }
        for scene in scenes {
            // The overhead: system-wide CPU per GB over direct's (NaN without it).
            let overhead = if target == Target::Direct {
                f64::NAN
            } else {
                one_stream(scene, target).1 - one_stream(scene, Target::Direct).1
            };
            cell(&mut row, 1, overhead)?;
        }
        for scene in scenes {
            let runs = results
                .latency
                .iter()
                .find(|r| r.scene == *scene && r.target == target && r.size == 1024)
                .map(|r| r.runs.clone())
                .unwrap_or_default();
            cell(&mut row, 2, median(runs.iter().map(|q| q[1]).collect()))?;
        }
        for scene in scenes {
            let runs = results
                .rate
                .iter()
                .find(|r| r.scene == *scene && r.target == target)
                .map(|r| r.runs.clone())
                .unwrap_or_default();
            cell(&mut row, 3, median(runs.iter().map(|r| r.0).collect()))?;
        }
        writeln!(data, "{row}")?;
    }
    fs::write(dir.join("chart.tsv"), data)?;
    let mut script = String::from(
        "set terminal pngcairo size 1600,1100 font \",10\"\n\
         set output 'bench.png'\n\
         set datafile separator \"\\t\"\n\
         set datafile missing \"NaN\"\n\
         set style data histograms\n\
         set style histogram clustered gap 1\n\
         set style fill solid 0.85 border -1\n\
         set grid ytics\n\
         set offsets 0, 0, graph 0.3, 0\n\
         set xtics rotate by -25 scale 0\n\
         set key top right\n",
    );
    writeln!(
        script,
        "set multiplot layout 2,2 title \"ebpf-proxy bench {} (medians; {})\"",
        today(),
        machine()
    )?;
    let panels = [
        "Throughput, 1 stream, client to upstream (Gbit/s)",
        "CPU overhead per GB, same runs: system-wide minus direct's (CPU-s/GB)",
        "p99 latency, 1 KiB request/response (µs)",
        "New connections per second",
    ];
    for (panel, title) in panels.iter().enumerate() {
        writeln!(script, "set title \"{title}\"")?;
        if !drawn[panel] {
            // An empty panel that says why: a plot of a constant outside its own range.
            let why = if panel == 1 {
                "not measured: needs direct in --targets"
            } else {
                "not measured in this run"
            };
            writeln!(
                script,
                "set label 1 \"{why}\" at graph 0.5, 0.5 center\n\
                 unset xtics\nunset ytics\nplot [0:1] [0:1] 2 notitle\n\
                 unset label 1\nset xtics rotate by -25 scale 0\nset ytics"
            )?;
            continue;
        }
        // An overhead can be below zero: within noise of direct's.
        let floor = if panel == 1 { "*" } else { "0" };
        writeln!(script, "set yrange [{floor}:*]")?;
        let plots: Vec<String> = scenes
            .iter()
            .enumerate()
            .map(|(i, scene)| {
                let column = 2 + panel * scenes.len() + i;
                let source = if i == 0 { "'chart.tsv'" } else { "''" };
                let xtic = if i == 0 { ":xtic(1)" } else { "" };
                format!("{source} using {column}{xtic} title \"{}\"", scene.label())
            })
            .collect();
        writeln!(script, "plot {}", plots.join(", "))?;
    }
    script.push_str("unset multiplot\n");
    fs::write(dir.join("chart.gp"), script)?;
    let output = Command::new("gnuplot")
        .arg("chart.gp")
        .current_dir(dir)
        .output()
        .context("running gnuplot (apt-get install gnuplot-nox)")?;
    if !output.status.success() {
        bail!(
            "gnuplot failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}
