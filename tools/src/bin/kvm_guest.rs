//! kvm_guest: a tiny real-mode KVM guest whose memory is served by a pager through
//! userfaultfd. Prints the sum the vCPU computed over the data pages and the sum the image
//! implies; exit status 0 when they agree, 1 when not, 2 on any other error.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::bail;
use clap::Parser;
use pagewise_tools::image::ImageSpec;
use pagewise_tools::kvm_guest::{self, ReadSet};
use pagewise_tools::memhog::attach::HandshakeKind;

#[derive(Parser, Debug)]
#[command(
    name = "kvm_guest",
    about = "Tiny KVM guest whose page faults a pager serves"
)]
struct Args {
    /// The pager's Unix socket.
    #[arg(long)]
    socket: PathBuf,
    /// firecracker or pagewise.
    #[arg(long, default_value = "firecracker")]
    handshake: String,
    #[arg(long, default_value = "vm")]
    vm: String,
    /// Guest memory size in pages (the image must be at least this large).
    #[arg(long, default_value_t = 256)]
    pages: u64,
    /// First data page the vCPU reads (page 0 is the code).
    #[arg(long, default_value_t = 1)]
    first: u64,
    /// How many data pages it reads.
    #[arg(long, default_value_t = 255)]
    count: u64,
    /// Distance between data pages.
    #[arg(long, default_value_t = 1)]
    step: u64,
    /// Image seed and zero-page spacing (as given to memhog gen-image).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    #[arg(long, default_value_t = 0)]
    zero_every: u64,
    #[arg(long)]
    json: bool,
}

fn run(a: &Args) -> anyhow::Result<ExitCode> {
    let kind = match a.handshake.as_str() {
        "firecracker" => HandshakeKind::Firecracker,
        "pagewise" => HandshakeKind::Pagewise { vm: a.vm.clone() },
        other => bail!("unknown handshake {other:?}: expected firecracker or pagewise"),
    };
    let set = ReadSet {
        first: a.first,
        count: a.count,
        step: a.step,
    };
    let spec = ImageSpec {
        seed: a.seed,
        zero_every: a.zero_every,
    };
    let r = kvm_guest::run(&a.socket, &kind, a.pages, set, spec)?;
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "guest read {} pages: sum {:#010x}, image says {:#010x} ({}), {} exits, {:.3} ms",
            set.count,
            r.sum,
            r.expected,
            if r.ok { "ok" } else { "MISMATCH" },
            r.exits,
            r.run_seconds * 1e3
        );
    }
    Ok(if r.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("kvm_guest: error: {e:#}");
            ExitCode::from(2)
        }
    }
}
