//! One flow of a kernel-mode connection: the state userspace keeps for each socket and for
//! each direction, and the task that carries a direction until its source's EOF has
//! reached the destination. The program redirects the bytes; this task answers its
//! requests (backpressure checks, a detached flow) and ends the flow, since the kernel
//! never forwards a FIN.

use std::{
    io,
    net::{IpAddr, SocketAddr, TcpStream},
    os::fd::AsRawFd,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
    time::Duration,
};

use proxy_common::{FlowControl, FlowState};
use tracing::debug;

use super::{
    budget::DrainMark,
    connection::{KernelConnection, Prepared},
    detached::Kept,
    watcher::{ERROR, HANGUP, NOTIFIED, SocketSignals, WRITABLE},
};
use crate::{sys, transfer::FlowError};

/// How often a flow re-reads its record in case a notification was lost to a full ring
/// buffer.
const AUDIT_PERIOD: Duration = Duration::from_secs(5);
/// Userspace buffer for moving a flow's bytes when the kernel does not: part of the
/// per-connection bound.
pub(super) const MOVE_BUFFER: usize = 64 * 1024;

/// One socket of a kernel-mode connection: what it holds as a source and as a destination.
pub(super) struct Socket {
    pub stream: TcpStream,
    pub cookie: u64,
    pub signals: Arc<SocketSignals>,
    pub in_map: bool,
    /// Optional epoll interest (READABLE/WRITABLE) wanted by the two flows touching it.
    pub interest: AtomicU32,
    /// The SO_SNDBUF this socket has now, sized by how fast it drains as a destination.
    pub send_buffer: AtomicU32,
}

/// Who a flow belongs to, for people reading the maps (see FlowControl).
#[derive(Clone, Copy, Default)]
pub(super) struct FlowLabel {
    pub listener_port: u16,
    pub client: Option<SocketAddr>,
}

/// What userspace knows of one flow beyond the program's record; keyed, like the record,
/// by the source socket.
pub(super) struct FlowLedger {
    pub label: FlowLabel,
    /// Sequence number of the source's first byte userspace has not read, when it read any
    /// before the socket joined the map.
    pub unread_from: Option<u32>,
    /// Bytes userspace moved from the source to the destination.
    pub moved: AtomicU64,
    /// The destination's queued total (bytes acked + SIOCOUTQ) when it joined the map, plus
    /// every byte userspace wrote into it since: with the program's redirected bytes, what
    /// the destination's TCP stack should have counted once the redirect backlog is empty.
    pub peer_userspace: AtomicU64,
    /// The checkpoint published for this flow (see FlowControl).
    pub checkpoint: AtomicU64,
    /// Check requests of this flow that userspace has answered.
    pub checks_done: AtomicU32,
    /// Bytes the program kept on the source (while detached) that userspace moved on.
    pub passed_moved: AtomicU64,
    /// The flow's record as the program left it once userspace saw its source's EOF: no
    /// segment comes after a FIN, so it no longer changes and is not read again.
    pub last_state: OnceLock<FlowState>,
    /// What the flow may hold, sized to its destination's drain rate (budget.rs): its
    /// backlog limit, and the source's receive buffer.
    pub budget: AtomicU64,
    /// Where the destination's drain rate since the flow's last check is measured from.
    pub checked: DrainMark,
    /// What userspace had left in the destination's write queue when the flow joined the
    /// kernel (auto's warm-up): a flow the kernel took at once finds nothing there.
    pub queued_at_join: u64,
}

impl FlowLedger {
    pub fn new(
        label: FlowLabel,
        unread_from: Option<u32>,
        destination: &Prepared,
        budget: u64,
    ) -> Self {
        let queued_at_join = destination.queued.saturating_sub(destination.acked);
        Self {
            budget: AtomicU64::new(budget),
            checked: DrainMark::new(destination.acked, queued_at_join),
            queued_at_join,
            label,
            unread_from,
            moved: AtomicU64::new(0),
            peer_userspace: AtomicU64::new(destination.queued),
            checkpoint: AtomicU64::new(0),
            checks_done: AtomicU32::new(0),
            passed_moved: AtomicU64::new(0),
            last_state: OnceLock::new(),
        }
    }

