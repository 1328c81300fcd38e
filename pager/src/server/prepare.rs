//! Migration-agent services: prepared (incoming) VMs, page-state seeding and the census.
//!
//! * `prepare` stores a [`PreparedVm`] (layout by memory-file offsets, optional swap-device
//!   spec, initial page states and routes). When a VMM attaches with that name its layout
//!   must match ([`PreparedVm::check_layout`], the refusal names the difference); the states
//!   and routes are applied to the fresh VM before its fault loop starts.
//! * `seed` changes page states of a running VM, only between absent states (a fault on an
//!   absent page is still served correctly whichever absent state it finds), by CAS, so a
//!   page the fault loop claims meanwhile is never overwritten; and routes.
//! * `census` counts pages per state and per route, optionally listing runs.
//!
//! Every page number and count from a client is bounded against the VM (`first + count`
//! overflow-checked) before it indexes a table.

use crate::page_state::PageState;
use crate::vm::{GuestLayout, Vm};

use super::protocol::{
    state_name, CensusReport, LayoutSpec, RangeWindow, RegionSpec, RouteCounts, RouteRange,
    StateCounts, StateRange, MAX_CENSUS_RANGES,
};

/// Most regions a prepared layout may have.
pub const MAX_REGIONS: usize = 1024;
/// Most ranges one request may carry (states plus routes).
pub const MAX_RANGES: usize = 65536;
/// Largest guest a prepared layout may describe (bytes).
pub const MAX_GUEST_BYTES: u64 = 1 << 46;

/// A prepared layout that cannot describe a guest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutSpecError {
    #[error("page size {0} is not a power of two from 4096 to 1 GiB")]
    PageSize(u64),
    #[error("the layout has no regions")]
    NoRegions,
    #[error("the layout has {count} regions; at most {MAX_REGIONS}")]
    TooManyRegions { count: usize },
    #[error("region {index} (offset {offset:#x}, size {size:#x}) is empty or not page-aligned")]
    Unaligned {
        index: usize,
        offset: u64,
        size: u64,
    },
    #[error("region {index} ends beyond {MAX_GUEST_BYTES} bytes")]
    TooLarge { index: usize },
    #[error("region at offset {offset:#x} overlaps the region before it")]
    Overlap { offset: u64 },
}

/// Where an attaching VMM's layout differs from the prepared one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutDifference {
    #[error("page size: prepared {prepared} bytes, the VMM sent {attached}")]
    PageSize { prepared: u64, attached: u64 },
    #[error("prepared {prepared} regions, the VMM sent {attached}")]
    RegionCount { prepared: usize, attached: usize },
    #[error(
        "region {index} (by offset): prepared offset {:#x} size {:#x}, the VMM sent offset {:#x} \
         size {:#x}", prepared.offset, prepared.size, attached.offset, attached.size
    )]
    Region {
        index: usize,
        prepared: RegionSpec,
        attached: RegionSpec,
    },
}

/// A page range or state a client asked for that cannot be applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SeedError {
    #[error("pages {first_page}+{count} are outside the VM's {pages} pages")]
    OutOfRange {
        first_page: u64,
        count: u64,
        pages: u64,
    },
    #[error(
        "page state {} cannot be seeded: only absent states (missing, evicted, removed, zero)",
        state_name::name(*.0)
    )]
    NotSeedable(PageState),
    #[error(
        "page {page} is {}, not absent: its state cannot change while faults are served \
         (nothing was changed)", state_name::name(*state)
    )]
    NotAbsent { page: u64, state: PageState },
    #[error("{count} ranges in one request; at most {MAX_RANGES}")]
    TooManyRanges { count: usize },
}

/// Why `prepare` was refused.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error(
        "invalid VM name {0:?}: use 1-64 characters from A-Z a-z 0-9 . _ - not starting with '.'"
    )]
    BadName(String),
    #[error("VM {vm:?} is attached; prepare names an incoming VM")]
    AlreadyAttached { vm: String },
    #[error("VM {vm:?} is already prepared (unprepare it first)")]
    AlreadyPrepared { vm: String },
    #[error("the guest layout of VM {vm:?}")]
    Layout {
        vm: String,
        #[source]
        source: LayoutSpecError,
    },
    #[error("the initial page states and routes of VM {vm:?}")]
    Seeds {
        vm: String,
        #[source]
        source: SeedError,
    },
    #[error("choosing the swap device of VM {vm:?}")]
    Provider {
        vm: String,
        #[source]
        source: super::error::ProviderError,
    },
    #[error("{key} is taken by {status} VM {other:?}; one VM per swap device")]
    DeviceInUse {
        key: String,
        other: String,
        status: &'static str,
    },
    #[error("the pager is shutting down")]
    ShuttingDown,
}

