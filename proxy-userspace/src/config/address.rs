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

/// The smallest memory limit accepted: below it the relay could not hold one fast flow.
pub const MIN_MEMORY_LIMIT: u64 = 16 << 20;

/// What the relay may hold for its connections: a size, or `auto` for the share of the
/// machine's memory that `memory::default_limit` gives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryLimit {
    Auto,
    Bytes(u64),
}

/// `auto`, or a size: `256MiB`, `1GiB`, `512M`, `2G`, `65536` (bytes). K, M and G are
/// binary units, as in `ls -h` and systemd.
pub fn parse_memory_limit(s: &str) -> Result<MemoryLimit, String> {
    let s = s.trim();
    if s.eq_ignore_ascii_case("auto") {
        return Ok(MemoryLimit::Auto);
    }
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" => 10,
        "m" | "mib" => 20,
        "g" | "gib" => 30,
        "t" | "tib" => 40,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {s:?} (use KiB, MiB, GiB, or auto)"
            ));
        }
    };
    let bytes = number
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
        .ok_or_else(|| format!("{s:?} is not a size (e.g. 256MiB, 1GiB, or auto)"))?;
    if bytes < MIN_MEMORY_LIMIT {
        return Err(format!(
            "{s:?} is below the smallest memory limit, {} MiB",
            MIN_MEMORY_LIMIT >> 20
        ));
    }
    Ok(MemoryLimit::Bytes(bytes))
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
    fn memory_limits_are_binary_sizes_or_auto() {
        assert_eq!(parse_memory_limit("auto"), Ok(MemoryLimit::Auto));
        assert_eq!(
            parse_memory_limit("256MiB"),
            Ok(MemoryLimit::Bytes(256 << 20))
        );
        assert_eq!(parse_memory_limit("1G"), Ok(MemoryLimit::Bytes(1 << 30)));
        assert_eq!(
            parse_memory_limit("16777216"),
            Ok(MemoryLimit::Bytes(16 << 20))
        );
        assert!(parse_memory_limit("1MiB").unwrap_err().contains("smallest"));
        assert!(
            parse_memory_limit("1.5GiB")
                .unwrap_err()
                .contains("unknown unit")
        );
        assert!(parse_memory_limit("lots").is_err());
        assert!(parse_memory_limit("99999999999G").is_err());
    }

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
