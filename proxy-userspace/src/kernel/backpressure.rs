//! Backpressure for a kernel-mode flow. A redirect ignores the destination's send buffer,
//! so the program bounds each flow's backlog (bytes redirected, not yet in the
//! destination's TCP write queue) from the checkpoints userspace publishes, and asks for a
//! check when that bound reaches the flow's budget (budget.rs). The check measures the
//! backlog and the destination's drain rate with syscalls, resizes the budget and the
//! destination's send buffer by that rate, and from [`throttle_from`] the budget on holds
//! the sender back by cutting its socket's receive buffer until the backlog is down to
//! [`release_at`] of it.

use std::{io, net::TcpStream, sync::atomic::Ordering, time::Duration};

use proxy_common::{release_at, throttle_from};

use super::{
    KernelDataPlane,
    budget::{self, BUDGET_MIN, BUDGET_START, Drained, SEND_BUFFER_MIN, receive_buffer},
    connection::KernelConnection,
    flow::{Flow, Socket},
};
use crate::{sys, transfer::FlowError};

impl KernelDataPlane {
    /// The budget a new flow starts with, within the global limit.
    pub(super) fn first_budget(&self) -> u64 {
        BUDGET_START.min(self.backlog_limit)
    }
}

/// The redirect backlog gives no wakeup when it empties, so its drain is polled, backing
/// off from the first value to the second.
const BACKLOG_POLL: (Duration, Duration) = (Duration::from_millis(1), Duration::from_millis(16));
/// TCP_CLOSE from include/net/tcp_states.h.
const TCP_CLOSE: u8 = 7;

/// One measurement of a flow's destination (see `peer_backlog`).
pub(super) struct Backlog {
    redirected: u64,
    backlog: u64,
    acked: u64,
    /// The destination's write queue (SIOCOUTQ).
    queued: u64,
}

impl Backlog {
    /// Everything that waits for the destination: its redirect backlog and write queue.
    fn waiting(&self) -> u64 {
        self.backlog + self.queued
    }
}

