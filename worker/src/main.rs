//! `free-roam`: the worker (`free-roam worker`) and a command line for people who prefer it
//! to redis-cli, speaking exactly the same Redis contract.
//!
//! Exit codes: 0 ok, 1 not found or failed, 2 bad usage or configuration.

mod cli;
mod model_cmd;
mod settings;
mod worker;

use clap::{Parser, Subcommand};
use free_roam::config::Config;
use settings::RawSettings;
use std::process::ExitCode;

// candle allocates a fresh buffer for every tensor it makes; mimalloc reuses them with far
// fewer page faults than the system allocator (BENCHMARKS.md, Model).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(
    name = "free-roam",
    version,
    about = "Redis-native workers that run vision-language models on live video",
    long_about = "Redis-native workers that run vision-language models on live video.\n\nEvery setting is a flag and an environment variable (see docs/configuration.md)."
)]
struct Cli {
    #[command(flatten)]
    settings: RawSettings,
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

fn main() -> ExitCode {
    free_roam::model::prepare_cpu_threads();
    let cli = Cli::parse();
    let config = match Config::from_lookup(&|name| cli.settings.get(name)) {
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
        match cli.command {
            Commands::Worker => worker::run(config).await,
            Commands::Client(command) => cli::run(command, config, cli.json).await,
            Commands::Model(command) => model_cmd::run(command),
        }
    });
    // Leftover blocking reads must not hold the process up once the work is done.
    runtime.shutdown_timeout(std::time::Duration::from_millis(200));
    code
}
