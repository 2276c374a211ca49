//! The counters each listener keeps while it serves: connections, refusals and timeouts by
//! reason, and bytes each way. A leaf: the data planes and the server write them, and
//! `metrics` renders them.

use std::sync::atomic::{AtomicU64, Ordering};

/// Why a connection was turned away or cut before it was relayed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    PerIpConnections,
    PerIpRate,
    ProxyHeader,
    TlsHandshake,
    UpstreamUnavailable,
}

impl Refusal {
    pub const ALL: [Self; 5] = [
        Self::PerIpConnections,
        Self::PerIpRate,
        Self::ProxyHeader,
        Self::TlsHandshake,
        Self::UpstreamUnavailable,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Self::PerIpConnections => "per_ip_connections",
            Self::PerIpRate => "per_ip_rate",
            Self::ProxyHeader => "proxy_header",
            Self::TlsHandshake => "tls_handshake",
            Self::UpstreamUnavailable => "upstream_unavailable",
        }
    }
}

/// Why the relay closed a connection its peers had not ended: a timeout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Timeout {
    Idle,
    HalfClosed,
}

impl Timeout {
    pub const ALL: [Self; 2] = [Self::Idle, Self::HalfClosed];

    pub fn label(self) -> &'static str {
        match self {
            Self::Idle => "idle",
            Self::HalfClosed => "half_closed",
        }
    }
}

/// One listener's counters. Bytes of kernel-mode connections come from the program's
/// per-flow counters, so they count what the kernel moved.
#[derive(Debug, Default)]
pub struct ListenerMetrics {
    pub name: String,
    pub open: AtomicU64,
    pub accepted: AtomicU64,
    refused: [AtomicU64; Refusal::ALL.len()],
    pub bytes_to_upstream: AtomicU64,
    pub bytes_to_client: AtomicU64,
    /// Connections reset because the relay held too much memory (memory.rs).
    shed: AtomicU64,
    /// Connections relayed to the listener's fallback: they did not open as it expects.
    fallback: AtomicU64,
    timed_out: [AtomicU64; Timeout::ALL.len()],
}

impl ListenerMetrics {
    pub fn new(name: String) -> Self {
        Self {
            name,
            ..Self::default()
        }
    }

    pub fn refuse(&self, reason: Refusal) {
        self.refused[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn refused(&self, reason: Refusal) -> u64 {
        self.refused[reason as usize].load(Ordering::Relaxed)
    }

    pub fn count_shed(&self) {
        self.shed.fetch_add(1, Ordering::Relaxed);
    }

    pub fn shed(&self) -> u64 {
        self.shed.load(Ordering::Relaxed)
    }

    pub fn count_timeout(&self, timeout: Timeout) {
        self.timed_out[timeout as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn timed_out(&self, timeout: Timeout) -> u64 {
        self.timed_out[timeout as usize].load(Ordering::Relaxed)
    }

    pub fn count_sent_to_fallback(&self) {
        self.fallback.fetch_add(1, Ordering::Relaxed);
    }

    pub fn sent_to_fallback(&self) -> u64 {
        self.fallback.load(Ordering::Relaxed)
    }

    pub fn add_bytes(&self, to_upstream: u64, to_client: u64) {
        self.bytes_to_upstream
            .fetch_add(to_upstream, Ordering::Relaxed);
        self.bytes_to_client.fetch_add(to_client, Ordering::Relaxed);
    }
}
