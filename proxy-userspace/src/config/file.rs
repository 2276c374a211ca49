//! The TOML configuration file, as written. Every field is optional; defaults are the
//! values of the WhatsApp preset. Values are parsed while reading, so a bad one is
//! reported with its line.

use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf, time::Duration};

use serde::{Deserialize, Deserializer, de};
use toml::Spanned;

use super::address::{Upstream, parse_duration, seconds_to_duration};
use crate::dataplane::DataPlaneChoice;

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

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelaySection {
    #[serde(default, deserialize_with = "dataplane")]
    pub dataplane: Option<DataPlaneChoice>,
    pub log_clients: Option<bool>,
    pub map_connections: Option<Spanned<u32>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsSection {
    pub max_connections: Option<Spanned<u32>>,
    pub per_ip_connections: Option<u32>,
    pub per_ip_rate: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeoutsSection {
    #[serde(default, deserialize_with = "duration")]
    pub connect: Option<Duration>,
    #[serde(default, deserialize_with = "duration")]
    pub handshake: Option<Duration>,
    #[serde(default, deserialize_with = "duration")]
    pub idle: Option<Duration>,
    #[serde(default, deserialize_with = "duration")]
    pub half_closed: Option<Duration>,
    #[serde(default, deserialize_with = "duration")]
    pub drain: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    pub cert: Option<Spanned<PathBuf>>,
    pub key: Option<Spanned<PathBuf>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSection {
    pub listen: Option<SocketAddr>,
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

fn dataplane<'de, D: Deserializer<'de>>(d: D) -> Result<Option<DataPlaneChoice>, D::Error> {
    let name = String::deserialize(d)?;
    <DataPlaneChoice as clap::ValueEnum>::from_str(&name, false)
        .map(Some)
        .map_err(|_| {
            de::Error::custom(format!(
                "unknown data plane {name:?}: use auto, kernel, splice or copy"
            ))
        })
}

/// A duration as text (`10s`, `250ms`, `5m`) or a number of seconds.
fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    struct Visitor;
    impl de::Visitor<'_> for Visitor {
        type Value = Duration;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a duration such as \"10s\", \"250ms\", \"5m\", or a number of seconds")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
            parse_duration(v).map_err(E::custom)
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Duration, E> {
            seconds_to_duration(v as f64).map_err(E::custom)
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<Duration, E> {
            seconds_to_duration(v).map_err(E::custom)
        }
    }
    d.deserialize_any(Visitor).map(Some)
}
