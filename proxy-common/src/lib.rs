//! Names and `#[repr(C)]` layouts shared by the kernel data plane (`proxy-ebpf`) and the
//! control plane (`proxy-userspace`). Each relayed connection has two *flows*, one per
//! receiving socket; a flow is keyed by that socket's cookie (`SO_COOKIE`).
#![no_std]

/// Name of the `sk_skb/stream_verdict` program, as `bpftool prog show` lists it.
pub const VERDICT_PROGRAM: &str = "relay_verdict";
/// SOCKHASH of every relayed socket, keyed by socket cookie.
pub const SOCKETS_MAP: &str = "RELAY_SOCKETS";
/// Kernel-written per-flow counters ([`FlowState`]), keyed by the receiving socket's cookie.
pub const FLOWS_MAP: &str = "RELAY_FLOWS";
/// Userspace-written per-flow settings ([`FlowControl`]), keyed by the receiving socket's cookie.
pub const CONTROLS_MAP: &str = "RELAY_CONTROLS";
/// Ring buffer of cookies (u64) whose flow needs userspace: throttled or detached.
pub const EVENTS_MAP: &str = "RELAY_EVENTS";

/// Read-only global set at load time: the bound on a flow's backlog (bytes redirected, not
/// yet in the peer's TCP write queue) at which the program asks userspace to measure it.
pub const GLOBAL_BACKLOG_LIMIT: &str = "FLOW_BACKLOG_LIMIT";

/// Read-only global set at load time: 1 when the program logs its rare events (aya-log),
/// which the verifier allows only to a loader with CAP_PERFMON; 0 leaves the logging code
/// unvisited.
pub const GLOBAL_LOG_EVENTS: &str = "LOG_EVENTS";

/// Default for [`GLOBAL_BACKLOG_LIMIT`]: the largest backlog limit a flow's budget grows to
/// (the kernel never pushes back on redirects; userspace throttles the sender from
/// [`throttle_from`] of the flow's limit). The kernel's redirect worker retries a full
/// destination only a jiffy later, so a fast flow's backlog swings by megabytes without
/// anything being slow: a smaller limit costs fast flows throughput (the measurements are in
/// docs/design.md, "Backpressure and memory"). Slow flows get less, by their drain rate.
pub const DEFAULT_BACKLOG_LIMIT: u64 = 16 << 20;

/// The bound at which the program stops redirecting and detaches the flow, for a backlog
/// limit of `limit`: userspace has not answered its checks in time, and keeping the bytes on
/// the receiving socket charges them to its receive buffer, so TCP itself closes the window.
pub const fn hard_limit(limit: u64) -> u64 {
    limit.wrapping_mul(4)
}

/// The bound at which the program detaches an upstream's flow whose own backlog limit,
/// `limit`, is below the global one, while the other direction has carried nothing since
/// the connection joined the kernel: nothing can then wait in the source's psock to go
/// out of it, so the kept bytes are charged to the source's receive buffer and TCP bounds
/// them at one window. A sender that outruns userspace's answer to the flow's check (many
/// at once at loopback speed) would otherwise push up to the [`hard_limit`] into the
/// redirect queue, charged to no socket. A flow at the global limit drains fast, and its
/// bound swings by megabytes between checks with nothing slow behind it. Where bytes can
/// wait in that psock, kept ones would queue behind them uncharged (see [`KEPT_LIMIT`]),
/// and only the [`hard_limit`] of the global limit applies.
pub const fn flow_hard_limit(limit: u64) -> u64 {
    limit.wrapping_mul(2)
}

/// The measured backlog from which userspace throttles the sender (cuts its receive
/// buffer), for a backlog limit of `limit`.
pub const fn throttle_from(limit: u64) -> u64 {
    limit / 2
}

/// The measured backlog at or below which a throttled sender is released.
pub const fn release_at(limit: u64) -> u64 {
    limit / 4
}

/// The most bytes a detached flow may keep in the kernel that userspace has not moved yet
/// ([`FlowState::passed_bytes`] minus [`FlowControl::passed_moved`]); past it the program
/// drops what follows and marks the flow [`FLOW_BROKEN`], and userspace resets the
/// connection. A kept segment that finds bytes for this socket's own peer queued
/// in its psock waits behind them, charged to no buffer (net/core/skmsg.c,
/// sk_psock_verdict_apply), so TCP keeps the sender's window open; when that peer reads
/// nothing, the queue would grow without end.
pub const KEPT_LIMIT: u64 = 64 << 20;

/// Capacity of the socket and flow maps: two entries per relayed connection.
pub const DEFAULT_MAX_SOCKETS: u32 = 65_536;
/// Ring buffer size in bytes (a power of two, multiple of the page size).
pub const EVENTS_RING_BYTES: u32 = 64 * 1024;

