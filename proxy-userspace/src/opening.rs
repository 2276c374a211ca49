//! What a client's first bytes say it is. A listener with a fallback relays a client to its
//! pool only when its stream opens as the listener expects (WhatsApp's chat prologue, or a
//! TLS ClientHello where the client's own TLS passes through); anything else, such as a
//! censor's probe, goes to the fallback. Pure functions over the bytes seen so far.

use serde::Deserialize;

/// How a listener's clients open their stream.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Expect {
    /// WhatsApp's chat prologue: "WA" and two version bytes, possibly after an edge-routing
    /// prefix ("ED", two version bytes, a 3-byte length and that many bytes).
    #[default]
    Whatsapp,
    /// A TLS handshake record carrying a ClientHello: media, whose TLS passes through.
    Tls,
    /// Anything: the listener never falls back.
    Any,
}

/// What the bytes seen so far say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Opening {
    /// The stream opens as expected: relay it to the listener's pool.
    Expected,
    /// It cannot open as expected, whatever follows: relay it to the fallback.
    Other,
    /// Not decided until this many bytes are in.
    NeedMore(usize),
}

/// The longest edge-routing data accepted before the prologue. WhatsApp's is tens of bytes;
/// a longer one is not a client of ours, and waiting for it would let a probe hold a
/// buffer.
pub const MAX_ROUTING_INFO: usize = 4096;

/// The most bytes [`classify`] ever needs to decide.
pub const MAX_OPENING: usize = EDGE_HEADER + MAX_ROUTING_INFO + PROLOGUE;

/// "WA" and two version bytes.
const PROLOGUE: usize = 4;
/// "ED", two version bytes and a 3-byte big-endian length.
const EDGE_HEADER: usize = 7;
/// A TLS record header (type, version, length) and the handshake message type.
const TLS_HELLO: usize = 6;
const TLS_HANDSHAKE_RECORD: u8 = 0x16;
const TLS_CLIENT_HELLO: u8 = 0x01;

/// Decides from the first bytes of a stream whether it opens as `expect` says.
pub fn classify(expect: Expect, bytes: &[u8]) -> Opening {
    match expect {
        Expect::Any => Opening::Expected,
        Expect::Whatsapp => whatsapp(bytes),
        Expect::Tls => tls_client_hello(bytes),
    }
}

fn whatsapp(bytes: &[u8]) -> Opening {
    if bytes.first() == Some(&b'E') {
        if !matches_so_far(bytes, b"ED") {
            return Opening::Other;
        }
        let Some(length) = bytes.get(4..EDGE_HEADER) else {
            return Opening::NeedMore(EDGE_HEADER);
        };
        let routing =
            usize::from(length[0]) << 16 | usize::from(length[1]) << 8 | usize::from(length[2]);
        if routing > MAX_ROUTING_INFO {
            return Opening::Other;
        }
        return prologue(bytes, EDGE_HEADER + routing);
    }
    prologue(bytes, 0)
}

/// "WA" and two version bytes (not pinned: they change with client versions) at `at`.
fn prologue(bytes: &[u8], at: usize) -> Opening {
    let seen = bytes.get(at..).unwrap_or_default();
    if !matches_so_far(seen, b"WA") {
        return Opening::Other;
    }
    if seen.len() < PROLOGUE {
        return Opening::NeedMore(at + PROLOGUE);
    }
    Opening::Expected
}

fn tls_client_hello(bytes: &[u8]) -> Opening {
    // Record type, then major version 3 (SSL 3.0 to TLS 1.3 records all say 3).
    if !matches_so_far(bytes, &[TLS_HANDSHAKE_RECORD, 0x03]) {
        return Opening::Other;
    }
    match bytes.get(TLS_HELLO - 1) {
        None => Opening::NeedMore(TLS_HELLO),
        Some(&TLS_CLIENT_HELLO) => Opening::Expected,
        Some(_) => Opening::Other,
    }
}

/// The fuzz target's check (fuzz/fuzz_targets/opening.rs): for any bytes and any
/// expectation, a decision never changes as more bytes come, and a request for more asks
/// for more than is there and never beyond [`MAX_OPENING`].
pub fn check_invariants(data: &[u8]) {
    for expect in [Expect::Whatsapp, Expect::Tls, Expect::Any] {
        let mut previous = None;
        for end in 0..=data.len() {
            let opening = classify(expect, &data[..end]);
            if let Opening::NeedMore(wanted) = opening {
                assert!(
                    end < wanted && wanted <= MAX_OPENING,
                    "{expect:?} {end} {wanted}"
                );
            }
            if let Some(decided @ (Opening::Expected | Opening::Other)) = previous {
                assert_eq!(opening, decided, "{expect:?} changed its mind at {end}");
            }
            previous = Some(opening);
        }
    }
}

