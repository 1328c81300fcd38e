//! In-memory page sources whose answers the fault-loop tests script (good pages, damaged
//! pages, I/O errors, a gone host, answers nobody asked for).

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::{Arc, Mutex};

use nix::sys::eventfd::{EfdFlags, EventFd};
use swapdev::AlignedBuf;

use super::tests_routed::PAGE;
use crate::route::Route;
use crate::source::{PageCompletion, PageContent, PageSource, SourceError};

/// Content of page `i` as source `salt` holds it.
pub(super) fn page_bytes(salt: u8, i: u64) -> Vec<u8> {
    (0..PAGE)
        .map(|j| (i as usize * 31 + j).wrapping_add(salt as usize * 101) as u8 | 1)
        .collect()
}

pub(super) fn buf_of(bytes: &[u8]) -> AlignedBuf {
    let mut b = AlignedBuf::new(bytes.len());
    b.as_mut_slice().copy_from_slice(bytes);
    b
}

/// How a scripted source answers one page.
#[derive(Debug, Clone, Copy)]
pub(super) enum Script {
    /// Fails with an I/O error this many times, then answers.
    IoErrors(u32),
    /// Answers with a damaged-page error, every time.
    Damaged,
    /// Answers with "host gone".
    HostGone,
    /// Also answers page `page + 1000` (never asked for), then the page itself.
    AlsoUnrequested,
    /// Answers that the page comes another way (a migration's bulk channel).
    Elsewhere,
}

/// An in-memory source: page `i` is `page_bytes(salt, i)`, answered at once through an eventfd.
pub(super) struct ScriptedSource {
    salt: u8,
    route: Route,
    pages: u64,
    pub(super) script: Arc<Mutex<HashMap<u64, Script>>>,
    ready: VecDeque<PageCompletion>,
    efd: EventFd,
    /// Pages asked for, in order.
    pub(super) asked: Arc<Mutex<Vec<u64>>>,
}

impl ScriptedSource {
    pub(super) fn new(salt: u8, route: Route, pages: u64) -> Self {
        Self {
            salt,
            route,
            pages,
            script: Arc::default(),
            ready: VecDeque::new(),
            efd: EventFd::from_value_and_flags(0, EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)
                .unwrap(),
            asked: Arc::default(),
        }
    }

    pub(super) fn with(self, page: u64, script: Script) -> Self {
        self.script.lock().unwrap().insert(page, script);
        self
    }
}

impl PageSource for ScriptedSource {
    fn page_size(&self) -> usize {
        PAGE
    }
    fn capacity_pages(&self) -> u64 {
        self.pages
    }
    fn submit(&mut self, page: u64, tag: u64) -> Result<(), SourceError> {
        self.asked.lock().unwrap().push(page);
        let mut script = self.script.lock().unwrap();
        let result = match script.get_mut(&page) {
            Some(Script::IoErrors(n)) if *n > 0 => {
                *n -= 1;
                Err(SourceError::Io {
                    page,
                    source: "scripted I/O error".into(),
                })
            }
            Some(Script::Damaged) => Err(SourceError::Damaged {
                page,
                source_name: "scripted".into(),
                source: "checksum mismatch".into(),
            }),
            Some(Script::HostGone) => {
                return Err(SourceError::HostGone {
                    source_name: "scripted".into(),
                    source: "connection reset".into(),
                })
            }
            Some(Script::Elsewhere) => Err(SourceError::Elsewhere { page }),
            Some(Script::AlsoUnrequested) => {
                self.ready.push_back(PageCompletion {
                    page: page + 1000,
                    tag,
                    result: Ok(PageContent::Data(buf_of(&page_bytes(self.salt, page)))),
                });
                Ok(PageContent::Data(buf_of(&page_bytes(self.salt, page))))
            }
            _ => Ok(PageContent::Data(buf_of(&page_bytes(self.salt, page)))),
        };
        self.ready.push_back(PageCompletion { page, tag, result });
        self.efd.write(1).unwrap();
        Ok(())
    }
    fn poll(&mut self, out: &mut Vec<PageCompletion>, _min: usize) -> Result<usize, SourceError> {
        let _ = self.efd.read();
        let n = self.ready.len();
        out.extend(self.ready.drain(..));
        Ok(n)
    }
    fn in_flight(&self) -> usize {
        self.ready.len()
    }
    fn completion_fd(&self) -> BorrowedFd<'_> {
        self.efd.as_fd()
    }
    fn describe(&self) -> String {
        format!("scripted {}", self.route.name())
    }
    fn route(&self) -> Route {
        self.route
    }
}
