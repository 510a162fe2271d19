//! The test cluster's PKI: one CA, the API server's serving certificate, an
//! admin client certificate (group `system:masters`) and the service-account
//! signing key, all ECDSA P-256 and written as PEM files.

use std::{fs, path::Path};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};

use crate::{KubeBedError, Result};

/// The admin user the returned clients authenticate as.
pub const ADMIN_USER: &str = "veil-test-admin";

/// Paths of the PEM files [`write_pki`] creates.
#[derive(Debug, Clone)]
pub struct Pki {
    pub ca_cert: std::path::PathBuf,
    pub serving_cert: std::path::PathBuf,
    pub serving_key: std::path::PathBuf,
    pub admin_cert: std::path::PathBuf,
    pub admin_key: std::path::PathBuf,
    /// Signs ServiceAccount tokens (private, PKCS#8).
    pub service_account_key: std::path::PathBuf,
    /// Verifies them (the public half, SPKI).
    pub service_account_public_key: std::path::PathBuf,
}

/// Generates every key and certificate into `dir` (keys mode 0600).
pub fn write_pki(dir: &Path) -> Result<Pki> {
    let pki = Pki {
        ca_cert: dir.join("ca.pem"),
        serving_cert: dir.join("apiserver.pem"),
        serving_key: dir.join("apiserver-key.pem"),
        admin_cert: dir.join("admin.pem"),
        admin_key: dir.join("admin-key.pem"),
        service_account_key: dir.join("service-account-key.pem"),
        service_account_public_key: dir.join("service-account.pem"),
    };

    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.distinguished_name = name("veil-kubebed CA", None);
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;
    write(&pki.ca_cert, &ca.pem(), false)?;

    let mut serving = CertificateParams::new(vec![
        "localhost".to_owned(),
        "kubernetes".to_owned(),
        "kubernetes.default".to_owned(),
        "kubernetes.default.svc".to_owned(),
    ])?;
    serving.subject_alt_names.extend([
        SanType::IpAddress([127, 0, 0, 1].into()),
        // The first address of the service range: the `kubernetes` Service.
        SanType::IpAddress([10, 96, 0, 1].into()),
    ]);
    serving.distinguished_name = name("kube-apiserver", None);
    serving.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    serving.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let serving_key = KeyPair::generate()?;
    write(
        &pki.serving_cert,
        &serving.signed_by(&serving_key, &ca)?.pem(),
        false,
    )?;
    write(&pki.serving_key, &serving_key.serialize_pem(), true)?;

    let mut admin = CertificateParams::new(Vec::<String>::new())?;
    admin.distinguished_name = name(ADMIN_USER, Some("system:masters"));
    admin.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    admin.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let admin_key = KeyPair::generate()?;
    write(
        &pki.admin_cert,
        &admin.signed_by(&admin_key, &ca)?.pem(),
        false,
    )?;
    write(&pki.admin_key, &admin_key.serialize_pem(), true)?;

    let service_account_key = KeyPair::generate()?;
    write(
        &pki.service_account_key,
        &service_account_key.serialize_pem(),
        true,
    )?;
    write(
        &pki.service_account_public_key,
        &service_account_key.public_key_pem(),
        false,
    )?;
    Ok(pki)
}

/// CN (the Kubernetes user name) and O (its group).
fn name(common_name: &str, organization: Option<&str>) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, common_name);
    if let Some(organization) = organization {
        name.push(DnType::OrganizationName, organization);
    }
    name
}

fn write(path: &Path, pem: &str, private: bool) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| KubeBedError::Io {
        what: format!("cannot write {}", path.display()),
        source,
    };
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    if private {
        options.mode(0o600);
    }
    let mut file = options.open(path).map_err(io)?;
    std::io::Write::write_all(&mut file, pem.as_bytes()).map_err(io)
}
