//! Thin, checked wrappers over the socket calls the data planes need and std does not offer.

use std::{
    io,
    mem::size_of,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
};

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn check_size(ret: libc::ssize_t) -> io::Result<usize> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}

fn setsockopt<T>(fd: &impl AsRawFd, level: i32, name: i32, value: &T) -> io::Result<()> {
    // SAFETY: value points to a live T of the given size.
    check(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            std::ptr::from_ref(value).cast(),
            size_of::<T>() as libc::socklen_t,
        )
    })
    .map(drop)
}

fn getsockopt<T: Default>(fd: &impl AsRawFd, level: i32, name: i32) -> io::Result<T> {
    let mut value = T::default();
    let mut len = size_of::<T>() as libc::socklen_t;
    // SAFETY: value and len describe a live T for the kernel to write.
    check(unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            std::ptr::from_mut(&mut value).cast(),
            &mut len,
        )
    })?;
    Ok(value)
}

/// The kernel's identifier for a socket, the same value `bpf_get_socket_cookie()` returns.
pub fn socket_cookie(fd: &impl AsRawFd) -> io::Result<u64> {
    getsockopt(fd, libc::SOL_SOCKET, libc::SO_COOKIE)
}

/// SO_RCVLOWAT gates the verdict program: TCP calls data-ready, which runs it, only once this
/// many bytes wait (or the window is nearly closed, or a FIN came). Setting it also runs
/// data-ready at once (tcp_set_rcvlowat), which hands bytes already queued to the program.
pub fn set_receive_low_water(fd: &impl AsRawFd, bytes: libc::c_int) -> io::Result<()> {
    setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVLOWAT, &bytes)
}

/// Fixes the receive buffer (and so turns off its autotuning). SO_RCVBUFFORCE passes
/// net.core.rmem_max with CAP_NET_ADMIN, which the kernel data plane needs anyway.
pub fn set_receive_buffer(fd: &impl AsRawFd, bytes: libc::c_int) -> io::Result<()> {
    setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, &bytes)
        .or_else(|_| setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, &bytes))
}

/// Sets the receive buffer to `bytes` as the kernel counts it (SO_RCVBUF asks for half: the
/// kernel doubles what it is given).
pub fn set_receive_buffer_total(fd: &impl AsRawFd, bytes: u32) -> io::Result<()> {
    let asked = libc::c_int::try_from(bytes.div_ceil(2)).unwrap_or(libc::c_int::MAX);
    set_receive_buffer(fd, asked)
}

/// SK_MEMINFO_VARS, include/uapi/linux/sock_diag.h: the values SO_MEMINFO fills.
const SK_MEMINFO_VARS: usize = 9;

/// A socket's receive memory as the kernel charges it (true sizes, not payload bytes).
pub struct ReceiveMemory {
    /// Charged to the receive queues and the socket backlog.
    pub used: u32,
    /// The buffer (sk_rcvbuf) that charge is held to.
    pub buffer: u32,
}

pub fn receive_memory(fd: &impl AsRawFd) -> io::Result<ReceiveMemory> {
    let info: [u32; SK_MEMINFO_VARS] = getsockopt(fd, libc::SOL_SOCKET, libc::SO_MEMINFO)?;
    Ok(ReceiveMemory {
        used: info[libc::SK_MEMINFO_RMEM_ALLOC as usize]
            .saturating_add(info[libc::SK_MEMINFO_BACKLOG as usize]),
        buffer: info[libc::SK_MEMINFO_RCVBUF as usize],
    })
}

/// What a socket holds as the kernel charges it, in true sizes: its receive queues and
/// backlog, and its write queue.
pub fn socket_memory(fd: &impl AsRawFd) -> io::Result<u64> {
    let info: [u32; SK_MEMINFO_VARS] = getsockopt(fd, libc::SOL_SOCKET, libc::SO_MEMINFO)?;
    Ok([
        libc::SK_MEMINFO_RMEM_ALLOC,
        libc::SK_MEMINFO_BACKLOG,
        libc::SK_MEMINFO_WMEM_QUEUED,
    ]
    .into_iter()
    .map(|at| u64::from(info[at as usize]))
    .sum())
}

