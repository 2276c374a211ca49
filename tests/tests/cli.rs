//! Bad input gets a one-line error that says what to fix.

use std::net::TcpListener;

use integration_tests::{Relay, is_root, one_error_line, run_to_exit, run_to_exit_via};

pub fn malformed_forward_is_a_usage_error() {
    let (status, stderr) = run_to_exit(&["--forward", "127.0.0.1:80"]);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(
        one_error_line(&stderr).contains("expected LISTEN=UPSTREAM"),
        "{stderr}"
    );
    let (status, stderr) = run_to_exit(&["--forward", "127.0.0.1:80=nohostport"]);
    assert_eq!(status.code(), Some(2));
    assert!(
        one_error_line(&stderr).contains("is not HOST:PORT"),
        "{stderr}"
    );
}

pub fn port_in_use_says_so() {
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let forward = format!("{}=127.0.0.1:9", taken.local_addr().expect("addr"));
    let (status, stderr) = run_to_exit(&["--forward", &forward, "--dataplane", "copy"]);
    assert_eq!(status.code(), Some(1), "{stderr}");
    let line = one_error_line(&stderr);
    assert!(
        line.contains("cannot listen on")
            && line.contains("something already listens on this port"),
        "{line}"
    );
}

pub fn unresolvable_upstream_says_so() {
    // A DNS label over 63 bytes cannot be encoded, so the resolver fails without asking
    // any server: no traffic leaves the machine.
    let host = format!("{}.example", "a".repeat(64));
    let forward = format!("127.0.0.1:0={host}:80");
    let (status, stderr) = run_to_exit(&["--forward", &forward, "--dataplane", "copy"]);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        one_error_line(&stderr).contains("does not resolve"),
        "{stderr}"
    );
}

/// Runs as `nobody`, with no capabilities at all.
const UNPRIVILEGED: &[&str] = &[
    "setpriv",
    "--reuid=65534",
    "--regid=65534",
    "--clear-groups",
];

pub fn without_privileges_auto_falls_back_and_kernel_says_why() {
    if !is_root() {
        eprintln!("SKIPPED: dropping privileges with setpriv needs root");
        return;
    }
    let (status, stderr) = run_to_exit_via(
        UNPRIVILEGED,
        &[
            "--forward",
            "127.0.0.1:0=127.0.0.1:9",
            "--dataplane",
            "kernel",
        ],
    );
    assert_eq!(status.code(), Some(1), "{stderr}");
    let line = one_error_line(&stderr);
    assert!(
        line.contains("not allowed to load eBPF programs") && line.contains("CAP_BPF"),
        "{line}"
    );

    let relay = Relay::spawn_via(UNPRIVILEGED, &["--forward", "127.0.0.1:0=127.0.0.1:9"])
        .unwrap_or_else(|log| panic!("auto must start without privileges:\n{log}"));
    let listening = relay
        .lines
        .iter()
        .find(|l| l.contains("listening on"))
        .cloned()
        .unwrap_or_default();
    assert!(listening.contains("(dataplane splice)"), "{listening}");
    let warnings: Vec<_> = relay
        .lines
        .iter()
        .filter(|l| l.contains("WARN") && l.contains("kernel data plane"))
        .collect();
    assert_eq!(warnings.len(), 1, "one warning expected: {warnings:?}");
    assert!(
        warnings[0].contains("not allowed to load eBPF programs"),
        "{}",
        warnings[0]
    );
}
