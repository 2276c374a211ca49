//! Per-connection supervision shared by every data plane: idle and half-closed timeouts,
//! and the byte counts reported to the listener's metrics while the connection lives.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use super::Transfer;
use crate::metrics::ListenerMetrics;

/// What a connection may do and where it reports.
#[derive(Clone)]
pub struct Supervision {
    /// No bytes in either direction for this long: close.
    pub idle: Duration,
    /// One direction finished and the other still open this long after: close.
    pub half_closed: Duration,
    pub metrics: Arc<ListenerMetrics>,
}

/// Why a connection was closed by the relay rather than by its peers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Expiry {
    #[error("idle timeout")]
    Idle,
    #[error("half-closed timeout")]
    HalfClosed,
}

/// Checks one connection's progress at each tick of `period()`.
pub struct Watchdog<'a> {
    supervision: &'a Supervision,
    reported: Transfer,
    last_progress: Instant,
    half_closed_since: Option<Instant>,
}

/// Ticks often enough to catch a timeout within a quarter of it, and at least every 5 s
/// so metrics stay fresh; never more than 20 times a second per connection.
const PERIOD_BOUNDS: (Duration, Duration) = (Duration::from_millis(50), Duration::from_secs(5));

impl<'a> Watchdog<'a> {
    pub fn new(supervision: &'a Supervision) -> Self {
        Self {
            supervision,
            reported: Transfer::default(),
            last_progress: Instant::now(),
            half_closed_since: None,
        }
    }

    pub fn period(&self) -> Duration {
        (self.supervision.idle.min(self.supervision.half_closed) / 4)
            .clamp(PERIOD_BOUNDS.0, PERIOD_BOUNDS.1)
    }

    /// A ticker for `period()`, its first tick one period from now.
    pub fn ticker(&self) -> tokio::time::Interval {
        let mut ticker = tokio::time::interval(self.period());
        ticker.reset();
        ticker
    }

    /// Marks that one direction has finished.
    pub fn one_side_done(&mut self) {
        self.half_closed_since.get_or_insert_with(Instant::now);
    }

    /// Reports new bytes, then says whether the connection has run out of time.
    /// `idle_for`: how long nothing was delivered, when the caller measures it itself (kernel
    /// mode, where `totals` counts bytes handed to a peer's queue, not taken by the peer);
    /// otherwise idle is the time since `totals` last grew.
    pub fn check(&mut self, totals: Transfer, idle_for: Option<Duration>) -> Result<(), Expiry> {
        let now = Instant::now();
        if self.report(totals) {
            self.last_progress = now;
        }
        let idle_for = idle_for.unwrap_or(now - self.last_progress);
        if idle_for >= self.supervision.idle {
            return Err(Expiry::Idle);
        }
        match self.half_closed_since {
            Some(since) if now - since >= self.supervision.half_closed => Err(Expiry::HalfClosed),
            _ => Ok(()),
        }
    }

    /// Adds what moved since the last report to the listener's counters; true if any did.
    pub fn report(&mut self, totals: Transfer) -> bool {
        let up = totals
            .client_to_upstream
            .saturating_sub(self.reported.client_to_upstream);
        let down = totals
            .upstream_to_client
            .saturating_sub(self.reported.upstream_to_client);
        self.supervision.metrics.add_bytes(up, down);
        self.reported.client_to_upstream += up;
        self.reported.upstream_to_client += down;
        up + down > 0
    }
}
