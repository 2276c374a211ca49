//! What the relay does as its connections' memory nears its limit: pure decisions over one
//! sample of every connection, so they are tested without sockets. The steps, in order:
//! from [`KERNEL_CLOSED_FROM`] new connections stay out of the kernel, from
//! [`THROTTLE_FROM`] the biggest holders are throttled, and past the limit the connections
//! that hold the most and drain the slowest are reset, heaviest client address first.
//! A connection that drains what it holds within [`MOVES_WITHIN`] is never reset.

use std::{collections::HashMap, net::IpAddr, time::Duration};

/// Fractions of the limit, as (numerator, denominator), where each step starts.
pub const KERNEL_CLOSED_FROM: (u64, u64) = (1, 2);
pub const THROTTLE_FROM: (u64, u64) = (3, 4);
/// Shedding goes on until what is left is within this share of the limit, so that one
/// reset does not leave the relay at the limit, shedding again at the next sample.
pub const SHED_TO: (u64, u64) = (7, 8);
/// A connection holding less than this is never throttled: it is within a flow's first
/// budget, which any connection may have.
pub const THROTTLE_ABOVE: u64 = 1 << 20;
/// A connection holding less than this is never reset (an idle chat holds a few KiB).
pub const SHED_ABOVE: u64 = 256 << 10;
/// A connection whose peers take what it holds within this long, at the rate they took
/// bytes since the last sample, moves normally and is never reset.
pub const MOVES_WITHIN: Duration = Duration::from_secs(2);

/// How near the limit the relay is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Pressure {
    Calm,
    /// New connections stay out of the kernel.
    KernelClosed,
    /// And the biggest holders are throttled.
    Throttling,
    /// And connections that hold much and drain slowly are reset.
    Shedding,
}

impl Pressure {
    pub fn of(held: u64, limit: u64) -> Self {
        if held > limit {
            Self::Shedding
        } else if held >= share(limit, THROTTLE_FROM) {
            Self::Throttling
        } else if held >= share(limit, KERNEL_CLOSED_FROM) {
            Self::KernelClosed
        } else {
            Self::Calm
        }
    }
}

pub fn share(limit: u64, (numerator, denominator): (u64, u64)) -> u64 {
    limit / denominator * numerator
}

/// One connection as a sample saw it.
#[derive(Clone, Copy, Debug)]
pub struct Holder {
    pub id: u64,
    /// Its client's address, as per-address limits count it (IPv6 per /64).
    pub client: IpAddr,
    /// Bytes held for it: socket buffers, redirect backlog, userspace buffers.
    pub held: u64,
    /// Bytes its peers acknowledged since the previous sample, and over how long; None
    /// when not measured yet.
    pub drained: Option<(u64, Duration)>,
}

impl Holder {
    /// Whether its peers take what it holds within [`MOVES_WITHIN`] at their current rate.
    /// Unmeasured counts as moving: nobody is reset on no evidence.
    fn moves_normally(&self) -> bool {
        let Some((bytes, over)) = self.drained else {
            return true;
        };
        let per_window = bytes as f64 * MOVES_WITHIN.as_secs_f64() / over.as_secs_f64().max(1e-3);
        per_window >= self.held as f64
    }
}

/// The biggest holders, biggest first, until throttling them covers what `held` is over
/// [`THROTTLE_FROM`] the limit.
pub fn to_throttle(holders: &[Holder], held: u64, limit: u64) -> Vec<u64> {
    let excess = held.saturating_sub(share(limit, THROTTLE_FROM));
    let mut biggest: Vec<&Holder> = holders
        .iter()
        .filter(|h| h.held >= THROTTLE_ABOVE)
        .collect();
    biggest.sort_by_key(|h| std::cmp::Reverse(h.held));
    take_until(biggest, excess)
}

/// The connections to reset when `held` is past the limit: those that hold more than
/// [`SHED_ABOVE`] and do not move normally, from the client address that holds the most in
/// all, each address's biggest and slowest first, until what is left is within [`SHED_TO`]
/// of the limit.
pub fn to_shed(holders: &[Holder], held: u64, limit: u64) -> Vec<u64> {
    if held <= limit {
        return Vec::new();
    }
    let excess = held - share(limit, SHED_TO);
    let mut by_address: HashMap<IpAddr, u64> = HashMap::new();
    for holder in holders {
        *by_address.entry(holder.client).or_default() += holder.held;
    }
    let mut candidates: Vec<&Holder> = holders
        .iter()
        .filter(|h| h.held > SHED_ABOVE && !h.moves_normally())
        .collect();
    let rate = |h: &Holder| {
        h.drained
            .map_or(0.0, |(b, over)| b as f64 / over.as_secs_f64())
    };
    candidates.sort_by(|a, b| {
        by_address[&b.client]
            .cmp(&by_address[&a.client])
            .then(b.held.cmp(&a.held))
            .then(rate(a).total_cmp(&rate(b)))
    });
    take_until(candidates, excess)
}

