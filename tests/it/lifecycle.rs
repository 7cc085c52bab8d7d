//! The job lifecycle against a real Redis: claim, results, end entry, events, cancel,
//! dead-lettering, bad input, duplicate ids, prompt functions, health endpoints, Redis
//! restarts, and workers killed (SIGKILL) or stopped (SIGTERM) as real processes.
//!
//! Jobs here run the test body of `common::worker` (the model and ingest are tested on
//! their own).

use crate::common::claims::SWEEPER_HOLD_MS;
use crate::common::process::{signal, spawn_test_process};
use crate::common::worker::{InProcessWorker, TestBody, config};
use crate::common::{TestRedis, eventually, unique_prefix};
use free_roam::job::JobStatus;
use free_roam::metrics::Metrics;
use free_roam::queue::{Worker, WorkerIdentity, WorkerState};
use free_roam::store::Store;
use free_roam::store::functions::{self, ClaimVerdict, Lease, Ownership, Retention};
use free_roam::store::keys::Keys;
use std::collections::HashMap;
use std::process::Child;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(20);

/// Loads the function library the way the CLI does at start, for tests that call functions
/// before any worker has.
async fn load_functions(redis: &TestRedis, prefix: &str) {
    Store::new(&redis.url(), prefix, 2)
        .unwrap()
        .load_functions()
        .await
        .unwrap();
}

/// A store on `prefix` with the library loaded and the `workers` group made: what a test
/// that calls the queue's functions itself needs.
/// How a hand-made worker calls in: with a lease of a millisecond (overdue at once) or of a
/// minute (live through any test), and a silence of a minute before the fleet counts as
/// quiet.
const OVERDUE: functions::CallIn = functions::CallIn {
    quiet_ms: 60_000,
    lease_ms: 1,
};
const LIVE: functions::CallIn = functions::CallIn {
    quiet_ms: 60_000,
    lease_ms: 60_000,
};

async fn queue_store(redis: &TestRedis, prefix: &str) -> Store {
    let store = Store::new(&redis.url(), prefix, 4).unwrap();
    store.load_functions().await.unwrap();
    store.ensure_group().await.unwrap();
    store
}

fn keys(prefix: &str) -> Keys {
    Keys::new(prefix)
}

/// The queue's consumer group, driven by hand: the test stands in for a worker that read
/// entries, was taken over, or died holding them. The group's name is written out, as the
/// contract names it.
struct WorkersGroup<'a> {
    redis: &'a TestRedis,
    jobs: String,
}

impl<'a> WorkersGroup<'a> {
    const NAME: &'static str = "workers";

    fn of(redis: &'a TestRedis, keys: &Keys) -> Self {
        Self {
            redis,
            jobs: keys.jobs(),
        }
    }

    /// Makes the group (and the jobs stream), as the first worker to start does.
    fn create(&self) {
        let _: String =
            self.redis
                .cmd(&["XGROUP", "CREATE", &self.jobs, Self::NAME, "0", "MKSTREAM"]);
    }

    /// Reads up to `count` new entries as `consumer`: pending on it from now on.
    fn read(&self, consumer: &str, count: usize) {
        let count = count.to_string();
        let _: redis::Value = self.redis.cmd(&[
            "XREADGROUP",
            "GROUP",
            Self::NAME,
            consumer,
            "COUNT",
            &count,
            "STREAMS",
            &self.jobs,
            ">",
        ]);
    }

    /// `XCLAIM` of `entry` for `consumer`, with `options` after the entry id.
    fn claim(&self, consumer: &str, entry: &str, options: &[&str]) {
        let mut args = vec!["XCLAIM", &self.jobs, Self::NAME, consumer, "0", entry];
        args.extend_from_slice(options);
        let _: redis::Value = self.redis.cmd(&args);
    }

    /// Hands `entry` to `consumer` without counting a delivery, as a takeover does.
    fn take_over(&self, consumer: &str, entry: &str) {
        self.claim(consumer, entry, &["JUSTID"]);
    }

    /// Delivers `entry` to `consumer` once more, counting the delivery.
    fn deliver_again(&self, consumer: &str, entry: &str) {
        self.claim(consumer, entry, &[]);
    }

    /// Leaves `entry` with `consumer` but idle far past any lease, as a hand-back does.
    fn hand_back(&self, consumer: &str, entry: &str) {
        self.claim(consumer, entry, &["IDLE", "86400000", "JUSTID"]);
    }

    /// The pending entries, oldest first (ten at most): (entry id, owner, idle ms,
    /// deliveries).
    fn pending(&self) -> Vec<(String, String, u64, u64)> {
        self.redis
            .cmd(&["XPENDING", &self.jobs, Self::NAME, "-", "+", "10"])
    }

    /// The owner and the deliveries of one pending entry.
    fn owner_of(&self, entry: &str) -> (String, u64) {
        let pending = self.pending();
        let (_, owner, _, deliveries) = pending
            .iter()
            .find(|(id, ..)| id == entry)
            .unwrap_or_else(|| panic!("{entry} is not pending: {pending:?}"));
        (owner.clone(), *deliveries)
    }
}

fn xadd(redis: &TestRedis, prefix: &str, fields: &[(&str, &str)]) -> String {
    let key = keys(prefix).jobs();
    let mut args: Vec<&str> = vec!["XADD", &key, "*"];
    for (k, v) in fields {
        args.push(k);
        args.push(v);
    }
    redis.cmd(&args)
}

fn status(redis: &TestRedis, prefix: &str, job: &str) -> Option<String> {
    redis.hget(&keys(prefix).job(job), "status")
}

fn results(redis: &TestRedis, prefix: &str, job: &str) -> Vec<HashMap<String, String>> {
    redis
        .xrange(&keys(prefix).results(job))
        .into_iter()
        .map(|(_, f)| f)
        .collect()
}

fn end_entry(redis: &TestRedis, prefix: &str, job: &str) -> Option<HashMap<String, String>> {
    results(redis, prefix, job)
        .into_iter()
        .find(|f| f.get("kind").map(String::as_str) == Some("end"))
}

/// Waits for the end entry and then for the hash's final status, which follows it.
async fn wait_end(redis: &TestRedis, prefix: &str, job: &str) -> HashMap<String, String> {
    eventually(WAIT, &format!("job {job} ends"), || {
        end_entry(redis, prefix, job).is_some()
            && status(redis, prefix, job)
                .and_then(|s| JobStatus::parse(&s))
                .is_some_and(JobStatus::is_terminal)
    })
    .await;
    end_entry(redis, prefix, job).unwrap()
}

/// Waits until every job entry is acked and deleted.
async fn wait_queue_empty(redis: &TestRedis, prefix: &str) {
    eventually(WAIT, "the queue is empty", || {
        redis.cmd::<i64>(&["XLEN", &keys(prefix).jobs()]) == 0
    })
    .await;
}

