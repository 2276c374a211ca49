//! Developer and operator commands: `cargo xtask build | build-and-run | test | soak | fuzz |
//! bench | dist | image`.

mod bench;
mod dist;
mod fuzz;
mod image;
mod layers;
mod manifests;
mod packages;
mod toolchain;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Build, run and test ebpf-proxy")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Bootstrap the eBPF toolchain if needed, build the eBPF object, then the release binary
    /// with the object embedded.
    Build,
    /// Build, then run `ebpf-proxy ARGS` (through sudo when not root).
    BuildAndRun {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build, then run every test: host unit tests and the real-kernel integration tests.
    Test {
        /// Extra arguments for the integration test binary (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build, then soak the kernel data plane: many connections of random sizes with
    /// half-closes, resets and dying upstreams; every byte checked, nothing left behind.
    Soak {
        #[arg(long, default_value_t = 10_000)]
        connections: u32,
        #[arg(long, default_value_t = 10.0)]
        minutes: f64,
        /// Largest transfer per direction, in MiB.
        #[arg(long, default_value_t = 16)]
        max_mib: u32,
        /// Connections in flight at once.
        #[arg(long, default_value_t = 64)]
        concurrency: u32,
        /// Run the relay with this per-flow backlog limit in bytes (65536 or more; the
        /// default is 16 MiB), so that loopback-fast flows detach from the kernel and resume
        /// over and over; the soak then fails unless they did.
        #[arg(long)]
        backlog_limit: Option<u64>,
    },
    /// Build the release archive: a static x86_64 binary with the eBPF object embedded, the
    /// systemd unit, the preset and the README, in target/dist/.
    Dist,
    /// Build the OCI image localhost/ebpf-proxy:latest from scratch with podman, and check
    /// that it relays in kernel mode on the host network.
    Image,
    /// Run each cargo-fuzz target (PROXY header parser, config loader) for a while.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u32,
    },
    /// A plain tokio copy_bidirectional relay, the bench's baseline.
    #[command(hide = true)]
    TokioRelay { listen: String, upstream: String },
    /// The bench's echo server.
    #[command(hide = true)]
    BenchEcho { listen: String },
    /// The bench's server that pushes to every client as fast as it reads.
    #[command(hide = true)]
    BenchPush { listen: String },
    /// The bench's latency, connection-rate and idle-connection clients.
    #[command(hide = true, subcommand)]
    BenchProbe(bench::Probe),
    /// Build, then measure throughput, CPU, latency, connection rate, idle memory and the
    /// memory held for slow clients directly, through each data plane and through HAProxy,
    /// socat and tokio, side by side.
    Bench {
        /// One short run of everything (a smoke check of the harness, not figures to quote).
        #[arg(long)]
        quick: bool,
        /// Runs per measurement (default 5; 1 with --quick).
        #[arg(long)]
        runs: Option<u32>,
        /// Seconds per iperf3 run (default 3; 1 with --quick).
        #[arg(long)]
        seconds: Option<u32>,
        /// Only these paths (comma-separated): direct, kernel, auto, splice, copy,
        /// haproxy-splice, haproxy, socat, tokio. Default: all.
        #[arg(long, value_delimiter = ',')]
        targets: Vec<String>,
        /// Only these scenes (comma-separated): loopback-spread, loopback-one-cpu,
        /// namespaces-spread, namespaces-one-cpu. Default: all.
        #[arg(long, value_delimiter = ',')]
        scenes: Vec<String>,
        /// Only these workloads (comma-separated): throughput, latency, rate, idle,
        /// slow-clients. Default: all.
        #[arg(long, value_delimiter = ',')]
        workloads: Vec<String>,
        /// In namespaces with the endpoints apart, receive the relay's packets on a CPU
        /// picked by flow hash (RPS on its veth ends), as a server's multi-queue NIC does,
        /// instead of on the CPU that sent them.
        #[arg(long)]
        rps: bool,
        /// Measure nothing: judge the CSVs of the last run in target/bench against the
        /// targets for kernel mode again (prints it and writes target/bench/verdict.md).
        #[arg(long)]
        verdict: bool,
    },
}

