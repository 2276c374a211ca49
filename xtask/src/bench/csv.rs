//! The bench's CSVs in target/bench, one per workload with every run: written after a run,
//! and read back by `cargo xtask bench --verdict` to judge that run again.

use std::{fmt::Write as _, fs, path::Path};

use anyhow::{Context as _, Result, bail};

use super::{
    IdleMemory, IdleRow, LatencyRow, RateRow, Results, ThroughputRow, Transfer,
    scene::{Placement, Scene, Topology},
    slow::{Run, SlowKind, SlowRow},
    targets::Target,
    verdict,
};

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
        let topology = topology_of(&fields[0]).with_context(|| line.clone())?;
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
    // Runs before the slow-clients workload wrote no slow.csv.
    let slow_rows = if dir.join("slow.csv").exists() {
        csv_rows(dir, "slow.csv", 8)?
    } else {
        Vec::new()
    };
    for (fields, line) in slow_rows {
        let topology = topology_of(&fields[0]).with_context(|| line.clone())?;
        let target = target_of(&fields[1]).with_context(|| line.clone())?;
        let kind = SlowKind::ALL
            .into_iter()
            .find(|k| k.key() == fields[2])
            .with_context(|| format!("no workload {:?}: {line}", fields[2]))?;
        let clients = fields[3].parse().with_context(|| line.clone())?;
        let fall = Run {
            fall_mib: fields[5].parse().with_context(|| line.clone())?,
            ends_mib: fields[6].parse().with_context(|| line.clone())?,
            resets: fields[7].parse().with_context(|| line.clone())?,
        };
        seen.push(Scene {
            topology,
            placement: Placement::Spread,
        });
        match results
            .slow
            .iter_mut()
            .find(|r| r.topology == topology && r.target == target && r.kind == kind)
        {
            Some(SlowRow { runs: Ok(runs), .. }) => runs.push(fall),
            _ => results.slow.push(SlowRow {
                topology,
                target,
                kind,
                clients,
                runs: Ok(vec![fall]),
            }),
        }
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

fn topology_of(name: &str) -> Result<Topology> {
    Topology::ALL
        .into_iter()
        .find(|t| t.name() == name)
        .with_context(|| format!("no topology {name:?}"))
}

fn target_of(name: &str) -> Result<Target> {
    Target::ALL
        .into_iter()
        .find(|t| t.name() == name)
        .with_context(|| format!("no path named {name:?}"))
}

pub(super) fn write_csvs(dir: &Path, results: &Results) -> Result<()> {
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
    let mut csv =
        String::from("topology,target,workload,clients,run,available_fall_mib,ends_mib,resets\n");
    for r in &results.slow {
        for (run, fall) in r.runs.iter().flatten().enumerate() {
            writeln!(
                csv,
                "{},{},{},{},{run},{:.1},{:.1},{}",
                r.topology.name(),
                r.target.name(),
                r.kind.key(),
                r.clients,
                fall.fall_mib,
                fall.ends_mib,
                fall.resets
            )?;
        }
    }
    fs::write(dir.join("slow.csv"), csv)?;
    Ok(())
}
