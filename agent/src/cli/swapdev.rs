//! `pagewise swapdev ...`: create, inspect, check, move and convert swap devices.
//!
//! DEVICE is a backend spec: a file path, `nbd://HOST[:PORT]/EXPORT` or
//! `nbd+unix:///EXPORT?socket=PATH`.

use std::fs::File;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use pager::conventions::parse_size;
use swapdev::backend::spec::{open_backend, SpecOptions};
use swapdev::backend::Backend;
use swapdev::{ChecksumKind, CodecPolicy, CreateOptions, OpenOptions, SwapDevice};

#[derive(Args, Debug)]
pub struct SwapdevArgs {
    #[command(subcommand)]
    command: SwapdevCommand,
}

#[derive(Subcommand, Debug)]
enum SwapdevCommand {
    /// Format an empty swap device (left unowned unless --keep-owned).
    Create(CreateArgs),
    /// Print what a device holds: pages stored/zero/compressed, bytes, ratio, owner.
    Inspect(InspectArgs),
    /// Verify headers, checkpoint, log and every page checksum; exit 1 on damage.
    Fsck(InspectArgs),
    /// Build a device from a raw RAM image (e.g. a QEMU /dev/shm backing file).
    Import(ImportArgs),
    /// Write a device's pages back as a raw RAM image.
    Export(ExportArgs),
    /// Take ownership of a device on this host (recovering it if needed).
    Acquire(OwnerArgs),
    /// Give up ownership: checkpoint, flush, mark unowned at a new generation.
    Release(OwnerArgs),
}

#[derive(Args, Debug, Clone)]
struct FormatArgs {
    /// Page size: 4096 (4K) or 2097152 (2M).
    #[arg(long, default_value = "4096", value_parser = parse_page_size)]
    page_size: u32,
    /// VM uuid recorded in the header (random if not given).
    #[arg(long)]
    vm_uuid: Option<uuid::Uuid>,
    /// Codec for new pages: lz4 (raw when it does not shrink a page) or raw.
    #[arg(long, default_value = "lz4")]
    codec: CodecPolicy,
    /// Page checksum: crc32c or xxh3.
    #[arg(long, default_value = "crc32c")]
    checksum: ChecksumKind,
    /// Overwrite whatever the backend holds.
    #[arg(long)]
    force: bool,
    /// Keep the device owned by this host afterwards (default: release it).
    #[arg(long)]
    keep_owned: bool,
}

#[derive(Args, Debug)]
struct CreateArgs {
    device: String,
    /// Capacity in pages.
    #[arg(long, conflicts_with = "size")]
    pages: Option<u64>,
    /// Capacity in bytes (a multiple of the page size; K, M, G suffixes), e.g. the VM's RAM
    /// size: 512M.
    #[arg(long, value_parser = parse_size)]
    size: Option<u64>,
    #[command(flatten)]
    format: FormatArgs,
    #[command(flatten)]
    host: HostArg,
}

