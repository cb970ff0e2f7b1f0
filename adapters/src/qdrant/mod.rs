//! The qdrant backend (under construction).