impl KernelConnection<'_> {
    /// Answers the program's request: measures the destination's backlog and drain rate,
    /// resizes the flow's budget by them, throttles the sender from [`throttle_from`] the
    /// budget on, then publishes the checkpoint the measurement gives, so the program asks
    /// again once the backlog could have reached the budget.
    pub(super) async fn check_backlog(
        &self,
        flow: Flow<'_>,
        requested: u32,
    ) -> Result<(), FlowError> {
        let mut measured = self.peer_backlog(flow)?;
        // By its drain rate first, then its backlog: a fast destination's backlog swings by
        // megabytes while the redirect worker waits out a jiffy.
        let resized = self.follow_drain_rate(flow, &measured)?;
        if measured.backlog >= throttle_from(flow.ledger.budget()) {
            // Cuts the sender's receive buffer, then restores it to the new budget.
            measured = self.throttle(flow).await?;
        } else if resized {
            restore_receive_buffer(&flow.from.stream, flow.ledger.budget())
                .map_err(FlowError::Source)?;
        }
        flow.ledger.checks_done.store(requested, Ordering::Release);
        self.publish_checkpoint(flow, &measured)
    }

    /// Publishes what `measured` shows has left the backlog, so that the program's bound
    /// starts again from the backlog as measured (it can only count more than the truth).
    pub(super) fn publish_checkpoint(
        &self,
        flow: Flow<'_>,
        measured: &Backlog,
    ) -> Result<(), FlowError> {
        flow.ledger.checkpoint.store(
            measured.redirected.saturating_sub(measured.backlog),
            Ordering::Release,
        );
        self.publish_control(flow)
    }

    /// Holds the sender back until the destination has taken most of the backlog. A minimal
    /// receive buffer leaves no free space to advertise, so the sender stops once the
    /// window already granted is used (a window never shrinks). Unlike TCP_WINDOW_CLAMP,
    /// this leaves rcv_ssthresh alone, so the full window is back as soon as the buffer
    /// (and the clamp, see `restore_receive_buffer`) is. Returns the measurement that found
    /// the backlog drained.
    async fn throttle(&self, flow: Flow<'_>) -> Result<Backlog, FlowError> {
        sys::set_receive_buffer(&flow.from.stream, 1).map_err(FlowError::Source)?;
        let budget = flow.ledger.budget();
        let drained = self.wait_for_peer_backlog(flow, release_at(budget)).await;
        restore_receive_buffer(&flow.from.stream, budget).map_err(FlowError::Source)?;
        drained
    }

    /// Holds the sender while the destination is still backed up with what userspace wrote
    /// before the flow joined the kernel (auto's warm-up, which may have waited seconds on a
    /// slow client): the sender kept its full speed meanwhile, and would push its whole
    /// send queue into the redirect queue before any check could throttle it (measured:
    /// about 5 MB per slow reader). Ends once the destination's queue is down to
    /// [`release_at`] of its send buffer, or at the first event on the source, which is
    /// returned for the flow's loop to handle. Judged by what the queue held at the join,
    /// not by now: by the time this runs, the program may have filled it itself.
    pub(super) async fn hold_while_backed_up(
        &self,
        flow: Flow<'_>,
    ) -> Result<Option<u32>, FlowError> {
        // The kernel doubles what SO_SNDBUF asks.
        let send_buffer = 2 * u64::from(flow.to.send_buffer.load(Ordering::Acquire));
        if flow.ledger.queued_at_join < throttle_from(send_buffer) {
            return Ok(None);
        }
        let queued = || sys::unacked_or_unsent(&flow.to.stream).map_err(FlowError::Destination);
        sys::set_receive_buffer(&flow.from.stream, 1).map_err(FlowError::Source)?;
        let mut delay = BACKLOG_POLL.0;
        let events = loop {
            if queued()? <= release_at(send_buffer) {
                break None;
            }
            fail_if_reset(flow.to)?;
            tokio::select! {
                events = flow.from.signals.read_events() => break Some(events),
                () = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(BACKLOG_POLL.1);
        };
        restore_receive_buffer(&flow.from.stream, flow.ledger.budget())
            .map_err(FlowError::Source)?;
        Ok(events)
    }

    /// Sizes the flow's budget and its destination's send buffer by what the destination
    /// drained since the last check. Returns whether the budget changed: the sender's
    /// receive buffer is then the caller's to set.
    fn follow_drain_rate(&self, flow: Flow<'_>, measured: &Backlog) -> Result<bool, FlowError> {
        let drained = flow.ledger.checked.take(measured.acked, measured.waiting());
        if self.holding.throttled() {
            return self.hold_least(flow);
        }
        self.fit_send_buffer(flow.to, drained)?;
        let budget = flow.ledger.budget();
        let resized = budget::resized_budget(budget, drained, self.plane.backlog_limit);
        flow.ledger.budget.store(resized, Ordering::Release);
        Ok(resized != budget)
    }

    /// Shrinks the flow's budget and its destination's send buffer to the least any flow
    /// keeps, while the memory account asks the connection to throttle. Returns whether
    /// the budget changed, as `follow_drain_rate` does.
    pub(super) fn hold_least(&self, flow: Flow<'_>) -> Result<bool, FlowError> {
        if flow.to.send_buffer.load(Ordering::Acquire) as libc::c_int > SEND_BUFFER_MIN {
            sys::set_send_buffer(&flow.to.stream, SEND_BUFFER_MIN)
                .map_err(FlowError::Destination)?;
            flow.to
                .send_buffer
                .store(SEND_BUFFER_MIN as u32, Ordering::Release);
        }
        let budget = flow.ledger.budget.swap(BUDGET_MIN, Ordering::AcqRel);
        Ok(budget != BUDGET_MIN)
    }

    /// Sizes `to`'s send buffer by its drain rate, so that a fast destination bridges the
    /// redirect worker's retry delay and a slow one holds little.
    fn fit_send_buffer(&self, to: &Socket, drained: Drained) -> Result<(), FlowError> {
        let current = to.send_buffer.load(Ordering::Acquire) as libc::c_int;
        if let Some(bytes) = budget::resized_send_buffer(current, drained) {
            sys::set_send_buffer(&to.stream, bytes).map_err(FlowError::Destination)?;
            to.send_buffer.store(bytes as u32, Ordering::Release);
        }
        Ok(())
    }

    /// The program's redirected count for the flow, how many bytes redirected towards its
    /// destination are not yet in that socket's TCP write queue (the redirect backlog) as
    /// of that count, and how many the destination has had acknowledged.
    fn peer_backlog(&self, flow: Flow<'_>) -> Result<Backlog, FlowError> {
        let redirected = self.state(flow).redirected_bytes;
        let expected = flow.ledger.peer_userspace.load(Ordering::Acquire) + redirected;
        let (acked, queued) =
            sys::acked_and_queued(&flow.to.stream).map_err(FlowError::Destination)?;
        Ok(Backlog {
            redirected,
            backlog: expected.saturating_sub(acked + queued),
            acked,
            queued,
        })
    }

    /// Waits until at most `allowed` bytes redirected towards the destination are still
    /// outside its TCP write queue (0: every one of them is in it, so a write from
    /// userspace goes behind). Returns that measurement.
    pub(super) async fn wait_for_peer_backlog(
        &self,
        flow: Flow<'_>,
        allowed: u64,
    ) -> Result<Backlog, FlowError> {
        let mut delay = BACKLOG_POLL.0;
        loop {
            let measured = self.peer_backlog(flow)?;
            if measured.backlog <= allowed {
                return Ok(measured);
            }
            // Bytes keep arriving while a throttled sender uses the window it was granted:
            // without a fresh checkpoint the program would count them against the old one,
            // and a wait longer than the hard limit's worth would detach a flow whose
            // destination is keeping up.
            self.publish_checkpoint(flow, &measured)?;
            // While this waits, the program may stop the source's flow (its kept bytes).
            if let Some(stopped) = self.stopped_by_program(flow, &self.state(flow)) {
                return Err(stopped);
            }
            // A reset destination discards its backlog: it will never catch up.
            fail_if_reset(flow.to)?;
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(BACKLOG_POLL.1);
        }
    }
}

