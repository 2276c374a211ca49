//! What the relay runs: listeners, upstream pools, TLS, limits, timeouts and metrics,
//! built from a TOML file or a preset, plus `--forward` rules and command-line overrides.

pub mod address;
mod file;

use std::{
    collections::{BTreeMap, HashSet},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

pub use address::{Forward, ForwardError, Pin, Upstream, parse_duration};
pub use file::{Balance, HeaderVersion};

use crate::dataplane::DataPlaneChoice;

/// Presets an operator can start from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Preset {
    /// WhatsApp's proxy port table (80, 443, 5222, 8080, 8443, 8222, 587, 7777)
    Whatsapp,
}

impl Preset {
    /// The preset as a configuration file an operator can edit.
    pub fn text(self) -> &'static str {
        match self {
            Self::Whatsapp => include_str!("whatsapp.toml"),
        }
    }
}

/// Where the listeners and pools come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    File(PathBuf),
    Preset(Preset),
    /// Only `--forward` rules.
    Forwards,
}

/// Command-line values that take precedence over the file.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub forwards: Vec<Forward>,
    pub bind: Option<IpAddr>,
    pub pins: Vec<Pin>,
    pub dataplane: Option<DataPlaneChoice>,
    pub log_clients: bool,
    pub map_connections: Option<u32>,
    pub max_connections: Option<u32>,
    pub per_ip_connections: Option<u32>,
    pub per_ip_rate: Option<u32>,
    pub connect_timeout: Option<Duration>,
    pub handshake_timeout: Option<Duration>,
    pub idle_timeout: Option<Duration>,
    pub half_closed_timeout: Option<Duration>,
    pub drain_timeout: Option<Duration>,
    pub metrics: Option<SocketAddr>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
}

/// The validated configuration the server runs.
#[derive(Clone, Debug)]
pub struct Config {
    pub dataplane: DataPlaneChoice,
    /// Connections the kernel maps hold (two sockets each); more fall back to userspace.
    pub map_connections: u32,
    pub log_clients: bool,
    pub limits: Limits,
    pub timeouts: Timeouts,
    pub tls: TlsSource,
    pub metrics: Option<SocketAddr>,
    /// `--resolve` answers, by lower-case host name.
    pub pins: BTreeMap<String, Vec<IpAddr>>,
    pub pools: Vec<PoolConfig>,
    pub listeners: Vec<ListenerConfig>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub max_connections: u32,
    /// 0: no limit.
    pub per_ip_connections: u32,
    /// New connections per second per client IP; 0: no limit.
    pub per_ip_rate: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    pub connect: Duration,
    pub handshake: Duration,
    pub idle: Duration,
    pub half_closed: Duration,
    /// After SIGTERM, how long open connections may take to finish.
    pub drain: Duration,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TlsSource {
    /// A self-signed certificate with random names, made at start.
    SelfSigned,
    Files {
        cert: PathBuf,
        key: PathBuf,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolConfig {
    pub name: String,
    pub servers: Vec<Upstream>,
    pub balance: Balance,
    /// None: no health checks (a server is marked down only when a connect fails).
    pub health_interval: Option<Duration>,
    pub health_timeout: Duration,
    pub resolve_interval: Duration,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenerConfig {
    /// Label in logs and metrics; None: the address it is bound to.
    pub name: Option<String>,
    pub listen: SocketAddr,
    /// Index into `Config::pools`.
    pub pool: usize,
    pub accept_proxy: bool,
    pub tls: bool,
    pub send_proxy: HeaderVersion,
    pub max_connections: Option<u32>,
}

const DEFAULT_LIMITS: Limits = Limits {
    max_connections: 4096,
    per_ip_connections: 256,
    per_ip_rate: 32,
};
const DEFAULT_TIMEOUTS: Timeouts = Timeouts {
    connect: Duration::from_secs(5),
    handshake: Duration::from_secs(10),
    idle: Duration::from_secs(600),
    half_closed: Duration::from_secs(60),
    drain: Duration::from_secs(30),
};
const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(3);
const DEFAULT_RESOLVE_INTERVAL: Duration = Duration::from_secs(300);
/// The sockhash holds two sockets per connection; BPF map sizes are u32.
const MAX_CONNECTIONS: u32 = 1_000_000;

/// A configuration problem, with the line it is on when it comes from a file.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{origin}{}: {message}", line.map(|l| format!(" line {l}")).unwrap_or_default())]
pub struct ConfigError {
    pub origin: String,
    pub line: Option<usize>,
    pub message: String,
}

impl Config {
    /// Reads the source, applies the overrides and checks the result.
    pub fn load(source: &Source, overrides: &Overrides) -> Result<Self, ConfigError> {
        let (origin, text) = match source {
            Source::File(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
                    origin: path.display().to_string(),
                    line: None,
                    message: format!("cannot read it: {e}"),
                })?;
                (path.display().to_string(), text)
            }
            Source::Preset(preset) => (
                format!("preset {}", preset_name(*preset)),
                preset.text().to_owned(),
            ),
            Source::Forwards => ("command line".to_owned(), String::new()),
        };
        Self::parse(&origin, &text, overrides)
    }
}

fn preset_name(preset: Preset) -> &'static str {
    match preset {
        Preset::Whatsapp => "whatsapp",
    }
}

struct Builder<'a> {
    origin: &'a str,
    text: &'a str,
}

