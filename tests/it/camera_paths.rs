//! Tracks, zones and lines on a real video: ffmpeg's lavfi draws coloured boxes moving on
//! set paths over a grey yard, encodes them as H.264 in a finished HLS playlist, and a full
//! worker (its ffmpeg decoding, the engine, the test-colour model giving each colour's
//! bounding box, the tracker, the zone watch) runs a job on it. Against the paths' ground
//! truth: no id switches (also where the red and the blue box pass each other, overlapping,
//! and where the green one is hidden for 3 frames), every crossing of the line counted
//! once and in its direction, every enter and leave within one sampled frame of where the
//! path says, and the blue box, still in the zone when the video ends, leaving it then.
//!
//! A finished recording keeps every frame, so frame `k` of the job is frame `k` of the
//! video (10 fps, sampled at 10). Its capture times are when the worker read each frame,
//! not the video's time, so loitering (capture time inside) is left to the zones tests,
//! whose frames carry their own times.

use crate::common::worker::StreamWorker;
use crate::common::{TestRedis, eventually, temp_dir, unique_prefix};
use free_roam::model::testing::colour::ColourTestModel;
use free_roam::store::keys::Keys;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(60);
const W: u32 = 320;
const H: u32 = 180;
const SIDE: u32 = 32;
/// Frames of video, at 10 fps.
const FRAMES: u32 = 90;

/// The zone covers x from 96 to 224, top to bottom; the line stands at x = 256, its east
/// (larger x) on the left going down the screen.
const ZONES: &str = r#"{"dock": [[96, 0], [224, 0], [224, 180], [96, 180]]}"#;
const LINES: &str = r#"{"gate": {"points": [[256, 0], [256, 180]], "sides": ["east", "west"]}}"#;
const DOCK: (f64, f64) = (96.0, 224.0);
const GATE: f64 = 256.0;

/// One box's path: its colour, its top edge, and its left edge at frame `k` (`None` while
/// hidden), the same as the ffmpeg expressions that draw it.
struct Walker {
    label: &'static str,
    hex: &'static str,
    y: u32,
    x: fn(u32) -> Option<u32>,
    /// The overlay's x expression and, when it hides for a while, its `enable` expression.
    expr: &'static str,
    enable: Option<&'static str>,
}

/// Red walks east through the zone and across the line, then stops; blue walks west
/// across the line into the zone and stops there, passing red on the way (their boxes
/// overlap: red is drawn over blue); green walks east slower, hidden for frames 30 to 32.
const WALKERS: [Walker; 3] = [
    Walker {
        label: "blue",
        hex: "0x0000FF",
        y: 60,
        x: |k| Some((290 - 4 * k.min(38)).max(140)),
        expr: "max(290-40*t,140)",
        enable: None,
    },
    Walker {
        label: "red",
        hex: "0xFF0000",
        y: 40,
        x: |k| Some((10 + 4 * k).min(280)),
        expr: "min(10+40*t,280)",
        enable: None,
    },
    Walker {
        label: "green",
        hex: "0x00FF00",
        y: 120,
        x: |k| (!(30..=32).contains(&k)).then_some(12 + 3 * k),
        expr: "12+30*t",
        enable: Some("not(between(t,2.95,3.25))"),
    },
];

