//! The kernel data plane: an `sk_skb/stream_verdict` program that sends every byte arriving
//! on a relayed socket out of its peer socket. The kernel never pushes back on redirected
//! bytes, so userspace measures the peer's backlog (redirected, not yet in its TCP write
//! queue) with syscalls and leaves a checkpoint; the program counts from it a bound on the
//! backlog (the backlog measured plus everything redirected since) and asks for a new check
//! when that bound reaches `FLOW_BACKLOG_LIMIT`. When the backlog is large, userspace shrinks
//! the sending socket's receive buffer, which closes the sender's TCP window, until it
//! drains. The program reads no socket internals, so it needs only CAP_BPF and CAP_NET_ADMIN.
//! If the peer is not in the map, or the bound passes a hard cap because userspace was
//! too slow (the flow's own, scaled to its budget, when nothing went the other way),
//! the flow *detaches*: every byte from then on stays on the receiving socket
//! (SK_PASS), where TCP's own accounting bounds it, for userspace to move. Once userspace
//! has moved every byte kept (it says how many) and the destination has caught up, the
//! next segment resumes the redirect.
//!
//! Rare events (a retransmission trimmed or too long to trim, a flow detached or resumed,
//! a redirect that found no peer) are logged through aya-log, each kind at most at
//! powers of two of its count per flow, so the per-packet path gains only a comparison.
#![no_std]
#![no_main]

use core::ptr;

use aya_ebpf::{
    bindings::sk_action::{SK_DROP, SK_PASS},
    bindings::__sk_buff,
    cty::c_void,
    helpers::{bpf_get_socket_cookie, bpf_ktime_get_coarse_ns, bpf_loop, bpf_skb_adjust_room},
    btf_maps::HashMap,
    macros::{btf_map, map, stream_verdict},
    maps::{RingBuf, SockHash},
    programs::SkBuffContext,
};
use aya_log_ebpf::{debug, warn};
use proxy_common::{
    DEFAULT_BACKLOG_LIMIT, DEFAULT_MAX_SOCKETS, EVENTS_RING_BYTES, FLOW_BROKEN,
    FLOW_OVER_KEPT_LIMIT, FlowControl, FlowState, KEPT_LIMIT, SEQ_TRACKED, SEQ_UNKNOWN,
    flow_hard_limit, flow_stopped, hard_limit,
};

#[map]
static RELAY_SOCKETS: SockHash<u64> = SockHash::with_max_entries(DEFAULT_MAX_SOCKETS, 0);

// The flow records are BTF maps: their key and value types travel with them, so bpftool
// prints each field by name. (The sockhash and the ring buffer have no fields to name.)
#[btf_map]
static RELAY_FLOWS: HashMap<u64, FlowState, { DEFAULT_MAX_SOCKETS as usize }> = HashMap::new();

#[btf_map]
static RELAY_CONTROLS: HashMap<u64, FlowControl, { DEFAULT_MAX_SOCKETS as usize }> =
    HashMap::new();

#[map]
static RELAY_EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_RING_BYTES, 0);

// Set by userspace at load time; read-only to the verifier, which sees it as a constant.
#[unsafe(no_mangle)]
static FLOW_BACKLOG_LIMIT: u64 = DEFAULT_BACKLOG_LIMIT;

// Set to 1 by userspace at load time when it may log: aya-log copies each record with
// pointer arithmetic the verifier allows only with CAP_PERFMON. Read-only, so the verifier
// sees a constant and never visits the logging code when it is 0.
#[unsafe(no_mangle)]
static LOG_EVENTS: u8 = 0;

/// Whether this load of the program logs its events (see LOG_EVENTS).
#[inline(always)]
fn logging() -> bool {
    // SAFETY: a read-only global.
    unsafe { ptr::read_volatile(&LOG_EVENTS) != 0 }
}

/// The most one bpf_skb_adjust_room call removes from a segment's head.
const TRIM_STEP: u32 = 0xfff;
/// Enough steps for a repeated head of TRIM_STEP * TRIM_STEPS_MAX bytes, far more than one
/// queued segment holds.
const TRIM_STEPS_MAX: u32 = 256;

#[stream_verdict]
fn relay_verdict(ctx: SkBuffContext) -> u32 {
    // A socket without flow entries is not (or no longer) relayed by us: keep its bytes on
    // the socket for userspace (SK_PASS) rather than drop bytes TCP has already acknowledged.
    try_relay_verdict(&ctx).unwrap_or(SK_PASS)
}

