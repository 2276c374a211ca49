//! What the relay runs: listeners, upstream pools, TLS, limits, timeouts and metrics,
//! built from a TOML file or a preset, plus `--forward` rules and command-line overrides.

pub mod address;
mod file;
mod settings;

use std::{
    collections::{BTreeMap, HashSet},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

pub use address::{Forward, ForwardError, MemoryLimit, Pin, Upstream, parse_duration};
pub use file::{Balance, HeaderVersion};

pub use crate::opening::Expect;
pub use settings::{
    Limits, LimitsSection, MAX_CONNECTIONS, MetricsSection, RelaySection, Settings, Timeouts,
    TimeoutsSection, TlsSection,
};

/// Which data plane the operator asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DataPlaneChoice {
    /// kernel when the eBPF program loads, after a short userspace warm-up per connection;
    /// otherwise splice
    Auto,
    /// sockhash + sk_skb verdict program: bytes never reach userspace
    Kernel,
    /// splice(2) through a pipe: no copy, but a wakeup per chunk
    Splice,
    /// plain userspace buffers
    Copy,
}

/// Presets an operator can start from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Preset {
    /// WhatsApp's proxy port table (80, 443, 5222, 8080, 8443, 8222, 587, 7777)
    Whatsapp,
    /// Only 443 (chat in TLS) and 587 (media), for networks that block relays
    WhatsappQuiet,
}

