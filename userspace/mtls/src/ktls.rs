//! Handing a finished TLS 1.3 session to the kernel (kTLS).
//!
//! After the rustls handshake the traffic secrets are extracted and installed
//! with `setsockopt(TCP_ULP, "tls")` and `SOL_TLS`/`TLS_TX`+`TLS_RX`; from then
//! on the kernel encrypts and decrypts records and plain `read`/`write`/`splice`
//! on the socket carry application bytes; other records (close_notify,
//! session tickets) are [`crate::control_records`]. `unsafe` here: two
//! `setsockopt` calls with kernel-defined structures.
#![allow(unsafe_code)]
//!
//! Rules learnt the hard way (see ARCHITECTURE.md): the client reads its
//! session ticket before the keys move (a ticket on the RX path makes splice
//! fail until [`crate::control_records::read_record`] takes it), rustls must
//! not have read past the handshake, and no KeyUpdate may ever be sent
//! (kernels before 6.13 cannot rekey RX).

use std::os::fd::{AsRawFd, BorrowedFd};

use rustls::{ConnectionTrafficSecrets, ExtractedSecrets};

/// `SOL_TLS` from linux/socket.h.
const SOL_TLS: libc::c_int = 282;
const TLS_TX: libc::c_int = 1;
const TLS_RX: libc::c_int = 2;
const TCP_ULP: libc::c_int = 31;
const TLS_1_3_VERSION: u16 = 0x0304;
const TLS_CIPHER_AES_GCM_128: u16 = 51;
const TLS_CIPHER_AES_GCM_256: u16 = 52;
const TLS_CIPHER_CHACHA20_POLY1305: u16 = 54;

#[derive(Debug, thiserror::Error)]
pub enum KtlsError {
    #[error(
        "the kernel has no TLS ULP (CONFIG_TLS off or tls.ko not loadable): falling back to userspace TLS"
    )]
    Unsupported,
    #[error("setsockopt({what}) failed: {source}")]
    Os {
        what: &'static str,
        source: std::io::Error,
    },
}

/// Kernel crypto info for AES-GCM (`tls12_crypto_info_aes_gcm_{128,256}`):
/// header, 8-byte explicit IV, key, 4-byte salt, 8-byte record sequence.
#[repr(C)]
struct AesGcmInfo<const KEY: usize> {
    version: u16,
    cipher_type: u16,
    iv: [u8; 8],
    key: [u8; KEY],
    salt: [u8; 4],
    rec_seq: [u8; 8],
}

/// `tls12_crypto_info_chacha20_poly1305`: header, 12-byte IV, key, no salt, sequence.
#[repr(C)]
struct ChachaInfo {
    version: u16,
    cipher_type: u16,
    iv: [u8; 12],
    key: [u8; 32],
    rec_seq: [u8; 8],
}

/// Whether this kernel can do TLS, learnt by asking it rather than from its
/// version or files: on an unconnected TCP socket `setsockopt(TCP_ULP,
/// "tls")` makes the kernel find the ULP (loading tls.ko if it may), and
/// only then refuse, because the socket is not connected. `ENOENT` means
/// there is no TLS ULP to find.
pub fn kernel_supports_tls() -> bool {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socket};
    use std::os::fd::AsFd;
    let Ok(socket) = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    ) else {
        return false;
    };
    match set_ulp(socket.as_fd()) {
        Ok(()) => true,
        Err(KtlsError::Unsupported) => false,
        // ENOTCONN since 5.x; older kernels said ENOTSUPP (524).
        Err(KtlsError::Os { source, .. }) => {
            matches!(source.raw_os_error(), Some(libc::ENOTCONN) | Some(524))
        }
    }
}

/// Installs `secrets` on `socket` for both directions.
///
/// `Unsupported` means the kernel has no TLS: the caller keeps the session in
/// userspace. The socket must not have been used for anything since the
/// handshake.
pub fn enable(socket: BorrowedFd<'_>, secrets: ExtractedSecrets) -> Result<(), KtlsError> {
    attach_ulp(socket)?;
    install_keys(socket, secrets)
}

/// First half of [`enable`]: turns `socket` into a kernel TLS socket, or says
/// `Unsupported` — before the rustls session is consumed, so the caller can
/// still keep it in userspace.
pub fn attach_ulp(socket: BorrowedFd<'_>) -> Result<(), KtlsError> {
    set_ulp(socket)
}

/// Second half of [`enable`]: installs the session keys on a socket that
/// [`attach_ulp`] accepted.
pub fn install_keys(socket: BorrowedFd<'_>, secrets: ExtractedSecrets) -> Result<(), KtlsError> {
    let (tx_seq, tx) = secrets.tx;
    let (rx_seq, rx) = secrets.rx;
    set_crypto(socket, TLS_TX, tx_seq, &tx)?;
    set_crypto(socket, TLS_RX, rx_seq, &rx)
}

