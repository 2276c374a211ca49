//! Bad input gets a one-line error that says what to fix.

use std::{
    io::Write,
    net::{TcpListener, TcpStream},
    time::Duration,
};

use integration_tests::{
    Expect, HeaderEcho, Received, Relay, TempFile, assert_turned_away, exchange, is_root, metric,
    one_error_line, payload, run_to_exit, run_to_exit_via,
};

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

/// DNS down at boot, or a name that does not exist yet: the relay starts anyway, says so
/// once, refuses the pool's clients at once, shows the server down in its metrics, and
/// serves as soon as the name resolves. The name is answered by a private /etc/hosts in
/// the relay's own mount namespace, so no query leaves the machine.
pub fn a_name_that_does_not_resolve_yet_delays_nothing_but_its_pool() {
    if !is_root() {
        eprintln!("SKIPPED: needs root for a private /etc/hosts (unshare --mount)");
        return;
    }
    // `check` warns of such a name but passes the file: the relay would start with it.
    // (A label over 63 bytes cannot be encoded, so no query leaves the machine.)
    let unresolvable = format!("{}.example", "a".repeat(64));
    let file = TempFile::new(
        "unresolvable.toml",
        &format!(
            "[pools.p]\nservers = [\"{unresolvable}:80\"]\n[[listener]]\nlisten = \"127.0.0.1:0\"\npool = \"p\"\n"
        ),
    );
    let (status, stderr) = run_to_exit(&["check", "--config", file.path()]);
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("warning:") && stderr.contains("does not resolve"),
        "{stderr}"
    );

    let echo = HeaderEcho::start("127.0.0.1:0", Expect::None);
    let hosts = TempFile::new("hosts", "127.0.0.1 localhost\n");
    let forward = format!("127.0.0.1:0=later-upstream.test:{}", echo.addr.port());
    // The hosts file is bound over /etc/hosts in a namespace of the relay's own.
    let hosts_env = format!("HOSTS={}", hosts.path());
    let wrapper = [
        "env",
        &hosts_env,
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        "mount --bind \"$HOSTS\" /etc/hosts && exec \"$0\" \"$@\"",
    ];
    let mut relay = Relay::spawn_via(
        &wrapper,
        &[
            "--forward",
            &forward,
            "--dataplane",
            "copy",
            "--metrics",
            "127.0.0.1:0",
        ],
    )
    .unwrap_or_else(|log| panic!("the relay must start with a name that does not resolve:\n{log}"));
    let warnings: Vec<&String> = relay
        .lines
        .iter()
        .filter(|l| l.contains("does not resolve") || l.contains("no address yet"))
        .collect();
    assert_eq!(warnings.len(), 1, "one warning: {:#?}", relay.lines);
    let server = format!("later-upstream.test:{}", echo.addr.port());
    let up = |relay: &Relay| metric(&relay.scrape(), "upstream_up", &[("server", &server)]);
    assert_eq!(
        up(&relay),
        0,
        "the server shows down while its name does not resolve"
    );

    // Meanwhile a client is turned away at once, not left waiting.
    assert_turned_away(relay.addr, Duration::from_secs(2));

    // The name appears: the retries (with backoff) find it, and clients get through.
    std::fs::OpenOptions::new()
        .append(true)
        .open(&hosts.0)
        .and_then(|mut f| f.write_all(b"127.0.0.1 later-upstream.test\n"))
        .expect("append to the hosts file");
    assert!(
        relay
            .wait_for_line("resolves now", Duration::from_secs(20))
            .is_some(),
        "the relay never found the name: {:#?}",
        relay.lines
    );
    assert_eq!(up(&relay), 1);
    let data = payload(77, 64 << 10);
    let got = exchange(
        TcpStream::connect(relay.addr).expect("connect"),
        data.clone(),
    )
    .expect("echo");
    assert_eq!(got, Received::of(&data));
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
