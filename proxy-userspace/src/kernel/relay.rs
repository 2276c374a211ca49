//! One connection in kernel mode. Both sockets join the sockhash and the verdict program
//! moves their bytes; userspace only steps in for what the kernel does not do:
//! - a FIN or RST is never forwarded by the kernel: on EOF, wait until every redirected
//!   byte is in the peer's TCP write queue, then shut the peer's write side (shutting it
//!   earlier makes the queued redirects fail and drops them);
//! - a paused flow (peer too slow, or peer not in the map) keeps its bytes on the receiving
//!   socket; userspace moves them in order, after the peer's redirect backlog has emptied.

use std::{
    io,
    net::TcpStream,
    os::fd::AsRawFd,
    sync::atomic::{AtomicU32, AtomicU64, Ordering},
    time::Duration,
};

use proxy_common::{FlowControl, FlowState};
use tracing::debug;

use super::{
    KernelDataPlane,
    watcher::{ERROR, HANGUP, PAUSED, READABLE, SocketSignals, WRITABLE},
};
use crate::{
    dataplane::{FlowError, Transfer},
    sys,
};

/// How often a connection re-reads its flows in case a pause notification was lost to a
/// full ring buffer.
const AUDIT_PERIOD: Duration = Duration::from_secs(5);
/// Userspace buffer for moving a paused flow's bytes: part of the per-connection bound.
pub const MOVE_BUFFER: usize = 64 * 1024;
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
    Insert(aya::maps::MapError),
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
    /// Optional epoll interest (READABLE/WRITABLE) wanted by the two flows touching it.
    interest: AtomicU32,
    /// Userspace half of this socket's *outgoing* flow's control (see FlowControl).
    drained: AtomicU64,
    /// Peer's baseline plus bytes userspace wrote into the peer.
    peer_userspace: AtomicU64,
}

/// A connection whose sockets are (being) put into the maps; Drop takes every trace out.
struct KernelConnection<'a> {
    plane: &'a KernelDataPlane,
    client: Side,
    upstream: Side,
}

enum Moved {
    CaughtUp,
    EndOfStream,
}

impl KernelDataPlane {
    /// Relays one connection in the kernel. Gives the sockets back untouched when they
    /// cannot join the map at all, so the caller can relay them in userspace instead.
    pub async fn relay(
        &self,
        client: TcpStream,
        upstream: TcpStream,
    ) -> Result<Result<Transfer, FlowError>, Declined> {
        let connection = self.join_maps(client, upstream)?;
        Ok(connection.run().await)
    }

    fn join_maps(
        &self,
        client: TcpStream,
        upstream: TcpStream,
    ) -> Result<KernelConnection<'_>, Declined> {
        let prepared = (|| {
            for stream in [&client, &upstream] {
                if sys::tcp_info(stream)?.state != sys::TCP_ESTABLISHED {
                    return Err(KernelRelayError::NotEstablished);
                }
            }
            Ok((
                sys::socket_cookie(&client)?,
                sys::socket_cookie(&upstream)?,
                sys::queued_total(&client)?,
                sys::queued_total(&upstream)?,
            ))
        })();
        let (client_cookie, upstream_cookie, client_queued, upstream_queued) = match prepared {
            Ok(v) => v,
            Err(e) => return Err(Declined::intact(client, upstream, e)),
        };
        // Watch first: pause notifications can come the moment a socket is in the map.
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
        let side = |stream, cookie, signals, peer_queued| Side {
            stream,
            cookie,
            signals,
            in_map: false,
            interest: AtomicU32::new(0),
            drained: AtomicU64::new(0),
            peer_userspace: AtomicU64::new(peer_queued),
        };
        let client_side = side(client, client_cookie, client_signals, upstream_queued);
        let upstream_side = side(upstream, upstream_cookie, upstream_signals, client_queued);
        let mut connection = KernelConnection {
            plane: self,
            client: client_side,
            upstream: upstream_side,
        };
        // Flow entries exist before either socket can run the program.
        if let Err(e) = connection.install_flows() {
            return Err(connection.give_back(KernelRelayError::Io(e)));
        }
        // The upstream goes first; if it cannot join, nothing is in the map and userspace
        // takes the whole connection. If only the client cannot, the upstream's flow stays
        // paused (its peer is missing) and userspace moves both directions' bytes.
        if let Err(e) = connection.insert(true) {
            return Err(connection.give_back(e));
        }
        if let Err(e) = connection.insert(false) {
            debug!("client socket stays out of the map, its bytes move in userspace: {e}");
        }
        // Bytes that arrived before the insert wait in the receive queue until something
        // runs data-ready; this does, in order.
        for side in [&connection.upstream, &connection.client] {
            if side.in_map {
                if let Err(e) = sys::kick_receive_queue(&side.stream) {
                    debug!("could not kick receive queue: {e}");
                }
            }
        }
        Ok(connection)
    }
}

