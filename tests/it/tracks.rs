//! Track ids end to end against a real Redis, with full workers (queue, pipeline, engine):
//! a red and a blue box move across a camera's frames (a Redis frame stream), stand still
//! for a while (the scene gate reuses the output), and move on. Half way the worker is shut
//! down (its job handed back), or killed (SIGKILL, as a real process) so that another
//! worker takes the job over after its lease; another worker goes on with the job. Each
//! box must keep one `track_id` from its second frame to the end, across the still stretch
//! and the change of worker, and the two must differ.
//!
//! The model locates colours by their pixels: each named colour's bounding box, scored as
//! a confident detector would (random weights locate nothing).

use crate::common::frames::{stream_frames, yard};
use crate::common::process::{signal, spawn_test_process};
use crate::common::worker::StreamWorker;
use crate::common::{TestRedis, eventually, unique_prefix};
use free_roam::frame::Frame;
use free_roam::model::testing::stub::StubModel;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(30);
const KEY: &str = "frames:street";
const W: u32 = 240;
const H: u32 = 120;
const SIDE: u32 = 20;
/// The producer's frame interval, and the job's fps to match.
const FRAME_MS: u64 = 100;
const FPS: &str = "10";
/// The boxes move for LEG frames, stand still for STILL frames (long enough for a killed
/// worker's lease to run out), then move again.
const LEG: u64 = 30;
const STILL: u64 = 60;

const COLOURS: [(&str, [u8; 3]); 2] = [("red", [230, 20, 20]), ("blue", [20, 20, 230])];

/// Each colour's bounding box in the frame, as a box model's `detections`.
fn locate(f: &Frame) -> Value {
    let mut detections = Vec::new();
    for (label, rgb) in COLOURS {
        let (mut x1, mut y1, mut x2, mut y2) = (u32::MAX, u32::MAX, 0, 0);
        for (i, p) in f.rgb.chunks_exact(3).enumerate() {
            if (0..3).all(|c| p[c].abs_diff(rgb[c]) < 60) {
                let (x, y) = (i as u32 % f.width, i as u32 / f.width);
                (x1, y1, x2, y2) = (x1.min(x), y1.min(y), x2.max(x + 1), y2.max(y + 1));
            }
        }
        if x1 < x2 {
            detections.push(json!({"label": label, "score": 0.9, "box": [x1, y1, x2, y2]}));
        }
    }
    let detected: Vec<&str> = detections
        .iter()
        .filter_map(|d| d["label"].as_str())
        .collect();
    json!({"detections": detections, "detected": detected, "frame_size": [f.width, f.height]})
}

/// How far the boxes have moved by frame `t`: one pixel a frame, except while they stand.
fn travelled(t: u64) -> u32 {
    (t.min(LEG) + t.saturating_sub(LEG + STILL)) as u32
}

/// Frame `t`: a textured grey street, the red box going right along the top, the blue one
/// going left along the bottom (they pass each other half way).
fn picture(t: u64) -> Vec<u8> {
    let d = travelled(t);
    let red = (20 + d, 20, SIDE, COLOURS[0].1);
    let blue = (W - 40 - d, 70, SIDE, COLOURS[1].1);
    yard(W, H, 120, 60, &[red, blue])
}

/// Pushes frame after frame every FRAME_MS until `stop` fires; `count` is the next frame.
fn produce(
    redis: &TestRedis,
    count: Arc<AtomicU64>,
    stop: CancellationToken,
) -> std::thread::JoinHandle<()> {
    let every = Duration::from_millis(FRAME_MS);
    stream_frames(redis.client(), (KEY, W, H), every, stop, move || {
        picture(count.fetch_add(1, Ordering::SeqCst))
    })
}

/// Leases short enough for a takeover while the boxes stand.
const SETTINGS: &[(&str, &str)] = &[("JOB_LEASE_MS", "2000")];

/// A full worker with the colour-locating model in this process.
struct BoxWorker;

impl BoxWorker {
    fn start(redis_url: &str, prefix: &str, id: &str) -> StreamWorker {
        let model = StubModel::named("colour-boxes")
            .with_input_size(64)
            .answering(|seen| locate(seen.frame));
        StreamWorker::start(redis_url, prefix, id, Box::new(model), SETTINGS)
    }
}

fn keys(prefix: &str) -> free_roam::store::keys::Keys {
    free_roam::store::keys::Keys::new(prefix)
}

/// The job's result entries with an output: (frame, reused_from, label -> track_id).
fn tracked(
    redis: &TestRedis,
    prefix: &str,
    job: &str,
) -> Vec<(u64, Option<u64>, BTreeMap<String, Value>)> {
    redis
        .xrange(&keys(prefix).results(job))
        .into_iter()
        .filter_map(|(_, f)| {
            let output: Value = serde_json::from_str(f.get("output")?).ok()?;
            let ids = output["detections"]
                .as_array()?
                .iter()
                .map(|d| {
                    (
                        d["label"].as_str().unwrap().to_string(),
                        d["track_id"].clone(),
                    )
                })
                .collect();
            let frame = f["frame"].parse().unwrap();
            Some((frame, f.get("reused_from").map(|r| r.parse().unwrap()), ids))
        })
        .collect()
}

/// Starts the producer and submits the job `street`.
fn begin(
    redis: &TestRedis,
    prefix: &str,
) -> (
    Arc<AtomicU64>,
    CancellationToken,
    std::thread::JoinHandle<()>,
) {
    let count = Arc::new(AtomicU64::new(0));
    let stop = CancellationToken::new();
    let producer = produce(redis, count.clone(), stop.clone());
    let jobs = keys(prefix).jobs();
    let _: String = redis.cmd(&[
        "XADD",
        jobs.as_str(),
        "*",
        "stream_ref",
        KEY,
        "fps",
        FPS,
        "job_id",
        "street",
    ]);
    (count, stop, producer)
}

