//! `free-roam model make`: writes a randomly initialised model in a family's real layout
//! (config.json, tokenizer.json, model.safetensors) for tests, demos and benchmarks.

use clap::Subcommand;
use std::process::ExitCode;

#[derive(Subcommand, Debug)]
pub enum ModelCommand {
    /// Write a randomly initialised model (config.json, model.safetensors, tokenizer.json).
    Make {
        /// clip, siglip, owlvit, yoloworld, blip or paligemma.
        #[arg(long = "type")]
        kind: String,
        /// tiny (for tests) or full (the real sizes, for benchmarks); yoloworld also takes
        /// its scales n, s, m, l, x (full is s).
        #[arg(long, default_value = "tiny")]
        size: String,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        dir: std::path::PathBuf,
    },
}

/// `free-roam model ...`.
pub fn run(cmd: ModelCommand) -> ExitCode {
    use free_roam::model::{ModelSize, ModelType, write_random_model};
    match cmd {
        ModelCommand::Make {
            kind,
            size,
            seed,
            dir,
        } => {
            let kind: ModelType = match kind.parse() {
                Ok(k) => k,
                Err(e) => {
                    eprintln!("free-roam: --type: {e}");
                    return ExitCode::from(2);
                }
            };
            let size: ModelSize = match size.parse() {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("free-roam: --size: {e}");
                    return ExitCode::from(2);
                }
            };
            match write_random_model(kind, size, seed, &dir) {
                Ok(()) => {
                    println!("{}", dir.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("free-roam: {e}");
                    ExitCode::from(1)
                }
            }
        }
    }
}