/// Fixes the send buffer (and turns off its autotuning), past net.core.wmem_max with
/// CAP_NET_ADMIN.
pub fn set_send_buffer(fd: &impl AsRawFd, bytes: libc::c_int) -> io::Result<()> {
    setsockopt(fd, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, &bytes)
        .or_else(|_| setsockopt(fd, libc::SOL_SOCKET, libc::SO_SNDBUF, &bytes))
}

/// TCP_NODELAY: small writes go out at once.
pub fn set_no_delay(fd: &impl AsRawFd) -> io::Result<()> {
    let on: libc::c_int = 1;
    setsockopt(fd, libc::IPPROTO_TCP, libc::TCP_NODELAY, &on)
}

/// TCP_WINDOW_CLAMP: the largest window this socket may advertise. Autotuning lowers it as
/// it sizes the receive buffer, and so does a segment arriving while the buffer is cut; a
/// receive buffer fixed later does not raise it again.
pub fn set_window_clamp(fd: &impl AsRawFd, bytes: libc::c_int) -> io::Result<()> {
    setsockopt(fd, libc::IPPROTO_TCP, libc::TCP_WINDOW_CLAMP, &bytes)
}

/// Sends an ACK the socket has scheduled now, carrying the window as it is now
/// (TCP_QUICKACK: tcp_cleanup_rbuf, which acks at once when the window has at least
/// doubled). Leaves delayed-ACK mode as the kernel would after a quick ACK.
pub fn push_scheduled_ack(fd: &impl AsRawFd) -> io::Result<()> {
    let on: libc::c_int = 1;
    setsockopt(fd, libc::IPPROTO_TCP, libc::TCP_QUICKACK, &on)
}

/// The TCP_WINDOW_CLAMP in force.
#[cfg(test)]
pub fn window_clamp(fd: &impl AsRawFd) -> io::Result<libc::c_int> {
    getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_WINDOW_CLAMP)
}

/// Returns only after any softirq that is processing a packet for this socket has finished
/// (TCP_INFO takes the socket lock), so every byte the program counted is queued by then.
pub fn socket_barrier(fd: &impl AsRawFd) -> io::Result<()> {
    tcp_info(fd).map(drop)
}

/// A zero linger time makes close() send RST: how a reset travels to the other side.
pub fn set_linger_zero(fd: &impl AsRawFd) -> io::Result<()> {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    setsockopt(fd, libc::SOL_SOCKET, libc::SO_LINGER, &linger)
}

pub fn shutdown_write(fd: &impl AsRawFd) -> io::Result<()> {
    // SAFETY: plain syscall on a descriptor we own.
    check(unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_WR) }).map(drop)
}

/// What the socket's TCP stack has taken for sending so far: the bytes acknowledged, and
/// those still in the write queue (SIOCOUTQ). Read in that order so concurrent progress
/// can only make the sum smaller than the truth, never larger.
pub fn acked_and_queued(fd: &impl AsRawFd) -> io::Result<(u64, u64)> {
    let acked = tcp_info(fd)?.bytes_acked;
    Ok((acked, unacked_or_unsent(fd)?))
}

/// SIOCOUTQ: bytes in the write queue, sent but unacknowledged or not sent yet.
pub fn unacked_or_unsent(fd: &impl AsRawFd) -> io::Result<u64> {
    let mut outq: libc::c_int = 0;
    // SAFETY: outq is valid for the kernel to write.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCOUTQ, &mut outq) })?;
    Ok(outq as u64)
}

/// SIOCINQ: bytes in the receive queue, in order, not read yet (a FIN not counted). The
/// queue ends where a segment ends, so reading exactly this many leaves no segment half read.
pub fn unread(fd: &impl AsRawFd) -> io::Result<usize> {
    let mut inq: libc::c_int = 0;
    // SAFETY: inq is valid for the kernel to write.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut inq) })?;
    Ok(inq as usize)
}

