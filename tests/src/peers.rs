//! Real TCP peers: an upstream server with scripted behaviour, and clients that send and
//! receive at the same time while hashing everything, so any lost, duplicated or reordered
//! byte shows up as a digest mismatch.

use std::{
    io::{self, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::mpsc,
    thread,
    time::Duration,
};

use sha2::{Digest, Sha256};

/// Deterministic bytes (xorshift64*), different for each seed.
pub fn payload(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

pub fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// What one side received: length and SHA-256.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Received {
    pub len: u64,
    pub sha256: [u8; 32],
}

impl Received {
    pub fn of(bytes: &[u8]) -> Self {
        Self {
            len: bytes.len() as u64,
            sha256: digest(bytes),
        }
    }
}

/// Reads until EOF, hashing as it goes.
pub fn read_to_end_hashed(stream: &mut TcpStream) -> io::Result<Received> {
    let mut hasher = Sha256::new();
    let mut len = 0u64;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                hasher.update(&buf[..n]);
                len += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(Received {
        len,
        sha256: hasher.finalize().into(),
    })
}

/// Sends `data` then shuts the write side, while reading everything that comes back.
pub fn exchange(stream: TcpStream, data: Vec<u8>) -> io::Result<Received> {
    let mut writer = stream.try_clone()?;
    let sender = thread::spawn(move || -> io::Result<()> {
        writer.write_all(&data)?;
        writer.shutdown(Shutdown::Write)
    });
    let mut reader = stream;
    let received = read_to_end_hashed(&mut reader);
    sender.join().expect("sender thread")?;
    received
}

/// How the test upstream treats each connection.
#[derive(Clone, Debug)]
pub enum Behaviour {
    /// Send these bytes (then shut the write side) while reading to EOF.
    Exchange(Vec<u8>),
    /// Send the banner at once, then echo everything back until EOF.
    BannerThenEcho(Vec<u8>),
    /// Echo everything back until EOF, reading and writing this many bytes at a time at most
    /// (socat's 8 KiB, say).
    EchoBy(usize),
    /// Read to EOF first, then send the reply and close.
    ReplyAfterEof(Vec<u8>),
    /// Push up to this many bytes as fast as the relay takes them; report how many went.
    Push(u64),
    /// Accept, then reset the connection (SO_LINGER 0) after reading this many bytes.
    ResetAfter(u64),
}

/// One upstream server on 127.0.0.1:0, serving every connection in its own thread.
pub struct Upstream {
    pub addr: SocketAddr,
    received: mpsc::Receiver<io::Result<Received>>,
}

impl Upstream {
    pub fn start(behaviour: Behaviour) -> Self {
        Self::serve_on(
            TcpListener::bind("127.0.0.1:0").expect("bind test upstream"),
            behaviour,
        )
    }

    /// An upstream whose connections have `bytes` of socket buffer each way, fixed (as
    /// [`lock_buffers`] does), so that what it holds itself stays small.
    pub fn start_with_buffers(behaviour: Behaviour, bytes: usize) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind test upstream");
        // Accepted sockets inherit the listener's buffer sizes and their locks.
        lock_buffers(&listener, bytes);
        Self::serve_on(listener, behaviour)
    }

    fn serve_on(listener: TcpListener, behaviour: Behaviour) -> Self {
        let addr = listener.local_addr().expect("upstream address");
        let (tx, received) = mpsc::channel();
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                let (tx, behaviour) = (tx.clone(), behaviour.clone());
                thread::spawn(move || {
                    let _ = tx.send(serve(stream, behaviour));
                });
            }
        });
        Self { addr, received }
    }

    /// What the next finished connection received (or pushed, for [`Behaviour::Push`]).
    pub fn next_result(&self, within: Duration) -> io::Result<Received> {
        self.received
            .recv_timeout(within)
            .unwrap_or_else(|_| panic!("upstream connection did not finish within {within:?}"))
    }

    pub fn relay_target(&self) -> String {
        self.addr.to_string()
    }
}

/// Echoes everything back until EOF, `piece` bytes at a time at most, then shuts down.
fn echo(mut stream: TcpStream, piece: usize) -> io::Result<Received> {
    // Hashed as it passes, so that echoing much holds nothing in the test process.
    let (mut hasher, mut len) = (Sha256::new(), 0u64);
    let mut buf = vec![0u8; piece];
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        stream.write_all(&buf[..n])?;
        hasher.update(&buf[..n]);
        len += n as u64;
    }
    stream.shutdown(Shutdown::Write)?;
    Ok(Received {
        len,
        sha256: hasher.finalize().into(),
    })
}

fn serve(mut stream: TcpStream, behaviour: Behaviour) -> io::Result<Received> {
    match behaviour {
        Behaviour::Exchange(data) => exchange(stream, data),
        Behaviour::BannerThenEcho(banner) => {
            stream.write_all(&banner)?;
            echo(stream, 64 * 1024)
        }
        Behaviour::EchoBy(piece) => echo(stream, piece),
        Behaviour::ReplyAfterEof(reply) => {
            let received = read_to_end_hashed(&mut stream)?;
            stream.write_all(&reply)?;
            stream.shutdown(Shutdown::Write)?;
            Ok(received)
        }
        Behaviour::Push(limit) => {
            let chunk = payload(7, 256 * 1024);
            let mut sent = 0u64;
            while sent < limit {
                match stream.write(&chunk) {
                    Ok(n) => sent += n as u64,
                    Err(_) => break,
                }
            }
            Ok(Received {
                len: sent,
                sha256: [0; 32],
            })
        }
        Behaviour::ResetAfter(bytes) => {
            let mut buf = vec![0u8; bytes as usize];
            stream.read_exact(&mut buf)?;
            reset(stream);
            Ok(Received::of(&buf))
        }
    }
}

/// Fixes a socket's receive and send buffers at `bytes` (the kernel doubles it for its
/// overhead), which also turns off their autotuning.
pub fn lock_buffers(socket: &impl std::os::fd::AsRawFd, bytes: usize) {
    let value = libc::c_int::try_from(bytes).expect("a buffer size that fits an int");
    for option in [libc::SO_RCVBUF, libc::SO_SNDBUF] {
        crate::raw::set_int_option(socket, libc::SOL_SOCKET, option, value)
            .expect("setting a socket buffer");
    }
}

/// Closes with SO_LINGER 0, which sends RST.
pub fn reset(stream: TcpStream) {
    use std::os::fd::AsRawFd as _;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: valid fd and option value for the call.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            std::ptr::from_ref(&linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    drop(stream);
}

/// A loopback listener whose accept queue is already full: further connects to it hang
/// (their SYNs are dropped) until something is accepted from it. Returns the listener and
/// the connections that fill its queue.
pub fn full_listener() -> (TcpListener, Vec<TcpStream>) {
    let socket =
        crate::raw::bound_socket("127.0.0.1:0".parse().expect("address"), false).expect("socket");
    let listener = crate::raw::listen(socket, 0).expect("listen");
    let target = listener.local_addr().expect("listener address");
    let mut fillers = Vec::new();
    while let Ok(filler) = TcpStream::connect_timeout(&target, Duration::from_millis(500)) {
        fillers.push(filler);
        assert!(fillers.len() < 64, "the accept queue never filled");
    }
    (listener, fillers)
}