/// Writes the video as a finished HLS playlist of H.264 in `dir`.
fn make_video(dir: &Path) -> PathBuf {
    let seconds = (FRAMES / 10).to_string();
    let mut cmd = Command::new("ffmpeg");
    cmd.args(["-hide_banner", "-loglevel", "error", "-y"]);
    cmd.args(["-f", "lavfi", "-i"])
        .arg(format!("color=c=0x808080:s={W}x{H}:r=10:d={seconds}"));
    for w in &WALKERS {
        cmd.args(["-f", "lavfi", "-i"]).arg(format!(
            "color=c={}:s={SIDE}x{SIDE}:r=10:d={seconds}",
            w.hex
        ));
    }
    let mut graph = String::new();
    let mut last = "0".to_string();
    for (i, w) in WALKERS.iter().enumerate() {
        let enable = w
            .enable
            .map(|e| format!(":enable='{e}'"))
            .unwrap_or_default();
        graph += &format!(
            "[{last}][{}]overlay=x='{}':y={}{enable}[v{i}];",
            i + 1,
            w.expr,
            w.y
        );
        last = format!("v{i}");
    }
    graph.pop();
    let playlist = dir.join("paths.m3u8");
    let status = cmd
        .args(["-filter_complex", &graph, "-map", &format!("[{last}]")])
        .args(["-frames:v", &FRAMES.to_string()])
        .args(["-c:v", "libx264", "-preset", "ultrafast", "-qp", "10"])
        .args(["-pix_fmt", "yuv420p", "-g", "10"])
        .args(["-f", "hls", "-hls_time", "2", "-hls_list_size", "0"])
        .args(["-hls_playlist_type", "vod"])
        .arg(&playlist)
        .status()
        .expect("ffmpeg must be installed");
    assert!(status.success(), "ffmpeg could not make the video");
    playlist
}

/// What the paths say happens, as (kind, label, place, frame, direction or reason).
type Event = (String, String, String, u32, String);

/// The ground truth: a box's anchor (bottom centre) against the zone and the line, frame
/// by frame, with the watch's rules (a side of the line counts beyond a tenth of the box's
/// height).
fn ground_truth(last_frame: u32) -> Vec<Event> {
    let margin = 0.1 * f64::from(SIDE);
    let mut events = Vec::new();
    for w in &WALKERS {
        let mut inside = false;
        let mut side = 0i8;
        let mut seen = 0;
        for k in 0..=last_frame {
            let Some(x) = (w.x)(k) else { continue };
            seen = k;
            let ax = f64::from(x) + f64::from(SIDE) / 2.0;
            let now_inside = ax > DOCK.0 && ax < DOCK.1;
            if now_inside != inside {
                let (kind, why) = if now_inside {
                    ("enter", "")
                } else {
                    ("leave", "left")
                };
                events.push(event(kind, w.label, "dock", k, why));
                inside = now_inside;
            }
            let now_side = if ax > GATE + margin {
                1
            } else if ax < GATE - margin {
                -1
            } else {
                0
            };
            if now_side != 0 && side != 0 && now_side != side {
                let to = if now_side > 0 { "east" } else { "west" };
                events.push(event("cross", w.label, "gate", k, to));
            }
            if now_side != 0 {
                side = now_side;
            }
        }
        if inside {
            events.push(event("leave", w.label, "dock", seen, "job_completed"));
        }
    }
    events.sort_by(|a, b| (&a.1, &a.0, a.3).cmp(&(&b.1, &b.0, b.3)));
    events
}

fn event(kind: &str, label: &str, place: &str, frame: u32, what: &str) -> Event {
    (kind.into(), label.into(), place.into(), frame, what.into())
}

/// The job's zone and line events as the ground truth's tuples, with their track ids.
fn job_events(redis: &TestRedis, keys: &Keys) -> (Vec<Event>, Vec<(String, u64)>) {
    let mut events = Vec::new();
    let mut tracks = Vec::new();
    for (_, f) in redis.xrange(&keys.alerts()) {
        if !["enter", "leave", "cross"].contains(&f["kind"].as_str()) {
            continue;
        }
        let place = f.get("zone").or_else(|| f.get("line")).unwrap();
        let what = f
            .get("direction")
            .or_else(|| f.get("reason"))
            .cloned()
            .unwrap_or_default();
        let frame = f["frame"].parse().unwrap();
        events.push(event(&f["kind"], &f["label"], place, frame, &what));
        tracks.push((f["label"].clone(), f["track_id"].parse().unwrap()));
    }
    events.sort_by(|a, b| (&a.1, &a.0, a.3).cmp(&(&b.1, &b.0, b.3)));
    (events, tracks)
}

