//! Userspace copy: read into a fixed buffer, write it all out, repeat.

use std::{
    io,
    sync::atomic::{AtomicU64, Ordering},
};

use tokio::net::TcpStream;

use super::DirectionError;
use crate::sys;

/// Per-direction buffer: with the socket buffers, the whole of what one direction holds.
pub const COPY_BUFFER: usize = 64 * 1024;

/// Forwards `from` to `to` until EOF, then shuts `to`'s write side. Returns bytes moved,
/// and counts them in `moved` as they go.
pub async fn forward(
    from: &TcpStream,
    to: &TcpStream,
    moved: &AtomicU64,
) -> Result<u64, DirectionError> {
    let mut buf = vec![0u8; COPY_BUFFER];
    let mut total = 0u64;
    loop {
        from.readable().await.map_err(DirectionError::Source)?;
        let n = match from.try_read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(DirectionError::Source(e)),
        };
        write_all(to, &buf[..n]).await?;
        total += n as u64;
        moved.fetch_add(n as u64, Ordering::Relaxed);
    }
    sys::shutdown_write(to).map_err(DirectionError::Destination)?;
    Ok(total)
}

async fn write_all(to: &TcpStream, mut bytes: &[u8]) -> Result<(), DirectionError> {
    while !bytes.is_empty() {
        to.writable().await.map_err(DirectionError::Destination)?;
        match to.try_write(bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(DirectionError::Destination(e)),
        }
    }
    Ok(())
}
