//! TLS records other than application data on a kernel TLS socket: the
//! close_notify that ends a direction, and what the peer sends besides data.
//!
//! A TCP FIN is not authenticated: anyone on the path can forge one. TLS
//! marks the real end of a direction with a close_notify alert inside the
//! encrypted stream (RFC 8446 §6.1), and Veil's relays hold to it on both
//! paths: a side whose pod ended its stream sends close_notify, then the FIN;
//! a side that reads a FIN without one resets its pod, so a cut stream never
//! passes for a finished one.
//!
//! On a kTLS socket plain `write`/`splice` only make data records, and
//! `splice` refuses to read anything else (EINVAL, the record stays queued).
//! [`send_close_notify`] sends the alert with `sendmsg` and the
//! `TLS_SET_RECORD_TYPE` control message; [`read_record`] takes the next
//! record with `recvmsg` and `TLS_GET_RECORD_TYPE` and says what it was.
//!
//! `unsafe`: one `sendmsg(2)` and one `recvmsg(2)` with a control message,
//! which std and nix do not offer for `SOL_TLS`.
#![allow(unsafe_code)]

use std::os::fd::{AsRawFd, BorrowedFd};

/// `SOL_TLS` from linux/socket.h, and its control messages (linux/tls.h).
const SOL_TLS: libc::c_int = 282;
const TLS_SET_RECORD_TYPE: libc::c_int = 1;
const TLS_GET_RECORD_TYPE: libc::c_int = 2;

/// TLS record content types (RFC 8446 §5.1).
pub const CONTENT_ALERT: u8 = 21;
pub const CONTENT_HANDSHAKE: u8 = 22;
pub const CONTENT_APPLICATION_DATA: u8 = 23;

/// Alert descriptions (RFC 8446 §6).
const ALERT_CLOSE_NOTIFY: u8 = 0;
const ALERT_USER_CANCELED: u8 = 90;
const ALERT_LEVEL_WARNING: u8 = 1;

/// Handshake message types that may follow the handshake (RFC 8446 §4.6).
const HANDSHAKE_NEW_SESSION_TICKET: u8 = 4;
const HANDSHAKE_KEY_UPDATE: u8 = 24;

/// Largest TLS 1.3 record plaintext (2^14) plus its content type: a buffer
/// this long holds any one record [`read_record`] can return.
pub const RECORD_BUFFER: usize = 16 * 1024 + 1;

/// What the next record(s) on a kTLS socket were.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Record {
    /// Application data: this many bytes are at the start of the buffer.
    Data(usize),
    /// The peer's close_notify: its direction of the stream ended here.
    CloseNotify,
    /// A post-handshake message the kernel path does without (a session
    /// ticket, or a `user_canceled` warning before its close_notify).
    Skipped,
    /// The TCP stream ended (a FIN) with no close_notify before it.
    EndOfStream,
}

#[derive(Debug, thiserror::Error)]
pub enum ControlRecordError {
    #[error(
        "the peer agent sent a TLS alert (level {level}, description {description}): the session is over"
    )]
    Alert { level: u8, description: u8 },
    #[error(
        "the peer agent sent a TLS KeyUpdate, which a kernel TLS session cannot take \
         (Veil's agents never send one; see veil_mtls::limits)"
    )]
    KeyUpdate,
    #[error("the peer agent sent handshake message type {0} after the handshake")]
    UnexpectedHandshake(u8),
    #[error("the peer agent sent a malformed {what} record ({len} bytes)")]
    Malformed { what: &'static str, len: usize },
    #[error(
        "the peer agent sent a TLS record of content type {0}, which TLS 1.3 does not allow here"
    )]
    UnexpectedContentType(u8),
    #[error("{what} on the kernel TLS socket failed: {source}")]
    Os {
        what: &'static str,
        source: std::io::Error,
    },
}

impl From<ControlRecordError> for std::io::Error {
    fn from(error: ControlRecordError) -> Self {
        match error {
            ControlRecordError::Os { source, .. } => source,
            other => std::io::Error::new(std::io::ErrorKind::InvalidData, other),
        }
    }
}

/// Room for one control message carrying a one-byte record type (the
/// `u64`s keep it aligned for `cmsghdr`).
type ControlBuffer = [u64; 4];

