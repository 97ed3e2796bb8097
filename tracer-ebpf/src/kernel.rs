//! Reading kernel memory and the current task, at the offsets user space passed in `CONFIG`.

use aya_ebpf::{
    EbpfContext,
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        bpf_get_current_task, bpf_ktime_get_ns, bpf_probe_read_kernel, bpf_probe_read_kernel_buf,
    },
    programs::TracePointContext,
};
use tracer_common::Task;

/// CLOCK_MONOTONIC, in ns.
#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: a helper without arguments.
    unsafe { bpf_ktime_get_ns() }
}

/// Reads a `T` at `base + offset` in kernel memory.
#[inline(always)]
pub fn read_kernel<T>(base: *const u8, offset: u32) -> Result<T, i64> {
    // SAFETY: bpf_probe_read_kernel copes with any address.
    unsafe {
        bpf_probe_read_kernel(base.wrapping_add(offset as usize).cast::<T>()).map_err(i64::from)
    }
}

/// Reads a field of a classic tracepoint's record at the offset its format file gives.
#[inline(always)]
pub fn read_field<T>(ctx: &TracePointContext, offset: u32) -> Result<T, i64> {
    // SAFETY: read_at goes through bpf_probe_read_kernel, which copes with any address.
    unsafe { ctx.read_at(offset as usize).map_err(i64::from) }
}

/// Where a syscall tracepoint's record has its arguments and its return value on every kernel
/// (`SyscallFields::FIRST_ARG`, `SyscallFields::RET`), as constants the loads can carry.
pub const ARG0: usize = tracer_common::SyscallFields::FIRST_ARG as usize;
pub const ARG1: usize = ARG0 + 8;
pub const ARG2: usize = ARG0 + 16;
pub const RET: usize = tracer_common::SyscallFields::RET as usize;

/// A word of a syscall tracepoint's record: at `AT`, loaded directly, where user space found
/// the usual layout (`SyscallFields::usual`); else at `offset`, from the format file, through
/// a helper call (the verifier allows direct loads from the record only at offsets fixed in the
/// instruction). A direct load saves about a helper call per field, on probes that run at every
/// read, write and connect() of the host.
#[inline(always)]
pub fn syscall_word<const AT: usize>(ctx: &TracePointContext, offset: u32) -> Result<u64, i64> {
    if config!(syscalls.usual) != 0 {
        // SAFETY: a tracepoint program may read its own record; AT lies inside the record of
        // every tracepoint this is called for (user space checked their format files, and the
        // kernel checks again when the program is attached).
        return Ok(unsafe { core::ptr::read_volatile(ctx.as_ptr().cast::<u8>().add(AT).cast()) });
    }
    read_field(ctx, offset)
}

#[inline(always)]
pub fn current_task() -> *const u8 {
    // SAFETY: a helper without arguments.
    unsafe { bpf_get_current_task() as *const u8 }
}

/// The socket's local port, in host byte order (0 when not known).
#[inline(always)]
pub fn local_port(sk: *const u8) -> u16 {
    u16::from_be(read_kernel::<u16>(sk, config!(offsets.inet_sport)).unwrap_or(0))
}

/// The network namespace of a socket (its inode number).
pub fn netns_of(sk: *const u8) -> u32 {
    read_kernel::<*const u8>(sk, config!(offsets.skc_net))
        .and_then(|net| read_kernel::<u32>(net, config!(offsets.net_ns_inum)))
        .unwrap_or(0)
}

/// The network namespace of the current task (`task->nsproxy->net_ns`), for where no socket is
/// at hand; 0 when not known (a task past exit_task_namespaces has no nsproxy).
pub fn current_netns() -> u32 {
    read_kernel::<*const u8>(current_task(), config!(offsets.task_nsproxy))
        .and_then(|nsproxy| read_kernel::<*const u8>(nsproxy, config!(offsets.nsproxy_net_ns)))
        .and_then(|net| read_kernel::<u32>(net, config!(offsets.net_ns_inum)))
        .unwrap_or(0)
}

/// Fills `proxy` with the process behind the current thread: its main thread's name, pid, tid
/// and cgroup, with the network namespace `netns` of the socket concerned. (Written in place:
/// a returned `Task` would take another 48 bytes of stack.)
#[inline(never)]
pub fn fill_current_proxy(proxy: &mut Task, netns: u32) {
    fill_current_task(proxy, bpf_get_current_pid_tgid(), netns);
}

/// [`fill_current_proxy`] for a caller that has the current `pid_tgid` at hand already.
#[inline(never)]
pub fn fill_current_task(proxy: &mut Task, pid_tgid: u64, netns: u32) {
    let task = current_task();
    // SAFETY: a helper without arguments.
    proxy.cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    proxy.tgid = (pid_tgid >> 32) as u32;
    proxy.pid = pid_tgid as u32;
    proxy.netns = netns;
    proxy._pad = 0;
    let leader = read_kernel::<*const u8>(task, config!(offsets.task_group_leader));
    let comm_at = config!(offsets.task_comm) as usize;
    // SAFETY: bpf_probe_read_kernel copes with any address; the destination is 16 bytes.
    let read = leader.and_then(|leader| unsafe {
        bpf_probe_read_kernel_buf(leader.wrapping_add(comm_at), &mut proxy.comm).map_err(i64::from)
    });
    if read.is_err() {
        proxy.comm = bpf_get_current_comm().unwrap_or([0; 16]);
    }
}

/// Whether the current task belongs to the process user space asked the programs to ignore
/// (the agent: its own failed accept()s and connects are not a proxy's).
pub fn current_is_ignored() -> bool {
    is_ignored(bpf_get_current_pid_tgid())
}

/// [`current_is_ignored`], from the current `pid_tgid`.
#[inline(always)]
pub fn is_ignored(pid_tgid: u64) -> bool {
    let ignored = config!(ignored_tgid);
    ignored != 0 && (pid_tgid >> 32) as u32 == ignored
}

/// `N` bytes at `offset` in a block read from the kernel.
#[inline(always)]
pub fn field<const N: usize>(block: &[u8], offset: u32) -> Result<[u8; N], i64> {
    let offset = offset as usize;
    let bytes = block.get(offset..offset + N).ok_or(-1i64)?;
    // Not a zeroed array filled in (zero-fills used to be byte-by-byte memset calls; see
    // build.rs).
    bytes.try_into().map_err(|_| -1i64)
}
