//! WhatsApp-proxy parity against real peers: the preset's port table end to end, PROXY
//! headers both ways with a real HAProxy, TLS with openssl, handshake timeouts, per-IP
//! limits, metrics and the configuration commands.

use std::{
    io::{self, Read, Write},
    net::{IpAddr, Shutdown, SocketAddr, TcpStream},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use integration_tests::{
    Expect, Haproxy, HeaderEcho, Relay, TempFile, bpf_required, closed_by_peer, connect_from,
    echo_and_finish, echo_round_trip, free_port, metric, operator_certificate, payload,
    relay_binary, run_to_exit, s_client_echo, tcp_shutdown, tls_client, unless_reset, v1,
    wait_until,
};

const WITHIN: Duration = Duration::from_secs(10);

/// A v2 PROXY header for IPv4 endpoints, built by hand from the specification.
fn v2(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let (SocketAddr::V4(s), SocketAddr::V4(d)) = (source, destination) else {
        panic!("IPv4 only")
    };
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend_from_slice(&[0x21, 0x11, 0, 12]);
    h.extend_from_slice(&s.ip().octets());
    h.extend_from_slice(&d.ip().octets());
    h.extend_from_slice(&s.port().to_be_bytes());
    h.extend_from_slice(&d.port().to_be_bytes());
    h
}

fn loopback(last: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, last])
}

