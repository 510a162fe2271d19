//! ACME end to end against pebble, a real ACME server, started on loopback.
//!
//! Two pebbles: the one `cargo xtask test` builds (v2.10.1, with ACME
//! Renewal Information and its `set-renewal-info` management endpoint;
//! `VEIL_PEBBLE`, else `$VEIL_CACHE_DIR/pebble/bin/pebble`) for everything,
//! and Debian's 2.4.0 (no ARI) for the fallback to 2/3 of the lifetime. Each
//! test has its own ports, so they run in parallel. The renewer tests let
//! pebble really validate HTTP-01 against our responder (the name is
//! `localhost`, which resolves without DNS); the one-off order test uses
//! names that do not resolve, with PEBBLE_VA_ALWAYS_VALID=1.

use std::{
    io::{Read, Write},
    net::TcpStream,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use veil_identity::{
    acme::{
        self, AcmeRenewer, AcmeSettings, AriBounds, CertificateInfo, CertificateSpec,
        CertificateStatus, Challenge, ChallengeMethod, DecisionSource, Dns01Hook, Http01Responder,
        RenewerSettings, RenewerState,
    },
    renewal::RenewalPolicy,
};
use veil_testbed::process::ChildGuard;

/// Pebble's listening ports; each test has its own set.
#[derive(Clone, Copy)]
struct Ports {
    acme: u16,
    management: u16,
    /// Where pebble's validator fetches HTTP-01 tokens (our responder).
    http: u16,
    tls: u16,
}

const ORDERS: Ports = Ports {
    acme: 14000,
    management: 15000,
    http: 5002,
    tls: 5001,
};
const RENEWAL: Ports = Ports {
    acme: 14010,
    management: 15010,
    http: 5012,
    tls: 5011,
};
const FALLBACK: Ports = Ports {
    acme: 14020,
    management: 15020,
    http: 5022,
    tls: 5021,
};

/// How long an order or a renewal may take.
const BOUND: Duration = Duration::from_secs(30);

/// The pebble with ARI: `VEIL_PEBBLE`, else where `cargo xtask test` builds
/// it. Missing: panics (failing the test), saying how to get it.
fn pebble_with_ari(what: &str) -> PathBuf {
    let path = std::env::var_os("VEIL_PEBBLE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::var_os("VEIL_CACHE_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("/var/cache/veil"))
                .join("pebble/bin/pebble")
        });
    assert!(
        path.is_file(),
        "{what} needs pebble with ARI at {} (set VEIL_PEBBLE, or run `cargo xtask test`, which \
         builds it)",
        path.display()
    );
    path
}

/// Debian's pebble 2.4.0, which has no ARI; panics when it is not on PATH.
fn pebble_without_ari(what: &str) -> PathBuf {
    veil_testbed::require_program("pebble", what);
    PathBuf::from("pebble")
}

/// Pebble with a TLS certificate made for this run; stopped on drop.
struct Pebble {
    _process: ChildGuard,
    ports: Ports,
    ca_path: PathBuf,
    log_path: PathBuf,
    dir: tempfile::TempDir,
}

