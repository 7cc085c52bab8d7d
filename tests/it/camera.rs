//! Camera behaviour end to end against a real Redis, with full workers (queue, pipeline,
//! engine): the scene gate reusing the output of a still scene, and alerts from a model that
//! sees a red object by its pixels (random weights cannot see anything), also across a
//! worker killed (SIGKILL, as a real process) while an alert is open, and for a job
//! cancelled after its worker handed it back.

use crate::common::frames::{Square, stream_frames, yard};
use crate::common::process::{signal, spawn_test_process};
use crate::common::worker::StreamWorker;
use crate::common::{TestRedis, eventually, unique_prefix};
use free_roam::frame::Frame;
use free_roam::model::testing::stub::StubModel;
use free_roam::store::Store;
use std::collections::HashMap;
use std::process::Child;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(30);
const KEY: &str = "frames:camera";
const W: u32 = 96;
const H: u32 = 64;
/// The producer's frame interval, and the jobs' fps to match.
const FRAME_MS: u64 = 100;
const FPS: &str = "10";

/// Decides presence from the pixels: "red" is detected when more than 2% of the frame is
/// strongly red. Scored like CLIP's phrases, so alerts read it the same way.
fn red_model() -> StubModel {
    StubModel::named("red-share")
        .with_input_size(64)
        .answering(|seen| red_share(seen.frame))
}

fn red_share(f: &Frame) -> serde_json::Value {
    let red = f
        .rgb
        .chunks_exact(3)
        .filter(|p| p[0] > 180 && p[1] < 80 && p[2] < 80)
        .count();
    let share = red as f64 / (f.width * f.height) as f64;
    let detected: Vec<&str> = if share > 0.02 { vec!["red"] } else { vec![] };
    serde_json::json!({
        "phrases": [{"phrase": "red", "probability": share}],
        "detected": detected,
    })
}

/// A still, textured light grey scene, with a red square when `red` is set.
fn picture(red: bool) -> Vec<u8> {
    let squares: &[Square] = if red {
        &[(30, 20, 20, [220, 20, 20])]
    } else {
        &[]
    };
    yard(W, H, 140, 80, squares)
}

/// Pushes one frame every FRAME_MS with the capture time as `ts`, red while `red` is set,
/// until `stop` fires.
fn produce(
    redis: &TestRedis,
    red: Arc<AtomicBool>,
    stop: CancellationToken,
) -> std::thread::JoinHandle<()> {
    let (still, object) = (picture(false), picture(true));
    let every = Duration::from_millis(FRAME_MS);
    stream_frames(redis.client(), (KEY, W, H), every, stop, move || {
        if red.load(Ordering::Relaxed) {
            object.clone()
        } else {
            still.clone()
        }
    })
}

/// A full worker with the red model in this process.
struct CameraWorker;

impl CameraWorker {
    fn start(redis_url: &str, prefix: &str, id: &str, settings: &[(&str, &str)]) -> StreamWorker {
        StreamWorker::start(redis_url, prefix, id, Box::new(red_model()), settings)
    }
}

fn keys(prefix: &str) -> free_roam::store::keys::Keys {
    free_roam::store::keys::Keys::new(prefix)
}

fn submit(redis: &TestRedis, prefix: &str, job: &str, extra: &[(&str, &str)]) {
    let jobs = keys(prefix).jobs();
    let mut args = vec![
        "XADD",
        jobs.as_str(),
        "*",
        "stream_ref",
        KEY,
        "fps",
        FPS,
        "job_id",
        job,
    ];
    args.extend(extra.iter().flat_map(|(k, v)| [*k, *v]));
    let _: String = redis.cmd(&args);
}

/// The job's alert events, oldest first, as (kind, label, reason).
fn alerts(redis: &TestRedis, prefix: &str, job: &str) -> Vec<HashMap<String, String>> {
    redis
        .xrange(&keys(prefix).alerts())
        .into_iter()
        .map(|(_, f)| f)
        .filter(|f| f.get("job_id").map(String::as_str) == Some(job))
        .collect()
}

fn kinds(events: &[HashMap<String, String>]) -> Vec<(String, String, String)> {
    let g = |f: &HashMap<String, String>, k: &str| f.get(k).cloned().unwrap_or_default();
    events
        .iter()
        .map(|f| (g(f, "kind"), g(f, "label"), g(f, "reason")))
        .collect()
}

fn start_end() -> Vec<(String, String, String)> {
    vec![
        ("start".into(), "red".into(), String::new()),
        ("end".into(), "red".into(), "cleared".into()),
    ]
}

