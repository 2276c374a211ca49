//! IPv4 TCP sockets made by hand, for what std does not offer: binding a client to a chosen
//! source address, connecting without waiting, a listen backlog of zero.

use std::{
    io,
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

fn sockaddr(addr: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(addr.ip().octets()),
        },
        sin_zero: [0; 8],
    }
}

const SOCKADDR_LEN: libc::socklen_t = size_of::<libc::sockaddr_in>() as libc::socklen_t;

/// A TCP socket bound to `local` (port 0: any).
pub fn bound_socket(local: SocketAddrV4, nonblocking: bool) -> io::Result<OwnedFd> {
    let flags =
        libc::SOCK_STREAM | libc::SOCK_CLOEXEC | if nonblocking { libc::SOCK_NONBLOCK } else { 0 };
    // SAFETY: plain socket call; the fd is owned right away.
    let fd = unsafe { libc::socket(libc::AF_INET, flags, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a new socket nobody else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let addr = sockaddr(local);
    // SAFETY: addr is a valid sockaddr_in of SOCKADDR_LEN bytes.
    if unsafe {
        libc::bind(
            socket.as_raw_fd(),
            std::ptr::from_ref(&addr).cast(),
            SOCKADDR_LEN,
        )
    } != 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(socket)
}

/// connect(2); with a nonblocking socket, EINPROGRESS counts as started.
pub fn connect(socket: &OwnedFd, to: SocketAddrV4) -> io::Result<()> {
    let addr = sockaddr(to);
    // SAFETY: addr is a valid sockaddr_in of SOCKADDR_LEN bytes.
    if unsafe {
        libc::connect(
            socket.as_raw_fd(),
            std::ptr::from_ref(&addr).cast(),
            SOCKADDR_LEN,
        )
    } == 0
    {
        return Ok(());
    }
    match io::Error::last_os_error() {
        e if e.raw_os_error() == Some(libc::EINPROGRESS) => Ok(()),
        e => Err(e),
    }
}

/// A connection from `source` (any port) to `to`.
pub fn connect_from_v4(source: Ipv4Addr, to: SocketAddrV4) -> io::Result<std::net::TcpStream> {
    let socket = bound_socket(SocketAddrV4::new(source, 0), false)?;
    connect(&socket, to)?;
    Ok(std::net::TcpStream::from(socket))
}

/// A connection to `to` whose segments carry at most `mss` bytes each way (TCP_MAXSEG, set
/// before the handshake): a real network's segment size over loopback.
pub fn connect_with_mss(to: SocketAddrV4, mss: libc::c_int) -> io::Result<std::net::TcpStream> {
    let socket = bound_socket(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0), false)?;
    // SAFETY: mss is a valid c_int of the length given.
    if unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_MAXSEG,
            std::ptr::from_ref(&mss).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    } != 0
    {
        return Err(io::Error::last_os_error());
    }
    connect(&socket, to)?;
    Ok(std::net::TcpStream::from(socket))
}

