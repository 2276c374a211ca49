//! What every data plane shares about one connection: the bytes each way ([`Transfer`],
//! [`Progress`]), how a flow (one direction) fails and how a connection ends
//! ([`FlowError`], [`ConnectionError`]), the [`Watchdog`] that enforces its timeouts and
//! reports its bytes, and the one loop that drives both flows under it ([`drive_both`]).
//! A leaf: the data planes build on it, and it knows none of them.

mod both_ways;
mod watchdog;

use std::{
    io,
    os::fd::AsRawFd,
    sync::atomic::{AtomicU64, Ordering},
};

pub use both_ways::{Flows, Pause, drive_both};
pub use watchdog::{Expiry, Supervision, Watchdog};

use crate::sys;

/// Bytes delivered in each direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Transfer {
    pub client_to_upstream: u64,
    pub upstream_to_client: u64,
}

impl Transfer {
    /// These bytes, following `earlier` on the same connection.
    pub fn after(self, earlier: Transfer) -> Transfer {
        Transfer {
            client_to_upstream: earlier.client_to_upstream + self.client_to_upstream,
            upstream_to_client: earlier.upstream_to_client + self.upstream_to_client,
        }
    }
}

/// Bytes each direction has moved so far, updated as they move.
#[derive(Debug, Default)]
pub struct Progress {
    pub client_to_upstream: AtomicU64,
    pub upstream_to_client: AtomicU64,
}

impl Progress {
    pub fn snapshot(&self) -> Transfer {
        Transfer {
            client_to_upstream: self.client_to_upstream.load(Ordering::Relaxed),
            upstream_to_client: self.upstream_to_client.load(Ordering::Relaxed),
        }
    }
}

/// Whether userspace read from a connection's sockets before a data plane took them over
/// (a PROXY header, auto's warm-up). The kernel plane must then tell the program where each
/// socket's unread bytes begin.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Handover {
    Untouched,
    AfterReads,
}

/// One of a connection's two flows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    ClientToUpstream,
    UpstreamToClient,
}

/// Whether a flow failed reading its source or writing its destination.
#[derive(Debug)]
pub enum FlowError {
    Source(io::Error),
    Destination(io::Error),
}

impl FlowError {
    /// The connection's end this failure means, named by the side that failed.
    pub fn of(self, direction: Direction) -> ConnectionError {
        match (self, direction) {
            (Self::Source(e), Direction::ClientToUpstream)
            | (Self::Destination(e), Direction::UpstreamToClient) => ConnectionError::Client(e),
            (Self::Source(e), Direction::UpstreamToClient)
            | (Self::Destination(e), Direction::ClientToUpstream) => ConnectionError::Upstream(e),
        }
    }
}

/// A connection that ended with a reset or socket error, named by the side that failed,
/// or that the relay closed on a timeout.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    #[error("client side: {0}")]
    Client(io::Error),
    #[error("upstream side: {0}")]
    Upstream(io::Error),
    #[error("closed by the relay: {0}")]
    Expired(Expiry),
}

impl ConnectionError {
    /// Sides that did not fail learn of it the way TCP says it: a reset. A timeout resets
    /// both, so neither waits on a connection the relay gave up.
    pub fn propagate_reset(&self, client: &impl AsRawFd, upstream: &impl AsRawFd) {
        let (client, upstream) = (client.as_raw_fd(), upstream.as_raw_fd());
        let others: &[i32] = match self {
            Self::Client(_) => &[upstream],
            Self::Upstream(_) => &[client],
            Self::Expired(_) => &[client, upstream],
        };
        for fd in others {
            // Best effort: the socket is closed right after either way.
            let _ = sys::set_linger_zero(fd);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flow_failure_names_the_side_that_failed() {
        let failed = |e: FlowError, d| match e.of(d) {
            ConnectionError::Client(_) => "client",
            ConnectionError::Upstream(_) => "upstream",
            ConnectionError::Expired(_) => "relay",
        };
        let e = || io::Error::from(io::ErrorKind::ConnectionReset);
        assert_eq!(
            failed(FlowError::Source(e()), Direction::ClientToUpstream),
            "client"
        );
        assert_eq!(
            failed(FlowError::Destination(e()), Direction::ClientToUpstream),
            "upstream"
        );
        assert_eq!(
            failed(FlowError::Source(e()), Direction::UpstreamToClient),
            "upstream"
        );
        assert_eq!(
            failed(FlowError::Destination(e()), Direction::UpstreamToClient),
            "client"
        );
    }
}
