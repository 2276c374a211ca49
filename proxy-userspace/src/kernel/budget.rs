//! What a kernel-mode flow may hold, sized by how fast its destination drains, the way TCP
//! autotuning sizes a socket's buffers by what its path carries. A flow's **budget** is its
//! backlog limit (when the program asks for a check) and its source's receive buffer (the
//! window a throttled sender can still fill); its destination's send buffer is sized the
//! same way to a shorter span of the rate. A phone draining a few Mbit/s needs tens of KiB; a fast local peer
//! needs megabytes, since the kernel's redirect worker refills a full destination only a
//! jiffy later. A flow starts small and grows at each check that finds its destination
//! draining fast, so a slow client never holds what a fast one needs.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use crate::sys;

/// A flow's budget before its destination's drain rate is known.
pub(super) const BUDGET_START: u64 = 1 << 20;
/// The smallest budget: what a destination draining almost nothing still gets.
pub(super) const BUDGET_MIN: u64 = 256 << 10;
/// A budget holds what the destination drains in this long: many jiffies of the redirect
/// worker's retry delay at the destination's own rate.
const BUDGET_SPAN: Duration = Duration::from_millis(128);
/// How many times over what a destination drained since the last check, and over its
/// budget, a budget may grow at one check. A rate measured over a short interval overstates
/// a destination that is still filling its peer's empty buffers, so growth is stepped and
/// backed by bytes that really left: a fast flow reaches the limit within a few checks, a
/// stalling one is throttled before it gets there.
const BUDGET_GROWTH: u64 = 4;
/// The shortest interval whose rate may shrink a budget. A fast destination drains nothing
/// while the redirect worker waits out its jiffy, so a shorter interval can read as
/// stopped.
const SHRINK_AFTER: Duration = Duration::from_millis(16);

/// SO_SNDBUF a relayed socket starts with (the kernel doubles it): what a destination of
/// unknown speed may hold unsent. The first drain-rate measurement grows it for a fast one.
pub(super) const SEND_BUFFER_START: libc::c_int = 256 << 10;
/// The least SO_SNDBUF a slow destination keeps.
pub(super) const SEND_BUFFER_MIN: libc::c_int = 128 << 10;
/// The most SO_SNDBUF grows to, for a destination that drains fast enough to need it.
const SEND_BUFFER_MAX: libc::c_int = 32 << 20;
/// SO_SNDBUF is set to what the destination drains in this long, so the kernel's buffer
/// (twice that) holds many jiffies of retry delay at its own rate.
const SEND_BUFFER_SPAN: Duration = Duration::from_millis(64);

/// A destination's acknowledged bytes at a moment, and what waited for it then: where its
/// next drain rate is measured from.
pub(super) struct DrainMark {
    acked: AtomicU64,
    waiting: AtomicU64,
    at_ns: AtomicU64,
}

/// What a destination drained between its mark and now.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct Drained {
    pub bytes: u64,
    pub ns: u64,
    /// What waited for the destination at the mark (its redirect backlog and write queue).
    pub waiting: u64,
}

impl DrainMark {
    pub fn new(acked: u64, waiting: u64) -> Self {
        Self {
            acked: AtomicU64::new(acked),
            waiting: AtomicU64::new(waiting),
            at_ns: AtomicU64::new(sys::monotonic_ns()),
        }
    }

    /// What drained since the mark, given the destination's acknowledged count and what
    /// waits for it now; the mark moves here.
    pub fn take(&self, acked: u64, waiting: u64) -> Drained {
        let now = sys::monotonic_ns();
        let ns = now.saturating_sub(self.at_ns.swap(now, Ordering::AcqRel));
        let bytes = acked.saturating_sub(self.acked.swap(acked, Ordering::AcqRel));
        let waiting = self.waiting.swap(waiting, Ordering::AcqRel);
        Drained { bytes, ns, waiting }
    }
}

impl Drained {
    /// What this rate moves in `span`.
    fn over(self, span: Duration) -> u64 {
        (u128::from(self.bytes) * span.as_nanos() / u128::from(self.ns.max(1)))
            .min(u128::from(u64::MAX)) as u64
    }

    /// Whether the destination took everything that waited for it at the mark: part of the
    /// interval may then have found it with nothing to send (a sender held back, or
    /// waiting out a zero-window probe), so the rate measures what was supplied, not how
    /// fast it drains, and is no reason to shrink.
    fn ran_dry(self) -> bool {
        self.bytes >= self.waiting
    }