fn main() -> Result<()> {
    let root = workspace_root();
    match Cli::parse().command {
        Task::Fuzz { seconds } => fuzz::fuzz(&root, seconds),
        Task::TokioRelay { listen, upstream } => bench::tokio_relay(&listen, &upstream),
        Task::BenchEcho { listen } => bench::echo_server(&listen),
        Task::BenchPush { listen } => bench::push_server(&listen),
        Task::BenchProbe(probe) => bench::probe(probe),
        Task::Soak {
            connections,
            minutes,
            max_mib,
            concurrency,
            backlog_limit,
        } => {
            let binary = build(&root)?;
            let object = toolchain::ebpf_object(&root);
            let mut soak = host_cargo(&object);
            if let Some(bytes) = backlog_limit {
                soak.env("SOAK_BACKLOG_LIMIT", bytes.to_string());
            }
            run(soak
                .args(["test", "--release", "--package", "integration-tests"])
                .args(["--test", "integration", "--", "--exact"])
                .args([
                    "soak_keeps_every_byte_and_leaks_nothing::kernel",
                    "--nocapture",
                ])
                .env("EBPF_PROXY_BIN", &binary)
                .env("PROXY_REQUIRE_BPF", "1")
                .env("SOAK_CONNECTIONS", connections.to_string())
                .env("SOAK_MINUTES", minutes.to_string())
                .env("SOAK_MAX_MIB", max_mib.to_string())
                .env("SOAK_CONCURRENCY", concurrency.to_string())
                .current_dir(&root))
        }
        Task::Build => {
            let binary = build(&root)?;
            println!(
                "{}",
                binary.strip_prefix(&root).unwrap_or(&binary).display()
            );
            Ok(())
        }
        Task::BuildAndRun { args } => {
            let binary = build(&root)?;
            let mut command = if is_root() {
                Command::new(&binary)
            } else {
                let mut sudo = Command::new("sudo");
                sudo.arg(&binary);
                sudo
            };
            let status = command
                .args(&args)
                .status()
                .context("starting ebpf-proxy")?;
            std::process::exit(status.code().unwrap_or(1));
        }
        Task::Test { args } => test(&root, &args),
        Task::Dist => dist::dist(&root).map(drop),
        Task::Image => image::image(&root),
        Task::Bench {
            quick,
            runs,
            seconds,
            targets,
            scenes,
            workloads,
            rps,
            verdict,
        } => {
            if verdict {
                print!("{}", bench::verdict_of_csvs(&root.join("target/bench"))?);
                return Ok(());
            }
            // Checked before the build, so a misspelt name fails at once.
            let plan = bench::Plan {
                steer_receive: rps,
                ..bench::Plan::new(
                    quick,
                    runs,
                    seconds,
                    &bench::Selection {
                        targets,
                        scenes,
                        workloads,
                    },
                )?
            };
            let binary = build(&root)?;
            // The tokio baseline runs optimised, like everything else it is compared with.
            let object = toolchain::ebpf_object(&root);
            run(host_cargo(&object)
                .args(["build", "--release", "--package", "xtask"])
                .current_dir(&root))?;
            // Its hidden subcommands are the bench's tokio relay, echo server and probes.
            let helper = root.join("target/release/xtask");
            bench::bench(&root, &binary, &helper, &plan)
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Builds the eBPF object, then the release binary that embeds it; returns the binary.
fn build(root: &Path) -> Result<PathBuf> {
    let linker = toolchain::ensure_bpf_toolchain(root)?;
    let object = toolchain::build_ebpf(root, &linker)?;
    run(host_cargo(&object)
        .args(["build", "--release", "--package", "proxy-userspace"])
        .current_dir(root))?;
    Ok(root.join("target/release/ebpf-proxy"))
}

/// A host cargo command that embeds `object`. Every host build xtask runs passes it, so no
/// build here ever replaces the binary with one lacking (or holding an older) object. It
/// also names the commit, for `ebpf-proxy --version`.
fn host_cargo(object: &Path) -> Command {
    let mut command = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    command.env("PROXY_EBPF_OBJECT", object);
    command.env("EBPF_PROXY_COMMIT", commit(&workspace_root()));
    command
}

/// The commit checked out, with `-dirty` when the work tree has changes.
fn commit(root: &Path) -> String {
    Command::new("git")
        .args(["describe", "--always", "--dirty", "--abbrev=7"])
        .current_dir(root)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown".to_owned())
}

fn test(root: &Path, args: &[String]) -> Result<()> {
    packages::ensure(packages::FOR_TESTS)?;
    manifests::check(root)?;
    let binary = build(root)?;
    let object = toolchain::ebpf_object(root);
    run(host_cargo(&object)
        .args([
            "test",
            "--release",
            "--workspace",
            "--exclude",
            "integration-tests",
            // Test targets only: an empty doc-test run must not be the last word.
            "--lib",
            "--bins",
            "--tests",
        ])
        .current_dir(root))?;
    // Tests share the machine's kernel state (memory, CPU time, bpftool listings): one at a time.
    run(host_cargo(&object)
        .args([
            "test",
            "--release",
            "--package",
            "integration-tests",
            "--test",
            "integration",
            "--",
            "--test-threads=1",
        ])
        .args(args)
        .env("EBPF_PROXY_BIN", &binary)
        .current_dir(root))
}

fn run(command: &mut Command) -> Result<()> {
    let status = command
        .status()
        .with_context(|| format!("starting {:?}", command.get_program()))?;
    if !status.success() {
        bail!("{command:?} failed: {status}");
    }
    Ok(())
}
