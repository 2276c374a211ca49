//! Notices about events that can repeat per connection (maps declined, connections reset or
//! refused): logged at most once a minute each, with how many happened, so that a flood of
//! them costs neither the log nor the operator's attention.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use crate::sys;

/// The shortest gap between two notices of one kind.
pub const NOTICE_EVERY: Duration = Duration::from_secs(60);

/// One kind of notice: counts its events, and says when one is due.
#[derive(Debug, Default)]
pub struct Notice {
    /// Coarse monotonic ns of the last notice; 0: never.
    last_ns: AtomicU64,
    /// Events since the last notice.
    unreported: AtomicU64,
}

impl Notice {
    /// Counts one event; returns how many there were since the last notice when a notice
    /// is due now (at most once per [`NOTICE_EVERY`], however many tasks ask), else None.
    pub fn count(&self) -> Option<u64> {
        self.count_by(1)
    }

    /// Counts `events` at once, as [`Notice::count`] counts one.
    pub fn count_by(&self, events: u64) -> Option<u64> {
        self.unreported.fetch_add(events, Ordering::Relaxed);
        let now = sys::monotonic_coarse_ns();
        let then = self.last_ns.load(Ordering::Relaxed);
        let due = (then == 0 || now.saturating_sub(then) >= NOTICE_EVERY.as_nanos() as u64)
            && self
                .last_ns
                .compare_exchange(then, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok();
        due.then(|| self.unreported.swap(0, Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_event_is_told_and_the_rest_wait_their_minute() {
        let notice = Notice::default();
        assert_eq!(notice.count(), Some(1));
        for _ in 0..10 {
            assert_eq!(notice.count(), None);
        }
        // A minute later, the next notice carries every event since.
        let minute_ago = sys::monotonic_coarse_ns() - NOTICE_EVERY.as_nanos() as u64;
        notice.last_ns.store(minute_ago, Ordering::Relaxed);
        assert_eq!(notice.count(), Some(11));
    }
}
