//! One connection's entry in the memory account: the sockets it holds memory on, what its
//! data plane holds besides, and the two things the account may ask of it (throttle,
//! reset). Data planes read it through their `Supervision`.

use std::{
    net::IpAddr,
    os::fd::{AsRawFd, RawFd},
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering},
    },
    time::Instant,
};

use tokio::sync::Notify;

use super::shed::Pressure;
use crate::{counters::ListenerMetrics, sys};

/// A socket as the account measures it: the cookie proves the descriptor still names it.
#[derive(Clone, Copy)]
struct Watched {
    fd: RawFd,
    cookie: u64,
}

pub struct Holding {
    pub(super) id: u64,
    /// The client's address as per-address limits count it.
    pub(super) client: IpAddr,
    pub(super) listener: Option<Arc<ListenerMetrics>>,
    /// The account's pressure, shared by every holding.
    pressure: Arc<AtomicU8>,
    sockets: OnceLock<[Watched; 2]>,
    /// Its flows are in the kernel maps, keyed by its sockets' cookies.
    in_kernel: AtomicBool,
    /// What its data plane holds in userspace (buffers, pipes).
    buffers: AtomicU64,
    throttled: AtomicBool,
    shed: Notify,
    shed_asked: AtomicBool,
    /// Bytes its peers had acknowledged at the previous sample, and when.
    pub(super) acked: Mutex<Option<(u64, Instant)>>,
}

/// The measurement of one holding at one sample.
pub(super) struct Measured {
    pub held: u64,
    /// Bytes both peers have acknowledged in all, when asked for.
    pub acked: Option<u64>,
}

impl Holding {
    pub(super) fn new(
        id: u64,
        client: IpAddr,
        listener: Option<Arc<ListenerMetrics>>,
        pressure: Arc<AtomicU8>,
    ) -> Self {
        Self {
            id,
            client,
            listener,
            pressure,
            sockets: OnceLock::new(),
            in_kernel: AtomicBool::new(false),
            buffers: AtomicU64::new(0),
            throttled: AtomicBool::new(false),
            shed: Notify::new(),
            shed_asked: AtomicBool::new(false),
            acked: Mutex::new(None),
        }
    }

    /// A holding no account measures: for tests of one connection's machinery.
    pub fn unaccounted() -> Arc<Self> {
        Arc::new(Self::new(
            0,
            IpAddr::from([0, 0, 0, 0]),
            None,
            Arc::new(AtomicU8::new(Pressure::Calm as u8)),
        ))
    }

    /// Names the connection's two sockets once it has both; until then it holds nothing
    /// the account counts.
    pub fn watch(&self, client: &impl AsRawFd, upstream: &impl AsRawFd) {
        let watched = |s: &dyn AsRawFd| {
            let fd = s.as_raw_fd();
            sys::socket_cookie(&fd).map(|cookie| Watched { fd, cookie })
        };
        if let (Ok(client), Ok(upstream)) = (watched(client), watched(upstream)) {
            let _ = self.sockets.set([client, upstream]);
        }
    }

    /// Whether a new connection may move into the kernel: not once the relay holds half
    /// its limit, where a connection's memory is its own sockets' (which TCP's memory
    /// pressure reaches) and the relay's fixed buffers.
    pub fn kernel_welcome(&self) -> bool {
        self.pressure.load(Ordering::Relaxed) < Pressure::KernelClosed as u8
    }

    pub fn set_in_kernel(&self, in_kernel: bool) {
        self.in_kernel.store(in_kernel, Ordering::Relaxed);
    }

    /// Counts `bytes` of userspace buffers the data plane holds for the connection.
    pub fn set_buffers(&self, bytes: u64) {
        self.buffers.store(bytes, Ordering::Relaxed);
    }

    /// Whether the account asked for the connection to hold as little as it can.
    pub fn throttled(&self) -> bool {
        self.throttled.load(Ordering::Relaxed)
    }

    pub(super) fn set_throttled(&self, throttled: bool) {
        self.throttled.store(throttled, Ordering::Relaxed);
    }

    /// Asks the connection to end with a reset (see [`Holding::shed_requested`]); false if
    /// it was asked already.
    pub(super) fn shed(&self) -> bool {
        if self.shed_asked.swap(true, Ordering::Relaxed) {
            return false;
        }
        // A permit is kept when nobody waits yet: the connection sees it when it does.
        self.shed.notify_one();
        true
    }

    /// Returns once the account has asked for the connection to be reset.
    pub async fn shed_requested(&self) {
        self.shed.notified().await;
    }

    /// What the connection holds now: its sockets' queues as the kernel charges them, the
    /// kernel's redirect backlog towards them (by `backlogs`), and its userspace buffers.
    /// A socket whose descriptor no longer names it counts nothing: the connection ended.
    pub(super) fn measure(&self, backlogs: Option<&dyn Backlogs>, with_acked: bool) -> Measured {
        let buffers = self.buffers.load(Ordering::Relaxed);
        let Some(sockets) = self.sockets.get() else {
            return Measured {
                held: buffers,
                acked: None,
            };
        };
        let (mut held, mut acked) = (buffers, Some(0u64));
        for socket in sockets {
            let fd = socket.fd;
            let memory = sys::socket_memory(&fd);
            let info = with_acked.then(|| sys::tcp_info(&fd));
            // Checked after reading: a descriptor that still names the socket named it then.
            if sys::socket_cookie(&fd).ok() != Some(socket.cookie) {
                return Measured {
                    held: 0,
                    acked: None,
                };
            }
            held += memory.unwrap_or(0);
            acked = match (acked, info) {
                (Some(sum), Some(Ok(info))) => Some(sum + info.bytes_acked),
                _ => None,
            };
            if self.in_kernel.load(Ordering::Relaxed)
                && let Some(backlogs) = backlogs
            {
                held += backlogs.backlog_bound(socket.cookie);
            }
        }
        Measured { held, acked }
    }
}

/// What the kernel holds for flows in its maps and no socket is charged for: the redirect
/// backlog of the flow reading from a socket, by that socket's cookie.
pub trait Backlogs: Send + Sync {
    fn backlog_bound(&self, source_cookie: u64) -> u64;
}