const ALERT_FIELDS: &[(&str, &str)] = &[("alert_min_frames", "2"), ("alert_clear_ms", "1000")];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_still_scene_is_reused_and_an_object_makes_one_start_and_one_end() {
    let redis = TestRedis::start();
    let p = unique_prefix();
    let w = CameraWorker::start(&redis.url(), &p, "cam-w", &[]);
    let red = Arc::new(AtomicBool::new(false));
    let stop = CancellationToken::new();
    let producer = produce(&redis, red.clone(), stop.clone());
    submit(&redis, &p, "lobby", ALERT_FIELDS);

    let progress = keys(&p).progress("lobby");
    eventually(WAIT, "still frames reused", || {
        redis
            .hget(&progress, "frames_reused")
            .and_then(|n| n.parse::<u64>().ok())
            .is_some_and(|n| n >= 10)
    })
    .await;
    red.store(true, Ordering::Relaxed);
    eventually(WAIT, "a start", || !alerts(&redis, &p, "lobby").is_empty()).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    red.store(false, Ordering::Relaxed);
    eventually(WAIT, "an end", || alerts(&redis, &p, "lobby").len() >= 2).await;
    // Another second of still scene: nothing more.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let events = alerts(&redis, &p, "lobby");
    assert_eq!(kinds(&events), start_end(), "{events:?}");
    let (start, end) = (&events[0], &events[1]);
    let n = |f: &HashMap<String, String>, k: &str| f[k].parse::<i64>().unwrap();
    assert_eq!(start["first_frame"], end["first_frame"]);
    let alert_id = format!("lobby:red:{}", start["first_frame"]);
    assert_eq!(
        (&start["alert_id"], &end["alert_id"]),
        (&alert_id, &alert_id)
    );
    assert_eq!(
        n(start, "last_frame") - n(start, "first_frame"),
        1,
        "starts on its second frame"
    );
    assert!(n(end, "last_capture_ms") - n(end, "first_capture_ms") >= 1000);
    assert!(start["peak_score"].parse::<f64>().unwrap() > 0.02);

    // The entries: one per sampled frame; still frames name the frame they repeat.
    let results: Vec<HashMap<String, String>> = redis
        .xrange(&keys(&p).results("lobby"))
        .into_iter()
        .map(|(_, f)| f)
        .collect();
    let reused: Vec<&HashMap<String, String>> = results
        .iter()
        .filter(|r| r.contains_key("reused_from"))
        .collect();
    assert!(
        reused.len() >= 10,
        "{} reused of {}",
        reused.len(),
        results.len()
    );
    for r in &reused {
        let from = &r["reused_from"];
        let source = results
            .iter()
            .find(|e| &e["frame"] == from && !e.contains_key("reused_from"))
            .unwrap_or_else(|| panic!("frame {from} has no model entry"));
        assert_eq!(r["output"], source["output"]);
        assert_eq!(r["latency_ms"], "0.00");
    }
    assert!(w.metrics.frames_reused.get() >= 10);
    assert_eq!(w.metrics.alerts_written.get(), 2);

    stop.cancel();
    producer.join().unwrap();
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancelling_a_job_ends_its_open_alert_and_gate_off_runs_every_frame() {
    let redis = TestRedis::start();
    let p = unique_prefix();
    let w = CameraWorker::start(&redis.url(), &p, "cam-w", &[]);
    let red = Arc::new(AtomicBool::new(true));
    let stop = CancellationToken::new();
    let producer = produce(&redis, red.clone(), stop.clone());
    let mut fields = ALERT_FIELDS.to_vec();
    fields.push(("scene_gate", "off"));
    submit(&redis, &p, "door", &fields);
    eventually(WAIT, "a start", || !alerts(&redis, &p, "door").is_empty()).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _: String = redis.cmd(&["FCALL", "fr_cancel", "1", keys(&p).tag(), "door"]);
    eventually(WAIT, "an end", || alerts(&redis, &p, "door").len() >= 2).await;
    let events = alerts(&redis, &p, "door");
    assert_eq!(
        kinds(&events),
        [
            ("start".into(), "red".into(), String::new()),
            ("end".into(), "red".into(), "job_cancelled".into()),
        ]
    );
    let hash = redis.hgetall(&keys(&p).progress("door"));
    assert_eq!(hash.get("frames_reused"), None, "the gate was off");
    assert!(
        !redis
            .xrange(&keys(&p).results("door"))
            .iter()
            .any(|(_, f)| f.contains_key("reused_from"))
    );
    stop.cancel();
    producer.join().unwrap();
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_alert_of_a_job_cancelled_after_its_hand_back_ends_once() {
    let redis = TestRedis::start();
    let p = unique_prefix();
    let a = CameraWorker::start(&redis.url(), &p, "a", &[]);
    let red = Arc::new(AtomicBool::new(true));
    let stop = CancellationToken::new();
    let producer = produce(&redis, red.clone(), stop.clone());
    // `porch` is cancelled the way the CLI does it, which writes the end entry at once;
    // `yard` with a bare fr_cancel, so the next worker to read its entry writes it.
    submit(&redis, &p, "porch", ALERT_FIELDS);
    submit(&redis, &p, "yard", ALERT_FIELDS);
    for job in ["porch", "yard"] {
        eventually(WAIT, "a start", || !alerts(&redis, &p, job).is_empty()).await;
    }
    // A worker shutting down hands its jobs back, their alerts open.
    a.stop().await;
    for job in ["porch", "yard"] {
        assert_eq!(
            redis.hget(&keys(&p).job(job), "status").as_deref(),
            Some("queued")
        );
        assert_eq!(alerts(&redis, &p, job).len(), 1, "{job}: still open");
    }

    let store = Store::new(&redis.url(), &p, 4).unwrap();
    let retention = free_roam::store::functions::Retention {
        results_maxlen: 1000,
        ttl_s: 3600,
        alerts_maxlen: 1000,
    };
    let reply = free_roam::client::cancel(&store, "porch", retention)
        .await
        .unwrap();
    assert_eq!(reply, free_roam::store::functions::CancelOutcome::Cancelled);
    let cancelled = vec![
        ("start".to_string(), "red".to_string(), String::new()),
        ("end".into(), "red".into(), "job_cancelled".into()),
    ];
    assert_eq!(kinds(&alerts(&redis, &p, "porch")), cancelled, "at once");
    let _: String = redis.cmd(&["FCALL", "fr_cancel", "1", keys(&p).tag(), "yard"]);
    assert_eq!(alerts(&redis, &p, "yard").len(), 1, "no worker read it yet");

    // The next worker drops both entries: it ends yard's alert, and does not end porch's
    // again.
    let b = CameraWorker::start(&redis.url(), &p, "b", &[]);
    let jobs = keys(&p).jobs();
    eventually(WAIT, "both entries dropped", || {
        redis.cmd::<u64>(&["XLEN", jobs.as_str()]) == 0
    })
    .await;
    for job in ["porch", "yard"] {
        assert_eq!(kinds(&alerts(&redis, &p, job)), cancelled, "{job}");
        let ends: Vec<_> = redis
            .xrange(&keys(&p).results(job))
            .into_iter()
            .filter(|(_, f)| f.get("kind").map(String::as_str) == Some("end"))
            .map(|(_, f)| f["status"].clone())
            .collect();
        assert_eq!(ends, ["cancelled"], "{job}");
    }
    stop.cancel();
    producer.join().unwrap();
    b.stop().await;
}

// ---- a worker as a real process ------------------------------------------------------

/// Not a test on its own: the body of a worker process that the test below starts (this
/// test binary, run again with FREE_ROAM_CAMERA_CHILD set), so it can be killed for real.
#[test]
#[ignore]
fn camera_child_worker() {
    let Ok(url) = std::env::var("FREE_ROAM_CAMERA_CHILD") else {
        return;
    };
    let prefix = std::env::var("FREE_ROAM_CAMERA_PREFIX").unwrap();
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(async move {
            let w = CameraWorker::start(&url, &prefix, "proc-a", &[("JOB_LEASE_MS", "2000")]);
            let _ = w.handle.await;
        });
}

fn spawn_child(redis: &TestRedis, prefix: &str) -> Child {
    spawn_test_process(
        "camera::camera_child_worker",
        &[
            ("FREE_ROAM_CAMERA_CHILD", redis.url()),
            ("FREE_ROAM_CAMERA_PREFIX", prefix.to_string()),
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_alert_open_when_its_worker_is_killed_starts_once_and_ends_once() {
    let redis = TestRedis::start();
    let p = unique_prefix();
    let mut child = spawn_child(&redis, &p);
    let red = Arc::new(AtomicBool::new(false));
    let stop = CancellationToken::new();
    let producer = produce(&redis, red.clone(), stop.clone());
    submit(&redis, &p, "gate", ALERT_FIELDS);
    let job = keys(&p).job("gate");
    let progress = keys(&p).progress("gate");
    eventually(WAIT, "the child runs the job", || {
        redis
            .hget(&progress, "results")
            .and_then(|n| n.parse::<u64>().ok())
            .is_some_and(|n| n >= 5)
    })
    .await;
    red.store(true, Ordering::Relaxed);
    eventually(WAIT, "a start", || !alerts(&redis, &p, "gate").is_empty()).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    signal(&child, 9);
    let _ = child.wait();

    // Another worker takes the job over after the lease while the object is still there,
    // then the object leaves.
    let b = CameraWorker::start(&redis.url(), &p, "b", &[("JOB_LEASE_MS", "2000")]);
    eventually(WAIT, "b runs the job", || {
        redis.hget(&job, "worker").as_deref() == Some("b")
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    red.store(false, Ordering::Relaxed);
    eventually(WAIT, "an end", || alerts(&redis, &p, "gate").len() >= 2).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let events = alerts(&redis, &p, "gate");
    assert_eq!(kinds(&events), start_end(), "{events:?}");
    assert_eq!(b.metrics.alerts_written.get(), 1, "b wrote only the end");
    assert_eq!(redis.hget(&job, "attempts").as_deref(), Some("2"));
    stop.cancel();
    producer.join().unwrap();
    b.stop().await;
}