/// An incoming VM waiting for its VMM.
#[derive(Debug, Clone, PartialEq)]
pub struct PreparedVm {
    pub name: String,
    pub page_size: u64,
    /// Sorted by offset, validated.
    pub regions: Vec<RegionSpec>,
    pub pages: u64,
    pub swapdev: Option<String>,
    /// [`super::SourceProvider::source_key`] of its store.
    pub source_key: String,
    pub states: Vec<StateRange>,
    pub routes: Vec<RouteRange>,
    /// Waits for a VMM that attaches *again* (a migration destination restarted after the
    /// switchover: its QEMU waited for it): only a re-attach takes it, its page states
    /// rebuilt from the memory file and the swap device, its routes from here.
    pub for_reattach: bool,
}

/// Check a layout spec: page size, alignment, overlap; returns regions by offset and pages.
pub fn check_layout_spec(spec: &LayoutSpec) -> Result<(Vec<RegionSpec>, u64), LayoutSpecError> {
    let ps = spec.page_size;
    if !ps.is_power_of_two() || !(4096..=1 << 30).contains(&ps) {
        return Err(LayoutSpecError::PageSize(ps));
    }
    if spec.regions.is_empty() {
        return Err(LayoutSpecError::NoRegions);
    }
    if spec.regions.len() > MAX_REGIONS {
        return Err(LayoutSpecError::TooManyRegions {
            count: spec.regions.len(),
        });
    }
    for (index, r) in spec.regions.iter().enumerate() {
        if r.size == 0 || r.offset % ps != 0 || r.size % ps != 0 {
            return Err(LayoutSpecError::Unaligned {
                index,
                offset: r.offset,
                size: r.size,
            });
        }
        if r.offset
            .checked_add(r.size)
            .is_none_or(|e| e > MAX_GUEST_BYTES)
        {
            return Err(LayoutSpecError::TooLarge { index });
        }
    }
    let mut regions = spec.regions.clone();
    regions.sort_by_key(|r| r.offset);
    for w in regions.windows(2) {
        if w[0].offset + w[0].size > w[1].offset {
            return Err(LayoutSpecError::Overlap {
                offset: w[1].offset,
            });
        }
    }
    let end = regions.iter().map(|r| r.offset + r.size).max().unwrap_or(0);
    Ok((regions, end / ps))
}

/// `first_page..first_page+count` when it lies inside `pages` pages.
fn checked_range(
    first_page: u64,
    count: u64,
    pages: u64,
) -> Result<std::ops::Range<u64>, SeedError> {
    match first_page.checked_add(count) {
        Some(end) if end <= pages => Ok(first_page..end),
        _ => Err(SeedError::OutOfRange {
            first_page,
            count,
            pages,
        }),
    }
}

/// Check ranges against a guest of `pages` pages (bounds, seedable states, how many).
pub fn check_ranges(
    states: &[StateRange],
    routes: &[RouteRange],
    pages: u64,
) -> Result<(), SeedError> {
    let count = states.len() + routes.len();
    if count > MAX_RANGES {
        return Err(SeedError::TooManyRanges { count });
    }
    for r in states {
        checked_range(r.first_page, r.count, pages)?;
        if !r.state.is_absent() {
            return Err(SeedError::NotSeedable(r.state));
        }
    }
    for r in routes {
        checked_range(r.first_page, r.count, pages)?;
    }
    Ok(())
}

impl PreparedVm {
    /// The attaching VMM's layout must equal the prepared one (regions by offset, page size).
    pub fn check_layout(&self, layout: &GuestLayout) -> Result<(), LayoutDifference> {
        if layout.page_size() as u64 != self.page_size {
            return Err(LayoutDifference::PageSize {
                prepared: self.page_size,
                attached: layout.page_size() as u64,
            });
        }
        let mut attached: Vec<RegionSpec> = layout
            .regions()
            .iter()
            .map(|r| RegionSpec {
                offset: r.offset,
                size: r.size,
            })
            .collect();
        attached.sort_by_key(|r| r.offset);
        if attached.len() != self.regions.len() {
            return Err(LayoutDifference::RegionCount {
                prepared: self.regions.len(),
                attached: attached.len(),
            });
        }
        for (index, (p, a)) in self.regions.iter().zip(&attached).enumerate() {
            if p != a {
                return Err(LayoutDifference::Region {
                    index,
                    prepared: *p,
                    attached: *a,
                });
            }
        }
        Ok(())
    }

