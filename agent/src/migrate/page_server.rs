//! The source host's side of the urgent channel: answer each `PageRequest` with the page's
//! current content, read from the VM's memory file (`Page`, or a one-page `ZeroPages` for an
//! all-zero page: no bytes on the wire).
//!
//! A request for a page outside the VM ends the connection with an `Abort` naming it: the
//! destination only asks for pages it routes to us, so such a request means a broken peer.

use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;

use super::bulk::SentPages;
use super::link::Link;
use super::message::{read_message, write_message, write_page, Message, WireError};

/// Why serving page requests ended.
#[derive(Debug, thiserror::Error)]
pub enum PageServerError {
    #[error("the urgent channel failed")]
    Wire(#[from] WireError),
    #[error("reading page {page} from the memory file")]
    Read {
        page: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("the destination asked for page {page}, outside the VM's {pages} pages")]
    OutOfRange { page: u64, pages: u64 },
    #[error("the destination sent {0:?} on the urgent channel")]
    Unexpected(super::frame::Command),
}

/// Counts of what was served.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Served {
    pub pages: u64,
    pub zero_pages: u64,
    /// Requests for pages already pushed on the bulk channel (answered `PageInBulk`).
    pub in_bulk: u64,
}

/// Serve requests until the destination closes the channel. `on_request` sees every page
/// asked for (the pusher steers its order by them), before it is answered. With `sent`, a
/// page the pusher already claimed is answered `PageInBulk` (it arrives on the bulk channel)
/// and a page answered here is claimed, so the pusher skips it.
pub fn serve_page_requests(
    stream: Link,
    memory: &impl FileExt,
    page_size: usize,
    pages: u64,
    version: u16,
    sent: Option<&SentPages>,
    on_request: impl FnMut(u64),
) -> Result<Served, PageServerError> {
    serve_page_requests_with(
        stream,
        page_size,
        pages,
        version,
        sent,
        on_request,
        |page, buf| memory.read_exact_at(buf, page * page_size as u64),
    )
}

/// [`serve_page_requests`] reading each page with `read` (a source whose pages live in more
/// than one place: its memory file and its swap device).
pub fn serve_page_requests_with(
    stream: Link,
    page_size: usize,
    pages: u64,
    version: u16,
    sent: Option<&SentPages>,
    mut on_request: impl FnMut(u64),
    mut read: impl FnMut(u64, &mut [u8]) -> std::io::Result<()>,
) -> Result<Served, PageServerError> {
    let _ = stream.set_nodelay(true);
    let mut reader = stream.try_clone().map_err(WireError::Io)?;
    let mut writer = BufWriter::new(stream);
    let mut served = Served::default();
    let mut buf = vec![0u8; page_size];
    loop {
        let page = match read_message(&mut reader, Some(version)) {
            Ok(Message::PageRequest { page }) => page,
            Ok(Message::Done) | Err(WireError::Closed) => return Ok(served),
            Ok(other) => return Err(PageServerError::Unexpected(other.command())),
            Err(e) => return Err(e.into()),
        };
        if page >= pages {
            let e = PageServerError::OutOfRange { page, pages };
            let _ = write_message(&mut writer, &Message::Abort(e.to_string()));
            let _ = writer.flush();
            return Err(e);
        }
        on_request(page);
        if let Some(sent) = sent {
            if !sent.claim(page) {
                write_message(&mut writer, &Message::PageInBulk { page })?;
                writer.flush().map_err(WireError::Io)?;
                served.in_bulk += 1;
                continue;
            }
        }
        read(page, &mut buf).map_err(|source| PageServerError::Read { page, source })?;
        if swapdev::is_zero_page(&buf) {
            write_message(
                &mut writer,
                &Message::ZeroPages {
                    first: page,
                    count: 1,
                },
            )?;
            served.zero_pages += 1;
        } else {
            write_page(&mut writer, page, &buf)?;
            served.pages += 1;
        }
        writer.flush().map_err(WireError::Io)?;
    }
}
