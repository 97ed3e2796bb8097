//! What user space hands the kernel programs at load time, as the read-only global `CONFIG`.
//!
//! Kernel struct layouts differ between kernels and aya cannot relocate field accesses from Rust
//! (no CO-RE), so the agent reads the offsets it needs from the running kernel's BTF
//! (/sys/kernel/btf/vmlinux) and the syscall tracepoints' field offsets from their tracefs format
//! files, and passes them in here.

/// Byte offsets of the kernel struct fields the programs read, from the running kernel's BTF.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    /// `struct sock_common` members, as offsets from a `struct sock *`.
    pub skc_family: u32,
    pub skc_dport: u32,
    pub skc_daddr: u32,
    pub skc_rcv_saddr: u32,
    pub skc_v6_daddr: u32,
    pub skc_v6_rcv_saddr: u32,
    /// `sock_common.skc_num`: the bound local port, host order (set before listen() goes
    /// CLOSE→LISTEN; zero again by the time a socket goes to CLOSE).
    pub skc_num: u32,
    /// `struct inet_sock.inet_sport`: the local port, big-endian. (`skc_num` is already zero
    /// when the CLOSE transition is traced: the port was released just before.)
    pub inet_sport: u32,
    /// `struct sock` members.
    pub sk_protocol: u32,
    pub sk_err: u32,
    /// `struct tcp_sock` members, as offsets from the same pointer (a `tcp_sock` starts with its
    /// `sock`).
    pub tcp_bytes_received: u32,
    pub tcp_bytes_acked: u32,
    /// `tcp_sock.write_seq` (the end of what the proxy has written) and `tcp_clock_cache` (when
    /// the kernel last sent or received on the connection, CLOCK_MONOTONIC ns;
    /// [`KernelOffsets::MISSING`] where absent): where sends are inferred.
    pub tcp_write_seq: u32,
    pub tcp_clock_cache: u32,
    /// `struct task_struct` members.
    pub task_group_leader: u32,
    pub task_comm: u32,
    /// The path from a file descriptor to its socket, to tell a TCP socket's failed connect()
    /// from a UDP one's: `task_struct.files`, `files_struct.fdt`, `fdtable.fd`,
    /// `fdtable.max_fds`, `file.private_data` (a `struct socket *`), `socket.sk`.
    pub task_files: u32,
    pub files_fdt: u32,
    pub fdtable_fd: u32,
    pub fdtable_max_fds: u32,
    pub file_private_data: u32,
    pub socket_sk: u32,
    /// `sock_common.skc_net.net` (the socket's `struct net *`) and `net.ns.inum`.
    pub skc_net: u32,
    pub net_ns_inum: u32,
    /// `task_struct` members for a dying listener's owner.
    pub task_flags: u32,
    pub task_exit_code: u32,
    pub task_tgid: u32,
    pub task_pid: u32,
    /// `task_struct.nsproxy` and `nsproxy.net_ns`: a task's network namespace.
    pub task_nsproxy: u32,
    pub nsproxy_net_ns: u32,
    /// `struct socket.type` (SOCK_STREAM…), to tell a Unix upstream from a datagram socket.
    pub socket_type: u32,
    /// `sock.sk_max_ack_backlog`: a listener's listen() backlog.
    pub sk_max_ack_backlog: u32,
    /// `tcp_sock.bytes_sent`: whether a server answered before its side ended.
    pub tcp_bytes_sent: u32,
    /// `sock.sk_socket`: set once a process accept()ed the connection.
    pub sk_socket: u32,
    /// From a `struct socket` to its inode's number: `socket_alloc.vfs_inode` (the socket is
    /// the allocation's first member) plus `inode.i_ino`.
    pub socket_inode_ino: u32,
    /// `task_struct.real_parent`.
    pub task_real_parent: u32,
    /// Keeps the size a multiple of 8, so that `Config` has no padding the compiler fills in.
    pub _pad: u32,
}

impl KernelOffsets {
    /// The offset of an optional field this kernel's structs lack.
    pub const MISSING: u32 = u32::MAX;
}

