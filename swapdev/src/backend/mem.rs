//! A RAM-backed store: the device image lives in a shared `Vec<u8>`. Used by unit tests and
//! tools that want a swap device without a file. Requests execute at `submit`; completions
//! are handed out by `complete`. A write budget can make it stop persisting writes after N
//! bytes (tearing the write that crosses the limit), which is what a process killed in the
//! middle of a write storm leaves behind.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use super::{Backend, BackendError, IoCompletion, IoOp, IoRequest};

/// The bytes of a [`MemBackend`], shared so a test can look at or damage them.
#[derive(Clone, Default)]
pub struct MemStore {
    inner: Arc<Mutex<MemInner>>,
}

#[derive(Default)]
struct MemInner {
    bytes: Vec<u8>,
    /// Bytes of writes still persisted; `None` = unlimited.
    write_budget: Option<usize>,
}

impl MemStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// A copy of the whole image.
    pub fn snapshot(&self) -> Vec<u8> {
        self.lock().bytes.clone()
    }

    /// Flip bits of the byte at `offset`.
    pub fn corrupt(&self, offset: u64, xor: u8) {
        self.lock().bytes[offset as usize] ^= xor;
    }

    /// Persist only the next `bytes` bytes of writes (then drop them silently).
    pub fn set_write_budget(&self, bytes: Option<usize>) {
        self.lock().write_budget = bytes;
    }

    /// Write bytes still persisted before the budget runs out (`None`: unlimited).
    pub fn budget_left(&self) -> Option<usize> {
        self.lock().write_budget
    }

    pub fn len(&self) -> u64 {
        self.lock().bytes.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Cut the image to `len` bytes.
    pub fn truncate(&self, len: u64) {
        self.lock().bytes.truncate(len as usize);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A [`Backend`] over a [`MemStore`].
pub struct MemBackend {
    store: MemStore,
    done: VecDeque<IoCompletion>,
    /// Fixed size (like an NBD export) when set; otherwise it grows like a file.
    fixed_size: Option<u64>,
}

impl MemBackend {
    pub fn new(store: MemStore) -> Self {
        Self {
            store,
            done: VecDeque::new(),
            fixed_size: None,
        }
    }

    /// A store that cannot grow past `size` bytes.
    pub fn fixed(store: MemStore, size: u64) -> Self {
        store.lock().bytes.resize(size as usize, 0);
        Self {
            store,
            done: VecDeque::new(),
            fixed_size: Some(size),
        }
    }

    fn execute(
        &mut self,
        offset: u64,
        op: IoOp,
    ) -> Result<Option<crate::AlignedBuf>, BackendError> {
        let mut s = self.store.lock();
        let off = offset as usize;
        match op {
            IoOp::Read { mut buf } => {
                let end = off + buf.len();
                if end > s.bytes.len() {
                    return Err(BackendError::Short {
                        op: "read",
                        offset,
                        done: s.bytes.len().saturating_sub(off),
                        len: buf.len(),
                    });
                }
                buf.copy_from_slice(&s.bytes[off..end]);
                Ok(Some(buf))
            }
            IoOp::Write { buf } => {
                let mut n = buf.len();
                if let Some(budget) = s.write_budget.as_mut() {
                    n = n.min(*budget);
                    *budget -= n;
                }
                if off + n > s.bytes.len() {
                    if self.fixed_size.is_some() {
                        return Err(BackendError::Short {
                            op: "write",
                            offset,
                            done: 0,
                            len: buf.len(),
                        });
                    }
                    s.bytes.resize(off + n, 0);
                }
                s.bytes[off..off + n].copy_from_slice(&buf[..n]);
                Ok(Some(buf))
            }
            IoOp::Flush => Ok(None),
            IoOp::Trim { len } => {
                let end = (off + len as usize).min(s.bytes.len());
                if off < end && s.write_budget.is_none() {
                    s.bytes[off..end].fill(0);
                }
                Ok(None)
            }
        }
    }
}

impl Backend for MemBackend {
    fn submit(&mut self, req: IoRequest) -> Result<(), BackendError> {
        let result = self.execute(req.offset, req.op);
        self.done.push_back(IoCompletion {
            tag: req.tag,
            result,
        });
        Ok(())
    }

    fn complete(
        &mut self,
        out: &mut Vec<IoCompletion>,
        _min: usize,
    ) -> Result<usize, BackendError> {
        let n = self.done.len();
        out.extend(self.done.drain(..));
        Ok(n)
    }

    fn in_flight(&self) -> usize {
        self.done.len()
    }

    fn size(&self) -> Result<u64, BackendError> {
        Ok(self.store.len())
    }

    fn grow(&mut self, len: u64) -> Result<(), BackendError> {
        if let Some(fixed) = self.fixed_size {
            if len > fixed {
                return Err(BackendError::Setup(format!(
                    "memory store has a fixed size of {fixed} bytes, {len} requested"
                )));
            }
            return Ok(());
        }
        let mut s = self.store.lock();
        if (s.bytes.len() as u64) < len {
            s.bytes.resize(len as usize, 0);
        }
        Ok(())
    }

    fn alignment(&self) -> usize {
        1
    }

    fn describe(&self) -> String {
        format!("memory store ({} bytes)", self.store.len())
    }
}
