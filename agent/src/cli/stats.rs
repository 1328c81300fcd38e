//! `pagewise stats`: ask a running `pagewise serve` for its VMs' counters (or send any
//! control request) over its control socket.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{anyhow, Context, Result};
use clap::Args;
use pager::conventions::default_stats_socket;
use pager::server::control;
use serde_json::{json, Value};

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
    /// Send this raw JSON request instead (e.g. '{"cmd":"list"}') and print the result.
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
    let request: Value = match &args.request {
        Some(raw) => serde_json::from_str(raw).context("--request is not valid JSON")?,
        None => json!({"cmd": "stats", "vm": args.vm}),
    };
    let result = control::request(&socket, &request).map_err(|e| anyhow!(e))?;
    if args.json || args.request.is_some() {
        println!("{}", serde_json::to_string_pretty(&result)?);
    } else {
        print!("{}", table::render_table(&result));
    }
    Ok(ExitCode::SUCCESS)
}