impl Preset {
    /// The preset as a configuration file an operator can edit.
    pub fn text(self) -> &'static str {
        match self {
            Self::Whatsapp => include_str!("whatsapp.toml"),
            Self::WhatsappQuiet => include_str!("whatsapp-quiet.toml"),
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

/// The command line's part of the configuration: rules that add to the file, and a layer
/// of settings that takes precedence over it.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct Overrides {
    /// Also listen on LISTEN (IP:PORT or [IPv6]:PORT) and relay to UPSTREAM (HOST:PORT).
    /// Repeatable.
    #[arg(long = "forward", value_name = "LISTEN=UPSTREAM")]
    pub forwards: Vec<Forward>,
    /// The address every configured listener binds to, instead of the file's.
    #[arg(long, value_name = "IP")]
    pub bind: Option<IpAddr>,
    /// Resolve HOST to IP without DNS. Repeatable (several IPs for one host are a list).
    #[arg(long = "resolve", value_name = "HOST=IP")]
    pub pins: Vec<Pin>,
    #[command(flatten)]
    pub settings: Settings,
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
    /// How its clients open their stream; with a fallback, what decides the route.
    pub expect: Expect,
    /// Index into `Config::pools` of the pool that clients opening otherwise go to.
    pub fallback: Option<usize>,
}

const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(3);
const DEFAULT_RESOLVE_INTERVAL: Duration = Duration::from_secs(300);

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
        Preset::WhatsappQuiet => "whatsapp-quiet",
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
        let (file_settings, pool_sections, listener_sections) = file.split();
        let settings = overrides.settings.clone().or(file_settings);
        let (pools, listeners) = self.pools_and_listeners(
            &pool_sections,
            &listener_sections,
            overrides,
            settings.relay.fallback.as_ref(),
        )?;
        let limits = settings.limits.resolve();
        let tls = self.tls(&settings.tls)?;
        if listeners.is_empty() {
            return Err(self.error(
                None,
                "no listeners: add [[listener]] sections, or give --forward or --preset",
            ));
        }
        let relay = &settings.relay;
        let mut pins: BTreeMap<String, Vec<IpAddr>> = BTreeMap::new();
        for pin in &overrides.pins {
            pins.entry(pin.host.clone()).or_default().push(pin.ip);
        }
        Ok(Config {
            dataplane: relay.dataplane.unwrap_or(DataPlaneChoice::Auto),
            map_connections: relay.map_connections.unwrap_or(limits.max_connections),
            log_clients: relay.log_clients.unwrap_or(false),
            limits,
            timeouts: settings.timeouts.resolve(),
            tls,
            metrics: settings.metrics.listen,
            pins,
            pools,
            listeners,
        })
    }

    /// The pools, then the listeners: the file's, each bound to `--bind` when given and
    /// falling back to its own fallback or `relay_fallback`, and one per `--forward` with a
    /// one-server pool, no headers, no TLS and no fallback. Each fallback is a one-server
    /// pool of its own, after the file's.
    fn pools_and_listeners(
        &self,
        pool_sections: &BTreeMap<String, file::PoolSection>,
        listener_sections: &[file::ListenerSection],
        overrides: &Overrides,
        relay_fallback: Option<&Upstream>,
    ) -> Result<(Vec<PoolConfig>, Vec<ListenerConfig>), ConfigError> {
        let mut pools = Vec::new();
        let mut pool_index = BTreeMap::new();
        let mut fallback_index = BTreeMap::new();
        let mut fallback_pool = |pools: &mut Vec<PoolConfig>, upstream: &Upstream| {
            *fallback_index
                .entry(upstream.to_string())
                .or_insert_with(|| {
                    pools.push(one_server_pool(format!("fallback-{upstream}"), upstream));
                    pools.len() - 1
                })
        };
        for (name, pool) in pool_sections {
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
        for listener in listener_sections {
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
            let fallback = match (&listener.fallback, listener.expect) {
                (Some(own), Expect::Any) => {
                    return Err(self.error(
                        Some(own.span()),
                        "a fallback needs expect = \"whatsapp\" or \"tls\": with \"any\" no client goes to it",
                    ));
                }
                (Some(own), _) => Some(fallback_pool(&mut pools, own.get_ref())),
                (None, Expect::Any) => None,
                (None, _) => relay_fallback.map(|upstream| fallback_pool(&mut pools, upstream)),
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
                    expect: listener.expect,
                    fallback,
                },
            ));
        }
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
                    expect: Expect::Any,
                    fallback: None,
                },
            ));
            pools.push(one_server_pool(
                format!("forward-{}", forward.listen),
                &forward.upstream,
            ));
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
        Ok((pools, listeners.into_iter().map(|(_, l)| l).collect()))
    }

    fn tls(&self, tls: &TlsSection) -> Result<TlsSource, ConfigError> {
        match (&tls.cert, &tls.key) {
            (Some(cert), Some(key)) => Ok(TlsSource::Files {
                cert: cert.get_ref().clone(),
                key: key.get_ref().clone(),
            }),
            (None, None) => Ok(TlsSource::SelfSigned),
            // Flags come in pairs (clap requires both), so a lone one is the file's.
            (Some(one), None) | (None, Some(one)) => Err(self.error(
                Some(one.span()),
                "give both tls.cert and tls.key, or neither for a self-signed certificate",
            )),
        }
    }
}

