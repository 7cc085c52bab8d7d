//! The worker's side of the job queue: claims entries of `{fr}:jobs` through the `workers`
//! consumer group, keeps their leases fresh, reclaims entries whose owner went quiet,
//! dead-letters entries delivered too often, runs each job's body, finishes it, and on
//! shutdown hands running jobs back so another worker takes them at once.

pub mod body;
pub mod entries;
mod finishes;
mod lane;
pub mod registry;
mod settings;
mod state;
pub mod stop;
mod wake;

pub use settings::QueueSettings;
pub use state::WorkerState;
use state::{EntryKey, RunningJob};

use crate::job::{JobField, JobSpec, JobStatus};
use crate::metrics::Metrics;
use crate::prompt::PromptFollow;
use crate::prompt::PromptRef;
use crate::queue::body::{BodyOutcome, JobBody, JobContext, JobFailure};
use crate::queue::stop::{StopReason, StopSignal};
use crate::results::ResumeState;
use crate::results::{OpenAlerts, ResultSink, SavedProgress, saved_progress, write_end};
use crate::store::functions::{
    self, CallIn, ClaimEntry, ClaimVerdict, FinalWhy, FinishEntry, Lease, Ownership, Retention,
    Tick,
};
use crate::store::keys::WORKER_GROUP;
use crate::store::{Backoff, MAX_BLOCK_MS, Store, StoreError, StoreResult, now_ms};
use entries::{Entry, parse_entry_list, parse_read_reply};
use lane::{Lane, Layout};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

/// How often the fleet's sweeper renews its lease (`fr_worker_tick`) and learns whether a
/// reclaim pass is due: a dead worker's jobs are taken within about a second of its lease.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);
/// How often every other worker ticks: what a worker costs the queue's Redis is about one
/// call per tick, and cancels and orphans reach it through its wake-up lists at once, so
/// its ticks only renew its lease and catch what a lost wake-up missed.
pub const RELAXED_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(3);
/// How long a cancelled job's body gets to return before it is abandoned.
const CANCEL_GRACE: Duration = Duration::from_secs(1);
/// How far past any lease a handed-back entry's idle time is set: any worker's next reclaim
/// pass takes it, whatever its JOB_LEASE_MS.
const HANDBACK_IDLE_MS: u64 = 24 * 3600 * 1000;
const INDEX_PRUNE_EVERY: Duration = Duration::from_secs(30);
/// Every how many heartbeat ticks a worker reads the fleet's queue shard count (about 30 s
/// at the default tick): one `HGET` each.
const LAYOUT_CHECK_TICKS: u32 = 30;
/// The longest wait between two tries of a Redis call about one job.
const RETRY_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// When a worker next ticks in one shard, and when it last audited its jobs there.
struct LaneClock {
    next_tick: Instant,
    last_audit: Instant,
}

/// What one tick in a shard came to.
struct Beat {
    /// The audit that was due is done.
    audited: bool,
    /// Tick again after a heartbeat, not a relaxed tick: this worker is the shard's sweeper,
    /// or the tick failed.
    fast: bool,
}

/// The shortest blocking read of one shard's stream when a worker serves several.
const MIN_CLAIM_BLOCK_MS: u64 = 100;
/// Most entries one look for strays reads (`XPENDING ... <worker>`).
const STRAYS_MAX: usize = 100;

/// Fields of `{fr}:settings` an operator sets by hand (`HSET`) and the functions read:
/// workers copy them from shard 0 into each shard they serve, since a function reads its
/// own shard's settings.
const OPERATOR_SETTINGS: [&str; 2] = ["dead_maxlen", "consumer_idle_ms"];

/// The fields a worker writes into a shard's `settings` hash.
struct PublishedSettings {
    fields: Vec<(&'static str, String)>,
}

impl PublishedSettings {
    fn in_shard(&self, shard: &Store) -> redis::Cmd {
        let mut cmd = redis::cmd("HSET");
        cmd.arg(shard.keys().settings());
        for (name, value) in &self.fields {
            cmd.arg(*name).arg(value);
        }
        cmd
    }
}

/// Static facts about this worker, written into its heartbeat hash.
#[derive(Clone, Debug)]
pub struct WorkerIdentity {
    pub id: String,
    pub model: String,
    pub device: String,
}

/// A worker: one consumer of the `workers` group running up to `MAX_CONCURRENT_STREAMS` jobs.
pub struct Worker {
    store: Store,
    config: Arc<QueueSettings>,
    body: Arc<dyn JobBody>,
    metrics: Arc<Metrics>,
    state: Arc<WorkerState>,
    identity: WorkerIdentity,
    prompt_rx: watch::Receiver<PromptRef>,
    prompt_tx: Arc<watch::Sender<PromptRef>>,
    slot_freed: Arc<Notify>,
    /// The shards this worker serves, chosen once Redis first answers.
    layout: Mutex<Layout>,
    started_ms: i64,
}

/// The default consumer name: host, pid and a boot UUID, so a restarted process never
/// inherits a dead one's pending entries by name.
pub fn default_worker_id() -> String {
    let host = hostname();
    let boot = uuid::Uuid::new_v4().simple().to_string();
    format!("{host}-{}-{}", std::process::id(), &boot[..8])
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .map(|h| {
            h.chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                        c
                    } else {
                        '_'
                    }
                })
                .collect()
        })
        .unwrap_or_else(|| "worker".into())
}

/// The job id of an entry without `job_id`: a UUID derived from the entry, so every worker
/// that ever receives the entry agrees on it.
pub fn job_id_for_entry(tag: &str, entry_id: &str) -> String {
    uuid::Uuid::new_v5(
        &uuid::Uuid::NAMESPACE_URL,
        format!("free-roam:{tag}/{entry_id}").as_bytes(),
    )
    .to_string()
}

