//! tracer's kernel programs: record the fate of every outbound TCP connection.
//!
//! Socket and task events use raw tracepoints: the kernel's own arguments (the `struct sock *`,
//! the `struct task_struct *`), read at offsets from BTF that user space passes in, without the
//! cost of building a trace record and without the agent having to load vmlinux's BTF into aya.
//!
//! Each program is a thin adapter: it reads what its tracepoint offers, finds the connection's
//! record (keyed by `struct sock *`) and calls the shared state machine in
//! `tracer_common::conn`, which decides the outcome. Outcomes are counted exactly here, in
//! per-CPU maps; failures also go to user space through a ring buffer, with their evidence.
//!
//! | file           | programs                                                  | concern                        |
//! |----------------|-----------------------------------------------------------|--------------------------------|
//! | `sockets.rs`   | `inet_sock_set_state`, `tcp_receive_reset`, `tcp_retransmit_skb`, `tcp_sendmsg_locked`, `tcp_probe` | a connection from SYN to CLOSE |
//! | `syscalls.rs`  | `sys_enter_connect`, `sys_exit_connect`, `sys_exit_socket`, `sys_exit_accept4`, `sys_exit_accept` | attempts a system call decides (no route, no port, Unix sockets, no descriptors) |
//! | `peek.rs`      | `sys_enter_{write,sendto,writev,sendmsg}`, `sys_enter_{read,recvfrom,readv,recvmsg}` and their exits | the first bytes each side sends: TLS failures |
//! | `lifecycle.rs` | (`inet_sock_set_state`'s listeners), `sched_process_exit`, `mark_victim` | listeners and the processes behind them |
//! | `workers.rs`   | (`inet_sock_set_state`'s server sides), `signal_generate` | the worker behind a failure: who ended the server's side, and who signalled it |
//! | `counting.rs`  |                                                           | exact counts, failure reports, health counters |
//! | `maps.rs`      |                                                           | every map                      |
//! | `kernel.rs`    |                                                           | reading kernel memory and the current task |
//!
//! Stack: kernels before 6.13 allow 512 bytes for a program and the functions it calls
//! together. Ring-buffer records are written in place; a new connection's record and the count
//! keys are built on the stack of functions of their own (`#[inline(never)]`), so that no
//! chain of calls holds two of them. Not in per-CPU scratch maps: a softirq can interrupt a
//! program, and newer kernels (7.x) can preempt one, and either would overwrite the scratch
//! under it (seen in the kernel matrix as counts under the wrong upstream and cause).
#![no_std]
#![no_main]
#![allow(
    clippy::needless_borrows_for_generic_args,
    reason = "map keys and values go by reference so they are not copied on the 512-byte BPF stack"
)]

use tracer_common::Config;

/// Offsets and settings, filled in by the agent at load time (`EbpfLoader::override_global`).
#[unsafe(no_mangle)]
static CONFIG: Config = Config::UNSET;

/// Reads a field of [`CONFIG`] as the loaded program sees it, not as it was compiled.
macro_rules! config {
    ($($field:tt)+) => {
        // SAFETY: CONFIG is a plain read-only global.
        unsafe { core::ptr::read_volatile(core::ptr::addr_of!(crate::CONFIG.$($field)+)) }
    };
}

mod counting;
mod kernel;
mod lifecycle;
mod maps;
mod peek;
mod sockets;
mod syscalls;
mod workers;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
