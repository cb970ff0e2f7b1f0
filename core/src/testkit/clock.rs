//! A clock the tests move by hand, so that leases expire exactly when a test
//! says so (no sleeping, no flakiness).

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use crate::clock::Clock;

/// A [`Clock`] that only moves when told to. Clones share the same time, so a
/// test keeps one handle and gives clones to the coordinators it builds.
#[derive(Clone, Debug)]
pub struct ManualClock(Arc<AtomicI64>);

impl ManualClock {
    /// A clock reading `start_ms` (milliseconds since the Unix epoch).
    pub fn new(start_ms: i64) -> Self {
        Self(Arc::new(AtomicI64::new(start_ms)))
    }

    /// Moves the clock forward by `d` (whole milliseconds; saturating).
    pub fn advance(&self, d: Duration) {
        let step = i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        // `fetch_update` with a closure that always returns `Some` cannot fail.
        let _ = self
            .0
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |now| {
                Some(now.saturating_add(step))
            });
    }

    /// Sets the clock to `ms` (milliseconds since the Unix epoch); it may go back.
    pub fn set_ms(&self, ms: i64) {
        self.0.store(ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_where_told_and_moves_only_when_told() {
        let clock = ManualClock::new(1_000);
        assert_eq!(clock.now_ms(), 1_000);
        assert_eq!(clock.now_ms(), 1_000);
        clock.advance(Duration::from_millis(250));
        assert_eq!(clock.now_ms(), 1_250);
        clock.advance(Duration::from_secs(2));
        assert_eq!(clock.now_ms(), 3_250);
    }

    #[test]
    fn clones_share_the_time() {
        let clock = ManualClock::new(0);
        let other = clock.clone();
        clock.advance(Duration::from_millis(7));
        assert_eq!(other.now_ms(), 7);
        other.set_ms(-5);
        assert_eq!(clock.now_ms(), -5);
    }

    #[test]
    fn advance_saturates_instead_of_wrapping() {
        let clock = ManualClock::new(i64::MAX - 1);
        clock.advance(Duration::from_secs(10));
        assert_eq!(clock.now_ms(), i64::MAX);
    }

    #[test]
    fn usable_as_a_shared_clock_object() {
        let clock = ManualClock::new(42);
        let shared: Arc<dyn Clock> = Arc::new(clock.clone());
        clock.set_ms(43);
        assert_eq!(shared.now_ms(), 43);
    }
}
