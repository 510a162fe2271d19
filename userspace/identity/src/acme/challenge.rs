//! Proving control of the names to the ACME CA.
//!
//! HTTP-01: [`Http01Responder`] serves `/.well-known/acme-challenge/<token>`
//! on the port the CA probes (80 in production) with the key authorizations
//! of the challenges in flight, and nothing else. DNS-01: a [`Dns01Hook`]
//! publishes and removes the `_acme-challenge` TXT record (for names the CA
//! cannot reach over HTTP, and wildcards); [`CommandDns01Hook`] runs a
//! command written for your DNS provider.

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
};

use axum::{Router, extract::Path as UrlPath, http::StatusCode, routing::get};

use super::AcmeError;

/// Publishes and removes DNS-01 TXT records.
pub trait Dns01Hook: Send + Sync {
    fn present(&self, record: &str, value: &str) -> Result<(), String>;
    fn cleanup(&self, record: &str) -> Result<(), String>;
}

/// A DNS-01 hook that runs `<program> present <record> <value>` and `<program> cleanup <record>`.
#[derive(Debug, Clone)]
pub struct CommandDns01Hook {
    pub program: PathBuf,
}

impl Dns01Hook for CommandDns01Hook {
    fn present(&self, record: &str, value: &str) -> Result<(), String> {
        run_hook(&self.program, &["present", record, value])
    }

    fn cleanup(&self, record: &str) -> Result<(), String> {
        run_hook(&self.program, &["cleanup", record])
    }
}

fn run_hook(program: &PathBuf, args: &[&str]) -> Result<(), String> {
    let output = std::process::Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", program.display()))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{} {} exited with {}: {}",
            program.display(),
            args.first().unwrap_or(&""),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// Serves `/.well-known/acme-challenge/<token>` with the key authorizations
/// of the challenges in flight.
#[derive(Clone, Default)]
pub struct Http01Responder {
    tokens: Arc<Mutex<HashMap<String, String>>>,
}

impl Http01Responder {
    /// Starts serving on `address`; returns the address actually bound.
    pub async fn serve(&self, address: SocketAddr) -> Result<SocketAddr, AcmeError> {
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .map_err(|source| AcmeError::Http01Bind { address, source })?;
        let bound = listener
            .local_addr()
            .map_err(|source| AcmeError::Http01Bind { address, source })?;
        let tokens = Arc::clone(&self.tokens);
        let app = Router::new().route(
            "/.well-known/acme-challenge/{token}",
            get(move |UrlPath(token): UrlPath<String>| {
                let answer = tokens.lock().ok().and_then(|t| t.get(&token).cloned());
                async move { answer.ok_or(StatusCode::NOT_FOUND) }
            }),
        );
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(bound)
    }

    pub(crate) fn insert(&self, token: &str, key_authorization: &str) {
        if let Ok(mut tokens) = self.tokens.lock() {
            tokens.insert(token.into(), key_authorization.into());
        }
    }

    pub(crate) fn remove(&self, token: &str) {
        if let Ok(mut tokens) = self.tokens.lock() {
            tokens.remove(token);
        }
    }
}

/// How to prove control of the names.
pub enum ChallengeMethod<'a> {
    Http01(&'a Http01Responder),
    Dns01(&'a dyn Dns01Hook),
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;

    /// GET `path` with a bare HTTP/1.1 request, as an ACME CA's validator would.
    fn http_get(address: SocketAddr, path: &str) -> String {
        let mut stream = std::net::TcpStream::connect(address).unwrap();
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        response
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_http01_responder_serves_only_tokens_in_flight() {
        let responder = Http01Responder::default();
        let address = responder
            .serve("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        responder.insert("tok3n", "tok3n.thumbprint");
        let get = |path: &'static str| tokio::task::spawn_blocking(move || http_get(address, path));
        let found = get("/.well-known/acme-challenge/tok3n").await.unwrap();
        assert!(found.starts_with("HTTP/1.1 200"), "{found}");
        assert!(found.ends_with("tok3n.thumbprint"), "{found}");
        let unknown = get("/.well-known/acme-challenge/other").await.unwrap();
        assert!(unknown.starts_with("HTTP/1.1 404"), "{unknown}");
        responder.remove("tok3n");
        let gone = get("/.well-known/acme-challenge/tok3n").await.unwrap();
        assert!(gone.starts_with("HTTP/1.1 404"), "{gone}");
    }
}