    /// Apply the prepared states and routes to a VM whose fault loop has not started.
    pub fn apply(&self, vm: &Vm) -> Result<(), SeedError> {
        let pages = vm.layout.pages();
        check_ranges(&self.states, &self.routes, pages)?;
        for r in &self.states {
            vm.states
                .set_range(checked_range(r.first_page, r.count, pages)?, r.state);
        }
        for r in &self.routes {
            let range = checked_range(r.first_page, r.count, pages)?;
            vm.routes
                .set_range(range.clone(), r.route)
                .map_err(|_| SeedError::OutOfRange {
                    first_page: range.start,
                    count: r.count,
                    pages,
                })?;
        }
        Ok(())
    }
}

/// Change the states (absent -> absent only) and routes of a running VM. All states or none:
/// when a page is found not absent, the pages already changed are changed back.
/// Returns (pages whose state changed, pages routed).
pub fn seed(
    vm: &Vm,
    states: &[StateRange],
    routes: &[RouteRange],
) -> Result<(u64, u64), SeedError> {
    let pages = vm.layout.pages();
    check_ranges(states, routes, pages)?;
    let mut changed: Vec<(u64, PageState, PageState)> = Vec::new();
    let undo = |changed: &[(u64, PageState, PageState)]| {
        for &(p, old, new) in changed.iter().rev() {
            // A page the fault loop claimed meanwhile keeps its new life.
            let _ = vm.states.transition(p, new, old);
        }
    };
    for r in states {
        for page in checked_range(r.first_page, r.count, pages)? {
            loop {
                let cur = vm.states.get(page);
                if !cur.is_absent() {
                    undo(&changed);
                    return Err(SeedError::NotAbsent { page, state: cur });
                }
                if cur == r.state {
                    break;
                }
                if vm.states.transition(page, cur, r.state).is_ok() {
                    changed.push((page, cur, r.state));
                    break;
                }
            }
        }
    }
    let mut routed = 0;
    for r in routes {
        let range = checked_range(r.first_page, r.count, pages)?;
        vm.routes
            .set_range(range, r.route)
            .map_err(|_| SeedError::OutOfRange {
                first_page: r.first_page,
                count: r.count,
                pages,
            })?;
        routed += r.count;
    }
    Ok((changed.len() as u64, routed))
}

/// A VM's state and route census, with runs of `window` when asked for.
pub fn census(vm: &Vm, window: Option<RangeWindow>) -> Result<CensusReport, SeedError> {
    let pages = vm.layout.pages();
    let (ranges, next_page) = match window {
        None => (None, None),
        Some(w) => {
            let count = w.count.unwrap_or(pages.saturating_sub(w.first_page));
            let range = checked_range(w.first_page, count, pages)?;
            let (runs, next) = runs(vm, range);
            (Some(runs), next)
        }
    };
    Ok(CensusReport {
        vm: vm.name.clone(),
        pages,
        page_size: vm.page_size(),
        states: StateCounts::from_census(&vm.states.census()),
        routes: RouteCounts::from_census(&vm.routes.census()),
        ranges,
        next_page,
    })
}

