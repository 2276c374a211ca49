//! Operations: graceful drain, reload, restart after SIGKILL, running out of file
//! descriptors, full kernel maps, least privilege, and never being an open relay.

use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    process::Command,
    time::{Duration, Instant},
};

use integration_tests::{
    Expect, HeaderEcho, Plane, Relay, TempFile, bpf_ids, bpf_required, bpftool_name,
    closed_by_peer, echo_round_trip, free_port, is_root, metric, one_error_line,
    operator_certificate, payload, relay_binary, run_to_exit_via, s_client_echo, s_client_try,
    wait_until,
};

const WITHIN: Duration = Duration::from_secs(10);

/// The kernel plane when this machine runs it, else splice (these are control-plane tests).
fn plane() -> &'static str {
    if bpf_required() { "kernel" } else { "auto" }
}

fn start(args: &[&str]) -> Relay {
    Relay::spawn(args).unwrap_or_else(|log| panic!("relay did not start with {args:?}:\n{log}"))
}

pub fn sigterm_drains_open_connections_then_exits() {
    let echo = HeaderEcho::start("127.0.0.1:0", Expect::None);
    let forward = format!("127.0.0.1:0={}", echo.addr);
    let mut relay = start(&[
        "--forward",
        &forward,
        "--dataplane",
        plane(),
        "--drain-timeout",
        "20s",
    ]);
    let addr = relay.addr;
    let mut open = TcpStream::connect(addr).unwrap();
    assert_eq!(echo_round_trip(&mut open, b"before"), b"before");

    relay.signal(libc::SIGTERM);
    relay
        .wait_for_line("draining", WITHIN)
        .expect("relay says it drains");
    // No new connections, while the open one carries on, byte for byte.
    assert!(
        TcpStream::connect(addr).is_err(),
        "still accepting while draining"
    );
    let data = payload(11, 4 << 20);
    let mut writer = open.try_clone().unwrap();
    let sent = data.clone();
    let sender = std::thread::spawn(move || writer.write_all(&sent));
    let mut back = vec![0u8; data.len()];
    open.read_exact(&mut back).unwrap();
    sender.join().unwrap().unwrap();
    assert!(back == data, "bytes changed during the drain");
    // Once it ends, the relay exits at once, well before the 20 s drain timeout.
    let closed = Instant::now();
    open.shutdown(Shutdown::Write).unwrap();
    let (status, lines) = relay.wait_exit(WITHIN);
    assert!(status.success(), "{status}\n{}", lines.join("\n"));
    assert!(closed.elapsed() < Duration::from_secs(5));
    assert!(
        lines.iter().any(|l| l.contains("drained")),
        "{}",
        lines.join("\n")
    );

    // A connection that does not finish is closed at the drain timeout.
    let relay = start(&[
        "--forward",
        &forward,
        "--dataplane",
        plane(),
        "--drain-timeout",
        "1s",
    ]);
    let mut stuck = TcpStream::connect(relay.addr).unwrap();
    assert_eq!(echo_round_trip(&mut stuck, b"x"), b"x");
    let signalled = Instant::now();
    relay.signal(libc::SIGTERM);
    let (status, lines) = relay.wait_exit(WITHIN);
    assert!(status.success());
    assert!(
        signalled.elapsed() >= Duration::from_millis(900),
        "did not wait for the drain"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("drain timeout: closing 1 connections")),
        "{}",
        lines.join("\n")
    );
    assert!(closed_by_peer(&mut stuck, WITHIN));
}

