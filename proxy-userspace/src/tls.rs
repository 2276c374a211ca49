//! TLS for listeners that terminate it (rustls with ring): the operator's PEM files, or a
//! self-signed certificate with random names made at start, as WhatsApp's proxy does.

use std::{path::Path, sync::Arc};

use rand::{Rng, distr::Alphabetic};
use rustls::{
    ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, pem::PemObject},
};
use tokio_rustls::TlsAcceptor;

use crate::config::TlsSource;

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

/// Builds the acceptor every TLS listener shares.
pub fn acceptor(source: &TlsSource) -> Result<TlsAcceptor, TlsError> {
    let (chain, key) = match source {
        TlsSource::Files { cert, key } => (read_chain(cert)?, read_key(key)?),
        TlsSource::SelfSigned => self_signed()?,
    };
    let config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|e| TlsError::Config(e.to_string()))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

fn read_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
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

/// A certificate for a random name such as `kqzvhwmd.example`, so the relay does not
/// stand out by a fixed name.
fn self_signed() -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let label = |len| -> String {
        rand::rng()
            .sample_iter(Alphabetic)
            .take(len)
            .map(|c| char::from(c).to_ascii_lowercase())
            .collect()
    };
    let name = format!("{}.{}.net", label(10), label(8));
    let generated = rcgen::generate_simple_self_signed(vec![name])
        .map_err(|e| TlsError::Generate(e.to_string()))?;
    let key = PrivatePkcs8KeyDer::from(generated.signing_key.serialize_der());
    Ok((vec![generated.cert.der().clone()], key.into()))
}
