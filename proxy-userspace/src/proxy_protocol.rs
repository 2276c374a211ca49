//! The PROXY protocol (v1 text, v2 binary), parsed and built with the `ppp` crate: read
//! exactly one header from a client, and write one to an upstream.

use std::{io, net::SocketAddr};

use ppp::{HeaderResult, PartialResult, v1, v2};
use tokio::{io::AsyncReadExt, net::TcpStream};

use crate::{
    config::HeaderVersion,
    peek::{Peeked, peek_until},
};

/// The longest header accepted: v2's 16 fixed bytes, IPv6 addresses and room for TLVs.
/// Longer ones are refused rather than buffered.
pub const MAX_HEADER: usize = 1024;

/// The connection a header describes: who connected (source) to which address (destination).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Endpoints {
    pub source: SocketAddr,
    pub destination: SocketAddr,
}

#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    #[error("client closed before sending a complete PROXY header")]
    Closed,
    #[error("malformed PROXY header: {0}")]
    Malformed(String),
    #[error("PROXY header longer than {MAX_HEADER} bytes")]
    TooLong,
    #[error("reading the PROXY header: {0}")]
    Io(#[from] io::Error),
}

/// What the bytes received so far say.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// A complete header of this many bytes, with its endpoints (None: UNKNOWN or LOCAL,
    /// i.e. the connection's own addresses apply).
    Complete(usize, Option<Endpoints>),
    Incomplete,
    Malformed(String),
}

/// v1's longest header, CRLF included.
const MAX_V1: usize = 107;

/// Parses the start of a client's stream.
pub fn parse(bytes: &[u8]) -> Parsed {
    // A v1 line is judged once its LF has arrived, and on its own: ppp takes a lone CR
    // for the end, and accepts a line without CR when nothing follows it.
    if bytes.starts_with(b"PROXY ") {
        let window = &bytes[..bytes.len().min(MAX_V1)];
        let Some(lf) = window.iter().position(|&b| b == b'\n') else {
            return match bytes.len() < MAX_V1 {
                true => Parsed::Incomplete,
                false => Parsed::Malformed("no line end within 107 bytes".into()),
            };
        };
        if bytes[lf - 1] != b'\r' {
            return Parsed::Malformed("the line must end in CRLF".into());
        }
        return match v1::Header::try_from(&bytes[..=lf]) {
            Ok(header) => Parsed::Complete(lf + 1, v1_endpoints(header.addresses)),
            Err(e) => Parsed::Malformed(e.to_string()),
        };
    }
    let result = HeaderResult::parse(bytes);
    if result.is_incomplete() {
        return Parsed::Incomplete;
    }
    match result {
        HeaderResult::V1(Ok(header)) => {
            Parsed::Complete(header.header.len(), v1_endpoints(header.addresses))
        }
        HeaderResult::V2(Ok(header)) => {
            let endpoints = match (header.command, header.addresses) {
                (v2::Command::Proxy, v2::Addresses::IPv4(a)) => Some(Endpoints {
                    source: (a.source_address, a.source_port).into(),
                    destination: (a.destination_address, a.destination_port).into(),
                }),
                (v2::Command::Proxy, v2::Addresses::IPv6(a)) => Some(Endpoints {
                    source: (a.source_address, a.source_port).into(),
                    destination: (a.destination_address, a.destination_port).into(),
                }),
                _ => None,
            };
            Parsed::Complete(header.len(), endpoints)
        }
        HeaderResult::V1(Err(e)) => Parsed::Malformed(e.to_string()),
        HeaderResult::V2(Err(e)) => Parsed::Malformed(e.to_string()),
    }
}

/// What must hold for any input, checked by the fuzz target and by the regression tests
/// that replay its findings: no panic, a complete header lies within the input, and stays
/// the same whatever follows it.
#[doc(hidden)]
pub fn check_invariants(data: &[u8]) {
    if let Parsed::Complete(len, endpoints) = parse(data) {
        assert!(len > 0 && len <= data.len());
        let mut longer = data.to_vec();
        longer.extend_from_slice(b"payload");
        assert_eq!(
            parse(&longer),
            Parsed::Complete(len, endpoints),
            "{:?}",
            String::from_utf8_lossy(data)
        );
    }
}

fn v1_endpoints(addresses: v1::Addresses) -> Option<Endpoints> {
    match addresses {
        v1::Addresses::Tcp4(a) => Some(Endpoints {
            source: (a.source_address, a.source_port).into(),
            destination: (a.destination_address, a.destination_port).into(),
        }),
        v1::Addresses::Tcp6(a) => Some(Endpoints {
            source: (a.source_address, a.source_port).into(),
            destination: (a.destination_address, a.destination_port).into(),
        }),
        v1::Addresses::Unknown => None,
    }
}

/// Reads one PROXY header from `stream`, consuming exactly its bytes: whatever follows
/// stays in the socket's receive queue. The caller bounds the time it may take.
pub async fn read_header(stream: &mut TcpStream) -> Result<Option<Endpoints>, HeaderError> {
    let mut buf = vec![0u8; MAX_HEADER];
    // Peek until the bytes so far form a header: nothing past it is consumed.
    let parsed = peek_until(stream, &mut buf, |bytes, finished| match parse(bytes) {
        _ if bytes.is_empty() && finished => Peeked::Decided(Err(HeaderError::Closed)),
        Parsed::Incomplete if finished => Peeked::Decided(Err(HeaderError::Closed)),
        Parsed::Incomplete if bytes.len() == MAX_HEADER => {
            Peeked::Decided(Err(HeaderError::TooLong))
        }
        Parsed::Incomplete => Peeked::NeedMore(bytes.len() + 1),
        Parsed::Malformed(why) => Peeked::Decided(Err(HeaderError::Malformed(why))),
        Parsed::Complete(len, endpoints) => Peeked::Decided(Ok((len, endpoints))),
    })
    .await??;
    let (len, endpoints) = parsed;
    stream.read_exact(&mut buf[..len]).await?;
    Ok(endpoints)
}

