//! Certificates from an ACME CA (Let's Encrypt by default) for the TLS listeners: the
//! stored one at start, a new one ordered when it is missing or has a third of its life
//! left, each swapped in without a restart. Names are proven by TLS-ALPN-01 on the TLS
//! listeners themselves, so no port 80 is needed.

mod client;
mod order;
mod store;

use std::{io, sync::Arc, time::Duration};

use time::OffsetDateTime;
use tracing::{info, warn};

use store::{Issued, Store};

use crate::{
    config::AcmeConfig,
    tls::{Certificates, TlsError, date},
};

#[derive(Debug, thiserror::Error)]
pub enum AcmeError {
    #[error("cannot use the state directory {path}")]
    State {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot read the ACME directory CA {path}: {reason}")]
    DirectoryCa { path: String, reason: String },
    #[error(transparent)]
    Acme(#[from] instant_acme::Error),
    #[error("{0}")]
    Refused(String),
    #[error("the certificate: {0}")]
    Certificate(String),
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// The first wait after a failed order; each failure doubles it up to [`LAST_RETRY`].
const FIRST_RETRY: Duration = Duration::from_secs(60);
/// Let's Encrypt allows 5 failed validations per name an hour; one try an hour stays
/// well inside it.
const LAST_RETRY: Duration = Duration::from_secs(3600);

/// What can be checked before the first order: the directory CA reads, the state
/// directory can be made.
pub fn check(config: &AcmeConfig) -> Result<(), AcmeError> {
    client::http_client(config.directory_ca.as_deref())?;
    Store::open(config).map(drop)
}

/// The longest the renewal task sleeps before it looks at the wall clock again.
const RECHECK: Duration = Duration::from_secs(12 * 3600);

/// Keeps `certificates` serving a valid certificate for `config`'s names, until aborted.
pub async fn keep_certified(config: AcmeConfig, certificates: Arc<Certificates>) {
    let names = config.domains.join(", ");
    let store = match Store::open(&config) {
        Ok(store) => store,
        Err(e) => {
            return warn!(
                "acme: cannot keep certificates for {names} ({}); the TLS listeners keep their self-signed certificate",
                explain(&e)
            );
        }
    };
    let mut held = store.certificate(&config.domains);
    if let Some(issued) = &held {
        serve(&certificates, issued, "the stored");
    }
    let mut retry = FIRST_RETRY;
    loop {
        if let Some(issued) = &held {
            // By the wall clock, looked at again at least every RECHECK: tokio's clock
            // stands still while a VM is suspended.
            while let Ok(wait) = Duration::try_from(issued.renew_at() - OffsetDateTime::now_utc())
                && !wait.is_zero()
            {
                tokio::time::sleep(wait.min(RECHECK)).await;
            }
            info!("acme: renewing the certificate for {names}");
        } else {
            info!(
                "acme: ordering a certificate for {names} from {}",
                config.directory
            );
        }
        match order::obtain(&config, &store, &certificates).await {
            Ok(issued) => {
                if let Err(e) = store.save_certificate(&issued) {
                    warn!(
                        "acme: the new certificate is served but not stored: {}",
                        explain(&e)
                    );
                }
                serve(&certificates, &issued, "a new");
                held = Some(issued);
                retry = FIRST_RETRY;
            }
            Err(e) => {
                warn!(
                    "acme: no certificate for {names}: {}; trying again in {retry:?}",
                    explain(&e)
                );
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(LAST_RETRY);
            }
        }
    }
}

fn serve(certificates: &Certificates, issued: &Issued, which: &str) {
    let installed = issued
        .key()
        .and_then(|key| Ok(certificates.replace(issued.chain(), key)?));
    match installed {
        Ok(()) => info!(
            "acme: serving {which} certificate for {}, valid until {}; renewal from {}",
            issued.domains.join(", "),
            date(issued.validity.not_after),
            date(issued.renew_at())
        ),
        Err(e) => warn!("acme: {which} certificate is unusable: {}", explain(&e)),
    }
}

/// An error and its causes, on one line.
fn explain(e: &AcmeError) -> String {
    let mut text = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(error) = cause {
        text = format!("{text}: {error}");
        cause = error.source();
    }
    text
}