    pub fn budget(&self) -> u64 {
        self.budget.load(Ordering::Acquire)
    }

    /// The flow's control record towards `peer_cookie` as this ledger has it now.
    pub fn control(&self, peer_cookie: u64) -> FlowControl {
        FlowControl {
            checkpoint_bytes: self.checkpoint.load(Ordering::Acquire),
            checks_done: self.checks_done.load(Ordering::Acquire),
            passed_moved: self.passed_moved.load(Ordering::Acquire),
            backlog_limit: self.budget() as u32,
            ..self.label.control(peer_cookie)
        }
    }
}

/// A flow with its two sockets, as the task driving it sees them.
#[derive(Clone, Copy)]
pub(super) struct Flow<'a> {
    pub ledger: &'a FlowLedger,
    pub from: &'a Socket,
    pub to: &'a Socket,
}

impl KernelConnection<'_> {
    /// Carries one direction until its source's EOF has reached the destination.
    pub(super) async fn run_flow(&self, flow: Flow<'_>) -> Result<(), FlowError> {
        let from = flow.from;
        if !from.in_map {
            return self.copy_rest_in_userspace(flow).await;
        }
        let mut audit = tokio::time::interval(AUDIT_PERIOD);
        audit.reset();
        let mut resumed = false;
        // Events the hold at the start took, handled first.
        let mut pending = self.hold_while_backed_up(flow).await?;
        loop {
            // Back from userspace: look at the flow again before waiting for anything.
            let events = if let Some(events) = pending.take() {
                events
            } else if std::mem::take(&mut resumed) {
                NOTIFIED
            } else {
                tokio::select! {
                    events = from.signals.read_events() => events,
                    _ = audit.tick() => NOTIFIED,
                }
            };
            if events & ERROR != 0 {
                return Err(FlowError::Source(socket_error(&from.stream)));
            }
            // The FIN runs data-ready, which hands the program everything queued before it;
            // the barrier waits for that to finish, so the record read next is complete.
            if events & HANGUP != 0 {
                sys::socket_barrier(&from.stream).map_err(FlowError::Source)?;
            }
            let state = self.state(flow);
            if let Some(stopped) = self.stopped_by_program(flow, &state) {
                return Err(stopped);
            }
            if state.detached != 0 {
                debug!(
                    "a flow left the kernel after {} bytes: its backlog bound passed the hard limit, or its peer left the map",
                    state.redirected_bytes
                );
                match self.move_kept_bytes(flow).await? {
                    Kept::Ended => return Ok(()),
                    Kept::Resumed => {
                        resumed = true;
                        continue;
                    }
                }
            }
            // Asked to throttle by the memory account: the least budget from now on, which
            // the program checks the backlog bound against.
            if self.holding.throttled() && self.hold_least(flow)? {
                super::backpressure::restore_receive_buffer(&from.stream, flow.ledger.budget())
                    .map_err(FlowError::Source)?;
                self.publish_control(flow)?;
            }
            if state.checks_requested != flow.ledger.checks_done.load(Ordering::Acquire) {
                self.check_backlog(flow, state.checks_requested).await?;
            }
            if events & HANGUP != 0 {
                if self.reached_end(flow).await? {
                    // Read after the barrier, with the flow still attached: final.
                    let _ = flow.ledger.last_state.set(state);
                    self.wait_for_peer_backlog(flow, 0).await?;
                    sys::shutdown_write(&flow.to.stream).map_err(FlowError::Destination)?;
                    return Ok(());
                }
                // The flow may have detached on its last segments: look again at once.
                resumed = true;
            }
        }
    }

    /// After a FIN, and the barrier that found the flow still attached: true once every byte
    /// before it was redirected or moved on. Anything still readable was never handed to the
    /// program: move it on, in order.
    async fn reached_end(&self, flow: Flow<'_>) -> Result<bool, FlowError> {
        let mut buf = vec![0u8; MOVE_BUFFER];
        loop {
            match sys::recv_nonblocking(&flow.from.stream, &mut buf) {
                Ok(0) => return Ok(true),
                Ok(n) => {
                    self.wait_for_peer_backlog(flow, 0).await?;
                    self.forward_moved(flow, &buf[..n]).await?;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(FlowError::Source(e)),
            }
        }
    }

    /// Writes bytes userspace read from the source to the destination; the caller has made
    /// sure every redirected byte is already in the destination's write queue.
    pub(super) async fn forward_moved(
        &self,
        flow: Flow<'_>,
        bytes: &[u8],
    ) -> Result<(), FlowError> {
        self.write_all(flow.to, bytes).await?;
        let n = bytes.len() as u64;
        flow.ledger.moved.fetch_add(n, Ordering::AcqRel);
        flow.ledger.peer_userspace.fetch_add(n, Ordering::AcqRel);
        Ok(())
    }

    async fn write_all(&self, to: &Socket, mut bytes: &[u8]) -> Result<(), FlowError> {
        while !bytes.is_empty() {
            match sys::send_nonblocking(&to.stream, bytes) {
                Ok(n) => bytes = &bytes[n..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.want(to, WRITABLE, Want::On)?;
                    let events = to.signals.write_events().await;
                    self.want(to, WRITABLE, Want::Off)?;
                    if events & ERROR != 0 {
                        return Err(FlowError::Destination(socket_error(&to.stream)));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(FlowError::Destination(e)),
            }
        }
        Ok(())
    }

    /// Turns epoll interest `bits` on or off for `socket`, with one syscall only when the
    /// combined interest of its two flows changes.
    pub(super) fn want(&self, socket: &Socket, bits: u32, want: Want) -> Result<(), FlowError> {
        let old = match want {
            Want::On => socket.interest.fetch_or(bits, Ordering::AcqRel),
            Want::Off => socket.interest.fetch_and(!bits, Ordering::AcqRel),
        };
        let new = match want {
            Want::On => old | bits,
            Want::Off => old & !bits,
        };
        if new == old {
            return Ok(());
        }
        self.plane
            .watcher
            .set_interest(socket.cookie, socket.stream.as_raw_fd(), new)
            .map_err(FlowError::Source)
    }

    /// The program's record of the flow, or its final copy once the source's EOF was seen.
    pub(super) fn state(&self, flow: Flow<'_>) -> FlowState {
        if let Some(last) = flow.ledger.last_state.get() {
            return *last;
        }
        // A missing entry reads as zeros: only possible for a flow already torn down.
        self.plane.maps.state(flow.from.cookie).unwrap_or_default()
    }

    /// Hands the program what userspace knows of the flow now.
    pub(super) fn publish_control(&self, flow: Flow<'_>) -> Result<(), FlowError> {
        let control = FlowControl {
            outside_map: u32::from(!flow.from.in_map),
            ..flow.ledger.control(flow.to.cookie)
        };
        self.plane
            .maps
            .publish(flow.from.cookie, &control)
            .map_err(FlowError::Source)
    }
}

impl FlowLabel {
    /// A fresh control record for a flow towards `peer_cookie`, labelled.
    pub fn control(&self, peer_cookie: u64) -> FlowControl {
        let (client_ip, client_port) = match self.client {
            Some(addr) => (
                match addr.ip() {
                    IpAddr::V4(ip) => ip.to_ipv6_mapped().octets(),
                    IpAddr::V6(ip) => ip.octets(),
                },
                addr.port(),
            ),
            None => ([0; 16], 0),
        };
        FlowControl {
            peer_cookie,
            listener_port: self.listener_port,
            client_port,
            client_ip,
            ..FlowControl::default()
        }
    }
}

/// Whether a flow wants an epoll interest, or no longer does.
#[derive(Clone, Copy)]
pub(super) enum Want {
    On,
    Off,
}

/// The error a socket reported, or a reset when it reports none.
pub(super) fn socket_error(stream: &TcpStream) -> io::Error {
    match stream.take_error() {
        Ok(Some(e)) => e,
        Ok(None) => io::Error::from(io::ErrorKind::ConnectionReset),
        Err(e) => e,
    }
}
