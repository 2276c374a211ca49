//! Peers for the WhatsApp-parity tests: an upstream that records the PROXY header it is
//! sent and echoes the rest, a TLS client, HAProxy, and a metrics scraper.

use std::{
    io::{self, BufRead, BufReader, Read, Write},
    net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use rustls::{
    ClientConfig, ClientConnection, DigitallySignedStruct, SignatureScheme, StreamOwned,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    pki_types::{CertificateDer, ServerName, UnixTime},
};

use crate::wait_until;

/// Which header a [`HeaderEcho`] upstream expects in front of each connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    None,
    V1,
    V2,
}

/// An upstream that reads the PROXY header its listener config says it gets, reports it,
/// then echoes every further byte until EOF. Connections that close before sending
/// anything (health checks) are not reported.
pub struct HeaderEcho {
    pub addr: SocketAddr,
    headers: mpsc::Receiver<Vec<u8>>,
    accepted: Arc<AtomicUsize>,
}

impl HeaderEcho {
    pub fn start(bind: &str, expect: Expect) -> Self {
        let listener = TcpListener::bind(bind).unwrap_or_else(|e| panic!("bind {bind}: {e}"));
        // std listens with a backlog of 128: a relay opening a thousand upstream connections
        // at once overflows it, and a connection whose last ACK was dropped is reset later.
        // SAFETY: listen(2) again on a socket we own only changes its backlog.
        if unsafe { libc::listen(std::os::fd::AsRawFd::as_raw_fd(&listener), 4096) } != 0 {
            panic!("listen on {bind}: {}", io::Error::last_os_error());
        }
        let addr = listener.local_addr().expect("upstream address");
        let (tx, headers) = mpsc::channel();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&accepted);
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                counter.fetch_add(1, Ordering::Relaxed);
                let tx = tx.clone();
                thread::spawn(move || {
                    let _ = serve_echo(stream, expect, &tx);
                });
            }
        });
        Self {
            addr,
            headers,
            accepted,
        }
    }

    /// Connections accepted so far, health checks included.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }

    /// The header of the next connection that sent bytes (empty for [`Expect::None`]).
    pub fn next_header(&self, within: Duration) -> Vec<u8> {
        self.headers.recv_timeout(within).unwrap_or_else(|_| {
            panic!(
                "no connection with bytes reached {} in {within:?}",
                self.addr
            )
        })
    }

    /// True if a connection with bytes arrives within `within`.
    pub fn saw_connection(&self, within: Duration) -> bool {
        self.headers.recv_timeout(within).is_ok()
    }
}

fn serve_echo(mut stream: TcpStream, expect: Expect, tx: &mpsc::Sender<Vec<u8>>) -> io::Result<()> {
    let mut header = Vec::new();
    let mut byte = [0u8; 1];
    match expect {
        Expect::None => {}
        Expect::V1 => {
            while !header.ends_with(b"\r\n") && header.len() < 108 {
                stream.read_exact(&mut byte)?;
                header.push(byte[0]);
            }
        }
        Expect::V2 => {
            header.resize(16, 0);
            stream.read_exact(&mut header)?;
            let len = u16::from_be_bytes([header[14], header[15]]) as usize;
            let mut rest = vec![0u8; len];
            stream.read_exact(&mut rest)?;
            header.extend_from_slice(&rest);
        }
    }
    let mut buf = vec![0u8; 64 * 1024];
    let mut first = true;
    loop {
        let n = stream.read(&mut buf)?;
        if first && (n > 0 || expect != Expect::None) {
            let _ = tx.send(std::mem::take(&mut header));
            first = false;
        }
        if n == 0 {
            break;
        }
        stream.write_all(&buf[..n])?;
    }
    stream.shutdown(Shutdown::Write)
}

/// A TCP connection from a chosen loopback source address.
pub fn connect_from(source: IpAddr, to: SocketAddr) -> io::Result<TcpStream> {
    let (IpAddr::V4(source), SocketAddr::V4(to)) = (source, to) else {
        panic!("IPv4 only");
    };
    crate::raw::connect_from_v4(source, to)
}

/// `connected`, or `None` when the handshake itself was reset. On loopback a relay that
/// accepts and resets at once can do so before the connecting thread wakes, and `connect`
/// then fails with ECONNRESET: the connection was made and closed. Other errors panic.
pub fn unless_reset(connected: io::Result<TcpStream>) -> Option<TcpStream> {
    match connected {
        Ok(stream) => Some(stream),
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => None,
        Err(e) => panic!("connect: {e}"),
    }
}