/// include/uapi/linux/tcp.h: repair mode, and reading a queue's sequence number in it.
const TCP_REPAIR: libc::c_int = 19;
const TCP_REPAIR_QUEUE: libc::c_int = 20;
const TCP_QUEUE_SEQ: libc::c_int = 21;
const TCP_RECV_QUEUE: libc::c_int = 1;
/// Leaves repair mode without the window probe plain TCP_REPAIR_OFF sends.
const TCP_REPAIR_OFF_NO_WP: libc::c_int = -1;

/// The sequence number of the next byte recv() would return (the kernel's copied_seq):
/// rcv_nxt, read in repair mode (CAP_NET_ADMIN), minus what is queued unread. Both move as
/// segments arrive, so the queue is measured before and after, until no segment came
/// between.
pub fn next_unread_sequence(fd: &impl AsRawFd) -> io::Result<u32> {
    // Leaving repair mode clears SO_REUSEADDR; a relayed socket's TIME_WAIT without it
    // would keep the listener's port from being bound again for a minute.
    let reuse: libc::c_int = getsockopt(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR)?;
    setsockopt(fd, libc::IPPROTO_TCP, TCP_REPAIR, &1)?;
    let measured = (|| {
        setsockopt(fd, libc::IPPROTO_TCP, TCP_REPAIR_QUEUE, &TCP_RECV_QUEUE)?;
        for _ in 0..16 {
            let before = unread(fd)?;
            let rcv_nxt: u32 = getsockopt(fd, libc::IPPROTO_TCP, TCP_QUEUE_SEQ)?;
            if unread(fd)? == before {
                return Ok(rcv_nxt.wrapping_sub(before as u32));
            }
        }
        Err(io::Error::other(
            "segments kept arriving while the receive queue was measured",
        ))
    })();
    let left = setsockopt(fd, libc::IPPROTO_TCP, TCP_REPAIR, &TCP_REPAIR_OFF_NO_WP)
        .and_then(|()| setsockopt(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, &reuse));
    let sequence = measured?;
    left.map(|()| sequence)
}

pub struct TcpInfo {
    pub state: u8,
    pub bytes_acked: u64,
    /// The window this socket last advertised, in bytes (tcpi_rcv_wnd, Linux 6.2 on): at
    /// most that much can still be in flight towards it.
    pub receive_window: Option<u32>,
}

/// TCP_ESTABLISHED from include/net/tcp_states.h.
pub const TCP_ESTABLISHED: u8 = 1;

/// struct tcp_info is append-only: offsets of the fields read, and the Linux that added them.
pub mod tcp_info_at {
    /// Linux 2.6 (tcpi_unacked, in segments).
    #[cfg(test)]
    pub const UNACKED: usize = 24;
    /// Linux 4.1.
    pub const BYTES_ACKED: usize = 120;
    /// Linux 4.6.
    #[cfg(test)]
    pub const NOTSENT_BYTES: usize = 144;
    /// Linux 6.2.
    pub const RCV_WND: usize = 232;
}

/// The kernel's struct tcp_info, as far as it fills it: on the stack, since TCP_INFO is
/// read on every backlog check and watchdog tick.
pub struct TcpInfoBytes {
    raw: [u8; 256],
    len: usize,
}

impl TcpInfoBytes {
    pub fn get(&self, at: usize, width: usize) -> Option<&[u8]> {
        self.raw[..self.len].get(at..at + width)
    }
}

pub fn tcp_info_bytes(fd: &impl AsRawFd) -> io::Result<TcpInfoBytes> {
    let mut raw = [0u8; 256];
    let mut len = raw.len() as libc::socklen_t;
    // SAFETY: raw and len are valid for the kernel to write.
    check(unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            raw.as_mut_ptr().cast(),
            &mut len,
        )
    })?;
    Ok(TcpInfoBytes {
        raw,
        len: (len as usize).min(raw.len()),
    })
}

