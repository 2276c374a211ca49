//! A self-signed certificate shaped like the ones ordinary servers make.

use rand::Rng;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use super::TlsError;

/// How long the self-signed certificate is valid from its making: Debian's `make-ssl-cert`
/// (the snakeoil certificate of nginx and Apache there) makes ten years.
const SELF_SIGNED_VALIDITY: time::Duration = time::Duration::days(3650);
/// The self-signed key's size: RSA 2048, as `make-ssl-cert` and `openssl req` make.
const SELF_SIGNED_RSA_BITS: usize = 2048;
/// Serial numbers are this many random bytes, as OpenSSL makes them.
const SERIAL_BYTES: usize = 20;

/// A certificate shaped like the one most self-signed web servers show, Debian's
/// snakeoil: RSA 2048 signed with SHA-256, valid ten years from now, the machine's host
/// name as subject and only name, CA:FALSE. A certificate that only this relay would make
/// (rcgen's defaults: a 1975-4096 validity and its own subject) is a fingerprint.
pub(super) fn self_signed()
-> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let generate = |e: &dyn std::fmt::Display| TlsError::Generate(e.to_string());
    let name = host_name().map_err(|e| generate(&e))?;
    let rsa = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, SELF_SIGNED_RSA_BITS)
        .map_err(|e| generate(&e))?;
    let pkcs8 = rsa::pkcs8::EncodePrivateKey::to_pkcs8_der(&rsa).map_err(|e| generate(&e))?;
    let key = PrivatePkcs8KeyDer::from(pkcs8.as_bytes().to_vec());
    let signing_key = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&key, &rcgen::PKCS_RSA_SHA256)
        .map_err(|e| generate(&e))?;
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name.clone());
    // The extensions as `make-ssl-cert` writes them, in its order and criticality (rcgen
    // would write them in another, with CA:FALSE critical).
    params.is_ca = rcgen::IsCa::NoCa;
    let key_id = params.key_identifier(&signing_key);
    params.custom_extensions = vec![
        rcgen::CustomExtension::from_oid_content(&BASIC_CONSTRAINTS, der(0x30, &[])),
        rcgen::CustomExtension::from_oid_content(
            &SUBJECT_ALT_NAME,
            der(0x30, &der(DNS_NAME, name.as_bytes())),
        ),
        rcgen::CustomExtension::from_oid_content(&SUBJECT_KEY_ID, der(0x04, &key_id)),
    ];
    let now = time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .map_err(|e| generate(&e))?;
    params.not_before = now;
    params.not_after = now + SELF_SIGNED_VALIDITY;
    let mut serial = [0u8; SERIAL_BYTES];
    rand::rng().fill(&mut serial);
    // Positive, and as long as OpenSSL's.
    serial[0] = serial[0] & 0x7f | 0x01;
    params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
    let cert = params.self_signed(&signing_key).map_err(|e| generate(&e))?;
    Ok((vec![cert.der().clone()], key.into()))
}

const BASIC_CONSTRAINTS: [u64; 4] = [2, 5, 29, 19];
const SUBJECT_ALT_NAME: [u64; 4] = [2, 5, 29, 17];
const SUBJECT_KEY_ID: [u64; 4] = [2, 5, 29, 14];
/// A GeneralName's dNSName: context tag 2, primitive.
const DNS_NAME: u8 = 0x82;

/// One DER element: `tag`, its length, `content`.
fn der(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    match content.len() {
        len @ 0..0x80 => out.push(len as u8),
        len @ 0x80..0x100 => out.extend([0x81, len as u8]),
        len => out.extend([0x82, (len >> 8) as u8, len as u8]),
    }
    out.extend_from_slice(content);
    out
}

/// The machine's host name, which its other services' self-signed certificates carry too.
fn host_name() -> std::io::Result<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")?;
    let name = name.trim();
    // Only what a DNS name may hold goes into the certificate.
    if name.is_empty()
        || name.len() > 253
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
    {
        return Ok("localhost".to_owned());
    }
    Ok(name.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether `der` holds `bytes` somewhere.
    fn holds(der: &[u8], bytes: &[u8]) -> bool {
        der.windows(bytes.len()).any(|w| w == bytes)
    }

    /// A date as DER's UTCTime writes it, up to the day.
    fn utc_day(at: time::OffsetDateTime) -> String {
        format!(
            "{:02}{:02}{:02}",
            at.year() % 100,
            u8::from(at.month()),
            at.day()
        )
    }

    #[test]
    fn the_self_signed_certificate_looks_like_a_debian_snakeoil() {
        let now = time::OffsetDateTime::now_utc();
        let (chain, key) = self_signed().unwrap();
        let der = chain[0].as_ref();
        // sha256WithRSAEncryption signs it; the key is RSA (rsaEncryption) of 2048 bits.
        assert!(holds(
            der,
            &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0b]
        ));
        assert!(holds(
            der,
            &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01]
        ));
        assert!(
            holds(der, &[0x02, 0x82, 0x01, 0x01, 0x00]),
            "a 2048-bit modulus"
        );
        assert!(matches!(key, PrivateKeyDer::Pkcs8(_)));
        // The host name (subject and name), valid from today for ten years.
        assert!(holds(der, host_name().unwrap().as_bytes()));
        assert!(holds(der, utc_day(now).as_bytes()));
        assert!(holds(der, utc_day(now + SELF_SIGNED_VALIDITY).as_bytes()));
        // Nothing of rcgen's defaults: its subject, or its 1975 start.
        assert!(!holds(der, b"rcgen"));
        assert!(!holds(der, b"750101"));
    }
}
