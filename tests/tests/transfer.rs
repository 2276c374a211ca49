//! Bytes arrive intact: every size, each direction and both at once, whoever speaks first.

use std::{
    io::{Read, Write},
    net::{Shutdown, TcpStream},
    thread,
    time::Duration,
};

use integration_tests::{
    Behaviour, Expect, HeaderEcho, Plane, Received, Relay, Upstream, bpf_required, echo_round_trip,
    exchange, full_listener, metric, payload, raw, read_to_end_hashed, wait_until,
};

const DEADLINE: Duration = Duration::from_secs(60);

fn connect(relay: &Relay) -> TcpStream {
    TcpStream::connect(relay.addr).expect("connect to relay")
}

pub fn sizes_verify_each_direction_and_both(plane: Plane) {
    for size in [0, 1, 4 << 10, 1 << 20, 64 << 20] {
        for (up, down) in [(size, 0), (0, size), (size, size)] {
            let from_client = payload(size as u64 + 1, up);
            let from_upstream = payload(size as u64 + 2, down);
            let upstream = Upstream::start(Behaviour::Exchange(from_upstream.clone()));
            let Some(relay) = Relay::start(plane, &upstream.relay_target(), &[]) else {
                return;
            };
            let client_got =
                exchange(connect(&relay), from_client.clone()).expect("client exchange");
            let upstream_got = upstream.next_result(DEADLINE).expect("upstream exchange");
            assert_eq!(
                client_got,
                Received::of(&from_upstream),
                "{plane:?}: upstream->client, {up} up / {down} down"
            );
            assert_eq!(
                upstream_got,
                Received::of(&from_client),
                "{plane:?}: client->upstream, {up} up / {down} down"
            );
        }
    }
}

/// A retransmitted segment that repeats bytes the relay already has, then carries new ones,
/// goes on without the repeat. TCP queues such a segment whole and recv() skips the repeated
/// head by sequence number; the kernel plane's program has to trim it itself. The client's
/// own next segment then overlaps the new bytes too, the usual shape after a lost ACK.
pub fn overlapping_retransmission_goes_on_once(plane: Plane) {
    let data = payload(21, 256 << 10);
    let (first, rest) = data.split_at(16 << 10);
    let (repeat, new) = (1000, 3000);
    // An upstream that says when the first part is through: the relay has then handed it on
    // (for kernel mode, its program has seen it), so the overlap meets a running relay.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind upstream");
    let target = listener.local_addr().expect("upstream address").to_string();
    let (first_through, first_arrived) = std::sync::mpsc::channel();
    let first_len = first.len();
    let upstream = thread::spawn(move || {
        let (mut stream, _) = listener.accept()?;
        let mut all = vec![0u8; first_len];
        stream.read_exact(&mut all)?;
        let _ = first_through.send(());
        stream.read_to_end(&mut all)?;
        std::io::Result::Ok(Received::of(&all))
    });
    // The program's own debug lines too: kernel mode logs the trim.
    let logging = ["env", "RUST_LOG=info,ebpf_proxy::program=debug"];
    let Some(mut relay) = Relay::start_via(plane, &logging, &target, &["--metrics", "127.0.0.1:0"])
    else {
        return;
    };
    let mut client = connect(&relay);
    client.write_all(first).expect("send the first part");
    first_arrived
        .recv_timeout(DEADLINE)
        .unwrap_or_else(|_| panic!("{plane:?}: the first part never reached the upstream"));
    assert!(
        wait_until(DEADLINE, || raw::unacknowledged(&client).expect("SIOCOUTQ")
            == 0),
        "{plane:?}: the relay never acknowledged the first part"
    );
    let sequences = raw::sequences(&client).expect("read the client's sequence numbers");
    let std::net::SocketAddr::V4(from) = client.local_addr().expect("client address") else {
        unreachable!("the client connects over IPv4")
    };
    let std::net::SocketAddr::V4(to) = relay.addr else {
        unreachable!("the relay listens on IPv4")
    };
    let mut segment = first[first.len() - repeat..].to_vec();
    segment.extend_from_slice(&rest[..new]);
    raw::send_segment(
        from,
        to,
        sequences.send.wrapping_sub(repeat as u32),
        sequences.receive,
        &segment,
    )
    .expect("send the overlapping segment");
    client.write_all(rest).expect("send the rest");
    client.shutdown(Shutdown::Write).expect("half-close");
    let got = upstream
        .join()
        .expect("upstream thread")
        .expect("upstream read");
    assert_eq!(
        got,
        Received::of(&data),
        "{plane:?}: bytes repeated or lost"
    );
    if plane == Plane::Kernel {
        // At least the injected segment's repeat, counted once the connection has closed.
        let trimmed = || {
            metric(
                &relay.scrape(),
                "kernel_retransmitted_bytes_trimmed_total",
                &[],
            )
        };
        assert!(
            wait_until(DEADLINE, || trimmed() >= repeat as u64),
            "the program trimmed {} bytes, expected at least {repeat}",
            trimmed()
        );
        let line = relay
            .wait_for_line("repeated bytes off a retransmitted segment", DEADLINE)
            .unwrap_or_else(|| panic!("the program logged no trim:\n{}", relay.lines.join("\n")));
        assert!(line.contains("ebpf_proxy::program"), "{line}");
    }
}

