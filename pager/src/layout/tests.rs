use super::*;

const TOP: u64 = u64::MAX - 0xfff;

fn m(addr: u64, size: usize, offset: u64) -> GuestRegionUffdMapping {
    GuestRegionUffdMapping {
        base_host_virt_addr: addr,
        size,
        offset,
        page_size: 4096,
        page_size_kib: 4096,
    }
}

fn r(host_addr: u64, size: u64, offset: u64) -> Region {
    Region {
        host_addr,
        size,
        offset,
    }
}

/// Pages 0..8 at 0x7f00_0000_0000, pages 8..12 at 0x10_0000_0000 (listed second first).
fn two_regions() -> GuestLayout {
    GuestLayout::new(
        4096,
        vec![
            r(0x10_0000_0000, 4 * 4096, 8 * 4096),
            r(0x7f00_0000_0000, 8 * 4096, 0),
        ],
    )
    .unwrap()
}

#[test]
fn maps_addresses_and_pages_both_ways() {
    let l =
        GuestLayout::from_mappings(&[m(0x9000_0000, 0x2000, 0x4000), m(0x1000_0000, 0x4000, 0)])
            .unwrap();
    assert_eq!(l.pages(), 6);
    assert_eq!(l.span_bytes(), 6 * 4096);
    assert_eq!(
        l.regions()[0].host_addr,
        0x9000_0000,
        "handshake order kept"
    );
    assert_eq!(l.page_of_addr(0x1000_0000), Some(0));
    assert_eq!(l.page_of_addr(0x1000_3fff), Some(3));
    assert_eq!(l.page_of_addr(0x1000_4000), None);
    assert_eq!(l.page_of_addr(0x9000_1000), Some(5));
    assert_eq!(l.page_of_addr(0x0fff_ffff), None);
    assert_eq!(l.addr_of_page(4), Some(0x9000_0000));
    assert_eq!(l.addr_of_page(3), Some(0x1000_3000));
    assert_eq!(l.addr_of_page(6), None);
    assert_eq!(l.addr_of_page(u64::MAX), None);
    assert_eq!(l.file_offset(5), Some(5 * 4096));
    assert_eq!(l.file_offset(6), None);
    assert_eq!(l.file_offset(u64::MAX), None);
    assert_eq!(
        l.pages_in_host_range(0x1000_1000, 0x9000_1000),
        vec![1..4, 4..5]
    );
    assert_eq!(l.pages_in_host_range(0, u64::MAX), vec![0..4, 4..6]);
}

#[test]
fn refuses_overlaps_and_mixed_page_sizes() {
    assert!(matches!(
        GuestLayout::from_mappings(&[m(0x1000_0000, 0x2000, 0), m(0x2000_0000, 0x2000, 0x1000)]),
        Err(LayoutError::OverlappingOffsets { index: 1, .. })
    ));
    let mut huge = m(0x4000_0000, 2 << 20, 2 << 20);
    huge.page_size = 2 << 20;
    assert!(matches!(
        GuestLayout::from_mappings(&[m(0x1000_0000, 0x2000, 0), huge]),
        Err(LayoutError::MixedPageSizes { .. })
    ));
    assert!(matches!(
        GuestLayout::new(4096, vec![r(0x1000, 8192, 0), r(0x2000, 4096, 0x10000)]),
        Err(LayoutError::OverlappingAddresses { index: 1, .. })
    ));
    assert!(matches!(
        GuestLayout::new(4096, vec![r(0x1000, 100, 0)]),
        Err(LayoutError::Unaligned { index: 0, .. })
    ));
    assert!(matches!(
        GuestLayout::new(1000, vec![r(0x1000, 4096, 0)]),
        Err(LayoutError::BadPageSize(1000))
    ));
    assert!(matches!(
        GuestLayout::new(4096, vec![]),
        Err(LayoutError::NoRegions)
    ));
}