/// Starts a relay from a configuration file; None when kernel mode is not available here
/// and the run does not require it.
fn relay_with_config(config: &str, extra: &[&str]) -> (Relay, TempFile) {
    let file = TempFile::new("relay.toml", config);
    let mut args = vec!["--config", file.path(), "--metrics", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    let relay = Relay::spawn(&args).unwrap_or_else(|log| panic!("relay did not start:\n{log}"));
    (relay, file)
}

pub fn preset_port_table_end_to_end() {
    let plane = if bpf_required() { "kernel" } else { "auto" };
    let chat_http = HeaderEcho::start("127.0.0.2:80", Expect::V1);
    let chat = HeaderEcho::start("127.0.0.2:5222", Expect::V1);
    let media = HeaderEcho::start("127.0.0.4:443", Expect::None);
    let relay = Relay::spawn(&[
        "--preset",
        "whatsapp",
        "--bind",
        "127.0.0.1",
        "--dataplane",
        plane,
        "--resolve",
        "g.whatsapp.net=127.0.0.2",
        "--resolve",
        "g-fallback.whatsapp.net=127.0.0.3",
        "--resolve",
        "whatsapp.net=127.0.0.4",
        "--metrics",
        "127.0.0.1:0",
    ])
    .unwrap_or_else(|log| panic!("preset did not start:\n{log}"));
    let ports: Vec<u16> = relay.addrs.iter().map(SocketAddr::port).collect();
    assert_eq!(ports, [80, 8080, 443, 8443, 5222, 8222, 587, 7777]);
    let at = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
    let data = payload(3, 256 * 1024);
    // What a client on 8080, 8443 and 8222 says about the real client.
    let claimed = (
        "198.51.100.7:40001".parse::<SocketAddr>().unwrap(),
        "203.0.113.9:8443".parse::<SocketAddr>().unwrap(),
    );

    for (port, upstream) in [(80, &chat_http), (5222, &chat)] {
        let stream = TcpStream::connect(at(port)).expect("connect");
        let client = stream.local_addr().unwrap();
        echo_and_finish(&stream, &data, tcp_shutdown(&stream));
        assert_eq!(
            upstream.next_header(WITHIN),
            v1(client, at(port)),
            "port {port}"
        );
    }
    for port in [587, 7777] {
        let stream = TcpStream::connect(at(port)).expect("connect");
        echo_and_finish(&stream, &data, tcp_shutdown(&stream));
        assert_eq!(
            media.next_header(WITHIN),
            b"",
            "port {port} sends no header"
        );
    }
    for (port, upstream) in [(8080, &chat_http), (8222, &chat)] {
        let mut stream = TcpStream::connect(at(port)).expect("connect");
        // Header and payload in one segment: the relay must take exactly the header.
        let mut first = v1(claimed.0, claimed.1);
        first.extend_from_slice(&data[..1000]);
        stream.write_all(&first).unwrap();
        let mut back = vec![0u8; 1000];
        stream.read_exact(&mut back).unwrap();
        assert_eq!(back, data[..1000]);
        echo_and_finish(&stream, &data[1000..], tcp_shutdown(&stream));
        assert_eq!(
            upstream.next_header(WITHIN),
            v1(claimed.0, claimed.1),
            "port {port}"
        );
    }
    let tls_data = &data[..64 * 1024];
    // TLS from the first byte (443), or after a PROXY header (8443); close_notify to end.
    let tls_echo_and_finish = |stream: TcpStream| {
        let mut tls = tls_client(stream);
        assert_eq!(echo_round_trip(&mut tls, tls_data), tls_data);
        tls.conn.send_close_notify();
        tls.flush().unwrap();
        let mut rest = Vec::new();
        let _ = tls.read_to_end(&mut rest);
    };
    let stream = TcpStream::connect(at(443)).expect("connect");
    let client = stream.local_addr().unwrap();
    tls_echo_and_finish(stream);
    assert_eq!(chat.next_header(WITHIN), v1(client, at(443)));
    let mut stream = TcpStream::connect(at(8443)).expect("connect");
    stream.write_all(&v2(claimed.0, claimed.1)).unwrap();
    tls_echo_and_finish(stream);
    assert_eq!(chat.next_header(WITHIN), v1(claimed.0, claimed.1));

    // Every listener counted exactly the payload, each way, once its connection closed.
    assert!(wait_until(WITHIN, || relay
        .scrape()
        .lines()
        .filter(|l| l.starts_with("ebpf_proxy_connections_open{"))
        .all(|l| l.ends_with(" 0"))));
    let text = relay.scrape();
    for port in ports {
        let listener = format!("127.0.0.1:{port}");
        let expected = if port == 443 || port == 8443 {
            tls_data.len()
        } else {
            data.len()
        } as u64;
        for direction in ["client_to_upstream", "upstream_to_client"] {
            let labels = [("listener", listener.as_str()), ("direction", direction)];
            assert_eq!(
                metric(&text, "bytes_total", &labels),
                expected,
                "{labels:?}"
            );
        }
        assert_eq!(
            metric(&text, "connections_total", &[("listener", &listener)]),
            1
        );
    }
    assert_eq!(
        metric(&text, "upstream_up", &[("server", "g.whatsapp.net:5222")]),
        1
    );

    // `ebpf-proxy status` shows the same for a person.
    let metrics = relay.metrics.unwrap().to_string();
    let output = Command::new(relay_binary())
        .args(["status", "--metrics", &metrics])
        .output()
        .expect("run status");
    let status = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{status}");
    let row = status
        .lines()
        .find(|l| l.starts_with("127.0.0.1:5222"))
        .unwrap_or_else(|| panic!("{status}"));
    assert_eq!(row.split_whitespace().nth(2), Some("1"), "{row}");
    assert!(row.contains("256.0 KiB"), "{row}");
}

const HAPROXY_DEFAULTS: &str = "global\n  maxconn 200\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n";

pub fn haproxy_accepts_our_v1_and_v2_headers() {
    // HAProxy takes our header (accept-proxy) and passes the client address it read on
    // to the echo upstream in its own v1 header (send-proxy).
    let echo = HeaderEcho::start("127.0.0.1:0", Expect::V1);
    let (p1, p2) = (free_port(), free_port());
    let _haproxy = Haproxy::start(
        &format!(
            "{HAPROXY_DEFAULTS}frontend v1in\n  bind 127.0.0.1:{p1} accept-proxy\n  default_backend echo\n\
             frontend v2in\n  bind 127.0.0.1:{p2} accept-proxy\n  default_backend echo\n\
             backend echo\n  server e {} send-proxy\n",
            echo.addr
        ),
        &[p1, p2],
    );
    let (relay, _file) = relay_with_config(
        &format!(
            "[pools.h1]\nservers = [\"127.0.0.1:{p1}\"]\n[pools.h2]\nservers = [\"127.0.0.1:{p2}\"]\n\
             [[listener]]\nlisten = \"127.0.0.1:0\"\npool = \"h1\"\nsend_proxy = \"v1\"\n\
             [[listener]]\nlisten = \"127.0.0.1:0\"\npool = \"h2\"\nsend_proxy = \"v2\"\n"
        ),
        &[],
    );
    for listener in &relay.addrs {
        let stream = connect_from(loopback(5), *listener).expect("connect");
        let client = stream.local_addr().unwrap();
        echo_and_finish(&stream, &payload(1, 100_000), tcp_shutdown(&stream));
        assert_eq!(
            echo.next_header(WITHIN),
            v1(client, *listener),
            "via {listener}"
        );
    }
}

pub fn haproxy_send_proxy_v2_in_front_is_accepted() {
    let echo = HeaderEcho::start("127.0.0.1:0", Expect::V1);
    let (relay, _file) = relay_with_config(
        &format!(
            "[pools.chat]\nservers = [\"{}\"]\n[[listener]]\nlisten = \"127.0.0.1:0\"\n\
             accept_proxy = true\npool = \"chat\"\nsend_proxy = \"v1\"\n",
            echo.addr
        ),
        &[],
    );
    let front = free_port();
    let _haproxy = Haproxy::start(
        &format!(
            "{HAPROXY_DEFAULTS}frontend f\n  bind 127.0.0.1:{front}\n  default_backend relay\n\
             backend relay\n  server r {} send-proxy-v2\n",
            relay.addr
        ),
        &[front],
    );
    let front_addr = SocketAddr::from(([127, 0, 0, 1], front));
    let stream = connect_from(loopback(6), front_addr).expect("connect");
    let client = stream.local_addr().unwrap();
    echo_and_finish(&stream, &payload(2, 300_000), tcp_shutdown(&stream));
    // The address HAProxy saw is what reaches the upstream.
    assert_eq!(echo.next_header(WITHIN), v1(client, front_addr));
}

pub fn openssl_completes_tls_on_tls_listeners() {
    let echo = HeaderEcho::start("127.0.0.1:0", Expect::V1);
    let (cert, key) = operator_certificate("parity");
    let (relay, _file) = relay_with_config(
        &format!(
            "[tls]\ncert = \"{}\"\nkey = \"{}\"\n[pools.chat]\nservers = [\"{}\"]\n\
             [[listener]]\nlisten = \"127.0.0.1:0\"\ntls = true\npool = \"chat\"\nsend_proxy = \"v1\"\n\
             [[listener]]\nlisten = \"127.0.0.1:0\"\naccept_proxy = true\ntls = true\npool = \"chat\"\nsend_proxy = \"v1\"\n",
            cert.path(),
            key.path(),
            echo.addr
        ),
        &[],
    );
    // 443's shape: TLS straight from the client.
    assert_eq!(
        s_client_echo(relay.addrs[0], cert.path(), "hello 443\n"),
        "hello 443\n"
    );
    let header = String::from_utf8(echo.next_header(WITHIN)).unwrap();
    assert!(
        header.starts_with("PROXY TCP4 127.0.0.1 127.0.0.1 "),
        "{header}"
    );
    // 8443's shape: a PROXY header (from HAProxy) first, then TLS.
    let front = free_port();
    let _haproxy = Haproxy::start(
        &format!(
            "{HAPROXY_DEFAULTS}frontend f\n  bind 127.0.0.1:{front}\n  default_backend relay\n\
             backend relay\n  server r {} send-proxy\n",
            relay.addrs[1]
        ),
        &[front],
    );
    let front_addr = SocketAddr::from(([127, 0, 0, 1], front));
    assert_eq!(
        s_client_echo(front_addr, cert.path(), "hello 8443\n"),
        "hello 8443\n"
    );
    let header = String::from_utf8(echo.next_header(WITHIN)).unwrap();
    assert!(header.ends_with(&format!(" {front}\r\n")), "{header}");
}

pub fn bad_handshakes_are_cut_off_without_disturbing_others() {
    let echo = HeaderEcho::start("127.0.0.1:0", Expect::None);
    let (relay, _file) = relay_with_config(
        &format!(
            "[pools.p]\nservers = [\"{}\"]\n\
             [[listener]]\nlisten = \"127.0.0.1:0\"\naccept_proxy = true\npool = \"p\"\n\
             [[listener]]\nlisten = \"127.0.0.1:0\"\ntls = true\npool = \"p\"\n",
            echo.addr
        ),
        &["--handshake-timeout", "2.5s", "--per-ip-rate", "0"],
    );
    let (proxied, tls) = (relay.addrs[0], relay.addrs[1]);
    let mut good = TcpStream::connect(proxied).unwrap();
    good.write_all(&v1("192.0.2.1:1000".parse().unwrap(), proxied))
        .unwrap();
    assert_eq!(echo_round_trip(&mut good, b"before"), b"before");

    let mut garbage = TcpStream::connect(proxied).unwrap();
    garbage
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    assert!(
        closed_by_peer(&mut garbage, Duration::from_secs(5)),
        "malformed header left open"
    );

    let mut tls_garbage = TcpStream::connect(tls).unwrap();
    tls_garbage.write_all(&payload(9, 300)).unwrap();
    assert!(
        closed_by_peer(&mut tls_garbage, Duration::from_secs(5)),
        "TLS garbage left open"
    );

    // A valid header, and a TLS record header, at one byte per second: both cut at the
    // 2.5 s handshake timeout, not when they would have finished.
    let drip = |to: SocketAddr, bytes: &'static [u8]| {
        let stream = TcpStream::connect(to).unwrap();
        let mut writer = stream.try_clone().unwrap();
        thread::spawn(move || {
            for byte in bytes {
                if writer.write_all(&[*byte]).is_err() {
                    return;
                }
                thread::sleep(Duration::from_secs(1));
            }
        });
        stream
    };
    let started = Instant::now();
    let mut slow_header = drip(proxied, b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\r\n");
    let mut slow_tls = drip(tls, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03");
    assert!(
        closed_by_peer(&mut slow_header, WITHIN),
        "slow header left open"
    );
    assert!(
        closed_by_peer(&mut slow_tls, WITHIN),
        "slow TLS handshake left open"
    );
    let lived = started.elapsed();
    assert!(
        (Duration::from_millis(2400)..Duration::from_secs(6)).contains(&lived),
        "cut after {lived:?}, not at the 2.5 s handshake timeout"
    );

    // The good connection never noticed, and only it reached the upstream.
    assert_eq!(echo_round_trip(&mut good, b"after"), b"after");
    assert_eq!(echo.accepted(), 1);
    let text = relay.scrape();
    let refused = |listener: SocketAddr, reason| {
        metric(
            &text,
            "connections_refused_total",
            &[("listener", &listener.to_string()), ("reason", reason)],
        )
    };
    assert_eq!(refused(proxied, "proxy_header"), 2);
    assert_eq!(refused(tls, "tls_handshake"), 2);
}

/// True if a one-byte echo comes back within 2 s; false if the relay closed the connection.
fn echoes(stream: &mut TcpStream) -> bool {
    stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut byte = [0u8; 1];
    stream.write_all(b"x").is_ok() && matches!(stream.read(&mut byte), Ok(1))
}

pub fn per_ip_limits_refuse_only_the_extra_connection(plane: integration_tests::Plane) {
    let echo = HeaderEcho::start("127.0.0.1:0", Expect::None);
    let target = echo.addr.to_string();
    let Some(relay) = Relay::start(
        plane,
        &target,
        &["--per-ip-connections", "3", "--metrics", "127.0.0.1:0"],
    ) else {
        return;
    };
    let mut held: Vec<TcpStream> = (0..3)
        .map(|_| connect_from(loopback(1), relay.addr).unwrap())
        .collect();
    assert!(held.iter_mut().all(echoes));
    let mut extra = unless_reset(connect_from(loopback(1), relay.addr));
    assert!(
        !extra.as_mut().is_some_and(echoes),
        "a 4th connection from one IP was relayed"
    );
    let mut other = connect_from(loopback(2), relay.addr).unwrap();
    assert!(echoes(&mut other), "another IP was refused");
    held.pop();
    // Until the relay has seen the close, a connect may still be refused with a reset.
    assert!(
        wait_until(WITHIN, || connect_from(loopback(1), relay.addr)
            .is_ok_and(|mut stream| echoes(&mut stream))),
        "the IP never got its slot back"
    );
    let text = relay.scrape();
    let listener = relay.addr.to_string();
    assert!(
        metric(
            &text,
            "connections_refused_total",
            &[("listener", &listener), ("reason", "per_ip_connections")]
        ) >= 1
    );

    // New connections per second: a burst of 20 from one IP meets the limit of 5.
    let Some(relay) = Relay::start(
        plane,
        &target,
        &["--per-ip-rate", "5", "--metrics", "127.0.0.1:0"],
    ) else {
        return;
    };
    let burst: Vec<TcpStream> = (0..20)
        .filter_map(|_| unless_reset(connect_from(loopback(3), relay.addr)))
        .collect();
    let relayed = burst
        .into_iter()
        .filter(|s| echoes(&mut s.try_clone().unwrap()))
        .count();
    assert!(
        (5..20).contains(&relayed),
        "{relayed} of 20 relayed at 5 per second"
    );
    assert!(echoes(&mut connect_from(loopback(4), relay.addr).unwrap()));
    let text = relay.scrape();
    assert_eq!(
        metric(
            &text,
            "connections_refused_total",
            &[
                ("listener", &relay.addr.to_string()),
                ("reason", "per_ip_rate")
            ]
        ),
        20 - relayed as u64
    );
}

pub fn client_addresses_stay_out_of_logs_unless_asked() {
    let echo = HeaderEcho::start("127.0.0.1:0", Expect::None);
    for log_clients in [false, true] {
        let forward = format!("127.0.0.1:0={}", echo.addr);
        let mut args = vec![
            "--forward",
            &forward,
            "--per-ip-connections",
            "1",
            "--dataplane",
            "copy",
        ];
        if log_clients {
            args.push("--log-clients");
        }
        let relay = Relay::spawn_logging(&[], &args, "debug").expect("relay starts");
        let mut first = connect_from(loopback(9), relay.addr).unwrap();
        assert!(echoes(&mut first));
        let mut refused = unless_reset(connect_from(loopback(9), relay.addr));
        assert!(!refused.as_mut().is_some_and(echoes));
        drop((first, refused));
        let (_, lines) = relay.stop(libc::SIGTERM);
        let log = lines.join("\n");
        assert!(log.contains("per_ip_connections"), "{log}");
        assert_eq!(
            log.contains("127.0.0.9"),
            log_clients,
            "--log-clients {log_clients}:\n{log}"
        );
    }
}

pub fn check_names_the_line_and_the_preset_passes_it() {
    for name in ["whatsapp", "whatsapp-quiet"] {
        let output = Command::new(relay_binary())
            .args(["config", "--preset", name])
            .output()
            .expect("run config");
        assert!(output.status.success(), "config --preset {name}");
        let preset = TempFile::new("preset.toml", &String::from_utf8(output.stdout).unwrap());
        let (status, stderr) = run_to_exit(&["check", "--config", preset.path()]);
        assert!(status.success(), "preset {name}: {stderr}");
    }

    let broken = TempFile::new(
        "broken.toml",
        "[pools.chat]\nservers = [\"g.whatsapp.net:5222\"]\n\n[[listener]]\nlisten = \"0.0.0.0:443\"\npool = \"caht\"\n",
    );
    let (status, stderr) = run_to_exit(&["check", "--config", broken.path()]);
    assert_eq!(status.code(), Some(1));
    assert!(
        stderr.contains(&format!("{} line 6: no pool named \"caht\"", broken.path())),
        "{stderr}"
    );
    // The same error stops a start, before anything binds.
    let (status, stderr) = run_to_exit(&["--config", broken.path()]);
    assert_eq!(status.code(), Some(1));
    assert!(stderr.contains("line 6"), "{stderr}");
}

fn plane_relay(plane: integration_tests::Plane, upstream: &str, extra: &[&str]) -> Option<Relay> {
    Relay::start(plane, upstream, extra)
}

/// Bytes counted per direction (by the eBPF program in kernel mode) equal bytes sent.
pub fn metrics_count_the_bytes_sent(plane: integration_tests::Plane) {
    let reply = payload(5, 3 << 20);
    let upstream =
        integration_tests::Upstream::start(integration_tests::Behaviour::Exchange(reply.clone()));
    let Some(relay) = plane_relay(
        plane,
        &upstream.relay_target(),
        &["--metrics", "127.0.0.1:0"],
    ) else {
        return;
    };
    let sent = payload(6, 5 << 20);
    let received =
        integration_tests::exchange(TcpStream::connect(relay.addr).unwrap(), sent.clone()).unwrap();
    assert_eq!(received, integration_tests::Received::of(&reply));
    upstream.next_result(WITHIN).unwrap();
    let listener = relay.addr.to_string();
    assert!(wait_until(WITHIN, || metric(
        &relay.scrape(),
        "connections_open",
        &[("listener", &listener)]
    ) == 0));
    let text = relay.scrape();
    let bytes = |direction| {
        metric(
            &text,
            "bytes_total",
            &[("listener", &listener), ("direction", direction)],
        )
    };
    assert_eq!(bytes("client_to_upstream"), sent.len() as u64);
    assert_eq!(bytes("upstream_to_client"), reply.len() as u64);
    assert_eq!(
        metric(&text, "connections_total", &[("listener", &listener)]),
        1
    );
}

/// Traffic every 300 ms keeps a connection past a 1 s idle timeout; silence then ends it.
pub fn idle_timeout_counts_traffic_both_ways(plane: integration_tests::Plane) {
    let echo = HeaderEcho::start("127.0.0.1:0", Expect::None);
    let Some(relay) = plane_relay(
        plane,
        &echo.addr.to_string(),
        &["--idle-timeout", "1s", "--metrics", "127.0.0.1:0"],
    ) else {
        return;
    };
    let mut stream = TcpStream::connect(relay.addr).unwrap();
    let started = Instant::now();
    loop {
        assert!(
            echoes(&mut stream),
            "an active connection was cut after {:?}",
            started.elapsed()
        );
        if started.elapsed() > Duration::from_millis(2500) {
            break;
        }
        thread::sleep(Duration::from_millis(300));
    }
    assert_cut_at_its_timeout(&mut stream, Instant::now(), "idle");
    assert_timeouts_counted(&relay, "idle");
}

/// The relay's metrics count one timeout, of the kind `reason`, and none of the other.
fn assert_timeouts_counted(relay: &Relay, reason: &str) {
    let text = relay.scrape();
    for kind in ["idle", "half_closed"] {
        assert_eq!(
            metric(&text, "connections_timed_out_total", &[("reason", kind)]),
            u64::from(kind == reason),
            "timeouts of kind {kind}"
        );
    }
}

/// The relay closes `stream` within a few seconds, but not before a 1 s timeout counted
/// from `since` has passed.
fn assert_cut_at_its_timeout(stream: &mut TcpStream, since: Instant, which: &str) {
    assert!(
        closed_by_peer(stream, Duration::from_secs(5)),
        "{which}: the connection stayed open"
    );
    assert!(
        since.elapsed() >= Duration::from_millis(900),
        "{which}: cut before the timeout"
    );
}

/// A client that half-closes while the upstream stays silent is closed after the timeout.
pub fn half_closed_timeout_ends_a_one_sided_connection(plane: integration_tests::Plane) {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let target = silent.local_addr().unwrap().to_string();
    let Some(relay) = plane_relay(
        plane,
        &target,
        &["--half-closed-timeout", "1s", "--metrics", "127.0.0.1:0"],
    ) else {
        return;
    };
    let mut stream = TcpStream::connect(relay.addr).unwrap();
    let (_held, _) = silent.accept().unwrap();
    stream.write_all(b"request").unwrap();
    stream.shutdown(Shutdown::Write).unwrap();
    assert_cut_at_its_timeout(&mut stream, Instant::now(), "half-closed");
    assert_timeouts_counted(&relay, "half_closed");
}

/// A client that half-closes and then downloads for longer than the half-closed timeout
/// keeps its connection while bytes keep coming: the timeout counts silence, not age.
pub fn half_closed_timeout_spares_a_direction_still_moving(plane: integration_tests::Plane) {
    const PIECES: usize = 12;
    const PIECE: &[u8] = b"still coming\n";
    let dribbling = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let target = dribbling.local_addr().unwrap().to_string();
    let Some(relay) = plane_relay(plane, &target, &["--half-closed-timeout", "1s"]) else {
        return;
    };
    let mut stream = TcpStream::connect(relay.addr).unwrap();
    stream.write_all(b"request").unwrap();
    stream.shutdown(Shutdown::Write).unwrap();
    let (mut upstream, _) = dribbling.accept().unwrap();
    let server = thread::spawn(move || {
        let mut request = Vec::new();
        upstream.read_to_end(&mut request).unwrap();
        // Three seconds of answer, a piece every quarter: three half-closed timeouts long.
        for _ in 0..PIECES {
            thread::sleep(Duration::from_millis(250));
            upstream.write_all(PIECE).unwrap();
        }
        request
    });
    let mut answer = Vec::new();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.read_to_end(&mut answer).expect("the whole answer");
    assert_eq!(server.join().unwrap(), b"request");
    assert_eq!(answer, PIECE.repeat(PIECES), "{plane:?}");
}

/// A client that stops reading while the upstream pushes is closed after the idle timeout:
/// the relay's writes to it stall and nothing moves, in whichever plane holds the
/// connection (auto's userspace warm-up included).
pub fn a_client_that_stops_reading_is_closed_when_idle(plane: integration_tests::Plane) {
    let upstream = integration_tests::Upstream::start(integration_tests::Behaviour::Push(1 << 30));
    let Some(relay) = plane_relay(plane, &upstream.relay_target(), &["--idle-timeout", "1s"])
    else {
        return;
    };
    let _never_read = TcpStream::connect(relay.addr).unwrap();
    // The push ends when the relay resets the upstream.
    let pushed = upstream.next_result(Duration::from_secs(30)).expect("push");
    assert!(
        pushed.len < 1 << 30,
        "{plane:?}: the relay took all {} bytes from the upstream",
        pushed.len
    );
}

/// A client that sends to an echo and never reads is closed after the idle timeout, on
/// every plane. With small buffers at both ends, kernel mode lets the echo take a trickle
/// (a small window at each zero-window probe, docs/reliability.md) while the client takes
/// nothing: idle counts how long a peer with bytes waiting for it has taken none. Thirty at
/// once, and a timeout of seconds: before that rule, 5 of 30 still trickled after 30 s,
/// while one alone, or a 1 s timeout, was held and cut like the others.
pub fn a_never_reader_to_an_echo_is_closed_when_idle(plane: integration_tests::Plane) {
    const ENDS: usize = 64 << 10;
    const NEVER_READERS: usize = 30;
    // Measured 6-14 s with the 5 s timeout; the margin is for a slower machine.
    const WITHIN: Duration = Duration::from_secs(60);
    let echo = integration_tests::Upstream::start_with_buffers(
        integration_tests::Behaviour::EchoBy(ENDS),
        ENDS,
    );
    let Some(relay) = plane_relay(
        plane,
        &echo.relay_target(),
        &["--idle-timeout", "5s", "--metrics", "127.0.0.1:0"],
    ) else {
        return;
    };
    let (ended, ending) = std::sync::mpsc::channel();
    for _ in 0..NEVER_READERS {
        let mut client = TcpStream::connect(relay.addr).unwrap();
        integration_tests::lock_buffers(&client, ENDS);
        client
            .set_write_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let ended = ended.clone();
        thread::spawn(move || {
            let (chunk, mut sent) = (vec![7u8; ENDS], 0usize);
            let error = loop {
                match client.write(&chunk) {
                    Ok(n) => sent += n,
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                        ) => {}
                    Err(e) => break e,
                }
            };
            let _ = ended.send((sent, error));
        });
    }
    let started = Instant::now();
    let mut endings = Vec::new();
    for n in 0..NEVER_READERS {
        let (sent, error) = ending
            .recv_timeout(WITHIN.saturating_sub(started.elapsed()))
            .unwrap_or_else(|_| {
                panic!(
                    "{plane:?}: {} never-readers still sending after {WITHIN:?}; ended so far: {endings:?}",
                    NEVER_READERS - n
                )
            });
        assert!(sent > 0, "{plane:?}: nothing was relayed ({error})");
        endings.push((sent >> 10, error.kind()));
    }
    eprintln!(
        "{plane:?}: {NEVER_READERS} never-readers ended in {:?}",
        started.elapsed()
    );
    let text = relay.scrape();
    assert_eq!(
        metric(&text, "connections_timed_out_total", &[("reason", "idle")]),
        NEVER_READERS as u64,
        "{plane:?}: idle timeouts; the clients' KiB sent and endings: {endings:?}"
    );
}

pub fn pool_fails_over_to_the_next_server_and_reports_health() {
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    let alive = HeaderEcho::start("127.0.0.1:0", Expect::None);
    let (relay, _file) = relay_with_config(
        &format!(
            "[pools.chat]\nservers = [\"{dead_addr}\", \"{}\"]\nhealth_interval = \"200ms\"\n\
             [[listener]]\nlisten = \"127.0.0.1:0\"\npool = \"chat\"\n",
            alive.addr
        ),
        &["--per-ip-rate", "0"],
    );
    for _ in 0..3 {
        let stream = TcpStream::connect(relay.addr).unwrap();
        echo_and_finish(&stream, b"over the fallback", tcp_shutdown(&stream));
    }
    let text = relay.scrape();
    assert_eq!(
        metric(&text, "upstream_up", &[("server", &dead_addr.to_string())]),
        0
    );
    assert_eq!(
        metric(&text, "upstream_up", &[("server", &alive.addr.to_string())]),
        1
    );
}

pub fn listener_limit_queues_the_extra_client_until_a_slot_frees() {
    let echo = HeaderEcho::start("127.0.0.1:0", Expect::None);
    let (relay, _file) = relay_with_config(
        &format!(
            "[pools.p]\nservers = [\"{}\"]\n[[listener]]\nlisten = \"127.0.0.1:0\"\npool = \"p\"\nmax_connections = 1\n\
             [[listener]]\nlisten = \"127.0.0.1:0\"\npool = \"p\"\n",
            echo.addr
        ),
        &["--per-ip-rate", "0"],
    );
    let (limited, open) = (relay.addrs[0], relay.addrs[1]);
    let mut first = TcpStream::connect(limited).unwrap();
    assert!(echoes(&mut first));
    // The second waits in the kernel's backlog: connected, but not relayed yet.
    let mut second = TcpStream::connect(limited).unwrap();
    assert!(
        !echoes(&mut second),
        "a second connection was relayed past max_connections = 1"
    );
    // Other listeners are not held back by this one's limit.
    assert!(echoes(&mut TcpStream::connect(open).unwrap()));
    drop(first);
    let mut byte = [0u8; 1];
    second.set_read_timeout(Some(WITHIN)).unwrap();
    second
        .read_exact(&mut byte)
        .expect("relayed once the first closed");
    assert_eq!(&byte, b"x");
}
