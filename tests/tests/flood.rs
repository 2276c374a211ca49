//! Many connections: a flood from many loopback addresses meets the per-IP limits an
//! operator set while a legitimate client keeps being served and /metrics keeps answering;
//! and without such limits, the default, one address's thousand connections are all served.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use integration_tests::{Expect, HeaderEcho, Relay, connect_from, http_get, metric, raw, reset};

/// The flood: attempts per second offered, for how long, from how many source addresses.
const RATE: u64 = 20_000;
const SECONDS: u64 = 3;
const ATTEMPTS: u64 = RATE * SECONDS;
const SOURCES: u32 = 250;
const PER_IP_RATE: u64 = 10;
const FLOODERS: u64 = 4;

/// An upstream that accepts and closes at once: the flood's connections carry nothing.
fn sink() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for stream in listener.incoming() {
            drop(stream);
        }
    });
    addr
}

/// Sends a SYN from `source` without waiting for the handshake, then resets: an attempt
/// costs the flooder almost nothing, as in a real flood. True if connect did not fail.
fn hit(source: Ipv4Addr, to: SocketAddrV4) -> bool {
    let Ok(socket) = raw::bound_socket(SocketAddrV4::new(source, 0), true) else {
        return false;
    };
    let started = raw::connect(&socket, to).is_ok();
    reset(TcpStream::from(socket));
    started
}

pub fn flood_from_many_addresses_keeps_limits_and_service() {
    let forward = format!("127.0.0.1:0={}", sink());
    let rate = PER_IP_RATE.to_string();
    let relay = Relay::spawn(&[
        "--forward",
        &forward,
        "--dataplane",
        "copy",
        "--per-ip-rate",
        &rate,
        "--per-ip-connections",
        "16",
        "--metrics",
        "127.0.0.1:0",
        "--max-connections",
        "20000",
    ])
    .expect("relay starts");
    let addr = relay.addr;
    let SocketAddr::V4(target) = addr else {
        panic!("an IPv4 listener")
    };
    let metrics = relay.metrics.expect("metrics");
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let flooders: Vec<_> = (0..FLOODERS)
        .map(|_| {
            let next = Arc::clone(&next);
            thread::spawn(move || {
                let mut connected = 0u64;
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= ATTEMPTS {
                        return connected;
                    }
                    // Paced to RATE overall: attempt i is due at i / RATE seconds.
                    let due = started + Duration::from_secs_f64(i as f64 / RATE as f64);
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        thread::sleep(wait);
                    }
                    let n = 10 + (i % u64::from(SOURCES)) as u32;
                    let source = Ipv4Addr::new(127, 1, (n >> 8) as u8, n as u8);
                    connected += u64::from(hit(source, target));
                }
            })
        })
        .collect();
    // Meanwhile: scrapes answer, and a client from its own address is relayed.
    let mut scrape_worst = Duration::ZERO;
    let (mut legit_tries, mut legit_ok) = (0u64, 0u64);
    while next.load(Ordering::Relaxed) < ATTEMPTS {
        legit_tries += 1;
        let t = Instant::now();
        let text = http_get(metrics, "/metrics");
        scrape_worst = scrape_worst.max(t.elapsed());
        assert!(text.contains("ebpf_proxy_connections_total"));
        let mut legit =
            connect_from("127.0.9.9".parse().unwrap(), addr).expect("legitimate client connects");
        // The sink closes at once: being relayed means a clean EOF, not a reset.
        let mut byte = [0u8; 1];
        legit
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        if matches!(legit.read(&mut byte), Ok(0)) {
            legit_ok += 1;
        }
        // Well within its own per-IP rate.
        thread::sleep(Duration::from_millis(150));
    }
    let connected: u64 = flooders.into_iter().map(|f| f.join().unwrap()).sum();
    let elapsed = started.elapsed();

    let text = http_get(metrics, "/metrics");
    let listener = addr.to_string();
    let total = metric(&text, "connections_total", &[("listener", &listener)]);
    let refused = metric(
        &text,
        "connections_refused_total",
        &[("listener", &listener), ("reason", "per_ip_rate")],
    ) + metric(
        &text,
        "connections_refused_total",
        &[("listener", &listener), ("reason", "per_ip_connections")],
    );
    let admitted_flood = total - refused - legit_ok;
    // Each address may open a second's burst plus its rate for the time the flood lasted.
    let bound =
        u64::from(SOURCES) * (PER_IP_RATE + PER_IP_RATE * elapsed.as_secs().max(1) + PER_IP_RATE);
    eprintln!(
        "flood: {ATTEMPTS} attempts ({connected} connect calls without error) in {elapsed:?} ({:.0}/s offered) from {SOURCES} addresses; relay accepted {total}, admitted {admitted_flood} (bound {bound}), refused {refused}; legitimate client served {legit_ok} of {legit_tries}; slowest scrape {scrape_worst:?}",
        ATTEMPTS as f64 / elapsed.as_secs_f64()
    );
    assert!(
        admitted_flood <= bound,
        "per-IP limits did not hold: {admitted_flood} > {bound}"
    );
    assert!(refused > 0);
    assert_eq!(
        legit_ok, legit_tries,
        "the legitimate client was refused during the flood"
    );
    assert!(
        scrape_worst < Duration::from_secs(2),
        "metrics answered in {scrape_worst:?}"
    );
}

