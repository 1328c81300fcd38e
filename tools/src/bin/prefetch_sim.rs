//! prefetch_sim: replay memhog's access patterns against every prefetch policy with the
//! pure simulator (`pager::prefetch::sim`) and print demand faults per pages touched.

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use pager::prefetch::sim::{simulate, SimConfig};
use pager::prefetch::{by_name, POLICY_NAMES};
use pagewise_tools::pattern::{PageStream, Pattern, ZipfTable};

#[derive(Parser, Debug)]
#[command(
    name = "prefetch_sim",
    about = "Replay access patterns against prefetch policies"
)]
struct Args {
    /// Guest pages.
    #[arg(long, default_value_t = 65536)]
    pages: u64,
    /// Accesses per trace (default: 2 x pages).
    #[arg(long)]
    accesses: Option<u64>,
    /// Patterns to replay (memhog syntax).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "seq,random,zipf:0.99,hotcold:4096:0.9"
    )]
    patterns: Vec<Pattern>,
    /// Pages offered with each demand fault.
    #[arg(long, default_value_t = 16)]
    fault_budget: usize,
    /// Background pages per idle slot.
    #[arg(long, default_value_t = 1)]
    idle_budget: usize,
    /// Accesses between idle slots (0: no background fetching).
    #[arg(long, default_value_t = 1)]
    idle_every: u64,
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let a = Args::parse();
    let accesses = a.accesses.unwrap_or(2 * a.pages);
    let cfg = SimConfig {
        fault_budget: a.fault_budget,
        idle_budget: a.idle_budget,
        idle_every: a.idle_every,
    };
    if !a.json {
        println!(
            "{} pages, {} accesses, fault budget {}, {} background page(s) every {} access(es)",
            a.pages, accesses, cfg.fault_budget, cfg.idle_budget, cfg.idle_every
        );
        println!(
            "{:<22} {:<14} {:>9} {:>9} {:>8} {:>10} {:>9}",
            "pattern", "policy", "touched", "faults", "fault%", "prefetched", "unused"
        );
    }
    for pattern in &a.patterns {
        let zipf = match pattern {
            Pattern::Zipf { theta } => Some(Arc::new(ZipfTable::new(a.pages, *theta))),
            _ => None,
        };
        for name in POLICY_NAMES {
            let mut policy = by_name(name, a.pages).expect("listed policy");
            let mut stream = PageStream::new(pattern, a.pages, 0, 1, 7, zipf.clone());
            let trace = (0..accesses).map(|_| stream.next_page());
            let r = simulate(policy.as_mut(), a.pages, trace, cfg);
            if a.json {
                let mut v = serde_json::to_value(&r).expect("serialisable");
                v["pattern"] = serde_json::json!(format!("{pattern:?}"));
                println!("{v}");
            } else {
                println!(
                    "{:<22} {:<14} {:>9} {:>9} {:>7.1}% {:>10} {:>9}",
                    format!("{pattern:?}").chars().take(22).collect::<String>(),
                    name,
                    r.pages_touched,
                    r.demand_faults,
                    100.0 * r.fault_share(),
                    r.prefetched,
                    r.prefetched_unused
                );
            }
        }
    }
    ExitCode::SUCCESS
}
