//! The human table of `pagewise stats`: one block per VM from the `stats` command's JSON.

use pager::evict::control::render_eviction;
use serde_json::Value;

/// One line per migration to or from this host (running ones and the last per VM).
fn render_migrations(stats: &Value) -> String {
    let Some(list) = stats.get("migrations").and_then(Value::as_array) else {
        return String::new();
    };
    let mut out = String::new();
    for m in list {
        let t = |k: &str| m.get(k).and_then(Value::as_str).unwrap_or("?").to_string();
        let n = |a: &str, b: &str| {
            m.get(a)
                .and_then(|v| v.get(b))
                .and_then(Value::as_u64)
                .unwrap_or(0)
        };
        out.push_str(&format!(
            "migration of {} ({} {}, peer {}): {}  {} ms  sent {} MiB  remaining {} MiB of {} MiB\n",
            t("vm"),
            t("role"),
            t("mode"),
            t("peer"),
            t("status"),
            m.get("total-time").and_then(Value::as_u64).unwrap_or(0),
            n("ram", "transferred") >> 20,
            n("ram", "remaining") >> 20,
            n("ram", "total") >> 20,
        ));
        if let Some(e) = m.get("error").and_then(Value::as_str) {
            out.push_str(&format!("  error: {e}\n"));
        }
    }
    out
}

/// A human table of the `stats` command's result.
pub fn render_table(stats: &Value) -> String {
    let mut out = String::new();
    let vms = stats
        .get("vms")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let migrations = render_migrations(stats);
    if vms.is_empty() {
        return format!("no VMs attached\n{migrations}");
    }
    for vm in vms {
        let s = |k: &str| {
            vm.get(k)
                .map(|v| v.to_string().trim_matches('"').to_string())
                .unwrap_or_default()
        };
        out.push_str(&format!(
            "VM {}  pid {}  {}  source {}  prefetch {}\n",
            s("vm"),
            s("pid"),
            s("flavour"),
            s("source"),
            s("prefetch")
        ));
        out.push_str(&format!(
            "  pages {} x {} B   attached {} s   dirty {}\n",
            s("pages"),
            s("page_size"),
            s("attached_secs"),
            s("dirty_pages")
        ));
        if let Some(states) = vm.get("states").and_then(Value::as_object) {
            let line: Vec<String> = states.iter().map(|(k, v)| format!("{k} {v}")).collect();
            out.push_str(&format!("  states: {}\n", line.join(", ")));
        }
        if let Some(m) = vm.get("metrics").and_then(Value::as_object) {
            for (k, v) in m {
                if k != "fault_latency" {
                    out.push_str(&format!("  {k:<18} {v}\n"));
                }
            }
        }
        if let Some(e) = vm.get("eviction") {
            out.push_str(&render_eviction(e));
        }
        out.push_str(&format!(
            "  fault latency: p50 <= {} us, p99 <= {} us, mean {} us\n",
            s("fault_latency_p50_us"),
            s("fault_latency_p99_us"),
            vm.get("fault_latency_mean_us")
                .and_then(Value::as_f64)
                .map_or("-".into(), |v| format!("{v:.1}"))
        ));
    }
    out.push_str(&migrations);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use pager::metrics::VmMetrics;

    #[test]
    fn table_shows_counters_states_and_quantiles() {
        use pager::attach::protocol::GuestRegionUffdMapping;
        let layout = pager::vm::GuestLayout::from_mappings(&[GuestRegionUffdMapping {
            base_host_virt_addr: 0x7000_0000,
            size: 8 * 4096,
            offset: 0,
            page_size: 4096,
            page_size_kib: 0,
        }])
        .unwrap();
        let uffd = pager::uffd::Uffd::new(Default::default()).unwrap();
        let vm = pager::vm::Vm::new("vm7".into(), uffd, layout, None, Default::default());
        VmMetrics::add(&vm.metrics.faults, 5);
        vm.metrics.fault_latency.record_ns(20_000);
        vm.states.set(3, pager::page_state::PageState::Present);
        let stats = serde_json::json!({
            "vms": [pager::server::control::vm_stats(&vm, "firecracker", "none")]
        });
        let table = render_table(&stats);
        assert!(table.contains("VM vm7"), "{table}");
        assert!(table.contains("faults             5"), "{table}");
        assert!(table.contains("present 1"), "{table}");
        assert!(table.contains("p50 <= 32 us"), "{table}");
        assert_eq!(
            render_table(&serde_json::json!({"vms": []})),
            "no VMs attached\n"
        );
        let with_migration = serde_json::json!({"vms": [], "migrations": [{
            "vm": "vm1", "role": "destination", "mode": "agile", "peer": "10.0.0.1:5000",
            "status": "postcopy-active", "total-time": 1200,
            "ram": {"transferred": 3 << 20, "remaining": 1 << 20, "total": 256 << 20}}]});
        let table = render_table(&with_migration);
        assert!(
            table.contains("migration of vm1 (destination agile, peer 10.0.0.1:5000): postcopy-active  1200 ms  sent 3 MiB  remaining 1 MiB of 256 MiB"),
            "{table}"
        );
    }
}
