//! Event pictures and the latest frame end to end against a real Redis, with a full worker
//! (queue, pipeline, engine) running the test-colour model on a camera's frames (a Redis
//! frame stream): a red box walks out of a zone and across a line. The alert `start` and
//! the zone `enter` carry a `snapshot` whose key holds a JPEG of the frame with the box
//! drawn; the per-minute cap leaves the later events without one; every picture expires;
//! `free-roam snapshot` saves the job's latest frame and `free-roam alerts --save` each
//! event's picture. The cap holds for a job handed back and taken over within the minute.

use crate::common::frames::{stream_frames, yard};
use crate::common::worker::StreamWorker;
use crate::common::{TestRedis, eventually, unique_prefix};
use free_roam::model::testing::colour::ColourTestModel;
use free_roam::snapshot::box_colour;
use free_roam::store::keys::Keys;
use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(30);
const KEY: &str = "frames:gate";
const W: u32 = 240;
const H: u32 = 120;
const SIDE: u32 = 20;
/// The test-colour model's input side.
const INPUT: u32 = 64;
/// Pictures per minute: the first two events get one, the others none.
const CAP: usize = 2;

/// The zone covers the left 40% of the yard, the line stands at 75% top to bottom.
const ZONES: &str = r#"{"yard": [[0, 0], [0.4, 0], [0.4, 1], [0, 1]]}"#;
const LINES: &str = r#"{"gate": {"points": [[0.75, 0], [0.75, 1]], "sides": ["east", "west"]}}"#;

/// A grey yard with the red box at `x` (its bottom at y = 100).
fn picture(x: u32) -> Vec<u8> {
    yard(W, H, 120, 60, &[(x, 80, SIDE, [230, 20, 20])])
}

/// Pushes a frame every 100 ms until `stop`, the box walking 4 pixels a frame from x = 10
/// to x = 210.
fn produce(redis: &TestRedis, stop: CancellationToken) -> std::thread::JoinHandle<()> {
    let mut x = 10;
    let every = Duration::from_millis(100);
    stream_frames(redis.client(), (KEY, W, H), every, stop, move || {
        let frame = picture(x);
        x = (x + 4).min(210);
        frame
    })
}

/// A full worker with the test-colour model, its pictures capped at CAP a minute and its
/// latest frame refreshed every 200 ms.
fn start_worker(redis: &TestRedis, prefix: &str, id: &str) -> StreamWorker {
    let cap = CAP.to_string();
    let overrides = [
        ("SNAPSHOTS_PER_MIN", cap.as_str()),
        ("SNAPSHOT_INTERVAL_MS", "200"),
    ];
    let model = Box::new(ColourTestModel::new(INPUT));
    StreamWorker::start(&redis.url(), prefix, id, model, &overrides)
}

fn get_bytes(redis: &TestRedis, key: &str) -> Option<Vec<u8>> {
    let mut con = redis.client().get_connection().unwrap();
    redis::cmd("GET").arg(key).query(&mut con).unwrap()
}

/// The output of frame `frame` in the job's results.
fn output_of(redis: &TestRedis, keys: &Keys, frame: &str) -> serde_json::Value {
    let entry = redis
        .xrange(&keys.results("gate"))
        .into_iter()
        .map(|(_, f)| f)
        .find(|f| f.get("frame").map(String::as_str) == Some(frame))
        .expect("the event's frame has a result");
    serde_json::from_str(&entry["output"]).unwrap()
}

