//! The three ways a connection's bytes can move, behind one connection lifecycle:
//! `kernel` (sockhash + verdict program), `splice` (splice(2) through a pipe) and `copy`
//! (userspace buffers). Each carries half-closes (EOF becomes shutdown(SHUT_WR) on the other
//! side once everything before it is delivered) and resets (a reset side makes the relay
//! reset the other), and buffers a bounded amount per connection.

mod copy;
mod splice;
mod stream;
mod warm_up;
mod watchdog;

use std::{
    io,
    os::fd::AsRawFd,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use tokio::net::TcpStream;
use tracing::{debug, warn};

pub use stream::relay_streams;
pub use warm_up::{WARM_UP, WARM_UP_BYTES};
pub use watchdog::{Expiry, Supervision, Watchdog};

use crate::{kernel::KernelDataPlane, sys};

/// Which data plane the operator asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DataPlaneChoice {
    /// kernel when the eBPF program loads, after a short userspace warm-up per connection;
    /// otherwise splice
    Auto,
    /// sockhash + sk_skb verdict program: bytes never reach userspace
    Kernel,
    /// splice(2) through a pipe: no copy, but a wakeup per chunk
    Splice,
    /// plain userspace buffers
    Copy,
}

/// The data plane in use, after `auto` was resolved at start.
#[derive(Clone)]
pub enum DataPlane {
    /// `warm_up`: each connection starts in userspace and moves into the kernel once it
    /// proves long (`auto`); otherwise it goes straight in.
    Kernel {
        plane: Arc<KernelDataPlane>,
        warm_up: bool,
    },
    Splice,
    Copy,
}

impl DataPlane {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Kernel { .. } => "kernel",
            Self::Splice => "splice",
            Self::Copy => "copy",
        }
    }

    /// Relays one connection until both directions are done or one side resets.
    /// `client_read`: userspace already read from the client socket (a PROXY header).
    pub async fn relay(
        &self,
        client: TcpStream,
        upstream: TcpStream,
        supervision: &Supervision,
        client_read: bool,
    ) -> Result<Transfer, FlowError> {
        match self {
            Self::Copy => relay_userspace(client, upstream, false, supervision).await,
            Self::Splice => relay_userspace(client, upstream, true, supervision).await,
            Self::Kernel { plane, warm_up } => {
                let mut before = Transfer::default();
                if *warm_up {
                    match warm_up::relay_until_promoted(&client, &upstream, supervision).await {
                        warm_up::WarmUp::Done(result) => return result,
                        warm_up::WarmUp::Promote(moved) => {
                            plane.count_promotion();
                            before = moved;
                        }
                    }
                }
                let read_before = *warm_up || client_read;
                relay_in_kernel(plane, client, upstream, supervision, read_before)
                    .await
                    .map(|transfer| transfer.after(before))
            }
        }
    }
}

async fn relay_in_kernel(
    kernel: &KernelDataPlane,
    client: TcpStream,
    upstream: TcpStream,
    supervision: &Supervision,
    read_before: bool,
) -> Result<Transfer, FlowError> {
    let client = client.into_std().map_err(FlowError::Client)?;
    let upstream = upstream.into_std().map_err(FlowError::Upstream)?;
    match kernel
        .relay(client, upstream, supervision, read_before)
        .await
    {
        Ok(result) => result,
        Err(declined) => {
            let Some((client, upstream)) = declined.sockets else {
                warn!(
                    "connection dropped: kernel data plane declined it and its sockets could not be duplicated: {}",
                    declined.reason
                );
                return Err(FlowError::Client(io::Error::other(declined.reason)));
            };
            debug!("relaying in userspace (splice): {}", declined.reason);
            let client = TcpStream::from_std(client).map_err(FlowError::Client)?;
            let upstream = TcpStream::from_std(upstream).map_err(FlowError::Upstream)?;
            relay_userspace(client, upstream, true, supervision).await
        }
    }
}

/// Bytes delivered in each direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Transfer {
    pub client_to_upstream: u64,
    pub upstream_to_client: u64,
}

impl Transfer {
    /// These bytes, following `earlier` on the same connection.
    fn after(self, earlier: Transfer) -> Transfer {
        Transfer {
            client_to_upstream: earlier.client_to_upstream + self.client_to_upstream,
            upstream_to_client: earlier.upstream_to_client + self.upstream_to_client,
        }
    }
}

