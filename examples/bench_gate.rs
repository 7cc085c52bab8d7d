//! Times the scene gate on 720p frames: building the thumbnail and comparing it with the
//! reference, per frame, for a still scene (the common case: the frame is reused) and for a
//! scene with a moving object (the frame goes to the model and becomes the reference).
//!
//! `scripts/bench gate` (which builds it optimised); lines look like
//! `gate 1280x720 still: median=... ms p99=... ms per frame`.

use bytes::Bytes;
use free_roam::frame::Frame;
use free_roam::gate::{Decision, GateSettings, SceneGate};
use std::time::Instant;

const W: u32 = 1280;
const H: u32 = 720;

fn frame(index: u64, object_x: Option<u32>) -> Frame {
    let mut rgb = Vec::with_capacity((W * H * 3) as usize);
    for y in 0..H {
        for x in 0..W {
            let inside =
                object_x.is_some_and(|ox| (ox..ox + 64).contains(&x) && (300..364).contains(&y));
            if inside {
                rgb.extend_from_slice(&[230, 30, 30]);
            } else {
                let v = ((x / 8 + y / 8 + (index as u32 % 3)) % 200) as u8 + 20;
                rgb.extend_from_slice(&[v, v.wrapping_add(10), v / 2]);
            }
        }
    }
    let mut f = Frame::new(W, H, Bytes::from(rgb)).unwrap();
    f.index = index;
    f.capture_ms = index as i64 * 500;
    f
}

fn report(name: &str, mut ms: Vec<f64>) {
    ms.sort_by(|a, b| a.total_cmp(b));
    let median = ms[ms.len() / 2];
    let p99 = ms[(ms.len() * 99 / 100).min(ms.len() - 1)];
    println!(
        "gate {W}x{H} {name}: median={median:.3} ms p99={p99:.3} ms per frame ({} frames)",
        ms.len()
    );
}

fn main() {
    let iters: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(400);
    let settings = GateSettings {
        min_area: 0.002,
        max_reuse_ms: i64::MAX,
    };
    let still: Vec<Frame> = (0..8).map(|i| frame(i, None)).collect();
    let moving: Vec<Frame> = (0..8)
        .map(|i| frame(i, Some(100 + i as u32 * 120)))
        .collect();

    let mut gate = SceneGate::new(settings);
    assert!(matches!(gate.decide(&still[0], None), Decision::Infer(_)));
    gate.answered(0, None);
    let mut times = Vec::with_capacity(iters);
    for i in 0..iters {
        let mut f = still[i % still.len()].clone();
        f.index = i as u64 + 1;
        let t = Instant::now();
        let d = gate.decide(&f, None);
        times.push(t.elapsed().as_secs_f64() * 1e3);
        assert!(
            matches!(d, Decision::Reuse { .. }),
            "a still scene is reused"
        );
    }
    report("still (reused)", times);

    let mut gate = SceneGate::new(settings);
    let mut times = Vec::with_capacity(iters);
    for i in 0..iters {
        let mut f = moving[i % moving.len()].clone();
        f.index = i as u64;
        let t = Instant::now();
        let d = gate.decide(&f, None);
        gate.answered(f.index, None);
        times.push(t.elapsed().as_secs_f64() * 1e3);
        assert!(
            matches!(d, Decision::Infer(_)),
            "a moving object runs the model"
        );
    }
    report("moving object (to the model)", times);
}
