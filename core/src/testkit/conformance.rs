//! Conformance suites (under construction).
