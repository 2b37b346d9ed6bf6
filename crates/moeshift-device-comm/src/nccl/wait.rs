//! Polling with a deadline: spin briefly (transfers of a few hundred microseconds should not
//! pay a sleep), then sleep for a small fraction of the time already waited, so the delay
//! between completion and its detection stays a few percent of the wait (bandwidth figures
//! stay honest) while long waits poll at most about a thousand times a second.

use std::time::{Duration, Instant};

use moeshift_sync::Deadline;

/// Outcome of one poll.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Poll<T> {
    /// Finished, with a value.
    Ready(T),
    /// Not yet.
    Pending,
}

/// How long to spin (yielding the CPU between polls) before starting to sleep.
const SPIN_FOR: Duration = Duration::from_micros(300);
/// Shortest sleep once spinning is over.
const MIN_SLEEP: Duration = Duration::from_micros(10);
/// Longest sleep between two polls.
const MAX_SLEEP: Duration = Duration::from_millis(1);
/// Sleeps last at most this fraction (1/N) of the time waited so far.
const SLEEP_FRACTION: u32 = 32;

/// The pause before the next poll, after waiting `waited` in total.
fn pause(waited: Duration) -> Option<Duration> {
    (waited >= SPIN_FOR).then(|| (waited / SLEEP_FRACTION).clamp(MIN_SLEEP, MAX_SLEEP))
}

/// Calls `poll` until it returns `Ready` or an error, or until `deadline` passes. Returns
/// `Ok(Some(value))` when ready, `Ok(None)` when the deadline expired first. `poll` always runs
/// at least once, even with an expired deadline.
pub fn poll_until<T, E>(
    deadline: Deadline,
    mut poll: impl FnMut() -> Result<Poll<T>, E>,
) -> Result<Option<T>, E> {
    let start = Instant::now();
    loop {
        if let Poll::Ready(value) = poll()? {
            return Ok(Some(value));
        }
        if deadline.is_expired() {
            return Ok(None);
        }
        match pause(start.elapsed()) {
            None => std::thread::yield_now(),
            Some(sleep) => std::thread::sleep(sleep.min(deadline.remaining())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_at_once_polls_once() {
        let mut calls = 0;
        let got = poll_until::<_, ()>(Deadline::after(Duration::from_secs(5)), || {
            calls += 1;
            Ok(Poll::Ready(7))
        });
        assert_eq!(got, Ok(Some(7)));
        assert_eq!(calls, 1);
    }

    #[test]
    fn expired_deadline_still_polls_once() {
        let mut calls = 0;
        let got = poll_until::<u8, ()>(Deadline::after(Duration::ZERO), || {
            calls += 1;
            Ok(Poll::Pending)
        });
        assert_eq!(got, Ok(None));
        assert_eq!(calls, 1);
    }

    #[test]
    fn becomes_ready_after_some_polls() {
        let mut calls = 0;
        let got = poll_until::<_, ()>(Deadline::after(Duration::from_secs(5)), || {
            calls += 1;
            Ok(if calls == 50 {
                Poll::Ready("done")
            } else {
                Poll::Pending
            })
        });
        assert_eq!(got, Ok(Some("done")));
        assert_eq!(calls, 50);
    }

    #[test]
    fn never_ready_returns_none_soon_after_the_deadline() {
        let start = Instant::now();
        let got = poll_until::<u8, ()>(Deadline::after(Duration::from_millis(30)), || {
            Ok(Poll::Pending)
        });
        let took = start.elapsed();
        assert_eq!(got, Ok(None));
        assert!(took >= Duration::from_millis(30), "{took:?}");
        assert!(took < Duration::from_millis(500), "{took:?}");
    }

    #[test]
    fn pauses_grow_with_the_wait_and_stay_bounded() {
        assert_eq!(pause(Duration::from_micros(100)), None);
        assert_eq!(pause(Duration::from_micros(300)), Some(MIN_SLEEP));
        // 3.2 ms waited: 1/32 of it is 100 us.
        assert_eq!(
            pause(Duration::from_micros(3200)),
            Some(Duration::from_micros(100))
        );
        assert_eq!(pause(Duration::from_secs(10)), Some(MAX_SLEEP));
    }

    #[test]
    fn errors_stop_polling() {
        let mut calls = 0;
        let got = poll_until::<u8, &str>(Deadline::after(Duration::from_secs(5)), || {
            calls += 1;
            if calls == 3 {
                Err("broken")
            } else {
                Ok(Poll::Pending)
            }
        });
        assert_eq!(got, Err("broken"));
        assert_eq!(calls, 3);
    }
}