fn frames_of(redis: &TestRedis, prefix: &str, job: &str) -> Vec<u64> {
    let mut frames: Vec<u64> = results(redis, prefix, job)
        .iter()
        .filter(|f| f.get("kind").map(String::as_str) == Some("result"))
        .map(|f| f["frame"].parse().unwrap())
        .collect();
    frames.sort();
    frames.dedup();
    frames
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_runs_from_xadd_to_its_end_entry() {
    let redis = TestRedis::start();
    let p = unique_prefix();
    let w = InProcessWorker::start(&redis, &p, "w1", &[]);
    xadd(
        &redis,
        &p,
        &[
            ("stream_ref", "paced:5:20"),
            ("prompt", "Detect all people and vehicles"),
            ("fps", "2"),
            ("job_id", "job-1"),
        ],
    );

    let end = wait_end(&redis, &p, "job-1").await;
    assert_eq!(end["status"], "completed");
    assert_eq!(end["results"], "5");
    let rs = results(&redis, &p, "job-1");
    assert_eq!(rs.len(), 6, "five results and the end entry");
    assert_eq!(rs[0]["kind"], "result");
    assert_eq!(rs[0]["frame"], "0");
    assert_eq!(rs[0]["model"], "test-body");
    let output: serde_json::Value = serde_json::from_str(&rs[0]["output"]).unwrap();
    assert_eq!(output["prompt"], "Detect all people and vehicles");
    assert!(
        !rs[0].contains_key("prompt_version"),
        "a job's own prompt has no version"
    );

    let h = redis.hgetall(&keys(&p).job("job-1"));
    assert_eq!(h["status"], "completed");
    assert_eq!(h["worker"], "w1");
    assert_eq!(h["attempts"], "1");
    assert_eq!(h["prompt_mode"], "fixed");
    assert_eq!(h["fps"], "2");
    for f in ["created_ms", "started_ms", "updated_ms", "finished_ms"] {
        assert!(h[f].parse::<i64>().unwrap() > 0, "{f}");
    }
    // Counters and the cursor live in the job's own slot, beside its results.
    let progress = redis.hgetall(&keys(&p).progress("job-1"));
    assert_eq!(progress["results"], "5");
    assert_eq!(progress["cursor"], "4");
    assert_eq!(progress["ended"], "completed");
    for key in [
        keys(&p).job("job-1"),
        keys(&p).results("job-1"),
        keys(&p).progress("job-1"),
    ] {
        let ttl: i64 = redis.cmd(&["TTL", &key]);
        assert!(
            ttl > 86000,
            "{key}: finished jobs expire after RESULT_TTL_S"
        );
    }

    // The entry is acked and deleted: nothing pending, nothing queued.
    wait_queue_empty(&redis, &p).await;
    let pending = WorkersGroup::of(&redis, &keys(&p)).pending();
    assert!(pending.is_empty(), "{pending:?}");

    let events: Vec<(String, String)> = redis
        .xrange(&keys(&p).events())
        .into_iter()
        .filter(|(_, f)| f.get("job_id").map(String::as_str) == Some("job-1"))
        .map(|(_, f)| (f["from"].clone(), f["to"].clone()))
        .collect();
    assert_eq!(
        events,
        vec![
            ("queued".into(), "running".into()),
            ("running".into(), "completed".into())
        ]
    );
    let index: Vec<String> = redis.cmd(&["ZRANGE", &keys(&p).jobs_index(), "0", "-1"]);
    assert_eq!(index, vec!["job-1".to_string()]);
    assert_eq!(w.metrics.jobs_completed.get(), 1);
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_without_id_gets_a_uuid_and_follows_the_live_prompt() {
    let redis = TestRedis::start();
    let p = unique_prefix();
    load_functions(&redis, &p).await;
    let w = InProcessWorker::start(&redis, &p, "w1", &[]);
    let v: i64 = redis.cmd(&[
        "FCALL",
        "fr_prompt_set",
        "1",
        keys(&p).tag(),
        "Detect vehicles",
    ]);
    assert_eq!(v, 1);
    xadd(&redis, &p, &[("stream_ref", "paced:40:50")]);
    eventually(WAIT, "the job shows in the index", || {
        let ids: Vec<String> = redis.cmd(&["ZRANGE", &keys(&p).jobs_index(), "0", "-1"]);
        ids.len() == 1
    })
    .await;
    let ids: Vec<String> = redis.cmd(&["ZRANGE", &keys(&p).jobs_index(), "0", "-1"]);
    let job = ids[0].clone();
    assert!(uuid::Uuid::parse_str(&job).is_ok(), "{job} is a UUID");
    eventually(WAIT, "a few results with version 1", || {
        frames_of(&redis, &p, &job).len() >= 3
    })
    .await;
    let v: i64 = redis.cmd(&[
        "FCALL",
        "fr_prompt_set",
        "1",
        keys(&p).tag(),
        "Detect people",
    ]);
    assert_eq!(v, 2);
    let end = wait_end(&redis, &p, &job).await;
    assert_eq!(end["status"], "completed");
    let rs: Vec<_> = results(&redis, &p, &job)
        .into_iter()
        .filter(|f| f["kind"] == "result")
        .collect();
    assert_eq!(rs.first().unwrap()["prompt_version"], "1");
    let last = rs.last().unwrap();
    assert_eq!(
        last["prompt_version"], "2",
        "the new version reaches the running job"
    );
    assert!(last["output"].contains("Detect people"));
    assert_eq!(
        redis.hget(&keys(&p).job(&job), "prompt_mode").as_deref(),
        Some("live")
    );
    assert_eq!(
        redis
            .hget(&keys(&p).progress(&job), "prompt_version")
            .as_deref(),
        Some("2")
    );
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancel_stops_a_running_job_and_a_queued_one_never_runs() {
    let redis = TestRedis::start();
    let p = unique_prefix();
    let tag = keys(&p).tag().to_string();

    // Queued, with no worker around: cancelled at once, and never run later.
    load_functions(&redis, &p).await;
    xadd(
        &redis,
        &p,
        &[
            ("stream_ref", "paced:3:10"),
            ("job_id", "queued-1"),
            ("max_frames", "3"),
            ("max_duration_s", "9.5"),
            ("scene_gate", "off"),
        ],
    );
    let r: String = redis.cmd(&["FCALL", "fr_cancel", "1", &tag, "queued-1"]);
    assert_eq!(r, "cancelled");
    let hash = redis.hgetall(&keys(&p).job("queued-1"));
    assert_eq!(hash["status"], "cancelled");
    // The hash shows the entry's hash fields (`JobField::in_hash`), all of them.
    assert_eq!(hash["stream_ref"], "paced:3:10");
    assert_eq!(hash["max_frames"], "3");
    assert_eq!(hash["max_duration_s"], "9.5");
    assert!(!hash.contains_key("scene_gate"), "{hash:?}");
    // The function cannot reach the job's slot: the first worker to read the entry writes
    // the end entry, then drops the entry.
    assert!(end_entry(&redis, &p, "queued-1").is_none());

    let w = InProcessWorker::start(&redis, &p, "w1", &[]);
    let end = wait_end(&redis, &p, "queued-1").await;
    assert_eq!(end["status"], "cancelled");
    assert_eq!(end["results"], "0");
    wait_queue_empty(&redis, &p).await;
    xadd(
        &redis,
        &p,
        &[("stream_ref", "paced:1000:50"), ("job_id", "running-1")],
    );
    xadd(&redis, &p, &[("stream_ref", "hang"), ("job_id", "hang-1")]);
    eventually(WAIT, "the job runs", || {
        frames_of(&redis, &p, "running-1").len() >= 2
    })
    .await;
    eventually(WAIT, "the hanging job runs", || {
        status(&redis, &p, "hang-1").as_deref() == Some("running")
    })
    .await;
    let r: String = redis.cmd(&["FCALL", "fr_cancel", "1", &tag, "running-1"]);
    assert_eq!(r, "cancelling");
    let r: String = redis.cmd(&["FCALL", "fr_cancel", "1", &tag, "hang-1"]);
    assert_eq!(r, "cancelling");
    let end = wait_end(&redis, &p, "running-1").await;
    assert_eq!(end["status"], "cancelled");
    let end = wait_end(&redis, &p, "hang-1").await;
    assert_eq!(
        end["status"], "cancelled",
        "a body that ignores the stop is abandoned"
    );
    assert!(frames_of(&redis, &p, "running-1").len() < 1000);
    // The cancels reached the worker through its wake-up list, which only it pops.
    eventually(WAIT, "the worker popped its wake-ups", || {
        redis.cmd::<usize>(&["LLEN", &keys(&p).wake("w1")]) == 0
    })
    .await;
    assert!(end_entry(&redis, &p, "queued-1").is_some());
    assert!(
        frames_of(&redis, &p, "queued-1").is_empty(),
        "the cancelled queued job never ran"
    );

    // Cancelling again says so; an unknown id is an error.
    let r: String = redis.cmd(&["FCALL", "fr_cancel", "1", &tag, "running-1"]);
    assert_eq!(r, "already cancelled");
    let out = redis.cli(&["FCALL", "fr_cancel", "1", &tag, "nope"]);
    assert!(out.contains("unknown job nope"), "{out}");
    w.stop().await;
}

/// A job cancelled while queued never runs, even when its entry is read only after its
/// hash expired (a backlog longer than RESULT_TTL_S, or the fleet down that long): before,
/// the worker took it for a new job and ran it under the end entry that said cancelled.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_cancelled_while_queued_never_runs_though_its_hash_expired_first() {
    let redis = TestRedis::start();
    let p = unique_prefix();
    let k = keys(&p);
    load_functions(&redis, &p).await;
    xadd(
        &redis,
        &p,
        &[("stream_ref", "paced:3:10"), ("job_id", "late")],
    );
    let r: String = redis.cmd(&["FCALL", "fr_cancel", "1", k.tag(), "late"]);
    assert_eq!(r, "cancelled");
    // Its hash expires before any worker reads the entry.
    let _: i64 = redis.cmd(&["DEL", &k.job("late")]);

    let w = InProcessWorker::start(&redis, &p, "w1", &[]);
    let end = wait_end(&redis, &p, "late").await;
    assert_eq!(end["status"], "cancelled");
    wait_queue_empty(&redis, &p).await;
    assert!(frames_of(&redis, &p, "late").is_empty(), "it never ran");
    assert_eq!(status(&redis, &p, "late").as_deref(), Some("cancelled"));
    let ttl: i64 = redis.cmd(&["TTL", &k.job("late")]);
    assert!(ttl > 0, "the hash written again expires as usual: {ttl}");
    let left: i64 = redis.cmd(&["HLEN", &k.jobs_cancelled()]);
    assert_eq!(left, 0, "the mark goes with the entry's ack");
    w.stop().await;
}

/// A producer that trims `{fr}:jobs` (`XADD ... MAXLEN`, `XTRIM`) under a running job does
/// not orphan it: the job carries on to its end, with its end entry and its keys' expiry.
/// Before, the next renewal found the entry gone and the worker dropped the job silently,
/// its hash `running` for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_running_job_whose_entry_was_trimmed_carries_on_to_its_end() {
    let redis = TestRedis::start();
    let p = unique_prefix();
    let k = keys(&p);
    // A short lease: the entry is audited every second.
    let w = InProcessWorker::start(&redis, &p, "w1", &[("JOB_LEASE_MS", "1000")]);
    xadd(
        &redis,
        &p,
        &[("stream_ref", "paced:100:30"), ("job_id", "trimmed")],
    );
    eventually(WAIT, "running", || {
        frames_of(&redis, &p, "trimmed").len() >= 3
    })
    .await;
    let _: i64 = redis.cmd(&["XTRIM", &k.jobs(), "MAXLEN", "0"]);
    let end = wait_end(&redis, &p, "trimmed").await;
    assert_eq!(end["status"], "completed");
    assert_eq!(
        frames_of(&redis, &p, "trimmed"),
        (0..100).collect::<Vec<u64>>()
    );
    assert_eq!(status(&redis, &p, "trimmed").as_deref(), Some("completed"));
    for key in [
        k.job("trimmed"),
        k.results("trimmed"),
        k.progress("trimmed"),
    ] {
        let ttl: i64 = redis.cmd(&["TTL", &key]);
        assert!(ttl > 0, "{key} expires: {ttl}");
    }
    assert_eq!(w.metrics.leases_lost.get(), 0);
    w.stop().await;
}

/// A worker alone notices an entry pending under its own name that no running job holds
/// (what a claim or an end that ran out of retries during a long failover leaves behind),
/// gives it back and takes it again: the job runs to its end. Before, a reclaim pass never
/// took its caller's own entries, and the job showed `queued` or `running` until the
/// process restarted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_single_worker_takes_back_its_own_stray_entry() {
    let redis = TestRedis::start();
    let p = unique_prefix();
    let k = keys(&p);
    let group = WorkersGroup::of(&redis, &k);
    group.create();
    xadd(
        &redis,
        &p,
        &[("stream_ref", "paced:3:10"), ("job_id", "stray")],
    );
    // Read under the worker's own name, and never claimed: as if its claim gave up.
    group.read("w1", 1);
    let settings = [("JOB_LEASE_MS", "1000"), ("SHUTDOWN_TIMEOUT_MS", "1000")];
    let w = InProcessWorker::start(&redis, &p, "w1", &settings);
    // Given back once idle past three rounds of a step's retries (1 s and a 5 s backoff).
    eventually(Duration::from_secs(40), "the stray job ends", || {
        end_entry(&redis, &p, "stray").is_some()
    })
    .await;
    assert_eq!(
        end_entry(&redis, &p, "stray").unwrap()["status"],
        "completed"
    );
    assert_eq!(frames_of(&redis, &p, "stray"), vec![0, 1, 2]);
    assert!(group.pending().is_empty(), "{:?}", group.pending());
    assert_eq!(
        w.metrics.jobs_reclaimed.get(),
        1,
        "taken back by the reclaim pass"
    );
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_bad_entry_ends_failed_with_the_field_and_reason() {
    let redis = TestRedis::start();
    let p = unique_prefix();
    let w = InProcessWorker::start(&redis, &p, "w1", &[]);
    let long_prompt = "x".repeat(8 * 1024 + 1);
    type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case> = vec![
        (
            "no-ref",
            vec![("prompt", "x")],
            "field `stream_ref`: is required",
        ),
        (
            "fps-zero",
            vec![("stream_ref", "a"), ("fps", "0")],
            "field `fps`: must be a number in (0, 30]",
        ),
        (
            "fps-high",
            vec![("stream_ref", "a"), ("fps", "31")],
            "field `fps`",
        ),
        (
            "long-prompt",
            vec![("stream_ref", "a"), ("prompt", &long_prompt)],
            "field `prompt`: is 8193 bytes",
        ),
        (
            "bad-source",
            vec![("stream_ref", "a"), ("source", "ftp")],
            "field `source`",
        ),
        (
            "dash-ref",
            vec![("stream_ref", "-i /etc/passwd")],
            "field `stream_ref`: may not start with '-'",
        ),
        // Past what a deadline or a capture-time sum can hold: refused, not a panic later.
        (
            "huge-duration",
            vec![("stream_ref", "a"), ("max_duration_s", "1e300")],
            "field `max_duration_s`: must be a number of seconds above 0, at most",
        ),
        (
            "huge-clear",
            vec![
                ("stream_ref", "a"),
                ("alert_clear_ms", "18446744073709551615"),
            ],
            "field `alert_clear_ms`: must be a whole number of milliseconds, at most",
        ),
    ];
    for (id, fields, _) in &cases {
        let mut f = fields.clone();
        f.push(("job_id", id));
        xadd(&redis, &p, &f);
    }
    // A value that is not UTF-8, written with the redis crate.
    {
        let mut con = redis.client().get_connection().unwrap();
        let _: String = redis::cmd("XADD")
            .arg(keys(&p).jobs())
            .arg("*")
            .arg("job_id")
            .arg("not-utf8")
            .arg("stream_ref")
            .arg(&[0xffu8, 0xfe, 0x00][..])
            .query(&mut con)
            .unwrap();
    }
    // An unknown field is kept and warned about; the job runs.
    xadd(
        &redis,
        &p,
        &[
            ("stream_ref", "paced:1:1"),
            ("job_id", "extra-field"),
            ("colour", "red"),
        ],
    );
    // An entry whose job_id is unusable is filed under a UUID derived from the entry.
    let bad_id_entry = xadd(&redis, &p, &[("stream_ref", "a"), ("job_id", "has space")]);

    for (id, _, reason) in &cases {
        let end = wait_end(&redis, &p, id).await;
        assert_eq!(end["status"], "failed", "{id}");
        assert!(end["error"].contains(reason), "{id}: {}", end["error"]);
        let h = redis.hgetall(&keys(&p).job(id));
        assert_eq!(h["status"], "failed");
        assert!(h["error"].contains(reason));
    }
    let end = wait_end(&redis, &p, "not-utf8").await;
    assert!(
        end["error"].contains("field `stream_ref`: value is not valid UTF-8"),
        "{}",
        end["error"]
    );
    let end = wait_end(&redis, &p, "extra-field").await;
    assert_eq!(end["status"], "completed");
    let h = redis.hgetall(&keys(&p).job("extra-field"));
    assert_eq!(h["extra"], r#"{"colour":"red"}"#);
    assert!(h["warnings"].contains("unknown field `colour`"));
    let derived = free_roam::queue::job_id_for_entry(keys(&p).tag(), &bad_id_entry);
    let end = wait_end(&redis, &p, &derived).await;
    assert!(end["error"].contains("field `job_id`"), "{}", end["error"]);

    // Every entry was acked and deleted; the worker is still taking jobs.
    wait_queue_empty(&redis, &p).await;
    xadd(
        &redis,
        &p,
        &[("stream_ref", "paced:2:1"), ("job_id", "after")],
    );
    assert_eq!(wait_end(&redis, &p, "after").await["status"], "completed");
    assert_eq!(w.metrics.jobs_rejected.get(), cases.len() as u64 + 2);
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failures_and_panics_end_failed_and_the_worker_goes_on() {
    let redis = TestRedis::start();
    let p = unique_prefix();
    let w = InProcessWorker::start(&redis, &p, "w1", &[]);
    xadd(
        &redis,
        &p,
        &[("stream_ref", "fail:the camera said no"), ("job_id", "f")],
    );
    xadd(&redis, &p, &[("stream_ref", "panic"), ("job_id", "p")]);
    let end = wait_end(&redis, &p, "f").await;
    assert_eq!(end["status"], "failed");
    assert_eq!(end["error"], "the camera said no");
    let end = wait_end(&redis, &p, "p").await;
    assert_eq!(end["status"], "failed");
    assert!(
        end["error"].contains("panicked: the test body panics"),
        "{}",
        end["error"]
    );
    xadd(&redis, &p, &[("stream_ref", "paced:2:1"), ("job_id", "ok")]);
    assert_eq!(wait_end(&redis, &p, "ok").await["status"], "completed");
    assert_eq!(w.metrics.jobs_failed.get(), 2);
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_duplicate_job_id_is_not_run_twice() {
    let redis = TestRedis::start();
    let p = unique_prefix();
    let w = InProcessWorker::start(&redis, &p, "w1", &[]);
    let first = xadd(
        &redis,
        &p,
        &[("stream_ref", "paced:3:30"), ("job_id", "dup")],
    );
    xadd(
        &redis,
        &p,
        &[("stream_ref", "paced:3:30"), ("job_id", "dup")],
    );
    let end = wait_end(&redis, &p, "dup").await;
    assert_eq!(end["status"], "completed");
    wait_queue_empty(&redis, &p).await;
    assert_eq!(frames_of(&redis, &p, "dup"), vec![0, 1, 2]);
    assert_eq!(redis.hget(&keys(&p).job("dup"), "entry_id").unwrap(), first);
    let rejected = redis.xrange(&keys(&p).events()).into_iter().any(|(_, f)| {
        f.get("to").map(String::as_str) == Some("rejected")
            && f.get("error")
                .is_some_and(|e| e.contains("duplicate job_id"))
    });
    assert!(rejected, "the duplicate is recorded in the events stream");
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_that_died_between_end_entry_and_ack_leaves_a_job_the_next_claim_only_acks() {
    let redis = TestRedis::start();
    let p = unique_prefix();
    let k = keys(&p);
    let group = WorkersGroup::of(&redis, &k);
    load_functions(&redis, &p).await;
    group.create();
    let id = xadd(
        &redis,
        &p,
        &[("stream_ref", "paced:3:10"), ("job_id", "half-done")],
    );
    // A worker claims the job, writes its end entry in the job's slot, and dies before
    // the queue's slot hears of it.
    group.read("ghost", 1);
    let claim: Vec<Vec<String>> = redis.cmd(&[
        "FCALL",
        "fr_job_claim",
        "1",
        k.tag(),
        "ghost",
        "3",
        &id,
        "half-done",
        "0",
    ]);
    assert_eq!(claim, vec![vec!["run", "1"]]);
    let end: Vec<String> = redis.cmd(&[
        "FCALL",
        "fr_job_end",
        "1",
        &k.job_tag("half-done"),
        "completed",
        "",
        "100",
        "600",
    ]);
    assert_eq!(end, vec!["completed", "0"]);
    assert_eq!(status(&redis, &p, "half-done").as_deref(), Some("running"));

    let w = InProcessWorker::start(&redis, &p, "w1", &[("JOB_LEASE_MS", "1000")]);
    wait_queue_empty(&redis, &p).await;
    assert_eq!(
        status(&redis, &p, "half-done").as_deref(),
        Some("completed")
    );
    let rs = results(&redis, &p, "half-done");
    assert_eq!(rs.len(), 1, "the end entry alone, written once: {rs:?}");
    assert_eq!(rs[0]["status"], "completed");
    assert!(
        frames_of(&redis, &p, "half-done").is_empty(),
        "the job is not run again"
    );
    // Repeating the end changes nothing.
    let again: Vec<String> = redis.cmd(&[
        "FCALL",
        "fr_job_end",
        "1",
        &k.job_tag("half-done"),
        "failed",
        "late",
        "100",
        "600",
    ]);
    assert_eq!(again, vec!["completed", "0"]);
    assert_eq!(results(&redis, &p, "half-done").len(), 1);
    w.stop().await;
}

/// Events of one job that moved it to `to`.
fn transitions_to(redis: &TestRedis, prefix: &str, job: &str, to: &str) -> usize {
    redis
        .xrange(&keys(prefix).events())
        .into_iter()
        .filter(|(_, f)| {
            f.get("job_id").map(String::as_str) == Some(job)
                && f.get("to").map(String::as_str) == Some(to)
        })
        .count()
}

/// Reads the next entry as consumer `worker` and claims it; returns its entry id.
async fn read_and_claim(redis: &TestRedis, store: &Store, worker: &str, job: &str) -> String {
    let jobs = store.keys().jobs();
    WorkersGroup::of(redis, store.keys()).read(worker, 1);
    let id = redis.xrange(&jobs).into_iter().last().unwrap().0;
    let entry = functions::ClaimEntry {
        entry_id: &id,
        job_id: job,
        fields: &[],
    };
    let verdict = functions::claim(store, worker, 3, &[entry]).await.unwrap();
    assert_eq!(verdict, vec![ClaimVerdict::Run { attempt: 1 }]);
    id
}

/// `fr_job_finish` for one completed job.
async fn finish_one(store: &Store, entry_id: &str, worker: &str, job: &str) -> Ownership {
    let end = functions::FinishEntry {
        entry_id: entry_id.to_string(),
        job_id: job.to_string(),
        status: JobStatus::Completed,
        error: String::new(),
    };
    functions::finish(store, worker, &[end]).await.unwrap()[0]
}

/// An entry the server cannot claim (its job key holds a string) fails the read's one claim
/// call; the worker then claims the read's entries one by one, so only that one is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_entry_that_cannot_be_claimed_holds_back_no_other_entry_of_its_read() {
    let redis = TestRedis::start();
    let p = unique_prefix();
    let k = keys(&p);
    let _: () = redis.cmd(&["SET", &k.job("broken"), "not a hash"]);
    for job in ["before", "broken", "after"] {
        xadd(&redis, &p, &[("stream_ref", "paced:2:10"), ("job_id", job)]);
    }
    let w = InProcessWorker::start(&redis, &p, "w1", &[]);
    for job in ["before", "after"] {
        assert_eq!(wait_end(&redis, &p, job).await["status"], "completed");
    }
    let pending = WorkersGroup::of(&redis, &k).pending();
    assert_eq!(pending.len(), 1, "{pending:?}");
    let _: String = redis.cmd(&["GET", &k.job("broken")]);
    w.stop().await;
}

/// One `fr_job_claim` call decides a whole read in order (of two entries naming one job_id
/// the first runs), and one `fr_job_heartbeat` or `fr_job_finish` call renews or ends
/// several jobs, answering for each.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_call_claims_a_read_and_one_call_finishes_several_jobs() {
    let redis = TestRedis::start();
    let p = unique_prefix();
    let k = keys(&p);
    let group = WorkersGroup::of(&redis, &k);
    let store = queue_store(&redis, &p).await;
    let a = xadd(&redis, &p, &[("stream_ref", "paced:3:10"), ("job_id", "a")]);
    let b = xadd(&redis, &p, &[("stream_ref", "paced:3:10"), ("job_id", "b")]);
    let again = xadd(&redis, &p, &[("stream_ref", "paced:3:10"), ("job_id", "a")]);
    group.read("w1", 3);
    let fields = [("stream_ref", "paced:3:10".to_string())];
    let entry = |entry_id, job_id| functions::ClaimEntry {
        entry_id,
        job_id,
        fields: &fields,
    };
    let batch = [entry(&a, "a"), entry(&b, "b"), entry(&again, "a")];
    let verdicts = functions::claim(&store, "w1", 3, &batch).await.unwrap();
    assert_eq!(
        verdicts,
        vec![
            ClaimVerdict::Run { attempt: 1 },
            ClaimVerdict::Run { attempt: 1 },
            ClaimVerdict::Duplicate
        ]
    );
    assert_eq!(redis.hgetall(&k.job("a"))["entry_id"], a);
    assert_eq!(redis.hgetall(&k.job("b"))["stream_ref"], "paced:3:10");

    // b is taken over by another worker before w1 ends both.
    group.take_over("w2", &b);
    // One heartbeat renews a and gives b up; an entry that is nobody's now (the duplicate,
    // dropped) is lost too.
    let call_in = functions::CallIn {
        quiet_ms: 60_000,
        lease_ms: 30_000,
    };
    let leases = functions::heartbeat(
        &store,
        "w1",
        call_in,
        &[(&a, "a"), (&b, "b"), (&again, "a")],
    )
    .await
    .unwrap();
    assert_eq!(leases, vec![Lease::Renewed, Lease::Lost, Lease::Lost]);
    let end = |entry_id: &str, job_id: &str| functions::FinishEntry {
        entry_id: entry_id.to_string(),
        job_id: job_id.to_string(),
        status: JobStatus::Completed,
        error: String::new(),
    };
    let answers = functions::finish(&store, "w1", &[end(&a, "a"), end(&b, "b")])
        .await
        .unwrap();
    assert_eq!(answers, vec![Ownership::Done, Ownership::Lost]);
    assert_eq!(status(&redis, &p, "a").as_deref(), Some("completed"));
    assert_eq!(status(&redis, &p, "b").as_deref(), Some("running"));
    let pending = group.pending();
    assert_eq!(pending.len(), 1, "{pending:?}");
    assert_eq!(
        (pending[0].0.as_str(), pending[0].1.as_str()),
        (b.as_str(), "w2")
    );
    // A call whose arguments break off after a good entry writes nothing, not even that.
    let fresh = xadd(&redis, &p, &[("stream_ref", "paced:3:10"), ("job_id", "c")]);
    group.read("w1", 1);
    let mut con = redis.client().get_connection().unwrap();
    let bad: redis::RedisResult<redis::Value> = redis::cmd("FCALL")
        .arg("fr_job_claim")
        .arg(1)
        .arg(k.tag())
        .arg(&[
            "w1",
            "3",
            fresh.as_str(),
            "c",
            "0",
            "orphan",
            "d",
            "3",
            "stream_ref",
        ])
        .query(&mut con);
    assert_eq!(bad.unwrap_err().code(), Some("ERR"));
    assert!(redis.hgetall(&k.job("c")).is_empty());
}

/// Each step of a job's end, and the hand-back, called twice, as a retry after a lost reply
/// calls it: the second call answers as the first did and writes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_step_of_a_jobs_end_is_safe_to_repeat() {
    let redis = TestRedis::start();
    let p = unique_prefix();
    let k = keys(&p);
    let store = queue_store(&redis, &p).await;
    let retention = Retention {
        results_maxlen: 100,
        ttl_s: 600,
        alerts_maxlen: 100,
    };

    // The end entry, then the finish, each twice.
    xadd(
        &redis,
        &p,
        &[("stream_ref", "paced:3:10"), ("job_id", "twice")],
    );
    let id = read_and_claim(&redis, &store, "w1", "twice").await;
    for _ in 0..2 {
        let end = functions::end(&store, "twice", JobStatus::Completed, "", retention)
            .await
            .unwrap();
        assert_eq!(end.status, JobStatus::Completed);
    }
    let first = finish_one(&store, &id, "w1", "twice").await;
    let hash_after_first = redis.hgetall(&k.job("twice"));
    let again = finish_one(&store, &id, "w1", "twice").await;
    assert_eq!(first, Ownership::Done);
    assert_eq!(
        again,
        Ownership::Done,
        "a repeated finish is not a lost lease"
    );
    assert_eq!(redis.hgetall(&k.job("twice")), hash_after_first);
    assert_eq!(hash_after_first["status"], "completed");
    assert_eq!(hash_after_first["worker"], "w1");
    let ends: Vec<_> = results(&redis, &p, "twice")
        .into_iter()
        .filter(|f| f["kind"] == "end")
        .collect();
    assert_eq!(ends.len(), 1, "one end entry: {ends:?}");
    assert_eq!(transitions_to(&redis, &p, "twice", "completed"), 1);
    let group = WorkersGroup::of(&redis, &k);
    let pending = group.pending();
    assert!(pending.is_empty(), "{pending:?}");
    // Another worker's finish of the same entry is not taken for its own.
    assert_eq!(
        finish_one(&store, &id, "w2", "twice").await,
        Ownership::Lost
    );
    // The ack, twice: the second finds nothing left to do.
    for _ in 0..2 {
        assert_eq!(
            functions::ack(&store, &id, "w1").await.unwrap(),
            Ownership::Done
        );
    }

    // A finish by a worker that lost the entry to another is lost, and changes nothing.
    xadd(
        &redis,
        &p,
        &[("stream_ref", "paced:3:10"), ("job_id", "taken")],
    );
    let id = read_and_claim(&redis, &store, "w1", "taken").await;
    group.take_over("w2", &id);
    assert_eq!(
        finish_one(&store, &id, "w1", "taken").await,
        Ownership::Lost
    );
    assert_eq!(status(&redis, &p, "taken").as_deref(), Some("running"));

    // The hand-back, twice: one hand-off counted, one event.
    xadd(
        &redis,
        &p,
        &[("stream_ref", "paced:3:10"), ("job_id", "back")],
    );
    let id = read_and_claim(&redis, &store, "w1", "back").await;
    for _ in 0..2 {
        assert_eq!(
            functions::handback(&store, &id, "w1", "back", 86_400_000)
                .await
                .unwrap(),
            Ownership::Done
        );
    }
    let hash = redis.hgetall(&k.job("back"));
    assert_eq!(hash["handoffs"], "1");
    assert_eq!(hash["status"], "queued");
    assert_eq!(transitions_to(&redis, &p, "back", "queued"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_entry_delivered_too_often_is_dead_lettered() {
    let redis = TestRedis::start();
    let p = unique_prefix();
    let group = WorkersGroup::of(&redis, &keys(&p));
    group.create();
    let id = xadd(
        &redis,
        &p,
        &[("stream_ref", "paced:3:10"), ("job_id", "poison")],
    );
    // A consumer that took the entry three times and died each time.
    group.read("ghost", 1);
    group.deliver_again("ghost", &id);
    group.deliver_again("ghost", &id);

    let w = InProcessWorker::start(
        &redis,
        &p,
        "w1",
        &[("JOB_LEASE_MS", "1000"), ("MAX_ATTEMPTS", "3")],
    );
    let end = wait_end(&redis, &p, "poison").await;
    assert_eq!(end["status"], "dead");
    assert!(
        end["error"].contains("delivered 3 times"),
        "{}",
        end["error"]
    );
    let dead = redis.xrange(&keys(&p).jobs_dead());
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].1["job_id"], "poison");
    assert_eq!(dead[0].1["field:stream_ref"], "paced:3:10");
    assert!(dead[0].1["error"].contains("MAX_ATTEMPTS=3"));
    assert_eq!(status(&redis, &p, "poison").as_deref(), Some("dead"));
    assert!(
        frames_of(&redis, &p, "poison").is_empty(),
        "a dead job is not run"
    );
    wait_queue_empty(&redis, &p).await;
    assert_eq!(w.metrics.jobs_dead_lettered.get(), 1);
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_that_lost_its_lease_stops_instead_of_stealing_it_back() {
    let redis = TestRedis::start();
    let p = unique_prefix();
    let group = WorkersGroup::of(&redis, &keys(&p));
    // A short lease: the worker checks its entries once a lease.
    let w = InProcessWorker::start(&redis, &p, "w1", &[("JOB_LEASE_MS", "5000")]);
    let id = xadd(
        &redis,
        &p,
        &[("stream_ref", "paced:1000:50"), ("job_id", "taken")],
    );
    eventually(WAIT, "running", || {
        frames_of(&redis, &p, "taken").len() >= 2
    })
    .await;
    // Someone else takes the entry over (as a reclaim pass would after a stall), and
    // holds it as a live worker does: registered, the entry in its set. An entry of an
    // unregistered owner would be swept back after a lease, racing this worker's audit
    // (once a lease too).
    group.take_over("other", &id);
    let k = keys(&p);
    let _: i64 = redis.cmd(&["ZADD", &k.workers_alive(), "9999999999999", "other"]);
    let _: i64 = redis.cmd(&["SADD", &k.owned("other"), &id]);
    eventually(WAIT, "the worker lets go", || w.state.running_jobs() == 0).await;
    let (owner, _) = group.owner_of(&id);
    assert_eq!(owner, "other", "the lease stays with its new owner");
    assert!(
        end_entry(&redis, &p, "taken").is_none(),
        "the old owner does not end the job"
    );
    assert_eq!(w.metrics.leases_lost.get(), 1);
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stopping_worker_hands_its_job_to_another_at_once() {
    let redis = TestRedis::start();
    let p = unique_prefix();
    // A long lease: the hand-off must not wait for it.
    let lease = [("JOB_LEASE_MS", "60000")];
    let a = InProcessWorker::start(&redis, &p, "a", &lease);
    xadd(
        &redis,
        &p,
        &[("stream_ref", "paced:30:50"), ("job_id", "moving")],
    );
    eventually(WAIT, "running on a", || {
        frames_of(&redis, &p, "moving").len() >= 3
    })
    .await;
    let b = InProcessWorker::start(&redis, &p, "b", &lease);
    a.stop().await;
    let end = wait_end(&redis, &p, "moving").await;
    assert_eq!(end["status"], "completed");
    let h = redis.hgetall(&keys(&p).job("moving"));
    assert_eq!(h["worker"], "b");
    assert_eq!(h["handoffs"], "1");
    assert_eq!(h["attempts"], "1", "a hand-back is not a failed attempt");
    assert_eq!(
        frames_of(&redis, &p, "moving"),
        (0..30).collect::<Vec<u64>>(),
        "resumed where it was"
    );
    assert_eq!(b.metrics.jobs_reclaimed.get(), 1);
    // The hand-back's wake-up went to the worker waiting for one.
    eventually(WAIT, "b popped the orphan token", || {
        redis.cmd::<usize>(&["LLEN", &keys(&p).orphans_wake()]) == 0
    })
    .await;
    b.stop().await;
}

/// A stopping worker hands its jobs back at once, not when its claim loop's blocked
/// `XREADGROUP ... BLOCK` (up to a second) returns: the rolling restarts of scripts/chaos
/// measured hand-offs of up to 1.4 s before. Shutdown comes at a different point of the
/// block each round, so a worker that waits for the read fails at least one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_hands_jobs_back_without_waiting_for_the_blocked_claim_read() {
    let redis = TestRedis::start();
    let p = unique_prefix();
    let lease = [("JOB_LEASE_MS", "60000")];
    for round in 0..4u64 {
        let job = format!("quick-{round}");
        let w = InProcessWorker::start(&redis, &p, &format!("w{round}"), &lease);
        xadd(
            &redis,
            &p,
            &[("stream_ref", "paced:100000:50"), ("job_id", &job)],
        );
        eventually(WAIT, "running", || frames_of(&redis, &p, &job).len() >= 2).await;
        // Free slots: the claim loop sits in its blocked read.
        tokio::time::sleep(Duration::from_millis(100 + 230 * round)).await;
        let asked = std::time::Instant::now();
        w.shutdown.cancel();
        eventually(WAIT, "handed back", || {
            status(&redis, &p, &job).as_deref() == Some("queued")
        })
        .await;
        let took = asked.elapsed();
        assert!(
            took < Duration::from_millis(400),
            "round {round}: handed back {took:?} after shutdown"
        );
        tokio::time::timeout(Duration::from_secs(15), w.handle)
            .await
            .expect("the worker stops")
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redis_restart_under_a_running_worker_loses_nothing() {
    let mut redis = TestRedis::start();
    let p = unique_prefix();
    let w = InProcessWorker::start(&redis, &p, "w1", &[]);
    xadd(
        &redis,
        &p,
        &[("stream_ref", "paced:40:50"), ("job_id", "survivor")],
    );
    eventually(WAIT, "running", || {
        frames_of(&redis, &p, "survivor").len() >= 5
    })
    .await;
    redis.restart();
    let end = wait_end(&redis, &p, "survivor").await;
    assert_eq!(end["status"], "completed");
    assert_eq!(
        frames_of(&redis, &p, "survivor"),
        (0..40).collect::<Vec<u64>>()
    );
    assert!(w.metrics.redis_errors.get() >= 1, "the outage was seen");
    // And it still takes new work.
    xadd(
        &redis,
        &p,
        &[("stream_ref", "paced:2:1"), ("job_id", "after")],
    );
    assert_eq!(wait_end(&redis, &p, "after").await["status"], "completed");
    w.stop().await;
}

/// A Redis outage longer than the lease, paused and then down, is the server's fault, not
/// the workers': the other worker reclaims nothing, and the running job keeps its worker and
/// its one attempt (before, each such outage counted a delivery towards MAX_ATTEMPTS).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_outage_longer_than_the_lease_moves_no_job_and_counts_no_attempt() {
    let mut redis = TestRedis::start();
    let p = unique_prefix();
    let lease = [("JOB_LEASE_MS", "1000")];
    let a = InProcessWorker::start(&redis, &p, "a", &lease);
    xadd(
        &redis,
        &p,
        &[("stream_ref", "paced:100:50"), ("job_id", "steady")],
    );
    eventually(WAIT, "the job running on a", || {
        frames_of(&redis, &p, "steady").len() >= 3
    })
    .await;
    let b = InProcessWorker::start(&redis, &p, "b", &lease);
    tokio::time::sleep(Duration::from_millis(600)).await;

    redis.pause(Duration::from_millis(2500));
    let before = frames_of(&redis, &p, "steady").len();
    eventually(WAIT, "the job going on after the pause", || {
        frames_of(&redis, &p, "steady").len() >= before + 5
    })
    .await;
    redis.down_for(Duration::from_millis(2500));

    let end = wait_end(&redis, &p, "steady").await;
    assert_eq!(end["status"], "completed");
    let job = redis.hgetall(&keys(&p).job("steady"));
    assert_eq!(
        (job["worker"].as_str(), job["attempts"].as_str()),
        ("a", "1")
    );
    assert_eq!(b.metrics.jobs_reclaimed.get(), 0, "b took nothing over");
    assert_eq!(a.metrics.leases_lost.get(), 0, "a lost no lease");
    let gap: u64 = redis
        .hget(&keys(&p).fleet(), "last_gap_ms")
        .unwrap()
        .parse()
        .unwrap();
    assert!(gap >= 2000, "the outage was seen as one: {gap} ms");
    a.stop().await;
    b.stop().await;
}

/// `{fr}:events` stays near `EVENTS_MAXLEN` however many jobs come through: 300 submitted
/// (600 events) with a cap of 50 leave at most the cap and one 100-entry node, the newest.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_events_stream_stays_near_events_maxlen() {
    let redis = TestRedis::start();
    let p = unique_prefix();
    load_functions(&redis, &p).await;
    let k = keys(&p);
    redis.cli(&["HSET", &k.settings(), "events_maxlen", "50"]);
    let mut con = redis.client().get_connection().unwrap();
    let mut pipe = redis::pipe();
    for i in 0..300 {
        pipe.cmd("FCALL")
            .arg("fr_submit")
            .arg(1)
            .arg(k.tag())
            .arg(format!("capped-{i}"))
            .arg("stream_ref")
            .arg("paced:1:1")
            .ignore();
    }
    pipe.query::<()>(&mut con).unwrap();
    let len: usize = redis.cmd(&["XLEN", &k.events()]);
    assert!((50..=150).contains(&len), "{len} events kept");
    let newest = redis.cli(&["XREVRANGE", &k.events(), "+", "-", "COUNT", "1"]);
    assert!(newest.contains("capped-299"), "{newest}");
}

/// `fr_submit` refuses at once a job_id the worker would refuse (before, `lobby 1` left a
/// `queued` hash with no TTL for ever, and an entry every worker then failed).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fr_submit_refuses_a_job_id_the_worker_would_refuse() {
    let redis = TestRedis::start();
    let p = unique_prefix();
    load_functions(&redis, &p).await;
    let k = keys(&p);
    let long = "x".repeat(129);
    for bad in ["lobby 1", "a{b}", long.as_str(), "caf\u{e9}"] {
        let out = redis.cli(&["FCALL", "fr_submit", "1", k.tag(), bad, "stream_ref", "x"]);
        assert!(out.contains("job_id must be"), "{bad}: {out}");
        assert!(redis.hgetall(&k.job(bad)).is_empty(), "{bad}");
    }
    let len: usize = redis.cmd(&["XLEN", &k.jobs()]);
    assert_eq!(len, 0, "nothing queued");
    let ok = redis.cli(&[
        "FCALL",
        "fr_submit",
        "1",
        k.tag(),
        "lobby-1.a:b_c",
        "stream_ref",
        "x",
    ]);
    assert!(!ok.contains("ERR"), "{ok}");
}

/// `fr_index_prune` reaches every member of `{fr}:jobs:index` in turn: with more long-lived
/// jobs than one call looks at first, an expired job's member behind them still goes
/// (before, only the oldest `limit` members were ever looked at).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_index_prune_reaches_members_behind_long_lived_jobs() {
    let redis = TestRedis::start();
    let p = unique_prefix();
    load_functions(&redis, &p).await;
    let k = keys(&p);
    let store = Store::new(&redis.url(), &p, 2).unwrap();
    let mut con = redis.client().get_connection().unwrap();
    let mut pipe = redis::pipe();
    for i in 0..30 {
        let id = format!("camera-{i}");
        pipe.cmd("ZADD")
            .arg(k.jobs_index())
            .arg(i)
            .arg(&id)
            .ignore();
        pipe.cmd("HSET")
            .arg(k.job(&id))
            .arg("status")
            .arg("running")
            .ignore();
    }
    // Newer than all of them, and its hash gone (expired).
    pipe.cmd("ZADD")
        .arg(k.jobs_index())
        .arg(100)
        .arg("expired")
        .ignore();
    pipe.query::<()>(&mut con).unwrap();
    let mut removed = 0;
    for _ in 0..4 {
        removed += functions::prune_index(&store, 10).await.unwrap();
    }
    assert_eq!(removed, 1);
    let left: Option<String> = redis.cmd(&["ZSCORE", &k.jobs_index(), "expired"]);
    assert_eq!(left, None);
    let card: usize = redis.cmd(&["ZCARD", &k.jobs_index()]);
    assert_eq!(card, 30, "the live jobs stay");
}

/// `{fr}:jobs:dead` is capped (`dead_maxlen` in `{fr}:settings`, 10,000 by default): 300
/// dead letters with a cap of 50 leave at most the cap and one 100-entry node, the newest.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_dead_letter_stream_is_capped() {
    let redis = TestRedis::start();
    let p = unique_prefix();
    let k = keys(&p);
    let store = queue_store(&redis, &p).await;
    redis.cli(&["HSET", &k.settings(), "dead_maxlen", "50"]);
    let mut ids = Vec::new();
    for i in 0..300 {
        let job = format!("doomed-{i}");
        ids.push((
            xadd(&redis, &p, &[("stream_ref", "x"), ("job_id", &job)]),
            job,
        ));
    }
    WorkersGroup::of(&redis, &k).read("w", 300);
    let batch: Vec<functions::ClaimEntry<'_>> = ids
        .iter()
        .map(|(entry_id, job_id)| functions::ClaimEntry {
            entry_id,
            job_id,
            fields: &[],
        })
        .collect();
    // No delivery is allowed: each one is dead at its first claim.
    let verdicts = functions::claim(&store, "w", 0, &batch).await.unwrap();
    assert!(verdicts.iter().all(|v| matches!(
        v,
        ClaimVerdict::Final {
            status: JobStatus::Dead,
            ..
        }
    )));
    let len: usize = redis.cmd(&["XLEN", &k.jobs_dead()]);
    assert!((50..=150).contains(&len), "{len} dead letters kept");
    let newest = redis.cli(&["XREVRANGE", &k.jobs_dead(), "+", "-", "COUNT", "1"]);
    assert!(newest.contains("doomed-299"), "{newest}");
}

/// Consumers that own no entry, hold no lease and have been idle past `consumer_idle_ms`
/// are deleted by a reclaim pass (at most once a minute for the fleet): a crash-looping
/// worker no longer adds consumers without limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_consumers_that_own_nothing_are_deleted() {
    let redis = TestRedis::start();
    let p = unique_prefix();
    let k = keys(&p);
    let store = queue_store(&redis, &p).await;
    redis.cli(&["HSET", &k.settings(), "consumer_idle_ms", "100"]);
    xadd(&redis, &p, &[("stream_ref", "x"), ("job_id", "held")]);
    WorkersGroup::of(&redis, &k).read("holder", 1);
    for name in ["crashed-1", "crashed-2", "live"] {
        let _: i64 = redis.cmd(&["XGROUP", "CREATECONSUMER", &k.jobs(), "workers", name]);
    }
    let live = LIVE;
    functions::tick(&store, "live", live, SWEEPER_HOLD_MS, &[])
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    functions::reclaim(&store, "b", live, 1).await.unwrap();
    let consumers: Vec<Vec<redis::Value>> =
        redis.cmd(&["XINFO", "CONSUMERS", &k.jobs(), "workers"]);
    let mut names: Vec<String> = consumers
        .into_iter()
        .map(|c| redis::from_redis_value(c[1].clone()).unwrap())
        .collect();
    names.sort();
    assert_eq!(names, vec!["holder".to_string(), "live".to_string()]);
}

