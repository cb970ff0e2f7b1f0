//! The edge backend (under construction).
