//! A migration's status as the daemons report it, read and waited for.

use std::path::Path;
use std::time::Duration;

/// `vm`'s migration status from the daemon whose socket is `socket` (Null if it has none).
pub fn migration_status(socket: &Path, vm: &str) -> serde_json::Value {
    let Ok(mut client) =
        pager::server::ControlClient::connect(&pager::conventions::default_stats_socket(socket))
    else {
        return serde_json::Value::Null;
    };
    match client.call(&pager::server::protocol::Request::MigrateStatus { vm: vm.into() }) {
        Ok(pager::server::protocol::Response::Migration(v)) => v,
        _ => serde_json::Value::Null,
    }
}

/// Poll VM vm1's migration status on `socket` until `done` says so (its last status), or
/// panic after `limit` naming `what` (with `logs`).
pub fn wait_status(
    socket: &Path,
    what: &str,
    limit: Duration,
    logs: impl Fn() -> String,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let start = std::time::Instant::now();
    loop {
        let s = migration_status(socket, "vm1");
        if done(&s) {
            eprintln!(
                "{what} after {:.1}s: status {} link_cuts {} recoveries {}",
                start.elapsed().as_secs_f64(),
                s["status"],
                s["link_cuts"],
                s["recoveries"]
            );
            return s;
        }
        assert!(
            start.elapsed() < limit,
            "not {what} within {limit:?}: {s}\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
