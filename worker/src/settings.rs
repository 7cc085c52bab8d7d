//! Turns the library's list of settings into clap arguments (each a flag and an environment
//! variable) and hands their raw values to `Config::from_lookup`. The connection settings
//! (`CONNECTION_SETTINGS`) go to every command that speaks to Redis; the rest only to
//! `worker`, so a client command neither lists nor accepts them.

use clap::{Arg, ArgMatches, Command};
use free_roam::config::{CONNECTION_SETTINGS, SECRET_SETTINGS, SETTINGS, Setting};
use std::collections::HashMap;

/// The raw value of every setting given as a flag or in the environment.
#[derive(Clone, Debug, Default)]
pub struct RawSettings(HashMap<&'static str, String>);

impl RawSettings {
    pub fn get(&self, name: &str) -> Option<String> {
        self.0.get(name).cloned()
    }

    /// The settings the command of `m` took (its own matches, where global flags land too).
    pub fn from_matches(m: &ArgMatches) -> Self {
        let values = SETTINGS
            .iter()
            .filter_map(|s| match m.try_get_one::<String>(s.env) {
                Ok(Some(v)) => Some((s.env, v.clone())),
                _ => None,
            })
            .collect();
        Self(values)
    }
}

fn flag_name(env: &str) -> &'static str {
    Box::leak(env.to_ascii_lowercase().replace('_', "-").into_boxed_str())
}

fn is_connection(s: &Setting) -> bool {
    CONNECTION_SETTINGS.contains(&s.env)
}

fn arg(s: &Setting) -> Arg {
    let arg = Arg::new(s.env)
        .long(flag_name(s.env))
        .env(s.env)
        .value_name("VALUE")
        .help(s.help);
    if SECRET_SETTINGS.contains(&s.env) {
        arg.hide_env_values(true)
    } else {
        arg
    }
}

/// Adds the connection settings to a command that speaks to Redis (given before or after
/// its subcommands).
pub fn connection_args(cmd: Command) -> Command {
    cmd.args(
        SETTINGS
            .iter()
            .filter(|s| is_connection(s))
            .map(|s| arg(s).global(true).help_heading("Connection")),
    )
}

/// Adds every other setting to `worker`: `-h` lists the connection, `--help` all of them.
pub fn worker_args(cmd: Command) -> Command {
    cmd.args(SETTINGS.iter().filter(|s| !is_connection(s)).map(|s| {
        let heading = if s.env.starts_with("OPENAI_") {
            "OpenAI settings (MODEL_TYPE=openai)"
        } else {
            "Worker settings"
        };
        arg(s).help_heading(heading).hide_short_help(true)
    }))
}