/// A client of `relay` is closed (EOF or reset, no bytes) within `within`; returns how soon.
pub fn assert_turned_away(relay: SocketAddr, within: Duration) -> Duration {
    let started = Instant::now();
    let Some(mut client) = unless_reset(TcpStream::connect(relay)) else {
        return started.elapsed();
    };
    client
        .set_read_timeout(Some(within + Duration::from_secs(2)))
        .expect("timeout");
    let mut buf = [0u8; 16];
    match client.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
        other => panic!("expected the relay to close the client, got {other:?}"),
    }
    let took = started.elapsed();
    assert!(took <= within, "closed only after {took:?}");
    took
}

/// True when the peer closed or reset the connection, rather than leaving it open:
/// a read returns EOF or an error within `within`.
pub fn closed_by_peer(stream: &mut TcpStream, within: Duration) -> bool {
    stream.set_read_timeout(Some(within)).expect("read timeout");
    let mut buf = [0u8; 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return false;
            }
            Err(_) => return true,
        }
    }
}

/// A TLS client that accepts any certificate: the relay's is self-signed by design.
pub fn tls_client(stream: TcpStream) -> StreamOwned<ClientConnection, TcpStream> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
        .with_no_client_auth();
    let name = ServerName::try_from("relay.test").expect("server name");
    let connection = ClientConnection::new(Arc::new(config), name).expect("TLS client");
    StreamOwned::new(connection, stream)
}

#[derive(Debug)]
pub(crate) struct AnyCertificate(pub(crate) Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Writes `payload`, reads the same number of bytes back (an echo), and returns them.
pub fn echo_round_trip(stream: &mut (impl Read + Write), payload: &[u8]) -> Vec<u8> {
    stream.write_all(payload).expect("send through the relay");
    stream.flush().expect("flush");
    let mut back = vec![0u8; payload.len()];
    stream
        .read_exact(&mut back)
        .expect("echo through the relay");
    back
}

/// A file under the system temp directory, removed on drop.
pub struct TempFile(pub PathBuf);

impl TempFile {
    pub fn new(name: &str, contents: &str) -> Self {
        let path =
            std::env::temp_dir().join(format!("ebpf-proxy-test-{}-{name}", std::process::id()));
        std::fs::write(&path, contents).expect("write temp file");
        Self(path)
    }

    pub fn path(&self) -> &str {
        self.0.to_str().expect("utf-8 temp path")
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// An openssl-made certificate for relay.test, as an operator would bring.
pub fn operator_certificate(tag: &str) -> (TempFile, TempFile) {
    let (cert, key) = (
        TempFile::new(&format!("{tag}-cert.pem"), ""),
        TempFile::new(&format!("{tag}-key.pem"), ""),
    );
    let status = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=relay.test",
        ])
        .args([
            "-addext",
            "subjectAltName=DNS:relay.test",
            "-keyout",
            key.path(),
            "-out",
            cert.path(),
        ])
        .stderr(Stdio::null())
        .status()
        .expect("run openssl");
    assert!(status.success());
    (cert, key)
}

/// `openssl s_client` to `addr`, verifying the certificate against `ca`: sends a line
/// and returns the line that comes back.
pub fn s_client_echo(addr: SocketAddr, ca: &str, line: &str) -> String {
    s_client_try(addr, ca, line).unwrap_or_else(|said| panic!("no echo; s_client said:\n{said}"))
}

/// As [`s_client_echo`]: the echoed line, or what s_client said when it got none.
pub fn s_client_try(addr: SocketAddr, ca: &str, line: &str) -> Result<String, String> {
    let mut child = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &addr.to_string(),
            "-quiet",
            "-verify_return_error",
        ])
        .args([
            "-CAfile",
            ca,
            "-verify_hostname",
            "relay.test",
            "-servername",
            "relay.test",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run openssl s_client");
    let mut stdin = child.stdin.take().unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut back = String::new();
        let _ = BufReader::new(stdout).read_line(&mut back);
        let _ = tx.send(back);
    });
    // s_client may already have given up (a failed verification): ignore write errors.
    let _ = stdin
        .write_all(line.as_bytes())
        .and_then(|()| stdin.flush());
    let back = rx.recv_timeout(Duration::from_secs(10)).unwrap_or_default();
    let _ = child.kill();
    let output = child.wait_with_output().unwrap();
    if back.is_empty() {
        return Err(String::from_utf8_lossy(&output.stderr).into_owned());
    }
    Ok(back)
}

