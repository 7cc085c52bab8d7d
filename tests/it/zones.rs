//! Zones and lines end to end against a real Redis, with a full worker (queue, pipeline,
//! engine) running the test-colour model, which gives each named colour's bounding box: a
//! red box on a camera's frames (a Redis frame stream) walks into a zone, stands there past
//! its `loiter_s` (the scene gate reuses the output meanwhile), walks out and across a line.
//! The job's events in `{fr}:alerts` and its counts in the progress hash must be exactly one
//! enter, one loiter, one leave and one crossing, in that order and the right direction,
//! also when the worker hands the job back while the box is in the zone, or is killed
//! (SIGKILL, as a real process), and another one takes it over (events counted once by
//! `alert_id` and `kind`, as readers dedupe them). A job that ends with the box inside (cancelled while it runs, or while
//! handed back) ends its stay with a `leave`.

use crate::common::frames::{stream_frames, yard};
use crate::common::process::{signal, spawn_test_process};
use crate::common::worker::StreamWorker;
use crate::common::{TestRedis, eventually, unique_prefix};
use free_roam::model::testing::colour::ColourTestModel;
use free_roam::store::Store;
use free_roam::store::keys::Keys;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(30);
const KEY: &str = "frames:yard";
const W: u32 = 240;
const H: u32 = 120;
const SIDE: u32 = 20;
const FRAME_MS: u64 = 100;
const FPS: &str = "10";
/// Pixels the box moves per frame while it walks.
const STEP: u32 = 4;
/// Frames it walks before it stops (then x = 110: its anchor at 120, inside the zone).
const WALK: u64 = 25;
/// Frames it stands still: 6 s, past the zone's 1 s `loiter_s`, and long enough for a
/// killed worker's lease to run out and another worker to take the job over.
const STAND: u64 = 60;
/// Where it ends: x = 220, its anchor at 230, past the line at 180.
const LAST_X: u32 = 220;

/// The zone covers x from 72 to 168 and the line stands at x = 180, top to bottom, so its
/// left side going down the screen is the east (larger x).
const ZONES: &str = r#"{"dock": {"points": [[0.3, 0], [0.7, 0], [0.7, 1], [0.3, 1]], "labels": ["red"], "loiter_s": 1}}"#;
const LINES: &str = r#"{"gate": {"points": [[0.75, 0], [0.75, 1]], "sides": ["east", "west"]}}"#;

/// The box's left edge at moving frame `t`.
fn box_x(t: u64) -> u32 {
    let walked = t.min(WALK) + t.saturating_sub(WALK + STAND);
    (10 + STEP * walked as u32).min(LAST_X)
}

/// A textured grey yard with the red box at `x`, on the ground (its bottom at y = 100).
fn picture(x: u32) -> Vec<u8> {
    yard(W, H, 120, 60, &[(x, 80, SIDE, [230, 20, 20])])
}

/// Pushes a frame every FRAME_MS until `stop`: the box waits at its start until `go`, then
/// walks its path (`moved` counts the frames since).
fn produce(
    redis: &TestRedis,
    go: Arc<AtomicBool>,
    moved: Arc<AtomicU64>,
    stop: CancellationToken,
) -> std::thread::JoinHandle<()> {
    let every = Duration::from_millis(FRAME_MS);
    stream_frames(redis.client(), (KEY, W, H), every, stop, move || {
        let t = if go.load(Ordering::SeqCst) {
            moved.fetch_add(1, Ordering::SeqCst)
        } else {
            0
        };
        picture(box_x(t))
    })
}

/// Leases short enough for a takeover while the box stands.
const SETTINGS: &[(&str, &str)] = &[("JOB_LEASE_MS", "2000")];

/// A full worker with the test-colour model in this process.
struct ColourWorker;

impl ColourWorker {
    fn start(redis_url: &str, prefix: &str, id: &str) -> StreamWorker {
        StreamWorker::start(
            redis_url,
            prefix,
            id,
            Box::new(ColourTestModel::new(64)),
            SETTINGS,
        )
    }
}

