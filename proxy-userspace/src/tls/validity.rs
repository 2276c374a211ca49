//! When a certificate is valid, read from its DER: the one field renewal needs, without a
//! full X.509 parser.

use time::{Date, Month, OffsetDateTime, PrimitiveDateTime, Time};

/// A certificate's notBefore and notAfter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Validity {
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl Validity {
    /// Reads `Certificate.tbsCertificate.validity` (RFC 5280 4.1).
    pub fn of(certificate: &[u8]) -> Option<Self> {
        let (_, certificate, _) = element(certificate)?;
        let (_, mut tbs, _) = element(certificate)?;
        // version [0], if present; serialNumber; signature; issuer; then validity.
        let (tag, _, rest) = element(tbs)?;
        if tag == EXPLICIT_VERSION {
            tbs = rest;
        }
        for _ in 0..3 {
            tbs = element(tbs)?.2;
        }
        let (_, validity, _) = element(tbs)?;
        let (tag, not_before, rest) = element(validity)?;
        let not_before = time_value(tag, not_before)?;
        let (tag, not_after, _) = element(rest)?;
        let not_after = time_value(tag, not_after)?;
        Some(Self {
            not_before,
            not_after,
        })
    }
}

/// A moment as RFC 3339 in UTC, to the second.
pub fn date(at: OffsetDateTime) -> String {
    let at = at.replace_nanosecond(0).unwrap_or(at);
    at.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| at.to_string())
}

const EXPLICIT_VERSION: u8 = 0xa0;
const UTC_TIME: u8 = 0x17;
const GENERALIZED_TIME: u8 = 0x18;

/// One DER element of `input`: its tag, its content, and what follows it.
fn element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = match first {
        0..=0x7f => (usize::from(first), rest),
        0x81..=0x84 => {
            let bytes = usize::from(first & 0x7f);
            let (len, rest) = rest.split_at_checked(bytes)?;
            (len.iter().fold(0, |n, &b| n << 8 | usize::from(b)), rest)
        }
        _ => return None,
    };
    let (content, rest) = rest.split_at_checked(len)?;
    Some((tag, content, rest))
}

/// UTCTime (YYMMDDHHMMSSZ, years 1950-2049) or GeneralizedTime (YYYYMMDDHHMMSSZ).
fn time_value(tag: u8, text: &[u8]) -> Option<OffsetDateTime> {
    let text = std::str::from_utf8(text).ok()?.strip_suffix('Z')?;
    let number = |range: std::ops::Range<usize>| text.get(range)?.parse::<u16>().ok();
    let (year, rest) = match (tag, text.len()) {
        (UTC_TIME, 12) => {
            let yy = number(0..2)?;
            (if yy < 50 { 2000 + yy } else { 1900 + yy }, 2)
        }
        (GENERALIZED_TIME, 14) => (number(0..4)?, 4),
        _ => return None,
    };
    let field =
        |n: usize| number(rest + 2 * n..rest + 2 * n + 2).and_then(|v| u8::try_from(v).ok());
    let date =
        Date::from_calendar_date(i32::from(year), Month::try_from(field(0)?).ok()?, field(1)?)
            .ok()?;
    let time = Time::from_hms(field(2)?, field(3)?, field(4)?).ok()?;
    Some(PrimitiveDateTime::new(date, time).assume_utc())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn certificate(not_before: OffsetDateTime, not_after: OffsetDateTime) -> Vec<u8> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["relay.example.org".into()]).unwrap();
        params.not_before = not_before;
        params.not_after = not_after;
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn reads_utc_and_generalized_times() {
        let at = |unix| OffsetDateTime::from_unix_timestamp(unix).unwrap();
        // 2026-12-03 10:00:07 to 2027-03-03 10:00:07, and to 2051-01-31 23:59:59: rcgen
        // writes UTCTime up to 2049 and GeneralizedTime from 2050 on, as RFC 5280 says.
        let start = at(1_796_292_007);
        for end in [at(1_804_068_007), at(2_558_822_399)] {
            assert_eq!(
                Validity::of(&certificate(start, end)),
                Some(Validity {
                    not_before: start,
                    not_after: end
                })
            );
        }
        let good = certificate(start, start + time::Duration::days(90));
        for len in [0, 1, 10, good.len() / 2] {
            assert_eq!(Validity::of(&good[..len]), None);
        }
    }
}
