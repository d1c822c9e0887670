//! The long chaos run (`make chaos`): `dig_tests::chaos` with more jobs,
//! workers and time. Prints each fault as it comes, then the table of
//! faults and recovery times; exits non-zero (with the services' logs) on
//! any lost, repeated or differing sample, a queue left non-empty or an
//! object or Redis key of no job.
//!
//! ```sh
//! make chaos ARGS="--minutes 10 --jobs 40"
//! # = scripts/services.sh; source .services/env; target/release/chaos ...
//! ```

use std::time::Duration;

use clap::Parser;
use dig_tests::chaos::{run, ChaosOptions};

/// Faults at random moments while a batch of jobs runs; every sample checked.
#[derive(Parser)]
struct Args {
    /// How long faults keep coming (while jobs are unfinished).
    #[arg(long, default_value_t = 10.0)]
    minutes: f64,
    /// Jobs in the batch.
    #[arg(long, default_value_t = 40)]
    jobs: usize,
    /// Samples per job (the defaults keep the batch busy for about ten
    /// minutes on two cores under faults).
    #[arg(long, default_value_t = 300)]
    samples: u64,
    /// Samples per shard (a multiple of 5).
    #[arg(long, default_value_t = 20)]
    shard_size: u64,
    /// Diffusion steps per sample.
    #[arg(long, default_value_t = 100)]
    steps: u64,
    /// Worker processes.
    #[arg(long, default_value_t = 3)]
    workers: usize,
    /// Seed of the fault schedule (default: the clock).
    #[arg(long)]
    seed: Option<u64>,
    /// `worker.max_deaths` (worker deaths a shard survives; default: the
    /// production 20). Kills never spend `worker.max_attempts`.
    #[arg(long)]
    max_deaths: Option<u32>,
    /// Longest pause between faults, in seconds (the shortest is 0.5).
    #[arg(long, default_value_t = 6.0)]
    max_gap: f64,
}

fn main() {
    let a = Args::parse();
    let seed = a.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    });
    let report = run(&ChaosOptions {
        seed,
        window: Duration::from_secs_f64(a.minutes * 60.0),
        jobs: a.jobs,
        samples: a.samples,
        shard_size: a.shard_size,
        steps: a.steps,
        workers: a.workers,
        gap: (
            Duration::from_millis(500),
            Duration::from_secs_f64(a.max_gap.max(0.5)),
        ),
        max_deaths: a.max_deaths,
    });
    print!("{}", report.table());
    if report
        .faults
        .last()
        .is_some_and(|f| f.at.as_secs_f64() < a.minutes * 60.0 - 60.0)
    {
        println!(
            "note: the batch finished before the {} min window ended; more --jobs or --samples keep faults coming longer",
            a.minutes
        );
    }
    println!("seed {seed} (--seed {seed} repeats the schedule)");
}
