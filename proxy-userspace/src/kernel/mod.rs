//! The kernel data plane: loads the verdict program, owns its maps, and relays each
//! connection by putting both sockets into the sockhash. `connection.rs` holds a
//! connection's lifecycle, `flow.rs` one direction, `backpressure.rs` the checks and the
//! throttle, `detached.rs` a flow whose bytes userspace moves.

mod backpressure;
mod budget;
mod connection;
mod detached;
mod flow;
mod idle;
mod maps;
mod program_log;
mod watcher;

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, MapError, RingBuf, SockHash},
    programs::{ProgramError, SkSkb},
};
use proxy_common::{
    CONTROLS_MAP, DEFAULT_BACKLOG_LIMIT, EVENTS_MAP, FLOWS_MAP, GLOBAL_BACKLOG_LIMIT,
    GLOBAL_LOG_EVENTS, SOCKETS_MAP, VERDICT_PROGRAM,
};
use tokio::io::unix::AsyncFd;
use tracing::warn;

pub use connection::{Declined, KernelRelayError};
use maps::FlowMaps;
use watcher::SocketWatcher;

use crate::notice::Notice;

/// The object `cargo xtask build` compiled from proxy-ebpf, when this binary embeds one.
#[cfg(embedded_bpf)]
const OBJECT: Option<&[u8]> = {
    #[repr(C, align(8))]
    struct Aligned<T: ?Sized>(T);
    static BYTES: &Aligned<[u8]> = &Aligned(*include_bytes!(env!("PROXY_EBPF_OBJECT_PATH")));
    Some(&BYTES.0)
};
#[cfg(not(embedded_bpf))]
const OBJECT: Option<&[u8]> = None;

/// Why the kernel data plane cannot start. Each message is complete on its own: what
/// failed and the root cause from the kernel, without repeating aya's error chain.
#[derive(Debug, thiserror::Error)]
pub enum KernelLoadError {
    #[error(
        "this binary was built without the eBPF object (plain cargo build); build it with `cargo xtask build`"
    )]
    NoObject,
    #[error(
        "not allowed to load eBPF programs ({0}): run as root, or grant CAP_BPF and CAP_NET_ADMIN"
    )]
    NotPermitted(String),
    #[error("loading the eBPF object failed: {0}")]
    Object(String),
    #[error("the kernel rejected the {VERDICT_PROGRAM} program: {0}")]
    Program(String),
    #[error("eBPF object has no {0}")]
    Missing(&'static str),
    #[error("cannot watch relayed sockets: {0}")]
    Watcher(String),
}