impl KernelConnection<'_> {
    fn install_flows(&self) -> io::Result<()> {
        let mut maps = self.plane.maps();
        for (from, to) in [(&self.client, &self.upstream), (&self.upstream, &self.client)] {
            let control = FlowControl {
                peer_cookie: to.cookie,
                peer_userspace_bytes: from.peer_userspace.load(Ordering::Acquire),
                drained_bytes: 0,
            };
            maps.flows
                .insert(from.cookie, FlowState::default(), 0)
                .map_err(io::Error::other)?;
            maps.controls
                .insert(from.cookie, control, 0)
                .map_err(io::Error::other)?;
        }
        Ok(())
    }

    fn insert(&mut self, upstream: bool) -> Result<(), KernelRelayError> {
        let side = if upstream { &mut self.upstream } else { &mut self.client };
        self.plane
            .maps()
            .sockets
            .insert(side.cookie, side.stream.as_raw_fd(), 0)
            .map_err(KernelRelayError::Insert)?;
        side.in_map = true;
        Ok(())
    }

    /// Undoes the setup of a connection none of whose sockets joined the map, handing the
    /// sockets back (as duplicates, since this connection's Drop closes its own fds).
    fn give_back(self, reason: KernelRelayError) -> Declined {
        self.remove_traces();
        let sockets = self
            .client
            .stream
            .try_clone()
            .and_then(|client| Ok((client, self.upstream.stream.try_clone()?)))
            .ok();
        Declined { sockets, reason }
    }

    fn remove_traces(&self) {
        let mut maps = self.plane.maps();
        for side in [&self.client, &self.upstream] {
            if side.in_map {
                // Removing the socket first stops the program from running for it.
                let _ = maps.sockets.remove(&side.cookie);
            }
            let _ = maps.flows.remove(&side.cookie);
            let _ = maps.controls.remove(&side.cookie);
            self.plane.watcher.unwatch(side.cookie, side.stream.as_raw_fd());
        }
    }

    async fn run(self) -> Result<Transfer, FlowError> {
        let result = {
            let to_upstream = self.run_flow(&self.client, &self.upstream);
            let to_client = self.run_flow(&self.upstream, &self.client);
            tokio::pin!(to_upstream, to_client);
            let (mut up_done, mut down_done) = (false, false);
            loop {
                tokio::select! {
                    r = &mut to_upstream, if !up_done => match r {
                        Ok(()) => up_done = true,
                        Err(e) => break Err(e.towards_upstream()),
                    },
                    r = &mut to_client, if !down_done => match r {
                        Ok(()) => down_done = true,
                        Err(e) => break Err(e.towards_client()),
                    },
                }
                if up_done && down_done {
                    break Ok(());
                }
            }
        };
        let transfer = Transfer {
            client_to_upstream: self.flow_bytes(&self.client),
            upstream_to_client: self.flow_bytes(&self.upstream),
        };
        if let Err(e) = &result {
            e.propagate_reset(&self.client.stream, &self.upstream.stream);
        }
        result.map(|()| transfer)
    }

    fn flow_bytes(&self, from: &Side) -> u64 {
        let state = self.state(from);
        state.redirected_bytes + from.drained.load(Ordering::Acquire)
    }

    /// Carries one direction until its source's EOF has reached the destination.
    async fn run_flow(&self, from: &Side, to: &Side) -> Result<(), LocalFlowError> {
        let mut audit = tokio::time::interval(AUDIT_PERIOD);
        audit.reset();
        if !from.in_map {
            self.want(from, READABLE, true)?;
        }
        loop {
            let events = tokio::select! {
                events = from.signals.read_events() => events,
                _ = audit.tick() => {
                    let state = self.state(from);
                    if state.passed_bytes == from.drained.load(Ordering::Acquire) { continue; }
                    PAUSED
                }
            };
            if events & ERROR != 0 {
                return Err(LocalFlowError::Source(socket_error(&from.stream)));
            }
            if events & (PAUSED | READABLE | HANGUP) == 0 {
                continue;
            }
            if let Moved::EndOfStream = self.move_kept_bytes(from, to).await? {
                self.wait_for_peer_backlog(from, to).await?;
                sys::shutdown_write(&to.stream).map_err(LocalFlowError::Destination)?;
                return Ok(());
            }
        }
    }

    /// Moves what the program left on `from` (and, for a socket outside the map, whatever
    /// arrives) to `to`, until nothing is left or the stream ends.
    async fn move_kept_bytes(&self, from: &Side, to: &Side) -> Result<Moved, LocalFlowError> {
        let mut buf = vec![0u8; MOVE_BUFFER];
        // Hear about bytes kept while we work (EPOLLIN is accurate while a flow is paused).
        self.want(from, READABLE, true)?;
        let mut verified_at_redirected = None;
        loop {
            match sys::recv_nonblocking(&from.stream, &mut buf) {
                Ok(0) => return Ok(Moved::EndOfStream),
                Ok(n) => {
                    // Write only behind every redirected byte: re-check whenever the
                    // program redirected something since the last check.
                    let redirected = self.state(from).redirected_bytes;
                    if verified_at_redirected != Some(redirected) {
                        verified_at_redirected = Some(self.wait_for_peer_backlog(from, to).await?);
                    }
                    self.write_all(to, &buf[..n]).await?;
                    self.record_moved(from, n as u64)?;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if from.in_map
                        && self.state(from).passed_bytes <= from.drained.load(Ordering::Acquire)
                    {
                        self.want(from, READABLE, false)?;
                        return Ok(Moved::CaughtUp);
                    }
                    if !from.in_map {
                        return Ok(Moved::CaughtUp);
                    }
                    // Counted as kept but not queued on the socket yet: it is on its way.
                    let events = from.signals.read_events().await;
                    if events & ERROR != 0 {
                        return Err(LocalFlowError::Source(socket_error(&from.stream)));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(LocalFlowError::Source(e)),
            }
        }
    }

    fn record_moved(&self, from: &Side, n: u64) -> Result<(), LocalFlowError> {
        let drained = from.drained.fetch_add(n, Ordering::AcqRel) + n;
        let peer_userspace = from.peer_userspace.fetch_add(n, Ordering::AcqRel) + n;
        let control = FlowControl {
            peer_cookie: self.peer_of(from).cookie,
            peer_userspace_bytes: peer_userspace,
            drained_bytes: drained,
        };
        self.plane
            .maps()
            .controls
            .insert(from.cookie, control, 0)
            .map_err(|e| LocalFlowError::Source(io::Error::other(e)))
    }

    fn peer_of(&self, side: &Side) -> &Side {
        if side.cookie == self.client.cookie { &self.upstream } else { &self.client }
    }

    /// Waits until the destination's TCP stack has taken every byte redirected towards it.
    /// Returns the redirected count that was verified.
    async fn wait_for_peer_backlog(&self, from: &Side, to: &Side) -> Result<u64, LocalFlowError> {
        let mut delay = BACKLOG_POLL.0;
        loop {
            let redirected = self.state(from).redirected_bytes;
            let expected = from.peer_userspace.load(Ordering::Acquire) + redirected;
            let queued = sys::queued_total(&to.stream).map_err(LocalFlowError::Destination)?;
            if queued >= expected {
                return Ok(redirected);
            }
            // A reset destination discards its backlog: it will never catch up.
            if sys::tcp_info(&to.stream).map_err(LocalFlowError::Destination)?.state == TCP_CLOSE {
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
        // A missing entry reads as zeros: only possible for a flow already torn down.
        self.plane.maps().flows.get(&side.cookie, 0).unwrap_or_default()
    }
}

impl Drop for KernelConnection<'_> {
    fn drop(&mut self) {
        self.remove_traces();
    }
}

/// TCP_CLOSE from include/net/tcp_states.h.
const TCP_CLOSE: u8 = 7;

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
