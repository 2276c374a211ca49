//! The HTTPS client ACME talks to the CA with: hyper and rustls, trusting Mozilla's roots
//! compiled in (a FROM-scratch image has no system store) plus the operator's extra root.

use std::{path::Path, sync::Arc};

use bytes::Bytes;
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use instant_acme::{BodyWrapper, HttpClient};
use rustls::{ClientConfig, RootCertStore};

use super::AcmeError;
use crate::tls::{TlsError, read_chain};

pub fn http_client(extra_root: Option<&Path>) -> Result<Box<dyn HttpClient>, AcmeError> {
    let mut roots = RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    if let Some(path) = extra_root {
        let error = |reason: String| AcmeError::DirectoryCa {
            path: path.display().to_string(),
            reason,
        };
        let chain = read_chain(path).map_err(|e| match e {
            TlsError::Certificate { reason, .. } => error(reason),
            other => error(other.to_string()),
        })?;
        for certificate in chain {
            roots.add(certificate).map_err(|e| error(e.to_string()))?;
        }
    }
    let tls =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| AcmeError::Certificate(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .build();
    Ok(Box::new(
        Client::builder(TokioExecutor::new()).build::<_, BodyWrapper<Bytes>>(connector),
    ))
}
