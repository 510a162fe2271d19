//! On any kernel: enabling kTLS either works or says `Unsupported` (the cue
//! to stay in userspace) — never a confusing error.

use std::{
    net::{TcpListener, TcpStream},
    os::fd::AsFd,
};

use veil_mtls::ktls::{self, KtlsError};

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
        Ok(()) => assert!(
            veil_mtls::ktls::kernel_supports_tls(),
            "kTLS worked on a kernel said to lack it"
        ),
        Err(KtlsError::Unsupported) => assert!(
            !veil_mtls::ktls::kernel_supports_tls(),
            "the kernel has TLS but enable said Unsupported"
        ),
        Err(other) => panic!("unexpected error: {other}"),
    }
}
