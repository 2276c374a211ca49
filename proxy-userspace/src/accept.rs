//! What an accept loop does when accept(2) fails (EMFILE, ENFILE, ENOMEM): pause instead of
//! spinning on the same error, say so once per episode, and say when it works again.

use std::{io, time::Duration};

use tracing::{info, warn};

/// Long enough not to spin, short enough to recover as soon as descriptors free up.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

pub struct AcceptErrors {
    what: String,
    failing: bool,
}

impl AcceptErrors {
    pub fn new(what: String) -> Self {
        Self {
            what,
            failing: false,
        }
    }

    pub fn succeeded(&mut self) {
        if std::mem::take(&mut self.failing) {
            info!("{}: accepting again", self.what);
        }
    }

    pub async fn failed(&mut self, e: &io::Error) {
        if !std::mem::replace(&mut self.failing, true) {
            warn!(
                "{}: accept failed: {e}; retrying every {ACCEPT_BACKOFF:?} until it works",
                self.what
            );
        }
        tokio::time::sleep(ACCEPT_BACKOFF).await;
    }
}