pub fn sighup_reloads_listeners_and_limits_while_connections_flow() {
    let first = HeaderEcho::start("127.0.0.1:0", Expect::None);
    let second = HeaderEcho::start("127.0.0.1:0", Expect::V1);
    let (kept, removed, added) = (free_port(), free_port(), free_port());
    let config = |upstream: SocketAddr, header: &str, listener_port: u16| {
        format!(
            "[relay]\ndataplane = \"{}\"\n[pools.p]\nservers = [\"{upstream}\"]\n\
             [[listener]]\nlisten = \"127.0.0.1:{kept}\"\npool = \"p\"\nsend_proxy = \"{header}\"\n\
             [[listener]]\nlisten = \"127.0.0.1:{listener_port}\"\npool = \"p\"\nsend_proxy = \"{header}\"\n",
            plane()
        )
    };
    let file = TempFile::new("reload.toml", &config(first.addr, "none", removed));
    let mut relay = start(&["--config", file.path(), "--per-ip-rate", "0"]);
    let at = |port| SocketAddr::from(([127, 0, 0, 1], port));
    let mut established = TcpStream::connect(at(kept)).unwrap();
    assert_eq!(echo_round_trip(&mut established, b"one"), b"one");
    assert_eq!(first.next_header(WITHIN), b"");

    // The pool now points elsewhere with a header; one listener goes, another comes.
    std::fs::write(&file.0, config(second.addr, "v1", added)).unwrap();
    relay.signal(libc::SIGHUP);
    let line = relay
        .wait_for_line("reloaded:", WITHIN)
        .expect("reload logged");
    assert!(line.contains("1 added, 1 removed"), "{line}");
    assert!(
        TcpStream::connect(at(removed)).is_err(),
        "a removed listener still accepts"
    );
    let mut fresh = TcpStream::connect(at(added)).unwrap();
    assert_eq!(echo_round_trip(&mut fresh, b"new"), b"new");
    assert!(
        second
            .next_header(WITHIN)
            .starts_with(b"PROXY TCP4 127.0.0.1 127.0.0.1 ")
    );
    let mut changed = TcpStream::connect(at(kept)).unwrap();
    assert_eq!(echo_round_trip(&mut changed, b"two"), b"two");
    assert!(
        second
            .next_header(WITHIN)
            .ends_with(format!(" {kept}\r\n").as_bytes())
    );
    // The connection from before the reload still goes where it went, byte for byte.
    let data = payload(12, 1 << 20);
    let mut writer = established.try_clone().unwrap();
    let sent = data.clone();
    let sender = std::thread::spawn(move || writer.write_all(&sent));
    let mut back = vec![0u8; data.len()];
    established.read_exact(&mut back).unwrap();
    sender.join().unwrap().unwrap();
    assert!(back == data);

    // A broken file is refused; everything keeps running as it was.
    std::fs::write(
        &file.0,
        "[[listener]]\nlisten = \"127.0.0.1:1\"\npool = \"nope\"\n",
    )
    .unwrap();
    relay.signal(libc::SIGHUP);
    let line = relay
        .wait_for_line("reload failed", WITHIN)
        .expect("failed reload logged");
    assert!(line.contains("line 3"), "{line}");
    let mut still = TcpStream::connect(at(added)).unwrap();
    assert_eq!(echo_round_trip(&mut still, b"three"), b"three");
}

pub fn sighup_rereads_the_tls_certificate() {
    // The renewal case: same paths, new certificate; no restart.
    let echo = HeaderEcho::start("127.0.0.1:0", Expect::None);
    let (old_cert, old_key) = operator_certificate("old");
    let (new_cert, new_key) = operator_certificate("new");
    let (cert, key) = (
        TempFile::new("live-cert.pem", ""),
        TempFile::new("live-key.pem", ""),
    );
    let install = |from_cert: &TempFile, from_key: &TempFile| {
        std::fs::copy(&from_cert.0, &cert.0).unwrap();
        std::fs::copy(&from_key.0, &key.0).unwrap();
    };
    install(&old_cert, &old_key);
    let file = TempFile::new(
        "tls-reload.toml",
        &format!(
            "[tls]\ncert = \"{}\"\nkey = \"{}\"\n[pools.p]\nservers = [\"{}\"]\n\
             [[listener]]\nlisten = \"127.0.0.1:0\"\ntls = true\npool = \"p\"\n",
            cert.path(),
            key.path(),
            echo.addr
        ),
    );
    let mut relay = start(&["--config", file.path(), "--per-ip-rate", "0"]);
    assert_eq!(s_client_echo(relay.addr, old_cert.path(), "old\n"), "old\n");
    install(&new_cert, &new_key);
    relay.signal(libc::SIGHUP);
    relay
        .wait_for_line("reloaded:", WITHIN)
        .expect("reload logged");
    assert_eq!(s_client_echo(relay.addr, new_cert.path(), "new\n"), "new\n");
    assert!(
        s_client_try(relay.addr, old_cert.path(), "stale\n").is_err(),
        "the old certificate is still served"
    );
}