/// Sends a close_notify alert on a kTLS socket: this side's direction of the
/// stream ends here. Follow it with `shutdown(SHUT_WR)`.
pub fn send_close_notify(socket: BorrowedFd<'_>) -> Result<(), ControlRecordError> {
    send_record(
        socket,
        CONTENT_ALERT,
        &[ALERT_LEVEL_WARNING, ALERT_CLOSE_NOTIFY],
    )
}

/// Sends `payload` as one record of `content_type` on a kTLS socket (the
/// relay sends only close_notify; tests also send what a peer might).
pub fn send_record(
    socket: BorrowedFd<'_>,
    content_type: u8,
    payload: &[u8],
) -> Result<(), ControlRecordError> {
    let mut iov = libc::iovec {
        iov_base: payload.as_ptr() as *mut libc::c_void,
        iov_len: payload.len(),
    };
    let mut control: ControlBuffer = [0; 4];
    // SAFETY: a zeroed msghdr is valid (no iovecs, no control data); the
    // pointers set below point at locals that outlive the sendmsg call, with
    // the lengths given (the kernel only reads the iovec's bytes), and
    // CMSG_FIRSTHDR/CMSG_DATA stay inside `control`, which is larger than
    // CMSG_SPACE(1).
    let sent = unsafe {
        let mut message: libc::msghdr = std::mem::zeroed();
        message.msg_iov = &mut iov;
        message.msg_iovlen = 1;
        message.msg_control = control.as_mut_ptr().cast();
        message.msg_controllen = libc::CMSG_SPACE(1) as _;
        let header = libc::CMSG_FIRSTHDR(&message);
        (*header).cmsg_level = SOL_TLS;
        (*header).cmsg_type = TLS_SET_RECORD_TYPE;
        (*header).cmsg_len = libc::CMSG_LEN(1) as _;
        *libc::CMSG_DATA(header) = content_type;
        libc::sendmsg(socket.as_raw_fd(), &message, libc::MSG_NOSIGNAL)
    };
    let what = "sending a TLS record";
    match usize::try_from(sent) {
        Ok(n) if n == payload.len() => Ok(()),
        Ok(_) => Err(ControlRecordError::Os {
            what,
            source: std::io::Error::other("the kernel took part of the record"),
        }),
        Err(_) => Err(ControlRecordError::Os {
            what,
            source: std::io::Error::last_os_error(),
        }),
    }
}

/// Reads the next record from a kTLS socket — what `splice` refused — into
/// `buffer` (at least [`RECORD_BUFFER`] long) and says what it was. Blocks
/// until a record or the end of the stream arrives.
pub fn read_record(
    socket: BorrowedFd<'_>,
    buffer: &mut [u8],
) -> Result<Record, ControlRecordError> {
    assert!(
        buffer.len() >= RECORD_BUFFER,
        "read_record needs a whole record's room"
    );
    let mut iov = libc::iovec {
        iov_base: buffer.as_mut_ptr().cast(),
        iov_len: buffer.len(),
    };
    let mut control: ControlBuffer = [0; 4];
    let mut content_type = CONTENT_APPLICATION_DATA;
    // SAFETY: as in `send_close_notify`; recvmsg writes at most `iov_len`
    // bytes into `buffer` and `msg_controllen` into `control`, and the
    // CMSG_* walk reads only headers the kernel wrote within that length.
    let received = unsafe {
        let mut message: libc::msghdr = std::mem::zeroed();
        message.msg_iov = &mut iov;
        message.msg_iovlen = 1;
        message.msg_control = control.as_mut_ptr().cast();
        message.msg_controllen = std::mem::size_of::<ControlBuffer>() as _;
        let received = libc::recvmsg(socket.as_raw_fd(), &mut message, 0);
        if received >= 0 {
            let mut header = libc::CMSG_FIRSTHDR(&message);
            while !header.is_null() {
                if (*header).cmsg_level == SOL_TLS && (*header).cmsg_type == TLS_GET_RECORD_TYPE {
                    content_type = *libc::CMSG_DATA(header);
                }
                header = libc::CMSG_NXTHDR(&message, header);
            }
        }
        received
    };
    let len = usize::try_from(received).map_err(|_| ControlRecordError::Os {
        what: "reading a TLS record",
        source: std::io::Error::last_os_error(),
    })?;
    classify(content_type, &buffer[..len])
}

