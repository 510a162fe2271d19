//! How many TLS records one session may send before its key is worn out.
//!
//! TLS 1.3 limits how much an AES-GCM key may protect: about 2^24.5 full
//! records (RFC 8446 §5.5). rustls would answer by sending a KeyUpdate, but
//! the kernel cannot take one on its receive side before Linux 6.13 (the
//! connection dies with EBADMSG), and the ktls crate cannot install new keys
//! either. Veil's decision: **never send a KeyUpdate; reset a connection
//! before its sending key reaches the limit**, on both the kernel and the
//! userspace path, with a logged reason. The application sees a reset and
//! reconnects (through a new session with fresh keys). At 16 KiB per record
//! the budget is 256 GiB on one connection; with tiny writes, 16 M writes.
//!
//! The budget counts records from above: a write of `n` bytes makes at most
//! ⌈n / 16 KiB⌉ records (neither kTLS nor rustls merges writes).

/// Largest TLS plaintext per record.
pub const MAX_RECORD_PLAINTEXT: u64 = 16 * 1024;
/// Records one session may send: 2^24, below AES-GCM's ~2^24.5.
pub const DEFAULT_RECORD_LIMIT: u64 = 1 << 24;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "TLS record limit reached ({limit} records sent with one key): the connection is reset \
     before the key is overused (Veil never sends a KeyUpdate; see veil_mtls::limits)"
)]
pub struct RecordLimitReached {
    pub limit: u64,
}

/// Records left to send on one session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordBudget {
    limit: u64,
    spent: u64,
}

impl RecordBudget {
    pub fn new(limit: u64) -> Self {
        Self { limit, spent: 0 }
    }

    /// Accounts for a write of `bytes`; an error once the limit would be passed.
    pub fn spend(&mut self, bytes: usize) -> Result<(), RecordLimitReached> {
        let records = (bytes as u64).div_ceil(MAX_RECORD_PLAINTEXT).max(1);
        if self.spent + records > self.limit {
            return Err(RecordLimitReached { limit: self.limit });
        }
        self.spent += records;
        Ok(())
    }

    /// The most bytes one write may carry and still fit the budget (0: none).
    pub fn max_bytes(&self) -> usize {
        let records = self.limit.saturating_sub(self.spent);
        usize::try_from(records.saturating_mul(MAX_RECORD_PLAINTEXT)).unwrap_or(usize::MAX)
    }

    pub fn spent(&self) -> u64 {
        self.spent
    }
}

impl Default for RecordBudget {
    fn default() -> Self {
        Self::new(DEFAULT_RECORD_LIMIT)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_are_counted_as_records_from_above() {
        let mut budget = RecordBudget::new(4);
        budget.spend(1).unwrap();
        budget.spend(16 * 1024).unwrap();
        budget.spend(16 * 1024 + 1).unwrap();
        assert_eq!(budget.spent(), 4);
        assert_eq!(budget.spend(1), Err(RecordLimitReached { limit: 4 }));
        assert_eq!(budget.max_bytes(), 0);
        assert_eq!(RecordBudget::new(2).max_bytes(), 32 * 1024);
    }

    #[test]
    fn the_default_stays_below_the_aes_gcm_limit() {
        // 2^24.5 ≈ 23.7 M records.
        assert!((DEFAULT_RECORD_LIMIT as f64) < 2f64.powf(24.5));
    }
}
