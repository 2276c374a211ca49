//! Judges a run against issue 4's targets for kernel mode (`kernel`, and `auto`, the default
//! that ends in it), cell by cell, from the medians of that run: the report's verdict comes
//! from the harness, with the figures behind each "met", not from reading tables by hand.

use std::fmt::Write as _;

use super::{
    Results,
    report::median,
    scene::{Placement, Scene, Topology},
    slow::{self, SlowKind},
    targets::Target,
};

/// The paths judged.
const CANDIDATES: [Target; 2] = [Target::Relay("kernel"), Target::Relay("auto")];
/// The HAProxy paths latency and connection rate must match (each of them).
const HAPROXIES: [Target; 2] = [
    Target::Haproxy { splice: true },
    Target::Haproxy { splice: false },
];
const HAPROXY_SPLICE: Target = Target::Haproxy { splice: true };
/// Throughput at least this multiple of HAProxy splice's.
const OVER_HAPROXY_SPLICE: f64 = 1.2;
/// Throughput at least this fraction of direct's, with the endpoints on different CPUs.
const OF_DIRECT: f64 = 0.9;
/// CPU overhead per GB at most this fraction of HAProxy splice's.
const OVERHEAD_SHARE: f64 = 0.5;
/// Relay RSS with the idle connections open, in MiB.
const IDLE_RSS_MIB: f64 = 64.0;

/// (streams, reverse, label) of the throughput columns.
const DIRECTIONS: [(u32, bool, &str); 4] = [
    (1, false, "1 c->u"),
    (1, true, "1 u->c"),
    (8, false, "8 c->u"),
    (8, true, "8 u->c"),
];

/// One judged cell: whether the target is met, and the figures that say so.
#[derive(Debug, PartialEq)]
struct Judged {
    met: bool,
    detail: String,
}

impl Judged {
    /// Met when every check is; the figures of failed checks are in bold.
    fn of(checks: Vec<(bool, String)>) -> Option<Self> {
        if checks.is_empty() {
            return None;
        }
        let met = checks.iter().all(|(ok, _)| *ok);
        let detail = checks
            .into_iter()
            .map(|(ok, text)| if ok { text } else { format!("**{text}**") })
            .collect::<Vec<_>>()
            .join(", ");
        Some(Self { met, detail })
    }
}

/// Medians of one throughput cell: Gbit/s and system-wide CPU-seconds per GB.
fn throughput(
    results: &Results,
    scene: Scene,
    target: Target,
    streams: u32,
    reverse: bool,
) -> Option<(f64, f64)> {
    let row = results.throughput.iter().find(|r| {
        r.scene == scene && r.target == target && r.streams == streams && r.reverse == reverse
    })?;
    (!row.runs.is_empty()).then(|| {
        (
            median(row.runs.iter().map(|t| t.gbit_per_s).collect()),
            median(row.runs.iter().map(|t| t.system_cpu_s_per_gb).collect()),
        )
    })
}

fn p99(results: &Results, scene: Scene, target: Target, size: usize) -> Option<f64> {
    let row = results
        .latency
        .iter()
        .find(|r| r.scene == scene && r.target == target && r.size == size)?;
    (!row.runs.is_empty()).then(|| median(row.runs.iter().map(|q| q[1]).collect()))
}

fn rate(results: &Results, scene: Scene, target: Target) -> Option<f64> {
    let row = results
        .rate
        .iter()
        .find(|r| r.scene == scene && r.target == target)?;
    (!row.runs.is_empty()).then(|| median(row.runs.iter().map(|r| r.0).collect()))
}

/// Throughput over `baseline`'s, direction by direction, against `least`.
fn throughput_ratio(
    results: &Results,
    scene: Scene,
    candidate: Target,
    baseline: Target,
    least: f64,
) -> Option<Judged> {
    let checks = DIRECTIONS
        .iter()
        .filter_map(|&(streams, reverse, label)| {
            let (ours, _) = throughput(results, scene, candidate, streams, reverse)?;
            let (theirs, _) = throughput(results, scene, baseline, streams, reverse)?;
            let ratio = ours / theirs;
            Some((
                ratio >= least,
                format!("{label} {}x", figures(ratio, least, 2).0),
            ))
        })
        .collect();
    Judged::of(checks)
}