/// What a record of `content_type` with `payload` means for a relay.
fn classify(content_type: u8, payload: &[u8]) -> Result<Record, ControlRecordError> {
    match content_type {
        CONTENT_APPLICATION_DATA if payload.is_empty() => Ok(Record::EndOfStream),
        CONTENT_APPLICATION_DATA => Ok(Record::Data(payload.len())),
        CONTENT_ALERT => match *payload {
            [_, ALERT_CLOSE_NOTIFY] => Ok(Record::CloseNotify),
            [ALERT_LEVEL_WARNING, ALERT_USER_CANCELED] => Ok(Record::Skipped),
            [level, description] => Err(ControlRecordError::Alert { level, description }),
            _ => Err(ControlRecordError::Malformed {
                what: "alert",
                len: payload.len(),
            }),
        },
        CONTENT_HANDSHAKE => post_handshake(payload),
        other => Err(ControlRecordError::UnexpectedContentType(other)),
    }
}

/// Handshake messages after the handshake: session tickets are skipped (the
/// kernel path resumes with the ticket read before it took over), anything
/// else ends the session.
fn post_handshake(mut payload: &[u8]) -> Result<Record, ControlRecordError> {
    let malformed = |payload: &[u8]| ControlRecordError::Malformed {
        what: "handshake",
        len: payload.len(),
    };
    if payload.is_empty() {
        return Err(malformed(payload));
    }
    while let [kind, l0, l1, l2, rest @ ..] = payload {
        let len = usize::from(*l0) << 16 | usize::from(*l1) << 8 | usize::from(*l2);
        if rest.len() < len {
            return Err(malformed(payload));
        }
        match *kind {
            HANDSHAKE_NEW_SESSION_TICKET => {}
            HANDSHAKE_KEY_UPDATE => return Err(ControlRecordError::KeyUpdate),
            other => return Err(ControlRecordError::UnexpectedHandshake(other)),
        }
        payload = &rest[len..];
    }
    if payload.is_empty() {
        Ok(Record::Skipped)
    } else {
        Err(malformed(payload))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alerts_are_told_apart() {
        assert_eq!(
            classify(CONTENT_ALERT, &[1, 0]).unwrap(),
            Record::CloseNotify
        );
        // A fatal-level close_notify still only closes.
        assert_eq!(
            classify(CONTENT_ALERT, &[2, 0]).unwrap(),
            Record::CloseNotify
        );
        assert_eq!(classify(CONTENT_ALERT, &[1, 90]).unwrap(), Record::Skipped);
        assert!(matches!(
            classify(CONTENT_ALERT, &[2, 40]),
            Err(ControlRecordError::Alert {
                level: 2,
                description: 40
            })
        ));
        assert!(matches!(
            classify(CONTENT_ALERT, &[1]),
            Err(ControlRecordError::Malformed { what: "alert", .. })
        ));
    }

    #[test]
    fn tickets_are_skipped_and_a_key_update_ends_the_session() {
        let ticket = [4, 0, 0, 3, 9, 9, 9];
        assert_eq!(
            classify(CONTENT_HANDSHAKE, &ticket).unwrap(),
            Record::Skipped
        );
        let two_tickets = [ticket, ticket].concat();
        assert_eq!(
            classify(CONTENT_HANDSHAKE, &two_tickets).unwrap(),
            Record::Skipped
        );
        let key_update = [24, 0, 0, 1, 0];
        assert!(matches!(
            classify(CONTENT_HANDSHAKE, &[&ticket[..], &key_update].concat()),
            Err(ControlRecordError::KeyUpdate)
        ));
        assert!(matches!(
            classify(CONTENT_HANDSHAKE, &[1, 0, 0, 0]),
            Err(ControlRecordError::UnexpectedHandshake(1))
        ));
        // Cut short, or trailing bytes too few for a header.
        for bad in [&[4, 0, 0, 9, 1][..], &[4, 0, 0, 0, 4][..], &[][..]] {
            assert!(
                matches!(
                    classify(CONTENT_HANDSHAKE, bad),
                    Err(ControlRecordError::Malformed { .. })
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn data_and_the_end_of_stream_are_told_apart() {
        assert_eq!(
            classify(CONTENT_APPLICATION_DATA, b"abc").unwrap(),
            Record::Data(3)
        );
        assert_eq!(
            classify(CONTENT_APPLICATION_DATA, b"").unwrap(),
            Record::EndOfStream
        );
        assert!(matches!(
            classify(20, &[1]),
            Err(ControlRecordError::UnexpectedContentType(20))
        ));
    }
}