fn try_relay_verdict(ctx: &SkBuffContext) -> Result<u32, ()> {
    // SAFETY: the helper only reads the skb's socket.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };
    let flow = RELAY_FLOWS.get_ptr_mut(cookie).ok_or(())?;
    // SAFETY: map values live until deleted; the program runs under the socket's lock, so
    // nothing else writes this flow's state meanwhile.
    let flow = unsafe { &mut *flow };
    // SAFETY: read-only view of a userspace-owned value.
    let control = unsafe { RELAY_CONTROLS.get(cookie) }.ok_or(())?;
    if ctx.len() == 0 || flow_stopped(flow.seq_state) {
        // A bare FIN reaches the verdict as an empty skb. Redirected, the peer's backlog
        // worker sends zero bytes, takes that for a broken pipe and fails the peer (EPIPE).
        // The FIN itself is already recorded in the socket state; dropping loses no byte.
        // A stopped flow is being reset by userspace: nothing more goes on.
        return Ok(SK_DROP);
    }
    let trimmed_before = flow.trimmed_bytes;
    let Some(len) = trim_repeated_head(ctx, flow) else {
        if logging() {
            warn!(
                ctx,
                "flow {}: a retransmission repeats more bytes than can be trimmed; the connection is reset rather than repeat or lose one",
                cookie
            );
        }
        flow.seq_state = FLOW_BROKEN;
        notify(cookie);
        return Ok(SK_DROP);
    };
    if logging() && trimmed_before == 0 && flow.trimmed_bytes != 0 {
        debug!(
            ctx,
            "flow {}: trimmed {} repeated bytes off a retransmitted segment (first trim of this flow)",
            cookie,
            flow.trimmed_bytes
        );
    }
    if len == 0 {
        // Every byte of it was handed on before.
        return Ok(SK_DROP);
    }
    let len = u64::from(len);
    // SAFETY: no arguments.
    flow.last_active_ns = unsafe { bpf_ktime_get_coarse_ns() };
    // SAFETY: a read-only global.
    let global_limit = unsafe { ptr::read_volatile(&FLOW_BACKLOG_LIMIT) };
    // The flow's own limit, sized by userspace to its destination's drain rate, asks for
    // checks.
    let limit = match control.backlog_limit {
        0 => global_limit,
        per_flow => u64::from(per_flow),
    };
    // Never below the peer's actual backlog: draining only makes it smaller.
    let backlog_bound = flow
        .redirected_bytes
        .saturating_sub(control.checkpoint_bytes);
    if flow.detached != 0 {
        if flow.passed_bytes.saturating_sub(control.passed_moved) > KEPT_LIMIT {
            // Kept bytes that find a backlog in this socket's psock queue wait there, charged
            // to no buffer, so the window stays open: a bound here, not userspace's timing.
            if logging() {
                warn!(
                    ctx,
                    "flow {}: kept bytes passed the kept limit while its destination took nothing; the connection is reset",
                    cookie
                );
            }
            flow.seq_state = FLOW_OVER_KEPT_LIMIT;
            notify(cookie);
            return Ok(SK_DROP);
        }
        // Resume only behind every byte kept here: userspace has written all of them into
        // the peer, so this segment's redirect queues after them.
        if control.passed_moved != flow.passed_bytes || backlog_bound >= limit {
            flow.passed_bytes += len;
            return Ok(SK_PASS);
        }
        flow.detached = 0;
        flow.resumptions = flow.resumptions.wrapping_add(1);
        if logging() && flow.resumptions.is_power_of_two() {
            debug!(ctx, "flow {}: resumed in the kernel ({} times)", cookie, flow.resumptions);
        }
        notify(cookie);
    }
    if backlog_bound >= hard_limit(global_limit) {
        // Userspace has not checked in time. Keeping the bytes here charges them to this
        // socket's receive buffer, so TCP itself closes the window: a bound that does not
        // depend on userspace. The flow resumes once userspace has moved what was kept.
        return Ok(detach(ctx, cookie, flow, len, "its backlog bound passed the hard limit"));
    }
    if control.listener_port == 0
        && limit < global_limit
        && backlog_bound >= flow_hard_limit(limit)
        && reverse_carried_nothing(control.peer_cookie)
    {
        // An upstream outran userspace's answer to this flow's check. Kept bytes are charged
        // to the source's receive buffer, so TCP stops the sender within a window. A flow
        // at the global budget drains fast: its bound swings by megabytes between checks
        // with nobody behind, and the global hard limit allows for that. Only the
        // upstream's flow: a client's flow detached before its echo came back would find
        // that echo queued in the client's psock, behind which its kept bytes wait
        // uncharged.
        return Ok(detach(ctx, cookie, flow, len, "its backlog bound passed its own hard limit"));
    }
    if backlog_bound >= limit && flow.checks_requested == control.checks_done {
        // Once per request: userspace answers by publishing a new checkpoint.
        flow.checks_requested = flow.checks_requested.wrapping_add(1);
        notify(cookie);
    }
    let verdict = RELAY_SOCKETS.redirect_skb(ctx, control.peer_cookie, 0) as u32;
    if verdict == SK_DROP {
        // The peer is not (or no longer) in the map.
        return Ok(detach(ctx, cookie, flow, len, "a redirect found no peer in the map"));
    }
    flow.redirected_bytes += len;
    Ok(verdict)
}

