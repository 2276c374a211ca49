//! The Debian packages of the commands that tests and the bench run as real peers: installed
//! with apt when missing and xtask runs as root, otherwise named in one line, so that no test
//! fails halfway over a missing tool.

use std::process::Command;

use anyhow::{Context as _, Result, bail};

use crate::is_root;

/// Commands the integration tests run, with the package of each.
pub const FOR_TESTS: &[(&str, &str)] = &[
    ("bpftool", "bpftool"),
    ("haproxy", "haproxy"),
    ("nginx", "nginx-light"),
    ("curl", "curl"),
    ("openssl", "openssl"),
    ("pebble", "pebble"),
    ("ss", "iproute2"),
    ("setpriv", "util-linux"),
    ("unshare", "util-linux"),
    ("systemd-analyze", "systemd"),
];

/// Commands the bench runs.
pub const FOR_BENCH: &[(&str, &str)] = &[
    ("iperf3", "iperf3"),
    ("haproxy", "haproxy"),
    ("socat", "socat"),
    ("gnuplot", "gnuplot-nox"),
    ("taskset", "util-linux"),
    ("ip", "iproute2"),
];

/// Makes sure every command in `tools` can run: installs the missing ones' packages with
/// apt-get as root, or stops with one line that names them.
pub fn ensure(tools: &[(&str, &str)]) -> Result<()> {
    let mut missing: Vec<&str> = tools
        .iter()
        .filter(|(command, _)| !on_path(command))
        .map(|(_, package)| *package)
        .collect();
    missing.dedup();
    if missing.is_empty() {
        return Ok(());
    }
    let list = missing.join(" ");
    if !is_root() {
        bail!(
            "missing packages: {list} (run as root to install them, or: sudo apt-get install {list})"
        );
    }
    println!("installing {list} with apt-get");
    let apt = |args: &[&str]| {
        Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .context("running apt-get")
    };
    let install: Vec<&str> = ["install", "-y", "-q", "--no-install-recommends"]
        .into_iter()
        .chain(missing.iter().copied())
        .collect();
    // A fresh machine has no package lists yet: update once, then try again.
    let installed =
        apt(&install)?.success() || (apt(&["update", "-q"])?.success() && apt(&install)?.success());
    if !installed {
        bail!("could not install {list} with apt-get: install them yourself");
    }
    if let Some((command, package)) = tools.iter().find(|(command, _)| !on_path(command)) {
        bail!("{command} is still missing after installing {package}");
    }
    Ok(())
}

fn on_path(command: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {command}")])
        .output()
        .is_ok_and(|o| o.status.success())
}
