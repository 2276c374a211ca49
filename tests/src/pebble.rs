//! Pebble, Let's Encrypt's test CA (Debian's `pebble`), as the relay's ACME directory: its
//! own HTTPS certificate from a throwaway openssl CA, and, for real validations,
//! `pebble-challtestsrv` as its DNS server, which answers 127.0.0.1 for every name.

use std::{
    fs, io,
    net::TcpStream,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::Arc,
    time::Duration,
};

use rustls::{
    ClientConfig, ClientConnection, RootCertStore, StreamOwned,
    pki_types::{CertificateDer, ServerName, pem::PemObject},
};

use crate::{proxied::AnyCertificate, wait_until};

/// Pebble's ACME and management ports, and the DNS and management ports of challtestsrv.
const ACME_PORT: u16 = 14000;
const MANAGEMENT_PORT: u16 = 15000;
const DNS_PORT: u16 = 8053;
const DNS_MANAGEMENT_PORT: u16 = 8055;

pub struct Pebble {
    children: Vec<Child>,
    dir: PathBuf,
    /// The throwaway root pebble's HTTPS certificate chains to (`--acme-directory-ca`).
    pub directory_ca: String,
    /// The root pebble issues under, made at its start.
    pub issuing_root: String,
}

/// How pebble validates.
pub enum Validation {
    /// `PEBBLE_VA_ALWAYS_VALID=1`: every challenge passes unchecked.
    AlwaysValid,
    /// TLS-ALPN-01 for real: the name resolves (through challtestsrv) to 127.0.0.1, and
    /// pebble connects to this port.
    TlsAlpn { port: u16 },
}

impl Pebble {
    /// Starts pebble issuing certificates valid for `validity`.
    pub fn start(validation: Validation, validity: Duration) -> Self {
        let dir = std::env::temp_dir().join(format!("ebpf-proxy-pebble-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("pebble's folder");
        let file = |name: &str| dir.join(name).to_str().expect("utf-8 path").to_owned();
        // Paths under the temp directory have no spaces: each command is split on them.
        let openssl = |command: String| {
            let args: Vec<&str> = command.split_whitespace().collect();
            let status = Command::new("openssl")
                .args(&args)
                .stderr(Stdio::null())
                .status()
                .expect("run openssl");
            assert!(status.success(), "openssl {command}");
        };
        let p256 = "-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes";
        openssl(format!(
            "req -x509 {p256} -days 1 -subj /CN=pebble-test-directory-CA -keyout {} -out {}",
            file("ca.key"),
            file("ca.pem")
        ));
        openssl(format!(
            "req {p256} -subj /CN=localhost -keyout {} -out {}",
            file("pebble.key"),
            file("pebble.csr")
        ));
        fs::write(file("san"), "subjectAltName=DNS:localhost,IP:127.0.0.1\n").expect("san");
        openssl(format!(
            "x509 -req -in {} -CA {} -CAkey {} -CAcreateserial -days 1 -extfile {} -out {}",
            file("pebble.csr"),
            file("ca.pem"),
            file("ca.key"),
            file("san"),
            file("pebble.pem")
        ));
        let tls_port = match validation {
            Validation::AlwaysValid => 5001,
            Validation::TlsAlpn { port } => port,
        };
        let config = format!(
            r#"{{"pebble": {{"listenAddress": "127.0.0.1:{ACME_PORT}",
            "managementListenAddress": "127.0.0.1:{MANAGEMENT_PORT}",
            "certificate": "{}", "privateKey": "{}", "httpPort": 5002, "tlsPort": {tls_port},
            "ocspResponderURL": "", "externalAccountBindingRequired": false,
            "certificateValidityPeriod": {}}}}}"#,
            file("pebble.pem"),
            file("pebble.key"),
            validity.as_secs()
        );
        fs::write(file("pebble.json"), config).expect("pebble's configuration");
        let mut children = Vec::new();
        let mut pebble = Command::new("pebble");
        pebble
            .args(["-config", &file("pebble.json")])
            // No random 0-15 s wait before validating, no rejected nonces: a test's pace.
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        match validation {
            Validation::AlwaysValid => {
                pebble.env("PEBBLE_VA_ALWAYS_VALID", "1");
            }
            Validation::TlsAlpn { .. } => {
                pebble.args(["-dnsserver", &format!("127.0.0.1:{DNS_PORT}")]);
                children.push(
                    Command::new("pebble-challtestsrv")
                        .args(["-dns01", &format!("127.0.0.1:{DNS_PORT}")])
                        .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
                        .args(["-management", &format!("127.0.0.1:{DNS_MANAGEMENT_PORT}")])
                        .args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""])
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .spawn()
                        .expect("run pebble-challtestsrv (apt-get install pebble)"),
                );
            }
        }
        children.push(pebble.spawn().expect("run pebble (apt-get install pebble)"));
        let root = || {
            Command::new("curl")
                .args(["-sf", "--cacert", &file("ca.pem"), "-o", &file("root.pem")])
                .arg(format!("https://127.0.0.1:{MANAGEMENT_PORT}/roots/0"))
                .status()
                .is_ok_and(|s| s.success())
        };
        let served = wait_until(Duration::from_secs(20), root);
        let started = Self {
            children,
            directory_ca: file("ca.pem"),
            issuing_root: file("root.pem"),
            dir,
        };
        assert!(served, "pebble did not serve its root");
        started
    }

    pub fn directory(&self) -> String {
        format!("https://127.0.0.1:{ACME_PORT}/dir")
    }
}

impl Drop for Pebble {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A TLS client that trusts only `root` and checks the certificate is for `name`.
pub fn verified_tls_client(
    stream: TcpStream,
    root: &str,
    name: &str,
) -> StreamOwned<ClientConnection, TcpStream> {
    let mut roots = RootCertStore::empty();
    for certificate in CertificateDer::pem_file_iter(root).expect("read root") {
        roots.add(certificate.expect("root PEM")).expect("add root");
    }
    let config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
    let name = ServerName::try_from(name.to_owned()).expect("server name");
    let connection = ClientConnection::new(Arc::new(config), name).expect("TLS client");
    StreamOwned::new(connection, stream)
}

/// The certificate the server presented, once the handshake is done.
pub fn leaf(stream: &StreamOwned<ClientConnection, TcpStream>) -> Vec<u8> {
    stream
        .conn
        .peer_certificates()
        .and_then(|chain| chain.first())
        .expect("the server's certificate")
        .to_vec()
}

/// A handshake that offers only acme-tls/1 for `name`, as a CA validating it does: Ok
/// once the server completed it, whatever certificate it showed.
pub fn acme_tls_hello(stream: TcpStream, name: &str) -> io::Result<()> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"acme-tls/1".to_vec()];
    let name = ServerName::try_from(name.to_owned()).expect("server name");
    let mut connection = ClientConnection::new(Arc::new(config), name).expect("TLS client");
    let mut stream = stream;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    while connection.is_handshaking() {
        connection.complete_io(&mut stream)?;
    }
    Ok(())
}
