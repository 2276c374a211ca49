//! What idle means in kernel mode. The program's counts say what arrived and was handed to
//! the other socket's queue, not what a peer took, so idle is read off the peers' own
//! acknowledgements: the connection is idle once neither peer has acknowledged a byte for
//! the timeout, or once a peer with bytes waiting for it has taken none for that long.
//! The second is what a userspace plane's stalled write shows: a client that never reads
//! while sending to an echo keeps the echo acknowledging a trickle (one small window per
//! zero-window probe, docs/reliability.md), which the first alone would count as traffic.

use std::time::{Duration, Instant};

/// One peer's socket at one look: what the peer has acknowledged, and whether bytes wait
/// for it (SIOCOUTQ above zero).
#[derive(Clone, Copy, Debug)]
pub(super) struct PeerLook {
    pub acked: u64,
    pub waiting: bool,
}

/// One peer as the relay last saw it.
struct PeerWatch {
    acked: u64,
    /// When it last acknowledged a byte or had nothing waiting for it.
    keeping_up_at: Instant,
}

/// Both peers of a kernel-mode connection, watched across looks.
pub(super) struct Deliveries {
    peers: [PeerWatch; 2],
    /// When either peer last acknowledged a byte.
    acked_at: Instant,
}

impl Deliveries {
    pub fn new(now: Instant) -> Self {
        let peer = || PeerWatch {
            acked: 0,
            keeping_up_at: now,
        };
        Self {
            peers: [peer(), peer()],
            acked_at: now,
        }
    }

    /// How long the connection has been idle at `now`, given a look at each peer: since
    /// either peer last acknowledged a byte, or, if longer, since a peer with bytes waiting
    /// for it last took one.
    pub fn idle_for(&mut self, looks: [PeerLook; 2], now: Instant) -> Duration {
        let mut stalled = Duration::ZERO;
        for (peer, look) in self.peers.iter_mut().zip(looks) {
            if look.acked != peer.acked {
                peer.acked = look.acked;
                peer.keeping_up_at = now;
                self.acked_at = now;
            } else if !look.waiting {
                peer.keeping_up_at = now;
            }
            stalled = stalled.max(now - peer.keeping_up_at);
        }
        (now - self.acked_at).max(stalled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    fn look(acked: u64, waiting: bool) -> PeerLook {
        PeerLook { acked, waiting }
    }

    #[test]
    fn silence_both_ways_is_idle() {
        let start = Instant::now();
        let mut deliveries = Deliveries::new(start);
        let quiet = [look(0, false), look(0, false)];
        assert_eq!(deliveries.idle_for(quiet, start + SECOND), SECOND);
        assert_eq!(deliveries.idle_for(quiet, start + 3 * SECOND), 3 * SECOND);
    }

    #[test]
    fn a_peer_that_takes_nothing_while_bytes_wait_is_idle_though_the_other_acks() {
        let start = Instant::now();
        let mut deliveries = Deliveries::new(start);
        // The client never reads; the echo acknowledges a trickle.
        for second in 1..=5u32 {
            let looks = [look(0, true), look(u64::from(second) * 3072, true)];
            assert_eq!(
                deliveries.idle_for(looks, start + second * SECOND),
                second * SECOND
            );
        }
    }

    #[test]
    fn a_peer_with_nothing_waiting_is_not_behind() {
        let start = Instant::now();
        let mut deliveries = Deliveries::new(start);
        // A chat: the upstream takes each message; nothing waits for the quiet client.
        for second in 1..=5u32 {
            let looks = [look(0, false), look(u64::from(second), false)];
            assert_eq!(
                deliveries.idle_for(looks, start + second * SECOND),
                Duration::ZERO
            );
        }
        // Bytes for the client now: its stall counts from the last look that found
        // nothing waiting for it, not from the start.
        let looks = [look(0, true), look(6, false)];
        assert_eq!(deliveries.idle_for(looks, start + 7 * SECOND), 2 * SECOND);
        let looks = [look(0, true), look(7, false)];
        assert_eq!(deliveries.idle_for(looks, start + 8 * SECOND), 3 * SECOND);
    }

    #[test]
    fn a_slow_peer_that_keeps_taking_is_not_idle() {
        let start = Instant::now();
        let mut deliveries = Deliveries::new(start);
        for second in 1..=5u32 {
            let looks = [look(u64::from(second) * 1000, true), look(0, false)];
            assert_eq!(
                deliveries.idle_for(looks, start + second * SECOND),
                Duration::ZERO
            );
        }
    }
}
