//! Turns the library's list of settings into clap arguments (each a flag and an environment
//! variable), and hands their raw values to `Config::from_lookup`.

use clap::{Arg, ArgMatches, Args, Command, FromArgMatches};
use free_roam::config::{SECRET_SETTINGS, SETTINGS};
use std::collections::HashMap;

/// The raw value of every setting given as a flag or in the environment.
#[derive(Clone, Debug, Default)]
pub struct RawSettings(HashMap<&'static str, String>);

impl RawSettings {
    pub fn get(&self, name: &str) -> Option<String> {
        self.0.get(name).cloned()
    }
}

fn flag_name(env: &str) -> &'static str {
    Box::leak(env.to_ascii_lowercase().replace('_', "-").into_boxed_str())
}

impl FromArgMatches for RawSettings {
    fn from_arg_matches(m: &ArgMatches) -> Result<Self, clap::Error> {
        let mut values = HashMap::new();
        for s in SETTINGS {
            if let Ok(Some(v)) = m.try_get_one::<String>(s.env) {
                values.insert(s.env, v.clone());
            }
        }
        Ok(Self(values))
    }

    fn update_from_arg_matches(&mut self, m: &ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(m)?;
        Ok(())
    }
}

impl Args for RawSettings {
    fn augment_args(cmd: Command) -> Command {
        let connection = [
            "REDIS_URL",
            "REDIS_CLUSTER_NODES",
            "REDIS_HOST",
            "REDIS_PORT",
            "REDIS_PASSWORD",
            "REDIS_DB",
            "REDIS_TLS_CA_FILE",
            "REDIS_TLS_CERT_FILE",
            "REDIS_TLS_KEY_FILE",
            "KEY_PREFIX",
        ];
        cmd.args(SETTINGS.iter().map(|s| {
            let arg = Arg::new(s.env)
                .long(flag_name(s.env))
                .env(s.env)
                .value_name("VALUE")
                .help(s.help)
                .global(true);
            let arg = if SECRET_SETTINGS.contains(&s.env) {
                arg.hide_env_values(true)
            } else {
                arg
            };
            if connection.contains(&s.env) {
                arg.help_heading("Connection")
            } else {
                arg.help_heading("Worker settings").hide_short_help(true)
            }
        }))
    }

    fn augment_args_for_update(cmd: Command) -> Command {
        Self::augment_args(cmd)
    }
}
