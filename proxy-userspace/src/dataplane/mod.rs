//! The three ways a connection's bytes can move, behind one connection lifecycle:
//! `kernel` (sockhash + verdict program), `splice` (splice(2) through a pipe) and `copy`
//! (userspace buffers). Each carries half-closes (EOF becomes shutdown(SHUT_WR) on the other
//! side once everything before it is delivered) and resets (a reset side makes the relay
//! reset the other), and buffers a bounded amount per connection.

mod copy;
mod splice;
mod stream;
mod warm_up;

use std::{
    io,
    os::fd::{AsRawFd, RawFd},
    sync::Arc,
};

use tokio::net::TcpStream;
use tracing::{debug, warn};

pub use stream::relay_streams;

/// What a userspace plane holds per direction: the copy buffer, or a pipe's capacity.
const USERSPACE_BUFFER: usize = copy::COPY_BUFFER;
pub use warm_up::{WARM_UP, WARM_UP_BYTES};

use crate::{
    kernel::KernelDataPlane,
    transfer::{
        ConnectionError, FlowError, Flows, Handover, Progress, Supervision, Transfer, Watchdog,
        drive_both,
    },
};

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
    /// `handover`: whether userspace already read from the client socket (a PROXY header).
    pub async fn relay(
        &self,
        client: TcpStream,
        upstream: TcpStream,
        supervision: &Supervision,
        handover: Handover,
    ) -> Result<Transfer, ConnectionError> {
        match self {
            Self::Copy => relay_userspace(client, upstream, false, supervision).await,
            Self::Splice => relay_userspace(client, upstream, true, supervision).await,
            // Near the memory limit a connection's bytes wait in its own sockets, where TCP's
            // memory accounting reaches them, not in the kernel's redirect queues.
            Self::Kernel { .. } if !supervision.holding.kernel_welcome() => {
                relay_userspace(client, upstream, true, supervision).await
            }
            Self::Kernel { plane, warm_up } => {
                let mut before = Transfer::default();
                if *warm_up {
                    match warm_up::relay_until_promoted(&client, &upstream, supervision).await {
                        warm_up::WarmUp::Done(result) => return result,
                        warm_up::WarmUp::Promote(moved)
                            if !supervision.holding.kernel_welcome() =>
                        {
                            return relay_userspace(client, upstream, true, supervision)
                                .await
                                .map(|transfer| transfer.after(moved));
                        }
                        warm_up::WarmUp::Promote(moved) => {
                            plane.count_promotion();
                            before = moved;
                        }
                    }
                }
                let handover = if *warm_up {
                    Handover::AfterReads
                } else {
                    handover
                };
                relay_in_kernel(plane, client, upstream, supervision, handover)
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
    handover: Handover,
) -> Result<Transfer, ConnectionError> {
    let client = client.into_std().map_err(ConnectionError::Client)?;
    let upstream = upstream.into_std().map_err(ConnectionError::Upstream)?;
    match kernel.relay(client, upstream, supervision, handover).await {
        Ok(result) => result,
        Err(declined) => {
            let Some((client, upstream)) = declined.sockets else {
                warn!(
                    "connection dropped: kernel data plane declined it and its sockets could not be duplicated: {}",
                    declined.reason
                );
                return Err(ConnectionError::Client(io::Error::other(declined.reason)));
            };
            debug!("relaying in userspace (splice): {}", declined.reason);
            let client = TcpStream::from_std(client).map_err(ConnectionError::Client)?;
            let upstream = TcpStream::from_std(upstream).map_err(ConnectionError::Upstream)?;
            relay_userspace(client, upstream, true, supervision).await
        }
    }
}

async fn relay_userspace(
    client: TcpStream,
    upstream: TcpStream,
    zero_copy: bool,
    supervision: &Supervision,
) -> Result<Transfer, ConnectionError> {
    let progress = Progress::default();
    let (up, down) = (&progress.client_to_upstream, &progress.upstream_to_client);
    let mut watchdog = Watchdog::new(supervision);
    let sockets = (client.as_raw_fd(), upstream.as_raw_fd());
    // A pipe's pages or a copy buffer each way, at most.
    supervision.holding.set_buffers(2 * USERSPACE_BUFFER as u64);
    if zero_copy {
        let flows = Flows {
            to_upstream: splice::forward(&client, &upstream, up),
            to_client: splice::forward(&upstream, &client, down),
        };
        relay_counted(flows, &progress, &mut watchdog, sockets).await
    } else {
        let flows = Flows {
            to_upstream: copy::forward(&client, &upstream, up),
            to_client: copy::forward(&upstream, &client, down),
        };
        relay_counted(flows, &progress, &mut watchdog, sockets).await
    }
}

/// Drives two userspace flows that count what they move into `progress`, then reports the
/// bytes and, if the connection failed, resets the `sockets` (client, upstream) that did not.
/// `watchdog` may have counted part of `progress` already (a warm-up that stays in
/// userspace).
async fn relay_counted<U, C>(
    flows: Flows<U, C>,
    progress: &Progress,
    watchdog: &mut Watchdog<'_>,
    sockets: (RawFd, RawFd),
) -> Result<Transfer, ConnectionError>
where
    U: Future<Output = Result<u64, FlowError>>,
    C: Future<Output = Result<u64, FlowError>>,
{
    let result = drive_both(
        flows,
        watchdog,
        || (progress.snapshot(), None),
        |_| true,
        None,
    )
    .await;
    let transfer = progress.snapshot();
    watchdog.report(transfer);
    if let Err(e) = &result {
        e.propagate_reset(&sockets.0, &sockets.1);
    }
    result.map(|_| transfer)
}
