//! What the relay runs: listeners, upstream pools, TLS, limits, timeouts and metrics,
//! built from a TOML file or a preset, plus `--forward` rules and command-line overrides.

mod acme;
pub mod address;
mod file;
mod settings;

use std::{
    collections::{BTreeMap, HashSet},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

pub use acme::{AcmeConfig, DEFAULT_STATE_DIR, LETS_ENCRYPT};
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
    /// A self-signed certificate, made at start.
    SelfSigned,
    Files {
        cert: PathBuf,
        key: PathBuf,
    },
    /// From an ACME CA, renewed while running; self-signed until the first arrives.
    Acme(AcmeConfig),
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
        let tls = self.tls(&settings.tls, settings.relay.state_dir.as_ref())?;
        if listeners.is_empty() {
            return Err(self.error(
                None,
                "no listeners: add [[listener]] sections, or give --forward or --preset",
            ));
        }
        if matches!(tls, TlsSource::Acme(_)) && !listeners.iter().any(|l| l.tls) {
            return Err(self.error(
                None,
                "ACME certificates are for TLS listeners, and none has tls = true",
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

    fn tls(&self, tls: &TlsSection, state_dir: Option<&PathBuf>) -> Result<TlsSource, ConfigError> {
        if let Some(acme) = acme::acme(tls, state_dir).map_err(|(at, e)| self.error(at, e))? {
            return Ok(TlsSource::Acme(acme));
        }
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
mod tests;
