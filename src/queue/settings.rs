//! The queue's own settings: how many jobs a worker runs, its lease and reclaim timing, how
//! often a job may be delivered, and how long a job's keys are kept.

use crate::store::functions::{CallIn, Retention};
use crate::store::keys::shard_of_job;
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
    /// `QUEUE_SHARDS_SERVED`: how many of the fleet's queue shards this worker serves; 0 is
    /// all of them ([`QueueSettings::served_shards`]).
    pub shards_served: u32,
}

impl QueueSettings {
    /// The heartbeat's period (`fr_worker_tick`) for the fleet's sweeper (the worker whose
    /// ticks find overdue workers within a second of their deadline, [`Self::sweeper_hold`]):
    /// several per lease, so that one late tick loses nothing, and at most
    /// RECLAIM_INTERVAL_MS, since each tick is also when the worker learns whether a reclaim
    /// pass would find anything.
    pub fn heartbeat_tick(&self) -> Duration {
        super::HEARTBEAT_INTERVAL
            .min(self.reclaim_interval)
            .min(self.job_lease / 3)
    }

    /// The heartbeat's period for every other worker: [`super::RELAXED_HEARTBEAT_INTERVAL`],
    /// still three ticks a lease, and short enough that the sweeper's role, lapsed with a dead
    /// sweeper ([`Self::sweeper_hold`]), is taken up by another worker with time to find the
    /// dead sweeper itself overdue within a tick of its deadline. Never shorter than the
    /// sweeper's tick.
    pub fn relaxed_tick(&self) -> Duration {
        let tick = self.heartbeat_tick();
        let spare = self
            .job_lease
            .saturating_sub(self.sweeper_hold() + tick * 2);
        super::RELAXED_HEARTBEAT_INTERVAL
            .min(self.job_lease / 3)
            .min(spare)
            .max(tick)
    }

    /// How long the sweeper's role stays a worker's after its tick: three of its ticks, so
    /// that one or two late ticks do not hand it on.
    pub fn sweeper_hold(&self) -> Duration {
        self.heartbeat_tick() * 3
    }

    /// How often a worker audits each of its jobs entry by entry (`fr_job_heartbeat`): the
    /// tick is the lease, and a worker declared dead learns it from its next tick, so this
    /// only finds what happened outside the contract (an entry taken over by hand) and costs
    /// a job one entry check per lease.
    pub fn audit_interval(&self) -> Duration {
        self.job_lease.max(self.relaxed_tick())
    }

    /// How a worker calls in to the fleet's clock: a live worker calls in at least once per
    /// relaxed tick, so a fleet-wide silence of two reclaim intervals and a relaxed tick (or
    /// a lease, if shorter) was the server's outage or an empty fleet, not a live owner's
    /// lapse.
    pub fn call_in(&self) -> CallIn {
        let quiet = (self.reclaim_interval * 2 + self.relaxed_tick()).min(self.job_lease);
        CallIn {
            quiet_ms: quiet.as_millis() as u64,
            lease_ms: self.job_lease.as_millis() as u64,
        }
    }

    /// The queue shards this worker serves among the fleet's `shards`: all of them when
    /// `QUEUE_SHARDS_SERVED` is 0 or at least `shards`; else that many consecutive shards
    /// from the one the worker's id hashes to, so a large fleet's workers cover the shards
    /// about evenly without agreeing on anything.
    pub fn served_shards(&self, worker_id: &str, shards: u32) -> Vec<u32> {
        let shards = shards.max(1);
        let served = self.shards_served;
        if served == 0 || served >= shards {
            return (0..shards).collect();
        }
        let first = shard_of_job(worker_id, shards);
        (0..served).map(|i| (first + i) % shards).collect()
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

#[cfg(test)]
mod tests {
    use super::*;

    fn served(shards_served: u32) -> QueueSettings {
        QueueSettings {
            worker_id: None,
            max_concurrent_streams: 8,
            job_lease: Duration::from_secs(15),
            reclaim_interval: Duration::from_secs(1),
            max_attempts: 3,
            shutdown_timeout: Duration::from_secs(5),
            default_fps: 2.0,
            default_prompt: String::new(),
            result_ttl: Duration::from_secs(3600),
            results_maxlen: 10,
            events_maxlen: 10,
            alerts_maxlen: 10,
            prompt_history_max: 10,
            shards_served,
        }
    }

    #[test]
    fn a_worker_serves_all_shards_or_a_run_of_them_from_its_own() {
        assert_eq!(served(0).served_shards("w", 1), vec![0]);
        assert_eq!(served(0).served_shards("w", 4), vec![0, 1, 2, 3]);
        assert_eq!(served(9).served_shards("w", 4), vec![0, 1, 2, 3]);
        let first = shard_of_job("w", 5);
        let two = served(2).served_shards("w", 5);
        assert_eq!(two, vec![first, (first + 1) % 5]);
        // An unset count (0) reads as the one-slot layout.
        assert_eq!(served(2).served_shards("w", 0), vec![0]);
        // Workers spread over the shards: 1,000 ids serving one shard each cover all 8.
        let mut seen = [0u32; 8];
        for i in 0..1000 {
            seen[served(1).served_shards(&format!("host-{i}"), 8)[0] as usize] += 1;
        }
        assert!(seen.iter().all(|&n| n > 80), "{seen:?}");
    }
}
