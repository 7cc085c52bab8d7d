//! Every Redis key name of the contract, in one place (see docs/redis-contract.md).
//!
//! The queue, the job hashes, the prompt and the fleet's bookkeeping share the hash tag
//! `{prefix}`, so one function call can touch any of them on Redis Cluster too. What a job
//! writes per frame (its results and progress) lives under the job's own tag
//! `{prefix:<job_id>}`, so a Cluster spreads that load over its masters.

/// The key names for one `KEY_PREFIX`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
    /// `{prefix}`: the hash tag of the queue's keys, and the one key its functions take.
    tag: String,
}

/// An event's name in its snapshot key: its `kind` and its `alert_id` (which holds the
/// job id), so that the start and end of one alert, or the enter and leave of one stay,
/// are apart.
pub fn snapshot_name(kind: &str, alert_id: &str) -> String {
    format!("{kind}:{alert_id}")
}

/// The consumer group every worker reads the job stream through.
pub const WORKER_GROUP: &str = "workers";

/// The most queue shards a fleet may use.
pub const MAX_QUEUE_SHARDS: u32 = 1024;

/// The field of shard 0's `{prefix}:settings` that holds the fleet's queue shard count.
pub const QUEUE_SHARDS_FIELD: &str = "queue_shards";

/// The queue shard a job with this id belongs to among `shards`: FNV-1a (32 bits) of the
/// id's bytes, modulo `shards`. What `free-roam submit` uses, and where the CLI looks for a
/// job first; a job queued with a plain `XADD {fr}:jobs` is in shard 0 whatever its id.
pub fn shard_of_job(job_id: &str, shards: u32) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in job_id.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h % shards.max(1)
}

