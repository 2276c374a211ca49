//! Resources stay bounded: nothing leaks across connections, a slow reader cannot make the
//! relay or the kernel buffer without limit, and kernel mode keeps bytes out of the process.

use std::{
    io::{self, Read, Write},
    net::{Shutdown, TcpStream},
    thread,
    time::{Duration, Instant},
};

use sha2::{Digest as _, Sha256};

use integration_tests::{
    Behaviour, Plane, Received, Relay, Upstream, available_kib, exchange, is_root, metric, payload,
    reset, send_buffers_on_port, wait_until,
};

pub fn sequential_connections_leave_nothing_behind(plane: Plane) {
    let upstream = Upstream::start(Behaviour::BannerThenEcho(Vec::new()));
    let Some(mut relay) = Relay::start(plane, &upstream.relay_target(), &[]) else {
        return;
    };
    let addr = relay.addr;
    let one = |i: u64| {
        let data = payload(i, 100);
        let got = exchange(TcpStream::connect(addr).expect("connect"), data.clone()).expect("echo");
        assert_eq!(got, Received::of(&data), "connection {i}");
    };
    // Warm up once so lazily created runtime state is part of the baseline.
    one(0);
    assert!(wait_until(Duration::from_secs(5), || relay
        .status()
        .connections
        == 0));
    let (fds, tasks) = (relay.open_fds(), relay.status().tasks);
    for i in 1..=1000 {
        one(i);
    }
    assert!(
        wait_until(Duration::from_secs(10), || relay.status().connections == 0),
        "{plane:?}: connections still open after all clients finished"
    );
    let status = relay.status();
    assert_eq!(relay.open_fds(), fds, "{plane:?}: file descriptors leaked");
    assert_eq!(status.tasks, tasks, "{plane:?}: tasks leaked");
    if plane.uses_kernel() {
        assert_eq!(status.sockets_in_map, Some(0), "sockhash entries leaked");
        assert_eq!(status.flow_records, Some(0), "flow records leaked");
    }
}

/// The documented bound (design.md, "Backpressure and memory") on what one direction of a
/// kernel-mode connection makes the kernel hold normally, for a destination that drained
/// fast before it stopped: a 16 MiB backlog, a window under 16 MiB and an 8 MiB send buffer.
/// A slow destination gets far less; the userspace planes hold less too.
const KERNEL_BOUND_MIB: u64 = 40;
/// The test peers' own socket buffers, which a direct connection would fill too: the
/// upstream's send buffer and the client's receive buffer (tcp_wmem and tcp_rmem maxima).
const ENDPOINT_BUFFERS_MIB: u64 = 36;
/// The most send buffer a slow destination's kernel-mode socket gets: the starting 256 KiB
/// asked for, grown once fourfold by the burst that fills the client's empty buffers, and
/// doubled by the kernel.
const BASE_SEND_BUFFER: u64 = 2 << 20;

