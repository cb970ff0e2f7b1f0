//! Test support for backend authors and for Tandem's own suites (feature `testkit`):
//! fault-injecting wrappers for both ports and for embedders, a manual clock,
//! and the conformance suites every backend and embedder runs.

pub mod clock;
pub mod conformance;
pub mod embed;
pub mod faults;
