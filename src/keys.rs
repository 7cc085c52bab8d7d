//! Every Redis key name of the contract, in one place (see docs/redis-contract.md).
//!
//! All keys share the hash tag `{prefix}` so that one function call can touch any of them
//! on Redis Cluster too.

/// The key names for one `KEY_PREFIX`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Keys {
    /// `{prefix}`: the hash tag every key starts with, and the one key every function takes.
    tag: String,
}

/// The consumer group every worker reads the job stream through.
pub const WORKER_GROUP: &str = "workers";

impl Keys {
    pub fn new(prefix: &str) -> Self {
        Self {
            tag: format!("{{{prefix}}}"),
        }
    }

    /// The hash tag itself: the single key passed to every `FCALL`.
    pub fn tag(&self) -> &str {
        &self.tag
    }
    pub fn jobs(&self) -> String {
        format!("{}:jobs", self.tag)
    }
    pub fn job(&self, job_id: &str) -> String {
        format!("{}:job:{job_id}", self.tag)
    }
    pub fn jobs_index(&self) -> String {
        format!("{}:jobs:index", self.tag)
    }
    pub fn jobs_dead(&self) -> String {
        format!("{}:jobs:dead", self.tag)
    }
    pub fn results(&self, job_id: &str) -> String {
        format!("{}:results:{job_id}", self.tag)
    }
    /// The capped stream of alert start and end events of every job.
    pub fn alerts(&self) -> String {
        format!("{}:alerts", self.tag)
    }
    pub fn events(&self) -> String {
        format!("{}:events", self.tag)
    }
    pub fn prompt(&self) -> String {
        format!("{}:prompt", self.tag)
    }
    pub fn prompt_history(&self) -> String {
        format!("{}:prompt:history", self.tag)
    }
    pub fn worker(&self, worker_id: &str) -> String {
        format!("{}:worker:{worker_id}", self.tag)
    }
    pub fn workers_prefix(&self) -> String {
        format!("{}:worker:", self.tag)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_carries_the_hash_tag() {
        let k = Keys::new("fr");
        assert_eq!(k.tag(), "{fr}");
        assert_eq!(k.jobs(), "{fr}:jobs");
        assert_eq!(k.job("a"), "{fr}:job:a");
        assert_eq!(k.results("a"), "{fr}:results:a");
        assert_eq!(k.prompt_history(), "{fr}:prompt:history");
        assert_eq!(k.alerts(), "{fr}:alerts");
        assert_eq!(k.worker("w1"), "{fr}:worker:w1");
    }
}
