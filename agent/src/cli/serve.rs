//! `pagewise serve`: the pager daemon. Listens on a Unix socket; each connection is one VM
//! (Firecracker's handshake or pagewise's), served from its swap device.
//!
//! Which swap device serves which VM:
//! * `--swapdev SPEC`: one VM at a time on `--socket`, from SPEC. Firecracker connections
//!   are named by `--vm-name` (default `vm0`); pagewise requests by their own name.
//! * `--swapdev-dir DIR`: pagewise requests on `--socket` name the VM: it is served from
//!   `DIR/NAME.swap`. Firecracker handshakes carry no name, so they are refused there;
//! * `--vm NAME=SOCKET:SPEC` (repeatable): one extra socket per VM; whatever attaches there
//!   is VM NAME, served from SPEC. This is how Firecracker VMs are named.
//!
//! A SPEC may be a raw snapshot memory file (Firecracker's), served read-only as it is:
//! `raw:PATH`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use pager::attach::server::{valid_vm_name, Naming};
use pager::conventions::default_stats_socket;
use pager::fault_loop::FaultLoopConfig;
use pager::server::access::SocketAccess;
use pager::server::{bind_unix_with, control, Daemon, DaemonConfig, SwapdevProvider};

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Unix socket VMMs attach to (one connection per VM).
    #[arg(long)]
    socket: PathBuf,
    /// Serve one VM at a time from this swap device (file path, nbd://HOST[:PORT]/EXPORT,
    /// nbd+unix:///EXPORT?socket=PATH).
    #[arg(long, conflicts_with = "swapdev_dir")]
    swapdev: Option<String>,
    /// Serve VM NAME from DIR/NAME.swap (pagewise handshakes name the VM).
    #[arg(long)]
    swapdev_dir: Option<PathBuf>,
    /// An extra per-VM socket: NAME=SOCKET:SPEC (repeatable). Use it for Firecracker VMs.
    /// SPEC is a swap device, or a raw snapshot memory file served read-only as it is
    /// (`raw:PATH`).
    #[arg(long = "vm", value_name = "NAME=SOCKET:SPEC")]
    vms: Vec<String>,
    /// Name given to Firecracker VMs attaching to --socket in --swapdev mode.
    #[arg(long, default_value = "vm0")]
    vm_name: String,
    /// Prefetch policy: adaptive (stride when faults stride, bubbling otherwise, and a
    /// background push of the rest while idle), none, bubble, stride, bubble+stride.
    #[arg(long, default_value = pager::prefetch::DEFAULT_POLICY)]
    prefetch: String,
    /// Most page reads in flight per VM (256 measured 1.4x faster than 64 on sequential
    /// scans with prefetch, and 1024 another 1.15-1.25x over 256 from a disk with 2 MiB
    /// merged reads; see docs/perf.md).
    #[arg(long, default_value_t = 1024)]
    max_inflight: usize,
    /// Most pages prefetched per demand fault.
    #[arg(long, default_value_t = 64)]
    prefetch_per_fault: usize,
    /// A guest thread faulted on a page whose checksum fails: pause (SIGSTOP the VMM; the
    /// page is never placed and the thread waits), hold (only that thread waits) or
    /// tear-down (end the VM, naming the page).
    #[arg(long, default_value = "pause", value_parser = ["pause", "hold", "tear-down"])]
    on_damaged_page: String,
    /// Control/stats socket (default: SOCKET.stats).
    #[arg(long)]
    stats_socket: Option<PathBuf>,
    /// Serve Prometheus metrics over HTTP on this loopback address (e.g. 127.0.0.1:9187).
    #[arg(long)]
    metrics_addr: Option<SocketAddr>,
    /// This host's id for swap-device ownership (default: the hostname).
    #[arg(long)]
    host_id: Option<String>,
    /// Longest wait for a complete handshake, in milliseconds.
    #[arg(long, default_value_t = 5000)]
    handshake_timeout_ms: u64,
    /// Working-set sampling interval in milliseconds: every interval the guest is
    /// write-protected and the pages written since are harvested. Each first write to a page
    /// per interval costs a write-protect fault, so shorter intervals track more precisely and
    /// cost the guest more (see docs/evict.md).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(50..))]
    wss_interval_ms: u64,
    /// Create the attach and control sockets mode 0660 owned by this group (a name or a
    /// gid), and serve peers whose group (SO_PEERCRED) it is [default: mode 0600, served
    /// only to this daemon's uid and --allow-uid].
    #[arg(long, value_name = "GROUP")]
    socket_group: Option<String>,
    /// Serve this uid (a number or a user name) on the attach and control sockets too
    /// (repeatable); every other peer is refused and logged.
    #[arg(long = "allow-uid", value_name = "UID")]
    allow_uids: Vec<String>,
    /// Receive migrating VMs on this TCP address (HOST:PORT); needs --psk-file and
    /// --swapdev-dir (each incoming VM gets DIR/NAME.swap).
    #[arg(long, value_name = "ADDR:PORT", requires = "psk_file")]
    migrate_listen: Option<SocketAddr>,
    /// The pre-shared key both hosts' migration endpoints authenticate each other with (a
    /// file of at least 16 bytes; `pagewise migrate` from this daemon uses it too).
    #[arg(long, value_name = "KEY")]
    psk_file: Option<PathBuf>,
    /// This host's TLS certificate (PEM) for the migration link, both ways: the endpoint
    /// then demands TLS and a client certificate signed by --tls-ca, and migrations from
    /// this daemon use TLS and check the destination's certificate names its address.
    #[arg(long, value_name = "PEM", requires_all = ["tls_key", "tls_ca", "psk_file"])]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// The CA (PEM) that signs both hosts' certificates; peers whose certificate it did not
    /// sign are refused.
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    tls_ca: Option<PathBuf>,
    /// Where incoming VMs' files go (guest RAM, QMP socket, serial log): tmpfs or hugetlbfs.
    #[arg(long, default_value = "/dev/shm/pagewise-incoming")]
    migrate_dir: PathBuf,
    /// The attach library incoming QEMUs run under [default: next to the pagewise binary].
    #[arg(long)]
    preload: Option<PathBuf>,
    /// How long a post-copy whose link broke tries to get it back, in seconds (the source
    /// dials again every second, the destination waits), before it gives up (1..=86400).
    #[arg(long, value_name = "SECONDS", default_value_t = 600,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    recover_timeout: u64,
}

