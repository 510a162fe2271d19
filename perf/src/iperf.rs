//! iperf3: bulk throughput. We run its client in a pod and read its JSON report.

use serde::Deserialize;

/// What one iperf3 run reports.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct IperfResult {
    /// Receiver-side throughput, bits per second.
    pub bits_per_second: f64,
    /// Bytes the receiver got.
    pub bytes: f64,
}

#[derive(Deserialize)]
struct Report {
    end: Option<End>,
    error: Option<String>,
}

#[derive(Deserialize)]
struct End {
    sum_received: Option<Sum>,
}

#[derive(Deserialize)]
struct Sum {
    bits_per_second: f64,
    bytes: f64,
}

/// Parses `iperf3 -J` output.
pub fn parse(json: &str) -> Result<IperfResult, String> {
    let report: Report =
        serde_json::from_str(json).map_err(|e| format!("unreadable iperf3 JSON: {e}"))?;
    if let Some(error) = report.error {
        return Err(format!("iperf3: {error}"));
    }
    let sum = report
        .end
        .and_then(|end| end.sum_received)
        .ok_or("iperf3 JSON has no receiver summary (end.sum_received)")?;
    Ok(IperfResult {
        bits_per_second: sum.bits_per_second,
        bytes: sum.bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_receiver_sum() {
        let json = r#"{"start":{},"intervals":[],"end":{"sum_sent":{"bits_per_second":9.9e9,"bytes":1},
            "sum_received":{"bits_per_second":9.5e9,"bytes":2375000000}}}"#;
        let result = parse(json).unwrap();
        assert_eq!(result.bits_per_second, 9.5e9);
        assert_eq!(result.bytes, 2.375e9);
    }

    #[test]
    fn reports_iperf_errors() {
        let json = r#"{"start":{},"intervals":[],"end":{},"error":"unable to connect to server"}"#;
        assert_eq!(
            parse(json).unwrap_err(),
            "iperf3: unable to connect to server"
        );
        assert!(parse("not json").unwrap_err().contains("unreadable"));
    }
}
