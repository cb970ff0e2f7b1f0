//! Time, injected so that leases follow a clock the tests control.

use std::fmt::Debug;
use std::time::SystemTime;

use crate::model::unix_ms;

/// A source of wall-clock time in milliseconds since the Unix epoch.
///
/// Leases are compared across processes, so every coordinator sharing a store
/// must use clocks that agree to well within the lease duration (NTP suffices:
/// leases are minutes, skew is milliseconds).
pub trait Clock: Send + Sync + Debug {
    /// Now, in milliseconds since the Unix epoch.
    fn now_ms(&self) -> i64;
}

/// The system's wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        unix_ms(SystemTime::now())
    }
}
