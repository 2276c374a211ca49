//! One connection in kernel mode, from setup to teardown. Both sockets join the sockhash
//! and the verdict program moves their bytes; userspace only steps in for what the kernel
//! does not do, one task per flow (`flow.rs`):
//! - a FIN or RST is never forwarded by the kernel: on EOF, wait until every redirected
//!   byte is in the peer's TCP write queue, then shut the peer's write side (shutting it
//!   earlier makes the queued redirects fail and drops them);
//! - redirects ignore the peer's send buffer: the program asks for checks, and userspace
//!   throttles the sender and sizes the peer's send buffer (`backpressure.rs`);
//! - a detached flow keeps its bytes on the receiving socket; userspace moves them, behind
//!   the peer's redirect backlog, until the program redirects again (`detached.rs`);
//! - idle is read off the peers' acknowledgements (`idle.rs`).

use std::{
    io,
    net::TcpStream,
    os::fd::{AsFd as _, AsRawFd},
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use proxy_common::{FlowState, SEQ_TRACKED};
use tracing::{debug, warn};

use super::{
    KernelDataPlane,
    backpressure::restore_receive_buffer,
    budget::{SEND_BUFFER_START, receive_buffer},
    flow::{Flow, FlowLabel, FlowLedger, Socket},
    idle::{Deliveries, PeerLook},
};
use crate::{
    memory::Holding,
    sys,
    transfer::{
        ConnectionError, Direction, Flows, Handover, Supervision, Transfer, Watchdog, drive_both,
    },
};

/// SO_RCVLOWAT during setup: above any window (the kernel caps it at half the largest
/// receive buffer), so data-ready, and with it the program, waits for the release.
const HOLD_LOW_WATER: libc::c_int = libc::c_int::MAX;

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

/// A connection whose sockets are (being) put into the maps; Drop takes every trace out.
pub(super) struct KernelConnection<'a> {
    pub plane: &'a KernelDataPlane,
    /// The connection's entry in the memory account: whether it is asked to throttle.
    pub holding: Arc<Holding>,
    client: Socket,
    upstream: Socket,
    to_upstream: FlowLedger,
    to_client: FlowLedger,
}

/// What setup needs of each socket before it builds the connection.
pub(super) struct Prepared {
    cookie: u64,
    /// Bytes acked (tcpi_bytes_acked) so far: where its drain rate is measured from.
    pub acked: u64,
    /// Bytes acked + SIOCOUTQ: what the socket's TCP stack has counted so far.
    pub queued: u64,
    unread_from: Option<u32>,
}

impl KernelDataPlane {
    /// Relays one connection in the kernel. Gives the sockets back untouched when they
    /// cannot join the map at all, so the caller can relay them in userspace instead.
    /// `handover`: whether userspace has read from the sockets, so that the program must be
    /// told where their unread bytes begin (see `join_maps`).
    pub async fn relay(
        &self,
        client: TcpStream,
        upstream: TcpStream,
        supervision: &Supervision,
        handover: Handover,
    ) -> Result<Result<Transfer, ConnectionError>, Declined> {
        let connection = self
            .join_maps(client, upstream, handover, label(supervision), &supervision.holding)
            .inspect_err(|declined| {
                let total = self.fallbacks.fetch_add(1, Ordering::Relaxed) + 1;
                // A FIN that beat the setup is routine; a map that refuses entries is news,
                // worth a line a minute at most.
                if matches!(declined.reason, KernelRelayError::NotEstablished) {
                    return;
                }
                if let Some(since) = self.declined_notice.count() {
                    warn!(
                        "kernel maps declined {since} connection(s) since the last notice, the latest because {}: relayed in userspace ({total} fallbacks in all; next notice in a minute at the earliest)",
                        declined.reason
                    );
                }
            })?;
        supervision.holding.set_in_kernel(true);
        Ok(connection.run(supervision).await)
    }

