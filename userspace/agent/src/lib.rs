//! Veil's node agent.
//!
//! One agent runs on each node. It loads the eBPF datapath embedded in its
//! binary, attaches XDP to the node's underlay interface and TC to each pod's
//! host-side veth, and serves a localhost admin API that `veilctl` reads.
//! Later slices add the overlay maps, the mTLS proxy and the control plane;
//! each lives in its own module here.

pub mod admin;
pub mod config;
pub mod datapath;
pub mod logging;

use std::sync::Arc;

use tracing::info;

use crate::{admin::AdminState, config::AgentConfig, datapath::Datapath};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Datapath(#[from] datapath::DatapathError),
    #[error(transparent)]
    Admin(#[from] admin::AdminError),
}

/// Runs the agent until `shutdown` completes, then detaches everything.
pub async fn run(
    config: AgentConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), AgentError> {
    let datapath = Datapath::start(&config.datapath)?;
    let listener = admin::bind(config.admin_listen).await?;
    info!(
        node = %config.node_name,
        admin = %config.admin_listen,
        programs = datapath.programs().len(),
        "agent ready"
    );
    let state = Arc::new(AdminState {
        node_name: config.node_name,
        datapath,
    });
    admin::serve(listener, Arc::clone(&state), shutdown).await?;
    info!("agent stopping: detaching programs");
    Ok(())
}