/// Whether `bytes` agrees with `expected` as far as both go.
fn matches_so_far(bytes: &[u8], expected: &[u8]) -> bool {
    bytes.iter().zip(expected).all(|(a, b)| a == b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(bytes: &[u8]) -> Opening {
        classify(Expect::Whatsapp, bytes)
    }

    #[test]
    fn the_chat_prologue_is_expected_whatever_its_version() {
        assert_eq!(chat(b"WA\x06\x05"), Opening::Expected);
        assert_eq!(
            chat(b"WA\x06\x03rest of the noise hello"),
            Opening::Expected
        );
        assert_eq!(chat(b"WA\x07\x00"), Opening::Expected);
        assert_eq!(chat(b""), Opening::NeedMore(PROLOGUE));
        assert_eq!(chat(b"W"), Opening::NeedMore(PROLOGUE));
        assert_eq!(chat(b"WA\x06"), Opening::NeedMore(PROLOGUE));
    }

    #[test]
    fn an_edge_routing_prefix_is_skipped_to_the_prologue() {
        let mut opening = b"ED\x00\x01\x00\x00\x05".to_vec();
        opening.extend_from_slice(b"route");
        assert_eq!(
            chat(&opening),
            Opening::NeedMore(EDGE_HEADER + 5 + PROLOGUE)
        );
        opening.extend_from_slice(b"WA\x06\x05");
        assert_eq!(chat(&opening), Opening::Expected);
        assert_eq!(chat(b"ED\x00\x01"), Opening::NeedMore(EDGE_HEADER));
        assert_eq!(chat(b"ED\x00\x01\x00\x00\x00WA\x06\x05"), Opening::Expected);
        assert_eq!(chat(b"ED\x00\x01\x00\x00\x00GET "), Opening::Other);
    }

    #[test]
    fn probes_are_other_from_their_first_differing_byte() {
        assert_eq!(chat(b"GET / HTTP/1.1\r\n"), Opening::Other);
        assert_eq!(chat(b"G"), Opening::Other);
        assert_eq!(chat(b"WB"), Opening::Other);
        assert_eq!(chat(b"EX"), Opening::Other);
        assert_eq!(chat(b"\x16\x03\x01\x02\x00\x01"), Opening::Other);
        assert_eq!(chat(b"SSH-2.0-OpenSSH_9.2\r\n"), Opening::Other);
        // A routing length no client sends: decided at once, no buffer held for it.
        assert_eq!(chat(b"ED\x00\x01\xff\xff\xff"), Opening::Other);
    }

    #[test]
    fn tls_listeners_expect_a_client_hello() {
        let tls = |bytes: &[u8]| classify(Expect::Tls, bytes);
        assert_eq!(tls(b"\x16\x03\x01\x02\x00\x01\x00"), Opening::Expected);
        assert_eq!(tls(b"\x16\x03\x01"), Opening::NeedMore(TLS_HELLO));
        assert_eq!(tls(b"\x16\x03\x01\x02\x00\x02"), Opening::Other);
        assert_eq!(tls(b"WA\x06\x05"), Opening::Other);
        assert_eq!(tls(b"GET / HTTP/1.1\r\n"), Opening::Other);
    }

    #[test]
    fn any_opening_is_expected_where_nothing_is_expected() {
        assert_eq!(classify(Expect::Any, b""), Opening::Expected);
        assert_eq!(classify(Expect::Any, b"GET /"), Opening::Expected);
    }

    #[test]
    fn the_fuzz_seeds_keep_the_invariants() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../fuzz/corpus/opening");
        for entry in std::fs::read_dir(dir).expect("regressions directory") {
            check_invariants(&std::fs::read(entry.unwrap().path()).unwrap());
        }
    }

    #[test]
    fn no_opening_needs_more_than_max_opening() {
        let mut longest = b"ED\x00\x01".to_vec();
        longest.extend_from_slice(&[0x00, 0x10, 0x00]);
        longest.resize(EDGE_HEADER + MAX_ROUTING_INFO, b'r');
        assert_eq!(chat(&longest), Opening::NeedMore(MAX_OPENING));
    }
}
