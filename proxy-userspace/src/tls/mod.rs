//! TLS for listeners that terminate it (rustls with ring): the certificate every TLS
//! listener serves (the operator's PEM files, a self-signed one, or one from ACME, swapped
//! while running), and the answers to ACME's TLS-ALPN-01 validation.

mod certificates;
mod self_signed;
mod validity;

use std::{io, path::Path, sync::Arc};

use rustls::{
    ServerConfig,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::Acceptor,
};
use tokio::{io::AsyncWriteExt, net::TcpStream};
use tokio_rustls::{LazyConfigAcceptor, server::TlsStream};

pub use certificates::Certificates;
pub use validity::{Validity, date};

use crate::config::TlsSource;

/// The ALPN protocol of ACME's TLS-ALPN-01 validation (RFC 8737).
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read the TLS certificate {path}: {reason}")]
    Certificate { path: String, reason: String },
    #[error("cannot read the TLS key {path}: {reason}")]
    Key { path: String, reason: String },
    #[error("cannot make a self-signed certificate: {0}")]
    Generate(String),
    #[error("the TLS certificate and key do not work together: {0}")]
    Config(String),
}

/// The TLS side every TLS listener shares.
pub struct ServerTls {
    config: Arc<ServerConfig>,
    certificates: Arc<Certificates>,
}

/// What a TLS client turned out to be.
pub enum Accepted {
    /// A client of the listener, handshake done.
    Client(Box<TlsStream<TcpStream>>),
    /// An ACME CA validating a name: it saw the challenge certificate, and is done.
    Validation,
}

impl ServerTls {
    /// Serves `source`'s certificate: read (or made) now. An ACME source starts with a
    /// self-signed certificate until the first one arrives through [`Self::certificates`].
    pub fn new(source: &TlsSource) -> Result<Self, TlsError> {
        let (chain, key) = match source {
            TlsSource::Files { cert, key } => (read_chain(cert)?, read_key(key)?),
            TlsSource::SelfSigned | TlsSource::Acme(_) => self_signed::self_signed()?,
        };
        let certificates = Arc::new(Certificates::new(chain, key)?);
        let config = server_config()?.with_cert_resolver(Arc::clone(&certificates) as _);
        Ok(Self {
            config: Arc::new(config),
            certificates,
        })
    }

    /// What the listeners serve, which ACME replaces.
    pub fn certificates(&self) -> &Arc<Certificates> {
        &self.certificates
    }

    /// Reads the ClientHello and completes the handshake: as the listener's certificate, or
    /// with the challenge certificate when a CA validates a name by TLS-ALPN-01.
    pub async fn accept(&self, stream: TcpStream) -> io::Result<Accepted> {
        let start = LazyConfigAcceptor::new(Acceptor::default(), stream).await?;
        let hello = start.client_hello();
        let validating = hello
            .alpn()
            .is_some_and(|mut protocols| protocols.any(|p| p == ACME_TLS_ALPN));
        if !validating {
            let stream = start.into_stream(Arc::clone(&self.config)).await?;
            return Ok(Accepted::Client(Box::new(stream)));
        }
        let name = hello.server_name().map(str::to_ascii_lowercase);
        let Some(config) = name.and_then(|name| self.certificates.challenge(&name)) else {
            return Err(io::Error::other(
                "an acme-tls/1 hello for a name with no validation under way",
            ));
        };
        let mut stream = start.into_stream(config).await?;
        // RFC 8737: the CA closes once it has seen the certificate; nothing is relayed.
        stream.shutdown().await?;
        Ok(Accepted::Validation)
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn server_config()
-> Result<rustls::ConfigBuilder<ServerConfig, rustls::server::WantsServerCert>, TlsError> {
    Ok(ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth())
}

/// Checks that the operator's certificate files read and work together.
pub fn check_files(cert: &Path, key: &Path) -> Result<(), TlsError> {
    Certificates::new(read_chain(cert)?, read_key(key)?).map(drop)
}

/// Every certificate in a PEM file; at least one.
pub fn read_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let error = |reason: String| TlsError::Certificate {
        path: path.display().to_string(),
        reason,
    };
    let chain = CertificateDer::pem_file_iter(path)
        .map_err(|e| error(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| error(e.to_string()))?;
    if chain.is_empty() {
        return Err(error("no CERTIFICATE block in it".into()));
    }
    Ok(chain)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::Key {
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}
