//! The connection preface: the first bytes the client agent sends inside TLS.
//!
//! Wire format, version 1 (12 bytes, network byte order):
//!
//! ```text
//!  0       4       5       6               10      12
//!  +-------+-------+-------+---------------+-------+
//!  | "VEIL"|  ver  | flags | dst IPv4      | port  |
//!  +-------+-------+-------+---------------+-------+
//! ```
//!
//! `ver` is 1; `flags` must be 0 (reserved). A server that sees an unknown
//! version refuses the connection rather than guessing, so the format can grow
//! behind a new version number.

use std::net::{Ipv4Addr, SocketAddrV4};

pub const MAGIC: [u8; 4] = *b"VEIL";
pub const VERSION: u8 = 1;
/// Length of a version-1 preface.
pub const LENGTH: usize = 12;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PrefaceError {
    #[error("not a Veil preface (bad magic): the peer is not a Veil agent")]
    BadMagic,
    #[error(
        "preface version {0} is not supported (this agent speaks version {VERSION}): upgrade the older agent"
    )]
    UnsupportedVersion(u8),
    #[error("preface flags {0:#04x} are reserved and must be zero")]
    ReservedFlags(u8),
    #[error("preface truncated: {0} of {LENGTH} bytes")]
    Truncated(usize),
}

/// What the client agent tells the server agent before any application byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Preface {
    /// Where the client pod was connecting to.
    pub original_destination: SocketAddrV4,
}

impl Preface {
    pub fn encode(&self) -> [u8; LENGTH] {
        let mut bytes = [0u8; LENGTH];
        bytes[0..4].copy_from_slice(&MAGIC);
        bytes[4] = VERSION;
        bytes[6..10].copy_from_slice(&self.original_destination.ip().octets());
        bytes[10..12].copy_from_slice(&self.original_destination.port().to_be_bytes());
        bytes
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, PrefaceError> {
        if bytes.len() >= 4 && bytes[0..4] != MAGIC {
            return Err(PrefaceError::BadMagic);
        }
        if bytes.len() >= 5 && bytes[4] != VERSION {
            return Err(PrefaceError::UnsupportedVersion(bytes[4]));
        }
        if bytes.len() < LENGTH {
            return Err(PrefaceError::Truncated(bytes.len()));
        }
        if bytes[5] != 0 {
            return Err(PrefaceError::ReservedFlags(bytes[5]));
        }
        let ip = Ipv4Addr::new(bytes[6], bytes[7], bytes[8], bytes[9]);
        let port = u16::from_be_bytes([bytes[10], bytes[11]]);
        Ok(Self {
            original_destination: SocketAddrV4::new(ip, port),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_with_the_documented_layout() {
        let preface = Preface {
            original_destination: "198.19.2.1:8080".parse().unwrap(),
        };
        let bytes = preface.encode();
        assert_eq!(
            bytes,
            [b'V', b'E', b'I', b'L', 1, 0, 198, 19, 2, 1, 0x1f, 0x90]
        );
        assert_eq!(Preface::decode(&bytes), Ok(preface));
    }

    #[test]
    fn every_defect_has_its_own_error() {
        let good = Preface {
            original_destination: "198.19.2.1:80".parse().unwrap(),
        }
        .encode();
        assert_eq!(
            Preface::decode(b"GET / HTTP/1.1"),
            Err(PrefaceError::BadMagic)
        );
        let mut v2 = good;
        v2[4] = 2;
        assert_eq!(
            Preface::decode(&v2),
            Err(PrefaceError::UnsupportedVersion(2))
        );
        let mut flagged = good;
        flagged[5] = 1;
        assert_eq!(
            Preface::decode(&flagged),
            Err(PrefaceError::ReservedFlags(1))
        );
        assert_eq!(Preface::decode(&good[..7]), Err(PrefaceError::Truncated(7)));
    }
}
