//! The daemon's control protocol (newline-delimited JSON): any line to `Request::decode`
//! and `Response::decode`. An accepted request encodes to one line (`{"v":1,...}` and a
//! newline, none inside) that decodes to the same request.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pager::server::protocol::{Request, Response};

fuzz_target!(|line: &[u8]| {
    if let Ok(request) = Request::decode(line) {
        let again = request.encode();
        assert!(again.starts_with("{\"v\":1,\"op\":"), "{again}");
        assert!(again.ends_with('\n') && !again[..again.len() - 1].contains('\n'));
        let back = Request::decode(again.as_bytes()).expect("an encoded request decodes");
        assert_eq!(back, request, "{again}");
    }
    if let Ok(response) = Response::decode(line) {
        let _ = response.kind();
    }
});