impl KernelLoadError {
    /// Classifies an aya error by its root cause: EPERM means missing privileges.
    fn from_aya(error: &(dyn std::error::Error + 'static), wrap: fn(String) -> Self) -> Self {
        let summary = summarize(error);
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
        while let Some(e) = cause {
            if let Some(io) = e.downcast_ref::<std::io::Error>()
                && io.raw_os_error() == Some(libc::EPERM)
            {
                return Self::NotPermitted(summary);
            }
            cause = e.source();
        }
        wrap(summary)
    }
}

/// "top-level message: root cause", skipping the layers in between (aya's repeat each other).
fn summarize(error: &(dyn std::error::Error + 'static)) -> String {
    let top = error.to_string();
    let mut root = error;
    while let Some(next) = root.source() {
        root = next;
    }
    let root = root.to_string();
    if top.contains(&root) {
        top
    } else {
        format!("{top}: {root}")
    }
}

pub struct KernelDataPlane {
    maps: FlowMaps,
    /// The program's FLOW_BACKLOG_LIMIT: the backlog bound that makes it ask for a check;
    /// see proxy_common::throttle_from and release_at for what userspace does with it.
    backlog_limit: u64,
    /// Connections the map would not take, relayed in userspace instead.
    fallbacks: AtomicU64,
    /// Repeated heads of retransmitted segments the program trimmed, over closed connections.
    trimmed: AtomicU64,
    /// Connections that joined the maps after a userspace warm-up (`auto`).
    promoted: AtomicU64,
    /// Times a direction of a kernel-relayed connection left the kernel (its backlog bound
    /// passed the hard limit, or the peer left the map), and came back into it.
    detached: AtomicU64,
    resumed: AtomicU64,
    /// The "maps declined" warning, at most one a minute however many are declined.
    declined_notice: Notice,
    /// Connections reset because a detached flow kept more than the kernel can be left to
    /// hold (proxy_common::KEPT_LIMIT), and their warning.
    kept_resets: AtomicU64,
    kept_reset_notice: Notice,
    watcher: Arc<SocketWatcher>,
    // Dropping the Ebpf detaches the program and frees the maps: it lives as long as we do.
    _ebpf: Ebpf,
}

/// Lowers the per-flow backlog limit for tests, which use it to drive flows through
/// detaching and resuming at loopback speed; an operator has no reason to set it.
const BACKLOG_LIMIT_VAR: &str = "EBPF_PROXY_BACKLOG_LIMIT";

/// The program's FLOW_BACKLOG_LIMIT: [`DEFAULT_BACKLOG_LIMIT`] unless the environment asks
/// for less.
fn backlog_limit() -> u64 {
    let Ok(text) = std::env::var(BACKLOG_LIMIT_VAR) else {
        return DEFAULT_BACKLOG_LIMIT;
    };
    match text.parse::<u64>() {
        Ok(bytes) if (64 << 10..=DEFAULT_BACKLOG_LIMIT).contains(&bytes) => bytes,
        _ => {
            tracing::warn!(
                "{BACKLOG_LIMIT_VAR}={text:?} ignored: bytes from 65536 to {DEFAULT_BACKLOG_LIMIT}"
            );
            DEFAULT_BACKLOG_LIMIT
        }
    }
}

impl KernelDataPlane {
    /// Loads and attaches the verdict program, then starts the tasks that dispatch socket
    /// and program notifications. Must be called inside a tokio runtime.
    pub fn load(max_sockets: u32) -> Result<Arc<Self>, KernelLoadError> {
        let object = OBJECT.ok_or(KernelLoadError::NoObject)?;
        check_capabilities()?;
        let backlog_limit = backlog_limit();

        let log_events = program_log::allowed();
        let mut ebpf = EbpfLoader::new()
            .override_global(GLOBAL_BACKLOG_LIMIT, &backlog_limit, true)
            .override_global(GLOBAL_LOG_EVENTS, &u8::from(log_events), true)
            .map_max_entries(SOCKETS_MAP, max_sockets)
            .map_max_entries(FLOWS_MAP, max_sockets)
            .map_max_entries(CONTROLS_MAP, max_sockets)
            .load(object)
            .map_err(|e| KernelLoadError::from_aya(&e, KernelLoadError::Object))?;

        if log_events {
            program_log::forward(&mut ebpf);
        }
        let sockets: SockHash<MapData, u64> = take_map(&mut ebpf, SOCKETS_MAP)?;
        let flows = take_map(&mut ebpf, FLOWS_MAP)?;
        let controls = take_map(&mut ebpf, CONTROLS_MAP)?;
        let events: RingBuf<MapData> = take_map(&mut ebpf, EVENTS_MAP)?;

        let program: &mut SkSkb = ebpf
            .program_mut(VERDICT_PROGRAM)
            .ok_or(KernelLoadError::Missing(VERDICT_PROGRAM))?
            .try_into()
            .map_err(|e: ProgramError| KernelLoadError::from_aya(&e, KernelLoadError::Program))?;
        program
            .load()
            .map_err(|e| KernelLoadError::from_aya(&e, KernelLoadError::Program))?;
        // Attach before any socket joins the map, so no socket ever runs without a verdict.
        program
            .attach(sockets.fd())
            .map_err(|e| KernelLoadError::from_aya(&e, KernelLoadError::Program))?;

        let watcher =
            Arc::new(SocketWatcher::new().map_err(|e| KernelLoadError::Watcher(e.to_string()))?);
        // SAFETY: the ring's fd belongs to the RingBuf, which the AsyncFd owns until it drops.
        let events = unsafe { AsyncFd::register(events) }
            .map_err(|e| KernelLoadError::Watcher(std::io::Error::from(e).to_string()))?;
        tokio::spawn(dispatch_socket_events(Arc::clone(&watcher)));
        tokio::spawn(dispatch_notifications(events, Arc::clone(&watcher)));

        Ok(Arc::new(Self {
            maps: FlowMaps::new(sockets, flows, controls),
            watcher,
            backlog_limit,
            fallbacks: AtomicU64::new(0),
            trimmed: AtomicU64::new(0),
            promoted: AtomicU64::new(0),
            detached: AtomicU64::new(0),
            resumed: AtomicU64::new(0),
            declined_notice: Notice::default(),
            kept_resets: AtomicU64::new(0),
            kept_reset_notice: Notice::default(),
            _ebpf: ebpf,
        }))
    }

    /// Connections relayed in userspace because their sockets could not join the map.
    pub fn fallbacks(&self) -> u64 {
        self.fallbacks.load(Ordering::Relaxed)
    }

    /// Bytes the program trimmed off retransmitted segments, over closed connections.
    pub fn trimmed_bytes(&self) -> u64 {
        self.trimmed.load(Ordering::Relaxed)
    }

    /// Counts a connection that moves into the maps after its userspace warm-up.
    pub fn count_promotion(&self) {
        self.promoted.fetch_add(1, Ordering::Relaxed);
    }

    pub fn promotions(&self) -> u64 {
        self.promoted.load(Ordering::Relaxed)
    }

    /// Times a direction left the kernel mid-connection for userspace.
    pub fn detachments(&self) -> u64 {
        self.detached.load(Ordering::Relaxed)
    }

    /// Times a detached direction came back into the kernel.
    pub fn resumptions(&self) -> u64 {
        self.resumed.load(Ordering::Relaxed)
    }

    /// Connections reset because a detached flow kept too much in the kernel.
    pub fn kept_resets(&self) -> u64 {
        self.kept_resets.load(Ordering::Relaxed)
    }

    /// Entries currently in the socket map: what leak checks compare against zero.
    pub fn socket_entries(&self) -> usize {
        self.maps.socket_entries()
    }

    /// Flow records (states and controls) currently in the maps: leak checks compare it
    /// against zero too.
    pub fn flow_records(&self) -> usize {
        self.maps.flow_records()
    }
}

impl crate::memory::Backlogs for KernelDataPlane {
    fn backlog_bound(&self, source_cookie: u64) -> u64 {
        self.maps.backlog_bound(source_cookie)
    }
}

/// Names the missing capabilities up front, rather than leave the operator one EPERM from
/// whichever call fails first. CAP_SYS_ADMIN covers CAP_BPF.
fn check_capabilities() -> Result<(), KernelLoadError> {
    let admin = crate::sys::has_capability(crate::sys::CAP_SYS_ADMIN);
    let missing: Vec<&str> = [
        ("CAP_BPF", crate::sys::CAP_BPF, admin),
        ("CAP_NET_ADMIN", crate::sys::CAP_NET_ADMIN, false),
    ]
    .into_iter()
    .filter(|(_, cap, covered)| !covered && !crate::sys::has_capability(*cap))
    .map(|(name, _, _)| name)
    .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(KernelLoadError::NotPermitted(format!(
            "missing {}",
            missing.join(", ")
        )))
    }
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, KernelLoadError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(KernelLoadError::Missing(name))?;
    T::try_from(map).map_err(|e| KernelLoadError::Object(format!("map {name}: {}", summarize(&e))))
}

async fn dispatch_socket_events(watcher: Arc<SocketWatcher>) {
    if let Err(e) = watcher.run().await {
        warn!("kernel-mode socket watcher stopped: {e}");
    }
}

async fn dispatch_notifications(
    mut events: AsyncFd<RingBuf<MapData>>,
    watcher: Arc<SocketWatcher>,
) {
    loop {
        let mut guard = match events.readable_mut().await {
            Ok(guard) => guard,
            Err(e) => {
                warn!("kernel notifications stopped: {e}");
                return;
            }
        };
        raise_notified(guard.get_inner_mut(), &watcher);
        guard.clear_ready();
        // A record that came after the drain above gave its wakeup to the readiness just
        // cleared, and the ring wakes its reader only once that reader has caught up: left
        // there, it would hold back every notification after it.
        raise_notified(guard.get_inner_mut(), &watcher);
    }
}

/// Hands each queued notification to the connection whose socket it names.
fn raise_notified(ring: &mut RingBuf<MapData>, watcher: &SocketWatcher) {
    while let Some(item) = ring.next() {
        let Ok(cookie) = <[u8; 8]>::try_from(&item[..]) else {
            continue;
        };
        if let Some(signals) = watcher.signals(u64::from_ne_bytes(cookie)) {
            signals.raise_notified();
        }
    }
}
