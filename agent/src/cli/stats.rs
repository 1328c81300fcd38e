//! `pagewise stats`: ask a running `pagewise serve` for its VMs' counters (or send any
//! control request) over its control socket.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::Args;
use pager::conventions::default_stats_socket;
use pager::server::protocol::{self, Response};
use pager::server::ControlClient;
use serde_json::Value;

mod table;

#[derive(Args, Debug)]
pub struct StatsArgs {
    /// The control socket (`pagewise serve`'s --stats-socket), or the serve socket itself,
    /// in which case SOCKET.stats is used.
    #[arg(long)]
    socket: PathBuf,
    /// Only this VM.
    #[arg(long)]
    vm: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Send this raw control request instead (e.g. '{"op":"list"}'; "v" is added when left
    /// out) and print the response.
    #[arg(long, value_name = "JSON")]
    request: Option<String>,
}

fn control_socket(path: PathBuf) -> PathBuf {
    let derived = default_stats_socket(&path);
    if !path.to_string_lossy().ends_with(".stats") && derived.exists() {
        derived
    } else {
        path
    }
}

pub fn run(args: StatsArgs) -> Result<ExitCode> {
    let socket = control_socket(args.socket);
    let mut client = ControlClient::connect(&socket)?;
    if let Some(raw) = &args.request {
        let mut value: Value = serde_json::from_str(raw).context("--request is not valid JSON")?;
        // The version may be left out on the command line.
        if let Some(obj) = value.as_object_mut() {
            obj.entry("v").or_insert(protocol::PROTOCOL_VERSION.into());
        }
        match client.call_raw(&value.to_string())? {
            Response::Error { message } => bail!("the daemon refused: {message}"),
            r => println!("{}", serde_json::to_string_pretty(&r)?),
        }
        return Ok(ExitCode::SUCCESS);
    }
    let report = client.stats(args.vm.as_deref())?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", table::render_table(&serde_json::to_value(&report)?));
    }
    Ok(ExitCode::SUCCESS)
}
