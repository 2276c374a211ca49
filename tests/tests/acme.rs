//! Certificates by ACME, against Pebble (Let's Encrypt's test CA): the TLS listener serves
//! a certificate Pebble issued for the name, kept in the state directory across restarts;
//! with real TLS-ALPN-01 validation on the quiet preset's 443, renewal swaps it while an
//! open connection goes on.

use std::{
    fs,
    net::{SocketAddr, TcpStream},
    os::unix::fs::PermissionsExt,
    path::PathBuf,
    time::Duration,
};

use integration_tests::{
    Expect, HeaderEcho, Relay, TempFile, echo_round_trip, metric,
    pebble::{Pebble, Validation, acme_tls_hello, leaf, verified_tls_client},
};

const NAME: &str = "relay.test";
/// The TLS listener's port when Pebble only pretends to validate.
const ALWAYS_VALID_PORT: u16 = 18443;
/// Where Pebble validates (its `tlsPort`): 443, as a real CA does.
const HTTPS_PORT: u16 = 443;
/// Pebble answers within a second here; a slow CI machine gets ample margin.
const ISSUED_WITHIN: Duration = Duration::from_secs(60);

/// A state directory of its own, removed before and after.
struct StateDir(PathBuf);

impl StateDir {
    fn new(tag: &str) -> Self {
        let path = std::env::temp_dir().join(format!(
            "ebpf-proxy-test-{}-{tag}-state",
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&path);
        Self(path)
    }

    fn path(&self) -> &str {
        self.0.to_str().expect("utf-8 path")
    }
}

impl Drop for StateDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn config(port: u16, upstream: SocketAddr) -> TempFile {
    TempFile::new(
        &format!("acme-{port}.toml"),
        &format!(
            "[pools.p]\nservers = [\"{upstream}\"]\n\
             [[listener]]\nlisten = \"127.0.0.1:{port}\"\ntls = true\npool = \"p\"\n"
        ),
    )
}

/// The relay's flags: `source` (a file or preset, and what goes with it), and certificates
/// for [`NAME`] from `pebble`, kept in `state`.
fn acme_args(source: &[&str], pebble: &Pebble, state: &StateDir) -> Vec<String> {
    let acme = [
        "--acme-domain",
        NAME,
        "--acme-directory",
        &pebble.directory(),
        "--acme-directory-ca",
        &pebble.directory_ca,
        "--state-dir",
        state.path(),
    ];
    source.iter().chain(&acme).map(|a| a.to_string()).collect()
}

fn wait_for_a_new_certificate(relay: &mut Relay) {
    relay
        .wait_for_line(
            "acme: serving a new certificate for relay.test",
            ISSUED_WITHIN,
        )
        .unwrap_or_else(|| panic!("no certificate from pebble:\n{}", relay.lines.join("\n")));
}

fn start(args: &[String]) -> Relay {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Relay::spawn(&args).unwrap_or_else(|log| panic!("relay did not start with {args:?}:\n{log}"))
}

pub fn acme_certificate_from_pebble_is_served_and_kept_across_restarts() {
    let pebble = Pebble::start(Validation::AlwaysValid, Duration::from_secs(3600));
    let echo = HeaderEcho::start("127.0.0.1:0", Expect::None);
    let file = config(ALWAYS_VALID_PORT, echo.addr);
    let state = StateDir::new("acme-always-valid");
    let mut args = acme_args(&["--config", file.path()], &pebble, &state);
    for flag in [
        "--acme-contact",
        "ops@relay.test",
        "--metrics",
        "127.0.0.1:0",
    ] {
        args.push(flag.to_owned());
    }
    let mut relay = start(&args);
    wait_for_a_new_certificate(&mut relay);
    // The metric says when it expires: an hour from its issue.
    let expiry = expiry(&relay);
    let now = unix_now();
    assert!(
        (now + 3600 - 120..=now + 3600 + 5).contains(&expiry),
        "expiry {expiry}, now {now}"
    );
    // Verified against the root Pebble issues under, for the name asked.
    let connect = || TcpStream::connect(("127.0.0.1", ALWAYS_VALID_PORT)).expect("connect");
    let mut client = verified_tls_client(connect(), &pebble.issuing_root, NAME);
    assert_eq!(echo_round_trip(&mut client, b"issued"), b"issued");
    let issued = leaf(&client);
    drop(client);

    // The account, the chain and the key are kept, readable by the relay's user only.
    let folder = state.0.join("acme").join("127.0.0.1_14000_dir");
    for file in ["account.json", "certificate.pem", "key.pem", "domains"] {
        let mode = fs::metadata(folder.join(file))
            .unwrap_or_else(|e| panic!("{file} in {}: {e}", folder.display()))
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{file}");
    }
    let (status, _) = relay.stop(libc::SIGINT);
    assert!(status.success());

    // A restart serves the stored certificate and orders nothing.
    let mut relay = start(&args);
    // Logged as the relay starts, before or after its ready line, which `start` waits for.
    let stored = "acme: serving the stored certificate";
    assert!(
        relay.lines.iter().any(|line| line.contains(stored))
            || relay.wait_for_line(stored, ISSUED_WITHIN).is_some(),
        "the stored certificate is served"
    );
    let mut client = verified_tls_client(connect(), &pebble.issuing_root, NAME);
    assert_eq!(echo_round_trip(&mut client, b"stored"), b"stored");
    assert_eq!(leaf(&client), issued);
    // A reload with the same names keeps the certificate and orders nothing either.
    relay.signal(libc::SIGHUP);
    relay
        .wait_for_line("reloaded:", ISSUED_WITHIN)
        .expect("reload logged");
    let mut client = verified_tls_client(connect(), &pebble.issuing_root, NAME);
    assert_eq!(echo_round_trip(&mut client, b"reloaded"), b"reloaded");
    assert_eq!(leaf(&client), issued);
    assert!(
        !relay.lines.iter().any(|l| l.contains("acme: ordering")),
        "ordered again: {:#?}",
        relay.lines
    );
}

fn expiry(relay: &Relay) -> u64 {
    metric(
        &relay.scrape(),
        "tls_certificate_expiry_timestamp_seconds",
        &[],
    )
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs()
}

pub fn acme_tls_alpn_validation_and_renewal_keep_connections() {
    // Renewal comes with a third of the life left: about 13 s after each issue.
    let pebble = Pebble::start(
        Validation::TlsAlpn { port: HTTPS_PORT },
        Duration::from_secs(20),
    );
    // The quiet preset as an operator runs it, on loopback: 443 relays to the chat pool,
    // here an echo behind the PROXY v1 header the preset sends.
    let chat = HeaderEcho::start("127.0.60.2:5222", Expect::V1);
    let state = StateDir::new("acme-tls-alpn");
    let preset = [
        "--preset",
        "whatsapp-quiet",
        "--bind",
        "127.0.0.1",
        "--resolve",
        "g.whatsapp.net=127.0.60.2",
        "--resolve",
        "g-fallback.whatsapp.net=127.0.60.2",
        "--resolve",
        "whatsapp.net=127.0.60.4",
        "--metrics",
        "127.0.0.1:0",
    ];
    let mut relay = start(&acme_args(&preset, &pebble, &state));
    wait_for_a_new_certificate(&mut relay);
    let first_expiry = expiry(&relay);
    let connect = || TcpStream::connect(("127.0.0.1", HTTPS_PORT)).expect("connect");
    let mut held = verified_tls_client(connect(), &pebble.issuing_root, NAME);
    assert_eq!(echo_round_trip(&mut held, b"first"), b"first");
    let header = chat.next_header(ISSUED_WITHIN);
    assert!(
        header.starts_with(b"PROXY TCP4 127.0.0.1 127.0.0.1 "),
        "{header:?}"
    );
    let first = leaf(&held);

    relay
        .wait_for_line("acme: renewing the certificate", ISSUED_WITHIN)
        .unwrap_or_else(|| panic!("no renewal:\n{}", relay.lines.join("\n")));
    wait_for_a_new_certificate(&mut relay);
    // The connection opened before goes on; a new one gets the new certificate.
    assert_eq!(echo_round_trip(&mut held, b"still here"), b"still here");
    let mut fresh = verified_tls_client(connect(), &pebble.issuing_root, NAME);
    assert_eq!(echo_round_trip(&mut fresh, b"second"), b"second");
    assert_ne!(leaf(&fresh), first, "the renewed certificate is served");
    assert!(expiry(&relay) > first_expiry);

    // Outside a validation, an acme-tls/1 hello gets no certificate: a prober learns nothing.
    assert!(
        acme_tls_hello(connect(), NAME).is_err(),
        "an acme-tls/1 hello was answered with no validation under way"
    );
    assert_eq!(echo_round_trip(&mut held, b"last"), b"last");
}
