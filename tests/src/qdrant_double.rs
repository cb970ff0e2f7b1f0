//! qdrant_double (under construction).