/// `{fr}:prompt:history` keeps the newest `PROMPT_HISTORY_MAX` versions (100 unless a worker
/// published another value): 1,000 versions set leave 100, newest first; before, every
/// version of up to 8 KiB stayed for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_prompt_history_keeps_the_newest_versions_only() {
    let redis = TestRedis::start();
    let p = unique_prefix();
    load_functions(&redis, &p).await;
    let k = keys(&p);
    let mut con = redis.client().get_connection().unwrap();
    let set_prompts = |con: &mut redis::Connection, n: usize| {
        let mut pipe = redis::pipe();
        for i in 0..n {
            pipe.cmd("FCALL")
                .arg("fr_prompt_set")
                .arg(1)
                .arg(k.tag())
                .arg(format!("prompt {i}"))
                .ignore();
        }
        pipe.query::<()>(con).unwrap();
    };
    set_prompts(&mut con, 1000);
    let len: usize = redis.cmd(&["LLEN", &k.prompt_history()]);
    assert_eq!(len, 100);
    let newest: String = redis.cmd(&["LINDEX", &k.prompt_history(), "0"]);
    assert!(newest.contains("\"version\":1000"), "{newest}");
    redis.cli(&["HSET", &k.settings(), "prompt_history_max", "5"]);
    set_prompts(&mut con, 1);
    let len: usize = redis.cmd(&["LLEN", &k.prompt_history()]);
    assert_eq!(len, 5, "the published setting wins");
}

