//! Connection and process lifecycle: resets travel, unreachable upstreams close the client
//! promptly, signals stop the relay cleanly and take its eBPF objects with it.

use std::{
    io::{ErrorKind, Read, Write},
    net::{TcpListener, TcpStream},
    time::Duration,
};

use integration_tests::{
    Behaviour, Plane, Relay, Upstream, assert_turned_away, bpf_ids, bpf_required, bpftool_name,
    free_port, full_listener, is_root, metric, payload, reset, wait_until,
};

/// How soon a reset or a refusal must reach the other side.
const PROMPTLY: Duration = Duration::from_secs(3);

pub fn client_reset_reaches_upstream(plane: Plane) {
    let upstream = Upstream::start(Behaviour::Exchange(Vec::new()));
    let Some(relay) = Relay::start(plane, &upstream.relay_target(), &[]) else {
        return;
    };
    let mut client = TcpStream::connect(relay.addr).expect("connect");
    client.write_all(&payload(41, 10_000)).expect("send");
    // Make sure the connection is relayed end to end before the reset.
    let mut end = [0u8; 1];
    assert_eq!(
        client.read(&mut end).expect("upstream's empty stream ends"),
        0
    );
    reset(client);
    let result = upstream.next_result(PROMPTLY);
    let err = result.expect_err("the upstream must see the reset, not a clean end");
    assert_eq!(err.kind(), ErrorKind::ConnectionReset, "{plane:?}: {err}");
}

pub fn upstream_reset_reaches_client(plane: Plane) {
    let upstream = Upstream::start(Behaviour::ResetAfter(1000));
    let Some(relay) = Relay::start(plane, &upstream.relay_target(), &[]) else {
        return;
    };
    let mut client = TcpStream::connect(relay.addr).expect("connect");
    client.set_read_timeout(Some(PROMPTLY)).expect("timeout");
    client.write_all(&payload(42, 1000)).expect("send");
    let mut buf = [0u8; 64];
    let err = client
        .read(&mut buf)
        .expect_err("the client must see the reset");
    assert_eq!(err.kind(), ErrorKind::ConnectionReset, "{plane:?}: {err}");
}

pub fn refused_upstream_closes_client(plane: Plane) {
    let closed_port = TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr");
    // The listener is gone: connecting there is refused.
    let Some(relay) = Relay::start(plane, &closed_port.to_string(), &[]) else {
        return;
    };
    assert_turned_away(relay.addr, PROMPTLY);
    // Others keep working: a second relay client to the same dead upstream is handled too.
    assert_turned_away(relay.addr, PROMPTLY);
}

pub fn silent_upstream_closes_client_after_timeout(plane: Plane) {
    let (silent, fillers) = full_listener();
    let target = silent.local_addr().expect("addr");
    let Some(relay) = Relay::start(plane, &target.to_string(), &["--connect-timeout", "1"]) else {
        return;
    };
    let took = assert_turned_away(relay.addr, Duration::from_secs(1) + PROMPTLY);
    assert!(
        took >= Duration::from_millis(900),
        "closed after {took:?}, before the 1 s connect timeout"
    );
    drop(fillers);
}

pub fn stops_cleanly_on_sigterm_and_sigint(plane: Plane) {
    for signal in [libc::SIGTERM, libc::SIGINT] {
        let upstream = Upstream::start(Behaviour::BannerThenEcho(b"hi".to_vec()));
        // SIGTERM drains: an open connection may keep it only up to the drain timeout.
        let Some(relay) = Relay::start(
            plane,
            &upstream.relay_target(),
            &["--drain-timeout", "500ms"],
        ) else {
            return;
        };
        // An open connection must not keep the relay from stopping.
        let mut client = TcpStream::connect(relay.addr).expect("connect");
        let mut banner = [0u8; 2];
        client.read_exact(&mut banner).expect("relayed");
        let (status, log) = relay.stop(signal);
        assert!(
            status.success(),
            "{plane:?}: exit after signal {signal}: {status}\n{}",
            log.join("\n")
        );
        client.set_read_timeout(Some(PROMPTLY)).expect("timeout");
        let mut rest = [0u8; 16];
        assert!(
            matches!(client.read(&mut rest), Ok(0) | Err(_)),
            "connection closed by the stop"
        );
    }
}

/// Connections whose end the relay sent first leave TIME_WAIT sockets on the listener's
/// port; a restart (`systemctl restart`) must bind it again at once. With auto, the
/// connections first move into the kernel, which reads their sequence numbers in repair
/// mode: leaving it clears SO_REUSEADDR unless the relay restores it.
pub fn restarts_on_its_port_at_once(plane: Plane) {
    let listen = format!("127.0.0.1:{}", free_port());
    let upstream = TcpListener::bind("127.0.0.1:0").expect("bind upstream");
    let target = upstream.local_addr().expect("upstream address").to_string();
    let Some(relay) = Relay::start_on(plane, &listen, &target, &["--metrics", "127.0.0.1:0"])
    else {
        return;
    };
    let mut pairs = Vec::new();
    for _ in 0..4 {
        let mut client = TcpStream::connect(relay.addr).expect("connect");
        let (mut server, _) = upstream.accept().expect("relayed connection");
        let mut byte = [0u8; 1];
        client.write_all(b"x").expect("send");
        server.read_exact(&mut byte).expect("relayed up");
        server.write_all(b"y").expect("reply");
        client.read_exact(&mut byte).expect("relayed down");
        pairs.push((client, server));
    }
    if plane == Plane::Auto && bpf_required() {
        assert!(
            wait_until(Duration::from_secs(10), || metric(
                &relay.scrape(),
                "kernel_promoted_total",
                &[]
            ) == 4),
            "the connections did not move into the kernel"
        );
    }
    // The upstream ends each connection, so the relay's FIN to the client goes first.
    for (mut client, server) in pairs {
        drop(server);
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).expect("orderly end");
        assert!(rest.is_empty());
    }
    let port = relay.addr.port();
    assert!(
        wait_until(Duration::from_secs(10), || time_wait_sockets(port) > 0),
        "{plane:?}: no TIME_WAIT socket on the relay's port: the test would prove nothing"
    );
    let (status, log) = relay.stop(libc::SIGINT);
    assert!(status.success(), "{plane:?}: {status}\n{}", log.join("\n"));
    assert!(time_wait_sockets(port) > 0);
    // Panics with the relay's output if it cannot listen.
    Relay::start_on(plane, &listen, &target, &[]);
}

