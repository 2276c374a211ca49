//! One certificate order (RFC 8555): the account, an order for every name, each name
//! proven by TLS-ALPN-01 (RFC 8737) through the TLS listeners, then the CSR and the chain.

use std::time::Duration;

use instant_acme::{
    Account, AuthorizationStatus, ChallengeType, Identifier, NewAccount, NewOrder, Order,
    OrderStatus, RetryPolicy,
};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tracing::info;

use super::{
    AcmeError,
    client::http_client,
    store::{Issued, Store},
};
use crate::{config::AcmeConfig, tls::Certificates};

/// How long the CA may take to validate every name, and then to issue.
const VALIDATION_DEADLINE: Duration = Duration::from_secs(120);
const ISSUE_DEADLINE: Duration = Duration::from_secs(120);
/// The problem type of an account the CA no longer knows (RFC 8555 6.7).
const ACCOUNT_DOES_NOT_EXIST: &str = "urn:ietf:params:acme:error:accountDoesNotExist";

pub async fn obtain(
    config: &AcmeConfig,
    store: &Store,
    certificates: &Certificates,
) -> Result<Issued, AcmeError> {
    let registered = account(config, store, false).await?;
    let identifiers: Vec<Identifier> = config
        .domains
        .iter()
        .map(|name| Identifier::Dns(name.clone()))
        .collect();
    let order = registered.new_order(&NewOrder::new(&identifiers)).await;
    let mut order = match order {
        Err(instant_acme::Error::Api(problem))
            if problem.r#type.as_deref() == Some(ACCOUNT_DOES_NOT_EXIST) =>
        {
            info!("acme: the CA no longer knows the stored account; registering a new one");
            let registered = account(config, store, true).await?;
            registered.new_order(&NewOrder::new(&identifiers)).await?
        }
        order => order?,
    };
    let mut challenges = Challenges {
        certificates,
        names: Vec::new(),
    };
    let mut authorizations = order.authorizations();
    while let Some(authorization) = authorizations.next().await {
        let mut authorization = authorization?;
        match authorization.status {
            AuthorizationStatus::Pending => {}
            AuthorizationStatus::Valid => continue,
            status => {
                return Err(AcmeError::Refused(format!(
                    "the CA's authorization for {} is {status:?}",
                    authorization.identifier()
                )));
            }
        }
        let mut challenge = authorization
            .challenge(ChallengeType::TlsAlpn01)
            .ok_or_else(|| AcmeError::Refused("the CA offers no tls-alpn-01 challenge".into()))?;
        let name = challenge.identifier().to_string();
        let (chain, key) =
            challenge_certificate(&name, challenge.key_authorization().digest().as_ref())?;
        certificates.start_challenge(&name, chain, key)?;
        challenges.names.push(name);
        challenge.set_ready().await?;
    }
    let validating = RetryPolicy::new().timeout(VALIDATION_DEADLINE);
    let status = order.poll_ready(&validating).await?;
    drop(challenges);
    if status != OrderStatus::Ready {
        return Err(AcmeError::Refused(format!(
            "the CA could not validate {} ({}); it connects to port 443 of each name's address and asks for acme-tls/1",
            config.domains.join(", "),
            validation_problems(&mut order).await
        )));
    }
    let key = rcgen::KeyPair::generate().map_err(certificate_error)?;
    let mut params =
        rcgen::CertificateParams::new(config.domains.clone()).map_err(certificate_error)?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    let request = params.serialize_request(&key).map_err(certificate_error)?;
    order.finalize_csr(request.der()).await?;
    let chain = order
        .poll_certificate(&RetryPolicy::new().timeout(ISSUE_DEADLINE))
        .await?;
    Issued::new(chain, key.serialize_pem(), &config.domains)
}

/// What the CA said of each failed challenge, as one line.
async fn validation_problems(order: &mut Order) -> String {
    let mut problems = Vec::new();
    let mut authorizations = order.authorizations();
    while let Some(Ok(mut authorization)) = authorizations.next().await {
        let name = authorization.identifier().to_string();
        let Ok(state) = authorization.refresh().await else {
            continue;
        };
        for challenge in &state.challenges {
            if let Some(problem) = &challenge.error {
                let detail = problem.detail.as_deref().unwrap_or("no detail");
                problems.push(format!("{name}: {detail}"));
            }
        }
    }
    if problems.is_empty() {
        return "the CA gave no reason".to_owned();
    }
    problems.join("; ")
}

/// The stored account, or a new one registered (and stored) when there is none or `anew`.
async fn account(config: &AcmeConfig, store: &Store, anew: bool) -> Result<Account, AcmeError> {
    let http = || http_client(config.directory_ca.as_deref());
    if !anew && let Some(credentials) = store.account()? {
        return Ok(Account::builder_with_http(http()?)
            .from_credentials(credentials)
            .await?);
    }
    let contact: Vec<&str> = config.contact.iter().map(String::as_str).collect();
    let (account, credentials) = Account::builder_with_http(http()?)
        .create(
            &NewAccount {
                contact: &contact,
                terms_of_service_agreed: true,
                only_return_existing: false,
            },
            config.directory.clone(),
            None,
        )
        .await?;
    store.save_account(&credentials)?;
    info!("acme: registered an account with {}", config.directory);
    Ok(account)
}

/// The certificate a CA expects for `name` in an acme-tls/1 handshake: self-signed, the
/// name as its only one, and the critical acmeIdentifier extension holding `digest`.
fn challenge_certificate(
    name: &str,
    digest: &[u8],
) -> Result<
    (
        Vec<rustls::pki_types::CertificateDer<'static>>,
        PrivateKeyDer<'static>,
    ),
    AcmeError,
> {
    let key = rcgen::KeyPair::generate().map_err(certificate_error)?;
    let mut params =
        rcgen::CertificateParams::new(vec![name.to_owned()]).map_err(certificate_error)?;
    params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(digest)];
    let certificate = params.self_signed(&key).map_err(certificate_error)?;
    let key = PrivatePkcs8KeyDer::from(key.serialize_der());
    Ok((vec![certificate.der().clone()], key.into()))
}

fn certificate_error(e: rcgen::Error) -> AcmeError {
    AcmeError::Certificate(e.to_string())
}

/// The challenges answered for one order, withdrawn when it ends however it ends.
struct Challenges<'a> {
    certificates: &'a Certificates,
    names: Vec<String>,
}

impl Drop for Challenges<'_> {
    fn drop(&mut self) {
        for name in &self.names {
            self.certificates.end_challenge(name);
        }
    }
}