/// Install the migration engine (with `--psk-file`) and its endpoint (`--migrate-listen`).
fn start_migration(
    args: &ServeArgs,
    daemon: &Arc<Daemon>,
    host_id: String,
) -> Result<Option<std::thread::JoinHandle<()>>> {
    let Some(psk_file) = &args.psk_file else {
        refuse_journaled_without_engine(args)?;
        return Ok(None);
    };
    let psk = agent::migrate::auth::Psk::from_file(psk_file)
        .with_context(|| format!("--psk-file {}", psk_file.display()))?;
    let tls = match (&args.tls_cert, &args.tls_key, &args.tls_ca) {
        (Some(cert), Some(key), Some(ca)) => Some(
            agent::migrate::tls::TlsConfig::from_files(cert, key, ca)
                .context("--tls-cert/--tls-key/--tls-ca")?,
        ),
        _ => None,
    };
    let swapdev_dir = match (&args.swapdev_dir, &args.migrate_listen) {
        (Some(d), _) => d.clone(),
        (None, Some(_)) => bail!(
            "--migrate-listen needs --swapdev-dir: each incoming VM gets its swap device there"
        ),
        (None, None) => std::env::temp_dir(),
    };
    std::fs::create_dir_all(&args.migrate_dir)
        .with_context(|| format!("--migrate-dir {}", args.migrate_dir.display()))?;
    check_ram_dir(&args.migrate_dir)?;
    let preload = crate::cli::vm::find_preload(args.preload.clone())?;
    let engine = agent::migrate::session::Engine::install(
        agent::migrate::session::EngineConfig {
            psk,
            tls,
            dir: std::fs::canonicalize(&args.migrate_dir)
                .with_context(|| args.migrate_dir.display().to_string())?,
            preload,
            attach_socket: std::path::absolute(&args.socket)
                .with_context(|| args.socket.display().to_string())?,
            swapdev_dir,
            host_id,
            qemu_start_timeout: Duration::from_secs(30),
            recover_timeout: Duration::from_secs(args.recover_timeout),
        },
        daemon,
    );
    let Some(addr) = args.migrate_listen else {
        return Ok(None);
    };
    let listener = std::net::TcpListener::bind(addr)
        .with_context(|| format!("--migrate-listen {addr}: binding"))?;
    let tls = if args.tls_cert.is_some() {
        " (TLS)"
    } else {
        ""
    };
    eprintln!("pagewise serve: migration endpoint on {addr}{tls}");
    Ok(Some(engine.listen(listener)))
}