/// The names of the eBPF programs `relay` holds.
fn relay_programs(relay: &Relay) -> Vec<String> {
    let (programs, _) = bpf_ids(relay.pid());
    programs
        .into_iter()
        .filter_map(|id| bpftool_name("prog", id))
        .collect()
}

pub fn restart_after_sigkill_is_clean() {
    if !bpf_required() {
        eprintln!("SKIPPED: needs the kernel data plane (PROXY_REQUIRE_BPF=1)");
        return;
    }
    let echo = HeaderEcho::start("127.0.0.1:0", Expect::None);
    let port = free_port();
    let forward = format!("127.0.0.1:{port}={}", echo.addr);
    let args = ["--forward", forward.as_str(), "--dataplane", "kernel"];
    let relay = start(&args);
    let mut stream = TcpStream::connect(relay.addr).unwrap();
    assert_eq!(echo_round_trip(&mut stream, b"live"), b"live");
    assert_eq!(relay_programs(&relay), ["relay_verdict"]);
    let (programs, _) = bpf_ids(relay.pid());
    relay.signal(libc::SIGKILL);
    let _ = relay.wait_exit(WITHIN);
    // Nothing is pinned: the kernel frees the program and maps with the last fd.
    assert!(
        wait_until(WITHIN, || programs
            .iter()
            .all(|&id| bpftool_name("prog", id).is_none())),
        "a program outlived the process"
    );
    let relay = start(&args);
    assert_eq!(relay.addr.port(), port, "the same port binds again");
    let mut stream = TcpStream::connect(relay.addr).unwrap();
    assert_eq!(echo_round_trip(&mut stream, b"again"), b"again");
    assert_eq!(relay_programs(&relay), ["relay_verdict"]);
}

/// True if a one-byte echo comes back within `within`.
fn echoes_within(stream: &mut TcpStream, within: Duration) -> bool {
    stream.set_read_timeout(Some(within)).unwrap();
    let mut byte = [0u8; 1];
    stream.write_all(b"x").is_ok() && matches!(stream.read(&mut byte), Ok(1))
}

pub fn out_of_descriptors_slows_accepting_logs_once_and_recovers() {
    let echo = HeaderEcho::start("127.0.0.1:0", Expect::None);
    let forward = format!("127.0.0.1:0={}", echo.addr);
    let mut relay = Relay::spawn_via(
        &["prlimit", "--nofile=128:128"],
        &[
            "--forward",
            &forward,
            "--dataplane",
            "copy",
            "--max-connections",
            "1000",
            "--per-ip-rate",
            "0",
            "--per-ip-connections",
            "0",
            "--metrics",
            "127.0.0.1:0",
        ],
    )
    .expect("relay starts under prlimit");
    // Room for fewer connections than asked: said at start, and clients beyond it wait in
    // the backlog instead of being accepted without descriptors to serve them.
    let budget: usize = relay
        .lines
        .iter()
        .find_map(|l| {
            l.split("leaves room for about ")
                .nth(1)?
                .split(' ')
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| {
            panic!(
                "no descriptor budget in the log:\n{}",
                relay.lines.join("\n")
            )
        });
    let mut served: Vec<TcpStream> = (0..budget)
        .map(|_| TcpStream::connect(relay.addr).unwrap())
        .collect();
    assert!(
        served.iter_mut().all(|s| echoes_within(s, WITHIN)),
        "within the budget, all are served"
    );
    let mut waiting = TcpStream::connect(relay.addr).unwrap();
    assert!(
        !echoes_within(&mut waiting, Duration::from_millis(500)),
        "served beyond the budget"
    );
    served.pop();
    assert!(
        echoes_within(&mut waiting, WITHIN),
        "the waiting client was not served when a slot freed"
    );

    drop((served, waiting));
    assert!(wait_until(WITHIN, || relay.status().connections == 0));

    // Use up every descriptor with idle metrics clients: the relay's next accept fails.
    let metrics = relay.metrics.unwrap();
    let hogs: Vec<TcpStream> = (0..128)
        .map(|_| TcpStream::connect(metrics).unwrap())
        .collect();
    relay
        .wait_for_line("metrics endpoint: accept failed", WITHIN)
        .expect("metrics ran out");
    let mut late = TcpStream::connect(relay.addr).unwrap();
    relay
        .wait_for_line(": accept failed", WITHIN)
        .expect("the relay's failure is logged");
    // Out of descriptors for a second: no log flood, no spinning.
    let ticks = relay.cpu_ticks();
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        relay.cpu_ticks() - ticks < 20,
        "the accept loop spins while out of descriptors"
    );
    drop(hogs);
    assert!(
        echoes_within(&mut late, WITHIN),
        "not served after descriptors freed up"
    );
    let (_, lines) = relay.stop(libc::SIGINT);
    let relay_failures = lines
        .iter()
        .filter(|l| l.contains(": accept failed") && !l.contains("metrics endpoint"))
        .count();
    assert_eq!(relay_failures, 1, "{}", lines.join("\n"));
    assert!(lines.iter().any(|l| l.contains("accepting again")));
}

