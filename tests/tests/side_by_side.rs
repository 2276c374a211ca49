//! What slow clients cost the machine through the relay, side by side with HAProxy (the
//! Debian package, tcp mode without splice, as WhatsApp's own relay runs it): the same
//! clients, the same upstreams, the paths interleaved round by round. The bench's
//! slow-clients workload measures the same with its own peers; here the upstreams are the
//! suite's, a thread per connection writing as fast as it can, which outruns the relay's
//! answers to its flows' first checks (docs/design.md, "Budgets: what was tried").

use std::{
    io::Read,
    net::{SocketAddr, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use integration_tests::{
    Behaviour, Haproxy, Plane, Relay, Upstream, free_port, socket_memory_on_ports,
};

use crate::resources::{available_median, send_until_held};

/// Clients per measurement, as many as `cargo xtask bench` runs: with fewer, what each
/// path holds is lost in how much the machine's free memory moves by itself (16 clients:
/// tens of MiB held, against runs of one path 120 MiB apart).
const CLIENTS: usize = 100;
/// Rounds, each measuring every path once; the figures are the medians.
const ROUNDS: usize = 3;
/// What a slow reader reads a second (a phone on a link of about 2 Mbit/s), and how long
/// the readers read before memory is sampled: the bench's figures.
const READ_RATE: u64 = 256 << 10;
const READ_FOR: Duration = Duration::from_secs(4);
/// What a slow reader reads at a time.
const SLOW_READ: usize = 8 << 10;
/// How much a never-reader may push before the test calls it unbounded.
const CAP: usize = 256 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// Reads [`READ_RATE`] while its upstream pushes as fast as it can.
    SlowReaders,
    /// Sends to an echo and never reads: both directions back up.
    NeverReaders,
}

/// One way to the two upstreams: straight, through the relay, or through HAProxy.
struct Path {
    name: &'static str,
    to_pusher: SocketAddr,
    to_echo: SocketAddr,
}

impl Path {
    fn address(&self, kind: Kind) -> SocketAddr {
        match kind {
            Kind::SlowReaders => self.to_pusher,
            Kind::NeverReaders => self.to_echo,
        }
    }
}

/// Clients being held, released on drop.
struct Held {
    stop: Arc<AtomicBool>,
    readers: Vec<JoinHandle<()>>,
    _never_readers: Vec<TcpStream>,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
    }
}

/// [`CLIENTS`] clients of `kind` through `addr`, returned once they are held: the readers
/// after reading for [`READ_FOR`], the never-readers once none can send any more.
fn hold(kind: Kind, addr: SocketAddr) -> Held {
    let stop = Arc::new(AtomicBool::new(false));
    match kind {
        Kind::SlowReaders => {
            let readers = (0..CLIENTS)
                .map(|_| {
                    let stream = TcpStream::connect(addr).expect("connect a slow reader");
                    let stop = Arc::clone(&stop);
                    thread::spawn(move || read_slowly(stream, &stop))
                })
                .collect();
            // The readers' measured settling time, not a synchroniser.
            thread::sleep(READ_FOR);
            Held {
                stop,
                readers,
                _never_readers: Vec::new(),
            }
        }
        Kind::NeverReaders => {
            let clients: Vec<_> = (0..CLIENTS)
                .map(|_| {
                    thread::spawn(move || {
                        let mut stream = TcpStream::connect(addr).expect("connect a never-reader");
                        let sent = send_until_held(&mut stream, CAP, || {});
                        assert!(sent.bytes < CAP, "a never-reader was never held");
                        stream
                    })
                })
                .collect();
            Held {
                stop,
                readers: Vec::new(),
                _never_readers: clients
                    .into_iter()
                    .map(|c| c.join().expect("never-reader thread"))
                    .collect(),
            }
        }
    }
}

/// Reads [`READ_RATE`] a second, [`SLOW_READ`] at a time, until `stop`.
fn read_slowly(mut stream: TcpStream, stop: &AtomicBool) {
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    let mut buf = vec![0u8; SLOW_READ];
    let every = Duration::from_secs_f64(SLOW_READ as f64 / READ_RATE as f64);
    let mut next = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        stream.read_exact(&mut buf).expect("a slow reader's read");
        next += every;
        // The reading pace, not a synchroniser.
        thread::sleep(next.saturating_duration_since(Instant::now()));
    }
}

/// How close two successive medians of available memory must be for the machine to count
/// as settled, in KiB.
const SETTLED_WITHIN_KIB: u64 = 8 << 10;

