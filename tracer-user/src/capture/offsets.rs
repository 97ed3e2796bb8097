//! What the programs must know about this kernel: struct offsets from its BTF, and the field
//! layout of the classic tracepoints they read (from tracefs' format files).

use tracer_common::{Config, KernelOffsets, OomFields, SyscallFields};

use super::{
    btf::{Btf, BtfError},
    tracefs::{Tracefs, TracefsError},
};

/// The offsets the programs need, from the running kernel's BTF.
pub fn kernel_offsets(btf: &Btf) -> Result<KernelOffsets, BtfError> {
    let sock = |member: &str| btf.member_offset("sock", member);
    let offsets = KernelOffsets {
        skc_family: sock("__sk_common.skc_family")?,
        skc_dport: sock("__sk_common.skc_dport")?,
        skc_num: sock("__sk_common.skc_num")?,

        skc_daddr: sock("__sk_common.skc_daddr")?,
        skc_rcv_saddr: sock("__sk_common.skc_rcv_saddr")?,
        skc_v6_daddr: sock("__sk_common.skc_v6_daddr")?,
        skc_v6_rcv_saddr: sock("__sk_common.skc_v6_rcv_saddr")?,
        inet_sport: btf.member_offset("inet_sock", "inet_sport")?,
        sk_protocol: sock("sk_protocol")?,
        sk_err: sock("sk_err")?,
        tcp_bytes_received: btf.member_offset("tcp_sock", "bytes_received")?,
        tcp_bytes_acked: btf.member_offset("tcp_sock", "bytes_acked")?,
        tcp_write_seq: btf.member_offset("tcp_sock", "write_seq")?,
        tcp_clock_cache: btf
            .member_offset("tcp_sock", "tcp_clock_cache")
            .unwrap_or(KernelOffsets::MISSING),
        task_group_leader: btf.member_offset("task_struct", "group_leader")?,
        task_comm: btf.member_offset("task_struct", "comm")?,
        task_files: btf.member_offset("task_struct", "files")?,
        files_fdt: btf.member_offset("files_struct", "fdt")?,
        fdtable_fd: btf.member_offset("fdtable", "fd")?,
        fdtable_max_fds: btf.member_offset("fdtable", "max_fds")?,
        file_private_data: btf.member_offset("file", "private_data")?,
        socket_sk: btf.member_offset("socket", "sk")?,
        skc_net: sock("__sk_common.skc_net.net")?,
        net_ns_inum: btf.member_offset("net", "ns.inum")?,
        task_flags: btf.member_offset("task_struct", "flags")?,
        task_exit_code: btf.member_offset("task_struct", "exit_code")?,
        task_tgid: btf.member_offset("task_struct", "tgid")?,
        task_pid: btf.member_offset("task_struct", "pid")?,
        task_nsproxy: btf.member_offset("task_struct", "nsproxy")?,
        nsproxy_net_ns: btf.member_offset("nsproxy", "net_ns")?,
        socket_type: btf.member_offset("socket", "type")?,
        sk_max_ack_backlog: sock("sk_max_ack_backlog")?,
        tcp_bytes_sent: btf.member_offset("tcp_sock", "bytes_sent")?,
        sk_socket: sock("sk_socket")?,
        socket_inode_ino: btf.member_offset("socket_alloc", "vfs_inode")?
            - btf.member_offset("socket_alloc", "socket")?
            + btf.member_offset("inode", "i_ino")?,
        task_real_parent: btf.member_offset("task_struct", "real_parent")?,
        _pad: 0,
    };
    // The programs read these from one block of Config::SOCK_COMMON_BLOCK bytes.
    let in_block = [
        ("skc_family", offsets.skc_family, 2),
        ("skc_dport", offsets.skc_dport, 2),
        ("skc_daddr", offsets.skc_daddr, 4),
        ("skc_rcv_saddr", offsets.skc_rcv_saddr, 4),
        ("skc_v6_daddr", offsets.skc_v6_daddr, 16),
        ("skc_v6_rcv_saddr", offsets.skc_v6_rcv_saddr, 16),
        ("skc_net", offsets.skc_net, 8),
    ];
    for (member, offset, size) in in_block {
        if offset + size > Config::SOCK_COMMON_BLOCK {
            return Err(BtfError::OutsideBlock {
                member,
                offset,
                block: Config::SOCK_COMMON_BLOCK,
            });
        }
    }
    Ok(offsets)
}

