//! The bench's own client and server, run as hidden `xtask` subcommands so that they can be
//! started in a namespace and pinned to a CPU like iperf3. Each probe prints one line of
//! results on stdout.

use std::{
    io::{self, BufRead as _, Read as _, Write as _},
    net::{Shutdown, TcpStream},
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use clap::Subcommand;

#[derive(Subcommand)]
pub enum Probe {
    /// Round trips of SIZE bytes over one connection: prints p50 p99 p99.9 in microseconds.
    Latency {
        addr: String,
        size: usize,
        count: usize,
    },
    /// New connections per second for SECONDS, each one small request and its reply, from
    /// WORKERS threads: prints connections/s and failures.
    Rate {
        addr: String,
        seconds: f64,
        workers: usize,
    },
    /// Opens COUNT connections (each carries one byte both ways), prints "ready", holds them
    /// until stdin closes.
    Idle { addr: String, count: usize },
    /// Opens COUNT connections that each read READ_RATE bytes a second (to a server that
    /// pushes), or with READ_RATE 0 send until held or reset and never read (to an echo
    /// server); prints "ready RESET" once all are held (readers: after SETTLE seconds of
    /// reading), RESET being how many never-readers the relay reset, then keeps reading
    /// until stdin closes.
    Slow {
        addr: String,
        count: usize,
        read_rate: u64,
        settle: f64,
    },
}

pub fn probe(probe: Probe) -> Result<()> {
    match probe {
        Probe::Latency { addr, size, count } => latency(&addr, size, count),
        Probe::Rate {
            addr,
            seconds,
            workers,
        } => rate(&addr, Duration::from_secs_f64(seconds), workers),
        Probe::Idle { addr, count } => idle(&addr, count),
        Probe::Slow {
            addr,
            count,
            read_rate,
            settle,
        } => slow(&addr, count, read_rate, Duration::from_secs_f64(settle)),
    }
}

fn latency(addr: &str, size: usize, count: usize) -> Result<()> {
    let mut stream = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    stream.set_nodelay(true)?;
    let request = vec![0x5a_u8; size];
    let mut reply = vec![0u8; size];
    let mut round_trip = || -> io::Result<Duration> {
        let started = Instant::now();
        stream.write_all(&request)?;
        stream.read_exact(&mut reply)?;
        Ok(started.elapsed())
    };
    // Warm up: connection setup, the relay's first packets, caches.
    for _ in 0..count / 10 {
        round_trip()?;
    }
    let mut samples = (0..count)
        .map(|_| round_trip())
        .collect::<io::Result<Vec<_>>>()?;
    samples.sort_unstable();
    let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    println!(
        "{:.1} {:.1} {:.1}",
        at(0.5).as_secs_f64() * 1e6,
        at(0.99).as_secs_f64() * 1e6,
        at(0.999).as_secs_f64() * 1e6
    );
    Ok(())
}

/// One short connection: 64 bytes each way, then an orderly close from the client.
fn one_exchange(addr: &str) -> io::Result<()> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_nodelay(true)?;
    let mut buf = [0x5a_u8; 64];
    stream.write_all(&buf)?;
    stream.read_exact(&mut buf)?;
    stream.shutdown(Shutdown::Write)?;
    // The server closes after our FIN: its EOF means the exchange completed end to end.
    if stream.read(&mut buf)? != 0 {
        return Err(io::Error::other("more bytes than were sent"));
    }
    Ok(())
}

fn rate(addr: &str, duration: Duration, workers: usize) -> Result<()> {
    let done = AtomicU64::new(0);
    let failed = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let started = Instant::now();
    thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    match one_exchange(addr) {
                        Ok(()) => done.fetch_add(1, Ordering::Relaxed),
                        Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            });
        }
        // The measured interval itself, not a synchroniser.
        thread::sleep(duration);
        stop.store(true, Ordering::Relaxed);
    });
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "{:.0} {}",
        done.load(Ordering::Relaxed) as f64 / elapsed,
        failed.load(Ordering::Relaxed)
    );
    Ok(())
}

fn idle(addr: &str, count: usize) -> Result<()> {
    raise_fd_limit()?;
    let mut held = Vec::with_capacity(count);
    for i in 0..count {
        let context = || format!("connection {i} of {count} through {addr}");
        let mut stream = TcpStream::connect(addr).with_context(context)?;
        // A relay out of room would leave it waiting in a backlog: fail instead.
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut byte = [1u8];
        stream.write_all(&byte).with_context(context)?;
        stream.read_exact(&mut byte).with_context(context)?;
        held.push(stream);
    }
    println!("ready");
    io::stdout().flush()?;
    // Hold every connection until the bench has measured and closes our stdin.
    for line in io::stdin().lock().lines() {
        line?;
    }
    Ok(())
}

/// What each slow client reads at a time.
const SLOW_READ: usize = 8 << 10;
/// A never-reader is held once a send cannot start for this long.
const HELD_AFTER: Duration = Duration::from_secs(2);