impl Pebble {
    fn start(binary: &Path, ports: Ports, always_valid: bool) -> Self {
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
                r#"{{"pebble": {{"listenAddress": "127.0.0.1:{}", "managementListenAddress": "127.0.0.1:{}",
                "certificate": "{}", "privateKey": "{}", "httpPort": {}, "tlsPort": {},
                "ocspResponderURL": "", "externalAccountBindingRequired": false}}}}"#,
                ports.acme,
                ports.management,
                cert_path.display(),
                key_path.display(),
                ports.http,
                ports.tls,
            ),
        );
        let log_path = dir.path().join("pebble.log");
        let log = std::fs::File::create(&log_path).unwrap();
        let mut command = std::process::Command::new(binary);
        command
            .arg("-config")
            .arg(&config)
            .env(
                "PEBBLE_VA_ALWAYS_VALID",
                if always_valid { "1" } else { "0" },
            )
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let process = ChildGuard::spawn("pebble", command).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", ports.acme)).is_err() {
            assert!(
                Instant::now() < deadline,
                "pebble did not listen within 10 s: {}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Self {
            _process: process,
            ports,
            ca_path,
            log_path,
            dir,
        }
    }

    fn settings(&self) -> AcmeSettings {
        AcmeSettings {
            directory_url: format!("https://127.0.0.1:{}/dir", self.ports.acme),
            server_root: Some(self.ca_path.clone()),
            contact: vec!["mailto:ops@veil.test".into()],
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// One HTTP/1.0 request to the management interface (HTTPS, served
    /// with the certificate made above): the status and the body.
    fn management(&self, method: &str, path: &str, body: &str) -> (u16, String) {
        let pem = std::fs::read(&self.ca_path).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        for cert in x509_parser::pem::Pem::iter_from_buffer(&pem) {
            roots
                .add(rustls::pki_types::CertificateDer::from(
                    cert.unwrap().contents,
                ))
                .unwrap();
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let connection = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
        let socket = TcpStream::connect(("127.0.0.1", self.ports.management)).unwrap();
        let mut stream = rustls::StreamOwned::new(connection, socket);
        write!(
            stream,
            "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nUser-Agent: veil-test\r\n\
             Content-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut response = Vec::new();
        // Go may close without close_notify: what arrived is the answer.
        let _ = stream.read_to_end(&mut response);
        let response = String::from_utf8(response).unwrap();
        let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("not an HTTP response: {response:?}"));
        (status, body.to_owned())
    }

    /// Pebble's current root (it makes a new one at every start).
    fn root_pem(&self) -> String {
        let (status, body) = self.management("GET", "/roots/0", "");
        assert_eq!(status, 200, "{body}");
        body
    }

    /// Makes pebble answer ARI queries for `leaf_pem` with this window.
    fn set_renewal_window(&self, leaf_pem: &str, start: SystemTime, end: SystemTime) {
        let window = serde_json::json!({"suggestedWindow": {
            "start": humantime::format_rfc3339_seconds(start).to_string(),
            "end": humantime::format_rfc3339_seconds(end).to_string(),
        }});
        let body = serde_json::json!({
            "Certificate": leaf_pem,
            "ARIResponse": window.to_string(),
        });
        let (status, answer) = self.management("POST", "/set-renewal-info/", &body.to_string());
        assert_eq!(status, 200, "{answer}");
    }
}

/// The PEM blocks of a chain, DER.
fn chain_ders(chain_pem: &str) -> Vec<Vec<u8>> {
    x509_parser::pem::Pem::iter_from_buffer(chain_pem.as_bytes())
        .map(|pem| pem.unwrap().contents)
        .collect()
}

/// The leaf of a chain, PEM.
fn leaf_pem(chain_pem: &str) -> String {
    let end = "-----END CERTIFICATE-----";
    let at = chain_pem.find(end).unwrap() + end.len();
    format!("{}\n", &chain_pem[..at])
}

/// Path validation as a TLS client would do it: leaf → the chain's
/// intermediates → `root_pem`, for `server_name`, now.
fn verify_chain(chain_pem: &str, root_pem: &str, server_name: &str) {
    use rustls::{
        client::danger::ServerCertVerifier,
        pki_types::{CertificateDer, ServerName, UnixTime},
    };
    let mut roots = rustls::RootCertStore::empty();
    for der in chain_ders(root_pem) {
        roots.add(CertificateDer::from(der)).unwrap();
    }
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .unwrap();
    let ders = chain_ders(chain_pem);
    let leaf = CertificateDer::from(ders[0].clone());
    let intermediates: Vec<_> = ders[1..]
        .iter()
        .map(|d| CertificateDer::from(d.clone()))
        .collect();
    verifier
        .verify_server_cert(
            &leaf,
            &intermediates,
            &ServerName::try_from(server_name.to_owned()).unwrap(),
            &[],
            UnixTime::now(),
        )
        .unwrap();
}

/// Polls the renewer's state until `done` holds for `name`, or panics after
/// `within` with the last state seen.
async fn wait_for_status(
    state: &RenewerState,
    name: &str,
    within: Duration,
    done: impl Fn(&CertificateStatus) -> bool,
) -> CertificateStatus {
    let deadline = Instant::now() + within;
    loop {
        let status = state.get(name).unwrap();
        if done(&status) {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "not done within {within:?}: {status:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Aborts the renewer task when the test ends, also on panic.
struct Running(tokio::task::JoinHandle<()>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// An HTTP-01 responder on the port pebble's validator probes for
/// `localhost` (both loopbacks: Go may try ::1 first).
async fn responder_for(ports: Ports) -> Http01Responder {
    let responder = Http01Responder::default();
    responder
        .serve(([127, 0, 0, 1], ports.http).into())
        .await
        .unwrap();
    let _ = responder
        .serve((std::net::Ipv6Addr::LOCALHOST, ports.http).into())
        .await;
    responder
}

fn renewer_settings(pebble: &Pebble, store: &Path) -> RenewerSettings {
    RenewerSettings {
        // Pebble says Retry-After: 6 h; ask every half second instead.
        ari_bounds: AriBounds {
            min: Duration::from_millis(100),
            max: Duration::from_millis(500),
        },
        policy: RenewalPolicy {
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(2),
            ..RenewalPolicy::default()
        },
        ..RenewerSettings::new(pebble.settings(), store)
    }
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs pebble with ARI: cargo xtask test runs it"]
async fn the_renewer_obtains_stores_and_renews_early_when_ari_says_so() {
    let binary = pebble_with_ari("ACME renewal test");
    let pebble = Pebble::start(&binary, RENEWAL, false);
    let responder = responder_for(RENEWAL).await;
    let store = pebble.dir.path().join("store");
    let spec = CertificateSpec {
        name: "web".into(),
        dns_names: vec!["localhost".into()],
    };
    let renewer = AcmeRenewer::new(
        renewer_settings(&pebble, &store),
        Challenge::Http01(responder.clone()),
        vec![spec.clone()],
    )
    .unwrap();
    let state = renewer.state();
    let started = Instant::now();
    let running = Running(tokio::spawn(renewer.run()));

    // Obtained, with real HTTP-01 validation, and scheduled from ARI.
    let first = wait_for_status(&state, "web", BOUND, |s| s.source.is_some()).await;
    let obtained_in = started.elapsed();
    eprintln!("obtained and scheduled in {obtained_in:.2?}");
    assert_eq!(first.source, Some(DecisionSource::Ari), "{first:#?}");
    assert_eq!((first.issued, first.replaced.as_ref()), (1, None));
    assert!(first.next_ari_check.is_some());
    assert!(
        pebble.log().contains("Attempting to validate w/ HTTP"),
        "pebble validated HTTP-01 itself: {}",
        pebble.log()
    );

    // Stored: key 0600, chain 0644, the key is the leaf's, the chain verifies.
    let (key_path, chain_path) = (store.join("web/tls.key"), store.join("web/tls.crt"));
    assert_eq!(mode(&key_path), 0o600);
    assert_eq!(mode(&chain_path), 0o644);
    assert_eq!(mode(&store.join("account.json")), 0o600);
    let chain = std::fs::read_to_string(&chain_path).unwrap();
    let info = CertificateInfo::from_chain_pem(&chain).unwrap();
    assert_eq!(Some(&info.serial), first.serial.as_ref());
    assert_eq!(info.dns_names, ["localhost"]);
    assert!(info.chain_length >= 2, "leaf and intermediate");
    let key = rcgen::KeyPair::from_pem(&std::fs::read_to_string(&key_path).unwrap()).unwrap();
    assert_eq!(
        rcgen::PublicKeyData::subject_public_key_info(&key),
        info.public_key_der
    );
    verify_chain(&chain, &pebble.root_pem(), "localhost");

    // Pebble's own window: 2/3 through the validity, ±24 h, within it.
    let validity = info
        .not_after
        .duration_since(info.not_before)
        .unwrap()
        .as_secs_f64();
    let day = Duration::from_secs(24 * 3600);
    let ideal = info.not_after - Duration::from_secs_f64((validity + 1.0) / 3.0);
    let renew_at = first.next_renewal.unwrap();
    assert!(
        renew_at >= (ideal - day - Duration::from_secs(2)).max(info.not_before)
            && renew_at <= ideal + day + Duration::from_secs(2),
        "{renew_at:?} is not in pebble's window around {ideal:?}"
    );

    // The CA moves the window into the past: renewal at the next ARI check.
    let now = SystemTime::now();
    let hour = Duration::from_secs(3600);
    pebble.set_renewal_window(&leaf_pem(&chain), now - 2 * hour, now - hour);
    let moved = Instant::now();
    let renewed = wait_for_status(&state, "web", BOUND, |s| s.issued == 2).await;
    let renewed_in = moved.elapsed();
    eprintln!("renewed {renewed_in:.2?} after the ARI window moved into the past");
    assert_ne!(renewed.serial, first.serial, "a new certificate");
    assert_eq!(
        renewed.replaced.as_deref(),
        Some(info.ari_id.as_ref().unwrap().to_string().as_str()),
        "the order named the old certificate in `replaces`"
    );
    assert_eq!(renewed.last_error, None);
    let new_chain = std::fs::read_to_string(&chain_path).unwrap();
    let new_info = CertificateInfo::from_chain_pem(&new_chain).unwrap();
    assert_eq!(Some(&new_info.serial), renewed.serial.as_ref(), "on disk");
    assert_ne!(new_info.public_key_der, info.public_key_der, "a new key");
    assert_eq!(mode(&key_path), 0o600);
    verify_chain(&new_chain, &pebble.root_pem(), "localhost");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !pebble.log().contains("has been marked as replaced") {
        assert!(
            Instant::now() < deadline,
            "pebble did not mark the old certificate replaced: {}",
            pebble.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The new certificate has pebble's ordinary window: no renewal storm.
    let settled = wait_for_status(&state, "web", BOUND, |s| {
        s.next_renewal.is_some_and(|t| t > SystemTime::now() + day)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let later = state.get("web").unwrap();
    assert_eq!(later.issued, 2, "{later:#?}");
    assert_eq!(later.source, Some(DecisionSource::Ari));
    assert_eq!(later.next_renewal, settled.next_renewal, "the draw is kept");
    drop(running);

    // A restarted renewer serves the stored certificate and orders nothing.
    let renewer = AcmeRenewer::new(
        renewer_settings(&pebble, &store),
        Challenge::Http01(responder),
        vec![spec],
    )
    .unwrap();
    let state = renewer.state();
    let _running = Running(tokio::spawn(renewer.run()));
    let restarted = wait_for_status(&state, "web", BOUND, |s| s.source.is_some()).await;
    assert_eq!(restarted.issued, 0, "{restarted:#?}");
    assert_eq!(restarted.serial, renewed.serial);
    assert_eq!(restarted.source, Some(DecisionSource::Ari));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Debian's pebble (no ARI): cargo xtask test runs it"]
async fn without_ari_the_renewer_falls_back_to_two_thirds_of_the_lifetime() {
    let binary = pebble_without_ari("ACME renewal fallback test (Debian's pebble, no ARI)");
    let pebble = Pebble::start(&binary, FALLBACK, false);
    let responder = responder_for(FALLBACK).await;
    let store = pebble.dir.path().join("store");
    let renewer = AcmeRenewer::new(
        renewer_settings(&pebble, &store),
        Challenge::Http01(responder),
        vec![CertificateSpec {
            name: "api".into(),
            dns_names: vec!["localhost".into()],
        }],
    )
    .unwrap();
    let state = renewer.state();
    let _running = Running(tokio::spawn(renewer.run()));
    let status = wait_for_status(&state, "api", BOUND, |s| s.source.is_some()).await;
    assert_eq!(status.source, Some(DecisionSource::Lifetime), "{status:#?}");
    assert_eq!(status.next_ari_check, None, "no ARI to ask");
    let info = CertificateInfo::from_chain_pem(
        &std::fs::read_to_string(store.join("api/tls.crt")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        status.next_renewal,
        Some(RenewalPolicy::default().renew_at(info.not_before, info.not_after))
    );
    assert_eq!(status.issued, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs pebble with ARI: cargo xtask test runs it"]
async fn http01_and_dns01_orders_are_issued_by_a_real_acme_server() {
    let binary = pebble_with_ari("ACME test against pebble");
    let pebble = Pebble::start(&binary, ORDERS, true);
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
    assert_eq!(issued.info.dns_names, names);
    assert!(issued.info.chain_length >= 2, "leaf and intermediate");
    assert_eq!(
        issued.info.public_key_der,
        issued.key.public_key_der().unwrap(),
        "our key, made here"
    );
    verify_chain(&issued.chain_pem, &pebble.root_pem(), "ingress.veil.test");

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
    assert_eq!(issued.info.dns_names, names);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_ca_leaves_the_error_in_the_state_and_is_retried() {
    let store = tempfile::tempdir().unwrap();
    let settings = RenewerSettings {
        policy: RenewalPolicy {
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(50),
            ..RenewalPolicy::default()
        },
        ..RenewerSettings::new(
            AcmeSettings {
                directory_url: "https://127.0.0.1:9/dir".into(),
                server_root: None,
                contact: Vec::new(),
            },
            store.path(),
        )
    };
    let renewer = AcmeRenewer::new(
        settings,
        Challenge::Http01(Http01Responder::default()),
        vec![CertificateSpec {
            name: "web".into(),
            dns_names: vec!["web.veil.test".into()],
        }],
    )
    .unwrap();
    let state = renewer.state();
    let _running = Running(tokio::spawn(renewer.run()));
    let status = wait_for_status(&state, "web", BOUND, |s| s.failures >= 3).await;
    assert!(
        status
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("127.0.0.1:9")),
        "{status:#?}"
    );
    assert_eq!((status.serial, status.issued), (None, 0));
    assert!(
        std::fs::read_dir(store.path()).unwrap().next().is_none(),
        "nothing stored"
    );
}
