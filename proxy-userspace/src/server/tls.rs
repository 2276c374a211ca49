//! The TLS listeners' certificate as running: made at start, kept across reloads while
//! its source is unchanged (certificate files are read again, so a renewed file applies
//! on SIGHUP), and, for ACME, the task that renews it.

use std::sync::Arc;

use tokio::task::JoinHandle;
use tracing::warn;

use super::RelayError;
use crate::{
    acme,
    config::{Config, TlsSource},
    tls::ServerTls,
};

/// Where TLS-ALPN-01 validation connects.
const HTTPS: u16 = 443;

pub struct RunningTls {
    source: TlsSource,
    pub server: Arc<ServerTls>,
    renewal: Option<JoinHandle<()>>,
}

impl RunningTls {
    /// What `config` needs: nothing without TLS listeners.
    pub fn start(config: &Config) -> Result<Option<Arc<Self>>, RelayError> {
        if !config.listeners.iter().any(|l| l.tls) {
            return Ok(None);
        }
        if let TlsSource::Acme(acme) = &config.tls {
            acme::check(acme)?;
            if !config
                .listeners
                .iter()
                .any(|l| l.tls && l.listen.port() == HTTPS)
            {
                warn!(
                    "acme: the CA validates names on port 443, and no TLS listener is on it: validation fails unless 443 is forwarded to one"
                );
            }
        }
        let server = Arc::new(ServerTls::new(&config.tls)?);
        let renewal = match &config.tls {
            TlsSource::Acme(acme) => Some(tokio::spawn(acme::keep_certified(
                acme.clone(),
                Arc::clone(server.certificates()),
            ))),
            TlsSource::SelfSigned | TlsSource::Files { .. } => None,
        };
        Ok(Some(Arc::new(Self {
            source: config.tls.clone(),
            server,
            renewal,
        })))
    }

    /// For a reload to `config`: `running` itself when it serves the same source.
    pub fn next(
        running: Option<&Arc<Self>>,
        config: &Config,
    ) -> Result<Option<Arc<Self>>, RelayError> {
        match running {
            Some(running)
                if running.source == config.tls
                    && !matches!(config.tls, TlsSource::Files { .. })
                    && config.listeners.iter().any(|l| l.tls) =>
            {
                Ok(Some(Arc::clone(running)))
            }
            _ => Self::start(config),
        }
    }
}

impl Drop for RunningTls {
    fn drop(&mut self) {
        if let Some(renewal) = &self.renewal {
            renewal.abort();
        }
    }
}