#[test]
fn refuses_regions_whose_ranges_overflow_naming_the_region() {
    // Through the handshake path: validate_regions refuses first.
    let err = GuestLayout::from_mappings(&[m(0x1000_0000, 0x2000, 0), m(0x2000_0000, 0x2000, TOP)])
        .unwrap_err();
    assert!(err.to_string().contains("region 1"), "{err}");
    // The general constructor checks the same arithmetic itself.
    let err =
        GuestLayout::new(4096, vec![r(0x1000, 4096, 0), r(0x10_0000, 8192, TOP)]).unwrap_err();
    assert!(
        matches!(
            err,
            LayoutError::Overflow {
                index: 1,
                what: "offset",
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("region 1: offset"), "{err}");
    let err = GuestLayout::new(4096, vec![r(TOP, 8192, 0)]).unwrap_err();
    assert!(
        matches!(
            err,
            LayoutError::Overflow {
                index: 0,
                what: "address",
                ..
            }
        ),
        "{err}"
    );
    // Ending exactly at 2^64 overflows too.
    assert!(GuestLayout::new(4096, vec![r(0x1000, 4096, TOP)]).is_err());
}

#[test]
fn check_fits_names_the_first_region_past_the_store() {
    let l = two_regions();
    l.check_fits("dev", 12 * 4096).unwrap();
    let err = l.check_fits("swapdev /x.swap", 10 * 4096).unwrap_err();
    assert!(
        matches!(err, LayoutError::PastStoreEnd { index: 0, end, .. } if end == 12 * 4096),
        "{err}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("region 0") && msg.contains("swapdev /x.swap"),
        "{msg}"
    );
    let err = l.check_fits("dev", 4096).unwrap_err();
    assert!(matches!(err, LayoutError::PastStoreEnd { index: 0, .. }));
    let err = GuestLayout::new(4096, vec![r(0x1000, 4096, 0), r(0x10_0000, 4096, 4096)])
        .unwrap()
        .check_fits("dev", 4096)
        .unwrap_err();
    assert!(matches!(err, LayoutError::PastStoreEnd { index: 1, .. }));
}

#[test]
fn maps_pages_and_addresses() {
    let l = two_regions();
    assert_eq!(l.pages(), 12);
    assert_eq!(l.addr_of_page(0), Some(0x7f00_0000_0000));
    assert_eq!(l.addr_of_page(9), Some(0x10_0000_1000));
    assert_eq!(l.addr_of_page(12), None);
    assert_eq!(l.page_of_addr(0x10_0000_1fff), Some(9));
    assert_eq!(l.page_of_addr(0x10_0000_4000), None);
}

#[test]
fn runs_split_at_gaps_and_region_edges() {
    let l = two_regions();
    let runs = l.runs(&[1, 2, 3, 7, 8, 9, 11]).unwrap();
    let shape: Vec<(u64, u64)> = runs.iter().map(|r| (r.first_page, r.pages)).collect();
    assert_eq!(shape, vec![(1, 3), (7, 1), (8, 2), (11, 1)]);
    assert_eq!(runs[2].host_addr, 0x10_0000_0000);
    assert_eq!(runs[2].file_offset, 8 * 4096);
    assert!(matches!(
        l.runs(&[12]),
        Err(LayoutError::PageOutOfRange { page: 12 })
    ));
    let all: Vec<(u64, u64)> = l
        .all_runs()
        .iter()
        .map(|r| (r.first_page, r.pages))
        .collect();
    assert_eq!(all, vec![(0, 8), (8, 4)]);
}

proptest::proptest! {
    /// Runs cover exactly the given pages, in order, each contiguous in file and address
    /// space and inside one region, and maximal (adjacent runs cannot be merged).
    #[test]
    fn runs_cover_exactly_and_are_maximal(
        picks in proptest::collection::btree_set(0u64..12, 0..12)
    ) {
        let l = two_regions();
        let pages: Vec<u64> = picks.into_iter().collect();
        let runs = l.runs(&pages).unwrap();
        let covered: Vec<u64> = runs.iter().flat_map(|r| r.page_range()).collect();
        proptest::prop_assert_eq!(&covered, &pages);
        for r in &runs {
            proptest::prop_assert_eq!(Some(r.host_addr), l.addr_of_page(r.first_page));
            let last = r.first_page + r.pages - 1;
            proptest::prop_assert_eq!(
                l.addr_of_page(last),
                Some(r.host_addr + (r.pages - 1) * 4096)
            );
            proptest::prop_assert_eq!(r.file_offset, r.first_page * 4096);
        }
        for w in runs.windows(2) {
            let mergeable = w[0].first_page + w[0].pages == w[1].first_page
                && w[0].host_addr + w[0].byte_len(4096) == w[1].host_addr;
            proptest::prop_assert!(!mergeable);
        }
    }

    /// Any handshake either builds a layout whose lookups agree with each other, or is
    /// refused; it never panics (no arithmetic on VMM values overflows).
    #[test]
    fn any_handshake_is_refused_or_consistent(
        regions in proptest::collection::vec(
            (
                proptest::prop_oneof![0u64..64, (u64::MAX >> 12) - 64..=(u64::MAX >> 12)],
                1usize..8,
                proptest::prop_oneof![0u64..64, (u64::MAX >> 12) - 64..=(u64::MAX >> 12)],
            ),
            1..4)
    ) {
        let mappings: Vec<GuestRegionUffdMapping> = regions
            .iter()
            .map(|&(a, pages, o)| m(a << 12, pages * 4096, o << 12))
            .collect();
        if let Ok(l) = GuestLayout::from_mappings(&mappings) {
            for r in l.regions() {
                let first = r.offset / 4096;
                for p in first..first + r.size / 4096 {
                    let addr = l.addr_of_page(p).unwrap();
                    proptest::prop_assert_eq!(l.page_of_addr(addr), Some(p));
                }
            }
            let _ = l.pages_in_host_range(0, u64::MAX);
            let _ = l.check_fits("dev", u64::MAX);
        }
    }
}
