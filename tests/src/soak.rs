//! The soak: many connections of random sizes through a running relay, with half-closes in
//! both orders, client resets and upstreams that die mid-transfer. Every byte that arrives is
//! compared with the byte sent at that offset (stronger than comparing SHA-256 digests at the
//! end, and it names the offset), and no truncation may pass for a clean close.

use std::{
    collections::HashMap,
    io::{self, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::{Arc, Mutex, mpsc},
    thread,
    time::{Duration, Instant},
};

use rand::{Rng, SeedableRng, rngs::StdRng};

use crate::{payload, reset};

#[derive(Clone, Copy, Debug)]
pub struct Plan {
    pub connections: usize,
    /// Connection starts are spread over this long.
    pub duration: Duration,
    pub concurrency: usize,
    pub max_size: usize,
    pub seed: u64,
}

/// Who half-closes first, or both directions at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Order {
    ClientFirst,
    UpstreamFirst,
    Together,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    None,
    /// The client resets after sending this many bytes.
    ClientResets(u64),
    /// The upstream resets after receiving this many bytes.
    UpstreamDies(u64),
}

#[derive(Clone, Copy, Debug)]
struct Job {
    seed: u64,
    up: u64,
    down: u64,
    order: Order,
    fault: Fault,
}

const PREAMBLE: usize = 8 * 4 + 2;

impl Job {
    fn random(rng: &mut StdRng, seed: u64, max_size: usize) -> Self {
        let size = |rng: &mut StdRng| (rng.random::<f64>() * (max_size as f64).ln()).exp() as u64;
        let (up, down) = (size(rng), size(rng));
        let mut order =
            [Order::ClientFirst, Order::UpstreamFirst, Order::Together][rng.random_range(0..3)];
        let fault = match rng.random_range(0..10) {
            0 if up > 1 => Fault::ClientResets(rng.random_range(0..up)),
            1 if up > 1 => Fault::UpstreamDies(rng.random_range(0..up)),
            _ => Fault::None,
        };
        // A dying upstream reads before it could ever send: the client must be reading and
        // writing at once, or each would wait for the other.
        if let Fault::UpstreamDies(_) = fault {
            order = Order::Together;
        }
        Self {
            seed,
            up,
            down,
            order,
            fault,
        }
    }

    fn encode(&self) -> [u8; PREAMBLE] {
        let mut out = [0u8; PREAMBLE];
        out[0..8].copy_from_slice(&self.seed.to_le_bytes());
        out[8..16].copy_from_slice(&self.up.to_le_bytes());
        out[16..24].copy_from_slice(&self.down.to_le_bytes());
        let (kind, at) = match self.fault {
            Fault::None => (0, 0),
            Fault::ClientResets(at) => (1, at),
            Fault::UpstreamDies(at) => (2, at),
        };
        out[24..32].copy_from_slice(&at.to_le_bytes());
        out[32] = kind;
        out[33] = self.order as u8;
        out
    }

    fn decode(bytes: &[u8; PREAMBLE]) -> Self {
        let word = |i: usize| u64::from_le_bytes(bytes[i..i + 8].try_into().expect("8 bytes"));
        let fault = match bytes[32] {
            1 => Fault::ClientResets(word(24)),
            2 => Fault::UpstreamDies(word(24)),
            _ => Fault::None,
        };
        let order =
            [Order::ClientFirst, Order::UpstreamFirst, Order::Together][bytes[33] as usize % 3];
        Self {
            seed: word(0),
            up: word(8),
            down: word(16),
            order,
            fault,
        }
    }
}

/// How a stream of bytes ended for the side that read it.
#[derive(Debug, PartialEq, Eq)]
enum Ending {
    /// EOF after exactly the expected bytes, all intact.
    Complete,
    /// A reset or error after an intact prefix.
    Reset,
    /// A clean EOF after an intact prefix: loss, unless this side's own writes had already
    /// failed (Linux reports a reset once, so a failed write leaves only EOF to read).
    Truncated { got: usize, expected: usize },
    /// Anything else: bytes lost, changed, or a short stream passed off as complete.
    Broken(String),
}