pub fn slow_reader_memory_is_bounded(plane: Plane) {
    let upstream = Upstream::start(Behaviour::Push(1 << 30));
    let Some(relay) = Relay::start(
        plane,
        &upstream.relay_target(),
        &["--metrics", "127.0.0.1:0"],
    ) else {
        return;
    };
    // Available memory moves with the whole machine (page cache, reclaim): compare medians of
    // samples, one second before the connection against the last two seconds of it.
    let before = available_median();
    let mut client = TcpStream::connect(relay.addr).expect("connect");
    // Read 64 KiB per second for 8 seconds: a pacing workload, not a synchroniser.
    let started = Instant::now();
    let mut buf = vec![0u8; 8 << 10];
    let mut read = 0usize;
    let mut during = Vec::new();
    let mut highest_rss = 0;
    let mut largest_send_buffer = 0;
    while started.elapsed() < Duration::from_secs(8) {
        client.read_exact(&mut buf).expect("slow read");
        read += buf.len();
        during.push(available_kib());
        highest_rss = highest_rss.max(relay.rss_kib());
        largest_send_buffer = send_buffers_on_port(relay.addr.port())
            .into_iter()
            .fold(largest_send_buffer, u64::max);
        thread::sleep(Duration::from_millis(125));
    }
    reset(client);
    let scrape = relay.scrape();
    let detached = metric(&scrape, "kernel_detached_total", &[]);
    let resumed = metric(&scrape, "kernel_resumed_total", &[]);
    let pushed = upstream
        .next_result(Duration::from_secs(30))
        .expect("upstream push")
        .len;
    let at_end = during.split_off(during.len().saturating_sub(16));
    let grew_mib = before.saturating_sub(median(at_end)) / 1024;
    eprintln!(
        "{plane:?}: read {} KiB; upstream pushed {} MiB; available memory fell by {grew_mib} MiB; relay RSS peaked at {} MiB; the relay's client socket had a send buffer of up to {} KiB; {detached} directions left the kernel, {resumed} came back",
        read >> 10,
        pushed >> 20,
        highest_rss >> 10,
        largest_send_buffer >> 10
    );
    assert!(
        highest_rss < 64 << 10,
        "{plane:?}: relay RSS reached {} MiB",
        highest_rss >> 10
    );
    if plane.uses_kernel() {
        // Throttling holds the sender back once userspace has answered the flow's first
        // check. Before that, an upstream pushing at loopback speed may pass the flow's own
        // hard limit, and the program detaches it (proxy_common::flow_hard_limit); userspace
        // then moves it at the client's pace. Once at most: a detached flow does not flap.
        assert!(
            detached <= 1,
            "{plane:?}: the direction left the kernel {detached} times"
        );
    }
    if plane == Plane::Kernel {
        // Send buffers grow only for destinations that drain fast; this one never did.
        assert!(
            largest_send_buffer > 0 && largest_send_buffer <= BASE_SEND_BUFFER,
            "the slow client's socket had a send buffer of {largest_send_buffer} bytes"
        );
    }
    // Room on top for skb overhead and the rest of the machine during the test.
    let allowed_mib = KERNEL_BOUND_MIB + ENDPOINT_BUFFERS_MIB;
    assert!(
        grew_mib < allowed_mib + 32,
        "{plane:?}: kernel memory grew by {grew_mib} MiB"
    );
    // Backpressure reached the sender: it could not push beyond the bounded buffers.
    assert!(
        pushed < allowed_mib << 20,
        "{plane:?}: upstream pushed {} MiB",
        pushed >> 20
    );
}

/// How long the tests below wait for the relay's log line.
const DEADLINE: Duration = Duration::from_secs(30);
/// What one connection backed up both ways may make the kernel hold: each direction's bound
/// with the test peers' buffers on its path, as above.
const BOTH_WAYS_MIB: u64 = 2 * (KERNEL_BOUND_MIB + ENDPOINT_BUFFERS_MIB);
/// The sending client's unit, each a different pattern, so that a reordered chunk shows.
const CHUNK: usize = 64 << 10;