/// listen(2) with the given backlog.
pub fn listen(socket: OwnedFd, backlog: libc::c_int) -> io::Result<std::net::TcpListener> {
    // SAFETY: plain syscall on a socket we own.
    if unsafe { libc::listen(socket.as_raw_fd(), backlog) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(std::net::TcpListener::from(socket))
}

/// Where an established socket's two byte streams stand in TCP sequence space.
#[derive(Clone, Copy, Debug)]
pub struct Sequences {
    /// The sequence number of the next byte this socket will send.
    pub send: u32,
    /// The sequence number of the next byte it expects: what its ACKs carry.
    pub receive: u32,
}

// From include/uapi/linux/tcp.h (libc lacks the queue names).
const TCP_REPAIR_ON: libc::c_int = 1;
const TCP_REPAIR_OFF: libc::c_int = 0;
const TCP_RECV_QUEUE: libc::c_int = 1;
const TCP_SEND_QUEUE: libc::c_int = 2;

fn set_tcp_option(fd: &impl AsRawFd, option: libc::c_int, value: libc::c_int) -> io::Result<()> {
    set_int_option(fd, libc::IPPROTO_TCP, option, value)
}

/// setsockopt(2) of an int-valued option.
pub fn set_int_option(
    fd: &impl AsRawFd,
    level: libc::c_int,
    option: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: value is a c_int of the length passed.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            option,
            std::ptr::from_ref(&value).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn queue_seq(fd: &impl AsRawFd, queue: libc::c_int) -> io::Result<u32> {
    set_tcp_option(fd, libc::TCP_REPAIR_QUEUE, queue)?;
    let mut seq: u32 = 0;
    let mut len = size_of::<u32>() as libc::socklen_t;
    // SAFETY: seq and len are valid for the kernel to write.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_QUEUE_SEQ,
            std::ptr::from_mut(&mut seq).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(seq)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Reads an established socket's sequence numbers through TCP repair mode (CAP_NET_ADMIN),
/// which it enters and leaves around the reads.
pub fn sequences(fd: &impl AsRawFd) -> io::Result<Sequences> {
    set_tcp_option(fd, libc::TCP_REPAIR, TCP_REPAIR_ON)?;
    let read = (|| {
        Ok(Sequences {
            send: queue_seq(fd, TCP_SEND_QUEUE)?,
            receive: queue_seq(fd, TCP_RECV_QUEUE)?,
        })
    })();
    set_tcp_option(fd, libc::TCP_REPAIR, TCP_REPAIR_OFF)?;
    read
}

/// Bytes `fd` has sent that its peer has not acknowledged yet, plus any not sent (SIOCOUTQ).
pub fn unacknowledged(fd: &impl AsRawFd) -> io::Result<usize> {
    let mut queued: libc::c_int = 0;
    // SAFETY: SIOCOUTQ writes one c_int.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCOUTQ, &mut queued) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(queued as usize)
}

/// Sends one TCP segment by hand (a raw socket, CAP_NET_RAW), as if `from` had sent it on
/// its connection to `to`: ACK and PSH set, no options.
pub fn send_segment(
    from: SocketAddrV4,
    to: SocketAddrV4,
    seq: u32,
    ack: u32,
    payload: &[u8],
) -> io::Result<()> {
    let mut segment = Vec::with_capacity(20 + payload.len());
    segment.extend_from_slice(&from.port().to_be_bytes());
    segment.extend_from_slice(&to.port().to_be_bytes());
    segment.extend_from_slice(&seq.to_be_bytes());
    segment.extend_from_slice(&ack.to_be_bytes());
    // Header length 5 words; flags ACK | PSH; the largest unscaled window.
    segment.extend_from_slice(&[5 << 4, 0x18, 0xff, 0xff, 0, 0, 0, 0]);
    segment.extend_from_slice(payload);
    let checksum = tcp_checksum(*from.ip(), *to.ip(), &segment);
    segment[16..18].copy_from_slice(&checksum.to_be_bytes());

    // SAFETY: plain socket call; the fd is owned right away.
    let fd = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::IPPROTO_TCP,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a new socket nobody else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let addr = sockaddr(SocketAddrV4::new(*to.ip(), 0));
    // SAFETY: segment and addr are valid for the lengths passed.
    let sent = unsafe {
        libc::sendto(
            socket.as_raw_fd(),
            segment.as_ptr().cast(),
            segment.len(),
            0,
            std::ptr::from_ref(&addr).cast(),
            SOCKADDR_LEN,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The TCP checksum over the IPv4 pseudo-header and the segment (RFC 793).
fn tcp_checksum(source: Ipv4Addr, destination: Ipv4Addr, segment: &[u8]) -> u16 {
    let mut pseudo = Vec::with_capacity(12);
    pseudo.extend_from_slice(&source.octets());
    pseudo.extend_from_slice(&destination.octets());
    pseudo.extend_from_slice(&[0, libc::IPPROTO_TCP as u8]);
    pseudo.extend_from_slice(&(segment.len() as u16).to_be_bytes());
    let mut sum: u32 = pseudo
        .chunks(2)
        .chain(segment.chunks(2))
        .map(|pair| u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}
