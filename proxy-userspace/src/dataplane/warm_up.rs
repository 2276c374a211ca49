//! `auto`'s warm-up: a connection starts in userspace (copy) and moves into the kernel
//! only once it has lasted [`WARM_UP`] or carried [`WARM_UP_BYTES`] one way. A socket
//! joining the sockhash costs the kernel a psock to set up and tear down, and every
//! redirected message a hop through the redirect worker: more than copying a short
//! connection's few bytes costs. Short connections never pay it; long ones pay it once.

use std::{os::fd::AsRawFd, time::Duration};

use tokio::{net::TcpStream, sync::watch};

use super::{
    copy::{self, Stop},
    relay_counted,
};
use crate::transfer::{
    ConnectionError, Flows, Pause, Progress, Supervision, Transfer, Watchdog, drive_both,
};

/// How long a connection is relayed in userspace before it moves into the kernel.
pub const WARM_UP: Duration = Duration::from_millis(100);
/// Bytes one direction moves in userspace before the connection moves into the kernel
/// sooner: a bulk transfer should not be copied for the whole warm-up.
pub const WARM_UP_BYTES: u64 = 1 << 20;

/// How the warm-up ended.
pub enum WarmUp {
    /// The connection ended, or must stay in userspace (a direction already saw EOF, or a
    /// receive queue could not be drained cleanly), and was relayed to its end.
    Done(Result<Transfer, ConnectionError>),
    /// Both directions paused with every byte read forwarded and no segment half read: the
    /// kernel can take over. The bytes moved so far, already counted in the metrics.
    Promote(Transfer),
}

/// What follows a warm-up whose flows have both stopped.
#[derive(Debug, PartialEq, Eq)]
enum Next {
    /// Both sources reached EOF: the usual short connection, over within its warm-up.
    Ended,
    /// Both paused with every byte read forwarded and no segment half read.
    Promote,
    /// Anything else (one side at EOF, or a receive queue not drained cleanly): the
    /// connection stays in userspace, each paused flow resuming where it stopped.
    Resume,
}

/// The promotion rule: only a connection both of whose flows paused cleanly moves.
fn next(to_upstream: &Stop, to_client: &Stop) -> Next {
    let clean = |stop: &Stop| {
        matches!(
            stop,
            Stop::Paused {
                whole_segments: true
            }
        )
    };
    match (to_upstream, to_client) {
        (Stop::Eof, Stop::Eof) => Next::Ended,
        (up, down) if clean(up) && clean(down) => Next::Promote,
        _ => Next::Resume,
    }
}

/// Relays in userspace until the connection can move into the kernel, or to its end.
pub async fn relay_until_promoted(
    client: &TcpStream,
    upstream: &TcpStream,
    supervision: &Supervision,
) -> WarmUp {
    let progress = Progress::default();
    let (up, down) = (&progress.client_to_upstream, &progress.upstream_to_client);
    let (pause, paused) = watch::channel(false);
    let flows = Flows {
        to_upstream: copy::forward_until(client, upstream, up, paused.clone(), &pause),
        to_client: copy::forward_until(upstream, client, down, paused, &pause),
    };
    let deadline = tokio::time::sleep(WARM_UP);
    tokio::pin!(deadline);
    // A direction stuck on a peer that never reads must still time out.
    let mut watchdog = Watchdog::new(supervision);
    let stopped = drive_both(
        flows,
        &mut watchdog,
        || (progress.snapshot(), None),
        // A direction at EOF keeps the connection in userspace (a socket that received a
        // FIN cannot join the map); the other runs on here, under the same watchdog.
        |stop| matches!(stop, Stop::Eof),
        Some(Pause {
            at: deadline,
            sender: &pause,
        }),
    )
    .await;
    let (up_stop, down_stop) = match stopped {
        Ok(stops) => stops,
        Err(failed) => {
            watchdog.report(progress.snapshot());
            failed.propagate_reset(client, upstream);
            return WarmUp::Done(Err(failed));
        }
    };
    match next(&up_stop, &down_stop) {
        Next::Ended => {
            let moved = progress.snapshot();
            watchdog.report(moved);
            WarmUp::Done(Ok(moved))
        }
        Next::Promote => {
            let moved = progress.snapshot();
            watchdog.report(moved);
            WarmUp::Promote(moved)
        }
        Next::Resume => {
            // Paused flows resume where they stopped; nothing was held back. A flow at EOF
            // has its total in `progress` already, and counts nothing more.
            let resume = |stop: Stop, from, to, moved| async move {
                match stop {
                    Stop::Eof => Ok(0),
                    Stop::Paused { .. } => copy::forward(from, to, moved).await,
                }
            };
            let flows = Flows {
                to_upstream: resume(up_stop, client, upstream, up),
                to_client: resume(down_stop, upstream, client, down),
            };
            let sockets = (client.as_raw_fd(), upstream.as_raw_fd());
            WarmUp::Done(relay_counted(flows, &progress, &mut watchdog, sockets).await)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLEAN: Stop = Stop::Paused {
        whole_segments: true,
    };
    const HALF_READ: Stop = Stop::Paused {
        whole_segments: false,
    };

    #[test]
    fn only_two_clean_pauses_promote() {
        assert_eq!(next(&CLEAN, &CLEAN), Next::Promote);
        assert_eq!(next(&CLEAN, &HALF_READ), Next::Resume);
        assert_eq!(next(&HALF_READ, &CLEAN), Next::Resume);
    }

    #[test]
    fn a_side_at_eof_keeps_the_connection_in_userspace() {
        assert_eq!(next(&Stop::Eof, &Stop::Eof), Next::Ended);
        assert_eq!(next(&Stop::Eof, &CLEAN), Next::Resume);
        assert_eq!(next(&CLEAN, &Stop::Eof), Next::Resume);
        assert_eq!(next(&HALF_READ, &Stop::Eof), Next::Resume);
    }
}
