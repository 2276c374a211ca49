//! The verdict program's own log lines (aya-log): its rare events, each kind limited in the
//! program, read from its log ring buffer and handed to tracing under the target
//! `ebpf_proxy::program`. The program picks the level: warn for what an operator must see
//! (a retransmission too long to trim), debug for the rest. Lines name flows by socket
//! cookie, never by client address. aya-log copies each record with pointer arithmetic
//! the verifier allows only to a loader with CAP_PERFMON (or CAP_SYS_ADMIN); without it the
//! program is loaded with its logging off, and its events show in the metrics only.

use aya::Ebpf;
use aya_log::EbpfLogger;
use tokio::io::unix::AsyncFd;
use tracing::{debug, info, warn};

use crate::sys;

/// Forwards the program's records to tracing.
struct ToTracing;

impl log::Log for ToTracing {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        match record.level() {
            log::Level::Error | log::Level::Warn => {
                warn!(target: "ebpf_proxy::program", "{}", record.args());
            }
            _ => debug!(target: "ebpf_proxy::program", "{}", record.args()),
        }
    }

    fn flush(&self) {}
}

/// Whether this process may load the program with its logging on; says so once when not.
pub fn allowed() -> bool {
    let allowed = sys::has_capability(sys::CAP_PERFMON) || sys::has_capability(sys::CAP_SYS_ADMIN);
    if !allowed {
        info!(
            "the eBPF program's event log is off: it needs CAP_PERFMON, which this process lacks (its events are still counted in the metrics)"
        );
    }
    allowed
}

/// Starts forwarding the program's log; without its ring buffer the relay runs on, silent.
pub fn forward(ebpf: &mut Ebpf) {
    let logger = match EbpfLogger::init_with_logger(ebpf, ToTracing) {
        Ok(logger) => logger,
        Err(e) => return warn!("the eBPF program's log is not available: {e}"),
    };
    // SAFETY: the ring's fd belongs to the logger, which the AsyncFd owns until it drops.
    let registered =
        unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) };
    let mut logger = match registered {
        Ok(logger) => logger,
        Err(e) => return warn!("cannot watch the eBPF program's log: {e}"),
    };
    tokio::spawn(async move {
        loop {
            let Ok(mut guard) = logger.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
}
