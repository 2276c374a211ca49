//! Backpressure for a kernel-mode flow. A redirect ignores the destination's send buffer,
//! so the program bounds each flow's backlog (bytes redirected, not yet in the
//! destination's TCP write queue) from the checkpoints userspace publishes, and asks for a
//! check when that bound reaches the backlog limit. The check measures the backlog with
//! syscalls; from [`throttle_from`] on it holds the sender back by cutting its socket's
//! receive buffer until the backlog is down to [`release_at`]. At the same checks the
//! destination's send buffer is sized to its drain rate, since the kernel's redirect worker
//! fills it only once a jiffy when it is full.

use std::{io, net::TcpStream, sync::atomic::Ordering, time::Duration};

use proxy_common::{release_at, throttle_from};

use super::{
    connection::KernelConnection,
    flow::{Flow, Socket},
};
use crate::{sys, transfer::FlowError};

/// SO_RCVBUF of every relayed socket; the kernel doubles it, and the advertised window
/// stays below that: what a sender can still push once throttled. Smaller buffers cost
/// throughput over loopback (docs/design.md, "Backpressure and memory").
pub(super) const RECEIVE_BUFFER: libc::c_int = 8 << 20;
/// SO_SNDBUF every relayed socket starts with (the kernel doubles it), and returns to when
/// its destination falls behind. When a destination's send buffer is full, the kernel's
/// redirect worker retries only a jiffy later, and wakeups meanwhile do nothing, so a flow
/// moves at most about one send buffer per jiffy.
pub(super) const SEND_BUFFER: libc::c_int = 4 << 20;
/// The most SO_SNDBUF grows to, for a destination that drains fast enough to need it.
const SEND_BUFFER_MAX: libc::c_int = 32 << 20;
/// At each backlog check, SO_SNDBUF is set to what the destination drained in this long, so
/// the kernel's buffer (twice that) holds many jiffies of retry delay at its own rate,
/// within [`SEND_BUFFER`]..=[`SEND_BUFFER_MAX`].
const SEND_BUFFER_SPAN: Duration = Duration::from_millis(64);
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
}

impl KernelConnection<'_> {
    /// Answers the program's request: measures the destination's backlog, throttles the
    /// sender from [`throttle_from`] the limit on, then publishes the checkpoint the
    /// measurement gives, so the program asks again once the backlog could have reached the
    /// limit.
    pub(super) async fn check_backlog(
        &self,
        flow: Flow<'_>,
        requested: u32,
    ) -> Result<(), FlowError> {
        let mut measured = self.peer_backlog(flow)?;
        // By its drain rate, not its backlog: a fast destination's backlog swings by
        // megabytes while the redirect worker waits out a jiffy.
        self.fit_send_buffer(flow.to, measured.acked)?;
        if measured.backlog >= throttle_from(self.plane.backlog_limit) {
            measured = self.throttle(flow).await?;
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
        let drained = self
            .wait_for_peer_backlog(flow, release_at(self.plane.backlog_limit))
            .await;
        restore_receive_buffer(&flow.from.stream).map_err(FlowError::Source)?;
        drained
    }

    /// Sizes `to`'s send buffer by its drain rate over the last [`SEND_BUFFER_SPAN`] or more
    /// (checks closer together add to one measurement, so a burst between two checks is no
    /// sample): a fast destination then bridges the redirect worker's retry delay, a slow
    /// one holds no more than before.
    fn fit_send_buffer(&self, to: &Socket, acked: u64) -> Result<(), FlowError> {
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
        let (acked, unacked) =
            sys::acked_and_queued(&flow.to.stream).map_err(FlowError::Destination)?;
        Ok(Backlog {
            redirected,
            backlog: expected.saturating_sub(acked + unacked),
            acked,
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
            // A reset destination discards its backlog: it will never catch up.
            if sys::tcp_info(&flow.to.stream)
                .map_err(FlowError::Destination)?
                .state
                == TCP_CLOSE
            {
                return Err(FlowError::Destination(io::Error::from(
                    io::ErrorKind::ConnectionReset,
                )));
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(BACKLOG_POLL.1);
        }
    }
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

/// The full receive buffer again, and the window clamp lifted, after anything that may have
/// lowered it: a cut buffer (the throttle, `hold_sender`) or autotuning before the insert.
/// A segment longer than any before, arriving with a new length-to-truesize ratio, sets the
/// clamp to the window of the buffer at that moment (net/ipv4/tcp_input.c,
/// tcp_measure_rcv_mss), and a larger SO_RCVBUF later does not raise it. Pinned at a cut
/// buffer's window, below one MSS, the sender's segments never grow past it again and the
/// connection crawls for good.
pub(super) fn restore_receive_buffer(stream: &TcpStream) -> io::Result<()> {
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

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::{super::flow::MOVE_BUFFER, *};

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
