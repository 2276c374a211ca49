//! Command-line configuration: what to listen on, where to forward, how to move bytes.

use std::{fmt, net::SocketAddr, str::FromStr, time::Duration};

use clap::Parser;

use crate::dataplane::DataPlaneChoice;

#[derive(Debug, Parser)]
#[command(
    name = "ebpf-proxy",
    version,
    about = "A TCP relay whose bytes move inside the kernel (sockmap + sk_skb eBPF).",
    after_help = "Example: ebpf-proxy --forward 0.0.0.0:5222=upstream.example:5222"
)]
pub struct Config {
    /// Listen on LISTEN (IP:PORT or [IPv6]:PORT) and relay each connection to UPSTREAM
    /// (HOST:PORT, resolved when connecting). Repeatable.
    #[arg(long = "forward", value_name = "LISTEN=UPSTREAM", required = true)]
    pub forwards: Vec<Forward>,

    /// How bytes move: kernel (eBPF sockmap), splice, copy, or auto (kernel when the eBPF
    /// program loads, otherwise splice).
    #[arg(long, value_enum, default_value_t = DataPlaneChoice::Auto)]
    pub dataplane: DataPlaneChoice,

    /// Seconds to wait for the upstream to accept before closing the client.
    #[arg(long, value_name = "SECS", default_value = "5", value_parser = parse_seconds)]
    pub connect_timeout: Duration,

    /// Connections relayed at once; further clients wait in the listen backlog.
    #[arg(long, value_name = "N", default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_connections: u32,
}

impl Config {
    /// Sockhash capacity: two sockets per connection.
    pub fn max_sockets(&self) -> u32 {
        self.max_connections.saturating_mul(2)
    }
}

/// One `--forward LISTEN=UPSTREAM` rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Forward {
    pub listen: SocketAddr,
    pub upstream: Upstream,
}

/// `HOST:PORT`, kept as text so DNS is asked at each connect.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Upstream {
    pub host: String,
    pub port: u16,
}

impl fmt::Display for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ForwardError {
    #[error("expected LISTEN=UPSTREAM, e.g. 0.0.0.0:5222=upstream.example:5222")]
    MissingEquals,
    #[error("listen address {0:?} is not IP:PORT (IPv6 as [::1]:PORT)")]
    BadListen(String),
    #[error("upstream {0:?} is not HOST:PORT")]
    BadUpstream(String),
    #[error("upstream port in {0:?} must be 1-65535")]
    BadPort(String),
}

impl FromStr for Forward {
    type Err = ForwardError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (listen, upstream) = s.split_once('=').ok_or(ForwardError::MissingEquals)?;
        let listen = listen
            .trim()
            .parse()
            .map_err(|_| ForwardError::BadListen(listen.to_owned()))?;
        Ok(Self {
            listen,
            upstream: upstream.trim().parse()?,
        })
    }
}

impl FromStr for Upstream {
    type Err = ForwardError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ForwardError::BadUpstream(s.to_owned());
        let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
        let host = match host.strip_prefix('[') {
            Some(v6) => v6.strip_suffix(']').ok_or_else(bad)?,
            // An unbracketed IPv6 address would be ambiguous with the port separator.
            None if host.contains(':') => return Err(bad()),
            None => host,
        };
        if host.is_empty() || host.chars().any(char::is_whitespace) {
            return Err(bad());
        }
        let port: u16 = port
            .parse()
            .map_err(|_| ForwardError::BadPort(s.to_owned()))?;
        if port == 0 {
            return Err(ForwardError::BadPort(s.to_owned()));
        }
        Ok(Self {
            host: host.to_owned(),
            port,
        })
    }
}

fn parse_seconds(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if !(secs > 0.0 && secs <= 3600.0) {
        return Err(format!("{s} must be more than 0 and at most 3600 seconds"));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_forward_rules() {
        let f: Forward = "0.0.0.0:5222=g.example.net:5222".parse().unwrap();
        assert_eq!(f.listen, "0.0.0.0:5222".parse().unwrap());
        assert_eq!(
            f.upstream,
            Upstream {
                host: "g.example.net".into(),
                port: 5222
            }
        );
        let f: Forward = "[::1]:80=[2001:db8::1]:8080".parse().unwrap();
        assert_eq!(f.listen, "[::1]:80".parse().unwrap());
        assert_eq!(f.upstream.host, "2001:db8::1");
        assert_eq!(f.upstream.to_string(), "[2001:db8::1]:8080");
    }

    #[test]
    fn rejects_malformed_rules_with_the_reason() {
        let err = |s: &str| s.parse::<Forward>().unwrap_err();
        assert_eq!(err("127.0.0.1:80"), ForwardError::MissingEquals);
        assert_eq!(
            err("localhost:80=a:1"),
            ForwardError::BadListen("localhost:80".into())
        );
        assert_eq!(
            err("127.0.0.1=a:1"),
            ForwardError::BadListen("127.0.0.1".into())
        );
        assert_eq!(
            err("127.0.0.1:80=example"),
            ForwardError::BadUpstream("example".into())
        );
        assert_eq!(
            err("127.0.0.1:80=:80"),
            ForwardError::BadUpstream(":80".into())
        );
        assert_eq!(
            err("127.0.0.1:80=::1:80"),
            ForwardError::BadUpstream("::1:80".into())
        );
        assert_eq!(err("127.0.0.1:80=a:0"), ForwardError::BadPort("a:0".into()));
        assert_eq!(
            err("127.0.0.1:80=a:99999"),
            ForwardError::BadPort("a:99999".into())
        );
    }

    #[test]
    fn command_line_defaults_and_errors() {
        let c = Config::try_parse_from(["ebpf-proxy", "--forward", "127.0.0.1:1=a:2"]).unwrap();
        assert_eq!(c.dataplane, DataPlaneChoice::Auto);
        assert_eq!(c.connect_timeout, Duration::from_secs(5));
        assert!(Config::try_parse_from(["ebpf-proxy"]).is_err());
        assert!(
            Config::try_parse_from(["ebpf-proxy", "--forward", "x", "--dataplane", "magic"])
                .is_err()
        );
        assert!(
            Config::try_parse_from([
                "ebpf-proxy",
                "--forward",
                "127.0.0.1:1=a:2",
                "--connect-timeout",
                "0"
            ])
            .is_err()
        );
    }
}