/// Offsets of the fields of the classic syscall tracepoints, from their tracefs format files.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyscallFields {
    /// `syscalls:sys_enter_connect`: `fd`, `uservaddr`, `addrlen`.
    pub connect_fd: u32,
    pub connect_uservaddr: u32,
    pub connect_addrlen: u32,
    /// `syscalls:sys_exit_connect`: `ret`.
    pub connect_ret: u32,
    /// `syscalls:sys_exit_socket`: `ret`.
    pub socket_ret: u32,
    /// `syscalls:sys_exit_accept4` and `sys_exit_accept`: `ret`.
    pub accept_ret: u32,
    /// `syscalls:sys_enter_bind`: `umyaddr`, `addrlen`.
    pub bind_umyaddr: u32,
    pub bind_addrlen: u32,
    /// The reads and writes the kernel watches for a connection's first bytes (`sys_enter_`
    /// `read`, `write`, `readv`, `writev`, `recvfrom`, `sendto`, `recvmsg`, `sendmsg`): where
    /// their `fd` and their buffer (or iovec, or msghdr) argument are, the same in each (user
    /// space checks); and `ret` in their exits.
    pub io_fd: u32,
    pub io_buf: u32,
    pub io_ret: u32,
    /// Non-zero when every offset above is the one every kernel since 4.x has used
    /// ([`SyscallFields::is_usual`]): the programs then load the record's words directly, at
    /// offsets fixed when they were compiled, rather than through a helper call each.
    pub usual: u32,
}

impl SyscallFields {
    /// Where a syscall tracepoint's record has its first argument, and its return value: after
    /// the common header (8 bytes) and the syscall number (an int, padded to 8).
    pub const FIRST_ARG: u32 = 16;
    pub const RET: u32 = 16;

    /// Whether these offsets are the usual layout the programs were compiled with (the
    /// arguments one 8-byte slot after another from [`Self::FIRST_ARG`]). `io` says whether
    /// the read and write probes' offsets were found (else they are not used).
    pub fn is_usual(&self, io: bool) -> bool {
        let arg = |n: u32| Self::FIRST_ARG + 8 * n;
        let connect = self.connect_fd == arg(0)
            && self.connect_uservaddr == arg(1)
            && self.connect_addrlen == arg(2)
            && self.connect_ret == Self::RET
            && self.socket_ret == Self::RET
            && self.accept_ret == Self::RET;
        let io = !io || (self.io_fd == arg(0) && self.io_buf == arg(1) && self.io_ret == Self::RET);
        connect && io
    }
}

/// Offsets of the fields of the classic `oom:mark_victim` tracepoint, from its format file;
/// [`OomFields::MISSING`] for a field this kernel's version lacks.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OomFields {
    pub pid: u32,
    /// A `__data_loc char[]`: a u32 whose low half is the string's offset in the record.
    pub comm: u32,
    pub anon_rss: u32,
    pub total_vm: u32,
}

impl OomFields {
    pub const MISSING: u32 = u32::MAX;
}

/// The global `CONFIG` of the kernel programs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    pub offsets: KernelOffsets,
    pub syscalls: SyscallFields,
    pub oom: OomFields,
    /// A proxy that closes a connection sooner than this after starting to connect, or after
    /// sending its last request, abandoned it (its client left) rather than timed out.
    pub min_wait_ns: u64,
    /// Non-zero once user space filled the offsets in: the programs do nothing until then.
    pub ready: u32,
    /// How the proxy's requests are seen: [`Config::SENDS_UNSEEN`], [`Config::SENDS_TRACED`]
    /// or [`Config::SENDS_INFERRED`].
    pub sends: u32,
    /// At most this many failure events per second per route, cause and CPU reach user space
    /// (0: no limit); the counts are exact regardless.
    pub events_per_second: u32,
    /// A process (its tgid as the kernel numbers it) whose attempts are neither counted nor
    /// reported: the agent itself (0: none).
    pub ignored_tgid: u32,
    /// Non-zero when the probes on reads and writes are attached: connections' first bytes are
    /// watched (TLS failures are told).
    pub peek: u32,
    pub _pad: u32,
}

impl Config {
    /// The default for [`Config::min_wait_ns`]: 50 ms. Real connect and read timeouts are longer;
    /// clients that hang up and parallel connects that lose are usually faster.
    pub const DEFAULT_MIN_WAIT_NS: u64 = 50_000_000;

