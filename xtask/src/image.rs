//! `cargo xtask image`: the OCI image `localhost/ebpf-proxy:latest`, built FROM scratch
//! with podman from the release archive's folder (no base image is pulled), then run once
//! in kernel mode on the host network to show that it relays. Also writes
//! target/dist/seccomp-bpf.json: podman's default seccomp profile with bpf(2) allowed to a
//! container that holds CAP_BPF, which the default allows only with CAP_SYS_ADMIN.

use std::{
    fs,
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};

use crate::{dist, packages, run, toolchain::capture};

pub const IMAGE: &str = "localhost/ebpf-proxy:latest";
/// podman's own default, crun, refuses this machine's hybrid cgroup layout; runc works.
const RUNTIME: &str = "/usr/sbin/runc";
const DEFAULT_PROFILE: &str = "/usr/share/containers/seccomp.json";
const SMOKE_CONTAINER: &str = "ebpf-proxy-image-check";

pub fn image(root: &Path) -> Result<()> {
    packages::ensure(&[("podman", "podman"), ("runc", "runc")])?;
    let folder = dist::dist(root)?;
    run(Command::new("podman")
        .args(["build", "--tag", IMAGE, "--file"])
        .arg(root.join("deploy/Containerfile"))
        .arg(&folder))?;
    let profile = write_seccomp_profile(&root.join("target/dist/seccomp-bpf.json"))?;
    smoke_test(&profile)?;
    println!(
        "{IMAGE} relays in kernel mode; seccomp profile: {}",
        profile.display()
    );
    Ok(())
}

/// The default profile, with bpf(2) taken out of the rule that refuses it to containers
/// without CAP_SYS_ADMIN and allowed to those with CAP_BPF.
fn write_seccomp_profile(path: &Path) -> Result<PathBuf> {
    let text = fs::read_to_string(DEFAULT_PROFILE)
        .with_context(|| format!("reading podman's default profile {DEFAULT_PROFILE}"))?;
    let mut profile: Value = serde_json::from_str(&text)?;
    let rules = profile["syscalls"]
        .as_array_mut()
        .context("a profile without syscalls")?;
    for rule in rules.iter_mut() {
        if rule["action"] != "SCMP_ACT_ALLOW"
            && let Some(names) = rule["names"].as_array_mut()
        {
            names.retain(|name| name != "bpf");
        }
    }
    rules.push(json!({
        "names": ["bpf"],
        "action": "SCMP_ACT_ALLOW",
        "includes": { "caps": ["CAP_BPF"] },
        "comment": "ebpf-proxy: load the verdict program and use its maps",
    }));
    fs::write(path, serde_json::to_string_pretty(&profile)?)?;
    Ok(path.to_owned())
}

/// Runs the image as the docs say, relays one connection to an echo server on the host,
/// and checks that the relay ran in kernel mode with the connection's sockets in its map.
fn smoke_test(profile: &Path) -> Result<()> {
    let echo = free_listener()?;
    let echo_addr = echo.local_addr()?;
    thread::spawn(move || {
        for mut stream in echo.incoming().flatten() {
            thread::spawn(move || {
                let mut reader = stream.try_clone().expect("clone");
                let _ = std::io::copy(&mut reader, &mut stream);
            });
        }
    });
    // Held until the container starts, so that the two ports differ.
    let held = (free_listener()?, free_listener()?);
    let (listen, metrics) = (held.0.local_addr()?, held.1.local_addr()?);
    drop(held);
    let _ = Command::new("podman")
        .args(["rm", "--force", SMOKE_CONTAINER])
        .output();
    let seccomp = format!("seccomp={}", profile.display());
    run(Command::new("podman")
        .args([
            "--runtime",
            RUNTIME,
            "run",
            "--detach",
            "--name",
            SMOKE_CONTAINER,
        ])
        .args([
            "--network",
            "host",
            "--cap-add",
            "BPF,NET_ADMIN,NET_BIND_SERVICE",
        ])
        .args(["--security-opt", &seccomp])
        .args([
            "--ulimit",
            "nofile=4096:4096",
            "--ulimit",
            "nproc=1024:4096",
        ])
        .arg(IMAGE)
        .args(["--forward", &format!("{listen}={echo_addr}")])
        .args(["--dataplane", "kernel", "--metrics", &metrics.to_string()]))?;
    let checked = check_relaying(listen, metrics);
    let logs = capture(Command::new("podman").args(["logs", SMOKE_CONTAINER])).unwrap_or_default();
    let _ = Command::new("podman")
        .args(["rm", "--force", SMOKE_CONTAINER])
        .output();
    checked.with_context(|| format!("the container's log:\n{logs}"))
}

fn check_relaying(listen: std::net::SocketAddr, metrics: std::net::SocketAddr) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut stream = loop {
        match TcpStream::connect(listen) {
            Ok(stream) => break stream,
            Err(_) if Instant::now() < deadline => thread::sleep(Duration::from_millis(100)),
            Err(e) => bail!("the container never listened on {listen}: {e}"),
        }
    };
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let sent: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
    let mut writer = stream.try_clone()?;
    let sending = {
        let sent = sent.clone();
        thread::spawn(move || writer.write_all(&sent))
    };
    let mut echoed = vec![0u8; sent.len()];
    stream.read_exact(&mut echoed).context("reading the echo")?;
    sending.join().expect("sender")?;
    if echoed != sent {
        bail!("the echo through the container differs from what was sent");
    }
    // While the connection is open, both of its sockets are in the kernel's map.
    let scrape = http_get(metrics)?;
    for expected in [
        "ebpf_proxy_dataplane_info{dataplane=\"kernel\"} 1",
        "ebpf_proxy_kernel_sockets{} 2",
    ] {
        if !scrape.contains(expected) {
            bail!("no {expected:?} in the metrics:\n{scrape}");
        }
    }
    Ok(())
}

/// A listener on a loopback port below the ephemeral range.
fn free_listener() -> Result<TcpListener> {
    (21000..22000)
        .find_map(|port| TcpListener::bind(("127.0.0.1", port)).ok())
        .context("no free port in 21000-21999")
}

fn http_get(addr: std::net::SocketAddr) -> Result<String> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response)
}