    fn join_maps(
        &self,
        client: TcpStream,
        upstream: TcpStream,
        handover: Handover,
        label: FlowLabel,
        holding: &Arc<Holding>,
    ) -> Result<KernelConnection<'_>, Declined> {
        let prepared = prepare(&client, handover)
            .and_then(|client_prepared| Ok((client_prepared, prepare(&upstream, handover)?)));
        let (client_prepared, upstream_prepared) = match prepared {
            Ok(v) => v,
            Err(e) => return Err(Declined::intact(client, upstream, e)),
        };
        // Watch first: notifications can come the moment a socket is in the map.
        let client_signals = match self
            .watcher
            .watch(client_prepared.cookie, client.as_raw_fd())
        {
            Ok(signals) => signals,
            Err(e) => return Err(Declined::intact(client, upstream, e.into())),
        };
        let upstream_signals = match self
            .watcher
            .watch(upstream_prepared.cookie, upstream.as_raw_fd())
        {
            Ok(signals) => signals,
            Err(e) => {
                self.watcher
                    .unwatch(client_prepared.cookie, client.as_raw_fd());
                return Err(Declined::intact(client, upstream, e.into()));
            }
        };
        let socket = |stream, cookie, signals| Socket {
            stream,
            cookie,
            signals,
            in_map: false,
            interest: AtomicU32::new(0),
            send_buffer: AtomicU32::new(SEND_BUFFER_START as u32),
        };
        let mut connection = KernelConnection {
            plane: self,
            holding: Arc::clone(holding),
            client: socket(client, client_prepared.cookie, client_signals),
            upstream: socket(upstream, upstream_prepared.cookie, upstream_signals),
            to_upstream: FlowLedger::new(
                label,
                client_prepared.unread_from,
                &upstream_prepared,
                self.first_budget(),
            ),
            // Only the client's flow carries the label: so the two tell apart.
            to_client: FlowLedger::new(
                FlowLabel::default(),
                upstream_prepared.unread_from,
                &client_prepared,
                self.first_budget(),
            ),
        };
        // Flow entries exist before either socket can run the program.
        if let Err(e) = connection.install_flows() {
            return Err(connection.give_back(KernelRelayError::Io(e)));
        }
        // Buffers set by hand, starting small (budget.rs): the receive buffer bounds the
        // window a throttled sender may still fill, whatever tcp_rmem lets autotuning reach;
        // both grow with the drain rate the checks measure. Then hold the upstream's arriving bytes in its receive queue
        // until the client is in the map too, so no redirect finds its peer missing (the
        // client joins second, when its peer is already there).
        let prepared = [
            (&connection.client.stream, &connection.to_upstream),
            (&connection.upstream.stream, &connection.to_client),
        ]
        .into_iter()
        .try_for_each(|(stream, outgoing)| {
            let budget = outgoing.budget();
            // Only autotuning before the insert lowers the clamp; a fresh socket's
            // already spans the buffer.
            match handover {
                Handover::AfterReads => restore_receive_buffer(stream, budget)?,
                Handover::Untouched => sys::set_receive_buffer(stream, receive_buffer(budget))?,
            }
            sys::set_send_buffer(stream, SEND_BUFFER_START)
        })
        .and_then(|()| sys::set_receive_low_water(&connection.upstream.stream, HOLD_LOW_WATER));
        if let Err(e) = prepared {
            return Err(connection.give_back(KernelRelayError::Io(e)));
        }
        // The upstream goes first; if it cannot join, nothing is in the map and userspace
        // takes the whole connection. If only the client cannot, the upstream's flow
        // detaches (its peer is missing) and userspace moves both directions' bytes.
        if let Err(e) = insert(self, &mut connection.upstream) {
            return Err(connection.give_back(e));
        }
        if let Err(e) = insert(self, &mut connection.client) {
            debug!("client socket stays out of the map, its bytes move in userspace: {e}");
            // So that the maps say so to whoever reads them (ebpf-proxy flows).
            let _ = connection.publish_control(connection.flow(Direction::ClientToUpstream));
        }
        // Setting the mark runs data-ready, which hands every byte that arrived before the
        // insert to the program, in order: for the upstream this releases the hold, for the
        // client (whose mark is already 1) it is the wakeup those bytes would otherwise wait
        // for until more arrive.
        for socket in [&connection.upstream, &connection.client] {
            // Also for a socket outside the map: its readiness depends on the mark too.
            if let Err(e) = sys::set_receive_low_water(&socket.stream, 1) {
                debug!("could not release the receive queue: {e}");
            }
        }
        Ok(connection)
    }
}

/// The cookie, queued total and first unread sequence of an established socket.
fn prepare(stream: &TcpStream, handover: Handover) -> Result<Prepared, KernelRelayError> {
    // One TCP_INFO gives both the state and the acked bytes.
    let info = sys::tcp_info(stream)?;
    if info.state != sys::TCP_ESTABLISHED {
        return Err(KernelRelayError::NotEstablished);
    }
    // The program is handed whole segments, and after userspace has read, the first one may
    // begin with bytes already read: a segment TCP merged new bytes into while it was half
    // read, or a retransmission. Starting from the next unread byte's sequence number, the
    // program trims them off.
    let unread_from = match handover {
        Handover::AfterReads => Some(sys::next_unread_sequence(stream)?),
        Handover::Untouched => None,
    };
    Ok(Prepared {
        cookie: sys::socket_cookie(stream)?,
        acked: info.bytes_acked,
        queued: info.bytes_acked + sys::unacked_or_unsent(stream)?,
        unread_from,
    })
}

/// The label of the client's flow: the listener's port, and the client's address only when
/// the relay may show it. The server knows both, so no syscall asks again.
fn label(supervision: &Supervision) -> FlowLabel {
    FlowLabel {
        listener_port: supervision.listener_port,
        client: supervision.client,
    }
}

/// Puts one socket into the sockhash.
fn insert(plane: &KernelDataPlane, socket: &mut Socket) -> Result<(), KernelRelayError> {
    plane
        .maps
        .insert_socket(socket.cookie, socket.stream.as_fd())
        .map_err(KernelRelayError::Insert)?;
    socket.in_map = true;
    Ok(())
}

