//! On any kernel: enabling kTLS either works or says `Unsupported` (the cue
//! to stay in userspace) — never a confusing error.

use std::{
    net::{TcpListener, TcpStream},
    os::fd::AsFd,
};

use veil_mtls::ktls::{self, KtlsError};

fn kernel_has_tls() -> bool {
    let registered = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_ulp")
        .is_ok_and(|ulps| ulps.split_whitespace().any(|u| u == "tls"));
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    let loadable = std::path::Path::new("/lib/modules")
        .join(release)
        .join("kernel/net/tls")
        .is_dir();
    registered || loadable
}

#[test]
fn the_tls_ulp_is_detected_or_reported_unsupported() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let _server = listener.accept().unwrap();
    // Setting the ULP needs no keys: a zeroed secret is enough to probe it.
    let secrets = rustls::ExtractedSecrets {
        tx: (
            0,
            rustls::ConnectionTrafficSecrets::Aes256Gcm {
                key: [0u8; 32].into(),
                iv: [0u8; 12].into(),
            },
        ),
        rx: (
            0,
            rustls::ConnectionTrafficSecrets::Aes256Gcm {
                key: [0u8; 32].into(),
                iv: [0u8; 12].into(),
            },
        ),
    };
    match ktls::enable(client.as_fd(), secrets) {
        Ok(()) => assert!(kernel_has_tls(), "kTLS worked on a kernel said to lack it"),
        Err(KtlsError::Unsupported) => assert!(
            !kernel_has_tls(),
            "the kernel has TLS but enable said Unsupported"
        ),
        Err(other) => panic!("unexpected error: {other}"),
    }
}
