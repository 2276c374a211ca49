//! Per-client-IP limits: concurrent connections and new connections per second (a token
//! bucket). IPv6 clients are counted per /64, the block one subscriber usually holds. Off
//! unless the operator sets them: a carrier NAT puts thousands of users behind one address.
//! Refusals are told at info level, at most once a minute, with their count.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv6Addr},
    sync::{Arc, Mutex},
    time::Instant,
};

use tracing::info;

use crate::{config::Limits, counters::Refusal, notice::Notice};

/// Above this many tracked addresses, entries with nothing open and a full bucket are
/// dropped; what remains is bounded by open connections and one second of new ones.
const PRUNE_ABOVE: usize = 65_536;

#[derive(Debug)]
struct Entry {
    open: u32,
    tokens: f64,
    refilled: Instant,
}

pub struct ClientLimits {
    /// Both limits, replaced together on reload; counts in the table carry over.
    settings: Mutex<(u32, u32)>,
    table: Mutex<HashMap<IpAddr, Entry>>,
    refusals: Notice,
}

/// A connection counted against its client's limit until dropped.
pub struct ClientSlot {
    limits: Option<(Arc<ClientLimits>, IpAddr)>,
}

impl ClientLimits {
    pub fn new(limits: &Limits) -> Arc<Self> {
        Arc::new(Self {
            settings: Mutex::new((limits.per_ip_connections, limits.per_ip_rate)),
            table: Mutex::new(HashMap::new()),
            refusals: Notice::default(),
        })
    }

    /// New limits for new connections; open ones stay counted.
    pub fn update(&self, limits: &Limits) {
        *self.settings.lock().unwrap_or_else(|e| e.into_inner()) =
            (limits.per_ip_connections, limits.per_ip_rate);
    }

    /// Counts a new connection from `ip`, or says which limit it is over.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<ClientSlot, Refusal> {
        self.count(ip).inspect_err(|reason| {
            if let Some(since) = self.refusals.count() {
                info!(
                    "refused {since} connection(s) over the per-address limits since the last notice, the latest over {}; if these are real users (a carrier NAT puts many behind one address), raise or remove per_ip_connections and per_ip_rate (next notice in a minute at the earliest)",
                    reason.label()
                );
            }
        })
    }

    fn count(self: &Arc<Self>, ip: IpAddr) -> Result<ClientSlot, Refusal> {
        let (per_ip_connections, per_ip_rate) =
            *self.settings.lock().unwrap_or_else(|e| e.into_inner());
        if per_ip_connections == 0 && per_ip_rate == 0 {
            return Ok(ClientSlot { limits: None });
        }
        let key = client_key(ip);
        let now = Instant::now();
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        if table.len() > PRUNE_ABOVE {
            table.retain(|_, e| e.open > 0 || refill(e, now, per_ip_rate) < f64::from(per_ip_rate));
        }
        let entry = table.entry(key).or_insert(Entry {
            open: 0,
            tokens: f64::from(per_ip_rate),
            refilled: now,
        });
        if per_ip_connections > 0 && entry.open >= per_ip_connections {
            return Err(Refusal::PerIpConnections);
        }
        if per_ip_rate > 0 {
            if refill(entry, now, per_ip_rate) < 1.0 {
                return Err(Refusal::PerIpRate);
            }
            entry.tokens -= 1.0;
        }
        entry.open += 1;
        Ok(ClientSlot {
            limits: Some((Arc::clone(self), key)),
        })
    }

    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.table.lock().unwrap().len()
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        if let Some((limits, key)) = &self.limits {
            let mut table = limits.table.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(entry) = table.get_mut(key) {
                entry.open = entry.open.saturating_sub(1);
            }
        }
    }
}

/// Adds the tokens earned since the last refill (a bucket holds one second's worth).
fn refill(entry: &mut Entry, now: Instant, per_second: u32) -> f64 {
    let rate = f64::from(per_second);
    let earned = now.duration_since(entry.refilled).as_secs_f64() * rate;
    entry.tokens = (entry.tokens + earned).min(rate);
    entry.refilled = now;
    entry.tokens
}

/// The unit a limit applies to: the IPv4 address, or the IPv6 /64.
pub fn client_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(Ipv6Addr::from(prefix))
        }
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(connections: u32, rate: u32) -> Arc<ClientLimits> {
        ClientLimits::new(&Limits {
            max_connections: 100,
            per_ip_connections: connections,
            per_ip_rate: rate,
            ..Limits::DEFAULT
        })
    }

    #[test]
    fn concurrent_limit_per_address_and_per_ipv6_64() {
        let l = limits(2, 0);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let first = l.admit(a).unwrap();
        let _second = l.admit(a).unwrap();
        assert_eq!(l.admit(a).err(), Some(Refusal::PerIpConnections));
        assert!(l.admit("192.0.2.2".parse().unwrap()).is_ok());
        // A v4-mapped address is the same client.
        assert_eq!(
            l.admit("::ffff:192.0.2.1".parse().unwrap()).err(),
            Some(Refusal::PerIpConnections)
        );
        drop(first);
        assert!(l.admit(a).is_ok());
        let _x = l.admit("2001:db8:0:1::1".parse().unwrap()).unwrap();
        let _y = l.admit("2001:db8:0:1::2".parse().unwrap()).unwrap();
        assert!(l.admit("2001:db8:0:1:ffff::3".parse().unwrap()).is_err());
        assert!(l.admit("2001:db8:0:2::1".parse().unwrap()).is_ok());
    }

    #[test]
    fn rate_limit_allows_a_burst_then_refuses() {
        let l = limits(0, 3);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        for _ in 0..3 {
            drop(l.admit(a).unwrap());
        }
        assert_eq!(l.admit(a).err(), Some(Refusal::PerIpRate));
        assert!(l.admit("192.0.2.9".parse().unwrap()).is_ok());
    }

    #[test]
    fn table_is_pruned_of_idle_addresses() {
        let l = limits(4, 1_000_000);
        for i in 0..(PRUNE_ABOVE as u32 + 10) {
            drop(l.admit(IpAddr::from(i.to_be_bytes())).unwrap());
        }
        // A million per second refills a bucket within microseconds, so passing the
        // threshold drops nearly every idle entry; what stays was added since.
        let _kept = l.admit("192.0.2.1".parse().unwrap()).unwrap();
        assert!(l.tracked() < 1000, "{}", l.tracked());
    }
}