/// TIME_WAIT sockets (state 06 in /proc/net/tcp) whose local port is `port`.
fn time_wait_sockets(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    let local = format!(":{port:04X} ");
    table
        .lines()
        .skip(1)
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields.len() > 3 && format!("{} ", fields[1]).ends_with(&local) && fields[3] == "06"
        })
        .count()
}

pub fn bpf_program_is_listed_while_running_and_gone_after(plane: Plane) {
    if !is_root() && !integration_tests::bpf_required() {
        eprintln!("SKIPPED: bpftool needs root");
        return;
    }
    let upstream = Upstream::start(Behaviour::Exchange(Vec::new()));
    let Some(relay) = Relay::start(plane, &upstream.relay_target(), &[]) else {
        return;
    };
    // By the ids this relay holds descriptors for: other tests' relays come and go meanwhile.
    let (programs, maps) = bpf_ids(relay.pid());
    let names = |object, ids: &[u32]| {
        let mut names: Vec<String> = ids
            .iter()
            .filter_map(|&id| bpftool_name(object, id))
            .collect();
        names.sort();
        names
    };
    assert_eq!(
        names("prog", &programs),
        ["relay_verdict"],
        "bpftool prog show lists the relay's sk_skb program"
    );
    assert_eq!(
        names("map", &maps),
        // .rodata holds the backlog limit set at load time; AYA_LOGS carries the
        // program's log lines.
        [
            ".rodata",
            "AYA_LOGS",
            "RELAY_CONTROLS",
            "RELAY_EVENTS",
            "RELAY_FLOWS",
            "RELAY_SOCKETS"
        ],
        "bpftool map show lists the relay's four maps, its log and its read-only globals"
    );
    let (status, _) = relay.stop(libc::SIGTERM);
    assert!(status.success());
    // The kernel frees programs and maps once their last reference is gone, right at exit.
    assert!(
        wait_until(Duration::from_secs(5), || names("prog", &programs)
            .is_empty()
            && names("map", &maps).is_empty()),
        "program or maps left behind"
    );
}

/// What an operator sees of a live kernel-mode connection without the relay's help:
/// bpftool prints the flow records' fields by name, and `ebpf-proxy flows` shows the
/// connection with the bytes it moved each way (and, under --log-clients, the client).
pub fn bpftool_and_the_flows_view_show_a_live_connection(plane: Plane) {
    if !is_root() && !integration_tests::bpf_required() {
        eprintln!("SKIPPED: reading the kernel's maps needs root");
        return;
    }
    let upstream = Upstream::start(Behaviour::BannerThenEcho(payload(51, 3000)));
    let Some(relay) = Relay::start(plane, &upstream.relay_target(), &["--log-clients"]) else {
        return;
    };
    let mut client = TcpStream::connect(relay.addr).expect("connect");
    let sent = payload(52, 100_000);
    let mut writer = client.try_clone().expect("clone");
    let sending = {
        let sent = sent.clone();
        std::thread::spawn(move || writer.write_all(&sent))
    };
    let mut back = vec![0u8; 3000 + sent.len()];
    client.read_exact(&mut back).expect("banner and echo");
    sending.join().expect("sender").expect("send");

    // bpftool, on this relay's own RELAY_FLOWS (other tests' relays come and go).
    let (_, maps) = bpf_ids(relay.pid());
    let flows_map = maps
        .iter()
        .find(|&&id| bpftool_name("map", id).as_deref() == Some("RELAY_FLOWS"))
        .expect("the relay's RELAY_FLOWS");
    let dump = std::process::Command::new("bpftool")
        .args(["-j", "map", "dump", "id", &flows_map.to_string()])
        .output()
        .expect("bpftool");
    let dump = String::from_utf8_lossy(&dump.stdout);
    for field in ["\"formatted\"", "\"last_active_ns\"", "\"detachments\""] {
        assert!(dump.contains(field), "bpftool shows no {field}:\n{dump}");
    }
    let client_to_upstream = format!("\"redirected_bytes\":{}", sent.len());
    let upstream_to_client = format!("\"redirected_bytes\":{}", back.len());
    assert!(
        dump.contains(&client_to_upstream) && dump.contains(&upstream_to_client),
        "bpftool shows other byte counts than {} and {}:\n{dump}",
        sent.len(),
        back.len()
    );

    // The flows view, as another process would run it.
    let output = std::process::Command::new(integration_tests::relay_binary())
        .arg("flows")
        .output()
        .expect("ebpf-proxy flows");
    let table = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{table}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let local = client.local_addr().expect("client address").to_string();
    let row = table
        .lines()
        .find(|l| l.starts_with(&relay.addr.port().to_string()) && l.contains(&local))
        .unwrap_or_else(|| panic!("no row for {local} on {}:\n{table}", relay.addr));
    let fields: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(
        fields[2..4],
        [sent.len().to_string(), back.len().to_string()],
        "{table}"
    );
    assert!(row.contains("kernel / kernel"), "{table}");
}
