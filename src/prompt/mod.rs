//! The prompt a batch runs with: [`PromptRef`] (text and version), how a job follows it
//! ([`PromptFollow`]: its own, or the active prompt live), and the active prompt in Redis
//! ([`active`]).

use std::sync::Arc;
use tokio::sync::watch;

pub mod active;

/// The prompt a batch runs with. `version` is the `{fr}:prompt` version for jobs that follow
/// the active prompt, and `None` for jobs that carry their own prompt.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PromptRef {
    pub text: Arc<str>,
    pub version: Option<u64>,
}

/// The prompt a job runs with: its own, or the active `{fr}:prompt` followed live.
#[derive(Clone, Debug)]
pub enum PromptFollow {
    Fixed(PromptRef),
    Live(watch::Receiver<PromptRef>),
}

impl PromptFollow {
    /// The prompt to use for the next batch.
    pub fn current(&self) -> PromptRef {
        match self {
            PromptFollow::Fixed(p) => p.clone(),
            PromptFollow::Live(rx) => rx.borrow().clone(),
        }
    }

    /// The version `current` would give, without copying the prompt.
    pub fn version(&self) -> Option<u64> {
        match self {
            PromptFollow::Fixed(p) => p.version,
            PromptFollow::Live(rx) => rx.borrow().version,
        }
    }
}