pub fn full_kernel_maps_fall_back_to_userspace(plane: Plane) {
    if !bpf_required() {
        eprintln!("SKIPPED: needs the kernel data plane (PROXY_REQUIRE_BPF=1)");
        return;
    }
    let echo = HeaderEcho::start("127.0.0.1:0", Expect::None);
    let Some(mut relay) = Relay::start(
        plane,
        &echo.addr.to_string(),
        &[
            "--map-connections",
            "2",
            "--max-connections",
            "10",
            "--metrics",
            "127.0.0.1:0",
        ],
    ) else {
        return;
    };
    assert!(
        relay
            .lines
            .iter()
            .any(|l| l.contains("the kernel maps hold 2 connections"))
    );
    let mut streams: Vec<TcpStream> = (0..5)
        .map(|_| TcpStream::connect(relay.addr).unwrap())
        .collect();
    for (i, stream) in streams.iter_mut().enumerate() {
        let data = payload(i as u64, 100_000);
        assert!(echo_round_trip(stream, &data) == data, "connection {i}");
    }
    let status = relay.status();
    assert_eq!(status.sockets_in_map, Some(4));
    // The three declined connections' records went with them.
    assert_eq!(status.flow_records, Some(8));
    assert_eq!(status.userspace_fallbacks, Some(3));
    assert_eq!(metric(&relay.scrape(), "kernel_fallbacks_total", &[]), 3);
    let warnings = relay
        .lines
        .iter()
        .filter(|l| l.contains("kernel maps declined"))
        .collect::<Vec<_>>();
    assert_eq!(warnings.len(), 1, "{}", relay.lines.join("\n"));
    assert!(
        warnings[0].contains("the kernel maps are full"),
        "the warning says why: {}",
        warnings[0]
    );
}