/// `fr_cancel` of a job queued with a plain `XADD` and not read yet looks only at the
/// entries no worker has read, after the group's last-delivered id, and at most 500 of
/// them: a job behind 100,000 entries already read is found (before, the scan from the
/// stream's start stopped at 100,000 entries and answered `NOJOB`, after 0.3 s of blocked
/// Redis), and an unknown id costs a bounded look whatever the backlog.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fr_cancel_finds_a_queued_job_behind_a_long_read_backlog() {
    let redis = TestRedis::start();
    let p = unique_prefix();
    let k = keys(&p);
    queue_store(&redis, &p).await;
    let mut con = redis.client().get_connection().unwrap();
    let mut pipe = redis::pipe();
    for i in 0..100_000 {
        pipe.cmd("XADD")
            .arg(k.jobs())
            .arg("*")
            .arg("stream_ref")
            .arg("x")
            .arg("job_id")
            .arg(format!("read-{i}"))
            .ignore();
    }
    pipe.query::<()>(&mut con).unwrap();
    // Every one of them delivered already, as a busy fleet leaves them.
    let _: String = redis.cmd(&["XGROUP", "SETID", &k.jobs(), "workers", "$"]);
    xadd(&redis, &p, &[("stream_ref", "x"), ("job_id", "behind")]);
    let r: String = redis.cmd(&["FCALL", "fr_cancel", "1", k.tag(), "behind"]);
    assert_eq!(r, "cancelled");
    assert_eq!(status(&redis, &p, "behind").as_deref(), Some("cancelled"));
    let out = redis.cli(&["FCALL", "fr_cancel", "1", k.tag(), "nobody"]);
    assert!(out.contains("unknown job nobody"), "{out}");
}

