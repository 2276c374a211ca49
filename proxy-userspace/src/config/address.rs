//! Addresses as operators write them: `LISTEN=UPSTREAM` rules, `HOST:PORT` upstreams,
//! `HOST=IP` pins and durations such as `10s` or `5m`.

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    str::FromStr,
    time::Duration,
};

/// One `--forward LISTEN=UPSTREAM` rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Forward {
    pub listen: SocketAddr,
    pub upstream: Upstream,
}

/// `HOST:PORT`, kept as text so DNS can be asked again while the relay runs.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(try_from = "String")]
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

impl TryFrom<String> for Upstream {
    type Error = ForwardError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

/// `--resolve HOST=IP`: answers for HOST without asking DNS (repeat it for several IPs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pin {
    pub host: String,
    pub ip: IpAddr,
}

impl FromStr for Pin {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (host, ip) = s
            .split_once('=')
            .ok_or_else(|| format!("expected HOST=IP, e.g. g.whatsapp.net=127.0.0.2, not {s:?}"))?;
        let host = host.trim();
        if host.is_empty() || host.chars().any(char::is_whitespace) {
            return Err(format!("{host:?} is not a host name"));
        }
        let ip = ip
            .trim()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse()
            .map_err(|_| format!("{ip:?} is not an IP address"))?;
        Ok(Self {
            host: host.to_ascii_lowercase(),
            ip,
        })
    }
}

/// The longest timeout or interval accepted anywhere: a day.
const MAX_DURATION: Duration = Duration::from_secs(86_400);

/// `250ms`, `10s`, `5m`, `1h`, or a plain number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let scale = match unit.trim() {
        "ms" => 0.001,
        "" | "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {s:?} (use ms, s, m or h)"
            ));
        }
    };
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 10s, 250ms, 5m)"))?;
    seconds_to_duration(value * scale).map_err(|e| format!("{s:?}: {e}"))
}

pub fn seconds_to_duration(secs: f64) -> Result<Duration, String> {
    if !(secs > 0.0 && secs <= MAX_DURATION.as_secs_f64()) {
        return Err("must be more than 0 and at most 24h".into());
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
    fn parses_pins_and_durations() {
        let pin: Pin = "G.WhatsApp.net=127.0.0.2".parse().unwrap();
        assert_eq!(pin.host, "g.whatsapp.net");
        assert_eq!(pin.ip, "127.0.0.2".parse::<IpAddr>().unwrap());
        assert_eq!(
            "h=[::1]".parse::<Pin>().unwrap().ip,
            "::1".parse::<IpAddr>().unwrap()
        );
        assert!("h".parse::<Pin>().is_err());
        assert!("h=example.org".parse::<Pin>().is_err());
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        for bad in ["0", "-1s", "10x", "s", "", "25h", "1e3"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
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
}
