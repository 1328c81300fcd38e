//! Ownership between hosts: the header names the owner host and a generation that every
//! acquire and release bumps. A writer re-reads the header (always before checkpoints,
//! flushes and releases; at most `fence_interval` apart before batch writes) and stops
//! writing for good once the generation or owner differ from its own.

use super::SwapDevice;
use crate::error::{Result, SwapError};
use crate::format::header::DeviceHeader;
use crate::format::BLOCK;
use crate::AlignedBuf;

/// What [`SwapDevice::reclaim`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reclaimed {
    /// The generation this host owns the device at now.
    pub generation: u64,
    /// The host it was taken from (it had acquired it and written nothing), if not unowned.
    pub taken_from: Option<String>,
}

impl SwapDevice {
    pub(super) fn read_header_now(&mut self) -> Result<DeviceHeader> {
        let b = self.read_sync(0, 2 * BLOCK)?;
        DeviceHeader::choose(&b[..BLOCK as usize], &b[BLOCK as usize..]).map(|(h, _)| h)
    }

    /// Refuse (and stop writing for good) when another host took the device over.
    pub(super) fn fence_check(&mut self, always: bool) -> Result<()> {
        if !always && self.last_fence_check.elapsed() < self.fence_interval {
            return Ok(());
        }
        let cur = self.read_header_now()?;
        self.last_fence_check = std::time::Instant::now();
        if cur.generation != self.hdr.generation || !cur.owned || cur.owner != self.host_id {
            self.writable = false;
            tracing::error!(owner = %cur.owner, generation = cur.generation, ours = self.hdr.generation, "fenced: device taken over");
            return Err(SwapError::Fenced {
                owner: cur.owner,
                owned: cur.owned,
                generation: cur.generation,
                ours: self.hdr.generation,
            });
        }
        Ok(())
    }

    /// Write `h` as the next header (into the copy not holding the current one), flushed.
    pub(super) fn write_header(&mut self, mut h: DeviceHeader) -> Result<()> {
        h.header_seq = self.hdr.header_seq + 1;
        let copy = 1 - self.hdr_copy;
        let mut block = AlignedBuf::new(BLOCK as usize);
        h.encode(&mut block);
        self.write_sync(copy as u64 * BLOCK, block)?;
        self.flush_backend()?;
        self.hdr = h;
        self.hdr_copy = copy;
        Ok(())
    }

    /// Become the owner at a new generation (called by a read-write open).
    pub(super) fn take_ownership(&mut self, acquire: bool, force: bool) -> Result<()> {
        let cur = self.hdr.clone();
        if cur.owned && cur.owner != self.host_id {
            if !force {
                return Err(SwapError::OwnedByOther {
                    owner: cur.owner,
                    generation: cur.generation,
                });
            }
            tracing::warn!(owner = %cur.owner, generation = cur.generation, "forcing takeover of a device owned by another host");
        }
        if !cur.owned && !acquire {
            return Err(SwapError::NotOwned {
                host: self.host_id.clone(),
            });
        }
        let mut h = cur;
        h.owner = self.host_id.clone();
        h.owned = true;
        h.generation += 1;
        self.write_header(h)?;
        self.last_fence_check = std::time::Instant::now();
        tracing::info!(host = %self.host_id, generation = self.hdr.generation, "swap device acquired");
        Ok(())
    }

    /// Hand the device over: checkpoint, flush, mark it unowned at a new generation. The
    /// next host opens it with `acquire`. The consuming form of
    /// [`SwapDevice::release_ownership`].
    pub fn release(mut self) -> Result<()> {
        self.release_ownership()
    }

