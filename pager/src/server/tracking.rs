//! Write tracking for control-socket consumers (a migration agent's pre-copy): a named
//! subscription per (VM, consumer), started, harvested and stopped by requests.
//!
//! `dirty_start` subscribes and write-protects the whole guest, so every later write is
//! seen. `dirty_harvest` takes the consumer's dirty pages (clearing only its own bits), then
//! write-protects exactly those pages again before answering, so a write after the harvest
//! is seen by the next one (a write between the harvest and the re-protect is not recorded,
//! but the consumer reads the pages after the answer, so it sends the newer content). Other
//! consumers (the working-set sampler) are unaffected.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::dirty::{DirtyError, SubscribeOptions, Subscription};
use crate::vm::Vm;

/// Most pages listed in one harvest answer as ranges before it says "ask again".
pub const MAX_DIRTY_RANGES: usize = 1 << 16;

/// A run of pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageRun {
    pub first_page: u64,
    pub count: u64,
}

/// One consumer's harvest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirtySet {
    pub vm: String,
    pub consumer: String,
    /// Pages written since the previous harvest (or the start).
    pub count: u64,
    pub runs: Vec<PageRun>,
}

#[derive(Debug, thiserror::Error)]
pub enum TrackingError {
    #[error(
        "VM {vm:?} was attached without write-protect registration: its writes cannot be tracked"
    )]
    NoWriteProtect { vm: String },
    #[error("consumer {consumer:?} already tracks VM {vm:?}")]
    AlreadyTracking { vm: String, consumer: String },
    #[error("consumer {consumer:?} does not track VM {vm:?} (dirty_start first)")]
    NotTracking { vm: String, consumer: String },
    #[error("consumer names are 1-64 characters")]
    BadConsumerName,
    #[error("subscribing to VM {vm:?}'s writes")]
    Subscribe {
        vm: String,
        #[source]
        source: DirtyError,
    },
    #[error("write-protecting VM {vm:?}")]
    Protect {
        vm: String,
        #[source]
        source: uffd::UffdError,
    },
}

struct Tracked {
    /// The VM the subscription belongs to (a VM re-attached under the same name is another).
    vm: Arc<Vm>,
    subscription: Subscription,
}

/// The daemon's named subscriptions.
#[derive(Default)]
pub struct Tracking {
    by_key: Mutex<HashMap<(String, String), Tracked>>,
}

fn protect_pages(vm: &Vm, pages: &[u64]) -> Result<(), TrackingError> {
    vm.write_protect_pages(pages)
        .map_err(|source| TrackingError::Protect {
            vm: vm.name.clone(),
            source,
        })
}

fn runs_of(pages: &[u64]) -> Vec<PageRun> {
    let mut runs: Vec<PageRun> = Vec::new();
    for &p in pages {
        match runs.last_mut() {
            Some(r) if r.first_page + r.count == p => r.count += 1,
            _ => runs.push(PageRun {
                first_page: p,
                count: 1,
            }),
        }
    }
    runs
}

impl Tracking {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), Tracked>> {
        self.by_key.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Start tracking `vm`'s writes for `consumer`. Returns the VM's page count.
    pub fn start(
        &self,
        vm: Arc<Vm>,
        consumer: &str,
        placed_counts_as_written: bool,
    ) -> Result<u64, TrackingError> {
        if consumer.is_empty() || consumer.len() > 64 {
            return Err(TrackingError::BadConsumerName);
        }
        if !vm.wp_registered {
            return Err(TrackingError::NoWriteProtect {
                vm: vm.name.clone(),
            });
        }
        let key = (vm.name.clone(), consumer.to_string());
        let mut map = self.lock();
        map.retain(|(name, _), t| name != &vm.name || Arc::ptr_eq(&t.vm, &vm));
        if map.contains_key(&key) {
            return Err(TrackingError::AlreadyTracking {
                vm: key.0,
                consumer: key.1,
            });
        }
        let subscription = vm
            .dirty
            .subscribe(SubscribeOptions {
                placed_counts_as_written,
            })
            .map_err(|source| TrackingError::Subscribe {
                vm: vm.name.clone(),
                source,
            })?;
        vm.write_protect_all()
            .map_err(|source| TrackingError::Protect {
                vm: vm.name.clone(),
                source,
            })?;
        let pages = vm.layout.pages();
        map.insert(key, Tracked { vm, subscription });
        Ok(pages)
    }

    /// Take `consumer`'s dirty pages of `vm` and protect them again.
    pub fn harvest(&self, vm: &Arc<Vm>, consumer: &str) -> Result<DirtySet, TrackingError> {
        let map = self.lock();
        let key = (vm.name.clone(), consumer.to_string());
        let t = map
            .get(&key)
            .filter(|t| Arc::ptr_eq(&t.vm, vm))
            .ok_or_else(|| TrackingError::NotTracking {
                vm: vm.name.clone(),
                consumer: consumer.into(),
            })?;
        let pages = t.subscription.harvest();
        protect_pages(vm, &pages)?;
        let mut runs = runs_of(&pages);
        if runs.len() > MAX_DIRTY_RANGES {
            // Too many to list: put the rest back for the next harvest.
            for r in &runs[MAX_DIRTY_RANGES..] {
                for p in r.first_page..r.first_page + r.count {
                    t.subscription.mark(p);
                }
            }
            runs.truncate(MAX_DIRTY_RANGES);
        }
        Ok(DirtySet {
            vm: vm.name.clone(),
            consumer: consumer.into(),
            count: runs.iter().map(|r| r.count).sum(),
            runs,
        })
    }

    /// Stop `consumer`'s tracking of `vm` (its subscription is dropped). Returns whether it
    /// was tracking.
    pub fn stop(&self, vm: &str, consumer: &str) -> bool {
        self.lock()
            .remove(&(vm.to_string(), consumer.to_string()))
            .is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_become_runs() {
        assert_eq!(
            runs_of(&[1, 2, 3, 7, 9, 10]),
            vec![
                PageRun {
                    first_page: 1,
                    count: 3
                },
                PageRun {
                    first_page: 7,
                    count: 1
                },
                PageRun {
                    first_page: 9,
                    count: 2
                }
            ]
        );
        assert!(runs_of(&[]).is_empty());
    }
}