/// How the job changes workers while the box stands in the zone, if it does.
#[derive(Clone, Copy, PartialEq)]
enum Takeover {
    None,
    /// The worker shuts down, handing the job back.
    HandBack,
    /// The worker, a process of its own, is killed; another takes the job over once its
    /// lease runs out.
    Kill,
}

/// Not a test on its own: the body of a worker process that the SIGKILL test starts (this
/// test binary, run again with FREE_ROAM_ZONES_CHILD set), so it can be killed for real.
#[test]
#[ignore]
fn zones_child_worker() {
    let Ok(url) = std::env::var("FREE_ROAM_ZONES_CHILD") else {
        return;
    };
    let prefix = std::env::var("FREE_ROAM_ZONES_PREFIX").unwrap();
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(async move {
            let w = ColourWorker::start(&url, &prefix, "a");
            let _ = w.handle.await;
        });
}

/// The job's zone and line events, in order, each as its fields.
fn zone_events(redis: &TestRedis, keys: &Keys) -> Vec<HashMap<String, String>> {
    redis
        .xrange(&keys.alerts())
        .into_iter()
        .map(|(_, f)| f)
        .filter(|f| {
            ["enter", "leave", "cross", "loiter"].contains(&f["kind"].as_str())
                && f["job_id"] == "yard"
        })
        .collect()
}

/// The box's frames going to `frames:yard` while a test runs.
struct Yard {
    /// Frames since the box set off.
    moved: Arc<AtomicU64>,
    stop: CancellationToken,
    producer: std::thread::JoinHandle<()>,
}

impl Yard {
    /// Starts the frames, submits the job `yard`, and sets the box off once a worker's job
    /// has seen it waiting.
    async fn start(redis: &TestRedis, p: &str) -> Self {
        let keys = Keys::new(p);
        let (go, moved, stop) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
            CancellationToken::new(),
        );
        let producer = produce(redis, go.clone(), moved.clone(), stop.clone());
        let _: String = redis.cmd(&[
            "XADD",
            keys.jobs().as_str(),
            "*",
            "stream_ref",
            KEY,
            "fps",
            FPS,
            "job_id",
            "yard",
            "prompt",
            "red",
            "zones",
            ZONES,
            "lines",
            LINES,
            "zone_units",
            "normalised",
        ]);
        let progress = keys.progress("yard");
        eventually(WAIT, "the job samples the waiting box", || {
            redis
                .hget(&progress, "frames_sampled")
                .and_then(|n| n.parse::<u64>().ok())
                .is_some_and(|n| n >= 3)
        })
        .await;
        go.store(true, Ordering::SeqCst);
        Self {
            moved,
            stop,
            producer,
        }
    }

    /// Waits until the box stands in the zone (standing, so that the frames a live stream
    /// skips while the job changes hands, the newest frame winning, do not move it out of
    /// reach of its track).
    async fn standing_in_the_zone(&self, redis: &TestRedis, p: &str) {
        let progress = Keys::new(p).progress("yard");
        eventually(WAIT, "the box stands in the zone", || {
            self.moved.load(Ordering::SeqCst) > WALK
                && redis.hget(&progress, "zone:dock:in").as_deref() == Some("1")
        })
        .await;
    }

    fn stop(self) {
        self.stop.cancel();
        self.producer.join().unwrap();
    }
}