/// A client that sends to an echoing upstream and does not read: the echo backs up to the
/// client, the upstream stops reading while its writes wait, and the client's own sends back
/// up too. What the kernel holds stays bounded, the relay keeps serving others meanwhile, and
/// once the client reads, every byte comes back in order.
pub fn a_client_that_never_reads_its_echo_is_held_within_bounds(plane: Plane) {
    let upstream = Upstream::start(Behaviour::BannerThenEcho(Vec::new()));
    let Some(mut relay) = Relay::start(plane, &upstream.relay_target(), &[]) else {
        return;
    };
    let before = available_median();
    let mut client = TcpStream::connect(relay.addr).expect("connect");
    // Twice the bound: a client that gets this far was never held back.
    let cap = (2 * BOTH_WAYS_MIB as usize) << 20;
    let mut highest_rss = relay.rss_kib();
    let sent = send_until_held(&mut client, cap, || {
        highest_rss = highest_rss.max(relay.rss_kib());
    });
    assert!(
        sent.bytes < cap,
        "{plane:?}: the client sent {} MiB without being held back",
        sent.bytes >> 20
    );
    assert!(
        matches!(
            sent.ended.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ),
        "{plane:?}: sending failed after {} bytes: {}",
        sent.bytes,
        sent.ended
    );
    let Sent {
        bytes: sent,
        hasher,
        ..
    } = sent;
    let held = available_median();
    let grew_mib = before.saturating_sub(held) / 1024;
    eprintln!(
        "{plane:?}: the client sent {} MiB before it was held; available memory fell by {grew_mib} MiB; relay RSS peaked at {} MiB",
        sent >> 20,
        highest_rss >> 10
    );
    assert!(
        grew_mib < BOTH_WAYS_MIB + 32,
        "{plane:?}: available memory fell by {grew_mib} MiB"
    );
    assert!(
        highest_rss < 64 << 10,
        "{plane:?}: relay RSS reached {} MiB",
        highest_rss >> 10
    );

    let other = payload(6000, 256 << 10);
    let echoed = exchange(
        TcpStream::connect(relay.addr).expect("connect"),
        other.clone(),
    )
    .expect("another client's echo");
    assert_eq!(
        echoed,
        Received::of(&other),
        "{plane:?}: another client was not served while one was held"
    );

    client
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("read timeout");
    let (mut received, mut expected, mut buf) = (0usize, chunk(0), vec![0u8; CHUNK]);
    while received < sent {
        let at = received % CHUNK;
        let want = (CHUNK - at).min(sent - received);
        let n = match client.read(&mut buf[..want]) {
            Ok(0) => panic!("{plane:?}: EOF after {received} of {sent} echoed bytes"),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                panic!("{plane:?}: reading the echo failed after {received} of {sent} bytes: {e}")
            }
        };
        assert!(
            buf[..n] == expected[at..at + n],
            "{plane:?}: the echo differs from what was sent within bytes {received}..{}",
            received + n
        );
        received += n;
        if received % CHUNK == 0 {
            expected = chunk(received / CHUNK);
        }
    }
    client.shutdown(Shutdown::Write).expect("shutdown");
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).expect("the echo's end");
    assert!(
        rest.is_empty(),
        "{plane:?}: {} bytes more than were sent came back",
        rest.len()
    );
    let other_got = upstream
        .next_result(Duration::from_secs(30))
        .expect("the other client's upstream");
    assert_eq!(
        other_got,
        Received::of(&other),
        "{plane:?}: the other client's upstream"
    );
    let upstream_got = upstream
        .next_result(Duration::from_secs(30))
        .expect("upstream echo");
    assert_eq!(
        upstream_got,
        Received {
            len: sent as u64,
            sha256: hasher.finalize().into()
        },
        "{plane:?}: the upstream did not receive what was sent"
    );
    drop(client);
    assert!(
        wait_until(Duration::from_secs(10), || relay.status().connections == 0),
        "{plane:?}: the connection stayed open after both ends closed"
    );
    if plane.uses_kernel() {
        assert_eq!(
            relay.status().sockets_in_map,
            Some(0),
            "sockhash entries left"
        );
    }
}

