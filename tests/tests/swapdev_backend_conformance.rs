//! The backend conformance suite (`common/backend_conformance.rs`) on every backend: the
//! in-memory store, io_uring files (O_DIRECT on disk, buffered on tmpfs), the I/O-thread
//! adapter, and qemu-nbd over a Unix socket and TCP.
//!
//! Run: `cargo test -p pagewise-tests --test swapdev_backend_conformance`

#[path = "common/backend_conformance.rs"]
mod backend_conformance;
#[path = "common/nbd_server.rs"]
mod nbd_server;

use backend_conformance::{conformance, STORE_BYTES};
use nbd_server::{require_qemu_nbd, NbdServer};
use swapdev::backend::file::{DirectMode, FileBackend, OpenOptions};
use swapdev::backend::mem::{MemBackend, MemStore};
use swapdev::backend::spec::{open_backend, SpecOptions};
use swapdev::backend::threaded::Threaded;
use swapdev::backend::{Backend, BackendError, IoCompletion};

fn file_in(dir: &str, direct: DirectMode) {
    let tmp = tempfile::tempdir_in(dir).unwrap();
    let path = tmp.path().join("store");
    std::fs::File::create(&path).unwrap();
    conformance(&|| {
        let opts = OpenOptions {
            create: false,
            direct,
            ..OpenOptions::default()
        };
        Box::new(FileBackend::open(&path, opts).unwrap())
    });
}

#[test]
fn memory_store() {
    let store = MemStore::new();
    conformance(&|| Box::new(MemBackend::new(store.clone())));
}

#[test]
fn file_on_disk_o_direct() {
    file_in("/var/tmp", DirectMode::Always);
}

#[test]
fn file_on_tmpfs_buffered() {
    file_in("/dev/shm", DirectMode::Never);
}

#[test]
fn memory_store_through_the_io_thread() {
    let store = MemStore::new();
    // The adapter cannot grow: size the store first.
    let mut b = MemBackend::new(store.clone());
    b.grow(STORE_BYTES).unwrap();
    conformance(&|| Box::new(Threaded::spawn(Box::new(MemBackend::new(store.clone()))).unwrap()));
}

fn export(dir: &tempfile::TempDir) -> std::path::PathBuf {
    let path = dir.path().join("export.img");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(STORE_BYTES)
        .unwrap();
    path
}

#[test]
fn qemu_nbd_unix() {
    require_qemu_nbd();
    let dir = tempfile::tempdir().unwrap();
    let file = export(&dir);
    let server = NbdServer::unix(&file, &dir.path().join("nbd.sock"), "swap", &[]);
    let spec = server.spec();
    conformance(&|| open_backend(&spec, &SpecOptions::default()).unwrap());
}

#[test]
fn qemu_nbd_tcp() {
    require_qemu_nbd();
    let dir = tempfile::tempdir().unwrap();
    let file = export(&dir);
    let server = NbdServer::tcp(&file, "swap", &[]);
    let spec = server.spec();
    assert!(spec.starts_with("nbd://127.0.0.1:"), "{spec}");
    conformance(&|| open_backend(&spec, &SpecOptions::default()).unwrap());
}

#[test]
fn qemu_nbd_through_the_io_thread() {
    require_qemu_nbd();
    let dir = tempfile::tempdir().unwrap();
    let file = export(&dir);
    let server = NbdServer::unix(&file, &dir.path().join("nbd.sock"), "swap", &[]);
    let spec = server.spec();
    conformance(&|| {
        Box::new(Threaded::spawn(open_backend(&spec, &SpecOptions::default()).unwrap()).unwrap())
    });
}

/// Negative control: a backend that zero-fills reads past the end of its store (the
/// mistake that would hide a truncated device) must fail the suite.
struct ZeroFillPastEnd(MemBackend);

impl Backend for ZeroFillPastEnd {
    fn submit(&mut self, req: swapdev::backend::IoRequest) -> Result<(), BackendError> {
        self.0.submit(req)
    }

    fn complete(&mut self, out: &mut Vec<IoCompletion>, min: usize) -> Result<usize, BackendError> {
        let n = self.0.complete(out, min)?;
        for c in out.iter_mut() {
            if let Err(BackendError::Short {
                op: "read", len, ..
            }) = c.result
            {
                c.result = Ok(Some(swapdev::AlignedBuf::new(len)));
            }
        }
        Ok(n)
    }

    fn in_flight(&self) -> usize {
        self.0.in_flight()
    }

    fn size(&self) -> Result<u64, BackendError> {
        self.0.size()
    }

    fn grow(&mut self, len: u64) -> Result<(), BackendError> {
        self.0.grow(len)
    }

    fn alignment(&self) -> usize {
        self.0.alignment()
    }

    fn describe(&self) -> String {
        "zero-filling memory store".into()
    }
}

#[test]
#[should_panic(expected = "a read across the end of the store")]
fn a_backend_zero_filling_past_the_end_fails_the_suite() {
    let store = MemStore::new();
    conformance(&|| Box::new(ZeroFillPastEnd(MemBackend::new(store.clone()))));
}