/// Runs the job `yard` while the box walks its path, changing workers as `takeover` says
/// once the box stands in the zone. Returns the job's zone and line events, each once
/// (by `alert_id` and `kind`, as delivery is at least once).
async fn walk(redis: &TestRedis, p: &str, takeover: Takeover) -> Vec<HashMap<String, String>> {
    let keys = Keys::new(p);
    let progress = keys.progress("yard");
    let mut child = (takeover == Takeover::Kill).then(|| {
        spawn_test_process(
            "zones::zones_child_worker",
            &[
                ("FREE_ROAM_ZONES_CHILD", redis.url()),
                ("FREE_ROAM_ZONES_PREFIX", p.to_string()),
            ],
        )
    });
    let mut worker = child
        .is_none()
        .then(|| ColourWorker::start(&redis.url(), p, "a"));
    let yard = Yard::start(redis, p).await;
    if takeover != Takeover::None {
        yard.standing_in_the_zone(redis, p).await;
        if let Some(w) = worker.take() {
            w.stop().await;
            assert_eq!(
                redis.hget(&keys.job("yard"), "status").as_deref(),
                Some("queued"),
                "handed back"
            );
        }
        if let Some(c) = &mut child {
            signal(c, 9);
            let _ = c.wait();
        }
        worker = Some(ColourWorker::start(&redis.url(), p, "b"));
    }
    let end = WALK + STAND + u64::from((LAST_X - 10) / STEP) + 10;
    eventually(WAIT, "the box walks its path and the job counts it", || {
        yard.moved.load(Ordering::SeqCst) > end
            && redis.hget(&progress, "line:gate:east").as_deref() == Some("1")
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    yard.stop();
    if let Some(w) = worker {
        w.stop().await;
    }
    if takeover == Takeover::Kill {
        let attempts = redis.hget(&keys.job("yard"), "attempts");
        assert_eq!(attempts.as_deref(), Some("2"), "taken over after the kill");
    }
    let mut seen = HashSet::new();
    zone_events(redis, &keys)
        .into_iter()
        .filter(|e| seen.insert((e["alert_id"].clone(), e["kind"].clone())))
        .collect()
}

/// Exactly one enter, loiter, leave and crossing of track 0, and the counts to match.
fn assert_each_event_once(redis: &TestRedis, p: &str, events: &[HashMap<String, String>]) {
    let kinds: Vec<(&str, &str)> = events
        .iter()
        .map(|e| {
            let place = e.get("zone").or_else(|| e.get("line")).unwrap();
            (e["kind"].as_str(), place.as_str())
        })
        .collect();
    assert_eq!(
        kinds,
        [
            ("enter", "dock"),
            ("loiter", "dock"),
            ("leave", "dock"),
            ("cross", "gate")
        ],
        "{events:#?}"
    );
    for e in events {
        assert_eq!(e["track_id"], "0", "one track throughout: {e:?}");
        assert_eq!(e["label"], "red");
    }
    let (enter, leave, cross) = (&events[0], &events[2], &events[3]);
    assert_eq!(enter["alert_id"], leave["alert_id"], "one stay, one id");
    assert_eq!(events[1]["alert_id"], enter["alert_id"]);
    assert_eq!(leave["reason"], "left");
    let dwell: i64 = leave["dwell_ms"].parse().unwrap();
    assert!(
        dwell >= 2000,
        "it stood 2 s inside, and walked in it: {dwell}"
    );
    assert_eq!(
        (cross["direction"].as_str(), cross["from"].as_str()),
        ("east", "west")
    );
    assert_eq!(cross["alert_id"], "yard:line:gate:0:east");
    let counts = redis.hgetall(&Keys::new(p).progress("yard"));
    for (field, want) in [
        ("zone:dock:in", "0"),
        ("zone:dock:entered", "1"),
        ("line:gate:east", "1"),
        ("line:gate:west", "0"),
    ] {
        assert_eq!(counts.get(field).map(String::as_str), Some(want), "{field}");
    }
    assert!(counts.contains_key("zone_state"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_box_walking_through_a_zone_and_across_a_line_makes_each_event_once() {
    let redis = TestRedis::start();
    let p = unique_prefix();
    let events = walk(&redis, &p, Takeover::None).await;
    assert_each_event_once(&redis, &p, &events);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_whose_worker_is_killed_mid_stay_neither_loses_nor_repeats_an_event() {
    let redis = TestRedis::start();
    let p = unique_prefix();
    let events = walk(&redis, &p, Takeover::Kill).await;
    assert_each_event_once(&redis, &p, &events);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_handed_back_mid_stay_neither_loses_nor_repeats_an_event() {
    let redis = TestRedis::start();
    let p = unique_prefix();
    let events = walk(&redis, &p, Takeover::HandBack).await;
    assert_each_event_once(&redis, &p, &events);
}

/// The job's `enter` and `leave` events, as (kind, track, reason).
fn stay_events(redis: &TestRedis, keys: &Keys) -> Vec<(String, String, String)> {
    zone_events(redis, keys)
        .into_iter()
        .filter(|e| e["kind"] != "loiter")
        .map(|e| {
            let reason = e.get("reason").cloned().unwrap_or_default();
            (e["kind"].clone(), e["track_id"].clone(), reason)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_track_inside_a_zone_leaves_it_when_the_job_ends() {
    let redis = TestRedis::start();
    let cancelled = |track: &str| {
        vec![
            ("enter".to_string(), track.to_string(), String::new()),
            ("leave".into(), track.into(), "job_cancelled".into()),
        ]
    };

    // Cancelled while it runs: its worker ends the stay in its last write.
    let p = unique_prefix();
    let keys = Keys::new(&p);
    let worker = ColourWorker::start(&redis.url(), &p, "a");
    let yard = Yard::start(&redis, &p).await;
    yard.standing_in_the_zone(&redis, &p).await;
    let _: String = redis.cmd(&["FCALL", "fr_cancel", "1", keys.tag(), "yard"]);
    eventually(WAIT, "the job is cancelled", || {
        redis.hget(&keys.job("yard"), "status").as_deref() == Some("cancelled")
    })
    .await;
    yard.stop();
    worker.stop().await;
    assert_eq!(stay_events(&redis, &keys), cancelled("0"));
    let leave = zone_events(&redis, &keys).pop().unwrap();
    assert!(!leave.contains_key("snapshot"), "{leave:?}");
    assert!(leave["dwell_ms"].parse::<i64>().unwrap() > 0);
    assert_eq!(
        redis
            .hget(&keys.progress("yard"), "zone:dock:in")
            .as_deref(),
        Some("0")
    );

    // Handed back, then cancelled with no worker running it: the cancel ends the stay.
    let p = unique_prefix();
    let keys = Keys::new(&p);
    let worker = ColourWorker::start(&redis.url(), &p, "a");
    let yard = Yard::start(&redis, &p).await;
    yard.standing_in_the_zone(&redis, &p).await;
    worker.stop().await;
    yard.stop();
    assert_eq!(stay_events(&redis, &keys).len(), 1, "still inside");
    let store = Store::new(&redis.url(), &p, 4).unwrap();
    let retention = free_roam::store::functions::Retention {
        results_maxlen: 1000,
        ttl_s: 3600,
        alerts_maxlen: 1000,
    };
    let reply = free_roam::client::cancel(&store, "yard", retention)
        .await
        .unwrap();
    assert_eq!(reply, free_roam::store::functions::CancelOutcome::Cancelled);
    assert_eq!(stay_events(&redis, &keys), cancelled("0"));
    let counts = redis.hgetall(&keys.progress("yard"));
    assert_eq!(counts.get("zone:dock:in").map(String::as_str), Some("0"));
    assert_eq!(
        counts.get("zone:dock:entered").map(String::as_str),
        Some("1")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_zones_fail_the_job_once_at_claim_naming_the_field() {
    let redis = TestRedis::start();
    let p = unique_prefix();
    let keys = Keys::new(&p);
    let worker = ColourWorker::start(&redis.url(), &p, "a");
    let _: String = redis.cmd(&[
        "XADD",
        keys.jobs().as_str(),
        "*",
        "stream_ref",
        KEY,
        "job_id",
        "crooked",
        "zones",
        r#"{"bow": [[0,0],[10,10],[10,0],[0,10]]}"#,
    ]);
    let job = keys.job("crooked");
    eventually(WAIT, "the job fails", || {
        redis.hget(&job, "status").as_deref() == Some("failed")
    })
    .await;
    let error = redis.hget(&job, "error").unwrap_or_default();
    assert!(
        error.contains("field `zones`: `bow` is a self-crossing polygon"),
        "{error}"
    );
    worker.stop().await;
}
