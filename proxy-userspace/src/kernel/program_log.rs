//! The verdict program's own log lines (aya-log): its rare events, each kind limited in the
//! program, read from its log ring buffer and handed to tracing under the target
//! `ebpf_proxy::program`. The program picks the level: warn for what an operator must see
//! (a retransmission too long to trim), debug for the rest. Lines name flows by socket
//! cookie, never by client address.

use aya::Ebpf;
use aya_log::EbpfLogger;
use tokio::io::unix::AsyncFd;
use tracing::{debug, warn};

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
