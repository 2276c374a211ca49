//! The TOML configuration file, as written. Every field is optional; defaults are the
//! values of the WhatsApp preset. Values are parsed while reading, so a bad one is
//! reported with its line. The relay-wide sections are shared with the command line
//! (`settings.rs`); pools and listeners exist only in files.

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use serde::Deserialize;
use toml::Spanned;

use super::{
    Expect,
    address::Upstream,
    settings::{
        LimitsSection, MetricsSection, RelaySection, Settings, TimeoutsSection, TlsSection,
        duration,
    },
};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct File {
    #[serde(default)]
    pub relay: RelaySection,
    #[serde(default)]
    pub limits: LimitsSection,
    #[serde(default)]
    pub timeouts: TimeoutsSection,
    #[serde(default)]
    pub tls: TlsSection,
    #[serde(default)]
    pub metrics: MetricsSection,
    #[serde(default)]
    pub pools: BTreeMap<String, PoolSection>,
    #[serde(default, rename = "listener")]
    pub listeners: Vec<ListenerSection>,
}

impl File {
    /// The relay-wide sections as one layer of settings, and the pools and listeners.
    pub fn split(
        self,
    ) -> (
        Settings,
        BTreeMap<String, PoolSection>,
        Vec<ListenerSection>,
    ) {
        let settings = Settings {
            relay: self.relay,
            limits: self.limits,
            timeouts: self.timeouts,
            tls: self.tls,
            metrics: self.metrics,
        };
        (settings, self.pools, self.listeners)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolSection {
    pub servers: Spanned<Vec<Upstream>>,
    #[serde(default)]
    pub balance: Balance,
    #[serde(default, deserialize_with = "duration")]
    pub health_interval: Option<Duration>,
    #[serde(default, deserialize_with = "duration")]
    pub health_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "duration")]
    pub resolve_interval: Option<Duration>,
}

/// How a pool picks a server for each connection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Balance {
    /// The first healthy server in the list; the next ones only when it is down.
    #[default]
    Failover,
    /// Each connection to the next healthy server.
    RoundRobin,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerSection {
    pub name: Option<String>,
    pub listen: Spanned<SocketAddr>,
    pub pool: Spanned<String>,
    #[serde(default)]
    pub accept_proxy: bool,
    #[serde(default)]
    pub tls: bool,
    #[serde(default)]
    pub send_proxy: HeaderVersion,
    pub max_connections: Option<Spanned<u32>>,
    #[serde(default)]
    pub expect: Expect,
    pub fallback: Option<Spanned<Upstream>>,
}

/// Which PROXY protocol header a listener writes to its upstream.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HeaderVersion {
    #[default]
    None,
    V1,
    V2,
}
