//! The `[tls]` ACME settings as the relay runs them: names checked as a CA would take them,
//! the directory URL, the contact as a URI, where the state is kept.

use std::{ops::Range, path::PathBuf};

use toml::Spanned;

use super::TlsSection;

/// Let's Encrypt's production directory.
pub const LETS_ENCRYPT: &str = "https://acme-v02.api.letsencrypt.org/directory";
/// Where the state is kept unless `--state-dir` says otherwise (systemd's StateDirectory).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/ebpf-proxy";
/// The longest DNS name, in characters.
const MAX_NAME: usize = 253;
/// The longest DNS label.
const MAX_LABEL: usize = 63;

/// Certificates obtained and renewed from an ACME CA.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcmeConfig {
    /// Lower case, sorted, without repeats: one certificate holds them all.
    pub domains: Vec<String>,
    pub directory: String,
    pub directory_ca: Option<PathBuf>,
    /// A `mailto:` URI.
    pub contact: Option<String>,
    pub state_dir: PathBuf,
}

/// What is wrong with an ACME setting, and where it was written (None: a flag).
pub type SettingError = (Option<Range<usize>>, String);

/// The ACME settings of `tls`, if it names domains.
pub fn acme(
    tls: &TlsSection,
    state_dir: Option<&PathBuf>,
) -> Result<Option<AcmeConfig>, SettingError> {
    let at = |value: &Spanned<String>| Some(value.span()).filter(|span| !span.is_empty());
    let Some(names) = tls.acme_domains.as_ref().filter(|names| !names.is_empty()) else {
        let lone = [&tls.acme_directory, &tls.acme_contact]
            .into_iter()
            .flatten()
            .next();
        return match (lone, &tls.acme_directory_ca) {
            (Some(value), _) => Err((at(value), "ACME settings need acme_domains".into())),
            (None, Some(ca)) => Err((Some(ca.span()), "ACME settings need acme_domains".into())),
            (None, None) => Ok(None),
        };
    };
    if let Some(file) = tls.cert.as_ref().or(tls.key.as_ref()) {
        return Err((
            Some(file.span()).filter(|span| !span.is_empty()),
            "give either a certificate (tls.cert and tls.key) or acme_domains, not both".into(),
        ));
    }
    let mut domains = Vec::with_capacity(names.len());
    for name in names {
        domains.push(domain(name.get_ref()).map_err(|message| (at(name), message))?);
    }
    domains.sort();
    domains.dedup();
    let directory = match &tls.acme_directory {
        Some(url) if !url.get_ref().starts_with("https://") => {
            return Err((
                at(url),
                format!(
                    "the ACME directory {:?} is not an https:// URL",
                    url.get_ref()
                ),
            ));
        }
        Some(url) => url.get_ref().clone(),
        None => LETS_ENCRYPT.to_owned(),
    };
    let contact = match &tls.acme_contact {
        Some(address) => {
            Some(contact(address.get_ref()).map_err(|message| (at(address), message))?)
        }
        None => None,
    };
    Ok(Some(AcmeConfig {
        domains,
        directory,
        directory_ca: tls
            .acme_directory_ca
            .as_ref()
            .map(|ca| ca.get_ref().clone()),
        contact,
        state_dir: state_dir
            .cloned()
            .unwrap_or_else(|| DEFAULT_STATE_DIR.into()),
    }))
}

/// A name a CA can validate by TLS-ALPN-01, in lower case.
fn domain(name: &str) -> Result<String, String> {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    if name.starts_with("*.") {
        return Err(format!(
            "{name:?}: a wildcard needs DNS validation, which the relay does not do; list the names"
        ));
    }
    let label_ok = |label: &str| {
        (1..=MAX_LABEL).contains(&label.len())
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    if name.len() > MAX_NAME || !name.contains('.') || !name.split('.').all(label_ok) {
        return Err(format!(
            "{name:?} is not a domain name a CA can issue for (e.g. relay.example.org)"
        ));
    }
    Ok(name)
}

/// An e-mail address as the `mailto:` URI ACME wants.
fn contact(address: &str) -> Result<String, String> {
    let bare = address.strip_prefix("mailto:").unwrap_or(address);
    match bare.split_once('@') {
        Some((user, host)) if !user.is_empty() && host.contains('.') && !bare.contains(' ') => {
            Ok(format!("mailto:{bare}"))
        }
        _ => Err(format!("{address:?} is not an e-mail address")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spanned<T>(value: T) -> Spanned<T> {
        Spanned::new(0..0, value)
    }

    fn section(domains: &[&str]) -> TlsSection {
        TlsSection {
            acme_domains: Some(domains.iter().map(|d| spanned(d.to_string())).collect()),
            ..TlsSection::default()
        }
    }

    #[test]
    fn names_are_checked_and_folded_into_one_certificate() {
        let parsed = acme(
            &section(&["Relay.Example.org.", "b.example.org", "relay.example.org"]),
            None,
        )
        .unwrap()
        .unwrap();
        assert_eq!(parsed.domains, ["b.example.org", "relay.example.org"]);
        assert_eq!(parsed.directory, LETS_ENCRYPT);
        assert_eq!(parsed.state_dir, PathBuf::from(DEFAULT_STATE_DIR));
        for bad in [
            "*.example.org",
            "localhost",
            "a..b",
            "-a.example.org",
            "a b.org",
            "",
        ] {
            assert!(acme(&section(&[bad]), None).is_err(), "{bad:?}");
        }
        assert_eq!(acme(&TlsSection::default(), None), Ok(None));
    }

    #[test]
    fn contact_directory_and_certificate_files() {
        let mut tls = section(&["relay.example.org"]);
        tls.acme_contact = Some(spanned("ops@example.org".into()));
        tls.acme_directory = Some(spanned("https://127.0.0.1:14000/dir".into()));
        let state = PathBuf::from("/tmp/state");
        let parsed = acme(&tls, Some(&state)).unwrap().unwrap();
        assert_eq!(parsed.contact.as_deref(), Some("mailto:ops@example.org"));
        assert_eq!(parsed.directory, "https://127.0.0.1:14000/dir");
        assert_eq!(parsed.state_dir, state);
        tls.acme_contact = Some(spanned("nobody".into()));
        assert!(acme(&tls, None).is_err());
        tls.acme_contact = None;
        tls.acme_directory = Some(spanned("http://ca.example/dir".into()));
        assert!(acme(&tls, None).is_err());
        tls.acme_directory = None;
        tls.cert = Some(spanned("cert.pem".into()));
        assert!(acme(&tls, None).is_err());
        let lone = TlsSection {
            acme_contact: Some(spanned("ops@example.org".into())),
            ..TlsSection::default()
        };
        assert!(acme(&lone, None).is_err());
    }
}