/// The header `version` for a connection from `source` to `destination` (empty for None).
pub fn encode(version: HeaderVersion, source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    // A dual-stack listener sees IPv4 clients as ::ffff:a.b.c.d: name them as IPv4.
    let canonical = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
    let addresses = (canonical(source), canonical(destination));
    match version {
        HeaderVersion::None => Vec::new(),
        HeaderVersion::V1 => v1::Addresses::from(addresses).to_string().into_bytes(),
        HeaderVersion::V2 => v2::Builder::with_addresses(
            v2::Version::Two | v2::Command::Proxy,
            v2::Protocol::Stream,
            addresses,
        )
        .build()
        .expect("an address-only v2 header always fits"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng, rngs::StdRng};

    fn endpoints(source: &str, destination: &str) -> Endpoints {
        Endpoints {
            source: source.parse().unwrap(),
            destination: destination.parse().unwrap(),
        }
    }

    #[test]
    fn round_trips_v1_and_v2_and_keeps_the_payload_apart() {
        for (s, d) in [
            ("192.0.2.1:5000", "198.51.100.2:443"),
            ("[2001:db8::1]:5000", "[2001:db8::2]:80"),
        ] {
            let e = endpoints(s, d);
            for version in [HeaderVersion::V1, HeaderVersion::V2] {
                let mut bytes = encode(version, e.source, e.destination);
                let len = bytes.len();
                bytes.extend_from_slice(b"PROXY payload that is not a header\r\n");
                assert_eq!(parse(&bytes), Parsed::Complete(len, Some(e)), "{version:?}");
                for cut in 0..len {
                    assert_eq!(
                        parse(&bytes[..cut]),
                        Parsed::Incomplete,
                        "{version:?} cut at {cut}"
                    );
                }
            }
        }
        assert_eq!(
            encode(
                HeaderVersion::V1,
                "[::ffff:192.0.2.1]:1".parse().unwrap(),
                "[::ffff:192.0.2.2]:2".parse().unwrap()
            ),
            b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\r\n"
        );
        assert!(encode(HeaderVersion::None, e0().source, e0().destination).is_empty());
    }

    fn e0() -> Endpoints {
        endpoints("127.0.0.1:1", "127.0.0.1:2")
    }

    #[test]
    fn unknown_and_local_carry_no_endpoints() {
        assert_eq!(parse(b"PROXY UNKNOWN\r\nx"), Parsed::Complete(15, None));
        let local = v2::Builder::new(v2::Version::Two | v2::Command::Local, 0)
            .build()
            .unwrap();
        assert_eq!(parse(&local), Parsed::Complete(16, None));
    }

    #[test]
    fn malformed_headers_are_rejected_not_waited_for() {
        for bad in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
            b"PROXY TCP4 1.2.3.999 5.6.7.8 1 2\r\n",
            b"PROXY TCP9 1.2.3.4 5.6.7.8 1 2\r\n",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
        ] {
            assert!(
                matches!(parse(bad), Parsed::Malformed(_)),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        // No line end within v1's 107 bytes.
        let long = format!("PROXY TCP4 {}", "1".repeat(120));
        assert!(matches!(parse(long.as_bytes()), Parsed::Malformed(_)));
    }

    /// Random and mutated input never panics, and any header it accepts lies within it.
    #[test]
    fn parser_survives_random_and_mutated_input() {
        let mut rng = StdRng::seed_from_u64(7);
        let seeds = [
            encode(HeaderVersion::V1, e0().source, e0().destination),
            encode(HeaderVersion::V2, e0().source, e0().destination),
            encode(
                HeaderVersion::V2,
                "[::1]:1".parse().unwrap(),
                "[::1]:2".parse().unwrap(),
            ),
        ];
        for i in 0..200_000 {
            let mut input = if i % 4 == 0 {
                let len = rng.random_range(0..64);
                (0..len).map(|_| rng.random()).collect()
            } else {
                seeds[i % seeds.len()].clone()
            };
            for _ in 0..rng.random_range(0..4) {
                if input.is_empty() {
                    break;
                }
                let at = rng.random_range(0..input.len());
                match rng.random_range(0..3) {
                    0 => input[at] = rng.random(),
                    1 => input.truncate(at),
                    _ => input.insert(at, rng.random()),
                }
            }
            check_invariants(&input);
        }
    }

    /// Inputs the fuzzer (or a bug report) found, kept in fuzz/regressions/proxy_header.
    #[test]
    fn fuzz_regressions_stay_fixed() {
        let dir = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../fuzz/regressions/proxy_header"
        );
        let mut replayed = 0;
        for entry in std::fs::read_dir(dir).expect("regressions directory") {
            check_invariants(&std::fs::read(entry.unwrap().path()).unwrap());
            replayed += 1;
        }
        assert!(replayed > 0);
    }

    #[tokio::test]
    async fn a_client_that_closes_inside_its_header_is_done_at_once() {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (mut accepted, _) = listener.accept().await.unwrap();
        client.write_all(b"PROXY TCP4 192.0.2.1").await.unwrap();
        client.shutdown().await.unwrap();
        // Before, the FIN kept the socket readable and the peek loop spun until the
        // handshake timeout; now the FIN decides.
        let read = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            read_header(&mut accepted),
        );
        assert!(matches!(read.await, Ok(Err(HeaderError::Closed))));
    }
}
