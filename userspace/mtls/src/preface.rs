//! The connection preface: the first bytes the client agent sends inside TLS.
//!
//! Wire format, version 1 (18 bytes, network byte order):
//!
//! ```text
//!  0       4     5       6          10     12         16     18
//!  +-------+-----+-------+----------+------+----------+------+
//!  | "VEIL"| ver | flags | dst IPv4 | port | src IPv4 | port |
//!  +-------+-----+-------+----------+------+----------+------+
//! ```
//!
//! `ver` is 1; `flags` must be 0 (reserved). `dst` is where the client pod
//! was connecting to; `src` is the client pod's own address, which the server
//! agent uses as the source of its connection to the destination pod (so the
//! server app sees its real peer) once it has checked that the address
//! belongs to the identity the client proved. A server that sees an unknown
//! version refuses the connection rather than guessing, so the format can grow
//! behind a new version number.

use std::net::{Ipv4Addr, SocketAddrV4};

pub const MAGIC: [u8; 4] = *b"VEIL";
pub const VERSION: u8 = 1;
/// Length of a version-1 preface.
pub const LENGTH: usize = 18;

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
    /// The client pod's address and port.
    pub source: SocketAddrV4,
}

impl Preface {
    pub fn encode(&self) -> [u8; LENGTH] {
        let mut bytes = [0u8; LENGTH];
        bytes[0..4].copy_from_slice(&MAGIC);
        bytes[4] = VERSION;
        bytes[6..10].copy_from_slice(&self.original_destination.ip().octets());
        bytes[10..12].copy_from_slice(&self.original_destination.port().to_be_bytes());
        bytes[12..16].copy_from_slice(&self.source.ip().octets());
        bytes[16..18].copy_from_slice(&self.source.port().to_be_bytes());
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
        let address = |at: usize| {
            SocketAddrV4::new(
                Ipv4Addr::new(bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]),
                u16::from_be_bytes([bytes[at + 4], bytes[at + 5]]),
            )
        };
        Ok(Self {
            original_destination: address(6),
            source: address(12),
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
            source: "198.19.1.7:40000".parse().unwrap(),
        };
        let bytes = preface.encode();
        assert_eq!(
            bytes,
            [
                b'V', b'E', b'I', b'L', 1, 0, 198, 19, 2, 1, 0x1f, 0x90, 198, 19, 1, 7, 0x9c, 0x40
            ]
        );
        assert_eq!(Preface::decode(&bytes), Ok(preface));
    }

    #[test]
    fn every_defect_has_its_own_error() {
        let good = Preface {
            original_destination: "198.19.2.1:80".parse().unwrap(),
            source: "198.19.1.1:1234".parse().unwrap(),
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
