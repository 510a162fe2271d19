//! Running iproute2's `ip`, for the few changes the agent makes to node
//! networking that have no simpler interface here: the collect_md vxlan
//! device, the mesh's policy routing, and route and neighbour lookups.
//!
//! One runner, so every caller reports a missing binary or a refused change
//! the same way: with the exact command and what `ip` printed.

use std::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum IpError {
    #[error("cannot run `ip {args}` (is iproute2 installed?): {source}")]
    Spawn {
        args: String,
        source: std::io::Error,
    },
    #[error("`ip {args}` failed: {stderr}")]
    Failed { args: String, stderr: String },
}

/// Runs `ip args…`; on success returns what it printed.
pub fn ip(args: &[&str]) -> Result<Vec<u8>, IpError> {
    let output = Command::new("ip")
        .args(args)
        .output()
        .map_err(|source| IpError::Spawn {
            args: args.join(" "),
            source,
        })?;
    if output.status.success() {
        Ok(output.stdout)
    } else {
        Err(IpError::Failed {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_command_names_itself_and_carries_ips_complaint() {
        let error = ip(&["link", "show", "dev", "veil-no-such-device-0"]).unwrap_err();
        let text = error.to_string();
        assert!(
            text.starts_with("`ip link show dev veil-no-such-device-0` failed: "),
            "{text}"
        );
        assert!(text.contains("does not exist"), "{text}");
    }

    #[test]
    fn output_is_returned_on_success() {
        let stdout = ip(&["-j", "link", "show", "dev", "lo"]).unwrap();
        assert!(String::from_utf8_lossy(&stdout).contains("\"ifname\":\"lo\""));
    }
}
