//! When to renew a certificate, and how long to wait after a failed attempt.
//!
//! Renewal starts at a fraction of the lifetime (2/3 by default), long before
//! expiry, so a CA outage of hours costs nothing. Failed attempts back off
//! exponentially with full jitter, so a fleet of agents never retries in step.

use std::time::{Duration, SystemTime};

/// Renewal settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RenewalPolicy {
    /// Fraction of the lifetime after which to renew (0 < f < 1).
    pub at_fraction: f64,
    /// First retry delay after a failure.
    pub initial_backoff: Duration,
    /// Longest retry delay.
    pub max_backoff: Duration,
}

impl Default for RenewalPolicy {
    fn default() -> Self {
        Self {
            at_fraction: 2.0 / 3.0,
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(300),
        }
    }
}

impl RenewalPolicy {
    /// When a certificate valid from `not_before` to `not_after` should be renewed.
    pub fn renew_at(&self, not_before: SystemTime, not_after: SystemTime) -> SystemTime {
        let lifetime = not_after.duration_since(not_before).unwrap_or_default();
        not_before + lifetime.mul_f64(self.at_fraction.clamp(0.0, 1.0))
    }

    /// Delay before retry number `attempt` (0 = first retry): a uniform draw
    /// from zero to the exponential bound ("full jitter").
    pub fn retry_delay(&self, attempt: u32) -> Duration {
        let bound = self.backoff_bound(attempt);
        bound.mul_f64(rand::random::<f64>())
    }

    /// The exponential bound without jitter: initial × 2^attempt, capped.
    pub fn backoff_bound(&self, attempt: u32) -> Duration {
        self.initial_backoff
            .saturating_mul(1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX))
            .min(self.max_backoff)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renews_at_two_thirds_of_the_lifetime() {
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let end = start + Duration::from_secs(24 * 3600);
        let at = RenewalPolicy::default().renew_at(start, end);
        assert_eq!(
            at.duration_since(start).unwrap(),
            Duration::from_secs(16 * 3600)
        );
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_and_jitter_stays_below_the_bound() {
        let policy = RenewalPolicy::default();
        assert_eq!(policy.backoff_bound(0), Duration::from_secs(1));
        assert_eq!(policy.backoff_bound(3), Duration::from_secs(8));
        assert_eq!(policy.backoff_bound(40), Duration::from_secs(300));
        let delays: Vec<Duration> = (0..100).map(|_| policy.retry_delay(5)).collect();
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(32)));
        assert!(delays.iter().any(|d| *d != delays[0]), "jitter varies");
    }
}
