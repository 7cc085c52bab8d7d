//! The queue's own settings: how many jobs a worker runs, its lease and reclaim timing, how
//! often a job may be delivered, and how long a job's keys are kept.

use crate::store::functions::Retention;
use std::time::Duration;

/// `MAX_CONCURRENT_STREAMS`, `JOB_LEASE_MS`, `RECLAIM_INTERVAL_MS`, `MAX_ATTEMPTS`, the
/// defaults a job takes, and the retention limits (`RESULT_TTL_S`, `*_MAXLEN`).
#[derive(Clone, Debug)]
pub struct QueueSettings {
    /// The consumer name; a fresh one per process when unset ([`super::default_worker_id`]).
    pub worker_id: Option<String>,
    pub max_concurrent_streams: usize,
    pub job_lease: Duration,
    pub reclaim_interval: Duration,
    pub max_attempts: u32,
    pub shutdown_timeout: Duration,
    /// The frame rate of a job without `fps`.
    pub default_fps: f64,
    /// The active prompt when `{fr}:prompt` has none.
    pub default_prompt: String,
    pub result_ttl: Duration,
    pub results_maxlen: usize,
    pub events_maxlen: usize,
    pub alerts_maxlen: usize,
}

impl QueueSettings {
    /// What a job's end keeps, and for how long.
    pub fn retention(&self) -> Retention {
        Retention {
            results_maxlen: self.results_maxlen,
            ttl_s: self.result_ttl.as_secs(),
            alerts_maxlen: self.alerts_maxlen,
        }
    }
}
