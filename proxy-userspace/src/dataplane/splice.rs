//! splice(2): socket to pipe to socket, pages moved by the kernel, readiness from tokio.

use std::{
    io,
    sync::atomic::{AtomicU64, Ordering},
};

use tokio::{io::Interest, net::TcpStream};

use crate::sys;
use crate::transfer::FlowError;

/// Largest chunk moved per splice; the pipe's default capacity (16 pages) bounds it anyway.
const CHUNK: usize = 64 * 1024;

/// Forwards `from` to `to` until EOF, then shuts `to`'s write side. Returns bytes moved,
/// and counts them in `moved` as they go.
pub async fn forward(
    from: &TcpStream,
    to: &TcpStream,
    moved: &AtomicU64,
) -> Result<u64, FlowError> {
    let (pipe_read, pipe_write) = sys::pipe().map_err(FlowError::Source)?;
    let mut total = 0u64;
    loop {
        // The pipe is always empty here, so EAGAIN can only mean "socket has nothing".
        let n = from
            .async_io(Interest::READABLE, || sys::splice(from, &pipe_write, CHUNK))
            .await
            .map_err(FlowError::Source)?;
        if n == 0 {
            break;
        }
        let mut in_pipe = n;
        while in_pipe > 0 {
            let sent = to
                .async_io(Interest::WRITABLE, || sys::splice(&pipe_read, to, in_pipe))
                .await
                .map_err(FlowError::Destination)?;
            if sent == 0 {
                return Err(FlowError::Destination(io::ErrorKind::WriteZero.into()));
            }
            in_pipe -= sent;
        }
        total += n as u64;
        moved.fetch_add(n as u64, Ordering::Relaxed);
    }
    sys::shutdown_write(to).map_err(FlowError::Destination)?;
    Ok(total)
}
