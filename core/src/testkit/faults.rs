//! Fault injection (under construction).
