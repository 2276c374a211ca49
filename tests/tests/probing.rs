//! Staying reachable, against real peers: with a fallback, curl's requests to the preset's
//! ports get an nginx site's page and never reach WhatsApp's side, while clients that open
//! with the chat prologue (or, on the media ports, a ClientHello) reach their pool byte for
//! byte, in the kernel on plain ports; silent and slow probes go to the site once the
//! handshake timeout passes.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    process::Command,
    time::Duration,
};

use integration_tests::{
    Expect, HeaderEcho, Plane, Relay, Site, bpf_required, echo_and_finish, echo_round_trip, metric,
    payload, relay_binary, tcp_shutdown, tls_client, v1, wait_until,
};

const WITHIN: Duration = Duration::from_secs(10);
/// The fallback site's port, on an address of its own: below the ephemeral range.
const SITE_PORT: u16 = 18080;

fn at(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

pub fn probes_get_the_fallback_site_and_whatsapp_clients_their_pool(plane: Plane) {
    let site = Site::start(SocketAddr::from(([127, 0, 0, 5], SITE_PORT)));
    // Each plane's run has upstreams of its own: an echo's listener lives as long as the
    // test process.
    let net = match plane {
        Plane::Kernel => 10,
        Plane::Auto => 20,
        Plane::Splice => 30,
        Plane::Copy => 40,
    };
    let chat_http = HeaderEcho::start(&format!("127.0.{net}.2:80"), Expect::V1);
    let chat = HeaderEcho::start(&format!("127.0.{net}.2:5222"), Expect::V1);
    let media = HeaderEcho::start(&format!("127.0.{net}.4:443"), Expect::None);
    let fallback = site.addr.to_string();
    let pins = [
        format!("g.whatsapp.net=127.0.{net}.2"),
        format!("g-fallback.whatsapp.net=127.0.{net}.3"),
        format!("whatsapp.net=127.0.{net}.4"),
    ];
    let args = [
        "--preset",
        "whatsapp",
        "--bind",
        "127.0.0.1",
        "--dataplane",
        plane.arg(),
        "--resolve",
        &pins[0],
        "--resolve",
        &pins[1],
        "--resolve",
        &pins[2],
        "--fallback",
        &fallback,
        "--handshake-timeout",
        "1s",
        "--metrics",
        "127.0.0.1:0",
    ];
    let mut relay = match Relay::spawn(&args) {
        Ok(relay) => relay,
        Err(log) if plane == Plane::Kernel && !bpf_required() => {
            return eprintln!("SKIPPED: kernel data plane unavailable:\n{log}");
        }
        Err(log) => panic!("relay did not start:\n{log}"),
    };

    // A scanner's requests: plain HTTP on the chat and media ports, HTTPS on 443.
    for url in [
        "http://127.0.0.1:80/",
        "http://127.0.0.1:5222/",
        "https://127.0.0.1:443/",
        "http://127.0.0.1:587/",
    ] {
        let out = Command::new("curl")
            .args(["-sSk", "--max-time", "10", url])
            .output()
            .expect("run curl");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            Site::PAGE,
            "{url}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let fell_back = |relay: &Relay, port: u16| {
        metric(
            &relay.scrape(),
            "fallback_total",
            &[("listener", &at(port).to_string())],
        )
    };
    for port in [80, 5222, 443, 587] {
        assert_eq!(fell_back(&relay, port), 1, "port {port}");
    }
    // `ebpf-proxy status` shows the same for a person.
    let metrics = relay.metrics.unwrap().to_string();
    let status = Command::new(relay_binary())
        .args(["status", "--metrics", &metrics])
        .output()
        .expect("run status");
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.contains(
            "sent to the fallback (opened otherwise than WhatsApp): 127.0.0.1:80 1, \
             127.0.0.1:443 1, 127.0.0.1:587 1, 127.0.0.1:5222 1"
        ),
        "{status}"
    );

    // The chat prologue, with and without an edge-routing prefix, reaches its pool byte for
    // byte on every port, with the header it is due; on the plain ports without a PROXY
    // header the connection is in the kernel's map.
    let data = payload(21, 256 * 1024);
    let prologue = [
        b"WA\x06\x05".to_vec(),
        b"ED\x00\x01\x00\x00\x03abcWA\x06\x03".to_vec(),
    ];
    // What a load balancer in front of 8080, 8222 and 8443 says about the real client.
    let claimed = (
        "198.51.100.7:40001".parse::<SocketAddr>().unwrap(),
        "203.0.113.9:443".parse::<SocketAddr>().unwrap(),
    );
    let header = v1(claimed.0, claimed.1);
    for (port, upstream, accepts_proxy) in [
        (80, &chat_http, false),
        (8080, &chat_http, true),
        (5222, &chat, false),
        (8222, &chat, true),
    ] {
        for opening in &prologue {
            let stream = TcpStream::connect(at(port)).expect("connect");
            let client = stream.local_addr().unwrap();
            let sent = [opening.as_slice(), &data].concat();
            let (first, expected) = match accepts_proxy {
                true => ([header.as_slice(), &sent].concat(), header.clone()),
                false => (sent.clone(), v1(client, at(port))),
            };
            (&stream).write_all(&first).unwrap();
            let mut back = vec![0u8; sent.len()];
            (&stream).read_exact(&mut back).unwrap();
            assert!(back == sent, "port {port}: the echo differs");
            assert_eq!(upstream.next_header(WITHIN), expected, "port {port}");
            // Where no header was read, nothing was: the connection is in the kernel.
            if plane == Plane::Kernel && !accepts_proxy {
                assert!(
                    wait_until(WITHIN, || relay.status().sockets_in_map == Some(2)),
                    "port {port}: the connection is not in the kernel's map"
                );
            }
            echo_and_finish(&stream, b"", tcp_shutdown(&stream));
        }
    }
    // Inside TLS: on 443, and on 8443 after a PROXY header.
    for (port, accepts_proxy) in [(443, false), (8443, true)] {
        let mut stream = TcpStream::connect(at(port)).expect("connect");
        let client = stream.local_addr().unwrap();
        if accepts_proxy {
            stream.write_all(&header).unwrap();
        }
        let mut tls = tls_client(stream);
        let sent = [prologue[0].as_slice(), &data[..64 * 1024]].concat();
        assert!(
            echo_round_trip(&mut tls, &sent) == sent,
            "port {port}: the echo differs"
        );
        // close_notify ends the TLS stream; the relay half-closes the upstream on it.
        tls.conn.send_close_notify();
        tls.flush().unwrap();
        let _ = tls.read_to_end(&mut Vec::new());
        let expected = match accepts_proxy {
            true => header.clone(),
            false => v1(client, at(port)),
        };
        assert_eq!(chat.next_header(WITHIN), expected, "port {port}");
    }
    // A ClientHello on the media ports reaches the media pool, with no header.
    let hello = [&b"\x16\x03\x01\x02\x00\x01"[..], &data[..4096]].concat();
    for port in [587, 7777] {
        let stream = TcpStream::connect(at(port)).expect("connect");
        echo_and_finish(&stream, &hello, tcp_shutdown(&stream));
        assert_eq!(media.next_header(WITHIN), b"", "port {port}");
    }

    // A silent probe and one that stops inside the prologue go to the site when the
    // handshake timeout passes; the silent one then gets the page for its request.
    let mut silent = TcpStream::connect(at(5222)).expect("connect");
    let mut slow = TcpStream::connect(at(80)).expect("connect");
    slow.write_all(b"WA").unwrap();
    assert!(wait_until(WITHIN, || fell_back(&relay, 5222) == 2
        && fell_back(&relay, 80) == 2));
    silent
        .write_all(b"GET / HTTP/1.0\r\nHost: relay.test\r\n\r\n")
        .unwrap();
    let mut response = String::new();
    silent.read_to_string(&mut response).unwrap();
    assert!(response.ends_with(Site::PAGE), "{response}");
    drop(slow);
    // None of the probes reached WhatsApp's side (health checks send nothing and are not
    // reported).
    for upstream in [&chat_http, &chat, &media] {
        assert!(!upstream.saw_connection(Duration::from_millis(200)));
    }
}
