//! bench.png: the run's medians drawn by gnuplot.

use std::{fmt::Write as _, fs, path::Path, process::Command};

use anyhow::{Context as _, Result, bail};

use super::{
    Plan, Results,
    report::{machine, median, today},
    scene::Scene,
    targets::Target,
};

/// bench.png: four panels of medians per path, one bar per scene.
pub(super) fn chart(dir: &Path, plan: &Plan, results: &Results) -> Result<()> {
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
            let runs = results.latency_runs(scene, target, 1024);
            cell(&mut row, 2, median(runs.iter().map(|q| q[1]).collect()))?;
        }
        for scene in scenes {
            let runs = results.rate_runs(scene, target);
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
