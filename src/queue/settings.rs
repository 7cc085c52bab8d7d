//! The queue's own settings: how many jobs a worker runs, its lease and reclaim timing, how
//! often a job may be delivered, and how long a job's keys are kept.

use crate::store::functions::{CallIn, Retention};
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
    /// `PROMPT_HISTORY_MAX`: prompt versions `fr_prompt_set` keeps.
    pub prompt_history_max: usize,
}

impl QueueSettings {
    /// The heartbeat's period (`fr_worker_tick`): several per lease, so that one late tick
    /// loses nothing, and at most RECLAIM_INTERVAL_MS, since each tick is also when the worker
    /// learns whether a reclaim pass would find anything.
    pub fn heartbeat_tick(&self) -> Duration {
        super::HEARTBEAT_INTERVAL
            .min(self.reclaim_interval)
            .min(self.job_lease / 3)
    }

    /// How often a worker audits each of its jobs entry by entry (`fr_job_heartbeat`): the
    /// tick is the lease, and a worker declared dead learns it from its next tick, so this
    /// only finds what happened outside the contract (an entry taken over by hand) and costs
    /// a job one entry check per lease.
    pub fn audit_interval(&self) -> Duration {
        self.job_lease.max(self.heartbeat_tick())
    }

    /// How a worker calls in to the fleet's clock: a live worker calls in at least once per
    /// heartbeat tick (which is at most the reclaim interval), so a fleet-wide silence of two
    /// intervals and a tick (or a lease, if shorter) was the server's outage or an empty
    /// fleet, not a live owner's lapse.
    pub fn call_in(&self) -> CallIn {
        let quiet = (self.reclaim_interval * 2 + self.heartbeat_tick()).min(self.job_lease);
        CallIn {
            quiet_ms: quiet.as_millis() as u64,
            lease_ms: self.job_lease.as_millis() as u64,
        }
    }

    /// What a job's end keeps, and for how long.
    pub fn retention(&self) -> Retention {
        Retention {
            results_maxlen: self.results_maxlen,
            ttl_s: self.result_ttl.as_secs(),
            alerts_maxlen: self.alerts_maxlen,
        }
    }
}
