//! Fleet simulator: the queue's real functions (`fr_job_claim`, `fr_worker_tick`,
//! `fr_job_heartbeat`, `fr_job_reclaim`, `fr_job_end`, `fr_job_finish`) called at the rates W
//! workers running N jobs call them, with no video and no model, to measure what the queue
//! costs Redis at sizes no machine here runs for real. Each simulated worker keeps the real
//! worker's cadence (`QueueSettings::heartbeat_tick`, `relaxed_tick`, `audit_interval`,
//! `call_in`): a tick (its lease, and the registry fields that changed, all of them once a
//! lease: `queue::registry::RegistryWrites`) each heartbeat in a shard where it is the
//! sweeper, each relaxed tick elsewhere, a reclaim pass right after a tick that says one
//! would find something and when an orphan token wakes it, an audit of every running job's
//! entry each lease, claims as slots free up; a job ends every JOB_S seconds and a new one is
//! queued in its place. The workers' waits for wake-ups are one `BLPOP` per shard for the
//! whole simulated fleet, handing each token to the next live worker of the shard in turn,
//! as Redis serves its blocked clients; each worker's own wait, which ends empty every
//! `WAKE_BLOCK` with no cancel in the simulation, is stood in for by an `LPOP` of its list
//! that often.
//! With SHARDS=K the queue is split over K shards (`Keys::shard`), each worker serving
//! SERVED of them: it ticks, reclaims and audits in each, and reads them in turn. Per (W, N)
//! it prints the Redis CPU per second (`INFO cpu`) of each node, and of the busiest per
//! command (`INFO commandstats`) and per function (the slow log at threshold 0), then stops
//! one worker's heartbeats and measures when its jobs are taken over. Every lease a live
//! worker loses, and every entry taken from a live worker, is counted.
//!
//! Env: REDIS_URL (or REDIS_PORT, or REDIS_CLUSTER_NODES: every master, for the busiest
//! master's figures), POINTS (WORKERSxJOBS,..., default
//! `2x16,8x64,32x256,128x1024,32x10000`), SECONDS (measured per point, default 5), JOB_S
//! (job length, default 60), SHARDS (default 1) and SERVED (default all), JOB_LEASE_MS and
//! RECLAIM_INTERVAL_MS (as the worker reads them). Run it against a Redis nothing else uses:
//! it changes the slow log settings.

use free_roam::config::Config;
use free_roam::job::{JobSpec, JobStatus};
use free_roam::queue::QueueSettings;
use free_roam::queue::entries::{Entry, parse_entry_list, parse_read_reply};
use free_roam::queue::registry::RegistryWrites;
use free_roam::store::Store;
use free_roam::store::functions::{
    self, CallIn, ClaimEntry, ClaimVerdict, FinishEntry, Lease, Ownership, Retention,
};
use free_roam::store::keys::{MAX_QUEUE_SHARDS, WORKER_GROUP};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

