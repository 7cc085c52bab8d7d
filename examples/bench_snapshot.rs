//! Times an event's picture: drawing 10 tracked boxes, a zone and a line on a frame (the
//! copy, and the scale to 720p for a larger frame, included), then the JPEG kept under
//! `snapshot::MAX_BYTES` (the quality stepping down, then the scale, as a picture needs);
//! and says each picture's size, quality and sides.
//!
//! The frames are ffmpeg's (`lavfi` test sources, with and without its noise filter), and
//! a full-frame noisy gradient made here, the worst case for a JPEG.
//!
//! Built optimised (the project's crate at opt-level 3, dependencies as the dev profile
//! builds them):
//!
//! ```sh
//! cargo build -q -p free-roam --example bench_snapshot \
//!   --config 'profile.dev.package.free-roam.opt-level=3'
//! target/debug/examples/bench_snapshot [RUNS]
//! ```
//!
//! Lines look like `snapshot 720p testsrc2: draw median=... ms, encode median=... ms,
//! 65 KB at quality 60, 1280x720 (65 KB at quality 60 and full size)`. The CPU time is
//! the thread's own.

use bytes::Bytes;
use free_roam::frame::Frame;
use free_roam::snapshot::{MAX_BYTES, QUALITIES, annotate, encode_jpeg, encode_within};
use free_roam::zones::{Places, Units, parse_lines, parse_zones};
use serde_json::{Value, json};
use std::process::Command;

/// One `w` x `h` RGB frame of an ffmpeg `lavfi` source, through the filters `vf`.
fn lavfi(source: &str, w: u32, h: u32, vf: Option<&str>) -> Frame {
    let input = format!("{source}=size={w}x{h}:rate=1");
    let mut args = vec!["-v", "error", "-f", "lavfi", "-i", input.as_str()];
    if let Some(vf) = vf {
        args.extend(["-vf", vf]);
    }
    args.extend(["-frames:v", "1", "-f", "rawvideo", "-pix_fmt", "rgb24", "-"]);
    let out = Command::new("ffmpeg")
        .args(&args)
        .output()
        .expect("ffmpeg runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Frame::new(w, h, Bytes::from(out.stdout)).expect("a whole frame")
}

/// A full-frame gradient whose every byte is noisy: as hard as a picture gets.
fn noisy_gradient(w: u32, h: u32) -> Frame {
    let rgb: Vec<u8> = (0..w * h * 3).map(|i| (i * 7 % 251) as u8).collect();
    Frame::new(w, h, Bytes::from(rgb)).expect("a whole frame")
}

/// 10 tracked boxes spread over a `w` x `h` frame.
fn output(w: u32, h: u32) -> Value {
    let (w, h) = (f64::from(w), f64::from(h));
    let boxes: Vec<Value> = (0..10)
        .map(|i| {
            let x = w * (0.05 + 0.09 * f64::from(i));
            let y = h * (0.2 + 0.05 * f64::from(i % 4));
            json!({"label": "person", "score": 0.8, "box": [x, y, x + w * 0.06, y + h * 0.3], "track_id": i})
        })
        .collect();
    json!({ "detections": boxes })
}

fn places() -> Places {
    Places {
        units: Units::Normalised,
        zones: parse_zones(
            r#"{"dock": [[0.1,0.5],[0.6,0.5],[0.6,0.95],[0.1,0.95]]}"#,
            Units::Normalised,
        )
        .unwrap(),
        lines: parse_lines(r#"{"gate": [[0.75,0.05],[0.75,0.95]]}"#, Units::Normalised).unwrap(),
    }
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

fn median(mut ms: Vec<f64>) -> f64 {
    ms.sort_by(|a, b| a.total_cmp(b));
    ms[ms.len() / 2]
}

fn main() {
    let runs: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let noise = Some("noise=alls=20:allf=t");
    let frames = [
        ("720p testsrc2", lavfi("testsrc2", 1280, 720, None)),
        ("720p mandelbrot", lavfi("mandelbrot", 1280, 720, None)),
        (
            "720p testsrc2 with noise",
            lavfi("testsrc2", 1280, 720, noise),
        ),
        ("1080p testsrc2", lavfi("testsrc2", 1920, 1080, None)),
        (
            "1080p testsrc2 with noise",
            lavfi("testsrc2", 1920, 1080, noise),
        ),
        ("1080p noisy gradient", noisy_gradient(1920, 1080)),
    ];
    let places = places();
    for (name, frame) in &frames {
        let output = output(frame.width, frame.height);
        let (mut draw, mut encode) = (Vec::new(), Vec::new());
        let mut jpeg = Vec::new();
        for _ in 0..runs {
            let t = cpu_ms();
            let picture = annotate(frame, Some(&output), &places).unwrap();
            draw.push(cpu_ms() - t);
            let sides = picture.dimensions();
            let t = cpu_ms();
            jpeg = encode_within(picture, MAX_BYTES).unwrap();
            encode.push(cpu_ms() - t);
            std::hint::black_box(sides);
        }
        let back = image::load_from_memory(&jpeg).unwrap();
        // The quality it was kept at: the first that fits, else the last (scaled down).
        let drawn = annotate(frame, Some(&output), &places).unwrap();
        let quality = QUALITIES
            .iter()
            .find(|&&q| encode_jpeg(&drawn, q).unwrap().len() <= MAX_BYTES)
            .unwrap_or(&QUALITIES[QUALITIES.len() - 1]);
        let first = encode_jpeg(&drawn, QUALITIES[0]).unwrap().len();
        println!(
            "snapshot {name}: draw median={:.2} ms, encode median={:.2} ms, {} KB at quality {quality}, {}x{} ({} KB at quality {} and full size)",
            median(draw),
            median(encode),
            jpeg.len().div_ceil(1000),
            back.width(),
            back.height(),
            first.div_ceil(1000),
            QUALITIES[0],
        );
    }
}
