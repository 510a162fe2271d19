//! What a certificate chain says that renewal needs.
//!
//! The renewer decides from the leaf alone: its DNS names (does it still
//! cover what is configured?), its validity (is it usable, when is 2/3 of
//! its lifetime?), its public key (does the stored key belong to it?) and its
//! ARI certificate identifier (RFC 9773 §4.1: the Authority Key Identifier
//! and the serial, base64url), which names it in renewal-information
//! queries and in the `replaces` field of the order that renews it.

use std::time::{Duration, SystemTime};

use instant_acme::CertificateIdentifier;
use rustls_pki_types::Der;
use x509_parser::{
    extensions::{GeneralName, ParsedExtension},
    pem::Pem,
};

/// The facts about a chain's leaf.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateInfo {
    /// The leaf's DNS subject alternative names.
    pub dns_names: Vec<String>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// The serial, lowercase hex.
    pub serial: String,
    /// The leaf's SubjectPublicKeyInfo (DER).
    pub public_key_der: Vec<u8>,
    /// The RFC 9773 identifier; `None` when the leaf has no Authority Key
    /// Identifier (then the CA cannot be asked about it).
    pub ari_id: Option<CertificateIdentifier<'static>>,
    /// How many certificates the chain holds (leaf first).
    pub chain_length: usize,
}

impl CertificateInfo {
    /// Reads the leaf (the first certificate) of a PEM chain.
    pub fn from_chain_pem(chain_pem: &str) -> Result<Self, String> {
        let pems = Pem::iter_from_buffer(chain_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("not PEM: {e}"))?;
        let first = pems.first().ok_or("no certificate in it")?;
        if first.label != "CERTIFICATE" {
            return Err(format!("the first PEM block is a {}", first.label));
        }
        let leaf = first
            .parse_x509()
            .map_err(|e| format!("the leaf is not an X.509 certificate: {e}"))?;
        let dns_names = leaf
            .subject_alternative_name()
            .map_err(|e| format!("unreadable subject alternative names: {e}"))?
            .map(|san| {
                san.value
                    .general_names
                    .iter()
                    .filter_map(|name| match name {
                        GeneralName::DNSName(name) => Some((*name).to_owned()),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        let time = |seconds: i64| {
            u64::try_from(seconds)
                .map(|s| SystemTime::UNIX_EPOCH + Duration::from_secs(s))
                .map_err(|_| format!("validity before 1970 ({seconds})"))
        };
        let ari_id =
            leaf.iter_extensions()
                .find_map(|extension| match extension.parsed_extension() {
                    ParsedExtension::AuthorityKeyIdentifier(aki) => {
                        aki.key_identifier.as_ref().map(|id| {
                            CertificateIdentifier::new(
                                Der::from_slice(id.0),
                                Der::from_slice(leaf.tbs_certificate.raw_serial()),
                            )
                            .into_owned()
                        })
                    }
                    _ => None,
                });
        Ok(Self {
            dns_names,
            not_before: time(leaf.validity().not_before.timestamp())?,
            not_after: time(leaf.validity().not_after.timestamp())?,
            serial: leaf.tbs_certificate.raw_serial_as_string().replace(':', ""),
            public_key_der: leaf.public_key().raw.to_vec(),
            ari_id,
            chain_length: pems.len(),
        })
    }

    /// Whether the leaf covers exactly `names` (in any order).
    pub fn covers_exactly(&self, names: &[String]) -> bool {
        let mut have: Vec<&str> = self.dns_names.iter().map(String::as_str).collect();
        let mut want: Vec<&str> = names.iter().map(String::as_str).collect();
        have.sort_unstable();
        have.dedup();
        want.sort_unstable();
        want.dedup();
        have == want
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A CA-signed leaf for `names` (rcgen adds the Authority Key Identifier).
    pub(crate) fn signed_chain(names: &[&str]) -> (String, rcgen::KeyPair) {
        let ca_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut ca_params = rcgen::CertificateParams::default();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params.key_identifier_method = rcgen::KeyIdMethod::Sha256;
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&[0x0a, 0xbc]));
        let leaf = params.signed_by(&key, &issuer).unwrap();
        (format!("{}{}", leaf.pem(), ca.pem()), key)
    }

    #[test]
    fn the_leaf_is_read_with_its_ari_identifier() {
        let (chain, key) = signed_chain(&["b.example", "a.example"]);
        let info = CertificateInfo::from_chain_pem(&chain).unwrap();
        assert_eq!(info.dns_names, ["b.example", "a.example"]);
        assert_eq!(info.chain_length, 2);
        assert_eq!(info.serial, "0abc");
        assert_eq!(
            info.public_key_der,
            rcgen::PublicKeyData::subject_public_key_info(&key)
        );
        assert!(info.not_before < info.not_after);
        let id = info.ari_id.clone().unwrap();
        assert_eq!(id.serial, "Crw", "base64url of the DER serial bytes 0a bc");
        assert!(!id.authority_key_identifier.is_empty());
        assert!(info.covers_exactly(&["a.example".into(), "b.example".into()]));
        assert!(!info.covers_exactly(&["a.example".into()]));
    }

    #[test]
    fn garbage_is_refused_with_a_reason() {
        assert!(
            CertificateInfo::from_chain_pem("")
                .unwrap_err()
                .contains("no certificate")
        );
        let key = rcgen::KeyPair::generate().unwrap().serialize_pem();
        assert!(
            CertificateInfo::from_chain_pem(&key)
                .unwrap_err()
                .contains("PRIVATE KEY")
        );
    }
}