    /// What this sample vouches for holding: what its rate moves in `span`, but no more than
    /// [`BUDGET_GROWTH`] times what really drained.
    fn supports(self, span: Duration) -> u64 {
        self.over(span)
            .min(self.bytes.saturating_mul(BUDGET_GROWTH))
    }
}

/// A flow's budget after a check that measured `drained` since the last one: what the
/// destination drains in [`BUDGET_SPAN`], at most [`BUDGET_GROWTH`] times `budget` or what
/// drained, at most `most`, and at least [`BUDGET_MIN`]. Only an interval of [`SHRINK_AFTER`] or more
/// in which the destination never ran dry may shrink it.
pub(super) fn resized_budget(budget: u64, drained: Drained, most: u64) -> u64 {
    let least = BUDGET_MIN.min(most);
    let wanted = drained.supports(BUDGET_SPAN);
    if wanted >= budget {
        wanted.min(budget.saturating_mul(BUDGET_GROWTH)).min(most)
    } else if drained.ns >= SHRINK_AFTER.as_nanos() as u64 && !drained.ran_dry() {
        wanted.max(least)
    } else {
        budget
    }
}

/// The SO_RCVBUF for a flow budget of `budget` bytes: the kernel doubles it, so the window
/// stays within the budget.
pub(super) fn receive_buffer(budget: u64) -> libc::c_int {
    (budget / 2).min(libc::c_int::MAX as u64) as libc::c_int
}

