//! Manual clock (under construction).