#[derive(Args, Debug)]
struct InspectArgs {
    device: String,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct ImportArgs {
    /// The raw image: page N at offset N * page size.
    image: PathBuf,
    /// Created if it holds nothing; an existing device must have the image's size.
    device: String,
    #[command(flatten)]
    format: FormatArgs,
    #[command(flatten)]
    host: HostArg,
}

#[derive(Args, Debug)]
struct ExportArgs {
    device: String,
    image: PathBuf,
    /// Overwrite an existing image file.
    #[arg(long)]
    force: bool,
}

#[derive(Args, Debug)]
struct OwnerArgs {
    device: String,
    #[command(flatten)]
    host: HostArg,
    /// Acquire: take the device even though another host owns it (bumps the generation,
    /// fencing that host off).
    #[arg(long)]
    force: bool,
}

#[derive(Args, Debug, Clone)]
struct HostArg {
    /// This host's id as recorded in the header (default: the hostname).
    #[arg(long)]
    host_id: Option<String>,
}

impl HostArg {
    fn resolve(&self) -> Result<String> {
        match &self.host_id {
            Some(h) => Ok(h.clone()),
            None => Ok(std::fs::read_to_string("/proc/sys/kernel/hostname")
                .context("reading the hostname for --host-id")?
                .trim()
                .to_string()),
        }
    }
}

fn backend(spec: &str, create: bool) -> Result<Box<dyn Backend>> {
    let opts = SpecOptions {
        create,
        ..SpecOptions::default()
    };
    open_backend(spec, &opts).with_context(|| format!("opening {spec}"))
}

pub fn run(args: SwapdevArgs) -> Result<ExitCode> {
    match args.command {
        SwapdevCommand::Create(a) => create(a),
        SwapdevCommand::Inspect(a) => inspect(a),
        SwapdevCommand::Fsck(a) => fsck(a),
        SwapdevCommand::Import(a) => import(a),
        SwapdevCommand::Export(a) => export(a),
        SwapdevCommand::Acquire(a) => acquire(a),
        SwapdevCommand::Release(a) => release(a),
    }
}

fn create_options(f: &FormatArgs, host: String, pages: u64) -> CreateOptions {
    CreateOptions {
        vm_uuid: f.vm_uuid.unwrap_or_else(uuid::Uuid::new_v4),
        page_size: f.page_size,
        capacity_pages: pages,
        host_id: host,
        codec: f.codec,
        checksum: f.checksum,
        force: f.force,
    }
}

fn parse_page_size(s: &str) -> Result<u32, String> {
    let bytes = parse_size(s).map_err(|e| e.to_string())?;
    u32::try_from(bytes).map_err(|_| format!("page size {s:?} is too large"))
}

fn pages_for(bytes: u64, page_size: u32, what: &str) -> Result<u64> {
    if bytes == 0 || !bytes.is_multiple_of(page_size as u64) {
        bail!("{what} of {bytes} bytes is not a non-zero multiple of the page size {page_size}");
    }
    Ok(bytes / page_size as u64)
}

fn finish(dev: SwapDevice, keep_owned: bool) -> Result<()> {
    if keep_owned {
        dev.close()?;
    } else {
        dev.release()?;
    }
    Ok(())
}

fn create(a: CreateArgs) -> Result<ExitCode> {
    let pages = match (a.pages, a.size) {
        (Some(p), None) => p,
        (None, Some(s)) => pages_for(s, a.format.page_size, "--size")?,
        _ => bail!("give the capacity with --pages or --size"),
    };
    let opts = create_options(&a.format, a.host.resolve()?, pages);
    let dev = SwapDevice::create(backend(&a.device, true)?, opts)
        .with_context(|| format!("creating a swap device on {}", a.device))?;
    println!(
        "created {} ({} pages of {} bytes, vm {})",
        a.device,
        pages,
        a.format.page_size,
        dev.vm_uuid()
    );
    finish(dev, a.format.keep_owned)?;
    Ok(ExitCode::SUCCESS)
}

fn inspect(a: InspectArgs) -> Result<ExitCode> {
    let dev = SwapDevice::open(
        backend(&a.device, false)?,
        OpenOptions::read_only("inspect"),
    )
    .with_context(|| format!("opening swap device {}", a.device))?;
    let s = dev.inspect();
    if a.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(ExitCode::SUCCESS);
    }
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    println!("device           {}", s.backend);
    println!("format version   {}", s.format_version);
    println!("vm uuid          {}", s.vm_uuid);
    println!("page size        {} bytes", s.page_size);
    println!(
        "capacity         {} pages ({:.1} MiB)",
        s.capacity_pages,
        mib(s.capacity_pages * s.page_size as u64)
    );
    println!("codec/checksum   {:?} / {:?}", s.codec, s.checksum);
    println!(
        "pages            {} stored ({} compressed), {} zero, {} absent",
        s.pages_stored, s.pages_compressed, s.pages_zero, s.pages_absent
    );
    println!(
        "bytes            {:.1} MiB stored for {:.1} MiB of pages (ratio {:.2})",
        mib(s.stored_bytes),
        mib(s.logical_bytes),
        s.compression_ratio
    );
    println!(
        "owner            {} ({}), generation {}",
        s.owner,
        if s.owned { "owned" } else { "released" },
        s.generation
    );
    println!(
        "data area        {} segments of {:.0} MiB, {} free; checkpoint {}",
        s.segments_total,
        mib(s.segment_size),
        s.segments_free,
        s.checkpoint_seq
    );
    Ok(ExitCode::SUCCESS)
}

