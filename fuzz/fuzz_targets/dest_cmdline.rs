//! The destination's rewrite of the source's QEMU command line (it arrives in a peer's
//! Setup): an error, or a command line whose every rewritten path lies in the destination's
//! directory.
#![no_main]

use std::path::Path;

use agent::qemu::dest::{qmp_socket, rewrite};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut parts = text.split('\0');
    let vm = parts.next().unwrap_or("");
    let argv: Vec<String> = parts.map(str::to_string).collect();
    let _ = qmp_socket(&argv);
    let dir = Path::new("/dev/shm/pagewise-fuzz");
    if let Ok(d) = rewrite(&argv, vm, dir) {
        assert!(d.mem_path.starts_with(dir), "{:?}", d.mem_path);
        assert!(d.mem_path.parent() == Some(dir), "{:?}", d.mem_path);
        if let Some(q) = &d.qmp {
            assert!(q.parent() == Some(dir), "{q:?}");
        }
        for (_, to) in &d.dest_paths {
            assert!(Path::new(to).parent() == Some(dir), "{to:?}");
        }
        assert_eq!(d.argv.last().map(String::as_str), Some("defer"));
    }
});