fn slow(addr: &str, count: usize, read_rate: u64, settle: Duration) -> Result<()> {
    raise_fd_limit()?;
    let streams = (0..count)
        .map(|i| {
            let stream = TcpStream::connect(addr)
                .with_context(|| format!("connection {i} of {count} through {addr}"))?;
            // A relay that stops forwarding fails the probe instead of hanging it.
            stream.set_read_timeout(Some(Duration::from_secs(30)))?;
            stream.set_write_timeout(Some(HELD_AFTER))?;
            Ok(stream)
        })
        .collect::<Result<Vec<_>>>()?;
    let stop = AtomicBool::new(false);
    thread::scope(|scope| -> Result<()> {
        let workers: Vec<_> = streams
            .into_iter()
            .map(|stream| {
                let stop = &stop;
                scope.spawn(move || {
                    if read_rate == 0 {
                        send_until_held(stream)
                    } else {
                        read_slowly(stream, read_rate, stop).map(|()| true)
                    }
                })
            })
            .collect();
        let mut readers = Vec::new();
        let mut resets = 0;
        if read_rate == 0 {
            // Every never-reader's send blocked or was reset: the relay holds the rest.
            let held = workers
                .into_iter()
                .map(|w| w.join().unwrap_or_else(|_| bail!("a client panicked")))
                .collect::<Result<Vec<bool>>>()?;
            resets = held.iter().filter(|held| !**held).count();
        } else {
            // The measured settling time of paced readers, not a synchroniser.
            thread::sleep(settle);
            readers = workers;
        }
        println!("ready {resets}");
        io::stdout().flush()?;
        for line in io::stdin().lock().lines() {
            line?;
        }
        stop.store(true, Ordering::Relaxed);
        for reader in readers {
            reader
                .join()
                .unwrap_or_else(|_| bail!("a client panicked"))?;
        }
        Ok(())
    })
}

/// Sends until a send cannot start for [`HELD_AFTER`] (true: the connection is then held
/// open) or the relay resets the connection (false).
fn send_until_held(mut stream: TcpStream) -> Result<bool> {
    let chunk = [0x5a_u8; 64 << 10];
    loop {
        match stream.write(&chunk) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                // Kept open (leaked to the probe's exit) so that its bytes stay held.
                std::mem::forget(stream);
                return Ok(true);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
                ) =>
            {
                return Ok(false);
            }
            Err(e) => bail!("a never-reader's send failed: {e}"),
        }
    }
}

/// Reads `rate` bytes a second, [`SLOW_READ`] at a time, until `stop`.
fn read_slowly(mut stream: TcpStream, rate: u64, stop: &AtomicBool) -> Result<()> {
    let mut buf = vec![0u8; SLOW_READ];
    let every = Duration::from_secs_f64(SLOW_READ as f64 / rate as f64);
    let mut next = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        stream
            .read_exact(&mut buf)
            .context("a slow reader's read")?;
        next += every;
        // Pacing the reads, not a synchroniser.
        thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    Ok(())
}

/// RLIMIT_NOFILE as high as allowed: fs.nr_open when privileged (the idle run's relays hold
/// tens of thousands of descriptors, HAProxy wants 2.5 per connection), else the hard limit.
pub fn raise_fd_limit() -> Result<()> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            bail!("getrlimit: {}", io::Error::last_os_error());
        }
        let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(limit.rlim_max);
        let raised = libc::rlimit {
            rlim_cur: nr_open.max(limit.rlim_max),
            rlim_max: nr_open.max(limit.rlim_max),
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
            return Ok(());
        }
        limit.rlim_cur = limit.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
            bail!("setrlimit: {}", io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Writes to every connection as fast as it takes, until the connection fails.
pub fn push_server(listen: &str) -> Result<()> {
    serve(listen, |mut stream| async move {
        let chunk = [0x5a_u8; 64 << 10];
        while tokio::io::AsyncWriteExt::write_all(&mut stream, &chunk)
            .await
            .is_ok()
        {}
    })
}

/// Echoes every byte back; closes its side after the client's FIN.
pub fn echo_server(listen: &str) -> Result<()> {
    serve(listen, |mut stream| async move {
        let _ = stream.set_nodelay(true);
        let (mut reader, mut writer) = stream.split();
        if tokio::io::copy(&mut reader, &mut writer).await.is_ok() {
            let _ = tokio::io::AsyncWriteExt::shutdown(&mut writer).await;
        }
    })
}

/// Accepts on `listen` for good, serving each connection with `each` in a task of its own.
fn serve<F, S>(listen: &str, each: F) -> Result<()>
where
    F: Fn(tokio::net::TcpStream) -> S,
    S: Future<Output = ()> + Send + 'static,
{
    raise_fd_limit()?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(listen).await?;
        loop {
            let (stream, _) = listener.accept().await?;
            tokio::spawn(each(stream));
        }
    })
}
