//! A flow whose bytes userspace moves: detached by the program (its backlog bound passed
//! the hard limit, or a redirect found its peer gone), or whose source never joined the
//! map. A detached flow keeps its bytes on the source socket; userspace moves them, each
//! behind everything redirected before it, while the sender is held back, and the program
//! redirects again at the first segment after every kept byte has been moved. Kept bytes
//! the kernel holds outside any buffer are bounded by [`KEPT_LIMIT`].

use std::{io, net::TcpStream, sync::atomic::Ordering, time::Duration};

use proxy_common::{FLOW_BROKEN, FLOW_OVER_KEPT_LIMIT, FlowState, KEPT_LIMIT};
use tracing::{debug, warn};

use super::{
    backpressure::{hold_sender, restore_receive_buffer},
    connection::KernelConnection,
    flow::{Flow, MOVE_BUFFER, Want, socket_error},
    watcher::{ERROR, READABLE},
};
use crate::{sys, transfer::FlowError};

/// How often a detached flow waiting for its kept bytes counts them against [`KEPT_LIMIT`].
const KEPT_POLL: Duration = Duration::from_millis(10);

/// How [`KernelConnection::move_kept_bytes`] ended.
pub(super) enum Kept {
    /// EOF came, and the destination's write side is shut.
    Ended,
    /// The program redirects this flow's bytes again.
    Resumed,
}