/// A destination killed after a switchover left a journal: only the migration engine can
/// take that VM's QEMU back (without it the re-attach would be served as an ordinary VM and
/// the pages still on the source would read as zeros), so a daemon without it refuses to
/// start.
fn refuse_journaled_without_engine(args: &ServeArgs) -> Result<()> {
    let Some(dir) = &args.swapdev_dir else {
        return Ok(());
    };
    let dir = agent::migrate::session::journal::dir_of(dir);
    let found = agent::migrate::session::incoming::journal::scan(&dir);
    if let Some((path, _)) = found.first() {
        bail!(
            "{} holds the journal of an incoming migration past its switchover: start with \
             --psk-file (and --migrate-listen) to go on with it; without the migration engine \
             its QEMU's re-attach would read the pages still on the source as zeros",
            path.display()
        );
    }
    Ok(())
}

/// Guest RAM of incoming VMs must be on tmpfs or hugetlbfs (userfaultfd serves those).
fn check_ram_dir(dir: &std::path::Path) -> Result<()> {
    use nix::sys::statfs::{statfs, HUGETLBFS_MAGIC, TMPFS_MAGIC};
    let fs = statfs(dir).with_context(|| format!("--migrate-dir {}", dir.display()))?;
    let kind = fs.filesystem_type();
    if kind != TMPFS_MAGIC && kind != HUGETLBFS_MAGIC {
        bail!(
            "--migrate-dir {} is not on tmpfs or hugetlbfs: incoming guest RAM must be served              there (e.g. /dev/shm/pagewise-incoming)",
            dir.display()
        );
    }
    Ok(())
}

/// Parse `NAME=SOCKET:SPEC`. SPEC may itself contain ':' (nbd URLs), SOCKET may not.
fn parse_vm(arg: &str) -> Result<(String, PathBuf, String)> {
    let (name, rest) = arg
        .split_once('=')
        .with_context(|| format!("--vm {arg:?}: expected NAME=SOCKET:SPEC"))?;
    let (socket, spec) = rest
        .split_once(':')
        .with_context(|| format!("--vm {arg:?}: expected NAME=SOCKET:SPEC"))?;
    if !valid_vm_name(name) {
        bail!("--vm {arg:?}: invalid VM name {name:?} (1-64 of A-Z a-z 0-9 . _ -)");
    }
    if socket.is_empty() || spec.is_empty() {
        bail!("--vm {arg:?}: SOCKET and SPEC must not be empty");
    }
    Ok((name.to_string(), PathBuf::from(socket), spec.to_string()))
}

fn host_id(arg: &Option<String>) -> Result<String> {
    match arg {
        Some(h) => Ok(h.clone()),
        None => Ok(std::fs::read_to_string("/proc/sys/kernel/hostname")
            .context("reading the hostname for --host-id")?
            .trim()
            .to_string()),
    }
}