fn set_ulp(socket: BorrowedFd<'_>) -> Result<(), KtlsError> {
    let name = b"tls";
    // SAFETY: the option value is a valid buffer of the given length for the
    // duration of the call; the kernel copies it.
    let ret = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_TCP,
            TCP_ULP,
            name.as_ptr().cast(),
            name.len() as libc::socklen_t,
        )
    };
    if ret == 0 {
        return Ok(());
    }
    let error = std::io::Error::last_os_error();
    if error.raw_os_error() == Some(libc::ENOENT) {
        Err(KtlsError::Unsupported)
    } else {
        Err(KtlsError::Os {
            what: "TCP_ULP tls",
            source: error,
        })
    }
}

fn set_crypto(
    socket: BorrowedFd<'_>,
    direction: libc::c_int,
    sequence: u64,
    secrets: &ConnectionTrafficSecrets,
) -> Result<(), KtlsError> {
    let rec_seq = sequence.to_be_bytes();
    let what = if direction == TLS_TX {
        "TLS_TX"
    } else {
        "TLS_RX"
    };
    match secrets {
        ConnectionTrafficSecrets::Aes128Gcm { key, iv } => {
            let info = aes_gcm::<16>(TLS_CIPHER_AES_GCM_128, key.as_ref(), iv.as_ref(), rec_seq);
            set_option(socket, direction, &info, what)
        }
        ConnectionTrafficSecrets::Aes256Gcm { key, iv } => {
            let info = aes_gcm::<32>(TLS_CIPHER_AES_GCM_256, key.as_ref(), iv.as_ref(), rec_seq);
            set_option(socket, direction, &info, what)
        }
        ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
            let mut info = ChachaInfo {
                version: TLS_1_3_VERSION,
                cipher_type: TLS_CIPHER_CHACHA20_POLY1305,
                iv: [0; 12],
                key: [0; 32],
                rec_seq,
            };
            info.iv.copy_from_slice(&iv.as_ref()[..12]);
            info.key.copy_from_slice(&key.as_ref()[..32]);
            set_option(socket, direction, &info, what)
        }
        _ => Err(KtlsError::Os {
            what,
            source: std::io::Error::other("cipher suite not supported by kTLS"),
        }),
    }
}

fn aes_gcm<const KEY: usize>(
    cipher: u16,
    key: &[u8],
    iv: &[u8],
    rec_seq: [u8; 8],
) -> AesGcmInfo<KEY> {
    let mut info = AesGcmInfo {
        version: TLS_1_3_VERSION,
        cipher_type: cipher,
        iv: [0; 8],
        key: [0; KEY],
        salt: [0; 4],
        rec_seq,
    };
    // rustls's 12-byte IV is the kernel's 4-byte salt then 8-byte IV.
    info.salt.copy_from_slice(&iv[..4]);
    info.iv.copy_from_slice(&iv[4..12]);
    info.key.copy_from_slice(&key[..KEY]);
    info
}

fn set_option<T>(
    socket: BorrowedFd<'_>,
    direction: libc::c_int,
    info: &T,
    what: &'static str,
) -> Result<(), KtlsError> {
    // SAFETY: `info` is a `#[repr(C)]` value laid out as the kernel's
    // crypto-info structure and outlives the call; the kernel copies it.
    let ret = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            SOL_TLS,
            direction,
            (info as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if ret == 0 {
        Ok(())
    } else {
        Err(KtlsError::Os {
            what,
            source: std::io::Error::last_os_error(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crypto_info_layouts_match_the_kernel() {
        // Sizes of struct tls12_crypto_info_{aes_gcm_128,aes_gcm_256,chacha20_poly1305}.
        assert_eq!(std::mem::size_of::<AesGcmInfo<16>>(), 40);
        assert_eq!(std::mem::size_of::<AesGcmInfo<32>>(), 56);
        assert_eq!(std::mem::size_of::<ChachaInfo>(), 56);
    }

    #[test]
    fn salt_and_iv_are_split_from_the_rustls_iv() {
        let iv: Vec<u8> = (0..12).collect();
        let info = aes_gcm::<16>(TLS_CIPHER_AES_GCM_128, &[7; 16], &iv, 5u64.to_be_bytes());
        assert_eq!(info.salt, [0, 1, 2, 3]);
        assert_eq!(info.iv, [4, 5, 6, 7, 8, 9, 10, 11]);
        assert_eq!(info.rec_seq, [0, 0, 0, 0, 0, 0, 0, 5]);
    }
}
