//! `free-roam`: the worker (`free-roam worker`) and a command line for people who prefer it
//! to redis-cli, speaking exactly the same Redis contract.
//!
//! Exit codes: 0 ok, 1 not found or failed, 2 bad usage or configuration.

mod cli;
mod model_cmd;
mod settings;
mod worker;

use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, Subcommand};
use free_roam::config::Config;
use settings::RawSettings;
use std::process::ExitCode;

// candle allocates a fresh buffer for every tensor it makes; mimalloc reuses them with far
// fewer page faults than the system allocator (BENCHMARKS.md, Model).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

unsafe extern "C" {
    /// mimalloc's option setter (in the library the `mimalloc` crate links).
    fn mi_option_set(option: std::ffi::c_int, value: std::ffi::c_long);
}

/// mimalloc's `purge_delay` option: how long freed memory stays with the process.
const MI_OPTION_PURGE_DELAY: std::ffi::c_int = 15;
/// Freed memory kept this long (ms) before it goes back to the system, against mimalloc's
/// 10: a frame's tensors are freed and made again each batch, and at 10 ms their pages went
/// back in between, to be faulted in and zeroed again (YOLO-World s at batch 1 and 4: 5
/// times the page faults and up to 20% slower; 2 s still left 3 times the faults;
/// BENCHMARKS.md, YOLO-World). A worker idle for longer still returns them.
const KEEP_FREED_MS: std::ffi::c_long = 10_000;

/// Applies [`KEEP_FREED_MS`] unless `MIMALLOC_PURGE_DELAY` sets the delay.
fn keep_freed_memory() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets one of mimalloc's options, before any other thread runs.
        unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, KEEP_FREED_MS) }
    }
}

#[derive(Parser, Debug)]
#[command(
    name = "free-roam",
    version,
    about = "Redis-native workers that run vision-language models on live video",
    long_about = "Redis-native workers that run vision-language models on live video.\n\nEvery setting is a flag and an environment variable of `free-roam worker` (see docs/configuration.md); the other commands take only the Redis connection settings (REDIS_*, KEY_PREFIX)."
)]
struct Cli {
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Commands,
}

#[derive(Subcommand, Debug)]
enum Commands {
    /// Run a worker: claim jobs from Redis and run them until SIGTERM or SIGINT.
    Worker,
    #[command(flatten)]
    Client(cli::ClientCommand),
    /// Model files: write a randomly initialised model for tests and benchmarks.
    #[command(subcommand)]
    Model(model_cmd::ModelCommand),
}

/// The command line: the derived commands, with the settings each one takes.
fn command() -> clap::Command {
    let mut cmd = Cli::command();
    let speaks_to_redis: Vec<String> = cmd
        .get_subcommands()
        .map(|c| c.get_name().to_string())
        .filter(|name| name != "model")
        .collect();
    for name in speaks_to_redis {
        cmd = cmd.mut_subcommand(name, settings::connection_args);
    }
    cmd.mut_subcommand("worker", settings::worker_args)
}

/// The matches of the innermost subcommand, where every setting given lands.
fn innermost(m: &ArgMatches) -> &ArgMatches {
    match m.subcommand() {
        Some((_, sub)) => innermost(sub),
        None => m,
    }
}

fn main() -> ExitCode {
    keep_freed_memory();
    free_roam::model::prepare_cpu_threads();
    let matches = command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    // `None`: the worker; the model files need neither Redis nor settings.
    let client = match cli.command {
        Commands::Model(command) => return model_cmd::run(command),
        Commands::Worker => None,
        Commands::Client(command) => Some(command),
    };
    let raw = RawSettings::from_matches(innermost(&matches));
    let config = match Config::from_lookup(&|name| raw.get(name)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("free-roam: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("free-roam: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let code = runtime.block_on(async move {
        match client {
            None => worker::run(config).await,
            Some(command) => cli::run(command, config, cli.json).await,
        }
    });
    // Leftover blocking reads must not hold the process up once the work is done.
    runtime.shutdown_timeout(std::time::Duration::from_millis(200));
    code
}
