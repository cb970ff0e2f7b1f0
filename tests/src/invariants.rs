//! invariants (under construction).