/// A HAProxy (the Debian package) in the foreground; killed on drop.
pub struct Haproxy {
    child: Child,
    _config: TempFile,
}

impl Haproxy {
    /// Starts HAProxy with `config` and waits until `ports` listen.
    pub fn start(config: &str, ports: &[u16]) -> Self {
        let config = TempFile::new("haproxy.cfg", config);
        let child = Command::new("haproxy")
            .args(["-db", "-f", config.path()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("run haproxy (apt-get install haproxy)");
        let haproxy = Self {
            child,
            _config: config,
        };
        for port in ports {
            assert!(
                wait_until(Duration::from_secs(10), || is_listening(*port)),
                "haproxy did not listen on {port}"
            );
        }
        haproxy
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// True when a TCP socket listens on `port` (any address), per /proc/net/tcp.
pub fn is_listening(port: u16) -> bool {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.len() > 3
            && fields[3] == "0A"
            && fields[1]
                .rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok())
                == Some(port)
    })
}

/// A free loopback port (bound then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// One GET over HTTP/1.1; returns the body of a 200 response.
pub fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut stream = TcpStream::connect(addr).expect("connect to metrics");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )
    .expect("request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("response");
    let (head, body) = response.split_once("\r\n\r\n").expect("HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_owned()
}

/// The value of one Prometheus sample whose labels include every `labels` pair.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("ebpf_proxy_{name}{{")))
        .find(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} {labels:?} in:\n{text}"))
}

/// An nginx (the Debian package) serving one page over plain HTTP in the foreground: what an
/// operator puts behind the relay's fallback. Killed on drop.
pub struct Site {
    pub addr: SocketAddr,
    child: Child,
    dir: PathBuf,
}

impl Site {
    /// The page every path of the site answers with.
    pub const PAGE: &str = "an ordinary web site\n";

    pub fn start(addr: SocketAddr) -> Self {
        let dir = std::env::temp_dir().join(format!("ebpf-proxy-test-{}-site", std::process::id()));
        std::fs::create_dir_all(dir.join("www")).expect("site directory");
        std::fs::write(dir.join("www/index.html"), Self::PAGE).expect("site page");
        let prefix = dir.display();
        // One process as the test's user; every path nginx writes lies in `dir`.
        let config = format!(
            "daemon off; master_process off; pid {prefix}/nginx.pid; error_log stderr;
events {{ worker_connections 256; }}
http {{
  access_log off; default_type text/html;
  client_body_temp_path {prefix}/body; proxy_temp_path {prefix}/proxy;
  fastcgi_temp_path {prefix}/fastcgi; uwsgi_temp_path {prefix}/uwsgi; scgi_temp_path {prefix}/scgi;
  server {{ listen {addr}; root {prefix}/www; location / {{ try_files /index.html =404; }} }}
}}
"
        );
        std::fs::write(dir.join("nginx.conf"), config).expect("site config");
        let child = Command::new("nginx")
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("run nginx (apt-get install nginx-light)");
        let site = Self { addr, child, dir };
        assert!(
            wait_until(Duration::from_secs(10), || TcpStream::connect(addr).is_ok()),
            "nginx did not listen on {addr}"
        );
        site
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The v1 PROXY header a relay writes for an IPv4 client.
pub fn v1(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    format!(
        "PROXY TCP4 {} {} {} {}\r\n",
        source.ip(),
        destination.ip(),
        source.port(),
        destination.port()
    )
    .into_bytes()
}

/// Sends the client's half of a payload, half-closes, and checks the echo; the upstream
/// closes its side after the echo, so the connection ends and its bytes are counted.
pub fn echo_and_finish(
    mut stream: impl Read + Write,
    payload: &[u8],
    shutdown: impl FnOnce(&mut dyn Write),
) {
    assert_eq!(echo_round_trip(&mut stream, payload), payload);
    shutdown(&mut stream);
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest);
    assert!(
        rest.is_empty(),
        "{} unexpected bytes after the echo",
        rest.len()
    );
}

pub fn tcp_shutdown(stream: &TcpStream) -> impl FnOnce(&mut dyn Write) + '_ {
    move |_| stream.shutdown(Shutdown::Write).expect("half-close")
}