/// With the backlog limit lowered so that flows detach at loopback speed, a client that
/// never reads its echo leaves a detached flow's kept bytes waiting in the kernel behind
/// bytes for that client, charged to no buffer: nothing but the relay stops them growing
/// (2 GiB a connection, measured before it did). Each connection is held back, or reset
/// once the kernel holds too much for it, and the reset is logged. Kept bytes may also
/// trickle in, a window's worth at each of the sender's zero-window probes, for longer than
/// the kept limit takes to reach: then the idle timeout (nothing delivered either way) ends
/// the connection, shortened here so that a trickle costs seconds, not ten minutes.
pub fn a_detached_flow_that_keeps_without_end_is_reset(plane: Plane) {
    // Echoed 8 KiB at a time, as socat does: through socat, 5 connections in 6 grew.
    let upstream = Upstream::start(Behaviour::EchoBy(8 << 10));
    let Some(mut relay) = Relay::start_via(
        plane,
        // Why each connection ended, should a reset be neither the kept limit's nor idle's.
        &[
            "env",
            "EBPF_PROXY_BACKLOG_LIMIT=1048576",
            "RUST_LOG=info,ebpf_proxy::server::connection=debug",
        ],
        &upstream.relay_target(),
        &["--metrics", "127.0.0.1:0", "--idle-timeout", "15s"],
    ) else {
        return;
    };
    let cap = (2 * BOTH_WAYS_MIB as usize) << 20;
    let mut resets = 0;
    // Without the reset, one connection in four grew here: eight in a row, all held, would
    // hide that one time in ten.
    for attempt in 0..8 {
        let mut client = TcpStream::connect(relay.addr).expect("connect");
        let sent = send_until_held(&mut client, cap, || {});
        eprintln!(
            "connection {attempt}: the client sent {} MiB, then: {}",
            sent.bytes >> 20,
            sent.ended
        );
        assert!(
            sent.bytes < cap,
            "connection {attempt}: the client sent {} MiB, neither held back nor reset",
            sent.bytes >> 20
        );
        match sent.ended.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {}
            io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => resets += 1,
            _ => panic!("connection {attempt}: sending failed: {}", sent.ended),
        }
        reset(client);
    }
    let metrics = relay.scrape();
    let kept_resets = metric(&metrics, "kernel_kept_resets_total", &[]);
    let idle = metric(
        &metrics,
        "connections_timed_out_total",
        &[("reason", "idle")],
    );
    eprintln!("{kept_resets} kept-limit resets, {idle} idle timeouts");
    assert_eq!(
        kept_resets + idle,
        resets,
        "the metrics count every reset the clients saw"
    );
    if kept_resets > 0 {
        assert!(
            relay
                .wait_for_line(
                    "waited in the kernel while the other read nothing",
                    DEADLINE
                )
                .is_some(),
            "{kept_resets} kept-limit resets and no warning"
        );
    }
}

/// What a client that sends without reading got out, and the error that ended it.
pub struct Sent {
    pub bytes: usize,
    pub hasher: Sha256,
    pub ended: io::Error,
}

