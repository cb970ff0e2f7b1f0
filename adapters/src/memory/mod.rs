//! The memory backend (under construction).