impl KernelConnection<'_> {
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
    pub(super) async fn move_kept_bytes(&self, flow: Flow<'_>) -> Result<Kept, FlowError> {
        tokio::select! {
            kept = self.move_kept_bytes_unguarded(flow) => kept,
            overflow = self.kept_overflow(flow) => Err(overflow),
        }
    }

    async fn move_kept_bytes_unguarded(&self, flow: Flow<'_>) -> Result<Kept, FlowError> {
        let Flow { ledger, from, to } = flow;
        self.want(from, READABLE, Want::On)?;
        // A peer outside the map could take no redirect: stay in userspace, unheld. Held, the
        // receive buffer the sender is held to.
        let mut held = if to.in_map {
            Some(hold_sender(&from.stream).map_err(FlowError::Source)?)
        } else {
            None
        };
        let mut buf = vec![0u8; MOVE_BUFFER];
        let kept = loop {
            match sys::peek_nonblocking(&from.stream, &mut buf) {
                Ok(0) if self.kept_in_backlog(flow) => {
                    debug!("EOF read ahead of kept bytes in the psock backlog: waiting for them");
                    // Not the end yet: the worker's delivery wakes this socket.
                    self.wait_readable(flow).await?;
                }
                Ok(0) => {
                    // The flow may have resumed before its FIN: what it redirected since must
                    // be in the destination's queue first, or the shutdown fails its send.
                    self.wait_for_peer_backlog(flow, 0).await?;
                    sys::shutdown_write(&to.stream).map_err(FlowError::Destination)?;
                    break Kept::Ended;
                }
                Ok(n) => {
                    // Measured after the read: it counts every redirect before these bytes.
                    let measured = self.wait_for_peer_backlog(flow, 0).await?;
                    self.forward_moved(flow, &buf[..n]).await?;
                    let moved =
                        ledger.passed_moved.fetch_add(n as u64, Ordering::AcqRel) + n as u64;
                    if to.in_map {
                        // The last byte kept: let the window open as it is consumed. More
                        // kept since it opened: hold the sender again. Still held: take
                        // what is consumed off the buffer too, or the window opens by it.
                        let caught_up = self.state(flow).passed_bytes == moved;
                        if caught_up {
                            if held.take().is_some() {
                                restore_receive_buffer(&from.stream, ledger.budget())
                                    .map_err(FlowError::Source)?;
                            }
                        } else {
                            let buffer = match held {
                                Some(buffer) => buffer,
                                None => hold_sender(&from.stream).map_err(FlowError::Source)?,
                            };
                            let smaller = buffer.saturating_sub(n as u32);
                            sys::set_receive_buffer_total(&from.stream, smaller)
                                .map_err(FlowError::Source)?;
                            held = Some(smaller);
                        }
                        self.publish_checkpoint(flow, &measured)?;
                    }
                    consume(&from.stream, &mut buf[..n]).map_err(FlowError::Source)?;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if self.state(flow).detached == 0 {
                        break Kept::Resumed;
                    }
                    self.wait_readable(flow).await?;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(FlowError::Source(e)),
            }
        };
        if held.is_some() {
            restore_receive_buffer(&from.stream, ledger.budget()).map_err(FlowError::Source)?;
        }
        self.want(from, READABLE, Want::Off)?;
        Ok(kept)
    }

    /// Waits for the next read-side event on the source; a socket error ends the flow.
    async fn wait_readable(&self, flow: Flow<'_>) -> Result<(), FlowError> {
        let events = flow.from.signals.read_events().await;
        if events & ERROR != 0 {
            return Err(FlowError::Source(socket_error(&flow.from.stream)));
        }
        Ok(())
    }

    /// Returns once more than [`KEPT_LIMIT`] kept bytes wait in the kernel, unmoved: they
    /// are charged to no buffer there, so nothing else would stop them growing. The program
    /// stops the flow at the same bound, whatever userspace is waiting for.
    async fn kept_overflow(&self, flow: Flow<'_>) -> FlowError {
        let mut poll = tokio::time::interval(KEPT_POLL);
        loop {
            poll.tick().await;
            let state = self.state(flow);
            if let Some(stopped) = self.stopped_by_program(flow, &state) {
                return stopped;
            }
            let waiting = state
                .passed_bytes
                .saturating_sub(flow.ledger.passed_moved.load(Ordering::Acquire));
            if waiting > KEPT_LIMIT {
                return self.kept_reset(waiting);
            }
        }
    }

    /// Why the connection must end, if the program stopped the flow ([`FLOW_BROKEN`],
    /// [`FLOW_OVER_KEPT_LIMIT`]): more
    /// than [`KEPT_LIMIT`] kept and unmoved, or a retransmission it could not trim.
    pub(super) fn stopped_by_program(
        &self,
        flow: Flow<'_>,
        state: &FlowState,
    ) -> Option<FlowError> {
        match state.seq_state {
            FLOW_OVER_KEPT_LIMIT => {
                let waiting = state
                    .passed_bytes
                    .saturating_sub(flow.ledger.passed_moved.load(Ordering::Acquire));
                Some(self.kept_reset(waiting))
            }
            FLOW_BROKEN => Some(FlowError::Source(io::Error::new(
                io::ErrorKind::InvalidData,
                "a retransmitted segment repeats relayed bytes and could not be trimmed: reset rather than repeat or lose a byte",
            ))),
            _ => None,
        }
    }

    fn kept_reset(&self, waiting: u64) -> FlowError {
        let total = self.plane.kept_resets.fetch_add(1, Ordering::Relaxed) + 1;
        if let Some(since) = self.plane.kept_reset_notice.count() {
            warn!(
                "reset {since} connection(s) since the last notice, the latest because one end sent {} MiB that waited in the kernel while the other read nothing ({total} such resets in all; next notice in a minute at the earliest)",
                waiting >> 20
            );
        }
        FlowError::Source(io::Error::other(format!(
            "{} MiB from this side wait in the kernel for a destination that reads nothing (the limit is {} MiB): reset rather than hold more",
            waiting >> 20,
            KEPT_LIMIT >> 20
        )))
    }

    /// Whether kept bytes wait in the source's psock backlog rather than its queue. A kept
    /// segment that finds bytes redirected to this socket queued there, or that does not fit
    /// the held receive buffer, is deferred to the psock's worker, which retries a jiffy
    /// later (net/core/skmsg.c, sk_psock_backlog); meanwhile, once the FIN is in, a read
    /// reports EOF past it (tcp_bpf_recvmsg_parser sees no message and RCV_SHUTDOWN). Every
    /// byte the program kept has been moved only when the counts match.
    fn kept_in_backlog(&self, flow: Flow<'_>) -> bool {
        self.state(flow).passed_bytes > flow.ledger.passed_moved.load(Ordering::Acquire)
    }

    /// The rest of a direction whose source is outside the map: every byte is read by
    /// userspace, behind whatever was redirected before.
    pub(super) async fn copy_rest_in_userspace(&self, flow: Flow<'_>) -> Result<(), FlowError> {
        self.want(flow.from, READABLE, Want::On)?;
        // Nothing from this source is redirected any more: once the backlog is in the
        // destination's queue, every write from here goes behind it.
        self.wait_for_peer_backlog(flow, 0).await?;
        let mut buf = vec![0u8; MOVE_BUFFER];
        loop {
            match sys::recv_nonblocking(&flow.from.stream, &mut buf) {
                Ok(0) => break,
                Ok(n) => self.forward_moved(flow, &buf[..n]).await?,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.wait_readable(flow).await?,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(FlowError::Source(e)),
            }
        }
        sys::shutdown_write(&flow.to.stream).map_err(FlowError::Destination)
    }
}

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
