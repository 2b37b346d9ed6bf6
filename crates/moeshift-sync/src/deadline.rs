//! [`Deadline`]: the point in time after which a blocking call gives up.
//!
//! Every blocking operation in moeshift takes a `Deadline` instead of a bare timeout, so one
//! deadline can be threaded through a sequence of calls (connect, then send, then receive)
//! without each step restarting the clock.

use std::fmt;
use std::time::{Duration, Instant};

/// A point in time after which a blocking operation returns a timeout error.
///
/// ```
/// use moeshift_sync::Deadline;
/// use std::time::Duration;
///
/// let d = Deadline::after(Duration::from_secs(5));
/// assert!(!d.is_expired());
/// assert!(d.remaining() <= Duration::from_secs(5));
/// ```
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Deadline {
    at: Instant,
}

impl Deadline {
    /// A deadline `timeout` from now. A timeout too large to represent is clamped to about
    /// a hundred years, which is "never" for any practical purpose while staying finite.
    pub fn after(timeout: Duration) -> Self {
        let now = Instant::now();
        let at = now
            .checked_add(timeout)
            .or_else(|| now.checked_add(Duration::from_secs(100 * 365 * 24 * 3600)))
            .unwrap_or(now);
        Self { at }
    }

    /// A deadline `secs` seconds from now (fractions allowed; negative or NaN means now).
    pub fn after_secs_f64(secs: f64) -> Self {
        if secs.is_finite() && secs > 0.0 {
            Self::after(Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX))
        } else {
            Self::at(Instant::now())
        }
    }

    /// A deadline at the given instant.
    pub fn at(at: Instant) -> Self {
        Self { at }
    }

    /// The instant this deadline expires.
    pub fn instant(&self) -> Instant {
        self.at
    }

    /// Time left before expiry; zero once expired.
    pub fn remaining(&self) -> Duration {
        self.at.saturating_duration_since(Instant::now())
    }

    /// True once the deadline has passed.
    pub fn is_expired(&self) -> bool {
        Instant::now() >= self.at
    }

    /// The earlier of this deadline and `now + timeout`: for a sub-step that must not take
    /// longer than `timeout` nor outlive the overall deadline.
    pub fn min_after(&self, timeout: Duration) -> Self {
        (*self).min(Self::after(timeout))
    }

    /// Time left, but never less than `floor`: for socket timeouts, where zero means
    /// "block forever" and must never be passed.
    pub fn remaining_at_least(&self, floor: Duration) -> Duration {
        self.remaining().max(floor)
    }
}

impl fmt::Debug for Deadline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Deadline(in {:?})", self.remaining())
    }
}

/// Error returned when a [`Deadline`] passes before a blocking operation completed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("deadline expired while {what}")]
pub struct DeadlineExceeded {
    /// What the caller was waiting for, e.g. "waiting for rank 3 to record".
    pub what: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remaining_shrinks_and_expires() {
        let d = Deadline::after(Duration::from_millis(20));
        assert!(!d.is_expired());
        assert!(d.remaining() <= Duration::from_millis(20));
        std::thread::sleep(Duration::from_millis(30));
        assert!(d.is_expired());
        assert_eq!(d.remaining(), Duration::ZERO);
        assert_eq!(
            d.remaining_at_least(Duration::from_millis(1)),
            Duration::from_millis(1)
        );
    }

    #[test]
    fn huge_timeouts_do_not_overflow() {
        let d = Deadline::after(Duration::MAX);
        assert!(!d.is_expired());
        assert!(d.remaining() > Duration::from_secs(3600 * 24 * 365));
    }

    #[test]
    fn min_after_takes_the_earlier() {
        let long = Deadline::after(Duration::from_secs(60));
        let short = long.min_after(Duration::from_millis(5));
        assert!(short < long);
        let d = Deadline::after(Duration::from_millis(5));
        assert_eq!(d.min_after(Duration::from_secs(60)), d);
    }

    #[test]
    fn bad_float_seconds_mean_now() {
        assert!(Deadline::after_secs_f64(f64::NAN).is_expired());
        assert!(Deadline::after_secs_f64(-1.0).is_expired());
        assert!(!Deadline::after_secs_f64(10.0).is_expired());
    }
}