fn fsck(a: InspectArgs) -> Result<ExitCode> {
    let report = SwapDevice::fsck_backend(backend(&a.device, false)?)
        .with_context(|| format!("checking {}", a.device))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for n in &report.notes {
            println!("note: {n}");
        }
        for e in &report.errors {
            println!("DAMAGE: {e}");
        }
        println!(
            "{}: {} pages checked, {} zero, {} errors",
            a.device,
            report.pages_checked,
            report.pages_zero,
            report.errors.len()
        );
    }
    Ok(if report.is_clean() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn import(a: ImportArgs) -> Result<ExitCode> {
    let mut image =
        File::open(&a.image).with_context(|| format!("opening image {}", a.image.display()))?;
    let image_len = image.metadata()?.len();
    let host = a.host.resolve()?;
    let be = backend(&a.device, true)?;
    let fresh = be.size()? == 0 || a.format.force;
    let existing = if fresh {
        None
    } else {
        // An existing device: the image must match its size (checked before writing).
        match SwapDevice::open(be, OpenOptions::read_write(&host, true, false)) {
            Ok(d) => Some(d),
            // Not formatted (e.g. a fresh NBD export of zeros): create below; create
            // itself refuses a backend holding other data.
            Err(swapdev::SwapError::BadMagic { .. }) => None,
            Err(e) => {
                return Err(e).with_context(|| format!("opening {} to import into it", a.device))
            }
        }
    };
    let mut dev = match existing {
        Some(d) => d,
        None => {
            let pages = pages_for(image_len, a.format.page_size, "image")?;
            SwapDevice::create(
                backend(&a.device, true)?,
                create_options(&a.format, host, pages),
            )
            .with_context(|| format!("creating a swap device on {}", a.device))?
        }
    };
    let t = std::time::Instant::now();
    let stats = dev
        .import_image(
            &mut std::io::BufReader::with_capacity(4 << 20, &mut image),
            image_len,
        )
        .with_context(|| format!("importing {}", a.image.display()))?;
    let s = dev.inspect();
    println!(
        "imported {} pages ({} zero) in {:.2} s; stored {:.1} MiB (ratio {:.2})",
        stats.pages,
        stats.zero_pages,
        t.elapsed().as_secs_f64(),
        s.stored_bytes as f64 / (1 << 20) as f64,
        s.compression_ratio
    );
    finish(dev, a.format.keep_owned)?;
    Ok(ExitCode::SUCCESS)
}

fn export(a: ExportArgs) -> Result<ExitCode> {
    if a.image.exists() && !a.force {
        bail!(
            "{} exists; refusing to overwrite it (use --force)",
            a.image.display()
        );
    }
    let mut dev = SwapDevice::open(backend(&a.device, false)?, OpenOptions::read_only("export"))
        .with_context(|| format!("opening swap device {}", a.device))?;
    let out = File::create(&a.image).with_context(|| format!("creating {}", a.image.display()))?;
    let stats = dev.export_image(&out)?;
    println!(
        "exported {} pages ({} zero, {} never stored) to {}",
        stats.pages,
        stats.zero_pages,
        stats.absent_pages,
        a.image.display()
    );
    Ok(ExitCode::SUCCESS)
}

fn acquire(a: OwnerArgs) -> Result<ExitCode> {
    let host = a.host.resolve()?;
    let dev = SwapDevice::open(
        backend(&a.device, false)?,
        OpenOptions::read_write(&host, true, a.force),
    )
    .with_context(|| format!("acquiring {}", a.device))?;
    println!(
        "{} acquired by {host} at generation {}",
        a.device,
        dev.generation()
    );
    dev.close()?;
    Ok(ExitCode::SUCCESS)
}

fn release(a: OwnerArgs) -> Result<ExitCode> {
    let host = a.host.resolve()?;
    let dev = SwapDevice::open(
        backend(&a.device, false)?,
        OpenOptions::read_write(&host, false, false),
    )
    .with_context(|| format!("releasing {}", a.device))?;
    dev.release()?;
    println!("{} released by {host}", a.device);
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(subcommand)]
        command: SwapdevCommand,
    }

    fn cli(args: &[&str]) -> Result<ExitCode> {
        let parsed = Cli::try_parse_from(std::iter::once("swapdev").chain(args.iter().copied()))?;
        run(SwapdevArgs {
            command: parsed.command,
        })
    }

    #[test]
    fn commands_round_trip_and_fsck_exit_code() {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let p = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
        let (img, dev, out) = (p("ram.img"), p("dev.swap"), p("out.img"));
        let mut image = vec![0u8; 512 * 4096];
        for (i, b) in image.iter_mut().enumerate().skip(4096 * 100) {
            *b = (i % 251) as u8 ^ (i / 4096) as u8;
        }
        std::fs::write(&img, &image).unwrap();
        assert_eq!(
            cli(&["import", &img, &dev, "--host-id", "h1", "--codec", "raw"]).unwrap(),
            ExitCode::SUCCESS
        );
        assert_eq!(
            cli(&["inspect", &dev, "--json"]).unwrap(),
            ExitCode::SUCCESS
        );
        assert_eq!(cli(&["fsck", &dev]).unwrap(), ExitCode::SUCCESS);
        assert_eq!(cli(&["export", &dev, &out]).unwrap(), ExitCode::SUCCESS);
        assert!(std::fs::read(&out).unwrap() == image);
        let err = cli(&["export", &dev, &out]).unwrap_err().to_string();
        assert!(err.contains("refusing to overwrite"), "{err}");
        // Released after import: any host may acquire; then only it may release.
        assert_eq!(
            cli(&["acquire", &dev, "--host-id", "h2"]).unwrap(),
            ExitCode::SUCCESS
        );
        let err = format!(
            "{:#}",
            cli(&["acquire", &dev, "--host-id", "h3"]).unwrap_err()
        );
        assert!(err.contains("owned by host h2"), "{err}");
        assert!(cli(&["release", &dev, "--host-id", "h1"]).is_err());
        assert_eq!(
            cli(&["release", &dev, "--host-id", "h2"]).unwrap(),
            ExitCode::SUCCESS
        );
        // Import into an existing device of another size is refused.
        std::fs::write(&img, vec![1u8; 8192]).unwrap();
        let err = format!(
            "{:#}",
            cli(&["import", &img, &dev, "--host-id", "h1"]).unwrap_err()
        );
        assert!(err.contains("image is 8192 bytes"), "{err}");
        // Damage: fsck exits non-zero.
        let f = std::fs::OpenOptions::new().write(true).open(&dev).unwrap();
        let data = std::fs::read(&dev).unwrap();
        let page = &image[200 * 4096..201 * 4096];
        let at = data
            .windows(4096)
            .step_by(4096)
            .position(|w| w == page)
            .map(|i| i * 4096)
            .expect("page 200 stored raw");
        std::os::unix::fs::FileExt::write_all_at(&f, &[data[at + 9] ^ 1], (at + 9) as u64).unwrap();
        drop(f);
        assert_eq!(cli(&["fsck", &dev]).unwrap(), ExitCode::FAILURE);
        // Bad arguments.
        assert!(cli(&["create", &p("x.swap"), "--size", "1000"]).is_err());
        assert!(cli(&[
            "create",
            &p("y.swap"),
            "--pages",
            "8",
            "--page-size",
            "8192"
        ])
        .is_err());
    }
}
