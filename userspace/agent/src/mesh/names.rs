//! How the client agent names the destination workload in SNI.
//!
//! The server agent serves many workloads on one port and must present the
//! destination's certificate before the preface arrives, so the client puts
//! the destination pod's address in the TLS server name:
//! `198-19-2-1.pod.veil.internal` (`.internal` is reserved for private use).

use std::net::Ipv4Addr;

const SUFFIX: &str = ".pod.veil.internal";

/// The SNI for a connection to the pod at `ip`.
pub fn sni_for(ip: Ipv4Addr) -> String {
    let [a, b, c, d] = ip.octets();
    format!("{a}-{b}-{c}-{d}{SUFFIX}")
}

/// The pod address an SNI names, if it is one of ours.
pub fn pod_ip_from_sni(name: &str) -> Option<Ipv4Addr> {
    name.strip_suffix(SUFFIX)?.replace('-', ".").parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_foreign_names() {
        let ip = Ipv4Addr::new(198, 19, 2, 1);
        assert_eq!(sni_for(ip), "198-19-2-1.pod.veil.internal");
        assert_eq!(pod_ip_from_sni(&sni_for(ip)), Some(ip));
        assert_eq!(pod_ip_from_sni("example.com"), None);
        assert_eq!(pod_ip_from_sni("1-2-3.pod.veil.internal"), None);
    }
}