/// What the kernel knows about one flow. Written only by the verdict program.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowState {
    /// Bytes sent on to the peer socket's egress by the program.
    pub redirected_bytes: u64,
    /// Bytes left on this socket (SK_PASS) for userspace, once the flow is detached.
    pub passed_bytes: u64,
    /// `bpf_ktime_get_coarse_ns()` when the last byte arrived.
    pub last_active_ns: u64,
    /// Non-zero while the flow is detached: a redirect failed (peer not in the map) or the
    /// backlog bound reached [`hard_limit`] or [`flow_hard_limit`]. Every byte is then kept
    /// for userspace, which moves it on in order; the flow redirects again at the first
    /// segment after userspace has moved every kept byte ([`FlowControl::passed_moved`]).
    pub detached: u32,
    /// How many times the program asked userspace to measure the peer's backlog (when its
    /// bound reached [`GLOBAL_BACKLOG_LIMIT`]). While this differs from
    /// [`FlowControl::checks_done`], a check is pending and the program asks for no other.
    pub checks_requested: u32,
    /// Bytes of retransmitted segments that repeated bytes already handed on, cut off before
    /// the verdict (see [`FlowState::next_seq`]).
    pub trimmed_bytes: u64,
    /// TCP sequence number just past the last byte the program handed on: where the next
    /// segment must begin. A retransmission can overlap bytes already received, and the
    /// kernel queues it whole; its repeated head is trimmed off by comparing with this.
    pub next_seq: u32,
    /// Non-zero once [`FlowState::next_seq`] holds a value (from the first segment seen);
    /// [`FLOW_BROKEN`] when a repeated head could not be trimmed, [`FLOW_OVER_KEPT_LIMIT`]
    /// when too much was kept: either way the flow stopped.
    pub seq_state: u32,
    /// Times the flow detached, and resumed redirecting after userspace moved what it kept.
    pub detachments: u32,
    pub resumptions: u32,
}

/// [`FlowState::seq_state`]: no segment seen yet.
pub const SEQ_UNKNOWN: u32 = 0;
/// [`FlowState::seq_state`]: `next_seq` is valid.
pub const SEQ_TRACKED: u32 = 1;
/// [`FlowState::seq_state`]: a segment repeating bytes already handed on could not be
/// trimmed; it was dropped and userspace must end the connection rather than lose or
/// repeat a byte.
pub const FLOW_BROKEN: u32 = 2;
/// [`FlowState::seq_state`]: a detached flow kept more than [`KEPT_LIMIT`] bytes that
/// userspace had not moved; the program dropped what followed and userspace must reset the
/// connection. Apart from [`FLOW_BROKEN`], so that userspace names the reason the program
/// saw, not one it would infer from counts that may have moved since.
pub const FLOW_OVER_KEPT_LIMIT: u32 = 3;

/// Whether the program stopped the flow: userspace must end the connection.
pub const fn flow_stopped(seq_state: u32) -> bool {
    seq_state == FLOW_BROKEN || seq_state == FLOW_OVER_KEPT_LIMIT
}

/// What userspace tells the program about one flow. Written only by userspace; the fields
/// after `passed_moved`, and the client's port, are for people (`ebpf-proxy flows`,
/// bpftool), and the program ignores them; the listener port tells it the client's flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowControl {
    /// Cookie of the socket this flow's bytes go to (the key in [`SOCKETS_MAP`]).
    pub peer_cookie: u64,
    /// [`FlowState::redirected_bytes`] at userspace's last measurement of the peer's
    /// backlog, minus that backlog: `redirected_bytes - checkpoint_bytes` bounds the backlog.
    pub checkpoint_bytes: u64,
    /// The [`FlowState::checks_requested`] value userspace last answered.
    pub checks_done: u32,
    /// For the client's flow (client to upstream), the port of the listener the client
    /// came in on; 0 for the upstream's flow. So the two flows of a connection tell apart,
    /// for people and for the program ([`flow_hard_limit`] is for the upstream's flow).
    pub listener_port: u16,
    /// The client's port, when the relay logs client addresses (`--log-clients`); else 0.
    pub client_port: u16,
    /// Bytes of a detached flow's [`FlowState::passed_bytes`] that userspace has read and
    /// written into the peer. When it equals `passed_bytes`, every byte the program kept
    /// has gone on, and the program resumes redirecting at the next segment.
    pub passed_moved: u64,
    /// The client's address (IPv4 mapped into IPv6), when the relay logs client addresses;
    /// else zeros.
    pub client_ip: [u8; 16],
    /// Non-zero when the flow's source socket is outside the sockhash (it could not join):
    /// userspace moves all of its bytes, and the program never sees them.
    pub outside_map: u32,
    /// This flow's backlog limit, which userspace sizes to its destination's drain rate;
    /// 0 for [`GLOBAL_BACKLOG_LIMIT`]. It decides when the program asks for a check and
    /// when a detached flow may resume, and gives the flow its [`flow_hard_limit`].
    pub backlog_limit: u32,
}

const _: () = assert!(core::mem::size_of::<FlowState>() == 56);
const _: () = assert!(core::mem::size_of::<FlowControl>() == 56);

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain #[repr(C)] integers with no padding (sizes asserted above).
    unsafe impl aya::Pod for super::FlowState {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FlowControl {}
}
