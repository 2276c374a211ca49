//! Wakes connection tasks for the few events kernel-mode sockets need userspace for.
//!
//! Sockets in the sockhash stay out of tokio's reactor: tokio registers EPOLLIN, and every
//! redirected packet fires the socket's data-ready wakeup, so the relay would wake per
//! packet. This watcher's own epoll set asks for EPOLLRDHUP (FIN), errors, and EPOLLIN or
//! EPOLLOUT only while userspace itself moves a flow's bytes.

use std::{
    collections::HashMap,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
};

use tokio::{io::unix::AsyncFd, sync::Notify};

/// Event bits a connection task waits for, per direction of use of a socket.
pub const HANGUP: u32 = 1;
pub const ERROR: u32 = 2;
pub const READABLE: u32 = 4;
pub const WRITABLE: u32 = 8;
/// The verdict program wants userspace to look at the flow reading from this socket.
pub const NOTIFIED: u32 = 16;

/// Pending events of one socket: read-side ones for the flow reading it, write-side ones
/// for the flow writing to it, so the two flows of a connection never steal each other's.
#[derive(Default)]
pub struct SocketSignals {
    read_events: AtomicU32,
    read_notify: Notify,
    write_events: AtomicU32,
    write_notify: Notify,
}

impl SocketSignals {
    fn raise(&self, bits: u32) {
        let read = bits & (HANGUP | ERROR | READABLE | NOTIFIED);
        if read != 0 {
            self.read_events.fetch_or(read, Ordering::AcqRel);
            self.read_notify.notify_one();
        }
        let write = bits & (ERROR | WRITABLE | HANGUP);
        if write != 0 {
            self.write_events.fetch_or(write, Ordering::AcqRel);
            self.write_notify.notify_one();
        }
    }

    pub fn raise_notified(&self) {
        self.raise(NOTIFIED);
    }

    /// Waits until at least one read-side event is pending, then takes them all.
    pub async fn read_events(&self) -> u32 {
        loop {
            let bits = self.read_events.swap(0, Ordering::AcqRel);
            if bits != 0 {
                return bits;
            }
            self.read_notify.notified().await;
        }
    }

    pub async fn write_events(&self) -> u32 {
        loop {
            let bits = self.write_events.swap(0, Ordering::AcqRel);
            if bits != 0 {
                return bits;
            }
            self.write_notify.notified().await;
        }
    }
}

pub struct SocketWatcher {
    epoll: AsyncFd<OwnedFd>,
    sockets: Mutex<HashMap<u64, Arc<SocketSignals>>>,
}

impl SocketWatcher {
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain syscall; the result is checked before use.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: epoll_create1 just returned this descriptor to us.
        let epoll = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: the epoll fd is owned by the AsyncFd and closed only when it drops.
        let epoll = unsafe { AsyncFd::register(epoll) }.map_err(io::Error::from)?;
        Ok(Self {
            epoll,
            sockets: Mutex::new(HashMap::new()),
        })
    }

    /// Starts watching `fd` for hangups and errors; events reach the returned signals.
    pub fn watch(&self, cookie: u64, fd: RawFd) -> io::Result<Arc<SocketSignals>> {
        let signals = Arc::new(SocketSignals::default());
        self.lock().insert(cookie, Arc::clone(&signals));
        if let Err(e) = self.control(libc::EPOLL_CTL_ADD, cookie, fd, 0) {
            self.lock().remove(&cookie);
            return Err(e);
        }
        Ok(signals)
    }

    /// Sets the optional interest (READABLE and/or WRITABLE) on top of hangups and errors.
    /// EPOLL_CTL_MOD re-checks readiness, so an edge that is already there is not missed.
    pub fn set_interest(&self, cookie: u64, fd: RawFd, interest: u32) -> io::Result<()> {
        self.control(libc::EPOLL_CTL_MOD, cookie, fd, interest)
    }

    pub fn unwatch(&self, cookie: u64, fd: RawFd) {
        // The fd may already be gone from the set when the socket was closed; nothing to do.
        let _ = self.control(libc::EPOLL_CTL_DEL, cookie, fd, 0);
        self.forget(cookie);
    }

    /// Stops dispatching to `cookie`'s signals, leaving its fd in the epoll set: for a
    /// socket about to be closed, which leaves the set by itself (it has no duplicates).
    pub fn forget(&self, cookie: u64) {
        self.lock().remove(&cookie);
    }

    pub fn signals(&self, cookie: u64) -> Option<Arc<SocketSignals>> {
        self.lock().get(&cookie).cloned()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<SocketSignals>>> {
        // A panic while holding this lock leaves a plain map behind: still consistent.
        self.sockets.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn control(&self, op: libc::c_int, cookie: u64, fd: RawFd, interest: u32) -> io::Result<()> {
        let mut events = (libc::EPOLLRDHUP | libc::EPOLLET) as u32;
        if interest & READABLE != 0 {
            events |= libc::EPOLLIN as u32;
        }
        if interest & WRITABLE != 0 {
            events |= libc::EPOLLOUT as u32;
        }
        let mut event = libc::epoll_event {
            events,
            u64: cookie,
        };
        // SAFETY: event is valid for the call; the epoll fd is ours.
        let ret = unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), op, fd, &mut event) };
        if ret < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// Dispatches epoll events to connection tasks until the runtime shuts down.
    pub async fn run(self: Arc<Self>) -> io::Result<()> {
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
        loop {
            let mut guard = self.epoll.readable().await?;
            // SAFETY: events is valid for its length; timeout 0 never blocks.
            let n = unsafe {
                libc::epoll_wait(
                    self.epoll.as_raw_fd(),
                    events.as_mut_ptr(),
                    events.len() as i32,
                    0,
                )
            };
            if n < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(err);
            }
            if n == 0 {
                guard.clear_ready();
                continue;
            }
            let sockets = self.lock();
            for event in &events[..n as usize] {
                let Some(signals) = sockets.get(&{ event.u64 }) else {
                    continue;
                };
                signals.raise(translate(event.events));
            }
        }
    }
}

fn translate(epoll: u32) -> u32 {
    let mut bits = 0;
    if epoll & (libc::EPOLLRDHUP | libc::EPOLLHUP) as u32 != 0 {
        bits |= HANGUP;
    }
    if epoll & libc::EPOLLERR as u32 != 0 {
        bits |= ERROR;
    }
    if epoll & libc::EPOLLIN as u32 != 0 {
        bits |= READABLE;
    }
    if epoll & libc::EPOLLOUT as u32 != 0 {
        bits |= WRITABLE;
    }
    bits
}
