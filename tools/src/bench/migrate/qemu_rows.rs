//! The QEMU rows: QEMU moves the RAM itself (no pager), between the lab's hosts.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::lab::{in_ns, DST_IP, QEMU_PORT};
use super::observe::{heartbeat_gap_ms, hot_passes, poll_for, wait_health};
use super::qmp::Qmp;
use super::report::Row;
use super::Ctx;
use crate::bench::guest::procs::{ChildGuard, ShmFile};
use crate::bench::guest::serial::SerialLog;

fn u(v: &Value, path: &str) -> Option<u64> {
    v.pointer(path).and_then(Value::as_u64)
}

pub fn run(ctx: &Ctx, mode: &str, run: u32) -> anyhow::Result<Row> {
    let postcopy = mode == "qemu-postcopy";
    let dir = ctx.work.join(format!("{mode}-{run}"));
    std::fs::create_dir_all(&dir)?;
    let src_mem = ShmFile::new(&format!("{mode}-{run}-src"));
    let dst_mem = ShmFile::new(&format!("{mode}-{run}-dst"));
    let (src_serial, dst_serial) = (dir.join("src.serial"), dir.join("dst.serial"));
    let (src_qmp, dst_qmp) = (dir.join("src.qmp"), dir.join("dst.qmp"));
    let (src_log, dst_log) = (dir.join("src.qemu.log"), dir.join("dst.qemu.log"));
    let qmp_arg = |p: &std::path::Path| format!("unix:{},server=on,wait=off", p.display());

    let mut src = ChildGuard::spawn(
        "qemu (source)",
        in_ns(&ctx.lab.ns("src"), "qemu-system-x86_64")
            .args(ctx.qemu_args(mode, &src_mem.0, &src_serial))
            .args(["-qmp", &qmp_arg(&src_qmp)]),
        &src_log,
    )?;
    let mut serial = SerialLog::new(src_serial);
    ctx.wait_lead(&mut serial, &mut src, &src_log)?;

    let mut dst = ChildGuard::spawn(
        "qemu (destination)",
        in_ns(&ctx.lab.ns("dst"), "qemu-system-x86_64")
            .args(ctx.qemu_args(mode, &dst_mem.0, &dst_serial))
            .args(["-qmp", &qmp_arg(&dst_qmp)])
            .args(["-incoming", &format!("tcp:{DST_IP}:{QEMU_PORT}")]),
        &dst_log,
    )?;
    let mut sq = Qmp::connect(&src_qmp, Duration::from_secs(10))?;
    let mut dq = Qmp::connect(&dst_qmp, Duration::from_secs(10))?;
    if postcopy {
        sq.set_capabilities(&[("postcopy-ram", true)])?;
        dq.set_capabilities(&[("postcopy-ram", true)])?;
    }
    if mode == "qemu-precopy-xbzrle" {
        sq.set_capabilities(&[("xbzrle", true)])?;
        dq.set_capabilities(&[("xbzrle", true)])?;
        let cache = pager::conventions::parse_size(&ctx.a.xbzrle_cache)
            .map_err(|e| anyhow::anyhow!("--xbzrle-cache: {e}"))?;
        sq.execute(
            "migrate-set-parameters",
            json!({ "xbzrle-cache-size": cache }),
        )?;
    }
    sq.execute(
        "migrate-set-parameters",
        // 10 GB/s: the shaped link is the limit.
        json!({ "max-bandwidth": 10_000_000_000u64, "downtime-limit": ctx.a.downtime_limit }),
    )?;
    let mut dst_serial_log = SerialLog::new(dst_serial);
    let link0 = ctx.lab.link_bytes();
    let t0 = Instant::now();
    sq.execute(
        "migrate",
        json!({ "uri": format!("tcp:{DST_IP}:{QEMU_PORT}") }),
    )?;
    let cap = Duration::from_secs(ctx.a.qemu_cap);
    let mut switched = false;
    let mut cancelled = false;
    // The last figures of a migration still running (a cancelled one reports none).
    let mut last_active = Value::Null;
    let info = loop {
        let info = sq.execute("query-migrate", Value::Null)?;
        let status = info["status"].as_str().unwrap_or("").to_string();
        if matches!(status.as_str(), "completed" | "failed" | "cancelled") {
            break info;
        }
        if info.get("ram").is_some() {
            last_active = info.clone();
        }
        let elapsed = t0.elapsed();
        if postcopy
            && !switched
            && elapsed.as_secs_f64() >= ctx.a.postcopy_after
            && status == "active"
        {
            sq.execute("migrate-start-postcopy", Value::Null)?;
            switched = true;
        }
        if !postcopy && !cancelled && elapsed > cap {
            eprintln!("{mode}: not converged after {cap:?}, cancelling");
            sq.execute("migrate_cancel", Value::Null)?;
            cancelled = true;
        }
        if elapsed > cap + Duration::from_secs(if postcopy { 120 } else { 30 }) {
            anyhow::bail!("QEMU's migration neither ended nor cancelled: {info}");
        }
        poll_for(
            &mut [&mut serial, &mut dst_serial_log],
            Duration::from_millis(100),
        );
    };
    let t_end = Instant::now();
    let link_bytes = ctx.lab.link_bytes().saturating_sub(link0);
    let status = info["status"].as_str().unwrap_or("?").to_string();
    let completed = status == "completed";
    let total_ms = u(&info, "/total-time").or(Some(t_end.duration_since(t0).as_millis() as u64));
    let figures = if info.get("ram").is_some() {
        &info
    } else {
        &last_active
    };
    let limit = Duration::from_secs(ctx.guest_duration(mode) + 90);
    let health = if completed {
        // The source stays paused after a completed migration: quit it (its RAM goes).
        let _ = sq.execute("quit", Value::Null);
        let _ = src.wait_exit(Duration::from_secs(20));
        let mut alive = || dst.check_alive(&dst_log).is_ok();
        wait_health(
            &mut dst_serial_log,
            &mut [&mut serial],
            "destination",
            &mut alive,
            limit,
        )
    } else {
        drop(dq);
        drop(dst);
        let mut alive = || src.check_alive(&src_log).is_ok();
        wait_health(&mut serial, &mut [], "source", &mut alive, limit)
    };
    let hot = hot_passes(&serial, completed.then_some(&dst_serial_log), t0, t_end);
    let guest_gap_ms = heartbeat_gap_ms(&serial, completed.then_some(&dst_serial_log), t0, t_end);
    let row_status = match (completed, cancelled) {
        (true, _) => "completed".to_string(),
        (false, true) => format!("did not converge ({} s)", ctx.a.qemu_cap),
        _ => format!(
            "{status}: {}",
            info["error-desc"].as_str().unwrap_or("no error-desc")
        ),
    };
    Ok(Row {
        mode: mode.to_string(),
        run,
        status: row_status,
        completed,
        total_ms,
        qemu_downtime_ms: u(&info, "/downtime"),
        pagewise_downtime_ms: None,
        guest_gap_ms,
        ram_transferred: u(figures, "/ram/transferred"),
        link_bytes,
        demand_faults: postcopy
            .then(|| u(&info, "/ram/postcopy-requests"))
            .flatten(),
        fault_p50_us: None,
        fault_p99_us: None,
        // The source QEMU quits when the migration completes: its RAM goes then.
        source_released_ms: if completed { total_ms } else { None },
        resent_bytes: None,
        pages_sent: u(figures, "/ram/normal"),
        hot,
        health,
        raw: if completed {
            info
        } else {
            serde_json::json!({ "end": info, "last_active": last_active })
        },
    })
}