/// The socket rules of `--socket-group` and `--allow-uid`.
fn socket_access(args: &ServeArgs) -> Result<SocketAccess> {
    use nix::unistd::{Group, User};
    let group = match &args.socket_group {
        None => None,
        Some(g) => Some(match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => Group::from_name(g)
                .with_context(|| format!("--socket-group {g}: looking the group up"))?
                .with_context(|| format!("--socket-group {g}: no such group"))?
                .gid
                .as_raw(),
        }),
    };
    let mut allowed_uids = Vec::new();
    for u in &args.allow_uids {
        allowed_uids.push(match u.parse::<u32>() {
            Ok(uid) => uid,
            Err(_) => User::from_name(u)
                .with_context(|| format!("--allow-uid {u}: looking the user up"))?
                .with_context(|| format!("--allow-uid {u}: no such user"))?
                .uid
                .as_raw(),
        });
    }
    Ok(SocketAccess {
        group,
        allowed_uids,
    })
}

/// Refuse to start with a named swap device that cannot be opened: a typo must show now, not
/// when a VM attaches. Read-only: nothing is written and ownership is not taken. A raw
/// snapshot (`raw:PATH`) only has to be readable; its size is checked against the VM's
/// regions when it attaches.
fn check_device(spec: &str, option: &str) -> Result<()> {
    use pager::server::raw_snapshot::{self, SpecKind};
    if let SpecKind::Raw(target) =
        raw_snapshot::classify(spec).with_context(|| format!("{option}: {spec}"))?
    {
        raw_snapshot::check_readable(&target).with_context(|| format!("{option}: {spec}"))?;
        eprintln!("pagewise serve: {option}: {target} is served as a raw snapshot (read-only)");
        return Ok(());
    }
    let backend = swapdev::backend::spec::open_backend(spec, &Default::default())
        .with_context(|| format!("{option}: cannot open swap device {spec}"))?;
    swapdev::SwapDevice::open(backend, swapdev::OpenOptions::read_only("serve-check"))
        .with_context(|| {
            format!(
                "{option}: {spec} is not a usable swap device (a raw memory file, such as a \
                 Firecracker snapshot's, is served with raw:PATH)"
            )
        })?;
    Ok(())
}