/// An error once `to` was reset: a destination that will never take another byte.
fn fail_if_reset(to: &Socket) -> Result<(), FlowError> {
    let state = sys::tcp_info(&to.stream)
        .map_err(FlowError::Destination)?
        .state;
    if state == TCP_CLOSE {
        return Err(FlowError::Destination(io::Error::from(
            io::ErrorKind::ConnectionReset,
        )));
    }
    Ok(())
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
pub(super) fn hold_sender(stream: &TcpStream) -> io::Result<u32> {
    let memory = sys::receive_memory(stream)?;
    // Without tcpi_rcv_wnd, keep the buffer: the window closes as the queue fills it.
    let in_flight = sys::tcp_info(stream)?
        .receive_window
        .map_or(memory.buffer, |window| window.saturating_mul(2));
    let buffer = memory.used.saturating_add(in_flight).min(memory.buffer);
    sys::set_receive_buffer_total(stream, buffer)?;
    Ok(buffer)
}

/// The flow's receive buffer again, and the window clamp lifted, after anything that may
/// have lowered it: a cut buffer (the throttle, `hold_sender`), autotuning before the
/// insert, or a smaller budget. A segment longer than any before, arriving with a new
/// length-to-truesize ratio, sets the clamp to the window of the buffer at that moment
/// (net/ipv4/tcp_input.c, tcp_measure_rcv_mss), and a larger SO_RCVBUF later does not raise
/// it. Pinned at a cut buffer's window, below one MSS, the sender's segments never grow past
/// it again and the connection crawls for good. A larger buffer sends no window update of
/// its own: a sender left with less than one segment of window waits for its zero-window
/// probe (about 200 ms), so an ACK still scheduled goes out now with the reopened window.
pub(super) fn restore_receive_buffer(stream: &TcpStream, budget: u64) -> io::Result<()> {
    let buffer = receive_buffer(budget);
    sys::set_receive_buffer(stream, buffer)?;
    sys::set_window_clamp(stream, buffer.saturating_mul(2))?;
    sys::push_scheduled_ack(stream)
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::{super::flow::MOVE_BUFFER, *};

    /// The receive buffer of a flow at the global limit's budget.
    const FULL: libc::c_int = 8 << 20;

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
        sys::set_receive_buffer(&receiver, FULL).unwrap();
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
        if pinned >= FULL {
            eprintln!("this kernel left the clamp at {pinned} through the cut");
        }
        restore_receive_buffer(&receiver, 2 * FULL as u64).unwrap();
        assert!(
            sys::window_clamp(&receiver).unwrap() >= FULL,
            "the clamp stays at {pinned} after the buffer is restored"
        );
    }

    #[test]
    fn a_held_sender_stops_with_nothing_it_sent_dropped() {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let sender = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut receiver, _) = listener.accept().unwrap();
        sys::set_receive_buffer(&receiver, FULL).unwrap();
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