/// The CPU overhead: system-wide CPU-seconds per GB (softirq and the kernel's
/// redirect worker included) minus direct's, against a share of HAProxy splice's overhead.
/// The relay process's own CPU would leave out exactly the work kernel mode moves into the
/// kernel.
fn cpu_overhead(results: &Results, scene: Scene, candidate: Target) -> Option<Judged> {
    let checks = DIRECTIONS
        .iter()
        .filter_map(|&(streams, reverse, label)| {
            let overhead = |target| {
                let (_, direct) = throughput(results, scene, Target::Direct, streams, reverse)?;
                let (_, system) = throughput(results, scene, target, streams, reverse)?;
                Some(system - direct)
            };
            let ours = overhead(candidate)?;
            let allowed = OVERHEAD_SHARE * overhead(HAPROXY_SPLICE)?;
            Some(at_most(label, ours, allowed, 2, ""))
        })
        .collect();
    Judged::of(checks)
}

/// p99 against the lower of the HAProxy paths' p99.
fn latency(results: &Results, scene: Scene, candidate: Target) -> Option<Judged> {
    let checks = [(1, "1 B"), (1024, "1 KiB")]
        .iter()
        .filter_map(|&(size, label)| {
            let ours = p99(results, scene, candidate, size)?;
            let best = HAPROXIES
                .iter()
                .filter_map(|&h| p99(results, scene, h, size))
                .reduce(f64::min)?;
            Some(at_most(label, ours, best, 0, " µs"))
        })
        .collect();
    Judged::of(checks)
}

/// New connections per second against the higher of the HAProxy paths' rate.
fn connection_rate(results: &Results, scene: Scene, candidate: Target) -> Option<Judged> {
    let ours = rate(results, scene, candidate)?;
    let best = HAPROXIES
        .iter()
        .filter_map(|&h| rate(results, scene, h))
        .reduce(f64::max)?;
    let ok = ours >= best;
    let relation = if ok { "≥" } else { "<" };
    let ratio = ours / best;
    let (ours, best) = figures(ours, best, 0);
    Judged::of(vec![(
        ok,
        format!("{ours}/s {relation} {best}/s ({ratio:.2}x)"),
    )])
}

fn idle_rss(results: &Results, topology: Topology, candidate: Target) -> Option<Judged> {
    let measured = results
        .idle
        .iter()
        .find(|r| r.topology == topology && r.target == candidate)?
        .measured
        .as_ref()
        .ok()?;
    let (rss, _) = measured.relay_rss_mib?;
    let ok = rss < IDLE_RSS_MIB;
    let relation = if ok { "<" } else { "≥" };
    Judged::of(vec![(
        ok,
        format!(
            "{rss:.1} MiB {relation} {IDLE_RSS_MIB:.0} with {} open",
            measured.connections
        ),
    )])
}

/// Memory held for slow clients, each kind against HAProxy's for the same clients.
fn slow_clients(results: &Results, topology: Topology, candidate: Target) -> Option<Judged> {
    let checks = SlowKind::ALL
        .into_iter()
        .filter_map(|kind| {
            let held = slow::against_haproxy(results, topology, candidate, kind)?;
            Some(at_most(kind.key(), held.ours, held.haproxy, 0, " MiB"))
        })
        .collect();
    Judged::of(checks)
}

/// `ours` and `bound` with `decimals` or more, as many as it takes for them to compare as
/// they are (0.572 against 0.566, not 0.57 against 0.57).
fn figures(ours: f64, bound: f64, decimals: usize) -> (String, String) {
    let mut decimals = decimals;
    loop {
        let shown = (format!("{ours:.decimals$}"), format!("{bound:.decimals$}"));
        let read = (
            shown.0.parse().unwrap_or(ours),
            shown.1.parse().unwrap_or(bound),
        );
        if read.0.total_cmp(&read.1) == ours.total_cmp(&bound) || decimals >= 4 {
            return shown;
        }
        decimals += 1;
    }
}

/// One upper-bound check: whether `ours` stays within `bound`, and how the cell reads it.
fn at_most(label: &str, ours: f64, bound: f64, decimals: usize, unit: &str) -> (bool, String) {
    let ok = ours <= bound;
    let relation = if ok { "≤" } else { ">" };
    let (ours, bound) = figures(ours, bound, decimals);
    (ok, format!("{label} {ours} {relation} {bound}{unit}"))
}

