//! ACME end to end against pebble, a real ACME server, started on loopback.
//!
//! Pebble runs with PEBBLE_VA_ALWAYS_VALID=1 (its validation authority would
//! otherwise need DNS for the test names); our HTTP-01 responder is checked
//! separately, by fetching the token from it as a CA would.

use std::{
    net::TcpStream,
    sync::Mutex,
    time::{Duration, Instant},
};

use veil_identity::acme::{self, AcmeSettings, ChallengeMethod, Dns01Hook, Http01Responder};
use veil_testbed::process::ChildGuard;

const DIRECTORY: &str = "https://127.0.0.1:14000/dir";

/// Pebble with a TLS certificate made for this run; stopped on drop.
struct Pebble {
    _process: ChildGuard,
    ca_path: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Pebble {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ca_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut ca_params = rcgen::CertificateParams::default();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let params =
            rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
        let cert = params.signed_by(&key, &issuer).unwrap();
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        let ca_path = write("ca.pem", &ca_cert.pem());
        let cert_path = write("cert.pem", &cert.pem());
        let key_path = write("key.pem", &key.serialize_pem());
        let config = write(
            "pebble.json",
            &format!(
                r#"{{"pebble": {{"listenAddress": "127.0.0.1:14000", "managementListenAddress": "127.0.0.1:15000",
                "certificate": "{}", "privateKey": "{}", "httpPort": 5002, "tlsPort": 5001,
                "ocspResponderURL": "", "externalAccountBindingRequired": false}}}}"#,
                cert_path.display(),
                key_path.display()
            ),
        );
        let mut command = std::process::Command::new("pebble");
        command
            .arg("-config")
            .arg(&config)
            .env("PEBBLE_VA_ALWAYS_VALID", "1")
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .stdout(std::fs::File::create(dir.path().join("pebble.log")).unwrap())
            .stderr(std::process::Stdio::null());
        let process = ChildGuard::spawn("pebble", command).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect("127.0.0.1:14000").is_err() {
            assert!(
                Instant::now() < deadline,
                "pebble did not listen within 10 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Self {
            _process: process,
            ca_path,
            _dir: dir,
        }
    }

    fn settings(&self) -> AcmeSettings {
        AcmeSettings {
            directory_url: DIRECTORY.into(),
            server_root: Some(self.ca_path.clone()),
            contact: vec!["mailto:ops@veil.test".into()],
        }
    }
}

fn leaf_dns_names_and_key(chain_pem: &str) -> (Vec<String>, Vec<u8>, usize) {
    let pems: Vec<_> = x509_parser::pem::Pem::iter_from_buffer(chain_pem.as_bytes())
        .collect::<Result<_, _>>()
        .unwrap();
    let leaf = pems[0].parse_x509().unwrap();
    let names = leaf
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::DNSName(name) => Some(name.to_string()),
            _ => None,
        })
        .collect();
    (names, leaf.public_key().raw.to_vec(), pems.len())
}

fn pebble_available() -> bool {
    veil_testbed::require_program("pebble", "ACME test against pebble")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http01_and_dns01_orders_are_issued_by_a_real_acme_server() {
    if !pebble_available() {
        return;
    }
    let pebble = Pebble::start();
    let settings = pebble.settings();

    let responder = Http01Responder::default();
    responder
        .serve("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let names = vec!["ingress.veil.test".to_string()];
    let issued = acme::obtain(&settings, &names, ChallengeMethod::Http01(&responder))
        .await
        .unwrap();
    let (dns_names, public_key, chain_length) = leaf_dns_names_and_key(&issued.chain_pem);
    assert_eq!(dns_names, names);
    assert!(chain_length >= 2, "leaf and intermediate");
    assert_eq!(
        public_key,
        issued.key.public_key_der().unwrap(),
        "our key, made here"
    );

    struct RecordingHook(Mutex<Vec<String>>);
    impl Dns01Hook for RecordingHook {
        fn present(&self, record: &str, value: &str) -> Result<(), String> {
            assert_eq!(
                value.len(),
                43,
                "base64url SHA-256 of the key authorization"
            );
            self.0.lock().unwrap().push(format!("present {record}"));
            Ok(())
        }
        fn cleanup(&self, record: &str) -> Result<(), String> {
            self.0.lock().unwrap().push(format!("cleanup {record}"));
            Ok(())
        }
    }
    let hook = RecordingHook(Mutex::new(Vec::new()));
    let names = vec!["api.veil.test".to_string()];
    let issued = acme::obtain(&settings, &names, ChallengeMethod::Dns01(&hook))
        .await
        .unwrap();
    assert_eq!(leaf_dns_names_and_key(&issued.chain_pem).0, names);
    assert_eq!(
        *hook.0.lock().unwrap(),
        [
            "present _acme-challenge.api.veil.test",
            "cleanup _acme-challenge.api.veil.test"
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_acme_server_is_a_clear_error() {
    let settings = AcmeSettings {
        directory_url: "https://127.0.0.1:9/dir".into(),
        server_root: None,
        contact: Vec::new(),
    };
    let responder = Http01Responder::default();
    let error = acme::obtain(
        &settings,
        &["x.veil.test".into()],
        ChallengeMethod::Http01(&responder),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        error.contains("ACME CA at https://127.0.0.1:9/dir"),
        "{error}"
    );
}