pub fn run(args: ServeArgs) -> Result<ExitCode> {
    if args.swapdev.is_none() && args.swapdev_dir.is_none() && args.vms.is_empty() {
        bail!("give --swapdev SPEC, --swapdev-dir DIR or at least one --vm NAME=SOCKET:SPEC");
    }
    if !valid_vm_name(&args.vm_name) {
        bail!("--vm-name {:?} is not a valid VM name", args.vm_name);
    }
    pager::prefetch::by_name(&args.prefetch, 1)?;
    if args.max_inflight == 0 {
        bail!("--max-inflight must be at least 1");
    }
    let host = host_id(&args.host_id)?;
    let mut provider = SwapdevProvider {
        single: args.swapdev.clone(),
        dir: args.swapdev_dir.clone(),
        host_id: host.clone(),
        ..Default::default()
    };
    if let Some(dir) = &provider.dir {
        if !dir.is_dir() {
            bail!("--swapdev-dir {}: not a directory", dir.display());
        }
    }
    if let Some(spec) = &args.swapdev {
        check_device(spec, "--swapdev")?;
    }
    let access = socket_access(&args)?;
    let mut listeners = Vec::new();
    for v in &args.vms {
        let (name, socket, spec) = parse_vm(v)?;
        check_device(&spec, &format!("--vm {name}"))?;
        if provider.per_vm.insert(name.clone(), spec).is_some() {
            bail!("--vm {name} given twice");
        }
        listeners.push((
            bind_unix_with(&socket, &access)?,
            Naming::Fixed(name),
            socket,
        ));
    }
    let main_naming = match &args.swapdev {
        Some(_) => Naming::Default(args.vm_name.clone()),
        None => Naming::FromRequest,
    };
    listeners.push((
        bind_unix_with(&args.socket, &access)?,
        main_naming,
        args.socket.clone(),
    ));
    let stats_path = args
        .stats_socket
        .clone()
        .unwrap_or_else(|| default_stats_socket(&args.socket));
    let control_listener = bind_unix_with(&stats_path, &access)?;

    // Before any thread starts too: staging buffers go back to the kernel when freed.
    if !pager::evict::heap::keep_large_buffers_out_of_the_heap() {
        tracing::warn!("glibc refused the daemon's malloc settings (mmap threshold, arenas)");
    }
    // Block SIGINT/SIGTERM before any thread starts, so every thread inherits the mask and
    // the signals arrive only through the signalfd below.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    signals.thread_block().context("blocking SIGINT/SIGTERM")?;
    let signal_fd = SignalFd::with_flags(&signals, SfdFlags::SFD_CLOEXEC).context("signalfd")?;

    let daemon = Daemon::new(
        DaemonConfig {
            fault_loop: FaultLoopConfig {
                max_inflight: args.max_inflight,
                prefetch_per_fault: args.prefetch_per_fault,
                on_damaged: pager::damage::DamagePolicy::by_name(&args.on_damaged_page)
                    .context("--on-damaged-page")?,
                ..Default::default()
            },
            prefetch: args.prefetch.clone(),
            handshake_timeout: Duration::from_millis(args.handshake_timeout_ms),
            access,
            ..Default::default()
        },
        Arc::new(provider.clone()),
    )?;
    // Eviction commands (evict, evict_status, wss, stats with working-set fields) and
    // working-set tracking of every VM that can be evicted.
    pager::evict::control::start(
        &daemon,
        pager::evict::EvictConfig {
            sample_interval: Duration::from_millis(args.wss_interval_ms),
            ..Default::default()
        },
    )
    .context("starting working-set tracking")?;
    let mut threads = Vec::new();
    if let Some(t) = start_migration(&args, &daemon, host)? {
        threads.push(t);
    }
    let mut paths = vec![stats_path.clone()];
    for (listener, naming, path) in listeners {
        tracing::info!(socket = %path.display(), ?naming, "listening for VMs");
        paths.push(path);
        let d = daemon.clone();
        threads.push(std::thread::spawn(move || d.serve_attach(listener, naming)));
    }
    {
        let d = daemon.clone();
        threads.push(std::thread::spawn(move || {
            control::serve_control(&d, control_listener)
        }));
    }
    if let Some(addr) = args.metrics_addr {
        threads.push(pager::stats::spawn_metrics_endpoint(daemon.clone(), addr)?);
        tracing::info!(%addr, "Prometheus metrics at http://{addr}/metrics");
    }
    eprintln!(
        "pagewise serve: listening on {} (control: {}); Ctrl-C to stop",
        args.socket.display(),
        stats_path.display()
    );
    let sig = signal_fd.read_signal().context("waiting for a signal")?;
    tracing::info!(signal = ?sig.map(|s| s.ssi_signo), "shutting down");
    daemon.shutdown();
    for t in threads {
        let _ = t.join();
    }
    for p in paths {
        let _ = std::fs::remove_file(p);
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_argument_parsing() {
        let (n, s, spec) = parse_vm("fc1=/run/fc1.sock:nbd://127.0.0.1:10809/swap").unwrap();
        assert_eq!(n, "fc1");
        assert_eq!(s, PathBuf::from("/run/fc1.sock"));
        assert_eq!(spec, "nbd://127.0.0.1:10809/swap");
        assert!(parse_vm("fc1/run/x").is_err());
        assert!(parse_vm("../x=/s:/d").is_err());
        assert!(parse_vm("a=:/d").is_err());
        let (_, s, spec) = parse_vm("fc2=/run/fc2.sock:raw:/snap/mem").unwrap();
        assert_eq!(
            (s, spec.as_str()),
            (PathBuf::from("/run/fc2.sock"), "raw:/snap/mem")
        );
    }
}