/// Whether the connection's sockets are about to close, which takes them out of the
/// sockhash and the watcher's epoll set by itself.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Teardown {
    Closing,
    KeepingSockets,
}

impl KernelConnection<'_> {
    /// The flow in `direction`, with its source and destination.
    fn flow(&self, direction: Direction) -> Flow<'_> {
        match direction {
            Direction::ClientToUpstream => Flow {
                ledger: &self.to_upstream,
                from: &self.client,
                to: &self.upstream,
            },
            Direction::UpstreamToClient => Flow {
                ledger: &self.to_client,
                from: &self.upstream,
                to: &self.client,
            },
        }
    }

    fn install_flows(&self) -> io::Result<()> {
        let records = |flow: Flow<'_>| {
            let state = match flow.ledger.unread_from {
                Some(next_seq) => FlowState {
                    next_seq,
                    seq_state: SEQ_TRACKED,
                    ..FlowState::default()
                },
                None => FlowState::default(),
            };
            (state, flow.ledger.control(flow.to.cookie))
        };
        self.plane.maps.install(
            [self.client.cookie, self.upstream.cookie],
            [
                records(self.flow(Direction::ClientToUpstream)),
                records(self.flow(Direction::UpstreamToClient)),
            ],
        )
    }

    /// Undoes the setup of a connection none of whose sockets joined the map, handing the
    /// sockets back (as duplicates, since this connection's Drop closes its own fds).
    fn give_back(self, reason: KernelRelayError) -> Declined {
        // The sockets outlive this connection (as duplicates): take them out by hand.
        self.remove_traces(Teardown::KeepingSockets);
        for socket in [&self.client, &self.upstream] {
            // Userspace readiness depends on the low-water mark: undo the setup's hold.
            let _ = sys::set_receive_low_water(&socket.stream, 1);
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
    /// here only when the sockets stay open: two syscalls per socket saved on every
    /// connection's teardown.
    fn remove_traces(&self, teardown: Teardown) {
        let maps = &self.plane.maps;
        let sockets = [&self.client, &self.upstream];
        for socket in sockets {
            if socket.in_map && teardown == Teardown::KeepingSockets {
                // Removing the socket first stops the program from running for it.
                let _ = maps.remove_socket(socket.cookie);
            }
        }
        // A packet between this and the close finds no flow: the program keeps it on the
        // socket (SK_PASS), as it would for a socket out of the map.
        if let Err(e) = maps.remove_flows(&sockets.map(|socket| socket.cookie)) {
            warn!("could not delete a connection's flow records: {e}");
        }
        for socket in sockets {
            match teardown {
                Teardown::Closing => self.plane.watcher.forget(socket.cookie),
                Teardown::KeepingSockets => self
                    .plane
                    .watcher
                    .unwatch(socket.cookie, socket.stream.as_raw_fd()),
            }
        }
    }

    async fn run(self, supervision: &Supervision) -> Result<Transfer, ConnectionError> {
        let mut watchdog = Watchdog::new(supervision);
        let mut deliveries = Deliveries::new(Instant::now());
        let flows = Flows {
            to_upstream: self.run_flow(self.flow(Direction::ClientToUpstream)),
            to_client: self.run_flow(self.flow(Direction::UpstreamToClient)),
        };
        let measure = || {
            // A socket that cannot say is failing; its flow reports the error.
            let idle_for = match (look(&self.client.stream), look(&self.upstream.stream)) {
                (Ok(client), Ok(upstream)) => {
                    deliveries.idle_for([client, upstream], Instant::now())
                }
                _ => Duration::ZERO,
            };
            (self.activity().transfer, Some(idle_for))
        };
        let result = drive_both(flows, &mut watchdog, measure, |()| true, None).await;
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
        result.map(|_| transfer)
    }

    /// What the program counted for both flows, plus what userspace moved: one map read
    /// per flow.
    fn activity(&self) -> Activity {
        let (up, down) = (
            self.flow(Direction::ClientToUpstream),
            self.flow(Direction::UpstreamToClient),
        );
        let (up_state, down_state) = (self.state(up), self.state(down));
        let transfer = Transfer {
            client_to_upstream: up_state.redirected_bytes + up.ledger.moved.load(Ordering::Acquire),
            upstream_to_client: down_state.redirected_bytes
                + down.ledger.moved.load(Ordering::Acquire),
        };
        Activity {
            transfer,
            trimmed: up_state.trimmed_bytes + down_state.trimmed_bytes,
            detached: u64::from(up_state.detachments) + u64::from(down_state.detachments),
            resumed: u64::from(up_state.resumptions) + u64::from(down_state.resumptions),
        }
    }
}

impl Drop for KernelConnection<'_> {
    fn drop(&mut self) {
        // The streams close right after this, with the connection's fields.
        self.remove_traces(Teardown::Closing);
    }
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

/// What `stream`'s peer has acknowledged, and whether bytes wait for it.
fn look(stream: &TcpStream) -> io::Result<PeerLook> {
    Ok(PeerLook {
        acked: sys::tcp_info(stream)?.bytes_acked,
        waiting: sys::unacked_or_unsent(stream)? > 0,
    })
}
