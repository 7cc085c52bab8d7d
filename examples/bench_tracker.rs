//! Times a job's tracker per frame at 10 and 100 boxes: the ByteTrack step alone, the step
//! as the pipeline runs it on a model output (reading the `detections`, writing each
//! `track_id`), serialising the state the pipeline saves with each write, and the zones and
//! lines on the tracked output (4 zones and 4 lines over the frame: reading the anchors,
//! then enter, leave, cross and loiter).
//!
//! The objects walk on a 1920x1080 frame with box jitter and score noise, some crossing,
//! a few missed or weak on each frame, so both matching stages and the lost tracks work.
//!
//! Built optimised (the project's crate at opt-level 3, dependencies as the dev profile
//! builds them):
//!
//! ```sh
//! cargo build -q -p free-roam --example bench_tracker \
//!   --config 'profile.dev.package.free-roam.opt-level=3'
//! target/debug/examples/bench_tracker [FRAMES]
//! ```
//!
//! Lines look like `tracker 100 boxes step: cpu median=... ms p99=... ms per frame`. The
//! CPU time is the thread's own, which stays true on a busy machine.

use free_roam::tracker::output::track_output;
use free_roam::tracker::{ByteTrack, Detection, TrackerSettings, TrackerState};
use free_roam::zones::output::sightings;
use free_roam::zones::watch::{WatchState, ZoneWatch};
use free_roam::zones::{Places, Units, parse_lines, parse_zones};
use serde_json::{Value, json};

/// A small deterministic generator (the example needs no randomness crate).
struct Lcg(u64);

impl Lcg {
    fn unit(&mut self) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }

    fn noise(&mut self, scale: f64) -> f64 {
        (self.unit() - 0.5) * 2.0 * scale
    }
}

/// `n` objects on a grid, each walking its own way; the boxes of frame `f`.
fn scene(n: usize, frames: usize, seed: u64) -> Vec<Vec<Detection>> {
    let mut rng = Lcg(seed);
    let cols = (n as f64).sqrt().ceil() as usize;
    let objects: Vec<(f64, f64, f64, f64)> = (0..n)
        .map(|i| {
            let (cx, cy) = ((i % cols) as f64, (i / cols) as f64);
            let (x, y) = (
                40.0 + cx * 1800.0 / cols as f64,
                40.0 + cy * 1000.0 / cols as f64,
            );
            (x, y, rng.noise(4.0), rng.noise(3.0))
        })
        .collect();
    (0..frames)
        .map(|f| {
            let mut dets = Vec::with_capacity(n);
            for &(x, y, vx, vy) in &objects {
                if rng.unit() < 0.05 {
                    continue; // missed on this frame
                }
                let (x, y) = (x + vx * f as f64, y + vy * f as f64);
                let corners = [x, y, x + 40.0, y + 90.0].map(|c| c + rng.noise(2.0));
                let score = if rng.unit() < 0.1 {
                    0.3
                } else {
                    0.75 + rng.noise(0.2)
                };
                dets.push(Detection {
                    corners,
                    score: Some(score),
                });
            }
            dets
        })
        .collect()
}

fn as_output(dets: &[Detection]) -> Value {
    let list: Vec<Value> = dets
        .iter()
        .map(|d| json!({"label": "person", "score": d.score, "box": d.corners}))
        .collect();
    json!({ "detections": list, "detected": ["person"] })
}

/// This thread's CPU time, in milliseconds.
fn cpu_ms() -> f64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    t.tv_sec as f64 * 1e3 + t.tv_nsec as f64 / 1e6
}

/// 4 zones in the frame's quarters and 4 lines across it, in source pixels.
fn places() -> Places {
    let zones = json!({
        "nw": [[0, 0], [960, 0], [960, 540], [0, 540]],
        "ne": [[960, 0], [1920, 0], [1920, 540], [960, 540]],
        "sw": {"points": [[0, 540], [960, 540], [960, 1080], [0, 1080]], "loiter_s": 2},
        "se": {"points": [[960, 540], [1920, 540], [1920, 1080], [960, 1080]], "labels": ["person"]}
    });
    let lines = json!({
        "v1": [[480, 0], [480, 1080]],
        "v2": [[1440, 0], [1440, 1080]],
        "h1": [[0, 270], [1920, 270]],
        "h2": [[0, 810], [1920, 810]]
    });
    Places {
        units: Units::Pixels,
        zones: parse_zones(&zones.to_string(), Units::Pixels).unwrap(),
        lines: parse_lines(&lines.to_string(), Units::Pixels).unwrap(),
    }
}

fn report(n: usize, what: &str, mut ms: Vec<f64>) {
    ms.sort_by(|a, b| a.total_cmp(b));
    let (median, p99) = (
        ms[ms.len() / 2],
        ms[(ms.len() * 99 / 100).min(ms.len() - 1)],
    );
    println!(
        "tracker {n} boxes {what}: cpu median={median:.4} ms p99={p99:.4} ms per frame ({} frames)",
        ms.len()
    );
}

fn main() {
    let frames: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(2000);
    for n in [10, 100] {
        let boxes = scene(n, frames, 7 + n as u64);
        let outputs: Vec<Value> = boxes.iter().map(|d| as_output(d)).collect();
        let settings = TrackerSettings::at_fps(10.0);

        let mut tracker = ByteTrack::new(settings, TrackerState::default());
        let mut step = Vec::with_capacity(frames);
        let mut save = Vec::with_capacity(frames);
        let mut ids = 0usize;
        for dets in &boxes {
            let t = cpu_ms();
            ids += tracker.update(dets).iter().flatten().count();
            step.push(cpu_ms() - t);
            let t = cpu_ms();
            let state = serde_json::to_string(tracker.state()).unwrap();
            save.push(cpu_ms() - t);
            std::hint::black_box(state);
        }

        let mut tracker = ByteTrack::new(settings, TrackerState::default());
        let mut watch = ZoneWatch::new(places(), 30, WatchState::default());
        let mut on_output = Vec::with_capacity(frames);
        let mut zones = Vec::with_capacity(frames);
        let mut events = 0usize;
        for (i, output) in outputs.iter().enumerate() {
            let mut output = output.clone();
            let t = cpu_ms();
            track_output(&mut tracker, &mut output);
            on_output.push(cpu_ms() - t);
            let t = cpu_ms();
            let seen = sightings(&output, Units::Pixels, (1920, 1080));
            events += watch.observe(i as u64, i as i64 * 100, &seen).len();
            zones.push(cpu_ms() - t);
        }
        report(n, "step", step);
        report(n, "on a model output", on_output);
        report(n, "state to JSON", save);
        report(n, "zones and lines", zones);
        println!("tracker {n} boxes: {events} zone and line events");
        let state_bytes = serde_json::to_string(tracker.state()).unwrap().len();
        println!(
            "tracker {n} boxes: {:.1}% of boxes with an id, saved state {state_bytes} bytes",
            100.0 * ids as f64 / boxes.iter().map(Vec::len).sum::<usize>() as f64
        );
    }
}
