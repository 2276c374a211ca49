//! What slow clients cost the machine through the relay, side by side with HAProxy (the
//! Debian package, tcp mode without splice, as WhatsApp's own relay runs it): the same
//! clients, the same upstreams, the paths interleaved round by round. The bench's
//! slow-clients workload measures the same with its own peers; here the upstreams are the
//! suite's, a thread per connection writing as fast as it can, which outruns the relay's
//! answers to its flows' first checks (docs/design.md, "Budgets: what was tried").

use std::{
    io::{self, Read},
    net::{Shutdown, SocketAddr, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use integration_tests::{
    Behaviour, Haproxy, Plane, Relay, Upstream, free_port, lock_buffers, socket_memory_on_ports,
};

use crate::resources::{available_median, send_until_held};

/// Slow readers per measurement, as many as `cargo xtask bench` runs: with fewer, what each
/// path holds is lost in how much the machine's free memory moves by itself (16 clients:
/// tens of MiB held, against runs of one path 120 MiB apart).
const READERS: usize = 100;
/// Never-readers per measurement. Each makes HAProxy hold tens of MiB; a hundred, with
/// their ends, pass TCP's memory pressure threshold (`net.ipv4.tcp_mem`) on the test
/// machine, after which TCP prunes buffers and each path's figure swings by hundreds of MiB
/// from round to round.
const NEVER_READERS: usize = 30;
/// The never-readers' and the echo's socket buffers, fixed. Left to autotuning the ends
/// held about 2 GB, which `ss` counts only roughly; small, the fall of available memory is
/// mostly what the path itself holds.
const END_BUFFERS: usize = 64 << 10;
/// Rounds, each measuring every path once; the figures are the medians.
const ROUNDS: usize = 3;
/// What a slow reader reads a second (a phone on a link of about 2 Mbit/s), and how long
/// the readers read before memory is sampled: the bench's figures.
const READ_RATE: u64 = 256 << 10;
const READ_FOR: Duration = Duration::from_secs(4);
/// What a slow reader reads at a time.
const SLOW_READ: usize = 8 << 10;
/// How long never-readers get to be held. A kernel-mode path lets a throttled sender's
/// zero-window probes through (docs/reliability.md), and a client sending into that never
/// blocks for long: it is measured as it is then, still sending, and counted.
const HOLD_WITHIN: Duration = Duration::from_secs(20);
/// What a never-reader sends between looks at whether to stop.
const PUSH_STEP: usize = 64 << 10;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// Reads [`READ_RATE`] while its upstream pushes as fast as it can.
    SlowReaders,
    /// Sends to an echo and never reads: both directions back up.
    NeverReaders,
}

impl Kind {
    fn clients(self) -> usize {
        match self {
            Kind::SlowReaders => READERS,
            Kind::NeverReaders => NEVER_READERS,
        }
    }
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
    /// The clients' threads: slow readers read, never-readers push.
    threads: Vec<JoinHandle<()>>,
    never_readers: Vec<TcpStream>,
    /// Never-readers still sending at [`HOLD_WITHIN`].
    unheld: usize,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Unblocks the never-readers' pending sends.
        for stream in &self.never_readers {
            let _ = stream.shutdown(Shutdown::Both);
        }
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// [`Kind::clients`] clients of `kind` through `addr`, returned once they are held: the readers
/// after reading for [`READ_FOR`], the never-readers once none can send any more or
/// [`HOLD_WITHIN`] has passed.
fn hold(kind: Kind, addr: SocketAddr) -> Held {
    let stop = Arc::new(AtomicBool::new(false));
    match kind {
        Kind::SlowReaders => {
            let readers = (0..READERS)
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
                threads: readers,
                never_readers: Vec::new(),
                unheld: 0,
            }
        }
        Kind::NeverReaders => {
            let streams: Vec<_> = (0..NEVER_READERS)
                .map(|_| {
                    let stream = TcpStream::connect(addr).expect("connect a never-reader");
                    lock_buffers(&stream, END_BUFFERS);
                    stream
                })
                .collect();
            let (held_tx, held_rx) = mpsc::channel();
            let pushers = streams
                .iter()
                .map(|stream| {
                    let mut stream = stream.try_clone().expect("clone a never-reader");
                    let (stop, held_tx) = (Arc::clone(&stop), held_tx.clone());
                    thread::spawn(move || push_until_held(&mut stream, &stop, &held_tx))
                })
                .collect();
            let deadline = Instant::now() + HOLD_WITHIN;
            let held = (0..NEVER_READERS)
                .take_while(|_| {
                    held_rx
                        .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                        .is_ok()
                })
                .count();
            Held {
                stop,
                threads: pushers,
                never_readers: streams,
                unheld: NEVER_READERS - held,
            }
        }
    }
}

/// Sends until a send cannot start for 2 s, then says so on `held`. A client whose path
/// lets a little through now and then sends on until `stop`, or until its socket is shut.
fn push_until_held(stream: &mut TcpStream, stop: &AtomicBool, held: &mpsc::Sender<()>) {
    while !stop.load(Ordering::Relaxed) {
        let step = send_until_held(stream, PUSH_STEP, || {});
        if step.bytes < PUSH_STEP {
            if matches!(
                step.ended.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) {
                let _ = held.send(());
            }
            return;
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

/// Available memory once the previous measurement's memory came back: TCP's memory has
/// stopped falling, and two successive medians agree within [`SETTLED_WITHIN_KIB`]. TCP's
/// own count is not enough: the kernel plane's redirect queues and the processes' freed
/// buffers are outside it.
fn settled_available() -> u64 {
    let started = Instant::now();
    let (mut lowest, mut since) = (tcp_memory_pages(), Instant::now());
    while since.elapsed() < Duration::from_millis(500) {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "TCP's memory still fell 30 s after a measurement"
        );
        // Polling pace, not a synchroniser: the condition is the memory itself.
        thread::sleep(Duration::from_millis(50));
        let pages = tcp_memory_pages();
        if pages < lowest {
            (lowest, since) = (pages, Instant::now());
        }
    }
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

/// The pages TCP sockets hold, in every namespace: the `mem` field of /proc/net/sockstat.
fn tcp_memory_pages() -> u64 {
    let sockstat = std::fs::read_to_string("/proc/net/sockstat").expect("/proc/net/sockstat");
    sockstat
        .lines()
        .find_map(|line| {
            let mut words = line.strip_prefix("TCP:")?.split_whitespace();
            words.find(|&word| word == "mem")?;
            words.next()?.parse().ok()
        })
        .expect("TCP mem in /proc/net/sockstat")
}

/// What the machine holds, in MiB, while [`Kind::clients`] clients of `kind` are held on `path`:
/// the fall of available memory less what the clients' and the upstream's own sockets
/// hold, which on a real relay sit on other machines; and how many clients were not held.
fn held_mib(path: &Path, kind: Kind, upstream: SocketAddr) -> (i64, usize) {
    let before = settled_available();
    let addr = path.address(kind);
    let clients = hold(kind, addr);
    let during = available_median();
    let ends = socket_memory_on_ports(upstream.port(), addr.port());
    let unheld = clients.unheld;
    drop(clients);
    (
        (before as i64 - during as i64) / 1024 - (ends >> 20) as i64,
        unheld,
    )
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

/// [`NEVER_READERS`] never-readers with small buffers, to an echo with small buffers, cost
/// the relay no more memory than HAProxy, as above.
pub fn never_readers_cost_no_more_than_through_haproxy(plane: Plane) {
    costs_no_more_than_through_haproxy(plane, Kind::NeverReaders);
}

fn costs_no_more_than_through_haproxy(plane: Plane, kind: Kind) {
    let pusher = Upstream::start(Behaviour::Push(u64::MAX));
    let echo = Upstream::start_with_buffers(Behaviour::EchoBy(64 << 10), END_BUFFERS);
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
    let mut unheld = vec![0; paths.len()];
    for _ in 0..ROUNDS {
        for ((path, runs), unheld) in paths.iter().zip(&mut figures).zip(&mut unheld) {
            let (mib, clients) = held_mib(path, kind, upstream);
            runs.push(mib);
            *unheld = clients.max(*unheld);
        }
    }
    let direct = median(figures[0].clone());
    let added: Vec<i64> = figures
        .iter()
        .map(|runs| median(runs.clone()) - direct)
        .collect();
    eprintln!(
        "{plane:?}, {} {kind:?}: MiB held per round {}; added over direct: relay {}, HAProxy {}; most clients not held in a round: relay {}, HAProxy {}",
        kind.clients(),
        paths
            .iter()
            .zip(&figures)
            .map(|(path, runs)| format!("{} {runs:?}", path.name))
            .collect::<Vec<_>>()
            .join(", "),
        added[1],
        added[2],
        unheld[1],
        unheld[2]
    );
    assert!(
        added[1] <= added[2],
        "{plane:?}: {} {kind:?} cost the relay {} MiB, HAProxy {} MiB",
        kind.clients(),
        added[1],
        added[2]
    );
    // A figure taken while clients still send grows after it.
    assert_eq!(
        unheld[1], 0,
        "{plane:?}: never-readers still sending after {HOLD_WITHIN:?} through the relay"
    );
}