/// The ids of `ordered` from the first, until their holdings add up to `amount`.
fn take_until(ordered: Vec<&Holder>, amount: u64) -> Vec<u64> {
    let mut covered = 0;
    ordered
        .into_iter()
        .take_while(|h| {
            let more = covered < amount;
            covered += h.held;
            more
        })
        .map(|h| h.id)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const SECOND: Duration = Duration::from_secs(1);

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([192, 0, 2, last])
    }

    fn stuck(id: u64, client: IpAddr, held: u64) -> Holder {
        Holder {
            id,
            client,
            held,
            drained: Some((0, SECOND)),
        }
    }

    #[test]
    fn steps_start_at_their_share_of_the_limit() {
        let limit = 256 * MIB;
        assert_eq!(Pressure::of(0, limit), Pressure::Calm);
        assert_eq!(Pressure::of(128 * MIB, limit), Pressure::KernelClosed);
        assert_eq!(Pressure::of(192 * MIB, limit), Pressure::Throttling);
        assert_eq!(Pressure::of(256 * MIB, limit), Pressure::Throttling);
        assert_eq!(Pressure::of(256 * MIB + 1, limit), Pressure::Shedding);
    }

    #[test]
    fn the_biggest_holders_are_throttled_first_and_small_ones_never() {
        let holders = [
            stuck(1, ip(1), 4 * MIB),
            stuck(2, ip(2), 40 * MIB),
            stuck(3, ip(3), 20 * MIB),
            stuck(4, ip(4), MIB / 2),
        ];
        // 100 MiB limit: throttling from 75; at 90 held, 15 to cover.
        assert_eq!(to_throttle(&holders, 90 * MIB, 100 * MIB), [2]);
        assert_eq!(to_throttle(&holders, 140 * MIB, 100 * MIB), [2, 3, 1]);
        assert!(to_throttle(&holders, 70 * MIB, 100 * MIB).is_empty());
    }

    #[test]
    fn shedding_picks_the_biggest_holders_until_back_under_the_limit() {
        let holders = [
            stuck(1, ip(1), 8 * MIB),
            stuck(2, ip(2), 30 * MIB),
            stuck(3, ip(3), 16 * MIB),
            stuck(4, ip(4), 100 << 10),
        ];
        assert!(
            to_shed(&holders, 100 * MIB, 100 * MIB).is_empty(),
            "at the limit"
        );
        // 110 held, back to 87.5: 22.5 to shed, which the 30 MiB holder covers.
        assert_eq!(to_shed(&holders, 110 * MIB, 100 * MIB), [2]);
        assert_eq!(to_shed(&holders, 150 * MIB, 100 * MIB), [2, 3, 1]);
        assert_eq!(
            to_shed(&holders, 500 * MIB, 100 * MIB),
            [2, 3, 1],
            "never one that holds less than SHED_ABOVE"
        );
    }

    #[test]
    fn a_connection_that_moves_normally_is_never_shed() {
        let fast = Holder {
            id: 1,
            client: ip(1),
            held: 64 * MIB,
            // 50 MiB/s: what it holds goes within 2 s.
            drained: Some((50 * MIB, SECOND)),
        };
        let unmeasured = Holder {
            drained: None,
            ..stuck(2, ip(2), 64 * MIB)
        };
        let slow = Holder {
            id: 3,
            client: ip(3),
            held: 8 * MIB,
            drained: Some((MIB, SECOND)),
        };
        assert_eq!(to_shed(&[fast, unmeasured, slow], 1 << 40, 64 * MIB), [3]);
    }

    #[test]
    fn the_heaviest_address_is_shed_first() {
        // Ten 2 MiB connections behind one address outweigh one 8 MiB connection.
        let mut holders: Vec<Holder> = (0..10).map(|id| stuck(id, ip(1), 2 * MIB)).collect();
        holders.push(stuck(10, ip(2), 8 * MIB));
        let shed = to_shed(&holders, 110 * MIB, 100 * MIB);
        // 22.5 MiB to shed: all ten of the heavy address (20), then the other.
        assert_eq!(shed.len(), 11);
        assert!(shed[..10].iter().all(|&id| id < 10), "{shed:?}");
        let shed = to_shed(&holders, 100 * MIB + 1, 100 * MIB);
        assert!(shed.iter().all(|&id| id < 10), "{shed:?}");
    }
}
