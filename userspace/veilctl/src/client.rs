//! Talking to the agent's admin API.

use std::{net::SocketAddr, time::Duration};

use veil_api::{AgentStatus, FLOWS_PATH, FlowRecord, MTLS_MODE_PATH, ModeReport, STATUS_PATH};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot reach the agent at {address}: {reason}\n\
         Is veil-agent running on this node? In a test bed, run veilctl inside the \
         node's network namespace; elsewhere, point --admin at the agent."
    )]
    Unreachable { address: SocketAddr, reason: String },
    #[error("the agent at {address} answered with an error: {reason}")]
    Agent { address: SocketAddr, reason: String },
}

pub struct AdminClient {
    address: SocketAddr,
    agent: ureq::Agent,
}

impl AdminClient {
    pub fn new(address: SocketAddr) -> Self {
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(5)))
            .http_status_as_error(false)
            .build()
            .into();
        Self { address, agent }
    }

    pub fn status(&self) -> Result<AgentStatus, ClientError> {
        self.get_json(
            self.agent
                .get(format!("http://{}{}", self.address, STATUS_PATH)),
        )
    }

    /// The node's recent meshed connections, oldest first.
    pub fn flows(&self) -> Result<Vec<FlowRecord>, ClientError> {
        self.get_json(
            self.agent
                .get(format!("http://{}{}", self.address, FLOWS_PATH)),
        )
    }

    /// The effective mTLS mode of `pod` (name or address), of `port` if given.
    pub fn mtls_mode(&self, pod: &str, port: Option<u16>) -> Result<ModeReport, ClientError> {
        let mut request = self
            .agent
            .get(format!("http://{}{}", self.address, MTLS_MODE_PATH))
            .query("pod", pod);
        if let Some(port) = port {
            request = request.query("port", port.to_string());
        }
        self.get_json(request)
    }

    fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        request: ureq::RequestBuilder<ureq::typestate::WithoutBody>,
    ) -> Result<T, ClientError> {
        let mut response = request.call().map_err(|error| ClientError::Unreachable {
            address: self.address,
            reason: error.to_string(),
        })?;
        if !response.status().is_success() {
            let body = response.body_mut().read_to_string().unwrap_or_default();
            return Err(ClientError::Agent {
                address: self.address,
                reason: format!("{}: {}", response.status(), body.trim()),
            });
        }
        response
            .body_mut()
            .read_json()
            .map_err(|error| ClientError::Agent {
                address: self.address,
                reason: format!("unreadable answer: {error}"),
            })
    }
}