/// The fleet's clock: a worker's own idle entry is never reclaimed by itself; after a
/// silence of the whole fleet, an entry that lapsed in the silence waits one lease while a
/// handed-back one is taken at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reclaiming_waits_a_lease_after_the_fleet_was_silent() {
    let redis = TestRedis::start();
    let p = unique_prefix();
    let store = queue_store(&redis, &p).await;
    let lapsed = xadd(
        &redis,
        &p,
        &[("stream_ref", "paced:1:1"), ("job_id", "lapsed")],
    );
    let handed = xadd(
        &redis,
        &p,
        &[("stream_ref", "paced:1:1"), ("job_id", "handed")],
    );
    let group = WorkersGroup::of(&redis, &keys(&p));
    group.read("a", 2);
    group.hand_back("a", &handed);
    let call_in = functions::CallIn {
        quiet_ms: 300,
        lease_ms: 1000,
    };
    let claimed = |reply: redis::Value| {
        free_roam::queue::entries::parse_entry_list(&reply)
            .into_iter()
            .map(|e| e.id)
            .collect::<Vec<_>>()
    };
    // The first call ever finds no clock to compare with; its own entries are never taken.
    let own = functions::reclaim(&store, "a", call_in, 5).await.unwrap();
    assert!(claimed(own).is_empty(), "its own entries are never taken");
    // Silence past the lease: `lapsed` is idle past it now, but so would a live owner's be.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let first = functions::reclaim(&store, "b", call_in, 5).await.unwrap();
    assert_eq!(
        claimed(first),
        vec![handed],
        "only the handed-back entry, at once"
    );
    let reply = loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let reply = functions::reclaim(&store, "b", call_in, 5).await.unwrap();
        if !claimed(reply.clone()).is_empty() {
            break reply;
        }
    };
    assert_eq!(claimed(reply), vec![lapsed.clone()]);
    let held_ms: i64 = redis
        .hget(&keys(&p).fleet(), "reclaim_after_ms")
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        free_roam::store::now_ms() >= held_ms,
        "taken only after the hold"
    );
    // b's claim counted a delivery: the one the attempt count reads.
    assert_eq!(
        group.owner_of(&lapsed),
        ("b".to_string(), 2),
        "owner and deliveries"
    );
}

