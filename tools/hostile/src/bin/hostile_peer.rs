//! `hostile-peer`: play misbehaviours against a migration endpoint and print what it did,
//! each followed by a valid handshake that shows whether the endpoint still serves.
//!
//! ```text
//! hostile-peer --to 127.0.0.1:7777 --psk-file KEY all
//! hostile-peer --to 127.0.0.1:7777 --psk-file KEY bad-magic stall
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use agent::migrate::auth::Psk;
use clap::Parser;
use pagewise_hostile::{error_chain, handshake, Endpoint, SCENARIOS, STALL_PATIENCE};

#[derive(Parser)]
#[command(about = "Misbehave against a pagewise migration endpoint and report what it did")]
struct Args {
    /// The endpoint (`pagewise serve --migrate-listen`).
    #[arg(long)]
    to: SocketAddr,
    /// The endpoint's pre-shared key (scenarios past the handshake need it).
    #[arg(long)]
    psk_file: PathBuf,
    /// How long the endpoint may stay silent before a scenario calls it silent.
    #[arg(long, default_value_t = 3000)]
    patience_ms: u64,
    /// Scenarios to run, or `all`; `list` names them.
    #[arg(required = true)]
    scenarios: Vec<String>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.scenarios.iter().any(|s| s == "list") {
        for (name, _) in SCENARIOS {
            println!("{name}");
        }
        return ExitCode::SUCCESS;
    }
    let key = match Psk::from_file(&args.psk_file) {
        Ok(k) => k,
        Err(e) => {
            eprintln!("hostile-peer: {}", error_chain(&e));
            return ExitCode::FAILURE;
        }
    };
    let all = args.scenarios.iter().any(|s| s == "all");
    let mut survived = true;
    for want in &args.scenarios {
        if !all && !SCENARIOS.iter().any(|(n, _)| n == want) {
            eprintln!("hostile-peer: unknown scenario {want:?} (try `list`)");
            return ExitCode::FAILURE;
        }
    }
    for (name, run) in SCENARIOS {
        if !all && !args.scenarios.iter().any(|s| s == name) {
            continue;
        }
        let patience = match *name {
            "stall" => STALL_PATIENCE,
            _ => Duration::from_millis(args.patience_ms),
        };
        let ep = Endpoint {
            addr: args.to,
            key: key.clone(),
            patience,
        };
        match run(&ep) {
            Ok(outcome) => println!("{name}: {outcome}"),
            Err(e) => println!("{name}: could not be played: {}", error_chain(&e)),
        }
        match handshake(&ep) {
            Ok(o) => println!("  endpoint still serves (version {})", o.version),
            Err(e) => {
                println!("  endpoint does not serve any more: {}", error_chain(&e));
                survived = false;
            }
        }
    }
    if survived {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
