//! The one loop that drives a connection's two flows under its watchdog. Every data plane
//! (and auto's warm-up) supplies its flows and how to measure what they moved; the loop
//! ends the connection at the first failure or timeout.

use std::{future::Future, pin::Pin, time::Duration};

use tokio::{sync::watch, time::Sleep};

use super::{ConnectionError, Direction, Expiry, FlowError, Transfer, Watchdog};

/// A connection's two flows, each a future that runs its direction to its end (or pause).
pub struct Flows<U, C> {
    pub to_upstream: U,
    pub to_client: C,
}

/// A moment at which both flows are asked to pause (auto's warm-up). It is dropped unused
/// once either flow has finished: a connection with a direction at EOF stays where it is.
pub struct Pause<'a> {
    pub at: Pin<&'a mut Sleep>,
    pub sender: &'a watch::Sender<bool>,
}

/// Drives both flows until each has returned, and returns what each returned. A flow's
/// failure, a timeout found at one of the watchdog's ticks, or the memory account's request
/// to shed it ends the connection at once.
/// `measure` gives the watchdog the bytes moved so far and, where the data plane measures
/// it itself, how long nothing was delivered (see [`Watchdog::check`]). `reached_eof` says
/// whether a flow's result means its source is done, which starts the half-closed timeout.
pub async fn drive_both<T, U, C>(
    flows: Flows<U, C>,
    watchdog: &mut Watchdog<'_>,
    mut measure: impl FnMut() -> (Transfer, Option<Duration>),
    reached_eof: impl Fn(&T) -> bool,
    mut pause: Option<Pause<'_>>,
) -> Result<(T, T), ConnectionError>
where
    U: Future<Output = Result<T, FlowError>>,
    C: Future<Output = Result<T, FlowError>>,
{
    let Flows {
        to_upstream,
        to_client,
    } = flows;
    tokio::pin!(to_upstream, to_client);
    let mut ticker = watchdog.ticker();
    let (mut up, mut down) = (None, None);
    loop {
        if let (Some(_), Some(_)) = (&up, &down) {
            break;
        }
        let pause_armed = pause.is_some() && up.is_none() && down.is_none();
        tokio::select! {
            r = &mut to_upstream, if up.is_none() => {
                up = Some(r.map_err(|e| e.of(Direction::ClientToUpstream))?);
            }
            r = &mut to_client, if down.is_none() => {
                down = Some(r.map_err(|e| e.of(Direction::UpstreamToClient))?);
            }
            _ = ticker.tick() => {
                let (moved, idle_for) = measure();
                watchdog.check(moved, idle_for).map_err(ConnectionError::Expired)?;
            }
            () = watchdog.shed_requested() => {
                return Err(ConnectionError::Expired(Expiry::Shed));
            }
            () = until(&mut pause), if pause_armed => {
                if let Some(pause) = pause.take() {
                    pause.sender.send_replace(true);
                }
            }
        }
        if [&up, &down].into_iter().flatten().any(&reached_eof) {
            watchdog.one_side_done();
        }
    }
    Ok((
        up.expect("loop ends with both"),
        down.expect("loop ends with both"),
    ))
}

/// Waits for the pause's moment; never, without one.
async fn until(pause: &mut Option<Pause<'_>>) {
    match pause {
        Some(pause) => pause.at.as_mut().await,
        None => std::future::pending().await,
    }
}