/// Sends [`CHUNK`]s (chunk `i` is `chunk(i)`) until a send cannot start for 2 s (held back
/// by both directions), fails, or `cap` bytes went; `each_chunk` runs after every chunk.
pub fn send_until_held(client: &mut TcpStream, cap: usize, mut each_chunk: impl FnMut()) -> Sent {
    client
        .set_write_timeout(Some(Duration::from_secs(2)))
        .expect("write timeout");
    let (mut bytes, mut current, mut hasher) = (0usize, chunk(0), Sha256::new());
    while bytes < cap {
        let at = bytes % CHUNK;
        match client.write(&current[at..]) {
            Ok(n) => {
                hasher.update(&current[at..at + n]);
                bytes += n;
                if bytes % CHUNK == 0 {
                    current = chunk(bytes / CHUNK);
                    each_chunk();
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(ended) => {
                return Sent {
                    bytes,
                    hasher,
                    ended,
                };
            }
        }
    }
    Sent {
        bytes,
        hasher,
        ended: io::Error::other("the cap was reached"),
    }
}

/// The sending client's chunk `index`.
fn chunk(index: usize) -> Vec<u8> {
    payload(5000 + index as u64, CHUNK)
}

/// Median of [`available_kib`] over one second: it moves with the whole machine.
pub fn available_median() -> u64 {
    let mut samples = Vec::new();
    for _ in 0..8 {
        samples.push(available_kib());
        // Sampling pace, not a synchroniser.
        thread::sleep(Duration::from_millis(125));
    }
    median(samples)
}

fn median(mut samples: Vec<u64>) -> u64 {
    samples.sort_unstable();
    samples[samples.len() / 2]
}

pub fn kernel_mode_moves_bytes_without_the_relay_process(plane: Plane) {
    let total = 1u64 << 30;
    let upstream = Upstream::start(Behaviour::Push(total));
    let Some(relay) = Relay::start(plane, &upstream.relay_target(), &[]) else {
        return;
    };
    let ticks_before = relay.cpu_ticks();
    let started = Instant::now();
    let mut client = TcpStream::connect(relay.addr).expect("connect");
    let got = integration_tests::read_to_end_hashed(&mut client).expect("read 1 GiB");
    let wall = started.elapsed();
    let ticks = relay.cpu_ticks() - ticks_before;
    assert_eq!(got.len, total, "all bytes arrive");
    assert_eq!(
        upstream
            .next_result(Duration::from_secs(30))
            .expect("push")
            .len,
        total
    );
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let share = ticks as f64 / hz / wall.as_secs_f64();
    eprintln!(
        "kernel: 1 GiB in {wall:?}; relay process CPU {ticks} ticks = {:.2}% of wall time",
        share * 100.0
    );
    assert!(
        share < 0.05,
        "relay process used {:.1}% CPU while 1 GiB passed",
        share * 100.0
    );
}

/// The budget `ebpf-proxy flows` shows for the direction towards `client` (its row is found
/// by the client's address, shown under --log-clients).
fn budget_towards(client: &TcpStream) -> u64 {
    let output = std::process::Command::new(integration_tests::relay_binary())
        .arg("flows")
        .output()
        .expect("ebpf-proxy flows");
    let table = String::from_utf8_lossy(&output.stdout);
    let local = client.local_addr().expect("client address").to_string();
    let row = table
        .lines()
        .find(|l| l.contains(&local))
        .unwrap_or_else(|| panic!("no row for {local}:\n{table}"));
    // "... kernel / kernel   B of BUDGET / B of BUDGET": the last is towards the client.
    row.rsplit(" of ")
        .next()
        .and_then(|budget| budget.trim().parse().ok())
        .unwrap_or_else(|| panic!("no budget in {row:?}"))
}

/// Each direction's budget follows how fast its destination drains: one client reading as
/// fast as it can and one reading 64 KiB/s, from the same pushing upstream, side by side.
/// The fast one's grows to the global limit (16 MiB), the slow one's stays a small
/// fraction of that.
pub fn budgets_follow_each_destination_drain_rate(plane: Plane) {
    if !is_root() && !integration_tests::bpf_required() {
        eprintln!("SKIPPED: reading the kernel's maps needs root");
        return;
    }
    let upstream = Upstream::start(Behaviour::Push(1 << 40));
    let Some(relay) = Relay::start(plane, &upstream.relay_target(), &["--log-clients"]) else {
        return;
    };
    let mut slow = TcpStream::connect(relay.addr).expect("connect");
    let fast = TcpStream::connect(relay.addr).expect("connect");
    let mut reader = fast.try_clone().expect("clone");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reading = {
        let stop = stop.clone();
        thread::spawn(move || {
            let (mut buf, mut read) = (vec![0u8; 1 << 20], 0u64);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                read += reader.read(&mut buf).expect("fast read") as u64;
            }
            read
        })
    };
    let mut buf = vec![0u8; 8 << 10];
    let started = Instant::now();
    // A pacing workload, not a synchroniser: 64 KiB/s for two seconds.
    while started.elapsed() < Duration::from_secs(2) {
        slow.read_exact(&mut buf).expect("slow read");
        thread::sleep(Duration::from_millis(125));
    }
    let (slow_budget, fast_budget) = (budget_towards(&slow), budget_towards(&fast));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let moved = reading.join().expect("fast reader");
    eprintln!(
        "{plane:?}: budget towards the slow client {slow_budget}, towards the fast one {fast_budget} (it read {} MiB)",
        moved >> 20
    );
    assert_eq!(
        fast_budget,
        proxy_common::DEFAULT_BACKLOG_LIMIT,
        "the fast client's direction never reached the global limit"
    );
    assert!(
        slow_budget <= fast_budget / 4,
        "the slow client's direction may hold {slow_budget} bytes"
    );
    reset(slow);
    reset(fast);
}
