//! `cargo xtask bench`: iperf3 directly, through each ebpf-proxy data plane, and through the
//! alternatives (HAProxy with and without splice, socat, a tokio copy_bidirectional relay),
//! side by side in one run, with system-wide CPU per GB from /proc/stat and each relay's
//! own CPU. Still to come: namespaces, CPU placements, latency, connection rate, idle memory.

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
    Haproxy { splice: bool },
    Socat,
    Tokio,
}

impl Target {
    fn name(self) -> String {
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

struct Sample {
    gbit_per_s: f64,
    cpu_s_per_gb: f64,
    relay_cpu_s_per_gb: f64,
}

pub fn bench(root: &Path, binary: &Path, tokio_relay: &Path, quick: bool) -> Result<()> {
    ensure_tools(&["iperf3", "haproxy", "socat"])?;
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
        Target::Haproxy { splice: true },
        Target::Haproxy { splice: false },
        Target::Socat,
        Target::Tokio,
    ];
    let scratch = root.join("target/bench");
    fs::create_dir_all(&scratch)?;
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
                let sample = measure(binary, tokio_relay, &scratch, target, reverse, seconds)?;
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
                _ => format!("{relay_cpu:.3}"),
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

fn measure(
    binary: &Path,
    tokio_relay: &Path,
    scratch: &Path,
    target: Target,
    reverse: bool,
    seconds: u32,
) -> Result<Sample> {
    let mut relay = match target {
        Target::Direct => None,
        Target::Relay(plane) => Some(start_relay(binary, plane)?),
        other => Some(start_alternative(other, tokio_relay, scratch)?),
    };
    let port = if relay.is_some() {
        RELAY_PORT
    } else {
        SERVER_PORT
    };
    let relay_ticks_before = relay.as_ref().map_or(0, |r| tree_ticks(r.id()));
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
    let relay_ticks = relay.as_ref().map_or(0, |r| {
        // socat serves each connection in a child: let them exit and be counted.
        let deadline = Instant::now() + Duration::from_secs(1);
        while !children(r.id()).is_empty() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        tree_ticks(r.id()) - relay_ticks_before
    });
    if let Some(relay) = relay.take() {
        stop(relay, target);
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

/// Installs the Debian packages of the commands the bench runs, when one is missing.
fn ensure_tools(commands: &[&str]) -> Result<()> {
    let missing: Vec<&str> = commands
        .iter()
        .copied()
        .filter(|c| {
            Command::new("sh")
                .args(["-c", &format!("command -v {c}")])
                .output()
                .map_or(true, |o| !o.status.success())
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    println!("installing {} with apt-get", missing.join(" "));
    let status = Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("apt-get")?;
    if !status.success() {
        bail!(
            "could not install {}: run apt-get update, or install them yourself",
            missing.join(" ")
        );
    }
    Ok(())
}

/// Starts HAProxy, socat or the tokio relay on RELAY_PORT, forwarding to SERVER_PORT.
fn start_alternative(target: Target, tokio_relay: &Path, scratch: &Path) -> Result<Child> {
    let listen = format!("127.0.0.1:{RELAY_PORT}");
    let upstream = format!("127.0.0.1:{SERVER_PORT}");
    let mut command = match target {
        Target::Haproxy { splice } => {
            // Debian's HAProxy 2.6, tcp mode, one thread per CPU (its default).
            let config = scratch.join(format!("haproxy-{splice}.cfg"));
            fs::write(
                &config,
                format!(
                    "global\n  maxconn 1000\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 1m\n  timeout server 1m\n{}\
                     frontend f\n  bind {listen}\n  default_backend b\nbackend b\n  server s {upstream}\n",
                    if splice { "  option splice-auto\n" } else { "" }
                ),
            )?;
            let mut command = Command::new("haproxy");
            command.arg("-db").arg("-f").arg(config);
            command
        }
        Target::Socat => {
            let mut command = Command::new("socat");
            command.args([
                format!("TCP-LISTEN:{RELAY_PORT},bind=127.0.0.1,reuseaddr,fork"),
                format!("TCP:{upstream}"),
            ]);
            command
        }
        Target::Tokio => {
            let mut command = Command::new(tokio_relay);
            command.args(["tokio-relay", &listen, &upstream]);
            command
        }
        Target::Direct | Target::Relay(_) => unreachable!("not an alternative"),
    };
    let child = command
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {} (apt-get install haproxy socat)", target.name()))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !is_listening(RELAY_PORT) {
        if Instant::now() > deadline {
            bail!("{} did not listen on {listen}", target.name());
        }
        thread::sleep(Duration::from_millis(20));
    }
    Ok(child)
}

/// Stops a relay and waits until its port is free. ebpf-proxy closes at once on SIGINT
/// (SIGTERM would drain); the others stop on SIGTERM, and a shell that started this bench in
/// the background makes them ignore SIGINT. SIGKILL after 5 s, whatever happens.
fn stop(mut relay: Child, target: Target) {
    let signal = match target {
        Target::Relay(_) => libc::SIGINT,
        _ => libc::SIGTERM,
    };
    // SAFETY: signalling our own child.
    unsafe { libc::kill(relay.id() as i32, signal) };
    let deadline = Instant::now() + Duration::from_secs(5);
    while matches!(relay.try_wait(), Ok(None)) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(10));
    }
    let _ = relay.kill();
    let _ = relay.wait();
    wait_until_closed(RELAY_PORT);
}

/// True when a socket listens on 127.0.0.1:`port` (per /proc/net/tcp).
fn is_listening(port: u16) -> bool {
    let wanted = format!("0100007F:{port:04X}");
    fs::read_to_string("/proc/net/tcp").is_ok_and(|table| {
        table.lines().any(|l| {
            let fields: Vec<&str> = l.split_whitespace().collect();
            fields.len() > 3 && fields[1] == wanted && fields[3] == "0A"
        })
    })
}

/// Waits (up to 5 s) until nothing listens on `port`, so the next target can bind it.
fn wait_until_closed(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while is_listening(port) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
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

/// Fields of /proc/PID/stat after the command name (state is index 0).
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

/// CPU ticks of a process, its reaped children (cutime, cstime) and its live children.
fn tree_ticks(pid: u32) -> u64 {
    let own = stat_fields(pid);
    let field = |fields: &[u64], i: usize| fields.get(i).copied().unwrap_or(0);
    let live: u64 = children(pid)
        .into_iter()
        .map(|child| {
            let f = stat_fields(child);
            field(&f, 11) + field(&f, 12)
        })
        .sum();
    field(&own, 11) + field(&own, 12) + field(&own, 13) + field(&own, 14) + live
}

/// Live child processes of `pid`.
fn children(pid: u32) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&p| stat_fields(p).get(1).copied() == Some(u64::from(pid)))
        .collect()
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) as f64 }
}