/// Whether the reverse flow (keyed by `peer_cookie`, this flow's destination) has carried
/// nothing since the connection joined the kernel, so nothing can wait in this flow's
/// source's psock to go out of it. A reverse flow idle for now is not enough: a never-reader
/// sends again once its echo has room, and a flow detached meanwhile would keep its bytes
/// behind that backlog, charged to no buffer, until [`KEPT_LIMIT`].
fn reverse_carried_nothing(peer_cookie: u64) -> bool {
    // SAFETY: a read-only view of a map value, which lives until deleted.
    unsafe { RELAY_FLOWS.get(peer_cookie) }
        .is_some_and(|reverse| reverse.redirected_bytes == 0 && reverse.passed_bytes == 0)
}

/// TCP queues a retransmitted segment that overlaps bytes already received as it came, and
/// this path (tcp_read_skb) hands it over whole, so its head would go on twice (recvmsg
/// skips such a head by copied_seq; tcp_read_skb does not, and then also advances copied_seq
/// by the whole length, which later makes TCP discard unread bytes). Cuts the repeated head
/// off. Returns the length left, or None when the head could not be cut.
fn trim_repeated_head(ctx: &SkBuffContext, flow: &mut FlowState) -> Option<u32> {
    let len = ctx.len();
    // For sk_skb programs cb[0] is the start of the socket's TCP control block: the
    // segment's sequence number.
    let seq = ctx.cb()[0];
    let end = seq.wrapping_add(len);
    if flow.seq_state == SEQ_UNKNOWN {
        // Not seeded by userspace, so it read nothing before the socket joined the map.
        flow.seq_state = SEQ_TRACKED;
        flow.next_seq = end;
        return Some(len);
    }
    let repeated = flow.next_seq.wrapping_sub(seq) as i32;
    if repeated <= 0 {
        flow.next_seq = end;
        return Some(len);
    }
    let repeated = (repeated as u32).min(len);
    let whole_steps = repeated / TRIM_STEP;
    if whole_steps > TRIM_STEPS_MAX {
        return None;
    }
    let rest = repeated % TRIM_STEP;
    if rest > 0 {
        let _ = ctx.skb.adjust_room(-(rest as i32), 0, 0);
    }
    // bpf_loop, not a loop: the verifier checks the callback once, where a loop's every
    // iteration (and its speculative paths, without CAP_PERFMON) would be followed.
    // Failures show in the length below.
    let mut skb = ctx.skb.skb;
    // SAFETY: the callback only reads the skb pointer it is given, while this frame lives.
    unsafe {
        bpf_loop(
            whole_steps,
            trim_one_step as *mut c_void,
            ptr::from_mut(&mut skb).cast(),
            0,
        );
    }
    let left = ctx.len();
    if left != len - repeated {
        return None;
    }
    flow.trimmed_bytes += u64::from(repeated);
    if (end.wrapping_sub(flow.next_seq) as i32) > 0 {
        flow.next_seq = end;
    }
    Some(left)
}

/// One bpf_loop step of [`trim_repeated_head`]: removes TRIM_STEP bytes from the head.
extern "C" fn trim_one_step(_index: u64, skb: *mut c_void) -> i64 {
    // SAFETY: bpf_loop hands back the pointer to the skb pointer it was given.
    let skb = unsafe { *skb.cast::<*mut __sk_buff>() };
    // SAFETY: a helper call on the program's own skb.
    unsafe { bpf_skb_adjust_room(skb, -(TRIM_STEP as i32), 0, 0) };
    0
}

/// Keeps this and every later byte on the socket: a failed redirect would drop it.
fn detach(ctx: &SkBuffContext, cookie: u64, flow: &mut FlowState, len: u64, why: &str) -> u32 {
    flow.detached = 1;
    flow.detachments = flow.detachments.wrapping_add(1);
    flow.passed_bytes += len;
    if logging() && flow.detachments.is_power_of_two() {
        debug!(ctx, "flow {}: detached, {} ({} times)", cookie, why, flow.detachments);
    }
    notify(cookie);
    SK_PASS
}

fn notify(cookie: u64) {
    // A full ring only delays userspace: connections also re-read their flows on a timer.
    let _ = RELAY_EVENTS.output::<u64>(&cookie, 0);
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";