    /// [`Config::sends`]: requests are not seen (once connected, only resets are told apart).
    pub const SENDS_UNSEEN: u32 = 0;
    /// [`Config::sends`]: `tcp:tcp_sendmsg_locked` (Linux 6.16+) sees each send.
    pub const SENDS_TRACED: u32 = 1;
    /// [`Config::sends`]: sends are inferred from `write_seq` at `tcp:tcp_probe` and at the
    /// connection's end (older kernels; see `ConnTrack::on_write_seq`).
    pub const SENDS_INFERRED: u32 = 2;

    /// The default for [`Config::events_per_second`].
    pub const DEFAULT_EVENTS_PER_SECOND: u32 = 1000;

    /// How many leading bytes of a `struct sock` the programs read in one go; every
    /// `sock_common` field they use must lie within them.
    pub const SOCK_COMMON_BLOCK: u32 = 128;

    /// What the object file holds before user space overrides it: not ready.
    pub const UNSET: Config = Config {
        offsets: KernelOffsets {
            skc_family: 0,
            skc_dport: 0,
            skc_daddr: 0,
            skc_rcv_saddr: 0,
            skc_v6_daddr: 0,
            skc_v6_rcv_saddr: 0,
            skc_num: 0,
            inet_sport: 0,
            sk_protocol: 0,
            sk_err: 0,
            tcp_bytes_received: 0,
            tcp_bytes_acked: 0,
            tcp_write_seq: 0,
            tcp_clock_cache: KernelOffsets::MISSING,
            task_group_leader: 0,
            task_comm: 0,
            task_files: 0,
            files_fdt: 0,
            fdtable_fd: 0,
            fdtable_max_fds: 0,
            file_private_data: 0,
            socket_sk: 0,
            skc_net: 0,
            net_ns_inum: 0,
            task_flags: 0,
            task_exit_code: 0,
            task_tgid: 0,
            task_pid: 0,
            task_nsproxy: 0,
            nsproxy_net_ns: 0,
            socket_type: 0,
            sk_max_ack_backlog: 0,
            tcp_bytes_sent: 0,
            sk_socket: 0,
            socket_inode_ino: 0,
            task_real_parent: 0,
            _pad: 0,
        },
        syscalls: SyscallFields {
            connect_fd: 0,
            connect_uservaddr: 0,
            connect_addrlen: 0,
            connect_ret: 0,
            socket_ret: 0,
            accept_ret: 0,
            bind_umyaddr: 0,
            bind_addrlen: 0,
            io_fd: 0,
            io_buf: 0,
            io_ret: 0,
            usual: 0,
        },
        oom: OomFields {
            pid: OomFields::MISSING,
            comm: OomFields::MISSING,
            anon_rss: OomFields::MISSING,
            total_vm: OomFields::MISSING,
        },
        min_wait_ns: Config::DEFAULT_MIN_WAIT_NS,
        ready: 0,
        sends: Config::SENDS_UNSEEN,
        events_per_second: Config::DEFAULT_EVENTS_PER_SECOND,
        ignored_tgid: 0,
        peek: 0,
        _pad: 0,
    };
}

#[cfg(test)]
mod tests {
    use super::SyscallFields;

    fn usual() -> SyscallFields {
        SyscallFields {
            connect_fd: 16,
            connect_uservaddr: 24,
            connect_addrlen: 32,
            connect_ret: 16,
            socket_ret: 16,
            accept_ret: 16,
            bind_umyaddr: 24,
            bind_addrlen: 32,
            io_fd: 16,
            io_buf: 24,
            io_ret: 16,
            usual: 0,
        }
    }

    #[test]
    fn the_programs_load_syscall_fields_directly_only_where_the_layout_is_the_usual_one() {
        assert!(usual().is_usual(true));
        let shifted = SyscallFields {
            connect_addrlen: 40,
            ..usual()
        };
        assert!(!shifted.is_usual(true));
        let other_ret = SyscallFields {
            accept_ret: 24,
            ..usual()
        };
        assert!(!other_ret.is_usual(false));
        // The read and write probes' fields count only where they were found.
        let no_io = SyscallFields {
            io_fd: 0,
            io_buf: 0,
            io_ret: 0,
            ..usual()
        };
        assert!(no_io.is_usual(false));
        assert!(!no_io.is_usual(true));
    }
}