/// Runs of equal state in `range`, at most [`MAX_CENSUS_RANGES`] (then where to go on).
fn runs(vm: &Vm, range: std::ops::Range<u64>) -> (Vec<StateRange>, Option<u64>) {
    let mut out: Vec<StateRange> = Vec::new();
    for page in range {
        let state = vm.states.get(page);
        if let Some(last) = out.last_mut().filter(|l| l.state == state) {
            last.count += 1;
            continue;
        }
        if out.len() == MAX_CENSUS_RANGES {
            return (out, Some(page));
        }
        out.push(StateRange {
            first_page: page,
            count: 1,
            state,
        });
    }
    (out, None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attach::protocol::GuestRegionUffdMapping;

    fn vm(pages: u64) -> Vm {
        let layout = GuestLayout::from_mappings(&[GuestRegionUffdMapping {
            base_host_virt_addr: 0x7000_0000,
            size: (pages * 4096) as usize,
            offset: 0,
            page_size: 4096,
            page_size_kib: 0,
        }])
        .unwrap();
        let uffd = uffd::Uffd::new(Default::default()).unwrap();
        Vm::new("t".into(), uffd, layout, None, Default::default())
    }

    fn sr(first_page: u64, count: u64, state: PageState) -> StateRange {
        StateRange {
            first_page,
            count,
            state,
        }
    }

    fn region(offset: u64, size: u64) -> RegionSpec {
        RegionSpec { offset, size }
    }

    #[test]
    fn layout_specs_are_checked() {
        let spec = |page_size, regions: Vec<RegionSpec>| LayoutSpec { page_size, regions };
        let (regions, pages) =
            check_layout_spec(&spec(4096, vec![region(0x4000, 0x2000), region(0, 0x4000)]))
                .unwrap();
        assert_eq!((regions[0].offset, pages), (0, 6));
        for (s, want) in [
            (spec(4095, vec![region(0, 4096)]), "page size 4095"),
            (spec(4096, vec![]), "no regions"),
            (spec(4096, vec![region(0, 100)]), "not page-aligned"),
            (spec(4096, vec![region(0, 0)]), "empty"),
            (
                spec(4096, vec![region(u64::MAX - 4095, 8192)]),
                "ends beyond",
            ),
            (
                spec(4096, vec![region(0, 8192), region(4096, 4096)]),
                "overlaps",
            ),
        ] {
            let e = check_layout_spec(&s).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
    }

    #[test]
    fn attached_layouts_must_match_the_prepared_one() {
        let p = PreparedVm {
            name: "t".into(),
            page_size: 4096,
            regions: vec![region(0, 8 * 4096)],
            pages: 8,
            swapdev: None,
            source_key: "k".into(),
            for_reattach: false,
            states: vec![sr(0, 2, PageState::Zero)],
            routes: vec![RouteRange {
                first_page: 6,
                count: 2,
                route: crate::route::Route::Remote,
            }],
        };
        let v = vm(8);
        p.check_layout(&v.layout).unwrap();
        p.apply(&v).unwrap();
        assert_eq!(v.states.get(1), PageState::Zero);
        assert_eq!(v.states.get(2), PageState::Missing);
        assert_eq!(v.routes.get(7), Some(crate::route::Route::Remote));
        let e = p.check_layout(&vm(4).layout).unwrap_err().to_string();
        assert_eq!(
            e,
            "region 0 (by offset): prepared offset 0x0 size 0x8000, the VMM sent offset 0x0 size 0x4000"
        );
    }

    #[test]
    fn ranges_are_bounded_and_overflow_checked() {
        for (first, count) in [(0, 9), (8, 1), (u64::MAX, 2), (1, u64::MAX)] {
            let e = check_ranges(&[sr(first, count, PageState::Zero)], &[], 8).unwrap_err();
            assert!(matches!(e, SeedError::OutOfRange { .. }), "{e}");
        }
        check_ranges(
            &[sr(8, 0, PageState::Zero), sr(0, 8, PageState::Evicted)],
            &[],
            8,
        )
        .unwrap();
        for s in [PageState::Present, PageState::InFlight, PageState::Evicting] {
            assert_eq!(
                check_ranges(&[sr(0, 1, s)], &[], 8),
                Err(SeedError::NotSeedable(s))
            );
        }
    }

    #[test]
    fn seed_changes_absent_pages_only_and_all_or_nothing() {
        let v = vm(16);
        v.states.set(10, PageState::Present);
        v.states.set(3, PageState::Removed);
        let e = seed(&v, &[sr(0, 12, PageState::Evicted)], &[]).unwrap_err();
        assert_eq!(
            e,
            SeedError::NotAbsent {
                page: 10,
                state: PageState::Present
            }
        );
        assert_eq!(v.states.get(0), PageState::Missing, "rolled back");
        assert_eq!(v.states.get(3), PageState::Removed, "rolled back");
        assert_eq!(
            seed(&v, &[sr(0, 10, PageState::Evicted)], &[]).unwrap(),
            (10, 0)
        );
        assert_eq!(v.states.count(PageState::Evicted), 10);
    }

    #[test]
    fn census_lists_runs_in_a_window() {
        let v = vm(16);
        v.states.set_range(4..6, PageState::Zero);
        let r = census(
            &v,
            Some(RangeWindow {
                first_page: 2,
                count: None,
            }),
        )
        .unwrap();
        assert_eq!(
            r.ranges.unwrap(),
            vec![
                sr(2, 2, PageState::Missing),
                sr(4, 2, PageState::Zero),
                sr(6, 10, PageState::Missing)
            ]
        );
        assert_eq!(
            (r.states.zero, r.routes.swapdev, r.next_page),
            (2, 16, None)
        );
        assert!(census(
            &v,
            Some(RangeWindow {
                first_page: 17,
                count: None
            })
        )
        .is_err());
    }

    #[test]
    fn census_runs_stop_at_the_cap() {
        let pages = (MAX_CENSUS_RANGES as u64 + 10) * 2;
        let v = vm(pages);
        for p in (0..pages).step_by(2) {
            v.states.set(p, PageState::Zero);
        }
        let r = census(&v, Some(RangeWindow::default())).unwrap();
        assert_eq!(r.ranges.unwrap().len(), MAX_CENSUS_RANGES);
        assert_eq!(r.next_page, Some(MAX_CENSUS_RANGES as u64));
    }
}