/// The ids of the entries a reclaim pass took.
fn taken_ids(reply: &redis::Value) -> Vec<String> {
    free_roam::queue::entries::parse_entry_list(reply)
        .into_iter()
        .map(|e| e.id)
        .collect()
}

/// Leases are per worker: a worker whose tick is fresh keeps its entries however long they
/// sit idle in the pending list; once its tick is a lease overdue, a reclaim pass declares
/// it dead and its entries are taken, each delivery counted. Coming back, it registers
/// afresh and its audit finds the job lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_live_workers_entries_are_never_taken_and_a_dead_ones_are_after_the_lease() {
    let redis = TestRedis::start();
    let p = unique_prefix();
    let k = keys(&p);
    let store = queue_store(&redis, &p).await;
    let group = WorkersGroup::of(&redis, &k);
    let call_in = functions::CallIn {
        quiet_ms: 60_000,
        lease_ms: 1000,
    };
    xadd(
        &redis,
        &p,
        &[("stream_ref", "paced:1:1"), ("job_id", "held")],
    );
    let entry = read_and_claim(&redis, &store, "a", "held").await;
    let registry = [("capacity", "1".to_string())];
    let first = functions::tick(&store, "a", call_in, SWEEPER_HOLD_MS, &registry)
        .await
        .unwrap();
    assert!(first.registered && first.cancelled.is_empty());
    let hash = redis.hgetall(&k.worker("a"));
    assert_eq!(hash["capacity"], "1", "the tick writes the registry hash");
    assert!(hash.contains_key("updated_ms"));
    // Idle far past any lease, and no per-entry renewal: only a's tick protects it.
    group.claim("a", &entry, &["IDLE", "86400000", "JUSTID"]);
    let swept_before = redis.hget(&k.fleet(), "swept_ms");
    for _ in 0..4 {
        let tick = functions::tick(&store, "a", call_in, SWEEPER_HOLD_MS, &[])
            .await
            .unwrap();
        assert!(!tick.registered, "still registered");
        let reply = functions::reclaim(&store, "b", call_in, 5).await.unwrap();
        assert!(taken_ids(&reply).is_empty(), "a live worker's entry taken");
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    assert_ne!(
        redis.hget(&k.fleet(), "swept_ms"),
        swept_before,
        "the sweep of the pending list ran meanwhile"
    );
    assert_eq!(group.owner_of(&entry), ("a".to_string(), 1));

    // a stops ticking: a lease later its entry goes to the next pass.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let reply = functions::reclaim(&store, "b", call_in, 5).await.unwrap();
    assert_eq!(taken_ids(&reply), vec![entry.clone()]);
    assert_eq!(group.owner_of(&entry), ("b".to_string(), 2));
    let alive: Option<String> = redis.cmd(&["ZSCORE", &k.workers_alive(), "a"]);
    assert_eq!(alive, None, "a was declared dead");
    let held: bool = redis.cmd(&["SISMEMBER", &k.owned("b"), &entry]);
    assert!(held, "the entry is b's now");
    let left: bool = redis.cmd(&["EXISTS", &k.owned("a")]);
    assert!(!left, "a's set went with it");

    let tick = functions::tick(&store, "a", call_in, SWEEPER_HOLD_MS, &[])
        .await
        .unwrap();
    assert!(tick.registered, "a comes back unregistered");
    let audit = functions::heartbeat(&store, "a", call_in, &[(&entry, "held")])
        .await
        .unwrap();
    assert_eq!(
        audit,
        vec![Lease::Lost],
        "and stops the job, not steals it back"
    );
}

/// A worker's tick says whether a reclaim pass would find anything (an overdue worker, an
/// orphan, the fleet's sweep or consumer prune due), so that idle passes are skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tick_says_whether_a_reclaim_pass_is_due() {
    let redis = TestRedis::start();
    let p = unique_prefix();
    let store = queue_store(&redis, &p).await;
    let live = LIVE;
    let tick = |worker: &'static str, call_in, fields: Vec<(&'static str, String)>| {
        let store = store.clone();
        async move {
            functions::tick(&store, worker, call_in, SWEEPER_HOLD_MS, &fields)
                .await
                .unwrap()
        }
    };
    let first = tick("a", live, vec![("capacity", "2".into())]).await;
    assert!(first.reclaim_due, "no sweep has run yet");
    assert!(first.hash_created);
    functions::reclaim(&store, "a", live, 2).await.unwrap();
    let quiet = tick("a", live, vec![]).await;
    assert!(
        !quiet.reclaim_due,
        "the sweep and the prune just ran, nothing else is there"
    );
    assert!(!quiet.hash_created);

    // A hand-back makes an orphan: the next tick of any worker says so.
    xadd(
        &redis,
        &p,
        &[("stream_ref", "paced:1:1"), ("job_id", "given")],
    );
    let entry = read_and_claim(&redis, &store, "b", "given").await;
    let given = functions::handback(&store, &entry, "b", "given", 86_400_000)
        .await
        .unwrap();
    assert_eq!(given, Ownership::Done);
    assert!(tick("a", live, vec![]).await.reclaim_due, "an orphan");
    let reply = functions::reclaim(&store, "a", live, 2).await.unwrap();
    assert_eq!(taken_ids(&reply), vec![entry]);
    assert!(!tick("a", live, vec![]).await.reclaim_due);

    // A worker whose deadline passed is due to be declared dead.
    let overdue = OVERDUE;
    tick("c", overdue, vec![]).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(
        tick("a", live, vec![]).await.reclaim_due,
        "an overdue worker"
    );
    functions::reclaim(&store, "a", live, 2).await.unwrap();
    assert!(
        !tick("a", live, vec![]).await.reclaim_due,
        "c was declared dead"
    );
}