/// How often a worker with free slots and nothing read looks again (the real one blocks
/// its read for up to a second).
const IDLE_READ: Duration = Duration::from_secs(1);
/// The granularity of job ends.
const STEP: Duration = Duration::from_millis(50);
/// How long the worker's wait for wake-ups blocks (`queue::wake`'s `WAKE_BLOCK_S`).
const WAKE_BLOCK: Duration = Duration::from_secs(6);

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The settings the worker would read from the same environment (the Redis to use, the
/// lease and the reclaim interval), with the null model.
fn config() -> Config {
    let lookup = |k: &str| match k {
        "MODEL_TYPE" => Some("null".into()),
        _ => std::env::var(k).ok(),
    };
    Config::from_lookup(&lookup).expect("config")
}

/// A handle on the fleet's Redis (REDIS_CLUSTER_NODES or REDIS_URL) under `prefix`.
fn fleet_store(config: &Config, prefix: &str, connections: usize) -> Store {
    let mut redis = config.redis.clone();
    redis.key_prefix = prefix.to_string();
    Store::connect(&redis, connections).expect("store")
}

/// One handle per node to read its counters: the single server, or each Cluster node named
/// in REDIS_CLUSTER_NODES (name every master there, as `redis://host:port`).
fn probes(config: &Config) -> Vec<Store> {
    let urls: Vec<String> = if config.redis.cluster_nodes.is_empty() {
        vec![config.redis.url.expose().to_string()]
    } else {
        config
            .redis
            .cluster_nodes
            .iter()
            .map(|n| n.expose().to_string())
            .collect()
    };
    urls.iter()
        .map(|u| Store::new(u, "fleetprobe", 2).expect("probe"))
        .collect()
}

/// The worker's cadence, from the worker's own rules ([`QueueSettings`]).
#[derive(Clone, Copy)]
struct Cadence {
    tick: Duration,
    relaxed_tick: Duration,
    sweeper_hold_ms: u64,
    audit: Duration,
    lease: Duration,
    call_in: CallIn,
    job_len: Duration,
    max_attempts: u32,
    retention: Retention,
}

impl Cadence {
    fn new(q: &QueueSettings, job_len: Duration) -> Self {
        Cadence {
            tick: q.heartbeat_tick(),
            relaxed_tick: q.relaxed_tick(),
            sweeper_hold_ms: q.sweeper_hold().as_millis() as u64,
            audit: q.audit_interval(),
            lease: q.job_lease,
            call_in: q.call_in(),
            job_len,
            max_attempts: q.max_attempts,
            retention: q.retention(),
        }
    }
}

/// What the workers of one point share: who holds each entry, and what went wrong.
struct Fleet {
    /// One handle per queue shard ([`Store::shard`]; shard 0 is `{prefix}`).
    shards: Vec<Store>,
    cadence: Cadence,
    /// (shard, entry id) -> the simulated worker that claimed it last.
    holder: Mutex<HashMap<(u32, String), usize>>,
    /// The worker whose heartbeats were stopped, once it is.
    dead: AtomicUsize,
    /// When each of the dead worker's entries was taken over.
    taken: Mutex<HashMap<(u32, String), Instant>>,
    /// When each worker's leases were last renewed (in all its shards).
    renewed: Mutex<Vec<Option<Instant>>>,
    running: AtomicUsize,
    /// Leases a live worker lost, entries taken from a live worker, failed calls.
    live_lost: AtomicU64,
    errors: AtomicU64,
    queued: AtomicU64,
}

impl Fleet {
    fn error(&self, doing: &str, e: impl std::fmt::Display) {
        if self.errors.fetch_add(1, Ordering::Relaxed) < 5 {
            eprintln!("fleet_sim: {doing}: {e}");
        }
    }

    /// Queues a job in `shard` as a producer would (`XADD {fr}:jobs` for shard 0; into a
    /// shard's own stream, as `free-roam submit` does, for the others). The simulator
    /// spreads jobs over the shards evenly, as the job-id hash does on average.
    async fn queue_job(&self, shard: u32) {
        let n = self.queued.fetch_add(1, Ordering::Relaxed);
        let store = &self.shards[shard as usize];
        let cmd = redis::cmd("XADD")
            .arg(store.keys().jobs())
            .arg("*")
            .arg("stream_ref")
            .arg(format!("sim:{n}"))
            .arg("job_id")
            .arg(format!("sim-{n}"))
            .to_owned();
        if let Err(e) = store.query::<String>(&cmd).await {
            self.error("queueing a job", e);
        }
    }
}

struct Job {
    shard: u32,
    entry_id: String,
    job_id: String,
    ends_at: Instant,
}

struct SimWorker {
    index: usize,
    id: String,
    capacity: usize,
    /// The shards it serves: what its ticks wrote into its registry hash in each, and when
    /// it ticks there next.
    shards: Vec<(u32, RegistryWrites, Instant)>,
    /// Orphan tokens handed to it (the shard's), as its wait for wake-ups would pop them.
    wakes: tokio::sync::mpsc::UnboundedReceiver<u32>,
    /// The next of its shards to read new entries from.
    next_read: usize,
    jobs: Vec<Job>,
    fleet: Arc<Fleet>,
    /// Spreads the first jobs' ends over a job length, so ends come at a steady rate.
    first_jobs: u64,
    last_audit: Instant,
}

impl SimWorker {
    /// Runs until stopped. `phase` (0 to 1) places this worker's timers within their
    /// periods, as a fleet started over time has them spread.
    async fn run(mut self, stop: CancellationToken, phase: f64) -> Self {
        let c = self.fleet.cadence;
        let start = Instant::now() + c.relaxed_tick.mul_f64(phase);
        for (_, _, next) in &mut self.shards {
            *next = start;
        }
        let mut step = tokio::time::interval(STEP);
        step.set_missed_tick_behavior(MissedTickBehavior::Delay);
        // Each shard is read once per IDLE_READ while nothing comes.
        let idle_read = IDLE_READ / self.shards.len() as u32;
        let mut next_read = Instant::now();
        let mut next_wait = Instant::now() + WAKE_BLOCK.mul_f64(phase);
        loop {
            let next_tick = self.shards.iter().map(|s| s.2).min().unwrap_or(start);
            tokio::select! {
                _ = stop.cancelled() => return self,
                _ = tokio::time::sleep_until(next_tick.into()) => {
                    for shard in self.heartbeat().await {
                        self.reclaim(shard).await;
                    }
                }
                Some(shard) = self.wakes.recv() => self.reclaim(shard).await,
                _ = step.tick() => {
                    if self.end_due().await {
                        next_read = Instant::now();
                    }
                    let free = self.jobs.len() < self.capacity;
                    if free && Instant::now() >= next_read && self.read_new().await == 0 {
                        next_read = Instant::now() + idle_read;
                    }
                    if Instant::now() >= next_wait {
                        next_wait += WAKE_BLOCK;
                        self.wait_ends_empty().await;
                    }
                }
            }
        }
    }

    /// What its waits for wake-ups cost when nothing comes: one call per shard each
    /// WAKE_BLOCK.
    async fn wait_ends_empty(&self) {
        for (shard, ..) in &self.shards {
            let store = &self.fleet.shards[*shard as usize];
            let cmd = redis::cmd("LPOP")
                .arg(store.keys().wake(&self.id))
                .to_owned();
            if let Err(e) = store.query::<Option<String>>(&cmd).await {
                self.fleet.error("waiting for wake-ups", e);
            }
        }
    }

    /// The fields the worker writes into its registry hash.
    fn registry(&self) -> Vec<(&'static str, String)> {
        let ids: Vec<&str> = self.jobs.iter().map(|j| j.job_id.as_str()).collect();
        vec![
            ("host", "sim".to_string()),
            ("pid", "0".to_string()),
            ("version", env!("CARGO_PKG_VERSION").to_string()),
            ("started_ms", "0".to_string()),
            ("running", self.jobs.len().to_string()),
            ("running_jobs", ids.join(",")),
            ("capacity", self.capacity.to_string()),
            ("model", "null".to_string()),
            ("device", "cpu".to_string()),
            ("draining", "0".to_string()),
        ]
    }

    /// One heartbeat as the worker sends it: in each shard it serves, its lease and registry
    /// hash (`fr_worker_tick`, with the fields that changed); every lease (or when a tick
    /// says it registered afresh) an audit of its jobs' entries. The shards whose tick says
    /// a reclaim pass is due.
    async fn heartbeat(&mut self) -> Vec<u32> {
        let fleet = self.fleet.clone();
        let c = fleet.cadence;
        let registry = self.registry();
        let mut due = Vec::new();
        let mut registered = false;
        let mut answered = true;
        let now = Instant::now();
        for (shard, writes, next) in &mut self.shards {
            if now < *next {
                continue;
            }
            let store = &fleet.shards[*shard as usize];
            let sent = writes.to_send(&registry, Instant::now(), c.lease);
            let tick = functions::tick(store, &self.id, c.call_in, c.sweeper_hold_ms, &sent);
            *next = now + c.tick;
            match tick.await {
                Ok(tick) => {
                    writes.answered(&registry, &sent, Instant::now(), tick.hash_created);
                    registered |= tick.registered;
                    if tick.reclaim_due {
                        due.push(*shard);
                    }
                    if !tick.sweeper {
                        *next = now + c.relaxed_tick;
                    }
                }
                Err(e) => {
                    answered = false;
                    fleet.error("renewing the lease", e);
                }
            }
        }
        if answered {
            fleet.renewed.lock().unwrap()[self.index] = Some(Instant::now());
        }
        if registered || self.last_audit.elapsed() >= fleet.cadence.audit {
            self.last_audit = Instant::now();
            self.audit().await;
        }
        due
    }

    /// Checks every running job's entry (`fr_job_heartbeat`), one call per shard.
    async fn audit(&mut self) {
        let fleet = self.fleet.clone();
        let mut lost: Vec<(u32, String)> = Vec::new();
        for (shard, ..) in &self.shards {
            let ids: Vec<(&str, &str)> = self
                .jobs
                .iter()
                .filter(|j| j.shard == *shard)
                .map(|j| (j.entry_id.as_str(), j.job_id.as_str()))
                .collect();
            if ids.is_empty() {
                continue;
            }
            let store = &fleet.shards[*shard as usize];
            match functions::heartbeat(store, &self.id, fleet.cadence.call_in, &ids).await {
                Ok(leases) => {
                    for ((entry_id, _), lease) in ids.iter().zip(leases) {
                        if lease == Lease::Lost {
                            lost.push((*shard, entry_id.to_string()));
                        }
                    }
                }
                Err(e) => fleet.error("renewing leases", e),
            }
        }
        fleet
            .live_lost
            .fetch_add(lost.len() as u64, Ordering::Relaxed);
        self.jobs
            .retain(|j| !lost.contains(&(j.shard, j.entry_id.clone())));
    }

    /// One reclaim pass in `shard`, when the worker would make it, sized as the worker sizes
    /// it.
    async fn reclaim(&mut self, shard: u32) {
        let running = self.jobs.len();
        if running >= self.capacity * 2 {
            return;
        }
        let count = self.capacity.saturating_sub(running).max(1);
        let fleet = self.fleet.clone();
        let store = &fleet.shards[shard as usize];
        let reply = functions::reclaim(store, &self.id, fleet.cadence.call_in, count).await;
        let entries = match reply {
            Ok(reply) => parse_entry_list(&reply),
            Err(e) => return fleet.error("reclaiming", e),
        };
        let dead = fleet.dead.load(Ordering::Relaxed);
        for entry in &entries {
            let key = (shard, entry.id.clone());
            let from = fleet.holder.lock().unwrap().get(&key).copied();
            if from == Some(dead) {
                fleet.taken.lock().unwrap().insert(key, Instant::now());
            } else {
                eprintln!(
                    "fleet_sim: entry {} of shard {shard} taken from live worker {from:?}",
                    entry.id
                );
                fleet.live_lost.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.claim(shard, entries).await;
    }

    /// Reads new entries for the free slots (without blocking) from the next of its shards,
    /// in turn; returns how many came.
    async fn read_new(&mut self) -> usize {
        let free = self.capacity - self.jobs.len();
        let shard = self.shards[self.next_read % self.shards.len()].0;
        self.next_read += 1;
        let fleet = self.fleet.clone();
        let store = &fleet.shards[shard as usize];
        let cmd = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(WORKER_GROUP)
            .arg(&self.id)
            .arg("COUNT")
            .arg(free)
            .arg("STREAMS")
            .arg(store.keys().jobs())
            .arg(">")
            .to_owned();
        match store.query::<redis::Value>(&cmd).await {
            Ok(reply) => {
                let entries = parse_read_reply(&reply);
                let n = entries.len();
                self.claim(shard, entries).await;
                n
            }
            Err(e) => {
                fleet.error("reading the job stream", e);
                0
            }
        }
    }

    /// `fr_job_claim` in `shard` for the entries read, as the worker calls it; starts those
    /// it may run.
    async fn claim(&mut self, shard: u32, entries: Vec<Entry>) {
        if entries.is_empty() {
            return;
        }
        let fleet = self.fleet.clone();
        let store = &fleet.shards[shard as usize];
        let specs: Vec<JobSpec> = entries
            .iter()
            .filter_map(|e| JobSpec::parse(&e.id, &e.fields, 2.0, || e.id.clone()).ok())
            .collect();
        let fields: Vec<_> = specs.iter().map(JobSpec::hash_fields).collect();
        let batch: Vec<ClaimEntry<'_>> = specs
            .iter()
            .zip(&fields)
            .map(|(s, f)| ClaimEntry {
                entry_id: &s.entry_id,
                job_id: &s.job_id,
                fields: f,
            })
            .collect();
        let c = fleet.cadence;
        let verdicts = match functions::claim(store, &self.id, c.max_attempts, &batch).await {
            Ok(v) => v,
            Err(e) => return fleet.error("claiming", e),
        };
        for (spec, verdict) in specs.iter().zip(verdicts) {
            if !matches!(verdict, ClaimVerdict::Run { .. }) {
                fleet.error("claiming", format!("{} got {verdict:?}", spec.entry_id));
                continue;
            }
            let life = if self.first_jobs > 0 {
                self.first_jobs -= 1;
                c.job_len
                    .mul_f64((self.first_jobs * 7919 % 1000) as f64 / 1000.0)
            } else {
                c.job_len
            };
            fleet
                .holder
                .lock()
                .unwrap()
                .insert((shard, spec.entry_id.clone()), self.index);
            fleet.running.fetch_add(1, Ordering::Relaxed);
            self.jobs.push(Job {
                shard,
                entry_id: spec.entry_id.clone(),
                job_id: spec.job_id.clone(),
                ends_at: Instant::now() + life,
            });
        }
    }

    /// Ends the jobs whose time is up (end entry in each job's slot, then one
    /// `fr_job_finish` per shard for its jobs), and queues a new job in the same shard for
    /// each. Whether any ended.
    async fn end_due(&mut self) -> bool {
        let now = Instant::now();
        let (due, keep): (Vec<Job>, Vec<Job>) = std::mem::take(&mut self.jobs)
            .into_iter()
            .partition(|j| j.ends_at <= now);
        self.jobs = keep;
        if due.is_empty() {
            return false;
        }
        let fleet = self.fleet.clone();
        let retention = fleet.cadence.retention;
        let mut ends: BTreeMap<u32, Vec<FinishEntry>> = BTreeMap::new();
        for job in &due {
            let status = JobStatus::Completed;
            let store = &fleet.shards[job.shard as usize];
            if let Err(e) = functions::end(store, &job.job_id, status, "", retention).await {
                fleet.error("writing an end entry", e);
            }
            ends.entry(job.shard).or_default().push(FinishEntry {
                entry_id: job.entry_id.clone(),
                job_id: job.job_id.clone(),
                status,
                error: String::new(),
            });
        }
        for (shard, ends) in ends {
            let store = &fleet.shards[shard as usize];
            match functions::finish(store, &self.id, &ends).await {
                Ok(answers) => {
                    let lost = answers.iter().filter(|a| **a == Ownership::Lost).count();
                    fleet.live_lost.fetch_add(lost as u64, Ordering::Relaxed);
                }
                Err(e) => fleet.error("finishing", e),
            }
        }
        fleet.running.fetch_sub(due.len(), Ordering::Relaxed);
        for job in &due {
            fleet.queue_job(job.shard).await;
        }
        true
    }
}

/// One `INFO commandstats` + `INFO cpu` reading: calls and µs per command, CPU µs.
#[derive(Default)]
struct Sample {
    calls: BTreeMap<String, (u64, u64)>,
    cpu_us: u64,
}

async fn sample(store: &Store) -> Sample {
    let text: String = store
        .query(redis::cmd("INFO").arg("commandstats"))
        .await
        .expect("info");
    let mut s = Sample::default();
    for (name, stats) in text
        .lines()
        .filter_map(|l| l.strip_prefix("cmdstat_")?.split_once(':'))
    {
        let field = |key: &str| {
            stats
                .split(',')
                .find_map(|kv| kv.strip_prefix(key)?.parse::<u64>().ok())
                .unwrap_or(0)
        };
        s.calls
            .insert(name.to_string(), (field("calls="), field("usec=")));
    }
    let cpu: String = store
        .query(redis::cmd("INFO").arg("cpu"))
        .await
        .expect("info");
    let secs = |key: &str| {
        cpu.lines()
            .find_map(|l| l.strip_prefix(key)?.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    s.cpu_us = ((secs("used_cpu_sys:") + secs("used_cpu_user:")) * 1e6) as u64;
    s
}

/// The measurement's own commands: left out of the tables and of the CPU figure.
const PROBE_COMMANDS: [&str; 4] = ["info", "slowlog|get", "slowlog|reset", "config|set"];

/// Per function, from the slow log (threshold 0): calls, µs and the longest call.
#[derive(Default)]
struct FunctionTimes {
    by_name: BTreeMap<String, (u64, u64, u64)>,
    last_id: Option<u64>,
    /// Entries the log dropped between two reads (the figures then undercount).
    missed: u64,
}

impl FunctionTimes {
    /// Reads the entries logged since the last read (the log is never reset, so nothing
    /// logged between two reads is lost unless it overflows).
    async fn drain(&mut self, probe: &Store) {
        let Some(newest) = slow_log(probe, 1).await.first().map(|e| e.0) else {
            return;
        };
        let Some(last) = self.last_id.replace(newest) else {
            return;
        };
        // Entries logged after `newest` come first in the reply: ask for some more.
        let wanted = (newest.saturating_sub(last) * 3 / 2 + 1000).min(SLOW_LOG_LEN);
        let fresh: Vec<_> = slow_log(probe, wanted)
            .await
            .into_iter()
            .filter(|e| e.0 > last && e.0 <= newest)
            .collect();
        self.missed += (newest - last).saturating_sub(fresh.len() as u64);
        for (_, us, args) in fresh {
            let word = |i: usize| {
                args.get(i)
                    .and_then(|v| redis::from_redis_value::<String>(v.clone()).ok())
                    .unwrap_or_default()
                    .to_lowercase()
            };
            // The commands the functions run are logged too; their times are inside FCALL's.
            if word(0) != "fcall" {
                continue;
            }
            let e = self.by_name.entry(word(1)).or_default();
            e.0 += 1;
            e.1 += us;
            e.2 = e.2.max(us);
        }
    }
}

/// The slow log's capacity while a point is measured.
const SLOW_LOG_LEN: u64 = 200_000;

/// The newest `count` slow log entries: id, µs, arguments.
async fn slow_log(probe: &Store, count: u64) -> Vec<(u64, u64, Vec<redis::Value>)> {
    let cmd = redis::cmd("SLOWLOG").arg("GET").arg(count).to_owned();
    let items: Vec<redis::Value> = probe.query(&cmd).await.unwrap_or_default();
    items
        .into_iter()
        .filter_map(|v| {
            type Logged = (u64, u64, u64, Vec<redis::Value>, String, String);
            let (id, _, us, args, ..): Logged = redis::from_redis_value(v).ok()?;
            Some((id, us, args))
        })
        .collect()
}

async fn config_set(probe: &Store, name: &str, value: &str) {
    let _: () = probe
        .query(redis::cmd("CONFIG").arg("SET").arg(name).arg(value))
        .await
        .expect("config set");
}

/// One point's readings: the server's counters around a plain window, then the functions'
/// times from the slow log in a second window (logging every command costs the server
/// time, so the first window's figures are taken without it).
struct Measured {
    before: Sample,
    after: Sample,
    secs: f64,
    functions: FunctionTimes,
    functions_secs: f64,
}

/// Measures every node at once (one node, or each master of a Cluster).
async fn measure(probes: &[Store], seconds: f64) -> Vec<Measured> {
    let mut before = Vec::new();
    for probe in probes {
        before.push(sample(probe).await);
    }
    let start = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
    let mut after = Vec::new();
    for probe in probes {
        after.push(sample(probe).await);
    }
    let secs = start.elapsed().as_secs_f64();
    let mut functions: Vec<FunctionTimes> = probes.iter().map(|_| Default::default()).collect();
    for (probe, f) in probes.iter().zip(&mut functions) {
        config_set(probe, "slowlog-max-len", &SLOW_LOG_LEN.to_string()).await;
        f.drain(probe).await;
        config_set(probe, "slowlog-log-slower-than", "0").await;
    }
    let start = Instant::now();
    while start.elapsed().as_secs_f64() < seconds {
        tokio::time::sleep(Duration::from_millis(250)).await;
        for (probe, f) in probes.iter().zip(&mut functions) {
            f.drain(probe).await;
        }
    }
    let functions_secs = start.elapsed().as_secs_f64();
    for (probe, f) in probes.iter().zip(&mut functions) {
        config_set(probe, "slowlog-log-slower-than", "10000").await;
        f.drain(probe).await;
    }
    before
        .into_iter()
        .zip(after)
        .zip(functions)
        .map(|((before, after), functions)| Measured {
            before,
            after,
            secs,
            functions,
            functions_secs,
        })
        .collect()
}

/// The server's CPU µs per second in a window, less the measurement's own commands.
fn cpu_per_s(m: &Measured) -> f64 {
    let probe_us: u64 = PROBE_COMMANDS
        .iter()
        .map(|name| {
            let usec = |s: &Sample| s.calls.get(*name).map_or(0, |c| c.1);
            usec(&m.after) - usec(&m.before)
        })
        .sum();
    (m.after.cpu_us - m.before.cpu_us - probe_us) as f64 / m.secs
}

/// Prints the per-command and per-function tables of one node.
fn report(m: &Measured) {
    let (before, after, secs) = (&m.before, &m.after, m.secs);
    println!("| command (INFO commandstats) | calls/s | µs/s | µs/call |");
    println!("| --- | ---: | ---: | ---: |");
    for (name, (calls, usec)) in &after.calls {
        let (c0, u0) = before.calls.get(name).copied().unwrap_or((0, 0));
        let (dc, du) = (calls - c0, usec - u0);
        if dc == 0 || PROBE_COMMANDS.contains(&name.as_str()) {
            continue;
        }
        let per_call = du as f64 / dc as f64;
        println!(
            "| {name} | {:.0} | {:.0} | {per_call:.1} |",
            dc as f64 / secs,
            du as f64 / secs
        );
    }
    println!(
        "(FCALL's time includes the commands its functions run, which are counted in their \
         own rows too: only fcall, xreadgroup, pexpire, and the hset and xadd the functions \
         do not make, add up)"
    );
    println!(
        "\n| function (slow log, next {:.0} s) | calls/s | µs/s | µs/call | max µs |",
        m.functions_secs
    );
    println!("| --- | ---: | ---: | ---: | ---: |");
    for (name, (calls, us, max)) in &m.functions.by_name {
        println!(
            "| {name} | {:.0} | {:.0} | {:.1} | {max} |",
            *calls as f64 / m.functions_secs,
            *us as f64 / m.functions_secs,
            *us as f64 / (*calls).max(1) as f64
        );
    }
    if m.functions.missed > 0 {
        println!(
            "(the slow log dropped {} entries between reads)",
            m.functions.missed
        );
    }
}

/// How the queue is split: SHARDS (K, default 1: the one-slot layout) and how many of them
/// each worker serves, SERVED (S, default all), worker i the S shards from i x S on (mod K),
/// so that every shard is served when W x S >= K.
#[derive(Clone, Copy)]
struct Layout {
    shards: u32,
    served: u32,
}

impl Layout {
    fn from_env() -> Self {
        let shards = (env_num("SHARDS", 1) as u32).clamp(1, MAX_QUEUE_SHARDS);
        let served = (env_num("SERVED", u64::from(shards)) as u32).clamp(1, shards);
        Layout { shards, served }
    }

    fn served_by(self, worker: usize) -> impl Iterator<Item = u32> {
        let first = worker as u64 * u64::from(self.served);
        (0..u64::from(self.served)).map(move |j| ((first + j) % u64::from(self.shards)) as u32)
    }
}

/// One (W, N) point of the grid.
#[derive(Clone, Copy)]
struct Point {
    workers: usize,
    jobs: usize,
}

fn points() -> Vec<Point> {
    std::env::var("POINTS")
        .unwrap_or_else(|_| "2x16,8x64,32x256,128x1024,32x10000".into())
        .split(',')
        .map(|p| {
            let (w, n) = p.trim().split_once('x').expect("POINTS: WORKERSxJOBS,...");
            Point {
                workers: w.parse().expect("POINTS: a number of workers"),
                jobs: n.parse().expect("POINTS: a number of jobs"),
            }
        })
        .collect()
}

/// Starts the fleet of one point on fresh keys, queues its jobs and waits until all run.
async fn start_fleet(
    config: &Config,
    point: Point,
    layout: Layout,
    cadence: Cadence,
) -> (
    Arc<Fleet>,
    Vec<(CancellationToken, tokio::task::JoinHandle<SimWorker>)>,
) {
    let prefix = format!(
        "fleet{}w{}n{}",
        std::process::id(),
        point.workers,
        point.jobs
    );
    let store = fleet_store(config, &prefix, (point.workers + 8).min(64));
    store.load_functions().await.expect("functions");
    let shards: Vec<Store> = (0..layout.shards).map(|i| store.shard(i)).collect();
    for shard in &shards {
        shard.ensure_group().await.expect("group");
    }
    let fleet = Arc::new(Fleet {
        shards,
        cadence,
        holder: Mutex::default(),
        dead: AtomicUsize::new(usize::MAX),
        taken: Mutex::default(),
        renewed: Mutex::new(vec![None; point.workers]),
        running: AtomicUsize::new(0),
        live_lost: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        queued: AtomicU64::new(0),
    });
    for n in 0..point.jobs {
        fleet.queue_job(n as u32 % layout.shards).await;
    }
    let capacity = point.jobs.div_ceil(point.workers);
    let mut workers = Vec::new();
    let mut wakes: Vec<Vec<tokio::sync::mpsc::UnboundedSender<u32>>> =
        vec![Vec::new(); layout.shards as usize];
    for index in 0..point.workers {
        let (wake_tx, wake_rx) = tokio::sync::mpsc::unbounded_channel();
        for shard in layout.served_by(index) {
            wakes[shard as usize].push(wake_tx.clone());
        }
        let worker = SimWorker {
            index,
            id: format!("sim-worker-{index}"),
            capacity,
            shards: layout
                .served_by(index)
                .map(|shard| (shard, RegistryWrites::default(), Instant::now()))
                .collect(),
            wakes: wake_rx,
            next_read: 0,
            jobs: Vec::new(),
            fleet: fleet.clone(),
            first_jobs: capacity as u64,
            // Audits spread over their period as the ticks are.
            last_audit: Instant::now() - cadence.audit.mul_f64(index as f64 / point.workers as f64),
        };
        let phase = index as f64 / point.workers as f64;
        let stop = CancellationToken::new();
        workers.push((stop.clone(), tokio::spawn(worker.run(stop, phase))));
    }
    for (shard, waiting) in wakes.into_iter().enumerate() {
        tokio::spawn(hand_out_wakes(
            fleet.shards[shard].clone(),
            shard as u32,
            waiting,
        ));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while fleet.running.load(Ordering::Relaxed) < point.jobs && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (fleet, workers)
}

/// The workers' waits for a shard's orphan tokens, as one `BLPOP`: each token goes to the
/// next live worker of the shard in turn, as Redis hands tokens to its blocked clients.
/// Ends when every worker of the shard has stopped.
async fn hand_out_wakes(
    store: Store,
    shard: u32,
    waiting: Vec<tokio::sync::mpsc::UnboundedSender<u32>>,
) {
    let mut next = 0usize;
    while !waiting.iter().all(|w| w.is_closed()) {
        let cmd = redis::cmd("BLPOP")
            .arg(store.keys().orphans_wake())
            .arg(1)
            .to_owned();
        match store.query_blocking::<Option<(String, String)>>(&cmd).await {
            Ok(Some(_)) => {}
            Ok(None) => continue,
            Err(e) => {
                eprintln!("fleet_sim: waiting for orphan tokens: {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        }
        for _ in 0..waiting.len() {
            next = (next + 1) % waiting.len();
            if waiting[next].send(shard).is_ok() {
                break;
            }
        }
    }
}

/// Stops one worker's heartbeats, reclaim passes and finishes (a worker that died), and
/// waits until its jobs are taken over. Returns each job's delay from the dead worker's
/// last renewal to its takeover, and how many were not taken in time.
async fn kill_one(
    fleet: &Fleet,
    workers: &mut Vec<(CancellationToken, tokio::task::JoinHandle<SimWorker>)>,
) -> (Vec<f64>, usize) {
    let (stop, handle) = workers.remove(0);
    stop.cancel();
    let mut victim = handle.await.expect("worker");
    // Its wait for wake-ups died with it: tokens go to the others.
    victim.wakes.close();
    fleet.dead.store(victim.index, Ordering::Relaxed);
    let last = fleet.renewed.lock().unwrap()[victim.index].unwrap_or_else(Instant::now);
    let c = fleet.cadence;
    // A full survivor takes one entry per pass (a wake-up, or a relaxed tick): allow a
    // relaxed tick per job past the lease.
    let wait = c.lease + c.relaxed_tick * (victim.jobs.len() as u32 + 2);
    while Instant::now() < last + wait {
        let taken = fleet.taken.lock().unwrap().len();
        if taken >= victim.jobs.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let taken = fleet.taken.lock().unwrap();
    let mut delays: Vec<f64> = victim
        .jobs
        .iter()
        .filter_map(|j| taken.get(&(j.shard, j.entry_id.clone())))
        .map(|at| at.duration_since(last).as_secs_f64())
        .collect();
    delays.sort_by(f64::total_cmp);
    let missing = victim.jobs.len() - delays.len();
    (delays, missing)
}

/// How long each point is measured, and each node's CPU when nothing runs.
struct Window {
    seconds: f64,
    idle_us: Vec<f64>,
    layout: Layout,
}

/// Runs one point and prints its figures: those of the busiest node where there are several.
async fn run_point(config: &Config, probes: &[Store], point: Point, window: &Window) {
    let cadence = Cadence::new(&config.queue, job_len());
    println!(
        "\n## W={} workers, N={} running jobs (capacity {} each)\n",
        point.workers,
        point.jobs,
        point.jobs.div_ceil(point.workers)
    );
    let (fleet, mut workers) = start_fleet(config, point, window.layout, cadence).await;
    let running = fleet.running.load(Ordering::Relaxed);
    if running < point.jobs {
        println!("(only {running} of {} jobs started in 60 s)", point.jobs);
    }
    tokio::time::sleep(cadence.relaxed_tick).await;
    let measured = measure(probes, window.seconds).await;
    let cpus: Vec<f64> = measured.iter().map(cpu_per_s).collect();
    let busiest = (0..cpus.len())
        .max_by(|a, b| cpus[*a].total_cmp(&cpus[*b]))
        .unwrap_or(0);
    if cpus.len() > 1 {
        let each: Vec<String> = cpus.iter().map(|c| format!("{c:.0}")).collect();
        println!(
            "redis CPU per node, µs/s: {}; the busiest (node {}) below\n",
            each.join(", "),
            busiest + 1
        );
    }
    let m = &measured[busiest];
    report(m);
    let (delays, missing) = kill_one(&fleet, &mut workers).await;
    for (stop, _) in &workers {
        stop.cancel();
    }
    for (_, handle) in workers {
        let _ = handle.await;
    }
    let fcall_us = |s: &Sample| s.calls.get("fcall").map_or(0, |c| c.1);
    print_outcome(
        point,
        &fleet,
        Outcome {
            cpu: cpus[busiest],
            idle: window.idle_us[busiest],
            fcall: (fcall_us(&m.after) - fcall_us(&m.before)) as f64 / m.secs,
            delays,
            missing,
            layout: window.layout,
        },
    );
}

/// A point's figures on its busiest node, and its worker death.
struct Outcome {
    /// The server's CPU µs per second, and when idle.
    cpu: f64,
    idle: f64,
    /// µs per second in FCALL (the functions, and the commands they run).
    fcall: f64,
    /// Seconds from the dead worker's last renewal to each of its jobs' takeover, sorted.
    delays: Vec<f64>,
    missing: usize,
    layout: Layout,
}

fn print_outcome(point: Point, fleet: &Fleet, o: Outcome) {
    let busy = (o.cpu - o.idle).max(0.0);
    let (jobs, workers) = (point.jobs as f64, point.workers as f64);
    println!(
        "\nredis CPU {:.0} µs/s ({:.1}% of a core), {busy:.0} above idle: {:.2} µs per running \
         job-second, {:.1} µs per worker-second; in FCALL {:.0} µs/s: {:.2} µs per running \
         job-second",
        o.cpu,
        o.cpu / 1e4,
        busy / jobs,
        busy / workers,
        o.fcall,
        o.fcall / jobs
    );
    let bound = (fleet.cadence.lease + Duration::from_secs(1)).as_secs_f64();
    let pick = |q: f64| {
        let last = o.delays.len().max(1) - 1;
        o.delays
            .get((last as f64 * q) as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    let (p50, max) = (pick(0.5), pick(1.0));
    let met = o.missing == 0 && max <= bound;
    println!(
        "worker death: {} jobs taken over after {:.2} s (first), {p50:.2} s (median), \
         {max:.2} s (last), {} not taken; bound JOB_LEASE_MS + 1 s = {bound:.1} s: {}",
        o.delays.len(),
        pick(0.0),
        o.missing,
        if met { "met" } else { "MISSED" }
    );
    let live_lost = fleet.live_lost.load(Ordering::Relaxed);
    println!(
        "live workers' jobs taken or leases lost: {live_lost}; failed calls: {}",
        fleet.errors.load(Ordering::Relaxed)
    );
    println!(
        "summary W={} N={} K={} S={} cpu_us_per_s={:.0} above_idle={busy:.0} \
         us_per_job_s={:.2} us_per_worker_s={:.1} fcall_us_per_job_s={:.2} \
         reclaim_first_s={:.2} reclaim_p50_s={p50:.2} reclaim_max_s={max:.2} not_taken={} \
         live_taken={live_lost}",
        point.workers,
        point.jobs,
        o.layout.shards,
        o.layout.served,
        o.cpu,
        busy / jobs,
        busy / workers,
        o.fcall / jobs,
        pick(0.0),
        o.missing
    );
}

fn job_len() -> Duration {
    Duration::from_secs(env_num("JOB_S", 60))
}

#[tokio::main]
async fn main() {
    let config = config();
    let cadence = Cadence::new(&config.queue, job_len());
    let seconds = env_num("SECONDS", 5) as f64;
    let layout = Layout::from_env();
    println!(
        "# Fleet simulator: JOB_LEASE_MS={} RECLAIM_INTERVAL_MS={} heartbeat every {} ms \
         (the sweeper) or {} ms, jobs of {} s, {seconds} s measured per point, SHARDS={} \
         SERVED={}",
        cadence.lease.as_millis(),
        config.queue.reclaim_interval.as_millis(),
        cadence.tick.as_millis(),
        cadence.relaxed_tick.as_millis(),
        cadence.job_len.as_secs(),
        layout.shards,
        layout.served
    );
    let probes = probes(&config);
    let mut idle = Vec::new();
    for probe in &probes {
        let before = sample(probe).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        idle.push((sample(probe).await.cpu_us - before.cpu_us) as f64 / 2.0);
    }
    let each: Vec<String> = idle.iter().map(|c| format!("{c:.0}")).collect();
    println!("idle redis-server CPU per node: {} µs/s", each.join(", "));
    let window = Window {
        seconds,
        idle_us: idle,
        layout,
    };
    for point in points() {
        run_point(&config, &probes, point, &window).await;
    }
}