pub fn client_speaks_first_then_half_closes(plane: Plane) {
    let reply = payload(11, 1 << 20);
    let upstream = Upstream::start(Behaviour::ReplyAfterEof(reply.clone()));
    let Some(relay) = Relay::start(plane, &upstream.relay_target(), &[]) else {
        return;
    };
    let request = payload(12, 3000);
    let mut client = connect(&relay);
    // The request goes out the instant the connection exists, before the relay has even
    // reached the upstream; the write side closes right after.
    client.write_all(&request).expect("send request");
    client.shutdown(Shutdown::Write).expect("half-close");
    let got = read_to_end_hashed(&mut client).expect("read reply");
    assert_eq!(
        upstream.next_result(DEADLINE).expect("upstream"),
        Received::of(&request)
    );
    assert_eq!(
        got,
        Received::of(&reply),
        "{plane:?}: the whole reply arrives after the client's FIN"
    );
}

pub fn upstream_speaks_first(plane: Plane) {
    let banner = payload(21, 2048);
    let upstream = Upstream::start(Behaviour::BannerThenEcho(banner.clone()));
    let Some(relay) = Relay::start(plane, &upstream.relay_target(), &[]) else {
        return;
    };
    let mut client = connect(&relay);
    let mut got_banner = vec![0u8; banner.len()];
    client
        .read_exact(&mut got_banner)
        .expect("banner arrives before the client says anything");
    assert_eq!(got_banner, banner);
    let body = payload(22, 256 << 10);
    let echoed = exchange(client, body.clone()).expect("echo");
    assert_eq!(echoed, Received::of(&body));
    assert_eq!(
        upstream.next_result(DEADLINE).expect("upstream"),
        Received::of(&body)
    );
}

pub fn upstream_half_closes_first(plane: Plane) {
    let from_upstream = payload(31, 1 << 20);
    let upstream = Upstream::start(Behaviour::Exchange(from_upstream.clone()));
    let Some(relay) = Relay::start(plane, &upstream.relay_target(), &[]) else {
        return;
    };
    let mut client = connect(&relay);
    // Read the upstream's whole stream and its FIN first, then keep talking.
    let got = read_to_end_hashed(&mut client).expect("upstream stream");
    assert_eq!(got, Received::of(&from_upstream));
    let late = payload(32, 1 << 20);
    client
        .write_all(&late)
        .expect("client keeps sending after the upstream's FIN");
    client.shutdown(Shutdown::Write).expect("half-close");
    assert_eq!(
        upstream.next_result(DEADLINE).expect("upstream"),
        Received::of(&late)
    );
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).expect("clean end");
    assert!(rest.is_empty());
}