/// Connections one address holds open at once in [`one_address_is_never_refused`]: what a
/// carrier NAT's users look like from the relay.
const FROM_ONE_ADDRESS: usize = 1000;

/// With the defaults, one address may open as many connections as the relay holds: a
/// plain forward and the preset each serve a thousand at once from 127.0.0.1, and refuse
/// none.
pub fn one_address_is_never_refused() {
    raise_descriptor_limit(4 * FROM_ONE_ADDRESS as u64 + 256);
    let echo = HeaderEcho::start("127.0.0.1:0", Expect::None);
    let forward = format!("127.0.0.1:0={}", echo.addr);
    // Under load the relay's connects to the test's echo may need a SYN retransmission or
    // two, which is not a refusal.
    let patient = ["--connect-timeout", "30s"];
    let relay = Relay::spawn(
        &[
            &["--forward", &forward, "--metrics", "127.0.0.1:0"][..],
            &patient,
        ]
        .concat(),
    )
    .unwrap_or_else(|log| panic!("relay did not start:\n{log}"));
    all_served(&relay, relay.addr, "a plain forward");

    // Addresses of its own: an echo thread keeps its port for the rest of the process.
    let chat = HeaderEcho::start("127.0.0.5:5222", Expect::V1);
    let relay = Relay::spawn(&[
        "--preset",
        "whatsapp",
        "--bind",
        "127.0.0.1",
        "--resolve",
        "g.whatsapp.net=127.0.0.5",
        "--resolve",
        "g-fallback.whatsapp.net=127.0.0.6",
        "--resolve",
        "whatsapp.net=127.0.0.7",
        "--metrics",
        "127.0.0.1:0",
        patient[0],
        patient[1],
    ])
    .unwrap_or_else(|log| panic!("the preset did not start:\n{log}"));
    all_served(
        &relay,
        "127.0.0.1:5222".parse().unwrap(),
        "the preset's 5222",
    );
    drop(chat);
}

/// Opens [`FROM_ONE_ADDRESS`] connections to `addr`, all held open at once, then has each
/// carry a message there and back.
fn all_served(relay: &Relay, addr: SocketAddr, what: &str) {
    let mut streams: Vec<TcpStream> = (0..FROM_ONE_ADDRESS)
        .map(|i| TcpStream::connect(addr).unwrap_or_else(|e| panic!("{what}: connection {i}: {e}")))
        .collect();
    for (i, stream) in streams.iter_mut().enumerate() {
        stream
            .set_read_timeout(Some(Duration::from_secs(45)))
            .expect("timeout");
        let message = format!("connection {i:04} of one address");
        stream.write_all(message.as_bytes()).expect("send");
        let mut back = vec![0u8; message.len()];
        stream.read_exact(&mut back).unwrap_or_else(|e| {
            panic!(
                "{what}: connection {i} was not served: {e}; the relay's metrics:\n{}",
                relay.scrape()
            )
        });
        assert_eq!(back, message.as_bytes(), "{what}: connection {i}");
    }
    let scrape = relay.scrape();
    let refused: u64 = scrape
        .lines()
        .filter(|l| l.starts_with("ebpf_proxy_connections_refused_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert_eq!(refused, 0, "{what}: refusals in\n{scrape}");
    let open: u64 = scrape
        .lines()
        .filter(|l| l.starts_with("ebpf_proxy_connections_open{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert_eq!(
        open, FROM_ONE_ADDRESS as u64,
        "{what}: connections open at once"
    );
}

/// Raises this process's soft descriptor limit to at least `wanted` (up to the hard one).
fn raise_descriptor_limit(wanted: u64) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        if limit.rlim_cur < wanted {
            limit.rlim_cur = wanted.min(limit.rlim_max);
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
        }
    }
    assert!(
        limit.rlim_cur >= wanted,
        "this test needs {wanted} descriptors; the hard limit is {}",
        limit.rlim_max
    );
}
