//! Relaying between any two async byte streams, for connections whose bytes must pass
//! through userspace anyway: TLS terminated by the relay (no kTLS on this kernel).

use std::{
    io,
    os::fd::RawFd,
    sync::atomic::{AtomicU64, Ordering},
};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::relay_counted;
use crate::transfer::{
    ConnectionError, FlowError, Flows, Progress, Supervision, Transfer, Watchdog,
};

/// One TLS record's worth of plaintext.
const STREAM_BUFFER: usize = 16 * 1024;

/// Relays `client` and `upstream` until both directions end, with the same half-close,
/// reset and timeout behaviour as the socket data planes. `sockets` are the two TCP
/// sockets underneath, reset when the connection fails.
pub async fn relay_streams<C, U>(
    client: C,
    upstream: U,
    sockets: (RawFd, RawFd),
    supervision: &Supervision,
) -> Result<Transfer, ConnectionError>
where
    C: AsyncRead + AsyncWrite + Send,
    U: AsyncRead + AsyncWrite + Send,
{
    let progress = Progress::default();
    // A plaintext buffer each way, and as much again for the TLS records around them.
    supervision.holding.set_buffers(4 * STREAM_BUFFER as u64);
    let (mut client_read, mut client_write) = tokio::io::split(client);
    let (mut upstream_read, mut upstream_write) = tokio::io::split(upstream);
    let flows = Flows {
        to_upstream: pump(
            &mut client_read,
            &mut upstream_write,
            &progress.client_to_upstream,
        ),
        to_client: pump(
            &mut upstream_read,
            &mut client_write,
            &progress.upstream_to_client,
        ),
    };
    let mut watchdog = Watchdog::new(supervision);
    relay_counted(flows, &progress, &mut watchdog, sockets).await
}

async fn pump<R, W>(from: &mut R, to: &mut W, moved: &AtomicU64) -> Result<u64, FlowError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; STREAM_BUFFER];
    let mut total = 0u64;
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => n,
            // A TLS peer that closes without close_notify: what it carries is end-to-end
            // encrypted, so a truncation is the endpoints' business; treat it as the end.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(FlowError::Source(e)),
        };
        to.write_all(&buf[..n])
            .await
            .map_err(FlowError::Destination)?;
        to.flush().await.map_err(FlowError::Destination)?;
        total += n as u64;
        moved.fetch_add(n as u64, Ordering::Relaxed);
    }
    to.shutdown().await.map_err(FlowError::Destination)?;
    Ok(total)
}
