//! The fault loop's page sources, one per [`Route`], and the claims it holds on pages whose
//! reads are in flight.
//!
//! A claim remembers which route the read went to, the state the page had before it was
//! claimed (so a failed fetch of an `Evicted` page leaves it `Evicted`, and of a `Missing`
//! page leaves it `Missing`) and why it was fetched. A completion is placed only when it
//! answers a claim of the source that sent it: page numbers from a source (a remote host
//! among them) are checked against the claims before they index anything.

use std::collections::HashMap;

use crate::page_state::PageState;
use crate::route::Route;
use crate::source::PageSource;

/// One installed source.
pub(super) struct Installed {
    pub source: Box<dyn PageSource>,
    /// The source said its host is gone: its pages wait until it is replaced.
    pub gone: bool,
}

/// A page whose read is in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Claim {
    pub route: Route,
    /// The page's state before the claim; restored when the fetch fails.
    pub from: PageState,
    pub tag: u64,
}

/// Sources by route, plus the in-flight claims.
#[derive(Default)]
pub(super) struct SourceSet {
    slots: [Option<Installed>; 4],
    claims: HashMap<u64, Claim>,
    /// Pages whose source answered that their copy comes another way (a migration's bulk
    /// channel): still in flight, with no read of ours out. If that source is replaced
    /// (its connection broke), the copy may never come: they are voided with its claims.
    elsewhere: HashMap<u64, Claim>,
}

impl SourceSet {
    fn slot(route: Route) -> usize {
        route as usize
    }

    /// Install `source` for `route`; returns the one it replaces.
    pub fn install(&mut self, route: Route, source: Box<dyn PageSource>) -> Option<Installed> {
        self.slots[Self::slot(route)].replace(Installed {
            source,
            gone: false,
        })
    }

    pub fn remove(&mut self, route: Route) -> Option<Installed> {
        self.slots[Self::slot(route)].take()
    }

    /// The live source for `route` (none installed, or its host is gone: `None`).
    pub fn live(&mut self, route: Route) -> Option<&mut Box<dyn PageSource>> {
        match &mut self.slots[Self::slot(route)] {
            Some(Installed {
                source,
                gone: false,
            }) => Some(source),
            _ => None,
        }
    }

    pub fn get_mut(&mut self, route: Route) -> Option<&mut Installed> {
        self.slots[Self::slot(route)].as_mut()
    }

    pub fn mark_gone(&mut self, route: Route) {
        if let Some(s) = &mut self.slots[Self::slot(route)] {
            s.gone = true;
        }
    }

    /// Installed routes, in route order.
    pub fn routes(&self) -> impl Iterator<Item = Route> + '_ {
        Route::ALL
            .into_iter()
            .filter(|r| self.slots[Self::slot(*r)].is_some())
    }

    pub fn iter(&self) -> impl Iterator<Item = (Route, &Installed)> {
        Route::ALL
            .into_iter()
            .filter_map(|r| self.slots[Self::slot(r)].as_ref().map(|s| (r, s)))
    }

    /// Reads in flight over every live source (a gone host's reads are void).
    pub fn in_flight(&self) -> usize {
        self.slots
            .iter()
            .flatten()
            .filter(|s| !s.gone)
            .map(|s| s.source.in_flight())
            .sum()
    }

    pub fn claim(&mut self, page: u64, claim: Claim) {
        self.claims.insert(page, claim);
    }

    /// Take the claim on `page` if the read went to `route`.
    pub fn settle(&mut self, page: u64, route: Route) -> Option<Claim> {
        match self.claims.get(&page) {
            Some(c) if c.route == route => self.claims.remove(&page),
            _ => None,
        }
    }

    /// `page`'s source said its copy comes another way; remember its claim until it does.
    pub fn await_elsewhere(&mut self, page: u64, claim: Claim) {
        self.elsewhere.insert(page, claim);
    }

    /// A copy of `page` arrived (pushed): it no longer waits for one from elsewhere.
    pub fn arrived(&mut self, page: u64) {
        if !self.elsewhere.is_empty() {
            self.elsewhere.remove(&page);
        }
    }

    /// Drop every claim whose read went to `route` (its source was replaced or removed),
    /// and every page that source said comes another way.
    pub fn drop_claims_of(&mut self, route: Route) -> Vec<(u64, Claim)> {
        let mut out = Vec::new();
        for map in [&mut self.claims, &mut self.elsewhere] {
            let pages: Vec<u64> = map
                .iter()
                .filter(|(_, c)| c.route == route)
                .map(|(p, _)| *p)
                .collect();
            out.extend(
                pages
                    .into_iter()
                    .filter_map(|p| map.remove(&p).map(|c| (p, c))),
            );
        }
        out
    }
}
