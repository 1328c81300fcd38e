//! `pagewise bench swapdev --backend nfs://... --backend nbd+unix://...`: the NFS and NBD
//! rows next to the local file's, against a real NFS-Ganesha and a real nbdkit (a short run:
//! this checks the rows exist and are sane, not the numbers).
//!
//! Run: `cargo build --workspace --release && cargo test --release -p pagewise-tests --test
//! nfs_bench`

#[path = "common/nbdkit_server.rs"]
mod nbdkit_server;
#[path = "common/nfs_server.rs"]
mod nfs_server;

use std::process::Command;

use nbdkit_server::{NbdkitServer, Plugin, Setup};
use nfs_server::NfsServer;
use pagewise_tools::daemon;

#[test]
fn bench_swapdev_has_nfs_and_nbd_rows() {
    let dir = tempfile::tempdir().unwrap();
    let nfs = NfsServer::start();
    let nbd = NbdkitServer::unix(
        &Setup::new(Plugin::Memory(256 << 20), "bench"),
        &dir.path().join("nbdkit.sock"),
        &dir.path().join("nbdkit.log"),
    );
    let pagewise = daemon::workspace_binary("pagewise").unwrap_or_else(|e| panic!("{e:#}"));
    let out = Command::new(pagewise)
        .args([
            "bench", "swapdev", "--pages", "2048", "--secs", "0.3", "--json",
        ])
        .arg("--dir")
        .arg(dir.path())
        .args([
            "--backend",
            &nfs.spec("bench.swap"),
            "--backend",
            &nbd.spec(),
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bench failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_str(&stdout).expect("bench JSON");
    let rows = r["io"].as_array().unwrap();
    assert_eq!(rows.len(), 6, "{r}");
    for (i, prefix) in ["file", "nfs file", "nbd export 'bench'"]
        .iter()
        .enumerate()
    {
        for (j, op) in ["write", "read"].iter().enumerate() {
            let row = &rows[i * 2 + j];
            assert!(
                row["backend"].as_str().unwrap().starts_with(prefix),
                "{row}"
            );
            assert_eq!(row["op"], *op, "{row}");
            assert_eq!(row["qd"], 32, "{row}");
            for k in ["raw_iops", "swapdev_iops"] {
                assert!(row[k].as_f64().unwrap() > 10.0, "{row}");
            }
        }
    }
}
