//! Server-name certificates from an ACME CA, kept renewed (`[acme]`).
//!
//! For ingress and external services; mesh identities never come from ACME
//! (public ACME CAs no longer issue client-auth certificates). The library
//! (`veil_identity::acme`) does the work: account, orders, the store, the
//! ARI or 2/3-of-lifetime schedule. This module turns the config section
//! into an [`AcmeRenewer`] and runs it on its own thread and runtime, like
//! the Kubernetes watchers, so slow CA round trips never sit on the agent's
//! workers. The HTTP-01 responder is bound here, at start: a port already
//! taken stops the agent with that error instead of failing every order.

use std::sync::Arc;

use tracing::info;
use veil_identity::acme::{
    AcmeError, AcmeRenewer, AcmeSettings, CertificateSpec, Challenge, CommandDns01Hook,
    Http01Responder, RenewerSettings, RenewerState,
};

use crate::config::AcmeSection;

#[derive(Debug, thiserror::Error)]
pub enum AcmeSyncError {
    #[error("cannot start the ACME thread: {0}")]
    Thread(std::io::Error),
    #[error("ACME: {0}")]
    Acme(#[from] AcmeError),
    #[error("[acme] names no challenge (http01_listen or dns01_hook)")]
    NoChallenge,
}

/// The running renewer; it stops with the agent process.
pub struct Acme {
    /// Each certificate's serial, expiry, next renewal and its source, last error.
    pub state: Arc<RenewerState>,
}

impl Acme {
    /// Binds the HTTP-01 responder (if configured) and starts the renewer;
    /// returns at once. Call off the async workers (it builds a runtime).
    pub fn start(section: &AcmeSection) -> Result<Self, AcmeSyncError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("acme")
            .enable_all()
            .build()
            .map_err(AcmeSyncError::Thread)?;
        let challenge = match (&section.http01_listen, &section.dns01_hook) {
            (Some(address), _) => {
                let responder = Http01Responder::default();
                let bound = runtime.block_on(responder.serve(*address))?;
                info!(%bound, "serving ACME HTTP-01 challenges");
                Challenge::Http01(responder)
            }
            (None, Some(program)) => Challenge::Dns01(Arc::new(CommandDns01Hook {
                program: program.clone(),
            })),
            (None, None) => return Err(AcmeSyncError::NoChallenge),
        };
        let settings = RenewerSettings::new(
            AcmeSettings {
                directory_url: section.directory_url.get_ref().clone(),
                server_root: section.server_root.clone(),
                contact: section
                    .contact
                    .iter()
                    .map(|c| c.get_ref().clone())
                    .collect(),
            },
            &section.store,
        );
        let certificates = section
            .certificates
            .iter()
            .map(|c| CertificateSpec {
                name: c.name.get_ref().clone(),
                dns_names: c.dns_names.iter().map(|n| n.get_ref().clone()).collect(),
            })
            .collect::<Vec<_>>();
        let count = certificates.len();
        let renewer = AcmeRenewer::new(settings, challenge, certificates)?;
        let state = renewer.state();
        std::thread::Builder::new()
            .name("acme".into())
            .spawn(move || runtime.block_on(renewer.run()))
            .map_err(AcmeSyncError::Thread)?;
        info!(
            directory = %section.directory_url.get_ref(),
            store = %section.store.display(),
            certificates = count,
            "keeping ACME certificates"
        );
        Ok(Self { state })
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::config::AgentConfig;

    fn section(store: &std::path::Path, challenge: &str) -> AcmeSection {
        let text = format!(
            "node_name = \"n1\"\n[datapath]\nunderlay_interface = \"ul0\"\n\
             [acme]\ndirectory_url = \"https://127.0.0.1:9/dir\"\nstore = {:?}\n{challenge}\n\
             [[acme.certificate]]\nname = \"web\"\ndns_names = [\"web.example.com\"]\n",
            store.display()
        );
        AgentConfig::parse(&text, std::path::Path::new("agent.toml"))
            .unwrap()
            .acme
            .unwrap()
    }

    #[test]
    fn the_section_starts_a_renewer_that_reports_its_failures() {
        let store = std::env::temp_dir().join(format!("veil-acme-sync-{}", std::process::id()));
        let acme = Acme::start(&section(&store, "http01_listen = \"127.0.0.1:0\"")).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            let status = acme.state.get("web").unwrap();
            if status.last_error.is_some() {
                break status;
            }
            assert!(Instant::now() < deadline, "no attempt within 10 s");
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(status.dns_names, ["web.example.com"]);
        assert!(
            status
                .last_error
                .is_some_and(|e| e.contains("https://127.0.0.1:9/dir")),
        );
        let _ = std::fs::remove_dir_all(&store);
    }

    #[test]
    fn a_taken_http01_port_stops_the_start() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let listen = format!("http01_listen = \"{}\"", taken.local_addr().unwrap());
        let error = Acme::start(&section(std::path::Path::new("/nonexistent"), &listen))
            .err()
            .unwrap()
            .to_string();
        assert!(error.contains("cannot serve HTTP-01"), "{error}");
    }
}