/// The `oom:mark_victim` tracepoint's field offsets; only `pid` is needed, the rest is evidence.
pub fn oom_fields(tracefs: &Tracefs) -> Result<OomFields, TracefsError> {
    let format = tracefs.format("oom", "mark_victim")?;
    let optional =
        |field: &str, size: u32| format.offset(field, size).unwrap_or(OomFields::MISSING);
    Ok(OomFields {
        pid: format.offset("pid", 4)?,
        comm: optional("comm", 4),
        anon_rss: optional("anon_rss", 8),
        total_vm: optional("total_vm", 8),
    })
}

/// Where the read and write tracepoints (`PEEK_PROBES`) keep their `fd`, their buffer argument
/// and their `ret`: `(fd, buffer, ret)`. The programs read them at one offset for all, so every
/// format must agree (they do on every kernel: the arguments are 8-byte slots in order), and
/// the flat ones keep their size right after the buffer.
pub fn io_fields(tracefs: &Tracefs) -> Result<(u32, u32, u32), TracefsError> {
    // (tracepoint, buffer argument, size argument right after it, if the buffer is flat)
    const ENTERS: [(&str, &str, Option<&str>); 8] = [
        ("sys_enter_write", "buf", Some("count")),
        ("sys_enter_read", "buf", Some("count")),
        ("sys_enter_sendto", "buff", Some("len")),
        ("sys_enter_recvfrom", "ubuf", Some("size")),
        ("sys_enter_writev", "vec", None),
        ("sys_enter_readv", "vec", None),
        ("sys_enter_sendmsg", "msg", None),
        ("sys_enter_recvmsg", "msg", None),
    ];
    const EXITS: [&str; 4] = [
        "sys_exit_read",
        "sys_exit_recvfrom",
        "sys_exit_readv",
        "sys_exit_recvmsg",
    ];
    let mut layout = None;
    for (name, buffer, size) in ENTERS {
        let format = tracefs.format("syscalls", name)?;
        let fd = format.offset("fd", 8)?;
        let buf = format.offset(buffer, 8)?;
        let size_ok = match size {
            Some(size) => format.offset(size, 8)? == buf + 8,
            None => true,
        };
        let this = (fd, buf);
        if !size_ok || *layout.get_or_insert(this) != this {
            return Err(TracefsError::NoField {
                category: "syscalls".to_string(),
                name: name.to_string(),
                field: "fd and buffer at the offsets the other reads and writes use".to_string(),
            });
        }
    }
    let (fd, buf) = layout.unwrap_or_default();
    if tracefs
        .format("syscalls", "sys_enter_close")?
        .offset("fd", 8)?
        != fd
    {
        return Err(TracefsError::NoField {
            category: "syscalls".to_string(),
            name: "sys_enter_close".to_string(),
            field: "fd at the offset the reads and writes use".to_string(),
        });
    }
    let mut ret_at = None;
    for name in EXITS {
        let ret = tracefs.format("syscalls", name)?.offset("ret", 8)?;
        if *ret_at.get_or_insert(ret) != ret {
            return Err(TracefsError::NoField {
                category: "syscalls".to_string(),
                name: name.to_string(),
                field: "ret at the offset the other exits use".to_string(),
            });
        }
    }
    Ok((fd, buf, ret_at.unwrap_or_default()))
}

/// The connect() tracepoints' field offsets, from their format files.
pub fn syscall_fields(tracefs: &Tracefs) -> Result<SyscallFields, TracefsError> {
    let enter = tracefs.format("syscalls", "sys_enter_connect")?;
    let exit = tracefs.format("syscalls", "sys_exit_connect")?;
    let socket = tracefs.format("syscalls", "sys_exit_socket")?;
    let accept = tracefs.format("syscalls", "sys_exit_accept4")?;
    let bind = tracefs.format("syscalls", "sys_enter_bind")?;
    Ok(SyscallFields {
        connect_fd: enter.offset("fd", 8)?,
        connect_uservaddr: enter.offset("uservaddr", 8)?,
        connect_addrlen: enter.offset("addrlen", 8)?,
        connect_ret: exit.offset("ret", 8)?,
        socket_ret: socket.offset("ret", 8)?,
        accept_ret: accept.offset("ret", 8)?,
        bind_umyaddr: bind.offset("umyaddr", 8)?,
        bind_addrlen: bind.offset("addrlen", 8)?,
        ..SyscallFields::default()
    })
}
