//! Test support for backend authors and for Tandem's own suites (feature `testkit`):
//! fault-injecting wrappers for both ports, a manual clock, and the conformance
//! suites every backend runs.

pub mod clock;
pub mod conformance;
pub mod faults;
