//! pg (under construction).