/// Bytes each direction has moved so far, updated as they move.
#[derive(Debug, Default)]
pub struct Progress {
    pub client_to_upstream: AtomicU64,
    pub upstream_to_client: AtomicU64,
}

impl Progress {
    pub fn snapshot(&self) -> Transfer {
        Transfer {
            client_to_upstream: self.client_to_upstream.load(Ordering::Relaxed),
            upstream_to_client: self.upstream_to_client.load(Ordering::Relaxed),
        }
    }
}

/// A connection that ended with a reset or socket error, named by the side that failed,
/// or that the relay closed on a timeout.
#[derive(Debug, thiserror::Error)]
pub enum FlowError {
    #[error("client side: {0}")]
    Client(io::Error),
    #[error("upstream side: {0}")]
    Upstream(io::Error),
    #[error("closed by the relay: {0}")]
    Expired(Expiry),
}

impl FlowError {
    /// Sides that did not fail learn of it the way TCP says it: a reset. A timeout resets
    /// both, so neither waits on a connection the relay gave up.
    pub fn propagate_reset(&self, client: &impl AsRawFd, upstream: &impl AsRawFd) {
        let (client, upstream) = (client.as_raw_fd(), upstream.as_raw_fd());
        let others: &[i32] = match self {
            Self::Client(_) => &[upstream],
            Self::Upstream(_) => &[client],
            Self::Expired(_) => &[client, upstream],
        };
        for fd in others {
            // Best effort: the socket is closed right after either way.
            let _ = sys::set_linger_zero(fd);
        }
    }
}

/// Whether a direction failed reading its source or writing its destination.
enum DirectionError {
    Source(io::Error),
    Destination(io::Error),
}

async fn relay_userspace(
    client: TcpStream,
    upstream: TcpStream,
    zero_copy: bool,
    supervision: &Supervision,
) -> Result<Transfer, FlowError> {
    let progress = Progress::default();
    let (up, down) = (&progress.client_to_upstream, &progress.upstream_to_client);
    let (to_upstream, to_client) = if zero_copy {
        (
            splice::forward(&client, &upstream, up).await_boxed(),
            splice::forward(&upstream, &client, down).await_boxed(),
        )
    } else {
        (
            copy::forward(&client, &upstream, up).await_boxed(),
            copy::forward(&upstream, &client, down).await_boxed(),
        )
    };
    let result = run_both(
        to_upstream,
        to_client,
        &progress,
        Watchdog::new(supervision),
    )
    .await;
    if let Err(e) = &result {
        e.propagate_reset(&client, &upstream);
    }
    result
}

type DirectionFuture<'a> =
    std::pin::Pin<Box<dyn Future<Output = Result<u64, DirectionError>> + Send + 'a>>;

trait Boxed<'a> {
    fn await_boxed(self) -> DirectionFuture<'a>;
}

impl<'a, F: Future<Output = Result<u64, DirectionError>> + Send + 'a> Boxed<'a> for F {
    fn await_boxed(self) -> DirectionFuture<'a> {
        Box::pin(self)
    }
}

/// Drives both directions under the watchdog; the first failure or timeout ends the
/// connection.
/// `watchdog` may have counted part of `progress` already (a warm-up that stays in
/// userspace).
async fn run_both(
    mut to_upstream: DirectionFuture<'_>,
    mut to_client: DirectionFuture<'_>,
    progress: &Progress,
    mut watchdog: Watchdog<'_>,
) -> Result<Transfer, FlowError> {
    let mut ticker = watchdog.ticker();
    let (mut up_done, mut down_done) = (false, false);
    let result = loop {
        if up_done && down_done {
            break Ok(());
        }
        tokio::select! {
            r = &mut to_upstream, if !up_done => match r {
                Ok(_) => { up_done = true; watchdog.one_side_done(); }
                Err(DirectionError::Source(e)) => break Err(FlowError::Client(e)),
                Err(DirectionError::Destination(e)) => break Err(FlowError::Upstream(e)),
            },
            r = &mut to_client, if !down_done => match r {
                Ok(_) => { down_done = true; watchdog.one_side_done(); }
                Err(DirectionError::Source(e)) => break Err(FlowError::Upstream(e)),
                Err(DirectionError::Destination(e)) => break Err(FlowError::Client(e)),
            },
            _ = ticker.tick() => {
                if let Err(expiry) = watchdog.check(progress.snapshot(), None) {
                    break Err(FlowError::Expired(expiry));
                }
            }
        }
    };
    let transfer = progress.snapshot();
    watchdog.report(transfer);
    result.map(|()| transfer)
}