impl Keys {
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_string(),
            tag: format!("{{{prefix}}}"),
        }
    }

    /// The hash tag itself: the single key passed to the queue's functions.
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// The keys of queue shard `shard`: shard 0 is the deployment's own tag `{prefix}` (so a
    /// one-shard fleet is the one-slot layout, and `XADD {prefix}:jobs` its front door),
    /// shard i >= 1 is `{prefix:q<i>}`, a slot of its own with its own jobs stream, job
    /// hashes, leases and fleet bookkeeping. Job tags (`{prefix:<job_id>}`) share that form
    /// but never a key name: a shard has no `results`, `progress`, `snap:` or `latest` key.
    pub fn shard(&self, shard: u32) -> Self {
        let tag = if shard == 0 {
            format!("{{{}}}", self.prefix)
        } else {
            format!("{{{}:q{shard}}}", self.prefix)
        };
        Self {
            prefix: self.prefix.clone(),
            tag,
        }
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
    /// `{prefix:<job_id>}`: one job's own hash tag, the key `fr_job_end` takes. Job ids
    /// hold no braces (see `job::validate_job_id`), so the tag is the whole braced part.
    pub fn job_tag(&self, job_id: &str) -> String {
        format!("{{{}:{job_id}}}", self.prefix)
    }
    /// The job's result stream, in the job's own slot.
    pub fn results(&self, job_id: &str) -> String {
        format!("{}:results", self.job_tag(job_id))
    }
    /// The job's progress hash (counters, cursor, results written, end marker), in the
    /// job's own slot so that each result write touches one slot.
    pub fn progress(&self, job_id: &str) -> String {
        format!("{}:progress", self.job_tag(job_id))
    }
    /// The JPEG of one event's moment (see [`crate::snapshot`]), in the job's own slot: `name`
    /// is [`snapshot_name`] of the event.
    pub fn snapshot(&self, job_id: &str, name: &str) -> String {
        format!("{}:snap:{name}", self.job_tag(job_id))
    }
    /// The JPEG of a running job's latest annotated frame, in the job's own slot.
    pub fn latest_snapshot(&self, job_id: &str) -> String {
        format!("{}:latest", self.job_tag(job_id))
    }
    /// Fleet-wide settings workers publish for the functions to read.
    pub fn settings(&self) -> String {
        format!("{}:settings", self.tag)
    }
    /// When a worker last called in, and how long reclaiming is held after a server outage
    /// and where the fleet's sweep of the pending list is (written by `fr_worker_tick`,
    /// `fr_job_heartbeat` and `fr_job_reclaim`).
    pub fn fleet(&self) -> String {
        format!("{}:fleet", self.tag)
    }
    /// Entries of jobs cancelled while queued (entry id -> job id), until a worker acks
    /// them: a cancelled job never runs, even when its hash expired before its entry was
    /// read.
    pub fn jobs_cancelled(&self) -> String {
        format!("{}:jobs:cancelled", self.tag)
    }
    /// The workers' leases: member = worker id, score = its deadline in ms (`fr_worker_tick`
    /// renews it every tick; `fr_job_reclaim` removes the overdue).
    pub fn workers_alive(&self) -> String {
        format!("{}:workers:alive", self.tag)
    }
    /// The entry ids a worker owns (claimed and not yet acked or handed back).
    pub fn owned(&self, worker_id: &str) -> String {
        format!("{}:owned:{worker_id}", self.tag)
    }
    /// The job ids `fr_cancel` asked a worker to stop, read with each of its ticks.
    pub fn cancels(&self, worker_id: &str) -> String {
        format!("{}:cancel:{worker_id}", self.tag)
    }
    /// Entries whose owner is gone (handed back, or declared dead), by when: any worker's
    /// next reclaim pass takes them.
    pub fn orphans(&self) -> String {
        format!("{}:orphans", self.tag)
    }
    /// A worker's wake-up list: the job ids `fr_cancel` asked it to stop, which it waits
    /// on with `BLPOP` and acts on at once.
    pub fn wake(&self, worker_id: &str) -> String {
        format!("{}:wake:{worker_id}", self.tag)
    }
    /// Tokens pushed when entries become orphans, one per entry: each wakes one waiting
    /// worker to run a reclaim pass.
    pub fn orphans_wake(&self) -> String {
        format!("{}:orphans:wake", self.tag)
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
    /// True for a key of this deployment: one of the queue's `{prefix}...` keys or a job's
    /// `{prefix:<job_id>}...` keys.
    pub fn owns(&self, key: &str) -> bool {
        key.starts_with(&self.tag)
            || key
                .strip_prefix('{')
                .and_then(|rest| rest.strip_prefix(self.prefix.as_str()))
                .is_some_and(|rest| rest.starts_with(':'))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_keys_share_one_tag_and_job_keys_have_their_own() {
        let k = Keys::new("fr");
        assert_eq!(k.tag(), "{fr}");
        assert_eq!(k.jobs(), "{fr}:jobs");
        assert_eq!(k.job("a"), "{fr}:job:a");
        assert_eq!(k.prompt_history(), "{fr}:prompt:history");
        assert_eq!(k.alerts(), "{fr}:alerts");
        assert_eq!(k.worker("w1"), "{fr}:worker:w1");
        assert_eq!(k.settings(), "{fr}:settings");
        assert_eq!(k.workers_alive(), "{fr}:workers:alive");
        assert_eq!(k.owned("w1"), "{fr}:owned:w1");
        assert_eq!(k.cancels("w1"), "{fr}:cancel:w1");
        assert_eq!(k.orphans(), "{fr}:orphans");
        assert_eq!(k.job_tag("cam-1:a"), "{fr:cam-1:a}");
        assert_eq!(k.results("cam-1:a"), "{fr:cam-1:a}:results");
        assert_eq!(k.progress("cam-1:a"), "{fr:cam-1:a}:progress");
        assert_eq!(k.latest_snapshot("a"), "{fr:a}:latest");
        let name = snapshot_name("enter", "a:zone:door:4:12");
        assert_eq!(k.snapshot("a", &name), "{fr:a}:snap:enter:a:zone:door:4:12");
    }

    #[test]
    fn shard_zero_is_the_deployments_tag_and_jobs_hash_to_a_shard() {
        let k = Keys::new("fr");
        assert_eq!(k.shard(0), k);
        let s2 = k.shard(2);
        assert_eq!(s2.tag(), "{fr:q2}");
        assert_eq!(s2.jobs(), "{fr:q2}:jobs");
        assert_eq!(s2.owned("w"), "{fr:q2}:owned:w");
        assert_eq!(
            s2.job_tag("a"),
            k.job_tag("a"),
            "a job's own slot is not the shard's"
        );
        assert!(k.owns(&s2.jobs()));
        // FNV-1a 32: the documented values, so other clients can place jobs the same way.
        assert_eq!(shard_of_job("", 1000), 0x811c_9dc5 % 1000);
        assert_eq!(shard_of_job("a", u32::MAX), 0xe40c_292c);
        assert_eq!(shard_of_job("anything", 1), 0);
        assert_eq!(shard_of_job("anything", 0), 0);
        let mut seen = [0u32; 3];
        for i in 0..300 {
            seen[shard_of_job(&format!("cam-{i}"), 3) as usize] += 1;
        }
        assert!(
            seen.iter().all(|n| *n > 60),
            "spread over the shards: {seen:?}"
        );
    }

    #[test]
    fn the_deployment_owns_its_queue_and_job_keys_only() {
        let k = Keys::new("fr");
        for key in [
            k.jobs(),
            k.alerts(),
            k.results("j"),
            k.progress("a:b"),
            k.tag().into(),
        ] {
            assert!(k.owns(&key), "{key}");
        }
        for key in [
            "frames:cam1",
            "{frames}:cam1",
            "{fr2}:jobs",
            "fr:jobs",
            "x{fr}:jobs",
        ] {
            assert!(!k.owns(key), "{key}");
        }
    }
}