/// Available memory once the previous measurement's memory came back: two successive
/// medians agree within [`SETTLED_WITHIN_KIB`]. TCP's own count is not enough: the kernel
/// plane's redirect queues and the processes' freed buffers are outside it.
fn settled_available() -> u64 {
    let mut last = available_median();
    for _ in 0..10 {
        let now = available_median();
        if now.abs_diff(last) <= SETTLED_WITHIN_KIB {
            return now;
        }
        last = now;
    }
    panic!("available memory still moved 10 s after a measurement");
}

/// What the machine holds, in MiB, while [`CLIENTS`] clients of `kind` are held on `path`:
/// the fall of available memory less what the clients' and the upstream's own sockets
/// hold, which on a real relay sit on other machines.
fn held_mib(path: &Path, kind: Kind, upstream: SocketAddr) -> i64 {
    let before = settled_available();
    let addr = path.address(kind);
    let clients = hold(kind, addr);
    let during = available_median();
    let ends = socket_memory_on_ports(upstream.port(), addr.port());
    drop(clients);
    (before as i64 - during as i64) / 1024 - (ends >> 20) as i64
}

fn median(mut values: Vec<i64>) -> i64 {
    values.sort_unstable();
    values[values.len() / 2]
}

/// 100 slow readers cost the relay no more memory than HAProxy: what each path adds over
/// the same clients connected straight to the upstream, medians of [`ROUNDS`] rounds.
pub fn slow_readers_cost_no_more_than_through_haproxy(plane: Plane) {
    costs_no_more_than_through_haproxy(plane, Kind::SlowReaders);
}

/// 100 never-readers cost the relay no more memory than HAProxy, as above.
pub fn never_readers_cost_no_more_than_through_haproxy(plane: Plane) {
    costs_no_more_than_through_haproxy(plane, Kind::NeverReaders);
}

fn costs_no_more_than_through_haproxy(plane: Plane, kind: Kind) {
    let pusher = Upstream::start(Behaviour::Push(u64::MAX));
    let echo = Upstream::start(Behaviour::EchoBy(64 << 10));
    let to_echo = format!("127.0.0.1:0={}", echo.relay_target());
    let Some(relay) = Relay::start(plane, &pusher.relay_target(), &["--forward", &to_echo]) else {
        return;
    };
    let (slow_port, never_port) = (free_port(), free_port());
    let _haproxy = Haproxy::start(
        &format!(
            "global\n  maxconn 1000\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 1m\n  timeout server 1m\n\
             frontend slow\n  bind 127.0.0.1:{slow_port}\n  default_backend pusher\n\
             frontend never\n  bind 127.0.0.1:{never_port}\n  default_backend echo\n\
             backend pusher\n  server p {}\nbackend echo\n  server e {}\n",
            pusher.addr, echo.addr
        ),
        &[slow_port, never_port],
    );
    let paths = [
        Path {
            name: "direct",
            to_pusher: pusher.addr,
            to_echo: echo.addr,
        },
        Path {
            name: "relay",
            to_pusher: relay.addrs[0],
            to_echo: relay.addrs[1],
        },
        Path {
            name: "haproxy",
            to_pusher: SocketAddr::from(([127, 0, 0, 1], slow_port)),
            to_echo: SocketAddr::from(([127, 0, 0, 1], never_port)),
        },
    ];
    let upstream = match kind {
        Kind::SlowReaders => pusher.addr,
        Kind::NeverReaders => echo.addr,
    };
    let mut figures = vec![Vec::new(); paths.len()];
    for _ in 0..ROUNDS {
        for (path, runs) in paths.iter().zip(&mut figures) {
            runs.push(held_mib(path, kind, upstream));
        }
    }
    let direct = median(figures[0].clone());
    let added: Vec<i64> = figures
        .iter()
        .map(|runs| median(runs.clone()) - direct)
        .collect();
    eprintln!(
        "{plane:?}, {CLIENTS} {kind:?}: MiB held per round {}; added over direct: relay {}, HAProxy {}",
        paths
            .iter()
            .zip(&figures)
            .map(|(path, runs)| format!("{} {runs:?}", path.name))
            .collect::<Vec<_>>()
            .join(", "),
        added[1],
        added[2]
    );
    assert!(
        added[1] <= added[2],
        "{plane:?}: {CLIENTS} {kind:?} cost the relay {} MiB, HAProxy {} MiB",
        added[1],
        added[2]
    );
}
