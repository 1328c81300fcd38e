//! Handshake regions a VMM gets wrong are refused by the daemon with a reason naming the
//! region: arithmetic that overflows u64 (offset + size, address + size) and regions that
//! end past the swap device. The daemon keeps serving afterwards.

mod pager_support;

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use pager::attach::protocol::{self, AttachRequest, GuestRegionUffdMapping};
use pager_support::{verified, Lab};

const PAGES: u64 = 256;
const TOP: u64 = u64::MAX - 0xfff;

fn region(addr: u64, pages: u64, offset: u64) -> GuestRegionUffdMapping {
    GuestRegionUffdMapping {
        base_host_virt_addr: addr,
        size: (pages * 4096) as usize,
        offset,
        page_size: 4096,
        page_size_kib: 4096,
    }
}

/// Send a pagewise handshake with a real (unregistered) userfaultfd; return the reply.
fn attach(lab: &Lab, regions: Vec<GuestRegionUffdMapping>) -> protocol::AttachReply {
    let uffd = pager::uffd::Uffd::new(Default::default()).expect("userfaultfd");
    let request = AttachRequest {
        vm: "m".into(),
        regions,
        memory_file: false,
        uffd_features: 0,
        modes: vec!["missing".into()],
        reattach: false,
        served_by: None,
    };
    let s = UnixStream::connect(lab.socket("m")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    protocol::send_request(&s, &request, uffd.as_raw_fd(), None).unwrap();
    protocol::recv_reply(&s).expect("a reply")
}

#[test]
fn regions_that_overflow_or_do_not_fit_the_device_are_refused_naming_the_region() {
    let lab = Lab::new();
    let dev = lab.device("m", PAGES);
    let mut d = lab.serve(&[("m", &dev)], "none");
    let first = region(0x7f00_0000_0000, 16, 0);
    let cases = [
        (
            "offset + size overflows",
            vec![first, region(0x7f10_0000_0000, 2, TOP)],
            "region 1",
        ),
        (
            "address + size overflows",
            vec![first, region(TOP, 2, 16 * 4096)],
            "region 1",
        ),
        (
            "a region past the end of the swap device",
            vec![first, region(0x7f10_0000_0000, 16, PAGES * 4096)],
            "region 1",
        ),
    ];
    for (what, regions, named) in cases {
        let reply = attach(&lab, regions);
        assert!(!reply.ok, "{what}: accepted: {reply:?}");
        let reason = reply.error.unwrap_or_default();
        assert!(
            reason.contains(named),
            "{what}: the reason does not name {named}: {reason}"
        );
        assert!(d.alive(), "{what} killed the daemon: {}", d.log_text());
    }
    // Still serving a correct VM.
    let out = lab.memhog("m", PAGES, &["--handshake", "pagewise"]);
    verified(&out, &d);
}