/// Each label's track ids over the job's results, and the frames where its box had none.
fn ids_by_label(
    results: &[HashMap<String, String>],
) -> BTreeMap<String, (BTreeSet<u64>, Vec<u64>)> {
    let mut by_label: BTreeMap<String, (BTreeSet<u64>, Vec<u64>)> = BTreeMap::new();
    for r in results {
        let Some(output) = r.get("output") else {
            continue;
        };
        let output: serde_json::Value = serde_json::from_str(output).unwrap();
        let frame: u64 = r["frame"].parse().unwrap();
        for d in output["detections"].as_array().into_iter().flatten() {
            let label = d["label"].as_str().unwrap().to_string();
            let entry = by_label.entry(label).or_default();
            match d["track_id"].as_u64() {
                Some(id) => {
                    entry.0.insert(id);
                }
                None => entry.1.push(frame),
            }
        }
    }
    by_label
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn boxes_on_set_paths_in_h264_keep_their_ids_and_make_each_event_once() {
    let dir = temp_dir("paths");
    let playlist = make_video(&dir);
    let redis = TestRedis::start();
    let p = unique_prefix();
    let keys = Keys::new(&p);
    // An input side of 160 keeps the frames at their 320 px: the boxes in source pixels.
    let model = Box::new(ColourTestModel::new(160));
    let worker = StreamWorker::start(
        &redis.url(),
        &p,
        "a",
        model,
        &[("ALLOW_FILE_SOURCES", "true")],
    );
    let _: String = redis.cmd(&[
        "XADD",
        keys.jobs().as_str(),
        "*",
        "stream_ref",
        playlist.to_str().unwrap(),
        "source",
        "hls",
        "fps",
        "10",
        "job_id",
        "paths",
        "prompt",
        "red, blue, green",
        "zones",
        ZONES,
        "lines",
        LINES,
    ]);
    eventually(WAIT, "the job completes", || {
        redis.hget(&keys.job("paths"), "status").as_deref() == Some("completed")
    })
    .await;
    worker.stop().await;

    let results: Vec<HashMap<String, String>> = redis
        .xrange(&keys.results("paths"))
        .into_iter()
        .map(|(_, f)| f)
        .filter(|f| f.get("kind").map(String::as_str) == Some("result"))
        .collect();
    let frames: Vec<u64> = results
        .iter()
        .map(|r| r["frame"].parse().unwrap())
        .collect();
    assert_eq!(
        frames,
        (0..u64::from(FRAMES)).collect::<Vec<_>>(),
        "every frame of the recording, in order"
    );

    // No id switches: one id per box, from its second frame on (the first makes the track).
    let ids = ids_by_label(&results);
    let mut all: BTreeSet<u64> = BTreeSet::new();
    for w in &WALKERS {
        let (set, untracked) = &ids[w.label];
        assert_eq!(set.len(), 1, "{}: one track throughout: {set:?}", w.label);
        assert_eq!(
            untracked,
            &[0],
            "{}: only its first frame has no id",
            w.label
        );
        all.extend(set);
    }
    assert_eq!(all.len(), WALKERS.len(), "a track each: {ids:?}");

    // Every event once, where the paths say, within one sampled frame.
    let truth = ground_truth(FRAMES - 1);
    let (got, tracks) = job_events(&redis, &keys);
    let shape = |e: &[Event]| -> Vec<(String, String, String, String)> {
        e.iter()
            .map(|(k, l, p, _, w)| (k.clone(), l.clone(), p.clone(), w.clone()))
            .collect()
    };
    assert_eq!(
        shape(&got),
        shape(&truth),
        "\n got: {got:?}\nwant: {truth:?}"
    );
    for (g, t) in got.iter().zip(&truth) {
        assert!(
            g.3.abs_diff(t.3) <= 1,
            "{g:?} is more than a frame from {t:?}"
        );
    }
    for (label, track) in &tracks {
        assert!(
            ids[label].0.contains(track),
            "{label}'s events name its track"
        );
    }
    let counts = redis.hgetall(&keys.progress("paths"));
    for (field, want) in [
        ("zone:dock:in", "0"),
        ("zone:dock:entered", "3"),
        ("line:gate:east", "2"),
        ("line:gate:west", "1"),
    ] {
        assert_eq!(counts.get(field).map(String::as_str), Some(want), "{field}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
