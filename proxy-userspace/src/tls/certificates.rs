//! The certificate TLS listeners serve, replaced whole while running (new handshakes get
//! the new one, established connections keep theirs), and the challenge certificates of
//! names a CA is validating.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
};

use rustls::{
    ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer},
    server::{ClientHello, ResolvesServerCert},
    sign::{CertifiedKey, SigningKey},
};

use super::{ACME_TLS_ALPN, TlsError, Validity, provider, server_config};

#[derive(Debug)]
pub struct Certificates {
    current: RwLock<Served>,
    /// By lower-case name: a configuration that serves only that name's challenge
    /// certificate and speaks only acme-tls/1.
    challenges: RwLock<HashMap<String, Arc<ServerConfig>>>,
}

/// The certificate served, and when it is valid (None: its validity does not read).
#[derive(Debug)]
struct Served {
    key: Arc<CertifiedKey>,
    validity: Option<Validity>,
}

impl Certificates {
    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Self, TlsError> {
        Ok(Self {
            current: RwLock::new(served(chain, key)?),
            challenges: RwLock::default(),
        })
    }

    /// Serves `chain` from the next handshake on.
    pub fn replace(
        &self,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<(), TlsError> {
        let next = served(chain, key)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = next;
        Ok(())
    }

    /// When the certificate served stops being valid.
    pub fn not_after(&self) -> Option<time::OffsetDateTime> {
        let current = self.current.read().unwrap_or_else(|e| e.into_inner());
        current.validity.map(|validity| validity.not_after)
    }

    /// Answers a CA's acme-tls/1 handshakes for `name` with `chain` until
    /// [`Self::end_challenge`].
    pub fn start_challenge(
        &self,
        name: &str,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<(), TlsError> {
        // Not checked by `certified`: webpki refuses to parse the critical acmeIdentifier
        // extension, which only the CA reads.
        let challenge = CertifiedKey::new(chain, signing_key(key)?);
        let mut config =
            server_config()?.with_cert_resolver(Arc::new(Challenge(Arc::new(challenge))));
        config.alpn_protocols = vec![ACME_TLS_ALPN.to_vec()];
        self.challenges
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_ascii_lowercase(), Arc::new(config));
        Ok(())
    }

    pub fn end_challenge(&self, name: &str) {
        self.challenges
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&name.to_ascii_lowercase());
    }

    pub(super) fn challenge(&self, name: &str) -> Option<Arc<ServerConfig>> {
        let challenges = self.challenges.read().unwrap_or_else(|e| e.into_inner());
        challenges.get(name).cloned()
    }
}

impl ResolvesServerCert for Certificates {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let current = self.current.read().unwrap_or_else(|e| e.into_inner());
        Some(Arc::clone(&current.key))
    }
}

/// One name's challenge certificate, whatever the hello asks.
#[derive(Debug)]
struct Challenge(Arc<CertifiedKey>);

impl ResolvesServerCert for Challenge {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.0))
    }
}

fn signing_key(key: PrivateKeyDer<'static>) -> Result<Arc<dyn SigningKey>, TlsError> {
    provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| TlsError::Config(e.to_string()))
}

fn served(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Served, TlsError> {
    let validity = chain.first().and_then(|leaf| Validity::of(leaf));
    Ok(Served {
        key: certified(chain, key)?,
        validity,
    })
}

fn certified(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<CertifiedKey>, TlsError> {
    let certified = CertifiedKey::new(chain, signing_key(key)?);
    // The key must be the certificate's: a mismatch would fail every handshake instead.
    certified
        .keys_match()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    Ok(Arc::new(certified))
}