/// Reads up to `expected.len()` bytes and then EOF, checking each byte.
fn read_checked(stream: &mut TcpStream, expected: &[u8]) -> Ending {
    let mut got = 0usize;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) if got == expected.len() => return Ending::Complete,
            Ok(0) => {
                return Ending::Truncated {
                    got,
                    expected: expected.len(),
                };
            }
            Ok(n) if got + n > expected.len() => {
                return Ending::Broken(format!(
                    "{} bytes more than sent",
                    got + n - expected.len()
                ));
            }
            Ok(n) => {
                if buf[..n] != expected[got..got + n] {
                    return Ending::Broken(format!("bytes changed at offset {got}"));
                }
                got += n;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Ending::Reset,
        }
    }
}

/// How a read ended, given whether this side's writes all succeeded.
fn settle(ending: Ending, writes_ok: bool) -> Ending {
    match ending {
        Ending::Truncated { .. } if !writes_ok => Ending::Reset,
        Ending::Truncated { got, expected } => {
            Ending::Broken(format!("clean EOF after {got} of {expected} bytes"))
        }
        other => other,
    }
}

/// An upstream that serves soak jobs and reports how each upload ended.
pub struct SoakUpstream {
    pub addr: SocketAddr,
    endings: mpsc::Receiver<(u64, Ending)>,
}

impl SoakUpstream {
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind soak upstream");
        let addr = listener.local_addr().expect("address");
        let (tx, endings) = mpsc::channel();
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                let tx = tx.clone();
                thread::spawn(move || serve_job(stream, &tx));
            }
        });
        Self { addr, endings }
    }
}

fn serve_job(mut stream: TcpStream, tx: &mpsc::Sender<(u64, Ending)>) {
    let mut preamble = [0u8; PREAMBLE];
    if stream.read_exact(&mut preamble).is_err() {
        return;
    }
    let job = Job::decode(&preamble);
    let upload = payload(job.seed, job.up as usize);
    let download = payload(job.seed ^ 0xd0d0, job.down as usize);
    let send = |mut writer: TcpStream| {
        writer.write_all(&download).is_ok() && writer.shutdown(Shutdown::Write).is_ok()
    };
    let ending = match job.fault {
        Fault::UpstreamDies(at) => {
            let mut prefix = vec![0u8; at as usize];
            let ending = match stream.read_exact(&mut prefix) {
                Ok(()) if prefix == upload[..at as usize] => Ending::Reset,
                Ok(()) => Ending::Broken("upload changed before the upstream died".into()),
                Err(_) => Ending::Broken("upload cut before the upstream died".into()),
            };
            reset(stream);
            ending
        }
        _ => match job.order {
            Order::ClientFirst => {
                let ending = settle(read_checked(&mut stream, &upload), true);
                send(stream);
                ending
            }
            Order::UpstreamFirst => {
                let sent = send(stream.try_clone().expect("clone"));
                settle(read_checked(&mut stream, &upload), sent)
            }
            Order::Together => {
                let writer = stream.try_clone().expect("clone");
                thread::scope(|scope| {
                    let sender = scope.spawn(|| send(writer));
                    let ending = read_checked(&mut stream, &upload);
                    settle(ending, sender.join().unwrap_or(false))
                })
            }
        },
    };
    let _ = tx.send((job.seed, ending));
}

/// What a soak saw.
#[derive(Debug, Default)]
pub struct Report {
    pub connections: usize,
    pub bytes_verified: u64,
    pub client_resets: usize,
    pub upstream_deaths: usize,
    pub by_order: [usize; 3],
    /// Every lost, changed or silently truncated stream, described.
    pub broken: Vec<String>,
}

