//! Listeners and the processes behind them: a listener opening or closing (with the task that
//! closed it: a dying process closes its own listeners, so its exit code and flags say why),
//! a listener owner's exit, and the OOM killer's victims. Rare records, kept apart from the
//! failures in the `LIFECYCLE` ring buffer so that failure storms cannot crowd them out.

use aya_ebpf::{
    EbpfContext as _,
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_kernel_str_bytes},
    macros::{raw_tracepoint, tracepoint},
    programs::{RawTracePointContext, TracePointContext},
};
use tracer_common::{
    Endpoint, ExitEvent, ListenerEvent, OomEvent, OomFields, Program, RecordKind, Stat,
    net::{AF_INET, AF_INET6, IPPROTO_TCP},
};

use crate::{
    counting::{note_error, stat},
    kernel::{
        current_netns, current_task, fill_current_proxy, local_port, netns_of, now, read_field,
        read_kernel,
    },
    maps::{LIFECYCLE, LISTENER_OWNERS},
};

#[raw_tracepoint(tracepoint = "sched_process_exit")]
pub fn sched_process_exit(ctx: RawTracePointContext) -> i32 {
    let task: *const u8 = ctx.arg(0);
    note_error(Program::SchedProcessExit, process_exited(task));
    0
}

#[tracepoint(category = "oom", name = "mark_victim")]
pub fn mark_victim(ctx: TracePointContext) -> u32 {
    note_error(Program::MarkVictim, oom_victim_chosen(&ctx));
    0
}

/// CLOSE→LISTEN (`opened`) or LISTEN→CLOSE, from `inet_sock_set_state`.
#[inline(never)]
pub fn listener_changed(sk: *const u8, opened: bool) -> Result<(), i64> {
    let protocol = read_kernel::<u16>(sk, config!(offsets.sk_protocol))?;
    if protocol != IPPROTO_TCP {
        return Ok(());
    }
    let family = read_kernel::<u16>(sk, config!(offsets.skc_family))?;
    // Going CLOSE→LISTEN the bound port is in skc_num; going to CLOSE only inet_sport keeps it.
    let port = if opened {
        read_kernel::<u16>(sk, config!(offsets.skc_num))?
    } else {
        local_port(sk)
    };
    let local = match family {
        AF_INET => Endpoint::v4(read_kernel(sk, config!(offsets.skc_rcv_saddr))?, port),
        AF_INET6 => Endpoint::v6(read_kernel(sk, config!(offsets.skc_v6_rcv_saddr))?, port),
        _ => return Ok(()),
    };
    let task = current_task();
    if opened {
        let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
        let _ = LISTENER_OWNERS.insert(&tgid, &1, 0);
    }
    let Some(mut entry) = LIFECYCLE.reserve::<ListenerEvent>(0) else {
        stat(Stat::LifecycleLost);
        return Ok(());
    };
    // SAFETY: the reserved record, ours until it is submitted; every field is written below.
    let event = unsafe { &mut *entry.as_mut_ptr() };
    event.kind = RecordKind::Listener as u32;
    event.opened = u32::from(opened);
    event.time_ns = now();
    event.local = local;
    fill_current_proxy(&mut event.task, netns_of(sk));
    event.task_flags = read_kernel::<u32>(task, config!(offsets.task_flags)).unwrap_or(0);
    event.exit_code = read_kernel::<i32>(task, config!(offsets.task_exit_code)).unwrap_or(0);
    // Set by listen() before the socket goes LISTEN.
    event.max_backlog = read_kernel::<u32>(sk, config!(offsets.sk_max_ack_backlog)).unwrap_or(0);
    event._pad = 0;
    entry.submit(0);
    Ok(())
}

fn process_exited(task: *const u8) -> Result<(), i64> {
    if config!(ready) == 0 {
        return Ok(());
    }
    let tgid = read_kernel::<u32>(task, config!(offsets.task_tgid))?;
    if LISTENER_OWNERS.get_ptr(&tgid).is_none() {
        return Ok(());
    }
    // The process is gone when its main thread exits.
    if read_kernel::<u32>(task, config!(offsets.task_pid))? != tgid {
        return Ok(());
    }
    let _ = LISTENER_OWNERS.remove(&tgid);
    let Some(mut entry) = LIFECYCLE.reserve::<ExitEvent>(0) else {
        stat(Stat::LifecycleLost);
        return Ok(());
    };
    // SAFETY: the reserved record, ours until it is submitted; every field is written below.
    let event = unsafe { &mut *entry.as_mut_ptr() };
    event.kind = RecordKind::Exit as u32;
    event.exit_code = read_kernel::<i32>(task, config!(offsets.task_exit_code)).unwrap_or(0);
    event.time_ns = now();
    // This tracepoint runs in the exiting task itself.
    fill_current_proxy(&mut event.task, current_netns());
    event.task_flags = read_kernel::<u32>(task, config!(offsets.task_flags)).unwrap_or(0);
    event._pad = 0;
    entry.submit(0);
    Ok(())
}

fn oom_victim_chosen(ctx: &TracePointContext) -> Result<(), i64> {
    if config!(ready) == 0 {
        return Ok(());
    }
    let optional_u64 = |offset: u32| {
        if offset == OomFields::MISSING {
            0
        } else {
            read_field::<u64>(ctx, offset).unwrap_or(0)
        }
    };
    let pid: i32 = read_field(ctx, config!(oom.pid))?;
    let Some(mut entry) = LIFECYCLE.reserve::<OomEvent>(0) else {
        stat(Stat::LifecycleLost);
        return Ok(());
    };
    // SAFETY: the reserved record, ours until it is submitted; every field is written below.
    let event = unsafe { &mut *entry.as_mut_ptr() };
    event.kind = RecordKind::Oom as u32;
    event.pid = pid as u32;
    event.time_ns = now();
    event.anon_rss_kb = optional_u64(config!(oom.anon_rss));
    event.total_vm_kb = optional_u64(config!(oom.total_vm));
    event.comm = [0; 16];
    let comm_field = config!(oom.comm);
    if comm_field != OomFields::MISSING {
        // A __data_loc field: the string's offset in the record is the low 16 bits.
        if let Ok(location) = read_field::<u32>(ctx, comm_field) {
            let at = (ctx.as_ptr() as *const u8).wrapping_add((location & 0xffff) as usize);
            // SAFETY: bpf_probe_read_kernel_str copes with any address.
            let _ = unsafe { bpf_probe_read_kernel_str_bytes(at, &mut event.comm) };
        }
    }
    entry.submit(0);
    Ok(())
}