pub fn concurrent_connections_of_random_sizes_verify(plane: Plane) {
    let upstream = Upstream::start(Behaviour::BannerThenEcho(Vec::new()));
    let Some(relay) = Relay::start(plane, &upstream.relay_target(), &[]) else {
        return;
    };
    let addr = relay.addr;
    let clients: Vec<_> = (0..200u64)
        .map(|i| {
            thread::spawn(move || {
                let size = (rand::random::<u32>() % (256 << 10)) as usize;
                let data = payload(1000 + i, size);
                let stream = TcpStream::connect(addr).expect("connect");
                (
                    exchange(stream, data.clone()).expect("echo"),
                    Received::of(&data),
                )
            })
        })
        .collect();
    for (i, client) in clients.into_iter().enumerate() {
        let (got, sent) = client.join().expect("client thread");
        assert_eq!(got, sent, "{plane:?}: connection {i} came back altered");
    }
}

/// A socket whose FIN arrived before it could join the sockhash cannot join it any more;
/// that connection must still arrive intact, relayed in userspace. The relay's upstream
/// connect is held back (the upstream's accept queue is full, so its SYN waits for the
/// retransmit a second later) while the client sends its request and FIN.
pub fn kernel_falls_back_when_a_fin_came_first(plane: Plane) {
    let (upstream, fillers) = full_listener();
    let target = upstream.local_addr().expect("upstream address");
    let Some(mut relay) = Relay::start(plane, &target.to_string(), &[]) else {
        return;
    };
    let request = payload(51, 5000);
    let mut client = connect(&relay);
    client.write_all(&request).expect("send");
    client.shutdown(Shutdown::Write).expect("half-close");
    // Free the queue: the relay's retransmitted SYN now gets through.
    drop(fillers);
    let (_filler, _) = upstream.accept().expect("the filler");
    let (mut relayed, _) = upstream.accept().expect("the relay's connection");
    assert_eq!(
        read_to_end_hashed(&mut relayed).expect("request"),
        Received::of(&request)
    );
    let reply = payload(52, 64 << 10);
    relayed.write_all(&reply).expect("reply");
    relayed.shutdown(Shutdown::Write).expect("close");
    assert_eq!(
        read_to_end_hashed(&mut client).expect("reply"),
        Received::of(&reply)
    );
    let fallbacks = relay
        .status()
        .userspace_fallbacks
        .expect("kernel status has fallbacks");
    assert_eq!(
        fallbacks, 1,
        "the connection was expected to take the userspace fallback"
    );
}

/// `auto`'s rule (README, "How it works"): a connection that ends within its warm-up never
/// enters the sockhash; one that outlives it, or carries a bulk of bytes, moves in once,
/// mid-stream, without losing or repeating a byte.
pub fn auto_keeps_short_connections_in_userspace_and_moves_long_ones_into_the_kernel(plane: Plane) {
    let echo = HeaderEcho::start("127.0.0.1:0", Expect::None);
    let Some(relay) = Relay::start(plane, &echo.addr.to_string(), &["--metrics", "127.0.0.1:0"])
    else {
        return;
    };
    if !relay.scrape().contains("dataplane=\"kernel\"") {
        assert!(!bpf_required(), "auto did not load the kernel data plane");
        eprintln!("SKIPPED: auto runs without the kernel data plane here");
        return;
    }
    let listener = relay.addr.to_string();
    let value = |name| metric(&relay.scrape(), name, &[]);
    let open = || {
        metric(
            &relay.scrape(),
            "connections_open",
            &[("listener", &listener)],
        )
    };
    for i in 0..50 {
        let mut client = connect(&relay);
        let request = payload(70 + i, 64);
        assert_eq!(echo_round_trip(&mut client, &request), request);
    }
    assert!(wait_until(DEADLINE, || open() == 0));
    assert_eq!(
        value("kernel_promoted_total"),
        0,
        "a short connection entered the kernel"
    );
    // Quiet but long: the warm-up's clock hands it over.
    let mut client = connect(&relay);
    assert_eq!(echo_round_trip(&mut client, b"x"), b"x");
    assert!(
        wait_until(DEADLINE, || value("kernel_promoted_total") == 1),
        "a connection past its warm-up stayed in userspace"
    );
    assert_eq!(value("kernel_sockets"), 2);
    let later = payload(80, 1 << 20);
    assert_eq!(
        exchange(client, later.clone()).expect("echo"),
        Received::of(&later)
    );
    // A bulk transfer from the first byte: handed over mid-stream, both ways at once.
    let bulk = payload(81, 16 << 20);
    assert_eq!(
        exchange(connect(&relay), bulk.clone()).expect("echo"),
        Received::of(&bulk)
    );
    assert_eq!(value("kernel_promoted_total"), 2);
    assert!(wait_until(DEADLINE, || open() == 0));
    assert_eq!(value("kernel_sockets"), 0, "sockhash entries left behind");
    let text = relay.scrape();
    let bytes = |direction| {
        metric(
            &text,
            "bytes_total",
            &[("listener", &listener), ("direction", direction)],
        )
    };
    let expected = 50 * 64 + 1 + later.len() as u64 + bulk.len() as u64;
    assert_eq!(bytes("client_to_upstream"), expected);
    assert_eq!(bytes("upstream_to_client"), expected);
}

