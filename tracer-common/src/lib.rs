//! What tracer's kernel programs (`tracer-ebpf`) and its agent (`tracer-user`) must agree on.
//!
//! - [`conn`]: the per-connection record the kernel keeps and the state machine that decides each
//!   connection's [`Outcome`]. It is plain `no_std` Rust, so the very code the kernel runs is unit
//!   tested on the host against recorded sequences of kernel events.
//! - [`outcome`]: outcome codes (successes and failure causes) and their names.
//! - [`event`]: the record a failure sends to user space through the ring buffer.
//! - [`counts`]: keys and values of the exact per-CPU counters, and the agent's health counters.
//! - [`peek`]: the first bytes each side of a connection sent, and the TLS failures they tell.
//! - [`config`]: what user space tells the kernel programs at load time (kernel struct offsets
//!   from BTF, tracepoint field offsets, thresholds).
#![no_std]

#[cfg(test)]
extern crate std;

pub mod config;
pub mod conn;
pub mod counts;
pub mod event;
pub mod net;
pub mod outcome;
pub mod peek;

pub use config::{Config, KernelOffsets, OomFields, SyscallFields};
pub use conn::{ConnTrack, EndKind, Task, Verdict};
pub use counts::{CountKey, Program, RouteKey, Stat, Tally};
pub use event::{ExitEvent, FailureEvent, ListenerEvent, OomEvent, RecordKind, Source};
pub use net::Endpoint;
pub use outcome::Outcome;

/// Implements `aya::Pod` for the given `#[repr(C)]` types on the host side.
macro_rules! impl_pod {
    ($($t:ty),* $(,)?) => {
        $(
            #[cfg(feature = "user")]
            // SAFETY: every type listed is `#[repr(C)]`, `Copy`, made only of integers and byte
            // arrays, with explicit padding fields, so any bit pattern is a valid value.
            unsafe impl aya::Pod for $t {}
        )*
    };
}

impl_pod!(
    Config,
    ConnTrack,
    CountKey,
    RouteKey,
    Tally,
    FailureEvent,
    ListenerEvent,
    OomEvent,
    ExitEvent,
    event::SelfProbeEvent,
    event::ServerEndEvent,
    event::Signalled,
    conn::PendingConnect,
    counts::UnixFail,
    counts::UnixFailKey,
    peek::DeferredClose,
);

/// The size of every record the kernel and the agent share, fixed here: a layout change on one
/// side must be made on purpose (and on both), never read silently as something else.
macro_rules! sizes {
    ($($t:ty = $n:expr),* $(,)?) => {
        $(const _: () = assert!(core::mem::size_of::<$t>() == $n);)*
    };
}

sizes!(
    Config = 248,
    ConnTrack = 200,
    CountKey = 56,
    RouteKey = 48,
    Tally = 32,
    FailureEvent = 248,
    ListenerEvent = 96,
    OomEvent = 48,
    ExitEvent = 64,
    event::SelfProbeEvent = 24,
    event::ServerEndEvent = 184,
    event::Signalled = 40,
    conn::PendingConnect = 40,
    counts::UnixFail = 72,
    counts::UnixFailKey = 16,
    peek::DeferredClose = 40,
);
