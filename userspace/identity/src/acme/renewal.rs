//! When to renew an ACME certificate.
//!
//! A CA that offers ACME Renewal Information (ARI, RFC 9773) says when it
//! wants a certificate renewed: a suggested window, moved earlier when the
//! certificate is about to be revoked (a mis-issuance, a key compromise).
//! Following it is what keeps ingress certificates valid through a mass
//! revocation. Per RFC 9773 §4.2 the renewer picks a uniformly random time
//! inside the window (so a fleet does not renew in step), renews at once
//! when that time has passed, and asks again after the Retry-After the CA
//! sent, bounded by [`AriBounds`] so a missing or absurd value neither
//! hammers the CA nor stops asking for days. A CA without ARI, or a
//! certificate it cannot be asked about, falls back to
//! [`RenewalPolicy`]: 2/3 of the lifetime.

use std::time::{Duration, SystemTime};

use crate::renewal::RenewalPolicy;

/// What the renewal time was decided from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecisionSource {
    /// The CA's suggested window (RFC 9773).
    Ari,
    /// 2/3 of the certificate's lifetime.
    Lifetime,
}

impl DecisionSource {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ari => "ari",
            Self::Lifetime => "lifetime",
        }
    }
}

impl std::fmt::Display for DecisionSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Bounds on the delay before asking the CA's ARI again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AriBounds {
    pub min: Duration,
    pub max: Duration,
}

impl Default for AriBounds {
    /// 1 minute to 6 hours (Let's Encrypt sends 6 hours).
    fn default() -> Self {
        Self {
            min: Duration::from_secs(60),
            max: Duration::from_secs(6 * 3600),
        }
    }
}

impl AriBounds {
    /// The CA's Retry-After, kept within the bounds.
    pub fn clamp(&self, retry_after: Duration) -> Duration {
        retry_after.clamp(self.min, self.max.max(self.min))
    }
}

/// When to renew one certificate, and when to look again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RenewalPlan {
    /// Renew at this time (now or earlier: at once).
    pub renew_at: SystemTime,
    pub source: DecisionSource,
    /// When to ask the CA's ARI again; `None` when it has none.
    pub recheck_at: Option<SystemTime>,
    /// The ARI window `renew_at` was drawn from.
    pub window: Option<(SystemTime, SystemTime)>,
}

impl RenewalPlan {
    /// Whether the ARI should be asked again at `now`.
    pub fn recheck_due(&self, now: SystemTime) -> bool {
        self.recheck_at.is_some_and(|at| now >= at)
    }

    /// The next moment something is to be done.
    pub fn wake_at(&self) -> SystemTime {
        self.recheck_at
            .map_or(self.renew_at, |at| at.min(self.renew_at))
    }
}

/// 2/3 of the lifetime (the policy's fraction), with no ARI to ask;
/// `recheck_at` set when the CA has ARI but could not answer this time.
pub fn lifetime_plan(
    policy: &RenewalPolicy,
    not_before: SystemTime,
    not_after: SystemTime,
    recheck_at: Option<SystemTime>,
) -> RenewalPlan {
    RenewalPlan {
        renew_at: policy.renew_at(not_before, not_after),
        source: DecisionSource::Lifetime,
        recheck_at,
        window: None,
    }
}

