//! One connection in kernel mode. Both sockets join the sockhash and the verdict program
//! moves their bytes; userspace only steps in for what the kernel does not do:
//! - a FIN or RST is never forwarded by the kernel: on EOF, wait until every redirected
//!   byte is in the peer's TCP write queue, then shut the peer's write side (shutting it
//!   earlier makes the queued redirects fail and drops them);
//! - redirects ignore the peer's send buffer: when the program's bound on the peer's backlog
//!   reaches the limit, measure the backlog and, from half the limit on, shrink the sending
//!   socket's receive buffer until it is down to a quarter; at the same checks, size the
//!   peer's send buffer to its drain rate, since the kernel fills it only once a jiffy;
//! - a detached flow (its peer could not join the map) keeps its bytes on the receiving
//!   socket; userspace moves them, after the peer's redirect backlog has emptied.

use std::{
    io,
    net::TcpStream,
    os::fd::{AsFd as _, AsRawFd},
    sync::{
        OnceLock,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use proxy_common::{FLOW_BROKEN, FlowControl, FlowState, SEQ_TRACKED};
use tracing::{debug, warn};

use super::{
    KernelDataPlane,
    watcher::{ERROR, HANGUP, NOTIFIED, READABLE, SocketSignals, WRITABLE},
};
use crate::{
    dataplane::{FlowError, Supervision, Transfer, Watchdog},
    sys,
};

/// The shortest gap between two warnings of one kind (maps declined, kept-bytes resets).
const WARNING_EVERY: Duration = Duration::from_secs(60);
/// How often a connection re-reads its flows in case a notification was lost to a full
/// ring buffer.
const AUDIT_PERIOD: Duration = Duration::from_secs(5);
/// Userspace buffer for moving a detached flow's bytes: part of the per-connection bound.
pub const MOVE_BUFFER: usize = 64 * 1024;
/// SO_RCVBUF of every relayed socket; the kernel doubles it (16 MiB of buffer), and the
/// advertised window stays below that: what a sender can still push once throttled.
/// Measured over loopback: a 4 MiB request gave 0.8 Gbit/s, 8 MiB gave 2.1.
pub const RECEIVE_BUFFER: libc::c_int = 8 << 20;
/// SO_SNDBUF every relayed socket starts with (doubled by the kernel: 8 MiB), and returns to
/// when its peer falls behind. When a destination's send buffer is full, the kernel's
/// redirect worker retries only a jiffy later (4 ms), and wakeups meanwhile do nothing, so a
/// flow moves at most about one send buffer per jiffy: measured over loopback with
/// everything on one CPU, 4.4 Gbit/s with this size, 8-9 with 16 MiB, 10.5-11 with 32 MiB.
pub const SEND_BUFFER: libc::c_int = 4 << 20;
/// The most SO_SNDBUF grows to (64 MiB in the kernel's accounting), for a destination that
/// drains fast enough to need it.
pub const SEND_BUFFER_MAX: libc::c_int = 32 << 20;
/// At each backlog check, SO_SNDBUF is set to what the destination drained in this long, so
/// the kernel's buffer (twice that) holds what it drains in 128 ms: many jiffies of retry
/// delay at its own rate. Under 4 MiB per 64 ms (about 0.5 Gbit/s) it stays at
/// [`SEND_BUFFER`]; from about 4 Gbit/s on it is at [`SEND_BUFFER_MAX`].
const SEND_BUFFER_SPAN: Duration = Duration::from_millis(64);
/// SO_RCVLOWAT during setup: above any window (the kernel caps it at half the largest
/// receive buffer), so data-ready, and with it the program, waits for the release.
const HOLD_LOW_WATER: libc::c_int = libc::c_int::MAX;
/// The most bytes a detached flow may keep in the kernel that userspace has not moved yet.
/// A kept segment that finds bytes for this socket's own peer queued in its psock waits
/// behind them, charged to no buffer (net/core/skmsg.c, sk_psock_verdict_apply), so TCP
/// keeps the sender's window open; when that peer reads nothing, the queue grows without
/// end (2 GiB in a few seconds, measured). A hold leaves at most a window or two kept.
const KEPT_LIMIT: u64 = 64 << 20;
/// How often a detached flow waiting for its kept bytes counts them against [`KEPT_LIMIT`].
const KEPT_POLL: Duration = Duration::from_millis(10);
/// The redirect backlog gives no wakeup when it empties, so its drain is polled, backing
/// off from the first value to the second.
const BACKLOG_POLL: (Duration, Duration) = (Duration::from_millis(1), Duration::from_millis(16));

/// A connection the kernel data plane would not take, with its sockets when they can
/// still be relayed in userspace.
pub struct Declined {
    pub sockets: Option<(TcpStream, TcpStream)>,
    pub reason: KernelRelayError,
}

impl Declined {
    fn intact(client: TcpStream, upstream: TcpStream, reason: KernelRelayError) -> Self {
        Self {
            sockets: Some((client, upstream)),
            reason,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KernelRelayError {
    #[error("socket cannot join the sockhash: {0}")]
    Insert(io::Error),
    #[error("socket is not established (a FIN or RST already arrived)")]
    NotEstablished,
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// One socket of a kernel-mode connection.
struct Side {
    stream: TcpStream,
    cookie: u64,
    signals: std::sync::Arc<SocketSignals>,
    in_map: bool,
    /// Sequence number of the first byte userspace has not read, when it read any before
    /// the socket joined the map.
    unread_from: Option<u32>,
    /// Optional epoll interest (READABLE/WRITABLE) wanted by the two flows touching it.
    interest: AtomicU32,
    /// Bytes userspace moved from this socket to its peer.
    moved: AtomicU64,
    /// The peer's queued total (bytes acked + SIOCOUTQ) when it joined the map, plus every
    /// byte userspace wrote into it since: with the program's redirected bytes, what the
    /// peer's TCP stack should have counted once the redirect backlog is empty.
    peer_userspace: AtomicU64,
    /// The checkpoint published for this socket's flow (see FlowControl).
    checkpoint: AtomicU64,
    /// Check requests of this socket's flow that userspace has answered.
    checks_done: AtomicU32,
    /// Bytes the program kept on this socket (while detached) that userspace moved on.
    passed_moved: AtomicU64,
    /// The SO_SNDBUF this socket has now, sized by how fast it drains as a destination.
    send_buffer: AtomicU32,
    /// This socket's tcpi_bytes_acked, and the coarse monotonic time, at the last backlog
    /// check of the flow into it: where its next drain rate is measured from.
    drained_mark: AtomicU64,
    drained_mark_ns: AtomicU64,
    /// The flow's record as the program left it once userspace saw its source's EOF: no
    /// segment comes after a FIN, so it no longer changes and is not read again.
    last_state: OnceLock<FlowState>,
}

/// A connection whose sockets are (being) put into the maps; Drop takes every trace out.
struct KernelConnection<'a> {
    plane: &'a KernelDataPlane,
    client: Side,
    upstream: Side,
}

impl KernelDataPlane {
    /// Relays one connection in the kernel. Gives the sockets back untouched when they
    /// cannot join the map at all, so the caller can relay them in userspace instead.
    /// `read_before`: userspace has read from the sockets, so the program must be told where
    /// their unread bytes begin (see `join_maps`).
    pub async fn relay(
        &self,
        client: TcpStream,
        upstream: TcpStream,
        supervision: &Supervision,
        read_before: bool,
    ) -> Result<Result<Transfer, FlowError>, Declined> {
        let connection = self
            .join_maps(client, upstream, read_before)
            .inspect_err(|declined| {
            let total = self.fallbacks.fetch_add(1, Ordering::Relaxed) + 1;
            // A FIN that beat the setup is routine; a map that refuses entries is news,
            // worth a line a minute at most.
            if matches!(declined.reason, KernelRelayError::NotEstablished) {
                return;
            }
            if once_a_minute(&self.declined_warned_ns) {
                warn!(
                    "kernel maps declined a connection ({}): relaying it in userspace ({total} fallbacks so far; next notice in a minute at the earliest)",
                    declined.reason
                );
            }
        })?;
        Ok(connection.run(supervision).await)
    }

    fn join_maps(
        &self,
        client: TcpStream,
        upstream: TcpStream,
        read_before: bool,
    ) -> Result<KernelConnection<'_>, Declined> {
        // One TCP_INFO per socket gives both its state and its acked bytes.
        let established_queued_total = |stream: &TcpStream| {
            let info = sys::tcp_info(stream)?;
            if info.state != sys::TCP_ESTABLISHED {
                return Err(KernelRelayError::NotEstablished);
            }
            Ok(info.bytes_acked + sys::unacked_or_unsent(stream)?)
        };
        // The program is handed whole segments, and after userspace has read, the first one
        // may begin with bytes already read: a segment TCP merged new bytes into while it was
        // half read, or a retransmission. Starting from the next unread byte's sequence
        // number, the program trims them off.
        let unread_from = |stream: &TcpStream| {
            read_before
                .then(|| sys::next_unread_sequence(stream))
                .transpose()
        };
        let prepared = (|| {
            Ok((
                sys::socket_cookie(&client)?,
                sys::socket_cookie(&upstream)?,
                established_queued_total(&client)?,
                established_queued_total(&upstream)?,
                unread_from(&client)?,
                unread_from(&upstream)?,
            ))
        })();
        let (
            client_cookie,
            upstream_cookie,
            client_queued,
            upstream_queued,
            client_seq,
            upstream_seq,
        ) = match prepared {
            Ok(v) => v,
            Err(e) => return Err(Declined::intact(client, upstream, e)),
        };
        // Watch first: notifications can come the moment a socket is in the map.
        let client_signals = match self.watcher.watch(client_cookie, client.as_raw_fd()) {
            Ok(signals) => signals,
            Err(e) => return Err(Declined::intact(client, upstream, e.into())),
        };
        let upstream_signals = match self.watcher.watch(upstream_cookie, upstream.as_raw_fd()) {
            Ok(signals) => signals,
            Err(e) => {
                self.watcher.unwatch(client_cookie, client.as_raw_fd());
                return Err(Declined::intact(client, upstream, e.into()));
            }
        };
        let side = |stream, cookie, signals, peer_queued, unread_from| Side {
            stream,
            cookie,
            signals,
            in_map: false,
            unread_from,
            interest: AtomicU32::new(0),
            moved: AtomicU64::new(0),
            peer_userspace: AtomicU64::new(peer_queued),
            checkpoint: AtomicU64::new(0),
            checks_done: AtomicU32::new(0),
            passed_moved: AtomicU64::new(0),
            send_buffer: AtomicU32::new(SEND_BUFFER as u32),
            drained_mark: AtomicU64::new(0),
            drained_mark_ns: AtomicU64::new(sys::monotonic_coarse_ns()),
            last_state: OnceLock::new(),
        };
        let client_side = side(
            client,
            client_cookie,
            client_signals,
            upstream_queued,
            client_seq,
        );
        let upstream_side = side(
            upstream,
            upstream_cookie,
            upstream_signals,
            client_queued,
            upstream_seq,
        );
        let mut connection = KernelConnection {
            plane: self,
            client: client_side,
            upstream: upstream_side,
        };
        // Flow entries exist before either socket can run the program.
        if let Err(e) = connection.install_flows() {
            return Err(connection.give_back(KernelRelayError::Io(e)));
        }
        // Fixed buffers: the receive buffer bounds the window a throttled sender may still
        // fill, whatever tcp_rmem lets autotuning reach; the send buffer bridges the redirect
        // worker's retry delay. Then hold the upstream's arriving bytes in its receive queue
        // until the client is in the map too, so no redirect finds its peer missing (the
        // client joins second, when its peer is already there).
        let prepared = [&connection.client.stream, &connection.upstream.stream]
            .into_iter()
            .try_for_each(|stream| {
                // Only autotuning before the insert lowers the clamp; a fresh socket's
                // already spans the buffer.
                if read_before {
                    restore_receive_buffer(stream)?;
                } else {
                    sys::set_receive_buffer(stream, RECEIVE_BUFFER)?;
                }
                sys::set_send_buffer(stream, SEND_BUFFER)
            })
            .and_then(|()| sys::set_receive_low_water(&connection.upstream.stream, HOLD_LOW_WATER));
        if let Err(e) = prepared {
            return Err(connection.give_back(KernelRelayError::Io(e)));
        }
        // The upstream goes first; if it cannot join, nothing is in the map and userspace
        // takes the whole connection. If only the client cannot, the upstream's flow
        // detaches (its peer is missing) and userspace moves both directions' bytes.
        if let Err(e) = connection.insert(true) {
            return Err(connection.give_back(e));
        }
        if let Err(e) = connection.insert(false) {
            debug!("client socket stays out of the map, its bytes move in userspace: {e}");
        }
        // Setting the mark runs data-ready, which hands every byte that arrived before the
        // insert to the program, in order: for the upstream this releases the hold, for the
        // client (whose mark is already 1) it is the wakeup those bytes would otherwise wait
        // for until more arrive.
        for side in [&connection.upstream, &connection.client] {
            // Also for a socket outside the map: its readiness depends on the mark too.
            if let Err(e) = sys::set_receive_low_water(&side.stream, 1) {
                debug!("could not release the receive queue: {e}");
            }
        }
        Ok(connection)
    }
}

impl KernelConnection<'_> {
    fn install_flows(&self) -> io::Result<()> {
        let flow = |from: &Side, to: &Side| {
            let state = match from.unread_from {
                Some(next_seq) => FlowState {
                    next_seq,
                    seq_state: SEQ_TRACKED,
                    ..FlowState::default()
                },
                None => FlowState::default(),
            };
            let control = FlowControl {
                peer_cookie: to.cookie,
                ..FlowControl::default()
            };
            (state, control)
        };
        self.plane.maps.install(
            [self.client.cookie, self.upstream.cookie],
            [
                flow(&self.client, &self.upstream),
                flow(&self.upstream, &self.client),
            ],
        )
    }

    fn insert(&mut self, upstream: bool) -> Result<(), KernelRelayError> {
        let side = if upstream {
            &mut self.upstream
        } else {
            &mut self.client
        };
        self.plane
            .maps
            .insert_socket(side.cookie, side.stream.as_fd())
            .map_err(KernelRelayError::Insert)?;
        side.in_map = true;
        Ok(())
    }

    /// Undoes the setup of a connection none of whose sockets joined the map, handing the
    /// sockets back (as duplicates, since this connection's Drop closes its own fds).
    fn give_back(self, reason: KernelRelayError) -> Declined {
        // The sockets outlive this connection (as duplicates): take them out by hand.
        self.remove_traces(false);
        for side in [&self.client, &self.upstream] {
            // Userspace readiness depends on the low-water mark: undo the setup's hold.
            let _ = sys::set_receive_low_water(&side.stream, 1);
        }
        let sockets = self
            .client
            .stream
            .try_clone()
            .and_then(|client| Ok((client, self.upstream.stream.try_clone()?)))
            .ok();
        Declined { sockets, reason }
    }

    /// Deletes the flow records and forgets the sockets' signals. Closing a socket takes it
    /// out of the sockhash and the watcher's epoll set by itself, so those two are removed
    /// here only when the sockets stay open (`closing` false): two syscalls per socket
    /// saved on every connection's teardown.
    fn remove_traces(&self, closing: bool) {
        let maps = &self.plane.maps;
        let sides = [&self.client, &self.upstream];
        for side in sides {
            if side.in_map && !closing {
                // Removing the socket first stops the program from running for it.
                let _ = maps.remove_socket(side.cookie);
            }
        }
        // A packet between this and the close finds no flow: the program keeps it on the
        // socket (SK_PASS), as it would for a socket out of the map.
        if let Err(e) = maps.remove_flows(&sides.map(|side| side.cookie)) {
            warn!("could not delete a connection's flow records: {e}");
        }
        for side in sides {
            if closing {
                self.plane.watcher.forget(side.cookie);
            } else {
                self.plane
                    .watcher
                    .unwatch(side.cookie, side.stream.as_raw_fd());
            }
        }
    }

    async fn run(self, supervision: &Supervision) -> Result<Transfer, FlowError> {
        let mut watchdog = Watchdog::new(supervision);
        let mut ticker = watchdog.ticker();
        let mut deliveries = Deliveries::default();
        let result = {
            let to_upstream = self.run_flow(&self.client, &self.upstream);
            let to_client = self.run_flow(&self.upstream, &self.client);
            tokio::pin!(to_upstream, to_client);
            let (mut up_done, mut down_done) = (false, false);
            loop {
                tokio::select! {
                    r = &mut to_upstream, if !up_done => match r {
                        Ok(()) => { up_done = true; watchdog.one_side_done(); }
                        Err(e) => break Err(e.towards_upstream()),
                    },
                    r = &mut to_client, if !down_done => match r {
                        Ok(()) => { down_done = true; watchdog.one_side_done(); }
                        Err(e) => break Err(e.towards_client()),
                    },
                    _ = ticker.tick() => {
                        let Activity { transfer, .. } = self.activity();
                        let idle_for = deliveries.idle_for(&self.client.stream, &self.upstream.stream);
                        if let Err(expiry) = watchdog.check(transfer, Some(idle_for)) {
                            break Err(FlowError::Expired(expiry));
                        }
                    }
                }
                if up_done && down_done {
                    break Ok(());
                }
            }
        };
        let Activity {
            transfer,
            trimmed,
            detached,
            resumed,
        } = self.activity();
        watchdog.report(transfer);
        self.plane.detached.fetch_add(detached, Ordering::Relaxed);
        self.plane.resumed.fetch_add(resumed, Ordering::Relaxed);
        if trimmed > 0 {
            self.plane.trimmed.fetch_add(trimmed, Ordering::Relaxed);
            debug!("the program trimmed {trimmed} repeated bytes off retransmitted segments");
        }
        if let Err(e) = &result {
            e.propagate_reset(&self.client.stream, &self.upstream.stream);
        }
        result.map(|()| transfer)
    }

    /// What the program counted for both flows, plus what userspace moved: one map read
    /// per flow.
    fn activity(&self) -> Activity {
        let (client, upstream) = (self.state(&self.client), self.state(&self.upstream));
        let transfer = Transfer {
            client_to_upstream: client.redirected_bytes + self.client.moved.load(Ordering::Acquire),
            upstream_to_client: upstream.redirected_bytes
                + self.upstream.moved.load(Ordering::Acquire),
        };
        Activity {
            transfer,
            trimmed: client.trimmed_bytes + upstream.trimmed_bytes,
            detached: u64::from(client.detachments) + u64::from(upstream.detachments),
            resumed: u64::from(client.resumptions) + u64::from(upstream.resumptions),
        }
    }

    /// Carries one direction until its source's EOF has reached the destination.
    async fn run_flow(&self, from: &Side, to: &Side) -> Result<(), LocalFlowError> {
        if !from.in_map {
            return self.copy_rest_in_userspace(from, to).await;
        }
        let mut audit = tokio::time::interval(AUDIT_PERIOD);
        audit.reset();
        let mut resumed = false;
        loop {
            // Back from userspace: look at the flow again before waiting for anything.
            let events = if std::mem::take(&mut resumed) {
                NOTIFIED
            } else {
                tokio::select! {
                    events = from.signals.read_events() => events,
                    _ = audit.tick() => NOTIFIED,
                }
            };
            if events & ERROR != 0 {
                return Err(LocalFlowError::Source(socket_error(&from.stream)));
            }
            // The FIN runs data-ready, which hands the program everything queued before it;
            // the barrier waits for that to finish, so the record read next is complete.
            if events & HANGUP != 0 {
                sys::socket_barrier(&from.stream).map_err(LocalFlowError::Source)?;
            }
            let state = self.state(from);
            if state.seq_state == FLOW_BROKEN {
                return Err(LocalFlowError::Source(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "a retransmitted segment repeats relayed bytes and could not be trimmed: reset rather than repeat or lose a byte",
                )));
            }
            if state.detached != 0 {
                debug!(
                    "a flow left the kernel after {} bytes: its backlog bound passed the hard limit, or its peer left the map",
                    state.redirected_bytes
                );
                match self.move_kept_bytes(from, to).await? {
                    Kept::Ended => return Ok(()),
                    Kept::Resumed => {
                        resumed = true;
                        continue;
                    }
                }
            }
            if state.checks_requested != from.checks_done.load(Ordering::Acquire) {
                self.check_backlog(from, to, state.checks_requested).await?;
            }
            if events & HANGUP != 0 {
                if self.reached_end(from, to).await? {
                    // Read after the barrier, with the flow still attached: final.
                    let _ = from.last_state.set(state);
                    self.wait_for_peer_backlog(from, to, 0).await?;
                    sys::shutdown_write(&to.stream).map_err(LocalFlowError::Destination)?;
                    return Ok(());
                }
                // The flow may have detached on its last segments: look again at once.
                resumed = true;
            }
        }
    }

    /// Answers the program's request: measures the destination's backlog, throttles the
    /// sender from half the limit on, then publishes the checkpoint the measurement gives,
    /// so the program asks again once the backlog could have reached the limit.
    async fn check_backlog(
        &self,
        from: &Side,
        to: &Side,
        requested: u32,
    ) -> Result<(), LocalFlowError> {
        let mut measured = self.peer_backlog(from, to)?;
        // By its drain rate, not its backlog: a fast destination's backlog swings by
        // megabytes while the redirect worker waits out a jiffy.
        self.fit_send_buffer(to, measured.acked)?;
        if measured.backlog >= self.plane.backlog_limit / 2 {
            measured = self.throttle(from, to).await?;
        }
        from.checks_done.store(requested, Ordering::Release);
        self.publish_checkpoint(from, &measured)
    }

    /// Publishes what `measured` shows has left the backlog, so that the program's bound
    /// starts again from the backlog as measured (it can only count more than the truth).
    fn publish_checkpoint(&self, from: &Side, measured: &Backlog) -> Result<(), LocalFlowError> {
        from.checkpoint.store(
            measured.redirected.saturating_sub(measured.backlog),
            Ordering::Release,
        );
        self.publish_control(from)
    }

    /// Holds the sender back until the destination has taken most of the backlog. A minimal
    /// receive buffer leaves no free space to advertise, so the sender stops once the
    /// window already granted is used (a window never shrinks). Unlike TCP_WINDOW_CLAMP,
    /// this leaves rcv_ssthresh alone, so the full window is back as soon as the buffer
    /// (and the clamp, see `restore_receive_buffer`) is: measured over loopback, 2.4 Gbit/s
    /// against 1.2 with the clamp. Returns the measurement that found the backlog drained.
    async fn throttle(&self, from: &Side, to: &Side) -> Result<Backlog, LocalFlowError> {
        sys::set_receive_buffer(&from.stream, 1).map_err(LocalFlowError::Source)?;
        let drained = self
            .wait_for_peer_backlog(from, to, self.plane.backlog_limit / 4)
            .await;
        restore_receive_buffer(&from.stream).map_err(LocalFlowError::Source)?;
        drained
    }

    /// After a FIN, and the barrier that found the flow still attached: true once every byte
    /// before it was redirected or moved on. Anything still readable was never handed to the
    /// program: move it on, in order.
    async fn reached_end(&self, from: &Side, to: &Side) -> Result<bool, LocalFlowError> {
        let mut buf = vec![0u8; MOVE_BUFFER];
        loop {
            match sys::recv_nonblocking(&from.stream, &mut buf) {
                Ok(0) => return Ok(true),
                Ok(n) => {
                    self.wait_for_peer_backlog(from, to, 0).await?;
                    self.forward_moved(from, to, &buf[..n]).await?;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(LocalFlowError::Source(e)),
            }
        }
    }

    /// Moves the bytes the program keeps on a detached flow's socket, each behind everything
    /// redirected before it, until EOF or until the program redirects again, which it does
    /// at the first segment after userspace has written every kept byte into the
    /// destination (`passed_moved`, published with each chunk). The sender is held back
    /// meanwhile (see `hold_sender`; each chunk consumed comes off the receive buffer too, so
    /// the window stays closed), or one that never pauses would keep userspace behind for
    /// good. Each chunk is peeked, written and published before it is consumed: consuming
    /// the last one is what opens the window again, so the sender's next segment finds the
    /// program ready to resume. Past [`KEPT_LIMIT`] kept bytes unmoved, the connection is
    /// reset.
    async fn move_kept_bytes(&self, from: &Side, to: &Side) -> Result<Kept, LocalFlowError> {
        tokio::select! {
            kept = self.move_kept_bytes_unguarded(from, to) => kept,
            overflow = self.kept_overflow(from) => Err(overflow),
        }
    }

    async fn move_kept_bytes_unguarded(
        &self,
        from: &Side,
        to: &Side,
    ) -> Result<Kept, LocalFlowError> {
        self.want(from, READABLE, true)?;
        // A peer outside the map could take no redirect: stay in userspace, unheld. Held, the
        // receive buffer the sender is held to.
        let mut held = if to.in_map {
            Some(hold_sender(&from.stream).map_err(LocalFlowError::Source)?)
        } else {
            None
        };
        let mut buf = vec![0u8; MOVE_BUFFER];
        let kept = loop {
            match sys::peek_nonblocking(&from.stream, &mut buf) {
                Ok(0) if self.kept_in_backlog(from) => {
                    debug!("EOF read ahead of kept bytes in the psock backlog: waiting for them");
                    // Not the end yet: the worker's delivery wakes this socket.
                    self.wait_readable(from).await?;
                }
                Ok(0) => {
                    // The flow may have resumed before its FIN: what it redirected since must
                    // be in the destination's queue first, or the shutdown fails its send.
                    self.wait_for_peer_backlog(from, to, 0).await?;
                    sys::shutdown_write(&to.stream).map_err(LocalFlowError::Destination)?;
                    break Kept::Ended;
                }
                Ok(n) => {
                    // Measured after the read: it counts every redirect before these bytes.
                    let measured = self.wait_for_peer_backlog(from, to, 0).await?;
                    self.forward_moved(from, to, &buf[..n]).await?;
                    let moved = from.passed_moved.fetch_add(n as u64, Ordering::AcqRel) + n as u64;
                    if to.in_map {
                        // The last byte kept: let the window open as it is consumed. More
                        // kept since it opened: hold the sender again. Still held: take
                        // what is consumed off the buffer too, or the window opens by it.
                        let caught_up = self.state(from).passed_bytes == moved;
                        if caught_up {
                            if held.take().is_some() {
                                restore_receive_buffer(&from.stream)
                                    .map_err(LocalFlowError::Source)?;
                            }
                        } else {
                            let buffer = match held {
                                Some(buffer) => buffer,
                                None => {
                                    hold_sender(&from.stream).map_err(LocalFlowError::Source)?
                                }
                            };
                            let smaller = buffer.saturating_sub(n as u32);
                            sys::set_receive_buffer_total(&from.stream, smaller)
                                .map_err(LocalFlowError::Source)?;
                            held = Some(smaller);
                        }
                        self.publish_checkpoint(from, &measured)?;
                    }
                    consume(&from.stream, &mut buf[..n]).map_err(LocalFlowError::Source)?;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if self.state(from).detached == 0 {
                        break Kept::Resumed;
                    }
                    self.wait_readable(from).await?;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(LocalFlowError::Source(e)),
            }
        };
        if held.is_some() {
            restore_receive_buffer(&from.stream).map_err(LocalFlowError::Source)?;
        }
        self.want(from, READABLE, false)?;
        Ok(kept)
    }

    /// Waits for the next read-side event on `from`; a socket error ends the flow.
    async fn wait_readable(&self, from: &Side) -> Result<(), LocalFlowError> {
        let events = from.signals.read_events().await;
        if events & ERROR != 0 {
            return Err(LocalFlowError::Source(socket_error(&from.stream)));
        }
        Ok(())
    }

    /// Returns once more than [`KEPT_LIMIT`] kept bytes wait in the kernel, unmoved: they
    /// are charged to no buffer there, so nothing else would stop them growing.
    async fn kept_overflow(&self, from: &Side) -> LocalFlowError {
        let mut poll = tokio::time::interval(KEPT_POLL);
        loop {
            poll.tick().await;
            let waiting = self
                .state(from)
                .passed_bytes
                .saturating_sub(from.passed_moved.load(Ordering::Acquire));
            if waiting > KEPT_LIMIT {
                let total = self.plane.kept_resets.fetch_add(1, Ordering::Relaxed) + 1;
                if once_a_minute(&self.plane.kept_reset_warned_ns) {
                    warn!(
                        "reset a connection one of whose ends sent {} MiB that waited in the kernel while the other read nothing ({total} such resets so far; next notice in a minute at the earliest)",
                        waiting >> 20
                    );
                }
                return LocalFlowError::Source(io::Error::other(format!(
                    "{} MiB from this side wait in the kernel for a destination that reads nothing (the limit is {} MiB): reset rather than hold more",
                    waiting >> 20,
                    KEPT_LIMIT >> 20
                )));
            }
        }
    }

    /// Whether kept bytes wait in the source's psock backlog rather than its queue. A kept
    /// segment that finds bytes redirected to this socket queued there, or that does not fit
    /// the held receive buffer, is deferred to the psock's worker, which retries a jiffy
    /// later (net/core/skmsg.c, sk_psock_backlog);
    /// meanwhile, once the FIN is in, a read reports EOF past it (tcp_bpf_recvmsg_parser sees
    /// no message and RCV_SHUTDOWN). Every byte the program kept has been moved only when
    /// the counts match.
    fn kept_in_backlog(&self, from: &Side) -> bool {
        self.state(from).passed_bytes > from.passed_moved.load(Ordering::Acquire)
    }

    /// The rest of a direction whose source is outside the map or detached from it: every
    /// byte is read by userspace, behind whatever was redirected before.
    async fn copy_rest_in_userspace(&self, from: &Side, to: &Side) -> Result<(), LocalFlowError> {
        self.want(from, READABLE, true)?;
        // Nothing from this source is redirected any more: once the backlog is in the
        // destination's queue, every write from here goes behind it.
        self.wait_for_peer_backlog(from, to, 0).await?;
        let mut buf = vec![0u8; MOVE_BUFFER];
        loop {
            match sys::recv_nonblocking(&from.stream, &mut buf) {
                Ok(0) => break,
                Ok(n) => self.forward_moved(from, to, &buf[..n]).await?,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.wait_readable(from).await?,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(LocalFlowError::Source(e)),
            }
        }
        sys::shutdown_write(&to.stream).map_err(LocalFlowError::Destination)
    }

    /// Writes bytes userspace read from `from` to `to`; the caller has made sure every
    /// redirected byte is already in `to`'s write queue.
    async fn forward_moved(
        &self,
        from: &Side,
        to: &Side,
        bytes: &[u8],
    ) -> Result<(), LocalFlowError> {
        self.write_all(to, bytes).await?;
        from.moved.fetch_add(bytes.len() as u64, Ordering::AcqRel);
        from.peer_userspace
            .fetch_add(bytes.len() as u64, Ordering::AcqRel);
        Ok(())
    }

    fn publish_control(&self, from: &Side) -> Result<(), LocalFlowError> {
        let control = FlowControl {
            peer_cookie: self.peer_of(from).cookie,
            checkpoint_bytes: from.checkpoint.load(Ordering::Acquire),
            checks_done: from.checks_done.load(Ordering::Acquire),
            _padding: 0,
            passed_moved: from.passed_moved.load(Ordering::Acquire),
        };
        self.plane
            .maps
            .publish(from.cookie, &control)
            .map_err(LocalFlowError::Source)
    }

    fn peer_of(&self, side: &Side) -> &Side {
        if side.cookie == self.client.cookie {
            &self.upstream
        } else {
            &self.client
        }
    }

    /// Sizes `to`'s send buffer by its drain rate over the last [`SEND_BUFFER_SPAN`] or more
    /// (checks closer together add to one measurement, so a burst between two checks is no
    /// sample): a fast destination then bridges the redirect worker's retry delay, a slow
    /// one holds no more than before.
    fn fit_send_buffer(&self, to: &Side, acked: u64) -> Result<(), LocalFlowError> {
        let now = sys::monotonic_coarse_ns();
        let since_ns = now.saturating_sub(to.drained_mark_ns.load(Ordering::Acquire));
        let span_ns = SEND_BUFFER_SPAN.as_nanos() as u64;
        if since_ns < span_ns {
            return Ok(());
        }
        to.drained_mark_ns.store(now, Ordering::Release);
        let drained = acked.saturating_sub(to.drained_mark.swap(acked, Ordering::AcqRel));
        let current = to.send_buffer.load(Ordering::Acquire) as libc::c_int;
        if let Some(bytes) = resized_send_buffer(current, drained, since_ns) {
            sys::set_send_buffer(&to.stream, bytes).map_err(LocalFlowError::Destination)?;
            to.send_buffer.store(bytes as u32, Ordering::Release);
        }
        Ok(())
    }

    /// The program's redirected count for `from`, how many bytes redirected towards `to`
    /// are not yet in its TCP write queue (the redirect backlog) as of that count, and how
    /// many `to` has had acknowledged.
    fn peer_backlog(&self, from: &Side, to: &Side) -> Result<Backlog, LocalFlowError> {
        let redirected = self.state(from).redirected_bytes;
        let expected = from.peer_userspace.load(Ordering::Acquire) + redirected;
        let (acked, unacked) =
            sys::acked_and_queued(&to.stream).map_err(LocalFlowError::Destination)?;
        Ok(Backlog {
            redirected,
            backlog: expected.saturating_sub(acked + unacked),
            acked,
        })
    }

    /// Waits until at most `allowed` bytes redirected towards `to` are still outside its TCP
    /// write queue (0: every one of them is in it, so a write from userspace goes behind).
    /// Returns that measurement.
    async fn wait_for_peer_backlog(
        &self,
        from: &Side,
        to: &Side,
        allowed: u64,
    ) -> Result<Backlog, LocalFlowError> {
        let mut delay = BACKLOG_POLL.0;
        loop {
            let measured = self.peer_backlog(from, to)?;
            if measured.backlog <= allowed {
                return Ok(measured);
            }
            // Bytes keep arriving while a throttled sender uses the window it was granted:
            // without a fresh checkpoint the program would count them against the old one,
            // and a wait longer than the hard limit's worth would detach a flow whose
            // destination is keeping up.
            self.publish_checkpoint(from, &measured)?;
            // A reset destination discards its backlog: it will never catch up.
            if sys::tcp_info(&to.stream)
                .map_err(LocalFlowError::Destination)?
                .state
                == TCP_CLOSE
            {
                return Err(LocalFlowError::Destination(io::Error::from(
                    io::ErrorKind::ConnectionReset,
                )));
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(BACKLOG_POLL.1);
        }
    }

    async fn write_all(&self, to: &Side, mut bytes: &[u8]) -> Result<(), LocalFlowError> {
        while !bytes.is_empty() {
            match sys::send_nonblocking(&to.stream, bytes) {
                Ok(n) => bytes = &bytes[n..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.want(to, WRITABLE, true)?;
                    let events = to.signals.write_events().await;
                    self.want(to, WRITABLE, false)?;
                    if events & ERROR != 0 {
                        return Err(LocalFlowError::Destination(socket_error(&to.stream)));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(LocalFlowError::Destination(e)),
            }
        }
        Ok(())
    }

    fn want(&self, side: &Side, bits: u32, on: bool) -> Result<(), LocalFlowError> {
        let old = if on {
            side.interest.fetch_or(bits, Ordering::AcqRel)
        } else {
            side.interest.fetch_and(!bits, Ordering::AcqRel)
        };
        let new = if on { old | bits } else { old & !bits };
        if new == old {
            return Ok(());
        }
        self.plane
            .watcher
            .set_interest(side.cookie, side.stream.as_raw_fd(), new)
            .map_err(LocalFlowError::Source)
    }

    fn state(&self, side: &Side) -> FlowState {
        if let Some(last) = side.last_state.get() {
            return *last;
        }
        // A missing entry reads as zeros: only possible for a flow already torn down.
        self.plane.maps.state(side.cookie).unwrap_or_default()
    }
}

impl Drop for KernelConnection<'_> {
    fn drop(&mut self) {
        // The streams close right after this, with the connection's fields.
        self.remove_traces(true);
    }
}

/// True at most once per [`WARNING_EVERY`] for one `last` (coarse monotonic ns of the last
/// true; 0: never), however many tasks ask.
fn once_a_minute(last: &AtomicU64) -> bool {
    let now = sys::monotonic_coarse_ns();
    let then = last.load(Ordering::Relaxed);
    (then == 0 || now.saturating_sub(then) >= WARNING_EVERY.as_nanos() as u64)
        && last
            .compare_exchange(then, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
}

/// Holds a sender back without dropping what it already has in flight, and returns the
/// receive buffer (as the kernel counts it) the socket is held to. A buffer cut below what
/// then arrives drops those segments, and TCP answers with a zero window behind them; since
/// Linux 6.17 (tcp_sequence) every later segment of the peer lies beyond that window and is
/// dropped unread, window updates included, so this socket's own sending stalls until its
/// window opens: two holds on one connection then wait on each other for good. So the
/// buffer is cut to what is queued, plus twice the window last advertised (room for the
/// true size of what may still arrive): nothing offered is dropped, and once it is in, no
/// more is offered than that room.
fn hold_sender(stream: &TcpStream) -> io::Result<u32> {
    let memory = sys::receive_memory(stream)?;
    // Without tcpi_rcv_wnd, keep the buffer: the window closes as the queue fills it.
    let in_flight = sys::tcp_info(stream)?
        .receive_window
        .map_or(memory.buffer, |window| window.saturating_mul(2));
    let buffer = memory.used.saturating_add(in_flight).min(memory.buffer);
    sys::set_receive_buffer_total(stream, buffer)?;
    Ok(buffer)
}

/// The full receive buffer again, and the window clamp lifted, after anything that may have
/// lowered it: a cut buffer (the throttle, `hold_sender`) or autotuning before the insert.
/// A segment longer than any before, arriving with a new length-to-truesize ratio, sets the
/// clamp to the window of the buffer at that moment (net/ipv4/tcp_input.c,
/// tcp_measure_rcv_mss), and a larger SO_RCVBUF later does not raise it. Pinned at a cut
/// buffer's window, below one MSS, the sender's segments never grow past it again and the
/// connection crawls for good.
fn restore_receive_buffer(stream: &TcpStream) -> io::Result<()> {
    sys::set_receive_buffer(stream, RECEIVE_BUFFER)?;
    sys::set_window_clamp(stream, 2 * RECEIVE_BUFFER)
}

/// The SO_SNDBUF for a destination that drained `drained` bytes in `since_ns`, if it should
/// change from `current`: what it drains per [`SEND_BUFFER_SPAN`], within
/// [`SEND_BUFFER`]..=[`SEND_BUFFER_MAX`]. It grows at once and shrinks only on a clear fall,
/// so a noisy rate costs no syscalls.
fn resized_send_buffer(current: libc::c_int, drained: u64, since_ns: u64) -> Option<libc::c_int> {
    let span_ns = SEND_BUFFER_SPAN.as_nanos();
    let wanted = (u128::from(drained) * span_ns / u128::from(since_ns.max(1)))
        .clamp(SEND_BUFFER as u128, SEND_BUFFER_MAX as u128) as libc::c_int;
    (wanted > current || wanted < current / 2).then_some(wanted)
}

/// A connection's progress as the program counted it (see `activity`).
struct Activity {
    /// Bytes each way, redirected or moved by userspace.
    transfer: Transfer,
    /// Repeated heads of retransmitted segments trimmed, both ways.
    trimmed: u64,
    /// Times either flow left the kernel, and came back.
    detached: u64,
    resumed: u64,
}

/// When a peer last acknowledged a byte the relay sent it: what idle means in kernel mode.
/// The program's counts (and its `last_active_ns`) say what arrived and was handed to the
/// other socket's queue; a client that stops reading still has bytes trickling into that
/// queue, but takes none, as the userspace planes' stalled writes show.
struct Deliveries {
    acked: (u64, u64),
    since: Instant,
}

impl Default for Deliveries {
    fn default() -> Self {
        Self {
            acked: (0, 0),
            since: Instant::now(),
        }
    }
}

impl Deliveries {
    fn idle_for(&mut self, client: &TcpStream, upstream: &TcpStream) -> Duration {
        let acked = |stream| sys::tcp_info(stream).map(|info| info.bytes_acked);
        let (Ok(client), Ok(upstream)) = (acked(client), acked(upstream)) else {
            // A socket that cannot say is failing; its flow reports the error.
            return Duration::ZERO;
        };
        if (client, upstream) != self.acked {
            self.acked = (client, upstream);
            self.since = Instant::now();
        }
        self.since.elapsed()
    }
}

/// How [`KernelConnection::move_kept_bytes`] ended.
enum Kept {
    /// EOF came, and the destination's write side is shut.
    Ended,
    /// The program redirects this flow's bytes again.
    Resumed,
}

/// One measurement of a flow's destination (see `peer_backlog`).
struct Backlog {
    redirected: u64,
    backlog: u64,
    acked: u64,
}

/// TCP_CLOSE from include/net/tcp_states.h.
const TCP_CLOSE: u8 = 7;

/// Takes `peeked.len()` bytes, already peeked into `peeked`, off the socket.
fn consume(stream: &TcpStream, peeked: &mut [u8]) -> io::Result<()> {
    let mut left = peeked.len();
    while left > 0 {
        match sys::recv_nonblocking(stream, &mut peeked[..left]) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => left -= n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn socket_error(stream: &TcpStream) -> io::Error {
    match stream.take_error() {
        Ok(Some(e)) => e,
        Ok(None) => io::Error::from(io::ErrorKind::ConnectionReset),
        Err(e) => e,
    }
}

/// Which socket of a flow failed; mapped to client/upstream by the connection.
enum LocalFlowError {
    Source(io::Error),
    Destination(io::Error),
}

impl LocalFlowError {
    fn towards_upstream(self) -> FlowError {
        match self {
            Self::Source(e) => FlowError::Client(e),
            Self::Destination(e) => FlowError::Upstream(e),
        }
    }

    fn towards_client(self) -> FlowError {
        match self {
            Self::Source(e) => FlowError::Upstream(e),
            Self::Destination(e) => FlowError::Client(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPAN_NS: u64 = SEND_BUFFER_SPAN.as_nanos() as u64;

    #[test]
    fn a_slow_destination_keeps_the_base_send_buffer() {
        // 64 KiB/s, or nothing at all.
        assert_eq!(
            resized_send_buffer(SEND_BUFFER, 64 << 10, 1_000_000_000),
            None
        );
        assert_eq!(resized_send_buffer(SEND_BUFFER, 0, SPAN_NS), None);
    }

    #[test]
    fn a_fast_destination_gets_what_it_drains_per_span_up_to_the_cap() {
        assert_eq!(
            resized_send_buffer(SEND_BUFFER, 24 << 20, SPAN_NS),
            Some(24 << 20)
        );
        // Twice the span at the same rate asks for the same size.
        assert_eq!(
            resized_send_buffer(SEND_BUFFER, 48 << 20, 2 * SPAN_NS),
            Some(24 << 20)
        );
        assert_eq!(
            resized_send_buffer(SEND_BUFFER, 1 << 30, SPAN_NS),
            Some(SEND_BUFFER_MAX)
        );
    }

    #[test]
    fn the_send_buffer_shrinks_only_on_a_clear_fall() {
        let current = 24 << 20;
        assert_eq!(resized_send_buffer(current, 16 << 20, SPAN_NS), None);
        assert_eq!(
            resized_send_buffer(current, 8 << 20, SPAN_NS),
            Some(8 << 20)
        );
        // A destination that stopped falls back to the base, never below it.
        assert_eq!(resized_send_buffer(current, 0, SPAN_NS), Some(SEND_BUFFER));
    }

    /// Whether a sender has bytes waiting to be sent and none sent unacknowledged: it is
    /// stopped by the receiver's window, with everything it sent taken in (tcpi_unacked,
    /// tcpi_notsent_bytes).
    fn stopped_by_the_window(stream: &TcpStream) -> bool {
        let raw = sys::tcp_info_bytes(stream).unwrap();
        let at =
            |offset: usize| u32::from_ne_bytes(raw.get(offset, 4).unwrap().try_into().unwrap());
        at(sys::tcp_info_at::UNACKED) == 0 && at(sys::tcp_info_at::NOTSENT_BYTES) > 0
    }

    /// Polls `done` until it holds, for at most ten seconds.
    fn eventually(mut done: impl FnMut() -> bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if done() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    }

    #[test]
    fn a_restored_buffer_lifts_the_clamp_a_cut_one_pinned() {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut sender = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut receiver, _) = listener.accept().unwrap();
        sender.set_nodelay(true).unwrap();
        sys::set_receive_buffer(&receiver, RECEIVE_BUFFER).unwrap();
        // Cut as the throttle does, then segments that grow, each read before the next
        // is written so that each travels alone.
        sys::set_receive_buffer(&receiver, 1).unwrap();
        let mut buf = vec![0u8; 4096];
        for size in [600, 600, 1500, 1500, 2000, 2000] {
            sender.write_all(&buf[..size]).unwrap();
            receiver.read_exact(&mut buf[..size]).unwrap();
        }
        // Linux 6.18 pins the clamp here; a kernel that does not leaves nothing to lift.
        let pinned = sys::window_clamp(&receiver).unwrap();
        if pinned >= RECEIVE_BUFFER {
            eprintln!("this kernel left the clamp at {pinned} through the cut");
        }
        restore_receive_buffer(&receiver).unwrap();
        assert!(
            sys::window_clamp(&receiver).unwrap() >= RECEIVE_BUFFER,
            "the clamp stays at {pinned} after the buffer is restored"
        );
    }

    #[test]
    fn a_held_sender_stops_with_nothing_it_sent_dropped() {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let sender = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut receiver, _) = listener.accept().unwrap();
        sys::set_receive_buffer(&receiver, RECEIVE_BUFFER).unwrap();
        let writer = sender.try_clone().unwrap();
        let pushing = std::thread::spawn(move || {
            let chunk = vec![7u8; 1 << 20];
            while (&writer).write_all(&chunk).is_ok() {}
        });
        // Read while the sender runs at full speed, so megabytes are in flight at the hold.
        let mut buf = vec![0u8; MOVE_BUFFER];
        let mut read = 0;
        while read < 256 << 20 {
            read += receiver.read(&mut buf).unwrap();
        }
        let mut buffer = hold_sender(&receiver).unwrap();
        // Every segment in flight was taken in, and the sender stops with its window
        // closed. (A dropped segment stays unacknowledged: the receiver's zero window
        // refuses it again each time it is sent.)
        assert!(
            eventually(|| stopped_by_the_window(&sender)),
            "segments stay unacknowledged: the held receiver dropped them"
        );
        let held = sys::unread(&receiver).unwrap();
        assert!(held > 0);
        // Consuming with the buffer cut by as much keeps the window closed: the queue
        // empties instead of filling again behind what is read.
        let mut consumed = 0;
        while consumed < held / 2 {
            buffer = buffer.saturating_sub(MOVE_BUFFER as u32);
            sys::set_receive_buffer_total(&receiver, buffer).unwrap();
            consumed += receiver.read(&mut buf).unwrap();
        }
        let left = sys::unread(&receiver).unwrap();
        assert!(
            left < held - consumed / 2,
            "{held} bytes held, {consumed} consumed, {left} queued after"
        );
        sender.shutdown(std::net::Shutdown::Both).unwrap();
        drop(receiver);
        pushing.join().unwrap();
    }
}