/// A pool of one server without health checks: a `--forward` rule's, or a fallback's.
fn one_server_pool(name: String, server: &Upstream) -> PoolConfig {
    PoolConfig {
        name,
        servers: vec![server.clone()],
        balance: Balance::Failover,
        health_interval: None,
        health_timeout: DEFAULT_HEALTH_TIMEOUT,
        resolve_interval: DEFAULT_RESOLVE_INTERVAL,
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

    /// Each listener of `preset` as (port, accept_proxy, tls, send_proxy, first server).
    fn port_table(preset: Preset) -> Vec<(u16, bool, bool, HeaderVersion, String)> {
        let config = Config::load(&Source::Preset(preset), &Overrides::default()).unwrap();
        config
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
            .collect()
    }

    #[test]
    fn whatsapp_preset_is_the_port_table() {
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
        assert_eq!(port_table(Preset::Whatsapp), expected);
    }

    #[test]
    fn quiet_preset_is_443_and_587_as_in_the_full_table() {
        let full = port_table(Preset::Whatsapp);
        let quiet: Vec<_> = full
            .into_iter()
            .filter(|(port, ..)| [443, 587].contains(port))
            .collect();
        assert_eq!(port_table(Preset::WhatsappQuiet), quiet);
    }

    #[test]
    fn command_line_overrides_the_file() {
        let mut overrides = Overrides {
            bind: Some("127.0.0.1".parse().unwrap()),
            pins: vec!["g.whatsapp.net=127.0.0.2".parse().unwrap()],
            forwards: vec!["127.0.0.1:9000=localhost:22".parse().unwrap()],
            ..Overrides::default()
        };
        overrides.settings.timeouts.idle = Some(Duration::from_secs(7));
        overrides.settings.limits.max_connections = Some(10);
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

    #[test]
    fn the_relay_fallback_reaches_the_files_listeners_not_forwards() {
        let mut overrides = Overrides {
            forwards: vec!["127.0.0.1:9000=localhost:22".parse().unwrap()],
            ..Overrides::default()
        };
        overrides.settings.relay.fallback = Some("127.0.0.1:8080".parse().unwrap());
        let config = from_text(Preset::Whatsapp.text(), &overrides).unwrap();
        let (preset, forward) = config.listeners.split_at(8);
        let fallback = preset[0]
            .fallback
            .expect("the preset's listeners fall back");
        assert!(preset.iter().all(|l| l.fallback == Some(fallback)));
        assert_eq!(
            config.pools[fallback].servers[0].to_string(),
            "127.0.0.1:8080"
        );
        assert_eq!(
            (forward[0].fallback, forward[0].expect),
            (None, Expect::Any)
        );
        let expects: Vec<Expect> = preset.iter().map(|l| l.expect).collect();
        assert_eq!(expects[..6], [Expect::Whatsapp; 6]);
        assert_eq!(
            expects[6..],
            [Expect::Tls; 2],
            "media ports carry the client's TLS"
        );
        // Without the setting nothing falls back.
        let config = from_text(Preset::Whatsapp.text(), &Overrides::default()).unwrap();
        assert!(config.listeners.iter().all(|l| l.fallback.is_none()));
    }

    #[test]
    fn a_listeners_own_fallback_wins_and_any_never_falls_back() {
        let text = "[relay]\nfallback = \"127.0.0.1:80\"\n[pools.p]\nservers = [\"a:1\"]\n\
            [[listener]]\nlisten = \"127.0.0.1:1\"\npool = \"p\"\nfallback = \"[::1]:81\"\n\
            [[listener]]\nlisten = \"127.0.0.1:2\"\npool = \"p\"\nexpect = \"any\"\n\
            [[listener]]\nlisten = \"127.0.0.1:3\"\npool = \"p\"\n";
        let config = from_text(text, &Overrides::default()).unwrap();
        let server =
            |l: &ListenerConfig| l.fallback.map(|i| config.pools[i].servers[0].to_string());
        let servers: Vec<_> = config.listeners.iter().map(server).collect();
        assert_eq!(
            servers,
            [
                Some("[::1]:81".to_owned()),
                None,
                Some("127.0.0.1:80".to_owned())
            ]
        );
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
        check("[limits]\nmax_connections = 0\n", 2, "must be 1-1000000");
        check("[tls]\ncert = \"/c.pem\"\n", 2, "give both");
        check(
            &format!(
                "{pool}[[listener]]\nlisten = \"127.0.0.1:1\"\npool = \"p\"\n[[listener]]\nlisten = \"127.0.0.1:1\"\npool = \"p\"\n"
            ),
            7,
            "listened on twice",
        );
        check(
            &format!(
                "{pool}[[listener]]\nlisten = \"127.0.0.1:1\"\npool = \"p\"\nexpect = \"any\"\nfallback = \"a:80\"\n"
            ),
            7,
            "a fallback needs expect",
        );
        check(
            &format!(
                "{pool}[[listener]]\nlisten = \"127.0.0.1:1\"\npool = \"p\"\nexpect = \"xmpp\"\n"
            ),
            6,
            "unknown variant",
        );
        check("[relay]\nfallback = \"nowhere\"\n", 2, "is not HOST:PORT");
        check("[[listener]\n", 1, "");
        let e = from_text("", &Overrides::default()).unwrap_err();
        assert!(e.message.contains("no listeners"), "{e}");
    }
}