impl Builder<'_> {
    fn error(
        &self,
        span: Option<std::ops::Range<usize>>,
        message: impl Into<String>,
    ) -> ConfigError {
        ConfigError {
            origin: self.origin.to_owned(),
            line: span.map(|s| {
                self.text[..s.start.min(self.text.len())]
                    .matches('\n')
                    .count()
                    + 1
            }),
            message: message.into(),
        }
    }

    fn build(&self, overrides: &Overrides) -> Result<Config, ConfigError> {
        let file: file::File = toml::from_str(self.text)
            .map_err(|e| self.error(e.span(), e.message().trim().to_owned()))?;

        let mut pools = Vec::new();
        let mut pool_index = BTreeMap::new();
        for (name, pool) in &file.pools {
            if pool.servers.get_ref().is_empty() {
                return Err(self.error(
                    Some(pool.servers.span()),
                    format!("pool {name:?} has no servers"),
                ));
            }
            pool_index.insert(name.clone(), pools.len());
            pools.push(PoolConfig {
                name: name.clone(),
                servers: pool.servers.get_ref().clone(),
                balance: pool.balance,
                health_interval: pool.health_interval,
                health_timeout: pool.health_timeout.unwrap_or(DEFAULT_HEALTH_TIMEOUT),
                resolve_interval: pool.resolve_interval.unwrap_or(DEFAULT_RESOLVE_INTERVAL),
            });
        }

        let mut listeners = Vec::new();
        for listener in &file.listeners {
            let pool = *pool_index.get(listener.pool.get_ref()).ok_or_else(|| {
                let known: Vec<&str> = pool_index.keys().map(String::as_str).collect();
                self.error(
                    Some(listener.pool.span()),
                    format!(
                        "no pool named {:?} (pools: {})",
                        listener.pool.get_ref(),
                        if known.is_empty() {
                            "none".to_owned()
                        } else {
                            known.join(", ")
                        }
                    ),
                )
            })?;
            let mut listen = *listener.listen.get_ref();
            if let Some(ip) = overrides.bind {
                listen.set_ip(ip);
            }
            let max_connections = match &listener.max_connections {
                Some(n) if *n.get_ref() == 0 => {
                    return Err(self.error(Some(n.span()), "max_connections must be at least 1"));
                }
                n => n.as_ref().map(|n| *n.get_ref()),
            };
            listeners.push((
                Some(listener.listen.span()),
                ListenerConfig {
                    name: listener.name.clone(),
                    listen,
                    pool,
                    accept_proxy: listener.accept_proxy,
                    tls: listener.tls,
                    send_proxy: listener.send_proxy,
                    max_connections,
                },
            ));
        }
        // Each --forward is a listener with a one-server pool, no headers, no TLS.
        for forward in &overrides.forwards {
            listeners.push((
                None,
                ListenerConfig {
                    name: None,
                    listen: forward.listen,
                    pool: pools.len(),
                    accept_proxy: false,
                    tls: false,
                    send_proxy: HeaderVersion::None,
                    max_connections: None,
                },
            ));
            pools.push(PoolConfig {
                name: format!("forward-{}", forward.listen),
                servers: vec![forward.upstream.clone()],
                balance: Balance::Failover,
                health_interval: None,
                health_timeout: DEFAULT_HEALTH_TIMEOUT,
                resolve_interval: DEFAULT_RESOLVE_INTERVAL,
            });
        }
        let mut seen = HashSet::new();
        for (span, listener) in &listeners {
            // Port 0 asks for an ephemeral port, different each time.
            if listener.listen.port() != 0 && !seen.insert(listener.listen) {
                return Err(self.error(
                    span.clone(),
                    format!("{} is listened on twice", listener.listen),
                ));
            }
        }

        let max_connections = match (&overrides.max_connections, &file.limits.max_connections) {
            (Some(n), _) => *n,
            (None, Some(n)) if !(1..=MAX_CONNECTIONS).contains(n.get_ref()) => {
                return Err(self.error(
                    Some(n.span()),
                    format!("max_connections must be 1-{MAX_CONNECTIONS}"),
                ));
            }
            (None, Some(n)) => *n.get_ref(),
            (None, None) => DEFAULT_LIMITS.max_connections,
        };
        let map_connections = match (&overrides.map_connections, &file.relay.map_connections) {
            (Some(n), _) => *n,
            (None, Some(n)) if !(1..=MAX_CONNECTIONS).contains(n.get_ref()) => {
                return Err(self.error(
                    Some(n.span()),
                    format!("map_connections must be 1-{MAX_CONNECTIONS}"),
                ));
            }
            (None, Some(n)) => *n.get_ref(),
            (None, None) => max_connections,
        };
        let limits = Limits {
            max_connections,
            per_ip_connections: overrides
                .per_ip_connections
                .or(file.limits.per_ip_connections)
                .unwrap_or(DEFAULT_LIMITS.per_ip_connections),
            per_ip_rate: overrides
                .per_ip_rate
                .or(file.limits.per_ip_rate)
                .unwrap_or(DEFAULT_LIMITS.per_ip_rate),
        };
        let t = &file.timeouts;
        let timeouts = Timeouts {
            connect: overrides
                .connect_timeout
                .or(t.connect)
                .unwrap_or(DEFAULT_TIMEOUTS.connect),
            handshake: overrides
                .handshake_timeout
                .or(t.handshake)
                .unwrap_or(DEFAULT_TIMEOUTS.handshake),
            idle: overrides
                .idle_timeout
                .or(t.idle)
                .unwrap_or(DEFAULT_TIMEOUTS.idle),
            half_closed: overrides
                .half_closed_timeout
                .or(t.half_closed)
                .unwrap_or(DEFAULT_TIMEOUTS.half_closed),
            drain: overrides
                .drain_timeout
                .or(t.drain)
                .unwrap_or(DEFAULT_TIMEOUTS.drain),
        };

        let tls = match (&overrides.tls_cert, &overrides.tls_key) {
            (Some(cert), Some(key)) => TlsSource::Files {
                cert: cert.clone(),
                key: key.clone(),
            },
            _ => match (&file.tls.cert, &file.tls.key) {
                (Some(cert), Some(key)) => TlsSource::Files {
                    cert: cert.get_ref().clone(),
                    key: key.get_ref().clone(),
                },
                (None, None) => TlsSource::SelfSigned,
                (Some(one), None) | (None, Some(one)) => {
                    return Err(self.error(
                        Some(one.span()),
                        "give both tls.cert and tls.key, or neither for a self-signed certificate",
                    ));
                }
            },
        };

        if listeners.is_empty() {
            return Err(self.error(
                None,
                "no listeners: add [[listener]] sections, or give --forward or --preset",
            ));
        }
        let mut pins: BTreeMap<String, Vec<IpAddr>> = BTreeMap::new();
        for pin in &overrides.pins {
            pins.entry(pin.host.clone()).or_default().push(pin.ip);
        }

        Ok(Config {
            dataplane: overrides
                .dataplane
                .or(file.relay.dataplane)
                .unwrap_or(DataPlaneChoice::Auto),
            map_connections,
            log_clients: overrides.log_clients || file.relay.log_clients.unwrap_or(false),
            limits,
            timeouts,
            tls,
            metrics: overrides.metrics.or(file.metrics.listen),
            pins,
            pools,
            listeners: listeners.into_iter().map(|(_, l)| l).collect(),
        })
    }
}

