//! tracer: why a reverse proxy answers 502, per upstream, from inside the kernel.
//!
//! The data path, one folder per stage:
//! kernel capture ([`capture`]) → [`decode`] → [`classify`] → [`aggregate`] → [`export`]
//! (events now; metrics and the live view build on the same stages). [`agent`] runs the loop and
//! [`cli`] is the `tracer` command.

pub mod agent;
pub mod aggregate;
pub mod capture;
pub mod classify;
pub mod cli;
pub mod decode;
pub mod export;
