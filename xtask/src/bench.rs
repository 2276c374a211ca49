//! `cargo xtask bench`: iperf3 through each data plane and directly, side by side in one
//! run, with system-wide CPU per GB from /proc/stat. The start of the full harness
//! (HAProxy, socat, namespaces, latency, connection rate and idle memory are still to come).

use std::{
    fmt::Write as _,
    fs,
    io::{BufRead, BufReader},
    path::Path,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

const SERVER_PORT: u16 = 15201;
const RELAY_PORT: u16 = 15200;

#[derive(Clone, Copy)]
enum Target {
    Direct,
    Relay(&'static str),
}

impl Target {
    fn name(self) -> String {
        match self {
            Self::Direct => "direct".into(),
            Self::Relay(plane) => format!("ebpf-proxy {plane}"),
        }
    }
}

struct Sample {
    gbit_per_s: f64,
    cpu_s_per_gb: f64,
    relay_cpu_s_per_gb: f64,
}

pub fn bench(root: &Path, binary: &Path, quick: bool) -> Result<()> {
    let (runs, seconds) = if quick { (3, 2) } else { (5, 8) };
    let mut server = Command::new("iperf3")
        .args(["-s", "-p", &SERVER_PORT.to_string(), "-B", "127.0.0.1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("iperf3 is needed: apt-get install iperf3")?;
    thread::sleep(Duration::from_millis(300));
    let targets = [
        Target::Direct,
        Target::Relay("kernel"),
        Target::Relay("splice"),
        Target::Relay("copy"),
    ];
    let mut table = String::new();
    let mut csv =
        String::from("target,direction,run,gbit_per_s,system_cpu_s_per_gb,relay_cpu_s_per_gb\n");
    writeln!(
        table,
        "| path | direction | Gbit/s median (min-max) | system CPU-s/GB median | relay process CPU-s/GB median |"
    )?;
    writeln!(table, "|---|---|---|---|---|")?;
    for target in targets {
        for (direction, reverse) in [("client->upstream", false), ("upstream->client", true)] {
            let mut samples = Vec::new();
            for run in 0..runs {
                let sample = measure(binary, target, reverse, seconds)?;
                writeln!(
                    csv,
                    "{},{direction},{run},{:.3},{:.3},{:.4}",
                    target.name(),
                    sample.gbit_per_s,
                    sample.cpu_s_per_gb,
                    sample.relay_cpu_s_per_gb
                )?;
                samples.push(sample);
            }
            let stat = |f: fn(&Sample) -> f64| {
                let mut v: Vec<f64> = samples.iter().map(f).collect();
                v.sort_by(f64::total_cmp);
                (v[v.len() / 2], v[0], v[v.len() - 1])
            };
            let (gbit, lo, hi) = stat(|s| s.gbit_per_s);
            let (cpu, _, _) = stat(|s| s.cpu_s_per_gb);
            let (relay_cpu, _, _) = stat(|s| s.relay_cpu_s_per_gb);
            let relay_cpu = match target {
                Target::Direct => "-".to_owned(),
                Target::Relay(_) => format!("{relay_cpu:.3}"),
            };
            writeln!(
                table,
                "| {} | {direction} | {gbit:.2} ({lo:.2}-{hi:.2}) | {cpu:.2} | {relay_cpu} |",
                target.name()
            )?;
        }
    }
    let _ = server.kill();
    let _ = server.wait();
    let out = root.join("target/bench");
    fs::create_dir_all(&out)?;
    fs::write(out.join("iperf3.csv"), &csv)?;
    fs::write(out.join("iperf3.md"), &table)?;
    println!(
        "one iperf3 stream over loopback, {runs} runs of {seconds} s each, {} CPUs\n\n{table}\nwritten to target/bench/iperf3.md and iperf3.csv",
        thread::available_parallelism().map_or(0, |n| n.get())
    );
    Ok(())
}

fn measure(binary: &Path, target: Target, reverse: bool, seconds: u32) -> Result<Sample> {
    let mut relay = match target {
        Target::Direct => None,
        Target::Relay(plane) => Some(start_relay(binary, plane)?),
    };
    let port = if relay.is_some() {
        RELAY_PORT
    } else {
        SERVER_PORT
    };
    let relay_ticks_before = relay.as_ref().map_or(0, |r| process_ticks(r.id()));
    let cpu_before = system_busy_ticks()?;
    let started = Instant::now();
    let mut client = Command::new("iperf3");
    client.args([
        "-c",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-t",
        &seconds.to_string(),
        "-J",
    ]);
    if reverse {
        client.arg("-R");
    }
    let output = client.output().context("running iperf3")?;
    let wall = started.elapsed();
    let cpu_ticks = system_busy_ticks()? - cpu_before;
    let relay_ticks = relay
        .as_ref()
        .map_or(0, |r| process_ticks(r.id()) - relay_ticks_before);
    if let Some(mut relay) = relay.take() {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(relay.id() as i32, libc::SIGTERM) };
        let _ = relay.wait();
    }
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).with_context(|| {
        format!(
            "iperf3 printed no JSON: {}",
            String::from_utf8_lossy(&output.stderr)
        )
    })?;
    if let Some(error) = report.get("error") {
        bail!("iperf3 failed: {error}");
    }
    let received = &report["end"]["sum_received"];
    let bytes = received["bytes"].as_f64().context("iperf3 bytes")?;
    let gbit_per_s = received["bits_per_second"]
        .as_f64()
        .context("iperf3 rate")?
        / 1e9;
    let hz = clock_ticks_per_second();
    let gb = bytes / 1e9;
    let _ = wall;
    Ok(Sample {
        gbit_per_s,
        cpu_s_per_gb: cpu_ticks as f64 / hz / gb,
        relay_cpu_s_per_gb: relay_ticks as f64 / hz / gb,
    })
}

fn start_relay(binary: &Path, plane: &str) -> Result<Child> {
    let forward = format!("127.0.0.1:{RELAY_PORT}=127.0.0.1:{SERVER_PORT}");
    let mut child = Command::new(binary)
        .args(["--forward", &forward, "--dataplane", plane])
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .context("starting ebpf-proxy")?;
    let stderr = child.stderr.take().context("relay stderr")?;
    let mut lines = BufReader::new(stderr).lines();
    loop {
        match lines.next() {
            Some(Ok(line)) if line.contains("listening on") => break,
            Some(Ok(_)) => {}
            _ => bail!("ebpf-proxy --dataplane {plane} did not start"),
        }
    }
    // Keep draining the log so the relay never blocks on a full pipe.
    thread::spawn(move || lines.for_each(drop));
    Ok(child)
}

/// Busy jiffies of all CPUs (everything but idle and iowait), softirq included.
fn system_busy_ticks() -> Result<u64> {
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

fn process_ticks(pid: u32) -> u64 {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    let Some(end) = stat.rfind(')') else { return 0 };
    let fields: Vec<&str> = stat[end + 2..].split_whitespace().collect();
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    field(11) + field(12)
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) as f64 }
}
