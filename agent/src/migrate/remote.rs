//! The destination's view of the source host: a [`PageSource`] for [`Route::Remote`] pages,
//! over the migration's urgent channel.
//!
//! `submit` writes a `PageRequest` frame (requests are buffered and pushed out by `flush`,
//! which the fault loop calls before it sleeps); a reader thread turns the answers (`Page`,
//! or a one-page `ZeroPages`) into completions and signals an eventfd the fault loop polls.
//! An answer is checked before it becomes a completion: its length must be the VM's page
//! size (else the page is reported damaged) and its page number inside the VM (the fault
//! loop further checks it was asked for). When the connection breaks, every later `poll` and
//! `submit` reports [`SourceError::HostGone`], so the loop parks the remote pages and keeps
//! serving the rest; a new `RemoteSource` over a new connection replaces this one.

use std::io::{BufWriter, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};
use nix::sys::eventfd::{EfdFlags, EventFd};
use pager::route::Route;
use pager::source::{PageCompletion, PageContent, PageSource, SourceError};
use swapdev::AlignedBuf;

use super::link::Link;
use super::message::{read_message, Message, WireError};

/// Requests buffered before a write is forced.
const WRITE_BUFFER: usize = 64 * 1024;

/// What the reader thread hands to `poll`.
enum Answer {
    Page(PageCompletion),
    Gone(String),
}

pub struct RemoteSource {
    writer: BufWriter<Link>,
    answers: Receiver<Answer>,
    wake: Arc<EventFd>,
    gone: Option<String>,
    in_flight: usize,
    page_size: usize,
    pages: u64,
    peer: String,
    reader: Option<std::thread::JoinHandle<()>>,
}

/// Setting up the remote source failed.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("duplicating the urgent connection")]
    Clone(#[source] std::io::Error),
    #[error("creating the completion eventfd")]
    EventFd(#[source] nix::Error),
    #[error("starting the reader thread")]
    Thread(#[source] std::io::Error),
}

impl RemoteSource {
    /// Serve `pages` pages of `page_size` bytes from the authenticated urgent `stream`.
    pub fn new(
        stream: Link,
        page_size: usize,
        pages: u64,
        version: u16,
    ) -> Result<Self, RemoteError> {
        let _ = stream.set_nodelay(true);
        let peer = stream
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| "source host".into());
        let read_half = stream.try_clone().map_err(RemoteError::Clone)?;
        let wake = Arc::new(
            EventFd::from_value_and_flags(0, EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)
                .map_err(RemoteError::EventFd)?,
        );
        let (tx, rx) = crossbeam_channel::unbounded();
        let reader = {
            let wake = wake.clone();
            std::thread::Builder::new()
                .name("remote-pages".into())
                .spawn(move || read_answers(read_half, page_size, pages, version, tx, &wake))
                .map_err(RemoteError::Thread)?
        };
        Ok(Self {
            writer: BufWriter::with_capacity(WRITE_BUFFER, stream),
            answers: rx,
            wake,
            gone: None,
            in_flight: 0,
            page_size,
            pages,
            peer,
            reader: Some(reader),
        })
    }

    fn host_gone(&self, why: &str) -> SourceError {
        SourceError::HostGone {
            source_name: self.describe(),
            source: why.to_string().into(),
        }
    }
}

impl Drop for RemoteSource {
    fn drop(&mut self) {
        let _ = self.writer.get_ref().shutdown(std::net::Shutdown::Both);
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

fn read_answers(
    mut stream: Link,
    page_size: usize,
    pages: u64,
    version: u16,
    tx: Sender<Answer>,
    wake: &EventFd,
) {
    let send = |a: Answer| {
        let _ = tx.send(a);
        let _ = wake.write(1);
    };
    loop {
        let answer = match read_message(&mut stream, Some(version)) {
            Ok(Message::Page { page, data }) if page < pages => {
                let result = if data.len() == page_size {
                    let mut buf = AlignedBuf::new(page_size);
                    buf.as_mut_slice().copy_from_slice(&data);
                    Ok(PageContent::Data(buf))
                } else {
                    Err(SourceError::Damaged {
                        page,
                        source_name: "source host".into(),
                        source: format!("{} bytes where a page has {page_size}", data.len()).into(),
                    })
                };
                PageCompletion {
                    page,
                    tag: 0,
                    result,
                }
            }
            Ok(Message::ZeroPages { first, count: 1 }) if first < pages => PageCompletion {
                page: first,
                tag: 0,
                result: Ok(PageContent::Zero),
            },
            Ok(Message::PageInBulk { page }) if page < pages => PageCompletion {
                page,
                tag: 0,
                result: Err(SourceError::Elsewhere { page }),
            },
            Ok(Message::Abort(reason)) => {
                send(Answer::Gone(format!("the source aborted: {reason}")));
                return;
            }
            Ok(other) => {
                send(Answer::Gone(format!(
                    "protocol violation: {:?} on the urgent channel",
                    other.command()
                )));
                return;
            }
            Err(e) => {
                let why = match &e {
                    WireError::Closed => "the source closed the connection".to_string(),
                    e => pager::error_chain(e),
                };
                send(Answer::Gone(why));
                return;
            }
        };
        send(Answer::Page(answer));
    }
}

impl PageSource for RemoteSource {
    fn page_size(&self) -> usize {
        self.page_size
    }

    fn capacity_pages(&self) -> u64 {
        self.pages
    }

    fn submit(&mut self, page: u64, _tag: u64) -> Result<(), SourceError> {
        if let Some(why) = &self.gone {
            return Err(self.host_gone(why));
        }
        if page >= self.pages {
            return Err(SourceError::OutOfRange {
                page,
                capacity: self.pages,
            });
        }
        let frame = Message::PageRequest { page }.encode();
        if let Err(e) = self.writer.write_all(&frame) {
            self.gone = Some(format!("sending a page request: {e}"));
            return Err(self.host_gone(self.gone.as_deref().unwrap_or_default()));
        }
        self.in_flight += 1;
        Ok(())
    }

    fn flush(&mut self) -> Result<(), SourceError> {
        if self.gone.is_none() {
            if let Err(e) = self.writer.flush() {
                self.gone = Some(format!("sending page requests: {e}"));
            }
        }
        match &self.gone {
            Some(why) => Err(self.host_gone(why)),
            None => Ok(()),
        }
    }

    fn poll(&mut self, out: &mut Vec<PageCompletion>, _min: usize) -> Result<usize, SourceError> {
        let _ = self.wake.read();
        let mut n = 0;
        while let Ok(a) = self.answers.try_recv() {
            match a {
                Answer::Page(c) => {
                    self.in_flight = self.in_flight.saturating_sub(1);
                    out.push(c);
                    n += 1;
                }
                Answer::Gone(why) => self.gone = Some(why),
            }
        }
        if n == 0 {
            if let Some(why) = &self.gone {
                return Err(self.host_gone(why));
            }
        }
        Ok(n)
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn completion_fd(&self) -> BorrowedFd<'_> {
        self.wake.as_fd()
    }

    fn describe(&self) -> String {
        format!("source host {}", self.peer)
    }

    fn route(&self) -> Route {
        Route::Remote
    }
}