/// The plan from an ARI answer: a uniformly random time in the window
/// (`draw` in [0, 1)), or the time drawn before when the window did not
/// change; at once when that time has passed (RFC 9773 §4.2). `None` when
/// the window is unusable (empty or reversed, or ending after the
/// certificate expires): the caller falls back to the lifetime.
pub fn ari_plan(
    window: (SystemTime, SystemTime),
    retry_after: Duration,
    now: SystemTime,
    not_after: SystemTime,
    bounds: &AriBounds,
    previous: Option<&RenewalPlan>,
    draw: f64,
) -> Option<RenewalPlan> {
    let (start, end) = window;
    let width = end.duration_since(start).ok().filter(|w| !w.is_zero())?;
    if end > not_after {
        return None;
    }
    let chosen = match previous {
        Some(plan) if plan.window == Some(window) => plan.renew_at,
        _ => start + width.mul_f64(draw.clamp(0.0, 1.0)),
    };
    Some(RenewalPlan {
        renew_at: chosen.max(now),
        source: DecisionSource::Ari,
        recheck_at: Some(now + bounds.clamp(retry_after)),
        window: Some(window),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    fn at(hours: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000) + HOUR * hours as u32
    }

    #[test]
    fn a_window_in_the_past_means_now() {
        let now = at(100);
        let plan = ari_plan(
            (at(10), at(11)),
            HOUR,
            now,
            at(1000),
            &AriBounds::default(),
            None,
            0.5,
        )
        .unwrap();
        assert_eq!(plan.renew_at, now);
        assert_eq!(plan.source, DecisionSource::Ari);
    }

    #[test]
    fn a_future_window_gives_a_time_inside_it_spread_by_the_draw() {
        let now = at(0);
        let window = (at(600), at(648));
        let plan = |draw| {
            ari_plan(
                window,
                HOUR,
                now,
                at(900),
                &AriBounds::default(),
                None,
                draw,
            )
            .unwrap()
            .renew_at
        };
        assert_eq!(plan(0.0), at(600));
        assert_eq!(plan(0.5), at(624));
        assert!(plan(0.999_999) < at(648));
        for _ in 0..100 {
            let t = plan(rand::random::<f64>());
            assert!((at(600)..at(648)).contains(&t));
        }
    }

    #[test]
    fn the_draw_is_kept_while_the_window_is_unchanged() {
        let bounds = AriBounds::default();
        let first = ari_plan(
            (at(600), at(648)),
            HOUR,
            at(0),
            at(900),
            &bounds,
            None,
            0.25,
        );
        let again = ari_plan(
            (at(600), at(648)),
            HOUR,
            at(1),
            at(900),
            &bounds,
            first.as_ref(),
            0.9,
        );
        assert_eq!(again.unwrap().renew_at, at(612));
        let moved = ari_plan(
            (at(500), at(548)),
            HOUR,
            at(1),
            at(900),
            &bounds,
            first.as_ref(),
            0.5,
        );
        assert_eq!(moved.unwrap().renew_at, at(524), "a new window, a new draw");
    }

    #[test]
    fn unusable_windows_fall_back() {
        let bounds = AriBounds::default();
        let plan = |window| ari_plan(window, HOUR, at(0), at(900), &bounds, None, 0.5);
        assert!(plan((at(600), at(600))).is_none(), "empty");
        assert!(plan((at(600), at(500))).is_none(), "reversed");
        assert!(plan((at(899), at(901))).is_none(), "ends after expiry");
    }

    #[test]
    fn without_ari_it_is_two_thirds_of_the_lifetime() {
        let plan = lifetime_plan(&RenewalPolicy::default(), at(0), at(90 * 24), None);
        assert_eq!(plan.renew_at, at(60 * 24));
        assert_eq!(plan.source, DecisionSource::Lifetime);
        assert_eq!(plan.recheck_at, None);
        assert_eq!(plan.wake_at(), at(60 * 24));
    }

    #[test]
    fn retry_after_is_bounded() {
        let bounds = AriBounds::default();
        assert_eq!(bounds.clamp(Duration::ZERO), Duration::from_secs(60));
        assert_eq!(bounds.clamp(HOUR), HOUR);
        assert_eq!(bounds.clamp(HOUR * 24 * 30), HOUR * 6);
        let plan = ari_plan(
            (at(600), at(648)),
            HOUR * 100,
            at(0),
            at(900),
            &bounds,
            None,
            0.5,
        )
        .unwrap();
        assert_eq!(plan.recheck_at, Some(at(6)));
        assert_eq!(
            plan.wake_at(),
            at(6),
            "the recheck comes before the renewal"
        );
        assert!(!plan.recheck_due(at(5)));
        assert!(plan.recheck_due(at(6)));
    }
}