pub fn nothing_a_client_sends_steers_the_connection() {
    // PROXY headers name a destination, HTTP CONNECT asks for one: the relay only ever
    // connects to its configured upstream, and passes such bytes on as payload.
    let echo = HeaderEcho::start("127.0.0.1:0", Expect::None);
    let file = TempFile::new(
        "steer.toml",
        &format!(
            "[pools.p]\nservers = [\"{}\"]\n[[listener]]\nlisten = \"127.0.0.1:0\"\naccept_proxy = true\npool = \"p\"\n\
             [[listener]]\nlisten = \"127.0.0.1:0\"\npool = \"p\"\n",
            echo.addr
        ),
    );
    let relay = start(&["--config", file.path(), "--per-ip-rate", "0"]);
    let connect = b"CONNECT 192.0.2.80:22 HTTP/1.1\r\nHost: 192.0.2.80:22\r\n\r\n";
    let mut proxied = TcpStream::connect(relay.addrs[0]).unwrap();
    proxied
        .write_all(b"PROXY TCP4 192.0.2.1 192.0.2.80 5000 22\r\n")
        .unwrap();
    assert_eq!(echo_round_trip(&mut proxied, connect), connect);
    let mut plain = TcpStream::connect(relay.addrs[1]).unwrap();
    let header_as_payload = b"PROXY TCP4 192.0.2.1 192.0.2.80 5000 22\r\n";
    assert_eq!(
        echo_round_trip(&mut plain, header_as_payload),
        header_as_payload
    );
    assert_eq!(echo_round_trip(&mut plain, connect), connect);
    assert_eq!(
        echo.accepted(),
        2,
        "every connection went to the configured upstream"
    );
}

/// setpriv arguments: user nobody, holding exactly `caps` (e.g. "bpf,net_admin").
fn as_nobody_with(caps: &str) -> Vec<String> {
    let caps: Vec<String> = caps.split(',').map(|c| format!("+{c}")).collect();
    let caps = caps.join(",");
    [
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
    ]
    .into_iter()
    .map(String::from)
    .chain([
        format!("--inh-caps={caps}"),
        format!("--ambient-caps={caps}"),
    ])
    .collect()
}

pub fn kernel_mode_runs_unprivileged_with_three_capabilities(plane: Plane) {
    if !is_root() || !bpf_required() {
        eprintln!("SKIPPED: needs root to drop to nobody, and the kernel data plane");
        return;
    }
    let echo = HeaderEcho::start("127.0.0.1:0", Expect::None);
    // A port below 1024 needs CAP_NET_BIND_SERVICE.
    let low = (600..1000)
        .find(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
        .expect("a free port below 1024");
    let forward = format!("127.0.0.1:{low}={}", echo.addr);
    let wrapper = as_nobody_with("bpf,net_admin,net_bind_service");
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let mut relay = Relay::spawn_via(
        &wrapper,
        &["--forward", &forward, "--dataplane", plane.arg()],
    )
    .unwrap_or_else(|log| panic!("kernel mode as nobody:\n{log}"));
    let data = payload(13, 1 << 20);
    let mut stream = TcpStream::connect(relay.addr).unwrap();
    let mut writer = stream.try_clone().unwrap();
    let sent = data.clone();
    let sender = std::thread::spawn(move || writer.write_all(&sent));
    let mut back = vec![0u8; data.len()];
    stream.read_exact(&mut back).unwrap();
    sender.join().unwrap().unwrap();
    assert!(back == data);
    assert_eq!(
        relay.status().sockets_in_map,
        Some(2),
        "relayed by the kernel"
    );

    // Without CAP_NET_ADMIN the refusal names it, in one line.
    let wrapper = as_nobody_with("bpf,net_bind_service");
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let (status, stderr) = run_to_exit_via(
        &wrapper,
        &[
            "--forward",
            "127.0.0.1:0=127.0.0.1:9",
            "--dataplane",
            "kernel",
        ],
    );
    assert_eq!(status.code(), Some(1), "{stderr}");
    let line = one_error_line(&stderr);
    assert!(line.contains("missing CAP_NET_ADMIN"), "{line}");
}

pub fn systemd_unit_passes_systemd_analyze_verify() {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("SKIPPED: systemd-analyze is not installed");
        return;
    }
    // The shipped unit, pointed at the binary under test instead of /usr/local/bin.
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../dist/ebpf-proxy.service"
    ))
    .expect("dist/ebpf-proxy.service");
    let unit = unit.replace(
        "/usr/local/bin/ebpf-proxy",
        relay_binary().to_str().unwrap(),
    );
    let dir = std::env::temp_dir().join(format!("ebpf-proxy-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("ebpf-proxy.service");
    std::fs::write(&path, unit).unwrap();
    let output = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{said}");
    assert!(
        !said.contains("ebpf-proxy.service:"),
        "systemd-analyze complained:\n{said}"
    );
}