    /// Hand the device over without giving up this handle (it may be shared, e.g. behind a
    /// mutex by the daemon, the evictor and the fault loop's source): finish a pending
    /// write, checkpoint (durable), mark the header unowned at a new generation. Afterwards
    /// every write-path call is refused with [`SwapError::Released`]; reads go on against
    /// the index as it was, like a read-only observer's (once another host has acquired the
    /// device and reuses space, a read of a page it rewrote may fail its checksum).
    pub fn release_ownership(&mut self) -> Result<()> {
        self.finish_job()?;
        self.checkpoint()?;
        self.fence_check(true)?;
        let mut h = self.hdr.clone();
        h.owned = false;
        h.generation += 1;
        self.write_header(h)?;
        self.writable = false;
        self.released = true;
        tracing::info!(host = %self.host_id, generation = self.hdr.generation, "swap device released");
        Ok(())
    }

    /// Take back a device this handle released, when the hand-off it was released for did
    /// not happen after all (a migration rolled back before its switchover). `fresh` is a
    /// second handle on the same store: the device is loaded from it as any host would open
    /// it (checkpoint checked, log replayed), and reclaimed only if it holds exactly the
    /// pages this handle knows (same index, same log head): nobody wrote to it meanwhile, so
    /// reads in flight and the callers' page states stay true.
    ///
    /// Unowned, it is acquired. Owned by another host at exactly the generation after this
    /// handle's release (the one host that acquired it since: the hand-off's receiver, which
    /// did not take the VM), it is taken over and that host is fenced off. Anything else is
    /// refused and the handle stays released.
    pub fn reclaim(&mut self, fresh: Box<dyn crate::backend::Backend>) -> Result<Reclaimed> {
        if !self.released {
            return Err(SwapError::NotReleased {
                host: self.host_id.clone(),
            });
        }
        let now = super::recover::load(fresh, &self.host_id, None)?;
        let cur = now.hdr.clone();
        let released_at = self.hdr.generation;
        let changed = |detail: String| SwapError::ChangedWhileReleased {
            owner: cur.owner.clone(),
            generation: cur.generation,
            released_at,
            detail,
        };
        if cur.vm_uuid != self.hdr.vm_uuid || cur.layout != self.hdr.layout {
            return Err(changed(
                "it is another device now (VM uuid or layout)".into(),
            ));
        }
        let taken_from = match (cur.owned, cur.owner == self.host_id) {
            (false, _) => None,
            (true, true) => {
                return Err(changed(
                    "this host acquired it through another handle".into(),
                ))
            }
            (true, false) if cur.generation == released_at + 1 => Some(cur.owner.clone()),
            (true, false) => {
                return Err(SwapError::OwnedByOther {
                    owner: cur.owner,
                    generation: cur.generation,
                })
            }
        };
        if (now.log.head, now.log.next_seq, now.log.last_crc)
            != (self.log.head, self.log.next_seq, self.log.last_crc)
        {
            return Err(changed(format!(
                "its log moved on from batch {} to {}",
                self.log.next_seq, now.log.next_seq
            )));
        }
        let differ = self
            .index
            .iter()
            .zip(&now.index)
            .filter(|(a, b)| a != b)
            .count();
        if differ > 0 || self.index.len() != now.index.len() {
            return Err(changed(format!("{differ} index entries differ")));
        }
        if let Some(other) = &taken_from {
            tracing::warn!(owner = %other, generation = cur.generation,
                "taking back a released swap device from the host that acquired it and wrote nothing");
        }
        // Continue from the header as it is now (its checkpoint slot and sequence).
        self.hdr = cur;
        self.hdr_copy = now.hdr_copy;
        drop(now);
        let mut h = self.hdr.clone();
        h.owner = self.host_id.clone();
        h.owned = true;
        h.generation += 1;
        self.write_header(h)?;
        self.released = false;
        self.writable = true;
        self.last_fence_check = std::time::Instant::now();
        self.checkpoint()?;
        tracing::info!(host = %self.host_id, generation = self.hdr.generation, "released swap device taken back");
        Ok(Reclaimed {
            generation: self.hdr.generation,
            taken_from,
        })
    }

    /// Whether this handle released the device ([`SwapDevice::release_ownership`]).
    pub fn is_released(&self) -> bool {
        self.released
    }
}

#[cfg(test)]
mod tests;