/// The verdict section of the report: one row per target and path judged, one column per
/// scene.
pub fn markdown(scenes: &[Scene], results: &Results) -> String {
    type Check = fn(&Results, Scene, Target) -> Option<Judged>;
    let rows: [(&str, Check); 7] = [
        ("throughput ≥ 1.2x HAProxy splice", |r, s, c| {
            throughput_ratio(r, s, c, HAPROXY_SPLICE, OVER_HAPROXY_SPLICE)
        }),
        ("throughput ≥ 0.9x direct (endpoints apart)", |r, s, c| {
            if s.placement == Placement::Spread {
                throughput_ratio(r, s, c, Target::Direct, OF_DIRECT)
            } else {
                None
            }
        }),
        ("CPU overhead/GB ≤ half of HAProxy splice's", cpu_overhead),
        ("p99 ≤ HAProxy's (both)", latency),
        ("connection rate ≥ HAProxy's (both)", connection_rate),
        (
            "idle connections (10,000 asked): relay RSS < 64 MiB",
            |r, s, c| {
                // Measured once per topology, in the spread placement.
                if s.placement == Placement::Spread {
                    idle_rss(r, s.topology, c)
                } else {
                    None
                }
            },
        ),
        (
            "slow clients: memory held over direct ≤ HAProxy's",
            |r, s, c| {
                // Measured once per topology, in the spread placement.
                if s.placement == Placement::Spread {
                    slow_clients(r, s.topology, c)
                } else {
                    None
                }
            },
        ),
    ];
    let mut md = String::new();
    let _ = writeln!(
        md,
        "\n#### Against the targets\n\n\
         Medians of this run. Throughput: each direction (streams, direction) over the other path. \
         CPU overhead: system-wide CPU-seconds per GB minus direct's, against half of HAProxy \
         splice's; it counts the kernel's softirq and redirect-worker time, which the relay \
         process's own CPU leaves out. p99 and connection rate: against the better of HAProxy \
         with and without splice. Slow clients: memory held over direct's, against \
         HAProxy's without splice. Figures that miss are in bold.\n"
    );
    let _ = writeln!(
        md,
        "| target | path | {} |",
        scenes
            .iter()
            .map(Scene::label)
            .collect::<Vec<_>>()
            .join(" | ")
    );
    let _ = writeln!(md, "|---|---|{}", "---|".repeat(scenes.len()));
    for (name, check) in rows {
        for candidate in CANDIDATES {
            let cells: Vec<Option<Judged>> = scenes
                .iter()
                .map(|&s| check(results, s, candidate))
                .collect();
            if cells.iter().all(Option::is_none) {
                continue;
            }
            let cells: Vec<String> = cells
                .into_iter()
                .map(|cell| match cell {
                    Some(j) if j.met => format!("met: {}", j.detail),
                    Some(j) => format!("**not met**: {}", j.detail),
                    None => "-".to_owned(),
                })
                .collect();
            let _ = writeln!(
                md,
                "| {name} | {} | {} |",
                candidate.key(),
                cells.join(" | ")
            );
        }
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::{
        LatencyRow, RateRow, ThroughputRow, Transfer,
        slow::{Run, SlowRow},
    };

    const SCENE: Scene = Scene {
        topology: Topology::Loopback,
        placement: Placement::OneCpu,
    };
    const KERNEL: Target = Target::Relay("kernel");

    fn transfers(results: &mut Results, target: Target, gbit: f64, system: f64) {
        for (streams, reverse, _) in DIRECTIONS {
            results.throughput.push(ThroughputRow {
                scene: SCENE,
                target,
                streams,
                reverse,
                // The median is the middle run, whatever the others.
                runs: [gbit * 0.1, gbit, gbit * 10.0]
                    .map(|gbit_per_s| Transfer {
                        gbit_per_s,
                        system_cpu_s_per_gb: system,
                        relay_cpu_s_per_gb: 0.0,
                    })
                    .to_vec(),
            });
        }
    }

    #[test]
    fn throughput_is_judged_on_medians_direction_by_direction() {
        let mut results = Results::default();
        transfers(&mut results, KERNEL, 12.0, 1.0);
        transfers(&mut results, HAPROXY_SPLICE, 10.0, 1.0);
        let judged = throughput_ratio(&results, SCENE, KERNEL, HAPROXY_SPLICE, 1.2).unwrap();
        assert!(judged.met, "{judged:?}");
        results.throughput[1].runs[1].gbit_per_s = 11.9;
        let judged = throughput_ratio(&results, SCENE, KERNEL, HAPROXY_SPLICE, 1.2).unwrap();
        assert!(!judged.met);
        assert!(
            judged.detail.contains("**1 u->c 1.19x**"),
            "{}",
            judged.detail
        );
    }

    #[test]
    fn cpu_overhead_is_system_cpu_over_direct() {
        let mut results = Results::default();
        transfers(&mut results, Target::Direct, 20.0, 0.5);
        transfers(&mut results, HAPROXY_SPLICE, 6.0, 1.3);
        // 0.85 - 0.5 = 0.35 against half of 1.3 - 0.5: met.
        transfers(&mut results, KERNEL, 8.0, 0.85);
        assert!(cpu_overhead(&results, SCENE, KERNEL).unwrap().met);
        let last = results.throughput.len() - 1;
        for run in &mut results.throughput[last].runs {
            run.system_cpu_s_per_gb = 0.95;
        }
        let judged = cpu_overhead(&results, SCENE, KERNEL).unwrap();
        assert!(!judged.met);
        assert!(
            judged.detail.contains("**8 u->c 0.45 > 0.40**"),
            "{}",
            judged.detail
        );
        assert!(
            judged.detail.starts_with("1 c->u 0.35 ≤ 0.40"),
            "{}",
            judged.detail
        );
    }

    #[test]
    fn latency_and_rate_must_match_both_haproxies() {
        let mut results = Results::default();
        for (target, p99_us, per_second) in [
            (KERNEL, 90.0, 3000.0),
            (HAPROXIES[0], 95.0, 2900.0),
            (HAPROXIES[1], 85.0, 3100.0),
        ] {
            for size in [1, 1024] {
                results.latency.push(LatencyRow {
                    scene: SCENE,
                    target,
                    size,
                    runs: vec![[0.0, p99_us, 0.0]],
                });
            }
            results.rate.push(RateRow {
                scene: SCENE,
                target,
                runs: vec![(per_second, 0)],
            });
        }
        assert!(!latency(&results, SCENE, KERNEL).unwrap().met);
        assert!(!connection_rate(&results, SCENE, KERNEL).unwrap().met);
        results.latency.retain(|r| r.target != HAPROXIES[1]);
        results.rate.retain(|r| r.target != HAPROXIES[1]);
        assert!(latency(&results, SCENE, KERNEL).unwrap().met);
        assert!(connection_rate(&results, SCENE, KERNEL).unwrap().met);
    }

    #[test]
    fn slow_clients_are_judged_over_direct_against_haproxy() {
        let mut results = Results::default();
        let mut falls = |target, kind, runs: Vec<f64>| {
            results.slow.push(SlowRow {
                topology: Topology::Loopback,
                target,
                kind,
                clients: 100,
                runs: Ok(runs
                    .into_iter()
                    .map(|fall_mib| Run {
                        fall_mib,
                        ends_mib: 0.0,
                        resets: 0,
                    })
                    .collect()),
            });
        };
        falls(Target::Direct, SlowKind::Readers, vec![100.0]);
        falls(Target::Direct, SlowKind::NeverReaders, vec![400.0]);
        falls(slow::HAPROXY, SlowKind::Readers, vec![300.0]);
        falls(slow::HAPROXY, SlowKind::NeverReaders, vec![900.0]);
        // Medians: 290 and 950, so 190 over direct against 200, and 550 against 500.
        falls(KERNEL, SlowKind::Readers, vec![900.0, 290.0, 10.0]);
        falls(KERNEL, SlowKind::NeverReaders, vec![950.0]);
        let judged = slow_clients(&results, Topology::Loopback, KERNEL).unwrap();
        assert!(!judged.met);
        assert_eq!(
            judged.detail,
            "slow-readers 190 ≤ 200 MiB, **never-readers 550 > 500 MiB**"
        );
        // Without direct, the whole falls compare.
        results.slow.retain(|r| r.target != Target::Direct);
        let judged = slow_clients(&results, Topology::Loopback, KERNEL).unwrap();
        assert_eq!(
            judged.detail,
            "slow-readers 290 ≤ 300 MiB, **never-readers 950 > 900 MiB**"
        );
        assert_eq!(slow_clients(&results, Topology::Namespaces, KERNEL), None);
    }

    #[test]
    fn figures_that_round_together_get_more_decimals() {
        let pair = |a: &str, b: &str| (a.to_owned(), b.to_owned());
        assert_eq!(figures(0.572, 0.566, 2), pair("0.572", "0.566"));
        assert_eq!(figures(0.45, 0.40, 2), pair("0.45", "0.40"));
        assert_eq!(figures(1.199, 1.2, 2), pair("1.199", "1.200"));
        assert_eq!(figures(1.2, 1.2, 2), pair("1.20", "1.20"));
    }

    #[test]
    fn a_cell_without_its_baseline_is_not_judged() {
        let mut results = Results::default();
        transfers(&mut results, KERNEL, 12.0, 1.0);
        assert_eq!(
            throughput_ratio(&results, SCENE, KERNEL, HAPROXY_SPLICE, 1.2),
            None
        );
        assert!(
            markdown(&[SCENE], &results)
                .lines()
                .all(|l| !l.contains("| kernel |"))
        );
    }
}