pub fn tcp_info(fd: &impl AsRawFd) -> io::Result<TcpInfo> {
    let raw = tcp_info_bytes(fd)?;
    let bytes_acked = raw
        .get(tcp_info_at::BYTES_ACKED, 8)
        .ok_or_else(|| io::Error::other("kernel tcp_info too short for tcpi_bytes_acked"))?;
    Ok(TcpInfo {
        state: raw.raw[0],
        bytes_acked: u64::from_ne_bytes(bytes_acked.try_into().expect("8 bytes")),
        receive_window: raw
            .get(tcp_info_at::RCV_WND, 4)
            .map(|bytes| u32::from_ne_bytes(bytes.try_into().expect("4 bytes"))),
    })
}

/// Non-blocking recv: Ok(0) is end of stream, WouldBlock means nothing queued now.
pub fn recv_nonblocking(fd: &impl AsRawFd, buf: &mut [u8]) -> io::Result<usize> {
    recv_flags(fd, buf, libc::MSG_DONTWAIT)
}

/// Copies the start of the receive queue without consuming it.
pub fn peek_nonblocking(fd: &impl AsRawFd, buf: &mut [u8]) -> io::Result<usize> {
    recv_flags(fd, buf, libc::MSG_DONTWAIT | libc::MSG_PEEK)
}

fn recv_flags(fd: &impl AsRawFd, buf: &mut [u8], flags: libc::c_int) -> io::Result<usize> {
    // SAFETY: buf is valid for writes of its length.
    check_size(unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), flags) })
}

/// CLOCK_MONOTONIC in nanoseconds: for intervals shorter than a jiffy, which the coarse
/// clock cannot tell apart.
pub fn monotonic_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

/// CLOCK_MONOTONIC_COARSE, the clock of bpf_ktime_get_coarse_ns, in nanoseconds.
pub fn monotonic_coarse_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC_COARSE)
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: now is a valid timespec to write to.
    unsafe { libc::clock_gettime(clock, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

pub fn send_nonblocking(fd: &impl AsRawFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: buf is valid for reads of its length.
    check_size(unsafe {
        libc::send(
            fd.as_raw_fd(),
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    })
}

/// A non-blocking pipe, the buffer splice(2) moves pages through.
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: fds is valid for two descriptors.
    check(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) })?;
    // SAFETY: pipe2 just returned these two descriptors to us.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Moves up to `len` bytes between descriptors without copying through userspace.
pub fn splice(from: &impl AsRawFd, to: &impl AsRawFd, len: usize) -> io::Result<usize> {
    // SAFETY: plain syscall on descriptors we own; null offsets mean "current position".
    check_size(unsafe {
        libc::splice(
            from.as_raw_fd(),
            std::ptr::null_mut(),
            to.as_raw_fd(),
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    })
}

/// capability(7) numbers the kernel data plane needs.
pub const CAP_NET_ADMIN: u32 = 12;
pub const CAP_SYS_ADMIN: u32 = 21;
pub const CAP_PERFMON: u32 = 38;
pub const CAP_BPF: u32 = 39;

/// Whether this process holds `cap` in its effective set.
pub fn has_capability(cap: u32) -> bool {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: libc::c_int,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    // _LINUX_CAPABILITY_VERSION_3: two 32-bit words per set.
    let mut header = Header {
        version: 0x2008_0522,
        pid: 0,
    };
    let mut data = [Data::default(); 2];
    // SAFETY: header and data are the layout capget(2) expects for version 3.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_capget,
            std::ptr::from_mut(&mut header),
            data.as_mut_ptr(),
        )
    };
    ret == 0 && (data[(cap / 32) as usize].effective >> (cap % 32)) & 1 == 1
}

/// Raises the soft RLIMIT_NOFILE to the hard limit (systemd's LimitNOFILE, or prlimit)
/// and returns the soft limit now in force.
pub fn raise_fd_limit() -> io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: limit is a valid rlimit to fill and then pass back.
    check(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) })?;
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            ..limit
        };
        // SAFETY: as above.
        if check(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) }).is_ok() {
            limit = raised;
        }
    }
    Ok(limit.rlim_cur)
}

/// Descriptors this process has open now.
pub fn open_fds() -> io::Result<u64> {
    Ok(std::fs::read_dir("/proc/self/fd")?.count() as u64)
}
