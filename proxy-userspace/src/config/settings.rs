//! Every relay-wide setting in one shape: a struct of optional values per file section,
//! read from the file (serde) and from the command line (clap, flattened into the run
//! flags), and merged with the command line first ([`Settings::or`]). A field's doc comment
//! is its `--help` text. What a value means once resolved, and its default, is in
//! `config/mod.rs` (`Builder`).

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use serde::{Deserialize, Deserializer, de};
use toml::Spanned;

use super::{
    DataPlaneChoice,
    address::{MemoryLimit, Upstream, parse_duration, parse_memory_limit, seconds_to_duration},
};

/// The sockhash holds two sockets per connection, and BPF map sizes are u32.
pub const MAX_CONNECTIONS: u32 = 1_000_000;

/// Defines a section: the struct as written, and `or`, which takes `lower`'s value for
/// every field this layer leaves unset. Given `=> Resolved` and a default per field, also
/// the values in force (`Resolved`, with `Resolved::DEFAULT`) and `resolve`, which fills in
/// the defaults. Each field is listed once, so a new setting is one entry here.
macro_rules! section {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $( $(#[$field_meta:meta])* pub $field:ident: Option<$ty:ty>, )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Debug, Default, Deserialize, clap::Args)]
        #[serde(deny_unknown_fields)]
        pub struct $name {
            $( $(#[$field_meta])* pub $field: Option<$ty>, )*
        }

        impl $name {
            /// This layer's values, and `lower`'s where this one has none.
            pub fn or(self, lower: Self) -> Self {
                Self { $( $field: self.$field.or(lower.$field), )* }
            }
        }
    };
    (
        $(#[$meta:meta])*
        pub struct $name:ident => $resolved:ident {
            $( $(#[$field_meta:meta])* pub $field:ident: $ty:ty = $default:expr, )*
        }
    ) => {
        section! {
            $(#[$meta])*
            pub struct $name {
                $( $(#[$field_meta])* pub $field: Option<$ty>, )*
            }
        }

        #[doc = concat!("The values in force of [`", stringify!($name), "`].")]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub struct $resolved {
            $( pub $field: $ty, )*
        }

        impl $resolved {
            pub const DEFAULT: Self = Self { $( $field: $default, )* };
        }

        impl $name {
            /// The values in force: this layer's, and the defaults for the rest.
            pub fn resolve(&self) -> $resolved {
                $resolved { $( $field: self.$field.unwrap_or($resolved::DEFAULT.$field), )* }
            }
        }
    };
}

section! {
    /// `[relay]`: how bytes move.
    pub struct RelaySection {
        /// How bytes move: kernel (eBPF sockmap), splice, copy, or auto (kernel when the eBPF
        /// program loads, otherwise splice).
        #[arg(long, value_enum)]
        #[serde(default, deserialize_with = "dataplane")]
        pub dataplane: Option<DataPlaneChoice>,
        /// Write client addresses in logs (off by default, for the users' privacy).
        #[arg(long, num_args = 0, default_missing_value = "true")]
        pub log_clients: Option<bool>,
        /// Connections the kernel maps hold (default: --max-connections); beyond it,
        /// connections are relayed in userspace and counted as fallbacks.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=MAX_CONNECTIONS as i64))]
        #[serde(default, deserialize_with = "connections")]
        pub map_connections: Option<u32>,
        /// Where clients go whose first bytes are not what their listener expects (a
        /// prober's HTTP request, a TLS ClientHello on a plain port, silence): HOST:PORT,
        /// typically a web server with an ordinary site. Applies to the file's listeners
        /// that set none of their own; never to --forward rules. Off by default.
        #[arg(long, value_name = "HOST:PORT")]
        pub fallback: Option<Upstream>,
        /// Where the relay keeps what must outlive it: the ACME account and certificates.
        #[arg(long, value_name = "DIR")]
        pub state_dir: Option<PathBuf>,
    }
}

section! {
    /// `[limits]`: how many clients at once, and per address.
    pub struct LimitsSection => Limits {
        /// Connections relayed at once; further clients wait in the listen backlog.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=MAX_CONNECTIONS as i64))]
        #[serde(default, deserialize_with = "connections")]
        pub max_connections: u32 = 4096,
        /// Concurrent connections per client IP (IPv6: per /64); 0, the default, for no
        /// limit: a carrier NAT puts many users behind one address.
        #[arg(long, value_name = "N")]
        pub per_ip_connections: u32 = 0,
        /// New connections per second per client IP (IPv6: per /64); 0, the default, for no
        /// limit.
        #[arg(long, value_name = "N")]
        pub per_ip_rate: u32 = 0,
        /// Memory the relay may hold for its connections (socket buffers, the kernel's
        /// redirect queues, its own buffers), e.g. 512MiB; auto, the default, is a quarter
        /// of the machine's memory or of the cgroup's limit. Near it, new connections stay
        /// out of the kernel and the biggest holders are throttled; past it, connections
        /// that hold much and drain slowly are reset.
        #[arg(long = "memory-limit", value_name = "SIZE", value_parser = parse_memory_limit)]
        #[serde(default, deserialize_with = "memory_limit")]
        pub memory: MemoryLimit = MemoryLimit::Auto,
    }
}

section! {
    /// `[timeouts]`: how long each stage of a connection may take.
    pub struct TimeoutsSection => Timeouts {
        /// Time the upstream has to accept (e.g. 5s).
        #[arg(long = "connect-timeout", value_name = "DURATION", value_parser = parse_duration)]
        #[serde(default, deserialize_with = "duration")]
        pub connect: Duration = Duration::from_secs(5),
        /// Time a client has to finish its PROXY header and TLS handshake.
        #[arg(long = "handshake-timeout", value_name = "DURATION", value_parser = parse_duration)]
        #[serde(default, deserialize_with = "duration")]
        pub handshake: Duration = Duration::from_secs(10),
        /// Close a connection after this long without bytes in either direction.
        #[arg(long = "idle-timeout", value_name = "DURATION", value_parser = parse_duration)]
        #[serde(default, deserialize_with = "duration")]
        pub idle: Duration = Duration::from_secs(600),
        /// Close a connection once one side finished sending and nothing moved for this
        /// long since.
        #[arg(long = "half-closed-timeout", value_name = "DURATION", value_parser = parse_duration)]
        #[serde(default, deserialize_with = "duration")]
        pub half_closed: Duration = Duration::from_secs(60),
        /// After SIGTERM, how long open connections may take to finish (SIGINT closes at once).
        #[arg(long = "drain-timeout", value_name = "DURATION", value_parser = parse_duration)]
        #[serde(default, deserialize_with = "duration")]
        pub drain: Duration = Duration::from_secs(30),
    }
}

section! {
    /// `[tls]`: the certificate of TLS listeners. Values keep where they were written, so a
    /// lone `cert` or `key` is reported with its line; clap requires flags in pairs.
    pub struct TlsSection {
        /// PEM certificate chain for TLS listeners (default: self-signed, made at start).
        #[arg(long = "tls-cert", id = "tls_cert", value_name = "FILE", requires = "tls_key", value_parser = flag_value::<PathBuf>)]
        pub cert: Option<Spanned<PathBuf>>,
        /// PEM private key for --tls-cert.
        #[arg(long = "tls-key", id = "tls_key", value_name = "FILE", requires = "tls_cert", value_parser = flag_value::<PathBuf>)]
        pub key: Option<Spanned<PathBuf>>,
        /// Get the TLS listeners' certificate for NAME from an ACME CA (Let's Encrypt by
        /// default) and renew it while running; the CA validates on port 443 (TLS-ALPN-01).
        /// Repeatable: one certificate holds every name.
        #[arg(long = "acme-domain", id = "acme_domain", value_name = "NAME", value_parser = flag_value::<String>)]
        pub acme_domains: Option<Vec<Spanned<String>>>,
        /// The ACME CA's directory URL (default: Let's Encrypt's).
        #[arg(long = "acme-directory", value_name = "URL", requires = "acme_domain", value_parser = flag_value::<String>)]
        pub acme_directory: Option<Spanned<String>>,
        /// A PEM root certificate to trust for the ACME directory too (a test CA's).
        #[arg(long = "acme-directory-ca", value_name = "FILE", requires = "acme_domain", value_parser = flag_value::<PathBuf>)]
        pub acme_directory_ca: Option<Spanned<PathBuf>>,
        /// The e-mail address the CA may write to about the certificates (expiry, revocation).
        #[arg(long = "acme-contact", value_name = "EMAIL", requires = "acme_domain", value_parser = flag_value::<String>)]
        pub acme_contact: Option<Spanned<String>>,
    }
}

section! {
    /// `[metrics]`: the Prometheus endpoint.
    pub struct MetricsSection {
        /// Serve Prometheus metrics at http://IP:PORT/metrics (keep it on loopback).
        #[arg(long = "metrics", id = "metrics_listen", value_name = "IP:PORT")]
        pub listen: Option<SocketAddr>,
    }
}

/// One layer of settings, every section: the file's, or the command line's.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct Settings {
    #[command(flatten)]
    pub relay: RelaySection,
    #[command(flatten)]
    pub limits: LimitsSection,
    #[command(flatten)]
    pub timeouts: TimeoutsSection,
    #[command(flatten)]
    pub tls: TlsSection,
    #[command(flatten)]
    pub metrics: MetricsSection,
}

impl Settings {
    /// This layer's values, and `lower`'s where this one has none.
    pub fn or(self, lower: Self) -> Self {
        Self {
            relay: self.relay.or(lower.relay),
            limits: self.limits.or(lower.limits),
            timeouts: self.timeouts.or(lower.timeouts),
            tls: self.tls.or(lower.tls),
            metrics: self.metrics.or(lower.metrics),
        }
    }
}

/// A flag's value where a file's would carry its place: flags have none (an empty span),
/// and clap has checked them before any rule that names a line can.
fn flag_value<T: std::str::FromStr>(text: &str) -> Result<Spanned<T>, T::Err> {
    text.parse().map(|value| Spanned::new(0..0, value))
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

/// A connection count the maps can hold: 1 to [`MAX_CONNECTIONS`].
fn connections<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    let n = u32::deserialize(d)?;
    if (1..=MAX_CONNECTIONS).contains(&n) {
        Ok(Some(n))
    } else {
        Err(de::Error::custom(format!(
            "{n} connections: must be 1-{MAX_CONNECTIONS}"
        )))
    }
}

/// A memory limit as text (`512MiB`, `auto`) or a number of bytes.
fn memory_limit<'de, D: Deserializer<'de>>(d: D) -> Result<Option<MemoryLimit>, D::Error> {
    struct Visitor;
    impl de::Visitor<'_> for Visitor {
        type Value = MemoryLimit;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a size such as \"512MiB\" or \"1GiB\", \"auto\", or a number of bytes")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<MemoryLimit, E> {
            parse_memory_limit(v).map_err(E::custom)
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<MemoryLimit, E> {
            parse_memory_limit(&v.to_string()).map_err(E::custom)
        }
    }
    d.deserialize_any(Visitor).map(Some)
}

/// A duration as text (`10s`, `250ms`, `5m`) or a number of seconds.
pub(super) fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
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
