//! Times the scene gate on 720p frames: building the thumbnail and comparing it with the
//! reference, per frame, for a still scene (the common case: the frame is reused) and for a
//! scene with a moving object (the frame goes to the model and becomes the reference).
//!
//! The CPU time is the thread's own (what the gate costs the worker), which stays true on a
//! busy machine where wall time also counts waiting for a core.
//!
//! `scripts/bench gate` (which builds it optimised); lines look like
//! `gate 1280x720 still: cpu median=... ms p99=... ms; wall median=... ms per frame`. The CPU
//! time is the thread's own (what the gate costs the worker), which stays true on a busy
//! machine where wall time also counts waiting for a core.

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
                rgb.extend_from_slice(&[10, 10, 10]);
            } else {
                // A textured scene plus one level of per-frame noise.
                let v = ((x / 8 + y / 8) % 200) as u8 + 20 + ((x + y + index as u32) & 1) as u8;
                rgb.extend_from_slice(&[v, v.wrapping_add(10), v / 2]);
            }
        }
    }
    let mut f = Frame::new(W, H, Bytes::from(rgb)).unwrap();
    f.index = index;
    f.capture_ms = index as i64 * 500;
    f
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

/// Times `f`: (thread CPU ms, wall ms).
fn timed(f: impl FnOnce()) -> (f64, f64) {
    let (cpu, wall) = (cpu_ms(), Instant::now());
    f();
    (cpu_ms() - cpu, wall.elapsed().as_secs_f64() * 1e3)
}

fn report(name: &str, times: Vec<(f64, f64)>) {
    let pick = |wall: bool| {
        let mut v: Vec<f64> = times.iter().map(|t| if wall { t.1 } else { t.0 }).collect();
        v.sort_by(|a, b| a.total_cmp(b));
        (v[v.len() / 2], v[(v.len() * 99 / 100).min(v.len() - 1)])
    };
    let ((cpu, cpu99), (wall, _)) = (pick(false), pick(true));
    println!(
        "gate {W}x{H} {name}: cpu median={cpu:.3} ms p99={cpu99:.3} ms; wall median={wall:.3} ms per frame ({} frames)",
        times.len()
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

    let mut gate = SceneGate::new(settings, 0);
    assert!(matches!(gate.decide(&still[0], None), Decision::Infer(_)));
    gate.answered(0, None);
    let mut times = Vec::with_capacity(iters);
    for i in 0..iters {
        let mut f = still[i % still.len()].clone();
        f.index = i as u64 + 1;
        let mut d = None;
        times.push(timed(|| d = Some(gate.decide(&f, None))));
        assert!(
            matches!(d, Some(Decision::Reuse { .. })),
            "a still scene is reused"
        );
    }
    report("still (reused)", times);

    let mut gate = SceneGate::new(settings, 0);
    let mut times = Vec::with_capacity(iters);
    for i in 0..iters {
        let mut f = moving[i % moving.len()].clone();
        f.index = i as u64;
        let mut d = None;
        times.push(timed(|| {
            d = Some(gate.decide(&f, None));
            gate.answered(f.index, None);
        }));
        assert!(
            matches!(d, Some(Decision::Infer(_))),
            "a moving object runs the model"
        );
    }
    report("moving object (to the model)", times);
}
