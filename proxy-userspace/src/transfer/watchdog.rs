//! Per-connection supervision shared by every data plane: idle and half-closed timeouts,
//! and the byte counts reported to the listener's metrics while the connection lives.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use super::Transfer;
use crate::{
    counters::{ListenerMetrics, Timeout},
    memory::Holding,
};

/// What a connection may do and where it reports.
#[derive(Clone)]
pub struct Supervision {
    /// No bytes in either direction for this long: close.
    pub idle: Duration,
    /// One direction finished and nothing moved this long since: close.
    pub half_closed: Duration,
    pub metrics: Arc<ListenerMetrics>,
    /// The port the client connected to, and the client's address when it may be shown
    /// (`--log-clients`): what kernel mode records for `ebpf-proxy flows`.
    pub listener_port: u16,
    pub client: Option<SocketAddr>,
    /// The connection's entry in the memory account, which may throttle or shed it.
    pub holding: Arc<Holding>,
}

/// Why a connection was closed by the relay rather than by its peers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Expiry {
    #[error("idle timeout")]
    Idle,
    #[error("half-closed timeout")]
    HalfClosed,
    #[error("reset: the relay held more memory than its limit, and this connection much of it")]
    Shed,
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

    /// Returns once the memory account asks for the connection to be reset.
    pub async fn shed_requested(&self) {
        self.supervision.holding.shed_requested().await;
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
            return Err(self.expired(Timeout::Idle, Expiry::Idle));
        }
        // Silence since the half-close, not its age: the open direction may still be
        // delivering what the closed one asked for, and cutting it would lose bytes.
        match self.half_closed_since {
            Some(since) if idle_for.min(now - since) >= self.supervision.half_closed => {
                Err(self.expired(Timeout::HalfClosed, Expiry::HalfClosed))
            }
            _ => Ok(()),
        }
    }

    /// Counts a timeout in the listener's metrics, and returns it as the expiry it is.
    fn expired(&self, timeout: Timeout, expiry: Expiry) -> Expiry {
        self.supervision.metrics.count_timeout(timeout);
        expiry
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;

    fn supervision(idle: Duration, half_closed: Duration) -> Supervision {
        Supervision {
            idle,
            half_closed,
            metrics: Arc::new(ListenerMetrics::new("test".into())),
            listener_port: 0,
            client: None,
            holding: Holding::unaccounted(),
        }
    }

    const HOUR: Duration = Duration::from_secs(3600);

    fn moved(client_to_upstream: u64, upstream_to_client: u64) -> Transfer {
        Transfer {
            client_to_upstream,
            upstream_to_client,
        }
    }

    #[test]
    fn idle_as_measured_by_the_data_plane_expires_at_the_timeout() {
        let supervision = supervision(Duration::from_secs(10), HOUR);
        let mut watchdog = Watchdog::new(&supervision);
        assert_eq!(
            watchdog.check(moved(1, 0), Some(Duration::from_secs(9))),
            Ok(())
        );
        assert_eq!(
            watchdog.check(moved(2, 0), Some(Duration::from_secs(10))),
            Err(Expiry::Idle),
            "bytes arriving do not count when the data plane says nothing was delivered"
        );
        assert_eq!(supervision.metrics.timed_out(Timeout::Idle), 1);
        assert_eq!(supervision.metrics.timed_out(Timeout::HalfClosed), 0);
    }

    #[test]
    fn idle_without_a_measurement_is_time_since_the_counts_grew() {
        let supervision = supervision(Duration::ZERO, HOUR);
        let mut watchdog = Watchdog::new(&supervision);
        assert_eq!(watchdog.check(Transfer::default(), None), Err(Expiry::Idle));
        let supervision = self::supervision(HOUR, HOUR);
        let mut watchdog = Watchdog::new(&supervision);
        assert_eq!(watchdog.check(moved(0, 5), None), Ok(()));
    }

    #[test]
    fn half_closed_counts_silence_from_the_first_side_done() {
        let supervision = supervision(HOUR, Duration::from_secs(10));
        let mut watchdog = Watchdog::new(&supervision);
        assert_eq!(
            watchdog.check(moved(1, 1), Some(Duration::from_secs(30))),
            Ok(()),
            "silence before any side is done is idle's business"
        );
        watchdog.one_side_done();
        watchdog.half_closed_since = Some(Instant::now() - Duration::from_secs(60));
        assert_eq!(
            watchdog.check(moved(2, 2), Some(Duration::from_secs(9))),
            Ok(()),
            "the open direction still delivers"
        );
        assert_eq!(
            watchdog.check(moved(2, 2), Some(Duration::from_secs(10))),
            Err(Expiry::HalfClosed)
        );
        assert_eq!(supervision.metrics.timed_out(Timeout::HalfClosed), 1);
        assert_eq!(supervision.metrics.timed_out(Timeout::Idle), 0);
        // Right after the half-close, silence before it does not count.
        watchdog.half_closed_since = Some(Instant::now());
        assert_eq!(
            watchdog.check(moved(2, 2), Some(Duration::from_secs(30))),
            Ok(())
        );
    }

    #[test]
    fn reports_add_only_what_moved_since_the_last() {
        let supervision = supervision(HOUR, HOUR);
        let mut watchdog = Watchdog::new(&supervision);
        assert!(watchdog.report(moved(10, 5)));
        assert!(watchdog.report(moved(15, 5)));
        assert!(!watchdog.report(moved(15, 5)), "nothing new moved");
        let metrics = &supervision.metrics;
        assert_eq!(metrics.bytes_to_upstream.load(Ordering::Relaxed), 15);
        assert_eq!(metrics.bytes_to_client.load(Ordering::Relaxed), 5);
    }

    #[test]
    fn ticks_catch_a_timeout_within_a_quarter_within_bounds() {
        let period = |idle, half_closed| Watchdog::new(&supervision(idle, half_closed)).period();
        assert_eq!(
            period(Duration::from_secs(1), HOUR),
            Duration::from_millis(250)
        );
        assert_eq!(
            period(HOUR, Duration::from_secs(2)),
            Duration::from_millis(500)
        );
        assert_eq!(period(HOUR, HOUR), PERIOD_BOUNDS.1);
        assert_eq!(period(Duration::from_millis(10), HOUR), PERIOD_BOUNDS.0);
    }
}
