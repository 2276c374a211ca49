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

/// listen(2) with the given backlog.
pub fn listen(socket: OwnedFd, backlog: libc::c_int) -> io::Result<std::net::TcpListener> {
    // SAFETY: plain syscall on a socket we own.
    if unsafe { libc::listen(socket.as_raw_fd(), backlog) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(std::net::TcpListener::from(socket))
}