/// A tick writes the registry fields it is given, renewing the hash's expiry only then or
/// when it creates the hash, and says when it did create it (the worker then sends every
/// field). A tick without the word `due` (a worker of the version before) still gets its
/// two-item reply.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tick_renews_the_registry_hash_with_its_fields_and_answers_older_workers() {
    let redis = TestRedis::start();
    let p = unique_prefix();
    let k = keys(&p);
    let store = queue_store(&redis, &p).await;
    let live = LIVE;
    let tick = |fields: Vec<(&'static str, String)>| {
        let store = store.clone();
        async move {
            functions::tick(&store, "a", live, SWEEPER_HOLD_MS, &fields)
                .await
                .unwrap()
        }
    };
    assert!(tick(vec![("capacity", "2".into())]).await.hash_created);

    // The expiry is renewed with the fields, not by a tick that writes none.
    let pttl = |key: &str| -> i64 { redis.cmd(&["PTTL", key]) };
    redis.cli(&["PEXPIRE", &k.worker("a"), "5000"]);
    tick(vec![]).await;
    assert!(
        pttl(&k.worker("a")) <= 5000,
        "a tick without fields leaves the expiry"
    );
    tick(vec![("running", "1".into())]).await;
    assert!(pttl(&k.worker("a")) > 5000, "fields renew it");
    assert_eq!(redis.hget(&k.worker("a"), "capacity").as_deref(), Some("2"));
    redis.cli(&["DEL", &k.worker("a")]);
    let lost = tick(vec![]).await;
    assert!(
        lost.hash_created,
        "the hash had gone: the worker sends every field next"
    );
    assert!(pttl(&k.worker("a")) > 0, "and the new hash expires");

    // The tick of the version before: no `due`, two items back.
    let old: (i64, Vec<String>) = redis.cmd(&[
        "FCALL",
        "fr_worker_tick",
        "1",
        k.tag(),
        "old",
        "60000",
        "60000",
        "host",
        "h",
    ]);
    assert_eq!(old, (1, vec![]));
    assert_eq!(redis.hget(&k.worker("old"), "host").as_deref(), Some("h"));
}

/// A reclaim pass declares at most 8 overdue workers dead (`ZRANGEBYSCORE ... LIMIT`), so it
/// costs what it finds, not the size of the fleet or of the pending list; the dead workers'
/// entries wait in `{fr}:orphans` for the next passes, and live workers stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reclaim_pass_declares_a_bounded_number_of_workers_dead() {
    let redis = TestRedis::start();
    let p = unique_prefix();
    let k = keys(&p);
    let store = queue_store(&redis, &p).await;
    let overdue = OVERDUE;
    let live = LIVE;
    for i in 0..20 {
        let job = format!("job-{i}");
        xadd(&redis, &p, &[("stream_ref", "paced:1:1"), ("job_id", &job)]);
        let worker = format!("gone-{i}");
        read_and_claim(&redis, &store, &worker, &job).await;
        functions::tick(&store, &worker, overdue, SWEEPER_HOLD_MS, &[])
            .await
            .unwrap();
    }
    for i in 0..5 {
        functions::tick(&store, &format!("live-{i}"), live, SWEEPER_HOLD_MS, &[])
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    let card = |key: &str| -> usize { redis.cmd(&["ZCARD", key]) };
    let reply = functions::reclaim(&store, "b", live, 1).await.unwrap();
    assert_eq!(taken_ids(&reply).len(), 1);
    assert_eq!(card(&k.workers_alive()), 25 - 8, "eight declared dead");
    assert_eq!(
        card(&k.orphans()),
        8 - 1,
        "their entries wait, less the one taken"
    );
    let reply = functions::reclaim(&store, "b", live, 1).await.unwrap();
    assert_eq!(taken_ids(&reply).len(), 1);
    assert_eq!(card(&k.workers_alive()), 25 - 16);
    assert_eq!(card(&k.orphans()), 16 - 2);
    for _ in 0..2 {
        functions::reclaim(&store, "b", live, 100).await.unwrap();
    }
    assert_eq!(
        card(&k.workers_alive()),
        5,
        "only the live workers are left"
    );
    assert_eq!(card(&k.orphans()), 0);
    let owned: usize = redis.cmd(&["SCARD", &k.owned("b")]);
    assert_eq!(owned, 20, "every dead worker's entry is b's now");
}

/// The passes that leave orphans wake the waiting workers: `{fr}:orphans:wake` is topped
/// up to one token per orphan left, at most 64, and a dead worker's wake-up list goes with
/// it; a hand-back wakes one too.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn orphans_wake_the_waiting_workers_one_token_each() {
    let redis = TestRedis::start();
    let p = unique_prefix();
    let k = keys(&p);
    let store = queue_store(&redis, &p).await;
    let overdue = OVERDUE;
    let live = LIVE;
    let tag = k.tag().to_string();
    for i in 0..3 {
        let job = format!("job-{i}");
        xadd(&redis, &p, &[("stream_ref", "paced:1:1"), ("job_id", &job)]);
        read_and_claim(&redis, &store, "gone", &job).await;
    }
    functions::tick(&store, "gone", live, SWEEPER_HOLD_MS, &[])
        .await
        .unwrap();
    let r: String = redis.cmd(&["FCALL", "fr_cancel", "1", &tag, "job-0"]);
    assert_eq!(r, "cancelling");
    let pushed: Vec<String> = redis.cmd(&["LRANGE", &k.wake("gone"), "0", "-1"]);
    assert_eq!(
        pushed,
        vec!["job-0".to_string()],
        "the cancel wakes its worker"
    );
    functions::tick(&store, "gone", overdue, SWEEPER_HOLD_MS, &[])
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let tokens = || -> usize { redis.cmd(&["LLEN", &k.orphans_wake()]) };
    assert_eq!(tokens(), 0, "nothing is an orphan yet");
    let reply = functions::reclaim(&store, "b", live, 1).await.unwrap();
    assert_eq!(taken_ids(&reply).len(), 1);
    assert_eq!(tokens(), 2, "one token per orphan the pass left");
    let exists: u32 = redis.cmd(&["EXISTS", &k.wake("gone")]);
    assert_eq!(exists, 0, "the dead worker's wake-up list goes with it");
    // Tokens are topped up to the orphans, never past them: a pass that leaves fewer
    // orphans adds none; a hand-back adds its own.
    let reply = functions::reclaim(&store, "c", live, 1).await.unwrap();
    assert_eq!(taken_ids(&reply).len(), 1);
    assert_eq!(tokens(), 2);
    redis.cmd::<String>(&["LPOP", &k.orphans_wake()]);
    redis.cmd::<String>(&["LPOP", &k.orphans_wake()]);
    let entry = taken_ids(&reply)[0].clone();
    let given = functions::handback(&store, &entry, "c", "", 60_000)
        .await
        .unwrap();
    assert_eq!(given, Ownership::Done);
    assert_eq!(tokens(), 2, "the orphan left and the one handed back");
}

/// One worker of the fleet holds the sweeper's role (ticks every second): the first to tick
/// gets it, keeps it with its ticks, and the next to tick after it lapsed takes it over.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_sweeper_role_passes_on_when_its_holder_stops_ticking() {
    let redis = TestRedis::start();
    let p = unique_prefix();
    let store = queue_store(&redis, &p).await;
    let live = LIVE;
    // Long enough that a slow machine's consecutive calls never outlast it.
    let hold_ms = 2000;
    let sweeper = |worker: &'static str| {
        let store = store.clone();
        async move {
            functions::tick(&store, worker, live, hold_ms, &[])
                .await
                .unwrap()
                .sweeper
        }
    };
    assert!(sweeper("a").await, "the first to tick");
    assert!(!sweeper("b").await);
    assert!(sweeper("a").await, "kept with its ticks");
    assert!(!sweeper("b").await);
    tokio::time::sleep(Duration::from_millis(hold_ms + 300)).await;
    assert!(sweeper("b").await, "taken over once it lapsed");
    assert!(!sweeper("a").await, "and not handed back");
    let fleet: HashMap<String, String> = redis.hgetall(&keys(&p).fleet());
    assert_eq!(fleet["sweeper"], "b");
}

