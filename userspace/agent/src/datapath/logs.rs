//! Forwarding the programs' aya-log records into the agent's own log.

use aya::Ebpf;
use aya_log::EbpfLogger;
use tokio::io::{Interest, unix::AsyncFd};
use tracing::warn;

use super::DatapathError;

/// Spawns a task that drains the programs' log ring buffer whenever it has records.
///
/// Records go through the `log` crate, which the agent's tracing subscriber
/// picks up, so they appear in the agent's log with the program's module as target.
pub fn forward_to_agent_log(ebpf: &mut Ebpf) -> Result<(), DatapathError> {
    let logger = EbpfLogger::init(ebpf)?;
    // SAFETY: the ring buffer's file descriptor is owned by `logger`, which
    // the AsyncFd owns in turn, so the descriptor stays open while registered.
    #[allow(unsafe_code)]
    let registered = unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) };
    let mut readable = registered.map_err(|error| DatapathError::LogWatch(error.into_parts().1))?;
    tokio::spawn(async move {
        loop {
            let mut guard = match readable.readable_mut().await {
                Ok(guard) => guard,
                Err(error) => {
                    warn!(%error, "stopped reading eBPF logs");
                    return;
                }
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
    Ok(())
}