/// A direction whose backlog outruns the hard limit leaves the kernel for userspace and comes
/// back once userspace has moved what was kept. With the limit lowered to 64 KiB (256 KiB
/// hard), 64 MiB exchanges at loopback speed do that again and again, both ways at once:
/// every byte must still arrive once and in order.
pub fn detached_flows_come_back_into_the_kernel_in_order(plane: Plane) {
    let from_upstream = payload(92, 64 << 20);
    let upstream = Upstream::start(Behaviour::Exchange(from_upstream.clone()));
    let forward = format!("127.0.0.1:0={}", upstream.relay_target());
    let args = [
        "--forward",
        &forward,
        "--dataplane",
        plane.arg(),
        "--metrics",
        "127.0.0.1:0",
    ];
    let relay = match Relay::spawn_via(&["env", "EBPF_PROXY_BACKLOG_LIMIT=65536"], &args) {
        Ok(relay) => relay,
        Err(output) if !bpf_required() => {
            eprintln!("SKIPPED: kernel data plane unavailable:\n{output}");
            return;
        }
        Err(output) => panic!("relay did not start:\n{output}"),
    };
    for run in 0..3 {
        let from_client = payload(93 + run, 64 << 20);
        let client_got = exchange(connect(&relay), from_client.clone()).expect("client exchange");
        let upstream_got = upstream.next_result(DEADLINE).expect("upstream exchange");
        assert_eq!(client_got, Received::of(&from_upstream), "upstream->client");
        assert_eq!(upstream_got, Received::of(&from_client), "client->upstream");
    }
    let value = |name| metric(&relay.scrape(), name, &[]);
    let (detached, resumed) = (
        value("kernel_detached_total"),
        value("kernel_resumed_total"),
    );
    eprintln!("{detached} detachments, {resumed} resumptions");
    assert!(
        detached > 0,
        "no direction left the kernel: the test proves nothing"
    );
    assert!(
        resumed > 0,
        "no detached direction came back into the kernel"
    );
    assert!(wait_until(DEADLINE, || value("kernel_sockets") == 0));
}

pub fn ipv6_client_reaches_ipv4_upstream(plane: Plane) {
    let from_upstream = payload(61, 1 << 20);
    let upstream = Upstream::start(Behaviour::Exchange(from_upstream.clone()));
    let Some(relay) = Relay::start_on(plane, "[::1]:0", &upstream.relay_target(), &[]) else {
        return;
    };
    assert!(relay.addr.is_ipv6(), "listening on {}", relay.addr);
    let from_client = payload(62, 1 << 20);
    let got = exchange(connect(&relay), from_client.clone()).expect("exchange");
    assert_eq!(got, Received::of(&from_upstream));
    assert_eq!(
        upstream.next_result(DEADLINE).expect("upstream"),
        Received::of(&from_client)
    );
}