/// Runs `plan` against a relay listening on `relay` and forwarding to `upstream`.
pub fn run(plan: Plan, relay: SocketAddr, upstream: &SoakUpstream) -> Report {
    let mut rng = StdRng::seed_from_u64(plan.seed);
    let jobs: Vec<Job> = (0..plan.connections)
        .map(|i| {
            Job::random(
                &mut rng,
                plan.seed.wrapping_mul(1_000_003).wrapping_add(i as u64),
                plan.max_size,
            )
        })
        .collect();
    let queue = Arc::new(Mutex::new(jobs.clone().into_iter().enumerate()));
    let started = Instant::now();
    let spacing = plan.duration / plan.connections.max(1) as u32;
    let (tx, client_endings) = mpsc::channel();
    let workers: Vec<_> = (0..plan.concurrency)
        .map(|_| {
            let (queue, tx) = (Arc::clone(&queue), tx.clone());
            thread::spawn(move || {
                loop {
                    let Some((i, job)) = queue.lock().expect("queue").next() else {
                        return;
                    };
                    // Spread starts over the planned duration.
                    if let Some(wait) =
                        (started + spacing * i as u32).checked_duration_since(Instant::now())
                    {
                        thread::sleep(wait);
                    }
                    let _ = tx.send((job.seed, client_side(job, relay)));
                }
            })
        })
        .collect();
    drop(tx);
    for worker in workers {
        worker.join().expect("soak worker");
    }
    let mut report = Report {
        connections: jobs.len(),
        ..Report::default()
    };
    let client: HashMap<u64, Ending> = client_endings.into_iter().collect();
    let mut server: HashMap<u64, Ending> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while server.len() < jobs.len() {
        let Some(left) = deadline.checked_duration_since(Instant::now()) else {
            break;
        };
        match upstream.endings.recv_timeout(left) {
            Ok((seed, ending)) => {
                server.insert(seed, ending);
            }
            Err(_) => break,
        }
    }
    for job in &jobs {
        report.by_order[job.order as usize] += 1;
        let up = server.get(&job.seed);
        let down = client.get(&job.seed);
        let problem = match job.fault {
            Fault::None => match (up, down) {
                (Some(Ending::Complete), Some(Ending::Complete)) => {
                    report.bytes_verified += job.up + job.down;
                    None
                }
                other => Some(format!("{other:?}")),
            },
            Fault::ClientResets(_) => {
                report.client_resets += 1;
                // The upstream may see the reset, or nothing at all if it came first.
                match up {
                    Some(Ending::Reset) | None => None,
                    other => Some(format!("upstream after a client reset: {other:?}")),
                }
            }
            Fault::UpstreamDies(_) => {
                report.upstream_deaths += 1;
                match (up, down) {
                    (Some(Ending::Reset), Some(Ending::Reset | Ending::Complete)) => None,
                    other => Some(format!("after the upstream died: {other:?}")),
                }
            }
        };
        if let Some(problem) = problem {
            report.broken.push(format!("{job:?}: {problem}"));
        }
    }
    report
}

/// One connection from the client's side; returns how the download ended.
fn client_side(job: Job, relay: SocketAddr) -> Ending {
    let Ok(mut stream) = TcpStream::connect(relay) else {
        return Ending::Broken("connect to the relay failed".into());
    };
    let upload = payload(job.seed, job.up as usize);
    let download = payload(job.seed ^ 0xd0d0, job.down as usize);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(60)));
    if stream.write_all(&job.encode()).is_err() {
        return Ending::Broken("preamble not sent".into());
    }
    if let Fault::ClientResets(at) = job.fault {
        let _ = stream.write_all(&upload[..at as usize]);
        reset(stream);
        return Ending::Reset;
    }
    let send = |mut writer: TcpStream| {
        writer.write_all(&upload).is_ok() && writer.shutdown(Shutdown::Write).is_ok()
    };
    match job.order {
        Order::ClientFirst => {
            let sent = send(stream.try_clone().expect("clone"));
            settle(read_checked(&mut stream, &download), sent)
        }
        Order::UpstreamFirst => {
            let ending = settle(read_checked(&mut stream, &download), true);
            send(stream);
            ending
        }
        Order::Together => {
            let writer = stream.try_clone().expect("clone");
            thread::scope(|scope| {
                let sender = scope.spawn(|| send(writer));
                let ending = read_checked(&mut stream, &download);
                settle(ending, sender.join().unwrap_or(false))
            })
        }
    }
}