impl Config {
    /// Parses configuration text as if read from a file named `origin`.
    pub fn parse(origin: &str, text: &str, overrides: &Overrides) -> Result<Self, ConfigError> {
        Builder { origin, text }.build(overrides)
    }

    /// Sockhash capacity: two sockets per connection.
    pub fn max_sockets(&self) -> u32 {
        self.map_connections.saturating_mul(2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from_text(text: &str, overrides: &Overrides) -> Result<Config, ConfigError> {
        Builder {
            origin: "test.toml",
            text,
        }
        .build(overrides)
    }

    #[test]
    fn whatsapp_preset_is_the_port_table() {
        let config =
            Config::load(&Source::Preset(Preset::Whatsapp), &Overrides::default()).unwrap();
        let table: Vec<(u16, bool, bool, HeaderVersion, String)> = config
            .listeners
            .iter()
            .map(|l| {
                let pool = &config.pools[l.pool];
                (
                    l.listen.port(),
                    l.accept_proxy,
                    l.tls,
                    l.send_proxy,
                    pool.servers[0].to_string(),
                )
            })
            .collect();
        use HeaderVersion::*;
        let expected = [
            (80, false, false, V1, "g.whatsapp.net:80"),
            (8080, true, false, V1, "g.whatsapp.net:80"),
            (443, false, true, V1, "g.whatsapp.net:5222"),
            (8443, true, true, V1, "g.whatsapp.net:5222"),
            (5222, false, false, V1, "g.whatsapp.net:5222"),
            (8222, true, false, V1, "g.whatsapp.net:5222"),
            (587, false, false, None, "whatsapp.net:443"),
            (7777, false, false, None, "whatsapp.net:443"),
        ]
        .map(|(p, a, t, h, s)| (p, a, t, h, s.to_owned()));
        assert_eq!(table, expected);
        let chat = config.pools.iter().find(|p| p.name == "chat").unwrap();
        assert_eq!(chat.servers[1].to_string(), "g-fallback.whatsapp.net:5222");
        assert_eq!(config.metrics, Some("127.0.0.1:8199".parse().unwrap()));
        assert_eq!(config.tls, TlsSource::SelfSigned);
    }

    #[test]
    fn command_line_overrides_the_file() {
        let overrides = Overrides {
            bind: Some("127.0.0.1".parse().unwrap()),
            idle_timeout: Some(Duration::from_secs(7)),
            max_connections: Some(10),
            pins: vec!["g.whatsapp.net=127.0.0.2".parse().unwrap()],
            forwards: vec!["127.0.0.1:9000=localhost:22".parse().unwrap()],
            ..Overrides::default()
        };
        let config = from_text(Preset::Whatsapp.text(), &overrides).unwrap();
        assert!(
            config.listeners[..8]
                .iter()
                .all(|l| l.listen.ip() == overrides.bind.unwrap())
        );
        assert_eq!(config.timeouts.idle, Duration::from_secs(7));
        assert_eq!(config.timeouts.connect, Duration::from_secs(5));
        assert_eq!(config.limits.max_connections, 10);
        assert_eq!(
            config.pins["g.whatsapp.net"],
            vec!["127.0.0.2".parse::<IpAddr>().unwrap()]
        );
        let forward = config.listeners.last().unwrap();
        assert_eq!(
            config.pools[forward.pool].servers[0].to_string(),
            "localhost:22"
        );
        assert_eq!(forward.send_proxy, HeaderVersion::None);
    }

    /// Inputs kept in fuzz/regressions/config: each gives a configuration or an error whose
    /// line exists, never a panic.
    #[test]
    fn fuzz_regressions_stay_fixed() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../fuzz/regressions/config");
        for entry in std::fs::read_dir(dir).expect("regressions directory") {
            let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
            if let Err(e) = from_text(&text, &Overrides::default())
                && let Some(line) = e.line
            {
                assert!((1..=text.split('\n').count()).contains(&line), "{e}");
            }
        }
    }

    #[test]
    fn errors_name_their_line() {
        let check = |text: &str, line: usize, needle: &str| {
            let e = from_text(text, &Overrides::default()).unwrap_err();
            assert_eq!(e.line, Some(line), "{e}");
            assert!(e.to_string().contains(needle), "{e}");
            assert!(
                e.to_string()
                    .starts_with(&format!("test.toml line {line}: ")),
                "{e}"
            );
        };
        let pool = "[pools.p]\nservers = [\"a:1\"]\n";
        check(
            &format!("{pool}[[listener]]\nlisten = \"1.2.3.4\"\npool = \"p\"\n"),
            4,
            "socket address",
        );
        check(
            &format!("{pool}[[listener]]\nlisten = \"127.0.0.1:1\"\npool = \"q\"\n"),
            5,
            "no pool named \"q\"",
        );
        check("[pools.p]\nservers = [\"nohost\"]\n", 2, "is not HOST:PORT");
        check("[pools.p]\nservers = []\n", 2, "has no servers");
        check("[timeouts]\n\nidle = \"10 parsecs\"\n", 3, "unknown unit");
        check("[relay]\ndataplane = \"warp\"\n", 2, "unknown data plane");
        check("[relay]\nspeed = 1\n", 2, "unknown field");
        check(
            "[limits]\nmax_connections = 0\n",
            2,
            "max_connections must be",
        );
        check("[tls]\ncert = \"/c.pem\"\n", 2, "give both");
        check(
            &format!(
                "{pool}[[listener]]\nlisten = \"127.0.0.1:1\"\npool = \"p\"\n[[listener]]\nlisten = \"127.0.0.1:1\"\npool = \"p\"\n"
            ),
            7,
            "listened on twice",
        );
        check("[[listener]\n", 1, "");
        let e = from_text("", &Overrides::default()).unwrap_err();
        assert!(e.message.contains("no listeners"), "{e}");
    }
}
