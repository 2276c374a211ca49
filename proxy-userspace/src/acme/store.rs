//! What ACME keeps across restarts, under `<state dir>/acme/<directory>/`: the account
//! (`account.json`), the certificate chain (`certificate.pem`), its key (`key.pem`) and the
//! names it was ordered for (`domains`). Files are written whole (a temporary file renamed
//! over the old one), private ones readable by the relay's user only.

use std::{
    fs, io,
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::{Path, PathBuf},
};

use instant_acme::AccountCredentials;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use time::OffsetDateTime;
use tracing::warn;

use super::AcmeError;
use crate::{config::AcmeConfig, tls::Validity};

/// A certificate the CA issued, with its key.
#[derive(Clone, Debug)]
pub struct Issued {
    pub chain_pem: String,
    pub key_pem: String,
    pub domains: Vec<String>,
    pub validity: Validity,
}

impl Issued {
    pub fn new(chain_pem: String, key_pem: String, domains: &[String]) -> Result<Self, AcmeError> {
        let chain = chain(&chain_pem)?;
        let validity = Validity::of(&chain[0])
            .ok_or_else(|| AcmeError::Certificate("its validity does not read".into()))?;
        Ok(Self {
            chain_pem,
            key_pem,
            domains: domains.to_vec(),
            validity,
        })
    }

    pub fn chain(&self) -> Vec<CertificateDer<'static>> {
        chain(&self.chain_pem).unwrap_or_default()
    }

    pub fn key(&self) -> Result<PrivateKeyDer<'static>, AcmeError> {
        PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes())
            .map_err(|e| AcmeError::Certificate(format!("its key: {e}")))
    }

    /// When to order the next one: with a third of its life left, as certbot does with
    /// Let's Encrypt's 90 days (30 days before).
    pub fn renew_at(&self) -> OffsetDateTime {
        let Validity {
            not_before,
            not_after,
        } = self.validity;
        not_after - (not_after - not_before) / 3
    }
}

fn chain(pem: &str) -> Result<Vec<CertificateDer<'static>>, AcmeError> {
    let chain = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| AcmeError::Certificate(e.to_string()))?;
    if chain.is_empty() {
        return Err(AcmeError::Certificate("no CERTIFICATE block".into()));
    }
    Ok(chain)
}

pub struct Store {
    dir: PathBuf,
}

const ACCOUNT: &str = "account.json";
const CERTIFICATE: &str = "certificate.pem";
const KEY: &str = "key.pem";
const DOMAINS: &str = "domains";

impl Store {
    /// The folder of `config`'s directory, made (owner only) if missing.
    pub fn open(config: &AcmeConfig) -> Result<Self, AcmeError> {
        let dir = config
            .state_dir
            .join("acme")
            .join(folder_name(&config.directory));
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| state_error(&dir, e))?;
        Ok(Self { dir })
    }

    pub fn account(&self) -> Result<Option<AccountCredentials>, AcmeError> {
        let path = self.dir.join(ACCOUNT);
        match fs::read(&path) {
            Ok(json) => serde_json::from_slice(&json)
                .map(Some)
                .map_err(|e| state_error(&path, io::Error::new(io::ErrorKind::InvalidData, e))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(state_error(&path, e)),
        }
    }

    pub fn save_account(&self, credentials: &AccountCredentials) -> Result<(), AcmeError> {
        let json = serde_json::to_vec_pretty(credentials)
            .map_err(|e| state_error(&self.dir, io::Error::other(e)))?;
        self.write(ACCOUNT, &json)
    }

    /// The stored certificate, if it was ordered for exactly `domains` and still reads.
    pub fn certificate(&self, domains: &[String]) -> Option<Issued> {
        let read = |name| fs::read_to_string(self.dir.join(name)).ok();
        let stored: Vec<String> = read(DOMAINS)?.lines().map(str::to_owned).collect();
        if stored != domains {
            return None;
        }
        match Issued::new(read(CERTIFICATE)?, read(KEY)?, domains) {
            Ok(issued) => Some(issued),
            Err(e) => {
                warn!(
                    "acme: the stored certificate in {} is unusable ({e}); ordering a new one",
                    self.dir.display()
                );
                None
            }
        }
    }

    pub fn save_certificate(&self, issued: &Issued) -> Result<(), AcmeError> {
        // The names last: a certificate is taken only once all three match.
        let _ = fs::remove_file(self.dir.join(DOMAINS));
        self.write(KEY, issued.key_pem.as_bytes())?;
        self.write(CERTIFICATE, issued.chain_pem.as_bytes())?;
        self.write(DOMAINS, (issued.domains.join("\n") + "\n").as_bytes())
    }

    fn write(&self, name: &str, bytes: &[u8]) -> Result<(), AcmeError> {
        let path = self.dir.join(name);
        let temporary = self.dir.join(format!(".{name}.new"));
        let written = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&temporary)
            .and_then(|mut file| {
                io::Write::write_all(&mut file, bytes).and_then(|()| file.sync_all())
            })
            .and_then(|()| fs::rename(&temporary, &path));
        written.map_err(|e| state_error(&path, e))
    }
}

fn state_error(path: &Path, source: io::Error) -> AcmeError {
    AcmeError::State {
        path: path.display().to_string(),
        source,
    }
}

/// A folder name for a directory URL: its host and path, with anything but letters,
/// digits, dots and dashes as `_`. Each CA (and staging apart from production) keeps its
/// own account and certificate.
fn folder_name(directory: &str) -> String {
    let url = directory.strip_prefix("https://").unwrap_or(directory);
    url.trim_end_matches('/')
        .chars()
        .map(|c| match c {
            'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '-' => c,
            _ => '_',
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_directory_has_its_folder() {
        assert_eq!(
            folder_name(crate::config::LETS_ENCRYPT),
            "acme-v02.api.letsencrypt.org_directory"
        );
        assert_eq!(
            folder_name("https://127.0.0.1:14000/dir"),
            "127.0.0.1_14000_dir"
        );
        assert_eq!(folder_name("https://x/../../etc/"), "x_.._.._etc");
    }
}