/// The SO_SNDBUF for a destination that drained `drained`, if it should change from
/// `current`: what it drains per [`SEND_BUFFER_SPAN`], within
/// [`SEND_BUFFER_MIN`]..=[`SEND_BUFFER_MAX`]. Like a budget it grows at most
/// [`BUDGET_GROWTH`] times over at once; it shrinks only on a clear fall seen over a whole
/// span in which the destination never ran dry, so a noisy rate costs no syscalls.
pub(super) fn resized_send_buffer(current: libc::c_int, drained: Drained) -> Option<libc::c_int> {
    let wanted = drained
        .supports(SEND_BUFFER_SPAN)
        .clamp(SEND_BUFFER_MIN as u64, SEND_BUFFER_MAX as u64) as libc::c_int;
    if wanted > current {
        Some(wanted.min(current.saturating_mul(BUDGET_GROWTH as libc::c_int)))
    } else if wanted < current / 2
        && drained.ns >= SEND_BUFFER_SPAN.as_nanos() as u64
        && !drained.ran_dry()
    {
        Some(wanted)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: u64 = 1_000_000_000;
    const SPAN_NS: u64 = SEND_BUFFER_SPAN.as_nanos() as u64;
    const MOST: u64 = 16 << 20;

    /// A sample from a destination that had more waiting for it than it drained.
    fn drained(bytes: u64, ns: u64) -> Drained {
        Drained {
            bytes,
            ns,
            waiting: u64::MAX,
        }
    }

    /// A sample from a destination that took everything that waited for it.
    fn ran_dry(bytes: u64, ns: u64) -> Drained {
        Drained {
            bytes,
            ns,
            waiting: bytes,
        }
    }

    #[test]
    fn a_fast_destination_grows_its_budget_in_steps_to_the_limit() {
        // 1 GiB/s: each check finds the whole budget drained within a few milliseconds.
        let fast = |budget: u64| drained(budget, budget * SECOND / (1 << 30));
        assert_eq!(
            resized_budget(BUDGET_START, fast(BUDGET_START), MOST),
            4 << 20
        );
        assert_eq!(resized_budget(4 << 20, fast(4 << 20), MOST), MOST);
        assert_eq!(resized_budget(MOST, fast(MOST), MOST), MOST);
    }

    #[test]
    fn a_budget_grows_only_by_what_really_drained() {
        // A destination filling its peer's empty buffers: fast for a moment, then stalled.
        let burst = drained(32 << 10, SECOND / 10_000);
        assert_eq!(resized_budget(BUDGET_START, burst, MOST), BUDGET_START);
        let more = drained(600 << 10, SECOND / 1000);
        assert_eq!(resized_budget(BUDGET_START, more, MOST), 2400 << 10);
    }

    #[test]
    fn a_short_interval_never_shrinks_a_budget() {
        // The redirect worker waiting out its jiffy: nothing drained for 4 ms.
        assert_eq!(resized_budget(MOST, drained(0, 4_000_000), MOST), MOST);
    }

    #[test]
    fn a_slow_destination_gets_what_it_drains_in_the_span() {
        // 2 Mbit/s over a second: 32 KiB per 128 ms, so the least budget.
        let phone = drained(256 << 10, SECOND);
        assert_eq!(resized_budget(MOST, phone, MOST), BUDGET_MIN);
        // 100 Mbit/s: 1.6 MB per 128 ms.
        let lan = drained(12_500_000, SECOND);
        assert_eq!(resized_budget(MOST, lan, MOST), 1_600_000);
        // A destination that stopped.
        assert_eq!(
            resized_budget(4 << 20, drained(0, SECOND), MOST),
            BUDGET_MIN
        );
    }

    #[test]
    fn a_destination_that_ran_dry_keeps_its_budget_and_send_buffer() {
        // A fast destination whose sender waited out a zero-window probe: it took all it
        // had in the first millisecond, then nothing came for 200 ms.
        let starved = ran_dry(800 << 10, SECOND / 5);
        assert_eq!(resized_budget(4 << 20, starved, MOST), 4 << 20);
        assert_eq!(resized_send_buffer(SEND_BUFFER_MAX, starved), None);
        // It may still grow on what it did drain.
        let quick = ran_dry(4 << 20, SECOND / 1000);
        assert_eq!(resized_budget(BUDGET_START, quick, MOST), 4 << 20);
    }

    #[test]
    fn a_lowered_global_limit_bounds_every_budget() {
        let most = 64 << 10;
        assert_eq!(resized_budget(most, drained(1 << 30, SECOND), most), most);
        assert_eq!(resized_budget(most, drained(0, SECOND), most), most);
    }

    #[test]
    fn a_budget_gives_a_receive_buffer_the_kernel_doubles_back_to_it() {
        assert_eq!(receive_buffer(BUDGET_START) as u64 * 2, BUDGET_START);
    }

    #[test]
    fn a_slow_destination_keeps_the_least_send_buffer() {
        // 64 KiB/s, or nothing at all.
        assert_eq!(
            resized_send_buffer(SEND_BUFFER_MIN, drained(64 << 10, SECOND)),
            None
        );
        assert_eq!(
            resized_send_buffer(SEND_BUFFER_MIN, drained(0, SPAN_NS)),
            None
        );
        assert_eq!(
            resized_send_buffer(SEND_BUFFER_START, drained(0, SPAN_NS)),
            None,
            "the starting size is within a clear fall of the least"
        );
    }

    #[test]
    fn a_fast_destination_gets_what_it_drains_per_span_in_steps_up_to_the_cap() {
        let (from, wanted) = (SEND_BUFFER_MAX / 4, SEND_BUFFER_MAX / 2);
        assert_eq!(
            resized_send_buffer(from, drained(wanted as u64, SPAN_NS)),
            Some(wanted)
        );
        // Twice the span at the same rate asks for the same size.
        assert_eq!(
            resized_send_buffer(from, drained(2 * wanted as u64, 2 * SPAN_NS)),
            Some(wanted)
        );
        assert_eq!(
            resized_send_buffer(from, drained(1 << 40, SPAN_NS)),
            Some(SEND_BUFFER_MAX)
        );
        // From the start, four times over per measurement.
        assert_eq!(
            resized_send_buffer(SEND_BUFFER_START, drained(1 << 40, SPAN_NS)),
            Some(4 * SEND_BUFFER_START)
        );
    }

    #[test]
    fn the_send_buffer_shrinks_only_on_a_clear_fall() {
        let current = SEND_BUFFER_MAX;
        assert_eq!(
            resized_send_buffer(current, drained(current as u64 * 3 / 4, SPAN_NS)),
            None
        );
        assert_eq!(
            resized_send_buffer(current, drained(current as u64 / 4, SPAN_NS)),
            Some(current / 4)
        );
        // A destination that stopped falls back to the least, never below it.
        assert_eq!(
            resized_send_buffer(current, drained(0, SPAN_NS)),
            Some(SEND_BUFFER_MIN)
        );
        // But not on a shorter interval: the redirect worker may be waiting out its jiffy.
        assert_eq!(resized_send_buffer(current, drained(0, SPAN_NS / 16)), None);
    }
}