/// Waits until the job is into the still stretch, `reused` outputs reused.
async fn until_reused(redis: &TestRedis, prefix: &str, reused: u64) {
    let progress = keys(prefix).progress("street");
    eventually(WAIT, "outputs reused on the still scene", || {
        redis
            .hget(&progress, "frames_reused")
            .and_then(|n| n.parse::<u64>().ok())
            .is_some_and(|n| n >= reused)
    })
    .await;
}

/// Lets worker `b` run the job until the boxes are well into their second leg.
async fn until_second_leg(redis: &TestRedis, prefix: &str, count: &AtomicU64) {
    let job = keys(prefix).job("street");
    eventually(WAIT, "b runs the job through the second leg", || {
        count.load(Ordering::SeqCst) > LEG + STILL + 25
            && redis.hget(&job, "worker").as_deref() == Some("b")
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
}

/// The job's entries, `changed_at` of them written before the change of worker: each box
/// has one id from its second frame on, the two differ, reused entries repeat their source's
/// ids, and the tracker never started a third track.
fn assert_stable_ids(redis: &TestRedis, prefix: &str, changed_at: usize) {
    let entries = tracked(redis, prefix, "street");
    assert!(
        entries.len() > changed_at + 10,
        "b wrote entries of its own"
    );
    assert!(entries.iter().any(|e| e.1.is_some()), "some outputs reused");
    let last_frame = entries.last().unwrap().0;
    assert!(
        u64::from(travelled(last_frame)) > LEG + 10,
        "the boxes moved on after the change of worker"
    );
    let by_frame: HashMap<u64, &BTreeMap<String, Value>> = entries
        .iter()
        .filter(|e| e.1.is_none())
        .map(|e| (e.0, &e.2))
        .collect();
    let mut ids: HashMap<String, BTreeSet<String>> = HashMap::new();
    for (n, (frame, reused_from, by_label)) in entries.iter().enumerate() {
        assert_eq!(by_label.len(), 2, "frame {frame}: both boxes seen");
        if let Some(from) = reused_from {
            assert_eq!(
                by_label, by_frame[from],
                "frame {frame} repeats frame {from}'s ids"
            );
            continue;
        }
        for (label, id) in by_label {
            if n == 0 {
                assert_eq!(
                    id,
                    &Value::Null,
                    "frame {frame}: confirmed on its second frame"
                );
                continue;
            }
            assert!(id.is_u64(), "frame {frame} {label}: {id}");
            ids.entry(label.clone()).or_default().insert(id.to_string());
        }
    }
    let (red, blue) = (&ids["red"], &ids["blue"]);
    assert_eq!(red.len(), 1, "red keeps one id: {red:?}");
    assert_eq!(blue.len(), 1, "blue keeps one id: {blue:?}");
    assert_ne!(red, blue);
    let progress = keys(prefix).progress("street");
    let state: Value =
        serde_json::from_str(&redis.hget(&progress, "tracker_state").unwrap()).unwrap();
    assert_eq!(
        state["next_id"],
        json!(2),
        "no track started but the two: {state}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn moving_boxes_keep_their_ids_through_a_still_scene_and_a_hand_back() {
    let redis = TestRedis::start();
    let p = unique_prefix();
    let a = BoxWorker::start(&redis.url(), &p, "a");
    let (count, stop, producer) = begin(&redis, &p);
    until_reused(&redis, &p, 10).await;
    a.stop().await;
    let job = keys(&p).job("street");
    assert_eq!(
        redis.hget(&job, "status").as_deref(),
        Some("queued"),
        "handed back"
    );
    assert!(
        redis
            .hget(&keys(&p).progress("street"), "tracker_state")
            .is_some()
    );
    let handed_back_at = tracked(&redis, &p, "street").len();

    let b = BoxWorker::start(&redis.url(), &p, "b");
    until_second_leg(&redis, &p, &count).await;
    stop.cancel();
    producer.join().unwrap();
    b.stop().await;
    assert_stable_ids(&redis, &p, handed_back_at);
}

/// Not a test on its own: the body of a worker process that the test below starts (this
/// test binary, run again with FREE_ROAM_TRACKS_CHILD set), so it can be killed for real.
#[test]
#[ignore]
fn tracks_child_worker() {
    let Ok(url) = std::env::var("FREE_ROAM_TRACKS_CHILD") else {
        return;
    };
    let prefix = std::env::var("FREE_ROAM_TRACKS_PREFIX").unwrap();
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(async move {
            let w = BoxWorker::start(&url, &prefix, "a");
            let _ = w.handle.await;
        });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn moving_boxes_keep_their_ids_when_their_worker_is_killed() {
    let redis = TestRedis::start();
    let p = unique_prefix();
    let mut child = spawn_test_process(
        "tracks::tracks_child_worker",
        &[
            ("FREE_ROAM_TRACKS_CHILD", redis.url()),
            ("FREE_ROAM_TRACKS_PREFIX", p.clone()),
        ],
    );
    let (count, stop, producer) = begin(&redis, &p);
    until_reused(&redis, &p, 3).await;
    signal(&child, 9);
    let _ = child.wait();
    let killed_at = tracked(&redis, &p, "street").len();

    // Another worker takes the job over once its lease runs out, while the boxes stand.
    let b = BoxWorker::start(&redis.url(), &p, "b");
    until_second_leg(&redis, &p, &count).await;
    stop.cancel();
    producer.join().unwrap();
    b.stop().await;
    let job = keys(&p).job("street");
    assert_eq!(redis.hget(&job, "attempts").as_deref(), Some("2"));
    assert_stable_ids(&redis, &p, killed_at);
}
