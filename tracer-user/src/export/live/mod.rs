//! The live terminal view, `tracer top`: which upstream is failing, and why, in the first second.
//!
//! [`model`] holds the state (rows from successive snapshots, recent failures, keys);
//! [`view`] draws it; [`terminal`] owns the real terminal and always gives it back. The data
//! comes from this process's own agent or, with `--connect`, from a running `tracer run`'s
//! `/api/snapshot` and `/api/events`.

pub mod model;
pub mod terminal;
pub mod view;