/// A pixel halfway down the left edge of the output's first box (inside its outline), in a
/// picture of `scale` picture pixels per source pixel; and the box's track.
fn left_edge(output: &serde_json::Value, scale: f64) -> (u32, u32, u64) {
    let d = &output["detections"][0];
    let b: Vec<f64> = d["box"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let x = (b[0] * scale).round() as u32 + 1;
    let y = ((b[1] + (b[3] - b[1]) / 2.0) * scale).round() as u32;
    (x, y, d["track_id"].as_u64().unwrap())
}

/// Submits the job `gate`: the yard's zone and line on the frames, looking for red.
fn submit(redis: &TestRedis, keys: &Keys) {
    let _: String = redis.cmd(&[
        "XADD",
        keys.jobs().as_str(),
        "*",
        "stream_ref",
        KEY,
        "fps",
        "10",
        "job_id",
        "gate",
        "prompt",
        "red",
        "zones",
        ZONES,
        "lines",
        LINES,
        "zone_units",
        "normalised",
    ]);
}

/// The job's events that may carry a picture, in order, each as its fields.
fn picture_events(redis: &TestRedis, keys: &Keys) -> Vec<HashMap<String, String>> {
    redis
        .xrange(&keys.alerts())
        .into_iter()
        .map(|(_, f)| f)
        .filter(|f| ["start", "enter", "leave", "cross", "loiter"].contains(&f["kind"].as_str()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn events_carry_pictures_of_their_frame_within_the_cap_and_the_latest_is_kept() {
    let redis = TestRedis::start();
    let p = unique_prefix();
    let keys = Keys::new(&p);
    let worker = start_worker(&redis, &p, "a");
    let stop = CancellationToken::new();
    let producer = produce(&redis, stop.clone());
    submit(&redis, &keys);
    let progress = keys.progress("gate");
    eventually(WAIT, "the box leaves the zone and crosses the line", || {
        redis.hget(&progress, "line:gate:east").as_deref() == Some("1")
    })
    .await;

    // The latest frame, through the real binary, while the job runs.
    let dir = std::env::temp_dir().join(format!("fr-snapshots-{p}"));
    std::fs::create_dir_all(&dir).unwrap();
    let latest = dir.join("latest.jpg");
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_free-roam"))
            .args(args)
            .env_clear()
            .env("REDIS_URL", redis.url())
            .env("KEY_PREFIX", &p)
            .output()
            .expect("the free-roam binary runs")
    };
    let o = run(&["snapshot", "gate", "-o", latest.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // Frames from a Redis stream come at their own size (W x H fits within 720p).
    let frame_size = (W, H);
    let latest_picture = image::load_from_memory(&std::fs::read(&latest).unwrap()).unwrap();
    assert_eq!(
        (latest_picture.width(), latest_picture.height()),
        frame_size
    );
    let ttl: i64 = redis.cmd(&["TTL", &keys.latest_snapshot("gate")]);
    assert!(ttl > 0, "the latest frame expires: {ttl}");

    stop.cancel();
    producer.join().unwrap();
    worker.stop().await;

    // The events a picture may go with, in order: the first CAP have one, the rest none.
    let events = picture_events(&redis, &keys);
    assert!(events.len() > CAP, "more events than the cap: {events:#?}");
    let mut kinds: Vec<&str> = events[..CAP].iter().map(|e| e["kind"].as_str()).collect();
    kinds.sort();
    assert_eq!(kinds, ["enter", "start"], "{events:#?}");
    for e in &events[CAP..] {
        assert!(!e.contains_key("snapshot"), "over the cap: {e:?}");
    }
    let scale = f64::from(frame_size.0) / f64::from(W);
    for e in &events[..CAP] {
        let key = &e["snapshot"];
        let name = free_roam::store::keys::snapshot_name(&e["kind"], &e["alert_id"]);
        assert_eq!(key, &keys.snapshot("gate", &name));
        let jpeg = get_bytes(&redis, key).expect("the picture is stored");
        assert!(jpeg.len() < 100 * 1024);
        let ttl: i64 = redis.cmd(&["TTL", key]);
        assert!(
            ttl > 0 && ttl <= 86_400,
            "the picture expires with the results: {ttl}"
        );
        let picture = image::load_from_memory(&jpeg).unwrap().to_rgb8();
        assert_eq!(picture.dimensions(), frame_size);
        if e["kind"] == "enter" {
            let (x, y, track) = left_edge(&output_of(&redis, &keys, &e["frame"]), scale);
            let want = box_colour(Some(track));
            let got = *picture.get_pixel(x, y);
            let near = got.0.iter().zip(want.0).all(|(a, b)| a.abs_diff(b) <= 80);
            assert!(
                near,
                "the box's edge at ({x}, {y}) is {got:?}, not {want:?}"
            );
        }
    }

    // Each event's picture, saved by the real binary under the event's name.
    let saved = dir.join("saved");
    let o = run(&["alerts", "--job", "gate", "--save", saved.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let files = std::fs::read_dir(&saved).unwrap().count();
    assert_eq!(files, CAP);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_picture_cap_holds_across_a_hand_back() {
    let redis = TestRedis::start();
    let p = unique_prefix();
    let keys = Keys::new(&p);
    let worker = start_worker(&redis, &p, "a");
    let stop = CancellationToken::new();
    let producer = produce(&redis, stop.clone());
    submit(&redis, &keys);
    let progress = keys.progress("gate");
    // The first worker spends the minute's pictures on the start and the enter, saving
    // the cap's window, then hands the job back; a second one goes on within the minute.
    eventually(WAIT, "the cap is spent", || {
        let window = redis.hget(&progress, "snapshot_cap").unwrap_or_default();
        serde_json::from_str::<Vec<i64>>(&window).is_ok_and(|w| w.len() == CAP)
    })
    .await;
    worker.stop().await;
    assert_eq!(
        redis.hget(&keys.job("gate"), "status").as_deref(),
        Some("queued"),
        "handed back"
    );
    let worker = start_worker(&redis, &p, "b");
    eventually(WAIT, "the box crosses the line", || {
        redis.hget(&progress, "line:gate:east").as_deref() == Some("1")
    })
    .await;
    stop.cancel();
    producer.join().unwrap();
    worker.stop().await;
    let events = picture_events(&redis, &keys);
    let pictured: Vec<&str> = events
        .iter()
        .filter(|e| e.contains_key("snapshot"))
        .map(|e| e["kind"].as_str())
        .collect();
    assert_eq!(pictured.len(), CAP, "{events:#?}");
    assert!(
        events.iter().any(|e| e["kind"] == "cross"),
        "the second worker made events: {events:#?}"
    );
}