/// An entry whose owner never registered a lease (read by a worker that died before its
/// claim, or held by a worker of a version without leases) is found by the fleet's sweep of
/// the pending list once idle past the lease, and an unregistered owner that still renews
/// its entries one by one keeps them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn entries_of_unregistered_owners_are_swept_after_the_lease() {
    let redis = TestRedis::start();
    let p = unique_prefix();
    let k = keys(&p);
    let store = queue_store(&redis, &p).await;
    let group = WorkersGroup::of(&redis, &k);
    let call_in = functions::CallIn {
        quiet_ms: 60_000,
        lease_ms: 1000,
    };
    let unclaimed = xadd(&redis, &p, &[("stream_ref", "paced:1:1"), ("job_id", "u")]);
    group.read("crashed", 1);
    xadd(
        &redis,
        &p,
        &[("stream_ref", "paced:1:1"), ("job_id", "old")],
    );
    let renewed = read_and_claim(&redis, &store, "old-version", "old").await;
    let deadline = std::time::Instant::now() + WAIT;
    let taken = loop {
        // The older worker renews its entry one by one, as it did before leases.
        functions::heartbeat(&store, "old-version", call_in, &[(&renewed, "old")])
            .await
            .unwrap();
        let reply = functions::reclaim(&store, "b", call_in, 5).await.unwrap();
        let taken = taken_ids(&reply);
        if !taken.is_empty() || std::time::Instant::now() > deadline {
            break taken;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(taken, vec![unclaimed.clone()]);
    assert_eq!(group.owner_of(&unclaimed), ("b".to_string(), 2));
    assert_eq!(group.owner_of(&renewed).0, "old-version");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prompt_functions_version_and_keep_history() {
    let redis = TestRedis::start();
    let p = unique_prefix();
    let tag = keys(&p).tag().to_string();
    load_functions(&redis, &p).await;
    let store = Store::new(&redis.url(), &p, 4).unwrap();
    assert_eq!(redis.cli(&["FCALL", "fr_prompt_get", "1", &tag]).trim(), "");
    assert_eq!(
        redis
            .cli(&[
                "FCALL",
                "fr_prompt_set",
                "1",
                &tag,
                "Detect all people and vehicles"
            ])
            .trim(),
        "1"
    );
    assert_eq!(
        redis
            .cli(&["FCALL", "fr_prompt_set", "1", &tag, "Detect vehicles"])
            .trim(),
        "2"
    );
    let got = redis.cli(&["FCALL", "fr_prompt_get", "1", &tag]);
    let lines: Vec<&str> = got.lines().collect();
    assert_eq!(lines[0], "Detect vehicles");
    assert_eq!(lines[1], "2");
    let history = free_roam::prompt::active::history(&store, 0).await.unwrap();
    assert_eq!(
        history.iter().map(|h| h.version).collect::<Vec<_>>(),
        vec![2, 1]
    );
    assert_eq!(history[1].text, "Detect all people and vehicles");
    let one = redis.cli(&["FCALL", "fr_prompt_history", "1", &tag, "1"]);
    assert_eq!(one.lines().count(), 1);
    // Without preserve_previous the history restarts at the new version.
    assert_eq!(
        redis
            .cli(&["FCALL", "fr_prompt_set", "1", &tag, "Detect dogs", "0"])
            .trim(),
        "3"
    );
    let history = free_roam::prompt::active::history(&store, 0).await.unwrap();
    assert_eq!(history.len(), 1);
    assert_eq!(history[0].version, 3);
    let err = redis.cli(&["FCALL", "fr_prompt_set", "1", &tag, ""]);
    assert!(err.contains("prompt text is empty"), "{err}");
    let big = "y".repeat(8193);
    let err = redis.cli(&["FCALL", "fr_prompt_set", "1", &tag, &big]);
    assert!(err.contains("at most 8192"), "{err}");
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.unwrap();
    let code = buf[9..12].parse().unwrap();
    let body = buf.split("\r\n\r\n").nth(1).unwrap_or_default().to_string();
    (code, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn health_endpoints_answer_over_http() {
    let mut redis = TestRedis::start();
    let p = unique_prefix();
    let w = InProcessWorker::start(&redis, &p, "w-health", &[]);
    let store = Store::new(&redis.url(), &p, 4).unwrap();
    let ctx = free_roam::health::HealthContext {
        store,
        state: w.state.clone(),
        metrics: w.metrics.clone(),
        worker_id: "w-health".into(),
        capacity: 10,
        started: std::time::Instant::now(),
    };
    let stop = CancellationToken::new();
    let (addr, _task) = free_roam::health::serve("127.0.0.1:0".parse().unwrap(), ctx, stop.clone())
        .await
        .unwrap();
    xadd(
        &redis,
        &p,
        &[("stream_ref", "paced:1000:50"), ("job_id", "h")],
    );
    eventually(WAIT, "running", || w.state.running_jobs() == 1).await;

    let (code, body) = http_get(addr, "/health").await;
    assert_eq!(code, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["status"], "ok");
    assert_eq!(v["redis"]["reachable"], true);
    assert!(v["redis"]["rtt_ms"].as_f64().unwrap() >= 0.0);
    assert_eq!(v["model"]["loaded"], true);
    assert_eq!(v["jobs"]["running"], 1);
    assert_eq!(v["jobs"]["capacity"], 10);
    assert_eq!(v["worker_id"], "w-health");
    assert!(v["version"].is_string());
    assert_eq!(http_get(addr, "/health/ready").await.0, 200);
    assert_eq!(http_get(addr, "/health/live").await.0, 200);
    let (code, metrics) = http_get(addr, "/metrics").await;
    assert_eq!(code, 200);
    assert!(
        metrics.contains("freeroam_jobs_claimed_total 1"),
        "{metrics}"
    );
    assert!(metrics.contains("freeroam_jobs_running 1"));
    assert_eq!(http_get(addr, "/jobs").await.0, 404);

    // Redis away: not ready, and it says why.
    redis.stop();
    let (code, body) = http_get(addr, "/health/ready").await;
    assert_eq!(code, 503);
    assert!(body.contains("redis unreachable"), "{body}");
    let (_, body) = http_get(addr, "/health").await;
    assert!(body.contains("\"reachable\":false"));
    assert_eq!(http_get(addr, "/health/live").await.0, 200);
    redis.restart();
    eventually(WAIT, "ready again", || {
        w.state
            .redis_ready
            .load(std::sync::atomic::Ordering::Relaxed)
    })
    .await;
    // Draining: not ready either.
    w.state
        .draining
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let (code, body) = http_get(addr, "/health/ready").await;
    assert_eq!(code, 503);
    assert!(body.contains("draining"), "{body}");
    stop.cancel();
    w.stop().await;
}

// ---- workers as real processes -------------------------------------------------------

/// Not a test on its own: the body of a worker process that the tests below start (this
/// test binary, run again with FREE_ROAM_CHILD_WORKER set), so it can be killed for real.
#[test]
#[ignore]
fn child_worker_process() {
    let Ok(settings) = std::env::var("FREE_ROAM_CHILD_WORKER") else {
        return;
    };
    let pairs: Vec<(String, String)> = serde_json::from_str(&settings).unwrap();
    let refs: Vec<(&str, &str)> = pairs
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let url = std::env::var("FREE_ROAM_CHILD_REDIS").unwrap();
    let prefix = std::env::var("FREE_ROAM_CHILD_PREFIX").unwrap();
    let id = std::env::var("FREE_ROAM_CHILD_ID").unwrap();
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(async move {
            let config = Arc::new(config(&url, &prefix, &refs));
            let store = Store::new(&config.redis.url, &config.redis.key_prefix, 16).unwrap();
            let state = Arc::new(WorkerState::default());
            let worker = Arc::new(Worker::new(
                store,
                Arc::new(config.queue.clone()),
                Arc::new(TestBody),
                Arc::new(Metrics::default()),
                state,
                WorkerIdentity {
                    id,
                    model: "test-body".into(),
                    device: "cpu".into(),
                },
            ));
            let shutdown = CancellationToken::new();
            let s = shutdown.clone();
            tokio::spawn(async move {
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                        .unwrap();
                term.recv().await;
                s.cancel();
            });
            worker.run(shutdown).await;
        });
}

fn spawn_child_worker(
    redis: &TestRedis,
    prefix: &str,
    id: &str,
    settings: &[(&str, &str)],
) -> Child {
    let pairs: Vec<(String, String)> = settings
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    spawn_test_process(
        "lifecycle::child_worker_process",
        &[
            (
                "FREE_ROAM_CHILD_WORKER",
                serde_json::to_string(&pairs).unwrap(),
            ),
            ("FREE_ROAM_CHILD_REDIS", redis.url()),
            ("FREE_ROAM_CHILD_PREFIX", prefix.to_string()),
            ("FREE_ROAM_CHILD_ID", id.to_string()),
        ],
    )
}

const SIGKILL: i32 = 9;
const SIGTERM: i32 = 15;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_of_a_killed_worker_is_finished_by_another_after_the_lease() {
    let redis = TestRedis::start();
    let p = unique_prefix();
    let settings = [("JOB_LEASE_MS", "2000")];
    let mut a = spawn_child_worker(&redis, &p, "proc-a", &settings);
    xadd(
        &redis,
        &p,
        &[("stream_ref", "paced:30:50"), ("job_id", "orphan")],
    );
    eventually(WAIT, "running in the child", || {
        frames_of(&redis, &p, "orphan").len() >= 5
    })
    .await;
    signal(&a, SIGKILL);
    let _ = a.wait();
    let done_before = frames_of(&redis, &p, "orphan").len();
    assert!(done_before < 30);

    let b = InProcessWorker::start(&redis, &p, "b", &settings);
    let end = wait_end(&redis, &p, "orphan").await;
    assert_eq!(end["status"], "completed");
    let h = redis.hgetall(&keys(&p).job("orphan"));
    assert_eq!(h["worker"], "b");
    assert_eq!(h["attempts"], "2", "the killed run counts as an attempt");
    assert_eq!(
        frames_of(&redis, &p, "orphan"),
        (0..30).collect::<Vec<u64>>()
    );
    assert_eq!(b.metrics.jobs_reclaimed.get(), 1);
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_hands_the_job_back_well_before_the_lease() {
    let redis = TestRedis::start();
    let p = unique_prefix();
    let settings = [("JOB_LEASE_MS", "60000")];
    let mut a = spawn_child_worker(&redis, &p, "proc-a", &settings);
    xadd(
        &redis,
        &p,
        &[("stream_ref", "paced:40:50"), ("job_id", "rolling")],
    );
    eventually(WAIT, "running in the child", || {
        frames_of(&redis, &p, "rolling").len() >= 3
    })
    .await;
    assert_eq!(
        redis.hget(&keys(&p).job("rolling"), "worker").as_deref(),
        Some("proc-a")
    );

    let started = std::time::Instant::now();
    signal(&a, SIGTERM);
    let exit = a.wait().unwrap();
    assert!(exit.success(), "the worker exits 0 on SIGTERM");
    assert_eq!(status(&redis, &p, "rolling").as_deref(), Some("queued"));
    assert!(
        redis.cmd::<i64>(&["EXISTS", &keys(&p).worker("proc-a")]) == 0,
        "its heartbeat is removed"
    );
    let b = InProcessWorker::start(&redis, &p, "b", &settings);
    let end = wait_end(&redis, &p, "rolling").await;
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "picked up long before the 60 s lease"
    );
    assert_eq!(end["status"], "completed");
    let h = redis.hgetall(&keys(&p).job("rolling"));
    assert_eq!(h["worker"], "b");
    assert_eq!(h["handoffs"], "1");
    assert_eq!(h["attempts"], "1");
    assert_eq!(
        frames_of(&redis, &p, "rolling"),
        (0..40).collect::<Vec<u64>>()
    );
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_started_before_redis_waits_and_then_works() {
    let mut redis = TestRedis::start();
    redis.stop();
    let p = unique_prefix();
    let w = InProcessWorker::start(&redis, &p, "early", &[]);
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(
        !w.state
            .redis_ready
            .load(std::sync::atomic::Ordering::Relaxed)
    );
    let why = w
        .state
        .last_redis_error
        .lock()
        .unwrap()
        .clone()
        .unwrap_or_default();
    assert!(
        !why.is_empty(),
        "the reason it is not ready is kept for /health/ready"
    );
    redis.restart();
    xadd(
        &redis,
        &p,
        &[("stream_ref", "paced:2:1"), ("job_id", "late")],
    );
    assert_eq!(wait_end(&redis, &p, "late").await["status"], "completed");
    w.stop().await;
}
