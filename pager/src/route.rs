//! Per-page routes: which page source answers a fault on an absent page.
//!
//! A VM served from one store routes every page to it. A migration destination routes each
//! page to where its current content lives: the local source (a raw image or memory file on
//! this host), the shared swap device, the source host (remote), or nowhere (zero). The
//! page-state table says *whether* a page is absent; the route says *who* fetches it. Routes
//! change while the VM runs (a migration moves pages between routes), so the table is atomic,
//! one byte per page, like the page-state table.

use std::sync::atomic::{AtomicU8, Ordering};

/// Who answers for one absent guest page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
#[repr(u8)]
pub enum Route {
    /// The local source of this host (a raw image, a snapshot memory file).
    Local = 0,
    /// The VM's swap device (possibly shared with another host).
    Swapdev = 1,
    /// The host the VM is migrating from.
    Remote = 2,
    /// No store holds it: it reads as zero (UFFDIO_ZEROPAGE, no I/O).
    Zero = 3,
}

impl Route {
    pub const ALL: [Route; 4] = [Route::Local, Route::Swapdev, Route::Remote, Route::Zero];

    fn from_u8(v: u8) -> Self {
        match v {
            0 => Self::Local,
            1 => Self::Swapdev,
            2 => Self::Remote,
            3 => Self::Zero,
            _ => unreachable!("route byte {v} is never stored"),
        }
    }

    /// Short lowercase name (as in the control protocol and stats).
    pub fn name(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Swapdev => "swapdev",
            Self::Remote => "remote",
            Self::Zero => "zero",
        }
    }
}

/// A page number outside the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("pages {start}..{end} are outside the guest's {pages} pages")]
pub struct RouteRangeError {
    pub start: u64,
    pub end: u64,
    pub pages: u64,
}

/// One route per guest page.
pub struct RouteTable {
    routes: Box<[AtomicU8]>,
}

impl RouteTable {
    /// A table of `pages` pages, all routed to `initial`.
    pub fn new(pages: usize, initial: Route) -> Self {
        Self {
            routes: (0..pages).map(|_| AtomicU8::new(initial as u8)).collect(),
        }
    }

    pub fn len(&self) -> usize {
        self.routes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// The route of `page`, or `None` when `page` is outside the table.
    pub fn get(&self, page: u64) -> Option<Route> {
        let slot = self.routes.get(usize::try_from(page).ok()?)?;
        Some(Route::from_u8(slot.load(Ordering::Acquire)))
    }

    /// Route every page of `range` to `route`; refused (nothing changed) when the range is
    /// not inside the table.
    pub fn set_range(
        &self,
        range: std::ops::Range<u64>,
        route: Route,
    ) -> Result<(), RouteRangeError> {
        let pages = self.routes.len() as u64;
        if range.start > range.end || range.end > pages {
            return Err(RouteRangeError {
                start: range.start,
                end: range.end,
                pages,
            });
        }
        for slot in &self.routes[range.start as usize..range.end as usize] {
            slot.store(route as u8, Ordering::Release);
        }
        Ok(())
    }

    /// How many pages take each route, indexed like [`Route::ALL`].
    pub fn census(&self) -> [usize; 4] {
        let mut counts = [0usize; 4];
        for r in self.routes.iter() {
            counts[r.load(Ordering::Relaxed) as usize] += 1;
        }
        counts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_ranges_and_refuses_outside() {
        let t = RouteTable::new(10, Route::Swapdev);
        t.set_range(2..5, Route::Remote).unwrap();
        assert_eq!(t.get(1), Some(Route::Swapdev));
        assert_eq!(t.get(4), Some(Route::Remote));
        assert_eq!(t.get(10), None);
        assert_eq!(t.get(u64::MAX), None);
        let err = t.set_range(8..11, Route::Zero).unwrap_err();
        assert_eq!(
            err.to_string(),
            "pages 8..11 are outside the guest's 10 pages"
        );
        assert_eq!(
            t.get(8),
            Some(Route::Swapdev),
            "a refused range changes nothing"
        );
        assert_eq!(t.census(), [0, 7, 3, 0]);
    }

    #[test]
    fn names_match_serde() {
        for r in Route::ALL {
            assert_eq!(
                serde_json::to_string(&r).unwrap(),
                format!("\"{}\"", r.name())
            );
        }
    }
}
