//! `auto`'s warm-up: a connection starts in userspace (copy) and moves into the kernel
//! only once it has lasted [`WARM_UP`] or carried [`WARM_UP_BYTES`] one way. A socket
//! joining the sockhash costs the kernel a psock to set up and tear down, and every
//! redirected message a hop through the redirect worker: more than copying a short
//! connection's few bytes costs. Short connections never pay it; long ones pay it once.

use std::time::Duration;

use tokio::{net::TcpStream, sync::watch};

use super::{
    Boxed as _, DirectionError, FlowError, Progress, Supervision, Transfer, Watchdog,
    copy::{self, Stop},
    run_both,
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
    Done(Result<Transfer, FlowError>),
    /// Both directions paused with every byte read forwarded and no segment half read: the
    /// kernel can take over. The bytes moved so far, already counted in the metrics.
    Promote(Transfer),
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
    let to_upstream = copy::forward_until(client, upstream, up, paused.clone(), &pause);
    let to_client = copy::forward_until(upstream, client, down, paused, &pause);
    tokio::pin!(to_upstream, to_client);
    let deadline = tokio::time::sleep(WARM_UP);
    tokio::pin!(deadline);
    // A direction stuck on a peer that never reads must still time out.
    let mut watchdog = Watchdog::new(supervision);
    let mut ticker = watchdog.ticker();
    let (mut up_stop, mut down_stop) = (None, None);
    let failed = loop {
        tokio::select! {
            // Once a direction is at EOF the connection stays in userspace: no pause.
            () = &mut deadline, if !*pause.borrow() && up_stop.is_none() && down_stop.is_none() => {
                pause.send_replace(true);
            }
            _ = ticker.tick() => {
                if let Err(expiry) = watchdog.check(progress.snapshot(), None) {
                    break FlowError::Expired(expiry);
                }
            }
            stop = &mut to_upstream, if up_stop.is_none() => match stop {
                Ok(stop) => up_stop = Some(stop),
                Err(DirectionError::Source(e)) => break FlowError::Client(e),
                Err(DirectionError::Destination(e)) => break FlowError::Upstream(e),
            },
            stop = &mut to_client, if down_stop.is_none() => match stop {
                Ok(stop) => down_stop = Some(stop),
                Err(DirectionError::Source(e)) => break FlowError::Upstream(e),
                Err(DirectionError::Destination(e)) => break FlowError::Client(e),
            },
        }
        // A direction at EOF keeps the connection in userspace (a socket that received a
        // FIN cannot join the map); the other runs on here, under the same watchdog.
        if matches!(up_stop, Some(Stop::Eof)) || matches!(down_stop, Some(Stop::Eof)) {
            watchdog.one_side_done();
        }
        let (Some(up_stop), Some(down_stop)) = (&up_stop, &down_stop) else {
            continue;
        };
        if matches!((up_stop, down_stop), (Stop::Eof, Stop::Eof)) {
            // The usual short connection: over within its warm-up.
            let moved = progress.snapshot();
            watchdog.report(moved);
            return WarmUp::Done(Ok(moved));
        }
        let promotable = |stop: &Stop| {
            matches!(
                stop,
                Stop::Paused {
                    whole_segments: true
                }
            )
        };
        if promotable(up_stop) && promotable(down_stop) {
            let moved = progress.snapshot();
            watchdog.report(moved);
            return WarmUp::Promote(moved);
        }
        // Paused directions resume where they stopped; nothing was held back.
        let resume = |stop: &Stop, from, to, moved| match stop {
            // Its total is already in `moved`; run_both counts nothing from the return.
            Stop::Eof => std::future::ready(Ok(0)).await_boxed(),
            Stop::Paused { .. } => copy::forward(from, to, moved).await_boxed(),
        };
        let result = run_both(
            resume(up_stop, client, upstream, up),
            resume(down_stop, upstream, client, down),
            &progress,
            watchdog,
        )
        .await;
        if let Err(e) = &result {
            e.propagate_reset(client, upstream);
        }
        return WarmUp::Done(result);
    };
    watchdog.report(progress.snapshot());
    failed.propagate_reset(client, upstream);
    WarmUp::Done(Err(failed))
}