impl Worker {
    pub fn new(
        store: Store,
        config: Arc<QueueSettings>,
        body: Arc<dyn JobBody>,
        metrics: Arc<Metrics>,
        state: Arc<WorkerState>,
        identity: WorkerIdentity,
    ) -> Self {
        let (tx, rx) = watch::channel(crate::prompt::active::default_ref(&config.default_prompt));
        Self {
            store,
            config,
            body,
            metrics,
            state,
            identity,
            prompt_rx: rx,
            prompt_tx: Arc::new(tx),
            slot_freed: Arc::new(Notify::new()),
            layout: Mutex::default(),
            started_ms: now_ms(),
        }
    }

    pub fn state(&self) -> Arc<WorkerState> {
        self.state.clone()
    }

    /// Runs until `shutdown` fires, then hands running jobs back and returns within
    /// `SHUTDOWN_TIMEOUT_MS` (plus one Redis round trip).
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        if !self.connect(&shutdown).await {
            return;
        }
        let tasks_stop = CancellationToken::new();
        let prompt_task = tokio::spawn(crate::prompt::active::follow(
            self.store.clone(),
            self.config.default_prompt.clone(),
            (*self.prompt_tx).clone(),
            tasks_stop.clone(),
        ));
        for lane in self.lanes() {
            tokio::spawn(self.clone().reclaim_loop(lane.clone(), shutdown.clone()));
            tokio::spawn(
                self.clone()
                    .wake_loop(lane, shutdown.clone(), tasks_stop.clone()),
            );
        }
        let heartbeat_task = tokio::spawn(
            self.clone()
                .heartbeat_loop(tasks_stop.clone(), shutdown.clone()),
        );
        // Running jobs are stopped and handed back as soon as shutdown comes, not when the
        // claim loop's blocked XREADGROUP returns (up to a second later): a hand-off must
        // not wait for it.
        let drained = Mutex::new(HashSet::new());
        let early_drain = async {
            shutdown.cancelled().await;
            self.state.draining.store(true, Ordering::Relaxed);
            let deadline = tokio::time::Instant::now()
                + self.config.shutdown_timeout
                + Duration::from_millis(500);
            self.drain(&drained, deadline).await;
            deadline
        };
        let ((), deadline) = tokio::join!(self.clone().claim_loop(shutdown.clone()), early_drain);
        // A job whose claim was in flight when the first drain looked is stopped here,
        // within the same bound.
        self.drain(&drained, deadline).await;
        tasks_stop.cancel();
        let _ = heartbeat_task.await;
        let _ = prompt_task.await;
        for lane in self.lanes() {
            self.leave(&lane).await;
        }
        tracing::info!(worker = %self.identity.id, "worker stopped");
    }

    /// Takes the stopped worker out of one shard's registry, and out of its leases at once
    /// when no job of the shard is left running (an entry whose hand-back failed is then the
    /// sweep's, once idle past a lease); a job still running keeps the lease until it lapses
    /// and is then taken as a dead worker's.
    async fn leave(&self, lane: &Lane) {
        let keys = lane.store.keys();
        let mut pipe = redis::pipe();
        pipe.cmd("DEL")
            .arg(keys.worker(&self.identity.id))
            .arg(keys.wake(&self.identity.id))
            .ignore();
        if self.state.shard_snapshot(lane.shard).is_empty() {
            pipe.cmd("ZREM")
                .arg(keys.workers_alive())
                .arg(&self.identity.id)
                .ignore();
        }
        let _ = lane.store.pipe::<()>(&pipe).await;
    }

    /// The shards this worker serves now; none before Redis first answered.
    fn lanes(&self) -> Vec<Arc<Lane>> {
        self.lock_layout().lanes.clone()
    }

    fn lane_of(&self, shard: u32) -> Option<Arc<Lane>> {
        self.lock_layout()
            .lanes
            .iter()
            .find(|l| l.shard == shard)
            .cloned()
    }

    fn lock_layout(&self) -> std::sync::MutexGuard<'_, Layout> {
        self.layout.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits for Redis: loads the functions, creates the group, publishes the settings.
    /// Returns false when shutdown came first.
    async fn connect(&self, shutdown: &CancellationToken) -> bool {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        loop {
            match self.prepare_redis().await {
                Ok(()) => {
                    self.state.redis_ok();
                    tracing::info!(worker = %self.identity.id, "connected to redis; claiming jobs");
                    return true;
                }
                Err(e) => {
                    self.state.redis_failed(&e);
                    self.metrics.redis_errors.inc();
                    let delay = backoff.next_delay();
                    if e.is_auth_failure() {
                        // Not a passing outage: only new credentials (or an ACL change on
                        // the server) help, so it is said at error level, naming no secret.
                        tracing::error!(error = %e, retry_in = ?delay, "redis auth failed: check the user name and password of REDIS_URL");
                    } else {
                        tracing::warn!(error = %e, retry_in = ?delay, "redis not ready");
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = shutdown.cancelled() => return false,
                    }
                }
            }
        }
    }

    async fn prepare_redis(&self) -> StoreResult<()> {
        self.store.load_functions().await?;
        if self.lock_layout().shards == 0 {
            let shards = self.store.queue_shards().await?;
            let lanes = self
                .config
                .served_shards(&self.identity.id, shards)
                .into_iter()
                .map(|shard| Lane::new(&self.store, shard, &self.identity.id))
                .collect();
            self.serve(shards, lanes);
        }
        let published = self.published_settings().await?;
        for lane in self.lanes() {
            self.open_lane(&lane, &published).await?;
        }
        self.store
            .query::<()>(&published.in_shard(&self.store))
            .await
    }

    /// Records the shards served, for the loops and for `/health`.
    fn serve(&self, shards: u32, lanes: Vec<Arc<Lane>>) {
        let served: Vec<u32> = lanes.iter().map(|l| l.shard).collect();
        if shards > 1 {
            tracing::info!(shards, ?served, "serving queue shards");
        }
        self.state.set_queue_shards(shards, served);
        *self.lock_layout() = Layout { shards, lanes };
    }

    /// The group and this worker's settings in a shard it serves.
    async fn open_lane(&self, lane: &Lane, published: &PublishedSettings) -> StoreResult<()> {
        lane.store.ensure_group().await?;
        if lane.shard != 0 {
            lane.store
                .query::<()>(&published.in_shard(&lane.store))
                .await?;
        }
        Ok(())
    }

    /// Settings the user-called functions and the CLI need too (expiry, caps), written into
    /// each served shard's `settings` hash (the functions read their own shard's), with the
    /// fields an operator sets in shard 0's copied over.
    async fn published_settings(&self) -> StoreResult<PublishedSettings> {
        let mut read = redis::cmd("HMGET");
        read.arg(self.store.keys().settings())
            .arg(OPERATOR_SETTINGS.as_slice());
        let operator: Vec<Option<String>> = self.store.query(&read).await?;
        let mut fields: Vec<(&'static str, String)> = OPERATOR_SETTINGS
            .iter()
            .zip(operator)
            .filter_map(|(name, value)| Some((*name, value?)))
            .collect();
        fields.extend(self.own_settings());
        Ok(PublishedSettings { fields })
    }

    fn own_settings(&self) -> [(&'static str, String); 5] {
        let c = &self.config;
        [
            ("result_ttl_s", c.result_ttl.as_secs().to_string()),
            ("results_maxlen", c.results_maxlen.to_string()),
            ("events_maxlen", c.events_maxlen.to_string()),
            ("alerts_maxlen", c.alerts_maxlen.to_string()),
            ("prompt_history_max", c.prompt_history_max.to_string()),
        ]
    }

    fn free_slots(&self) -> usize {
        self.config
            .max_concurrent_streams
            .saturating_sub(self.state.running_jobs())
    }

    /// Reads new entries from the served shards in turn, each read blocking for its share of
    /// a second, so that an entry in any of them waits about a second at most, and one loop
    /// keeps the free-slot count for all of them.
    async fn claim_loop(self: Arc<Self>, shutdown: CancellationToken) {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
        let mut turn = 0usize;
        while !shutdown.is_cancelled() {
            // Read each time: the shards served grow when the fleet's count does.
            let lanes = self.lanes();
            let Some(lane) = lanes.get(turn % lanes.len().max(1)).cloned() else {
                return;
            };
            let block_ms = (MAX_BLOCK_MS.min(1000) / lanes.len() as u64).max(MIN_CLAIM_BLOCK_MS);
            turn = turn.wrapping_add(1);
            let free = self.free_slots();
            if free == 0 {
                tokio::select! {
                    _ = self.slot_freed.notified() => {}
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    _ = shutdown.cancelled() => break,
                }
                continue;
            }
            let mut cmd = redis::cmd("XREADGROUP");
            cmd.arg("GROUP")
                .arg(WORKER_GROUP)
                .arg(&self.identity.id)
                .arg("COUNT")
                .arg(free)
                .arg("BLOCK")
                .arg(block_ms)
                .arg("STREAMS")
                .arg(lane.store.keys().jobs())
                .arg(">");
            match lane.store.query_blocking::<redis::Value>(&cmd).await {
                Ok(reply) => {
                    backoff.reset();
                    self.state.redis_ok();
                    // The next read waits for this one's entries, so the free-slot count
                    // it asks for is accurate.
                    self.clone()
                        .take_entries(&lane, parse_read_reply(&reply), false, &shutdown)
                        .await;
                }
                Err(e) => {
                    self.on_redis_error(&e, "reading the job stream").await;
                    let delay = backoff.next_delay();
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = shutdown.cancelled() => break,
                    }
                }
            }
        }
    }

    async fn on_redis_error(&self, e: &StoreError, doing: &str) {
        self.metrics.redis_errors.inc();
        self.state.redis_failed(e);
        tracing::warn!(error = %e, "redis error while {doing}");
        // A server that lost its data (restart without persistence) lost the group and the
        // functions too: put them back so the fleet recovers by itself.
        if e.code() == Some("NOGROUP") {
            let _ = self.prepare_redis().await;
        }
    }

    fn call_in(&self) -> CallIn {
        self.config.call_in()
    }

    /// Whether this worker takes part in reclaiming now: whatever its load, up to twice its
    /// capacity, since a full fleet must still recover dead jobs.
    fn may_reclaim(&self) -> bool {
        self.state.running_jobs() < self.config.max_concurrent_streams * 2
    }

    /// Entries whose owner's lease lapsed (it died) or that were handed back are taken over
    /// when a tick says a pass would find some, whatever this worker's load. When full it
    /// takes one per pass, up to twice its capacity.
    async fn reclaim_loop(self: Arc<Self>, lane: Arc<Lane>, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = lane.reclaim_due.notified() => {}
                _ = shutdown.cancelled() => return,
            }
            if !self.may_reclaim() {
                continue;
            }
            let running = self.state.running_jobs();
            let count = self
                .config
                .max_concurrent_streams
                .saturating_sub(running)
                .max(1);
            match functions::reclaim(&lane.store, &self.identity.id, self.call_in(), count).await {
                Ok(reply) => {
                    let entries = parse_entry_list(&reply);
                    for entry in &entries {
                        self.metrics.jobs_reclaimed.inc();
                        tracing::info!(entry = %entry.id, "reclaimed a job entry");
                    }
                    // Past shutdown, take_entries hands them back at once.
                    self.clone()
                        .take_entries(&lane, entries, true, &shutdown)
                        .await;
                }
                Err(e) => self.on_redis_error(&e, "reclaiming entries").await,
            }
        }
    }

    /// Validates entries of one read, asks Redis in one call whether to run each (in the
    /// order read, so that of two entries naming one job_id the first wins), and starts
    /// those it may run. A malformed entry is refused on its own, after the valid entries
    /// read before it were claimed. Entries that arrive after shutdown are handed back.
    async fn take_entries(
        self: Arc<Self>,
        lane: &Arc<Lane>,
        entries: Vec<Entry>,
        reclaimed: bool,
        shutdown: &CancellationToken,
    ) {
        let tag = lane.store.keys().tag().to_string();
        let mut specs: Vec<JobSpec> = Vec::new();
        for entry in entries {
            if shutdown.is_cancelled() {
                self.hand_back_unstarted(lane, &entry).await;
                continue;
            }
            let parsed = JobSpec::parse(&entry.id, &entry.fields, self.config.default_fps, || {
                job_id_for_entry(&tag, &entry.id)
            });
            // What the body cannot run (a prompt the model cannot use) fails once, here,
            // rather than in every frame.
            let (job_id, error) = match parsed {
                Ok(spec) => match self.body.check(&spec) {
                    Ok(()) => {
                        specs.push(spec);
                        continue;
                    }
                    Err(err) => (spec.job_id.clone(), err.to_string()),
                },
                Err((err, job_id)) => (
                    job_id.unwrap_or_else(|| job_id_for_entry(&tag, &entry.id)),
                    err.to_string(),
                ),
            };
            self.clone()
                .claim_and_start(lane, std::mem::take(&mut specs), reclaimed)
                .await;
            self.reject(lane, &entry, &job_id, &error).await;
        }
        self.claim_and_start(lane, specs, reclaimed).await;
    }

    /// Claims `specs` in one `fr_job_claim` call and acts on each verdict, concurrently.
    async fn claim_and_start(
        self: Arc<Self>,
        lane: &Arc<Lane>,
        specs: Vec<JobSpec>,
        reclaimed: bool,
    ) {
        if specs.is_empty() {
            return;
        }
        let fields: Vec<Vec<(&'static str, String)>> =
            specs.iter().map(JobSpec::hash_fields).collect();
        let batch: Vec<ClaimEntry<'_>> = specs
            .iter()
            .zip(&fields)
            .map(|(spec, fields)| ClaimEntry {
                entry_id: &spec.entry_id,
                job_id: &spec.job_id,
                fields,
            })
            .collect();
        let claimed = self
            .retrying(|| {
                functions::claim(
                    &lane.store,
                    &self.identity.id,
                    self.config.max_attempts,
                    &batch,
                )
            })
            .await;
        drop(batch);
        let verdicts = match claimed {
            Ok(verdicts) => verdicts,
            // One entry the server cannot claim (its job key holds another type) fails the
            // whole call: claim each alone, so that only that one is left to the reclaim.
            Err(e) if !e.is_transient() && specs.len() > 1 => {
                for spec in specs {
                    Box::pin(self.clone().claim_and_start(lane, vec![spec], reclaimed)).await;
                }
                return;
            }
            Err(_) => return,
        };
        let mut follow_ups = tokio::task::JoinSet::new();
        for (spec, verdict) in specs.into_iter().zip(verdicts) {
            follow_ups.spawn(
                self.clone()
                    .act_on_claim(lane.clone(), spec, verdict, reclaimed),
            );
        }
        while follow_ups.join_next().await.is_some() {}
    }

    /// Starts a job the claim said to run, or records why it does not run.
    async fn act_on_claim(
        self: Arc<Self>,
        lane: Arc<Lane>,
        spec: JobSpec,
        verdict: ClaimVerdict,
        reclaimed: bool,
    ) {
        match verdict {
            ClaimVerdict::Run { attempt } => {
                // An entry read new from the stream was never delivered before, so no worker
                // saved progress for it: only a reclaimed one needs the read.
                let delivered_before = reclaimed || attempt > 1;
                let saved = if delivered_before {
                    let Some(saved) = self
                        .with_retry(|| saved_progress(&self.store, &spec.job_id))
                        .await
                    else {
                        return;
                    };
                    saved
                } else {
                    SavedProgress::default()
                };
                if let Some(status) = saved.ended {
                    // The last owner wrote the end entry but stopped before the ack.
                    tracing::info!(job = %spec.job_id, status = status.as_str(), "job had ended; recording it");
                    self.finish(&lane, &spec, status, "", OpenAlerts::Possible)
                        .await;
                    return;
                }
                let resume = ResumeState {
                    attempt,
                    ..saved.resume
                };
                for w in &spec.warnings {
                    tracing::warn!(job = %spec.job_id, "{w}");
                }
                tracing::info!(job = %spec.job_id, entry = %spec.entry_id, attempt = resume.attempt, reclaimed, "job started");
                self.metrics.jobs_claimed.inc();
                let open_alerts = if delivered_before {
                    OpenAlerts::Possible
                } else {
                    OpenAlerts::NoneSaved
                };
                self.start_job(lane, spec, resume, open_alerts);
            }
            ClaimVerdict::Final {
                why, status, error, ..
            } => {
                match why {
                    FinalWhy::Dead => {
                        self.metrics.jobs_dead_lettered.inc();
                        tracing::warn!(job = %spec.job_id, "job dead-lettered after too many deliveries");
                    }
                    FinalWhy::Cancelled => {
                        self.metrics.jobs_cancelled.inc();
                        tracing::info!(job = %spec.job_id, "job was cancelled before it ran");
                    }
                    FinalWhy::Failed | FinalWhy::Finished => {
                        tracing::info!(job = %spec.job_id, status = status.as_str(), "job had ended; dropping its entry");
                    }
                }
                self.end_and_ack(&lane, &spec.entry_id, &spec.job_id, status, &error)
                    .await;
            }
            ClaimVerdict::Duplicate => {
                self.metrics.jobs_rejected.inc();
                tracing::warn!(job = %spec.job_id, entry = %spec.entry_id, "duplicate job_id; entry dropped");
            }
            other => {
                tracing::info!(job = %spec.job_id, verdict = ?other, "entry not run");
            }
        }
    }

    fn retention(&self) -> Retention {
        self.config.retention()
    }

    /// The second half of a job that is final in the queue's slot: its end entry (in the
    /// job's slot, once), then the ack. Each step is safe to repeat after a crash or a lost
    /// reply.
    async fn end_and_ack(
        &self,
        lane: &Lane,
        entry_id: &str,
        job_id: &str,
        status: JobStatus,
        error: &str,
    ) {
        let retention = self.retention();
        let ended = self
            .with_retry(|| {
                write_end(
                    &self.store,
                    job_id,
                    status,
                    error,
                    retention,
                    OpenAlerts::Possible,
                )
            })
            .await;
        if ended.is_none() {
            tracing::error!(job = %job_id, "could not write the end entry; the entry stays pending");
            return;
        }
        let acked = self
            .with_retry(|| functions::ack(&lane.store, entry_id, &self.identity.id))
            .await;
        if acked == Some(Ownership::Lost) {
            tracing::info!(job = %job_id, "another worker owns the ended job's entry now; left to it");
        }
    }

    async fn reject(&self, lane: &Lane, entry: &Entry, job_id: &str, error: &str) {
        self.metrics.jobs_rejected.inc();
        tracing::warn!(entry = %entry.id, job = %job_id, %error, "job entry refused");
        // The hash shows what it can of the entry: its hash fields that are text of a sane
        // length (a refused prompt may be what was too long).
        let mut fields: Vec<(String, String)> = Vec::new();
        for (k, v) in &entry.fields {
            if let (Ok(k), Ok(v)) = (std::str::from_utf8(k), std::str::from_utf8(v))
                && JobField::parse(k).is_some_and(JobField::in_hash)
                && v.len() <= crate::job::MAX_STREAM_REF_BYTES
            {
                fields.push((k.to_string(), v.to_string()));
            }
        }
        let verdict = self
            .with_retry(|| {
                functions::reject(
                    &lane.store,
                    &entry.id,
                    &self.identity.id,
                    job_id,
                    error,
                    &fields,
                )
            })
            .await;
        if let Some(ClaimVerdict::Final { status, error, .. }) = verdict {
            self.end_and_ack(lane, &entry.id, job_id, status, &error)
                .await;
        }
    }

    /// Retries a Redis call on connection failures until it succeeds, the worker is past
    /// its shutdown timeout, or Redis answers with an error (logged). `None` on failure.
    async fn with_retry<T, F, Fut>(&self, call: F) -> Option<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = StoreResult<T>>,
    {
        self.retrying(call).await.ok()
    }

    /// How long a Redis call about one job is retried while the worker is not stopping.
    fn patience(&self) -> Duration {
        self.config.job_lease.max(self.config.shutdown_timeout)
    }

    /// How long an entry pending under this worker may go without a running job before the
    /// worker gives it back: past the retries of every step that handles an entry outside a
    /// running job (its claim, the read of its progress, its end entry and its ack, each
    /// [`Worker::patience`] and a last backoff).
    fn stray_after(&self) -> Duration {
        (self.patience() + RETRY_BACKOFF_MAX) * 3
    }

    /// [`Worker::with_retry`], giving back the last error.
    async fn retrying<T, F, Fut>(&self, mut call: F) -> StoreResult<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = StoreResult<T>>,
    {
        let mut backoff = Backoff::new(Duration::from_millis(100), RETRY_BACKOFF_MAX);
        // While draining, the shutdown bound wins: an unrecorded job is reclaimed later.
        let patience = if self.state.draining.load(Ordering::Relaxed) {
            self.config.shutdown_timeout
        } else {
            self.patience()
        };
        let deadline = Instant::now() + patience;
        loop {
            match call().await {
                Ok(v) => {
                    self.state.redis_ok();
                    return Ok(v);
                }
                Err(e) if e.is_transient() && Instant::now() < deadline => {
                    self.on_redis_error(&e, "updating a job").await;
                    tokio::time::sleep(backoff.next_delay()).await;
                }
                Err(e) => {
                    self.on_redis_error(&e, "updating a job").await;
                    return Err(e);
                }
            }
        }
    }

    /// `open_alerts`: whether an earlier delivery may have left alerts open in the job's
    /// progress hash.
    fn start_job(
        self: &Arc<Self>,
        lane: Arc<Lane>,
        spec: JobSpec,
        resume: ResumeState,
        open_alerts: OpenAlerts,
    ) {
        let stop = StopSignal::new();
        let running = RunningJob {
            job_id: spec.job_id.clone(),
            stop: stop.clone(),
            done: Arc::new(Notify::new()),
            finished: Arc::new(AtomicBool::new(false)),
        };
        let entry = (lane.shard, spec.entry_id.clone());
        {
            let mut map = self.state.lock_running();
            map.insert(entry.clone(), running.clone());
            self.metrics.running_jobs.set(map.len() as u64);
        }
        let me = self.clone();
        tokio::spawn(async move {
            me.run_job(&lane, spec, resume, stop, open_alerts).await;
            {
                let mut map = me.state.lock_running();
                map.remove(&entry);
                me.metrics.running_jobs.set(map.len() as u64);
            }
            running.finished.store(true, Ordering::Relaxed);
            running.done.notify_waiters();
            me.slot_freed.notify_one();
        });
    }

    /// Runs one job's body to its end, then finishes the job or hands it back, as the
    /// reason it stopped decides.
    async fn run_job(
        &self,
        lane: &Lane,
        spec: JobSpec,
        resume: ResumeState,
        stop: StopSignal,
        open_alerts: OpenAlerts,
    ) {
        let spec = Arc::new(spec);
        let prompt = match &spec.prompt {
            Some(text) => PromptFollow::Fixed(PromptRef {
                text: Arc::from(text.as_str()),
                version: None,
            }),
            None => PromptFollow::Live(self.prompt_rx.clone()),
        };
        let sink = ResultSink::new(
            self.store.clone(),
            &spec.job_id,
            self.config.results_maxlen,
            stop.clone(),
            resume.results,
        );
        let alert_state_saved = sink.alert_state_saved();
        let ctx = JobContext {
            spec: spec.clone(),
            resume,
            sink,
            stop: stop.clone(),
            prompt,
        };
        let body = self.body.clone();
        let task = tokio::spawn(async move { body.run(ctx).await });
        let outcome = self.await_body(task, &stop, &spec.job_id).await;
        let reason = stop.reason();
        let final_status = match (reason, &outcome) {
            (Some(StopReason::LeaseLost), _) => {
                self.metrics.leases_lost.inc();
                tracing::warn!(job = %spec.job_id, "lease lost to another worker; job left to it");
                return;
            }
            (_, Ok(BodyOutcome::Completed)) => Some((JobStatus::Completed, String::new())),
            // Whatever the body made of being stopped, the reason decides.
            (Some(StopReason::Shutdown), _) => None,
            (Some(StopReason::Cancelled), _) => Some((JobStatus::Cancelled, String::new())),
            (None, Err(failure)) => Some((JobStatus::Failed, failure.message.clone())),
            (None, Ok(BodyOutcome::Stopped)) => Some((JobStatus::Completed, String::new())),
        };
        match final_status {
            Some((status, error)) => {
                let open_alerts = if alert_state_saved.load(Ordering::Relaxed) {
                    OpenAlerts::Possible
                } else {
                    open_alerts
                };
                self.finish(lane, &spec, status, &error, open_alerts).await
            }
            None => self.hand_back(lane, &spec.entry_id, &spec.job_id).await,
        }
    }

    /// Waits for a job's body. Once the job is told to stop, the body gets its grace (the
    /// shutdown timeout, or CANCEL_GRACE) and is then abandoned; a body abandoned or
    /// aborted counts as stopped, one that panicked as failed.
    async fn await_body(
        &self,
        mut task: tokio::task::JoinHandle<Result<BodyOutcome, JobFailure>>,
        stop: &StopSignal,
        job_id: &str,
    ) -> Result<BodyOutcome, JobFailure> {
        let joined = tokio::select! {
            r = &mut task => Some(r),
            _ = stop.stopped() => {
                let grace = match stop.reason() {
                    Some(StopReason::Shutdown) => self.config.shutdown_timeout,
                    _ => CANCEL_GRACE,
                };
                match tokio::time::timeout(grace, &mut task).await {
                    Ok(r) => Some(r),
                    Err(_) => {
                        tracing::warn!(job = %job_id, "job body did not stop in time; abandoned");
                        task.abort();
                        None
                    }
                }
            }
        };
        match joined {
            Some(Ok(r)) => r,
            Some(Err(e)) if e.is_panic() => Err(JobFailure::new(format!(
                "worker error: the job's body panicked: {}",
                panic_message(e.into_panic())
            ))),
            Some(Err(_)) | None => Ok(BodyOutcome::Stopped),
        }
    }

    /// Ends a job this worker ran: the end entry in the job's slot first, then the status
    /// and the ack in the queue's slot. A crash in between leaves the entry pending, and the
    /// next claim finds the end entry and only records it. Both steps are safe to repeat, so
    /// a call retried after its reply was lost neither counts a lost lease nor writes twice.
    async fn finish(
        &self,
        lane: &Lane,
        spec: &JobSpec,
        status: JobStatus,
        error: &str,
        open_alerts: OpenAlerts,
    ) {
        let retention = self.retention();
        let Some(recorded) = self
            .with_retry(|| {
                write_end(
                    &self.store,
                    &spec.job_id,
                    status,
                    error,
                    retention,
                    open_alerts,
                )
            })
            .await
        else {
            tracing::error!(job = %spec.job_id, "could not write the end entry; it will be reclaimed");
            return;
        };
        // An earlier end entry wins: the hash must agree with what readers saw.
        let status = recorded.status;
        let status_str = status.as_str();
        let end = FinishEntry {
            entry_id: spec.entry_id.clone(),
            job_id: spec.job_id.clone(),
            status,
            error: error.to_string(),
        };
        let verdict = self.with_retry(|| lane.finisher.finish(end.clone())).await;
        match verdict {
            Some(Ownership::Done) => {
                match status {
                    JobStatus::Completed => self.metrics.jobs_completed.inc(),
                    JobStatus::Failed => self.metrics.jobs_failed.inc(),
                    _ => self.metrics.jobs_cancelled.inc(),
                }
                if error.is_empty() {
                    tracing::info!(job = %spec.job_id, status = status_str, "job finished");
                } else {
                    tracing::warn!(job = %spec.job_id, status = status_str, %error, "job finished");
                }
            }
            Some(Ownership::Lost) => {
                self.metrics.leases_lost.inc();
                tracing::warn!(job = %spec.job_id, "finished, but another worker owns the entry now; left to it");
            }
            None => {
                tracing::error!(job = %spec.job_id, "could not record the job's end; it will be reclaimed")
            }
        }
    }

    async fn hand_back(&self, lane: &Lane, entry_id: &str, job_id: &str) {
        let verdict = self
            .with_retry(|| {
                functions::handback(
                    &lane.store,
                    entry_id,
                    &self.identity.id,
                    job_id,
                    HANDBACK_IDLE_MS,
                )
            })
            .await;
        if verdict == Some(Ownership::Done) {
            self.metrics.jobs_handed_back.inc();
            tracing::info!(job = %job_id, "job handed back for another worker");
        }
    }

    /// An entry that arrived while shutting down: give it back untouched.
    async fn hand_back_unstarted(&self, lane: &Lane, entry: &Entry) {
        let given = functions::handback(
            &lane.store,
            &entry.id,
            &self.identity.id,
            "",
            HANDBACK_IDLE_MS,
        )
        .await;
        if let Err(e) = given {
            tracing::warn!(error = %e, entry = %entry.id, "could not hand back an unstarted entry; it is reclaimed after the lease");
        }
    }

    /// Stops every running job not in `drained` for hand-back, adds it there, and waits for
    /// them until `deadline` (the shutdown timeout).
    async fn drain(&self, drained: &Mutex<HashSet<EntryKey>>, deadline: tokio::time::Instant) {
        let jobs: Vec<(EntryKey, RunningJob)> = {
            let mut seen = drained.lock().unwrap_or_else(|e| e.into_inner());
            self.state
                .snapshot()
                .into_iter()
                .filter(|(entry, _)| seen.insert(entry.clone()))
                .collect()
        };
        if jobs.is_empty() {
            return;
        }
        tracing::info!(jobs = jobs.len(), "stopping; handing running jobs back");
        for (_, job) in &jobs {
            job.stop.stop(StopReason::Shutdown);
        }
        for ((shard, entry_id), job) in jobs {
            let waited = async {
                while !job.finished.load(Ordering::Relaxed) {
                    let notified = job.done.notified();
                    if job.finished.load(Ordering::Relaxed) {
                        break;
                    }
                    notified.await;
                }
            };
            if tokio::time::timeout_at(deadline, waited).await.is_err() {
                // The job task is stuck (e.g. Redis unreachable): hand back directly.
                if let Some(lane) = self.lane_of(shard) {
                    self.hand_back(&lane, &entry_id, &job.job_id).await;
                }
            }
        }
    }

    /// Ticks in every served shard: every heartbeat in a shard where this worker is the
    /// sweeper, every relaxed tick elsewhere ([`QueueSettings::relaxed_tick`]); prunes the
    /// indexes now and then, and every [`LAYOUT_CHECK_TICKS`] heartbeats follows the fleet's
    /// shard count. `shutdown` is the worker's, for the reclaim tasks of shards it starts
    /// serving; `stop` ends this loop and the wake-up tasks.
    async fn heartbeat_loop(self: Arc<Self>, stop: CancellationToken, shutdown: CancellationToken) {
        let tick = self.config.heartbeat_tick();
        let mut last_prune = Instant::now();
        let mut clocks: HashMap<u32, LaneClock> = HashMap::new();
        let mut ticks: u32 = 0;
        let mut shards_seen = self.lock_layout().shards;
        loop {
            let now = Instant::now();
            for lane in self.lanes() {
                let clock = clocks.entry(lane.shard).or_insert(LaneClock {
                    next_tick: now,
                    last_audit: now,
                });
                if now < clock.next_tick {
                    continue;
                }
                let audit = clock.last_audit.elapsed() >= self.config.audit_interval();
                let beat = self.heartbeat_once(&lane, audit).await;
                if beat.audited {
                    clock.last_audit = Instant::now();
                }
                clock.next_tick = now
                    + if beat.fast {
                        tick
                    } else {
                        self.config.relaxed_tick()
                    };
            }
            if last_prune.elapsed() > INDEX_PRUNE_EVERY {
                last_prune = Instant::now();
                for lane in self.lanes() {
                    let _ = functions::prune_index(&lane.store, 500).await;
                }
            }
            ticks = ticks.wrapping_add(1);
            if ticks.is_multiple_of(LAYOUT_CHECK_TICKS) && !shutdown.is_cancelled() {
                shards_seen = self
                    .clone()
                    .follow_layout(shards_seen, &shutdown, &stop)
                    .await;
            }
            tokio::select! {
                _ = tokio::time::sleep(tick) => {}
                _ = stop.cancelled() => return,
            }
        }
    }

    /// Follows the fleet's queue shard count: a worker serving all shards (the default)
    /// starts serving the shards a larger count adds (their group, its settings, a reclaim
    /// task, then reads and ticks); a worker serving a run of them keeps its shards until it
    /// restarts, and says so once. A count that shrank changes nothing: shards are only
    /// dropped empty, and their workers find nothing there. The count now, to compare the next
    /// check with.
    async fn follow_layout(
        self: Arc<Self>,
        seen: u32,
        shutdown: &CancellationToken,
        stop: &CancellationToken,
    ) -> u32 {
        let Ok(now) = self.store.queue_shards().await else {
            return seen;
        };
        let serving = self.lock_layout().shards;
        if now <= serving || now == seen {
            return now;
        }
        if self.config.shards_served != 0 {
            tracing::warn!(
                serving,
                fleet = now,
                "the fleet's queue shard count grew; this worker serves the shards it chose at start until it restarts (QUEUE_SHARDS_SERVED)"
            );
            return now;
        }
        let Ok(published) = self.published_settings().await else {
            return seen;
        };
        let mut lanes = self.lanes();
        for shard in serving..now {
            let lane = Lane::new(&self.store, shard, &self.identity.id);
            if self.open_lane(&lane, &published).await.is_err() {
                // Tried again at the next check.
                return seen;
            }
            lanes.push(lane);
        }
        for lane in &lanes[serving as usize..] {
            tokio::spawn(self.clone().reclaim_loop(lane.clone(), shutdown.clone()));
            tokio::spawn(
                self.clone()
                    .wake_loop(lane.clone(), shutdown.clone(), stop.clone()),
            );
        }
        self.serve(now, lanes);
        now
    }

    /// Renews the worker's lease in one shard, writes its registry hash there and reads its
    /// cancel requests in one call (and, when `audit` is due or the tick says the worker
    /// registered afresh, checks every running job's entry, and looks for stray entries).
    async fn heartbeat_once(&self, lane: &Lane, audit: bool) -> Beat {
        let jobs = self.state.shard_snapshot(lane.shard);
        let registry = self.registry(&jobs);
        let sent = lane
            .registry_writes()
            .to_send(&registry, Instant::now(), self.config.job_lease);
        let mut tick = self.tick_in(lane, &sent).await;
        // A worker of the version before loads its own library when it starts, and that
        // tick refuses the word `sweep`: this version's library (which serves the older
        // workers' calls too) goes back, and the tick is made again.
        if matches!(&tick, Err(e) if e.code() == Some("ERR"))
            && lane.store.load_functions().await.is_ok()
        {
            tick = self.tick_in(lane, &sent).await;
        }
        let tick = match tick {
            Ok(tick) => tick,
            Err(e) => {
                self.on_redis_error(&e, "renewing the lease").await;
                return Beat {
                    audited: false,
                    fast: true,
                };
            }
        };
        lane.registry_writes()
            .answered(&registry, &sent, Instant::now(), tick.hash_created);
        if tick.reclaim_due && self.may_reclaim() {
            lane.reclaim_due.notify_one();
        }
        if !self.state.redis_ready.load(Ordering::Relaxed) {
            // Back after an outage: the server may have lost the group and settings.
            if self.prepare_redis().await.is_ok() {
                self.state.redis_ok();
            }
        } else {
            self.state.redis_ok();
        }
        let cancelled: HashSet<&str> = tick.cancelled.iter().map(String::as_str).collect();
        for (_, job) in &jobs {
            if cancelled.contains(job.job_id.as_str()) {
                job.stop.stop(StopReason::Cancelled);
            }
        }
        if audit && !self.state.draining.load(Ordering::Relaxed) {
            self.hand_back_strays(lane, &jobs).await;
        }
        let due = audit || tick.registered;
        // Nothing to audit counts as audited: an idle worker looks for strays once a lease
        // too, not every tick.
        let audited = if due && !jobs.is_empty() {
            self.audit(lane, &jobs).await
        } else {
            due
        };
        Beat {
            audited,
            fast: tick.sweeper,
        }
    }

    async fn tick_in(&self, lane: &Lane, sent: &[(&str, String)]) -> StoreResult<Tick> {
        let hold_ms = self.config.sweeper_hold().as_millis() as u64;
        functions::tick(
            &lane.store,
            &self.identity.id,
            self.call_in(),
            hold_ms,
            sent,
        )
        .await
    }

    /// Gives back the entries pending under this worker that no running job holds and that
    /// have been idle past [`Worker::stray_after`]: what a claim, an end or a hand-back that
    /// ran out of retries (a long failover) left behind. They go to the orphans, which the
    /// next reclaim pass of any worker, this one too, takes.
    async fn hand_back_strays(&self, lane: &Lane, jobs: &[(String, RunningJob)]) {
        let mut cmd = redis::cmd("XPENDING");
        cmd.arg(lane.store.keys().jobs())
            .arg(WORKER_GROUP)
            .arg("IDLE")
            .arg(self.stray_after().as_millis() as u64)
            .arg("-")
            .arg("+")
            .arg(STRAYS_MAX)
            .arg(&self.identity.id);
        let pending: Vec<(String, String, u64, u64)> = match lane.store.query(&cmd).await {
            Ok(rows) => rows,
            Err(e) => return self.on_redis_error(&e, "looking for stray entries").await,
        };
        let running: HashSet<&str> = jobs.iter().map(|(entry_id, _)| entry_id.as_str()).collect();
        for (entry_id, ..) in pending {
            if running.contains(entry_id.as_str()) || self.state.is_running(lane.shard, &entry_id) {
                continue;
            }
            let given = functions::handback(
                &lane.store,
                &entry_id,
                &self.identity.id,
                "",
                HANDBACK_IDLE_MS,
            )
            .await;
            match given {
                Ok(Ownership::Done) => {
                    tracing::warn!(entry = %entry_id, "an entry no running job held was given back");
                }
                Ok(Ownership::Lost) => {}
                Err(e) => return self.on_redis_error(&e, "giving back a stray entry").await,
            }
        }
    }

    /// Checks every running job's entry in one call: a job whose entry another worker owns
    /// now, or that is gone, is stopped here, not stolen back. Whether the call answered.
    async fn audit(&self, lane: &Lane, jobs: &[(String, RunningJob)]) -> bool {
        let ids: Vec<(&str, &str)> = jobs
            .iter()
            .map(|(entry_id, job)| (entry_id.as_str(), job.job_id.as_str()))
            .collect();
        match functions::heartbeat(&lane.store, &self.identity.id, self.call_in(), &ids).await {
            Ok(leases) => {
                for ((_, job), lease) in jobs.iter().zip(leases) {
                    match lease {
                        Lease::Lost => job.stop.stop(StopReason::LeaseLost),
                        Lease::Cancel => job.stop.stop(StopReason::Cancelled),
                        Lease::Renewed => {}
                    }
                }
                true
            }
            Err(e) => {
                self.on_redis_error(&e, "checking running jobs").await;
                false
            }
        }
    }

    /// The fields of the worker's registry hash (`{fr}:worker:<id>`), which the ticks write
    /// (what changed, and all of them once a lease: [`registry::RegistryWrites`]).
    fn registry(&self, jobs: &[(String, RunningJob)]) -> Vec<(&'static str, String)> {
        let ids = jobs
            .iter()
            .map(|(_, j)| j.job_id.as_str())
            .collect::<Vec<_>>()
            .join(",");
        let draining = self.state.draining.load(Ordering::Relaxed);
        vec![
            ("host", hostname()),
            ("pid", std::process::id().to_string()),
            ("version", env!("CARGO_PKG_VERSION").to_string()),
            ("started_ms", self.started_ms.to_string()),
            ("running", jobs.len().to_string()),
            ("running_jobs", ids),
            ("capacity", self.config.max_concurrent_streams.to_string()),
            ("model", self.identity.model.clone()),
            ("device", self.identity.device.clone()),
            ("draining", u8::from(draining).to_string()),
        ]
    }
}

fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_ids_map_to_stable_uuids() {
        let a = job_id_for_entry("{fr}", "1-0");
        assert_eq!(a, job_id_for_entry("{fr}", "1-0"));
        assert_ne!(a, job_id_for_entry("{fr}", "1-1"));
        assert_ne!(a, job_id_for_entry("{other}", "1-0"));
        assert!(uuid::Uuid::parse_str(&a).is_ok());
    }
}
