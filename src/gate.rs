//! The scene-change gate: decides, per sampled frame, whether the model must look at it or
//! whether the output of the frame it last saw still holds.
//!
//! Pure code: a frame in, a decision out. Each frame becomes a small greyscale thumbnail
//! (box filter, about [`THUMB_LONG_SIDE`] px on the long side). It is compared with the
//! reference: the thumbnail of the last frame whose model output the job holds, slowly blended
//! toward the frames reused since (a background in the manner of camera motion detection),
//! so gradual light changes do not add up to a "change". Both thumbnails are compared after
//! removing their mean brightness, so a global brightness step (auto exposure, a cloud) is
//! not a change either. A thumbnail pixel whose difference exceeds [`PIXEL_THRESHOLD`] is
//! changed; the frame goes to the model when the changed share of the frame reaches
//! `min_area`, when the prompt version differs from the reference's, when the reference is
//! about `max_reuse_ms` old (so a stationary object or a slow change is checked again;
//! [`REFRESH_SPREAD`]), when the
//! frame size changed, and whenever there is no reference (a job's first frame, and the first
//! after a resume, since each delivery starts a new gate).

use crate::frame::Frame;
use std::collections::VecDeque;

/// Thumbnails are about this many pixels on their long side.
pub const THUMB_LONG_SIDE: u32 = 80;

/// A thumbnail pixel (0 to 255 grey) differing from the reference by more than this is
/// changed. A thumbnail pixel averages a whole block of frame pixels, so sensor noise of a
/// few grey levels stays far below it.
pub const PIXEL_THRESHOLD: f32 = 12.0;

/// How far the reference moves toward each reused frame (0: never, 1: at once). Slow enough
/// that an object that appears stays a change for dozens of frames.
pub const BACKGROUND_RATE: f32 = 0.02;

/// Frames sent to the model and not answered yet, remembered so their thumbnail can become
/// the reference when the answer comes. More than this in flight is not kept.
const MAX_IN_FLIGHT: usize = 64;

/// How much sooner than `max_reuse_ms` a reference may be refreshed, as a share of it. Each
/// reference is refreshed at a point of this last share of the interval picked from the
/// job's seed and the frame, so jobs started together (a worker's restart, a fleet of
/// cameras pushed at once) do not all send their refresh frames to the model in the same
/// batch, which made a backlog of a second or more every `max_reuse_ms`.
pub const REFRESH_SPREAD: f64 = 0.25;

/// The gate's knobs: SCENE_CHANGE_MIN_AREA and SCENE_MAX_REUSE_MS.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GateSettings {
    /// Share of the frame (0 to 1) that must change for the model to run.
    pub min_area: f32,
    /// The longest a model output is reused, in capture time (refreshes come up to
    /// [`REFRESH_SPREAD`] of it sooner).
    pub max_reuse_ms: i64,
}

/// What to do with a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Run the model on it.
    Infer(Why),
    /// Repeat the output of this frame index.
    Reuse { from: u64 },
}

/// Why a frame goes to the model (for tests and logs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Why {
    /// No model output to repeat yet (first frame, after a resume, after a failed frame).
    NoReference,
    PromptChanged,
    /// The reference is about `max_reuse_ms` old (see [`REFRESH_SPREAD`]).
    Refresh,
    SizeChanged,
    SceneChanged,
}

/// A greyscale thumbnail, one f32 per pixel, with its mean removed.
#[derive(Clone, Debug, PartialEq)]
struct Thumb {
    width: u32,
    height: u32,
    /// The frame size it was made from.
    source: (u32, u32),
    pixels: Vec<f32>,
}

/// The frame the gate compares with: one whose output the job holds.
#[derive(Clone, Debug)]
struct Reference {
    thumb: Thumb,
    index: u64,
    /// The capture time from which a frame refreshes it.
    refresh_at_ms: i64,
    prompt_version: Option<u64>,
}

/// A frame sent to the model whose answer has not come.
#[derive(Debug)]
struct Sent {
    thumb: Thumb,
    index: u64,
    capture_ms: i64,
}

/// One job's gate. Build a new one per delivery.
#[derive(Debug)]
pub struct SceneGate {
    settings: GateSettings,
    /// Picks where in [`REFRESH_SPREAD`] each reference is refreshed.
    seed: u64,
    reference: Option<Reference>,
    sent: VecDeque<Sent>,
}

impl SceneGate {
    /// `seed` is the job's own (a hash of its id, say), so that different jobs refresh at
    /// different moments.
    pub fn new(settings: GateSettings, seed: u64) -> Self {
        Self {
            settings,
            seed,
            reference: None,
            sent: VecDeque::new(),
        }
    }

    /// Decides for `frame`, about to run with `prompt_version`. On `Infer` the gate
    /// remembers the frame until `answered` or `lost` is called for its index.
    pub fn decide(&mut self, frame: &Frame, prompt_version: Option<u64>) -> Decision {
        let thumb = Thumb::of(frame);
        let why = match &mut self.reference {
            None => Why::NoReference,
            Some(r) if r.prompt_version != prompt_version => Why::PromptChanged,
            Some(r) if frame.capture_ms >= r.refresh_at_ms => Why::Refresh,
            Some(r) if r.thumb.source != thumb.source => Why::SizeChanged,
            Some(r) => {
                if changed_share(&r.thumb, &thumb) >= self.settings.min_area {
                    Why::SceneChanged
                } else {
                    r.thumb.blend_toward(&thumb, BACKGROUND_RATE);
                    return Decision::Reuse { from: r.index };
                }
            }
        };
        if self.sent.len() >= MAX_IN_FLIGHT {
            self.sent.pop_front();
        }
        self.sent.push_back(Sent {
            thumb,
            index: frame.index,
            capture_ms: frame.capture_ms,
        });
        Decision::Infer(why)
    }

    /// The model's output for frame `index`, run with `prompt_version`, arrived: it becomes
    /// the reference, unless a newer frame already is. Frames sent before it are forgotten:
    /// a job's answers come in the order its frames were sent.
    pub fn answered(&mut self, index: u64, prompt_version: Option<u64>) {
        let Some(pos) = self.sent.iter().position(|s| s.index == index) else {
            return;
        };
        let s = self.sent.drain(..=pos).next_back().expect("found above");
        if self.reference.as_ref().is_some_and(|r| r.index > index) {
            return;
        }
        self.reference = Some(Reference {
            thumb: s.thumb,
            index: s.index,
            refresh_at_ms: s.capture_ms.saturating_add(self.reuse_limit_ms(s.index)),
            prompt_version,
        });
    }

    /// How long the output of frame `index` is reused at most: `max_reuse_ms`, less a
    /// share of up to [`REFRESH_SPREAD`] of it picked from the seed and the index.
    fn reuse_limit_ms(&self, index: u64) -> i64 {
        let max = self.settings.max_reuse_ms.max(0);
        let spread = (max as f64 * REFRESH_SPREAD) as u64;
        max - (mix(self.seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15)) % (spread + 1)) as i64
    }

    /// Frame `index` got no output (dropped, too old, failed): forget it.
    pub fn lost(&mut self, index: u64) {
        self.sent.retain(|s| s.index != index);
    }
}

/// SplitMix64's finaliser: spreads nearby inputs over the whole range.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Thumb {
    /// Box-filters the frame to about `THUMB_LONG_SIDE` px on the long side, in grey
    /// (the mean of R, G and B), and removes the mean.
    fn of(frame: &Frame) -> Self {
        let (w, h) = (frame.width as usize, frame.height as usize);
        let long = w.max(h);
        let block = long.div_ceil(THUMB_LONG_SIDE as usize).max(1);
        let (tw, th) = (w.div_ceil(block), h.div_ceil(block));
        let mut sums = vec![0u32; tw * th];
        // Every other row of each band of `block` rows is added, block by block, into its
        // thumbnail pixel. Half the rows of a block average as well as all of them for this
        // purpose and halve the memory read, which is what the gate costs. The plain sum of
        // R, G and B is grey enough to see a change. A block's row is summed 16 bytes at a
        // time into a u32 that cannot overflow, so the loop vectorises even where overflow
        // checks are on (the dev profile the worker is benchmarked in: with a checked `+=`
        // per byte it took 0.5 ms a 720p frame instead of under 0.1).
        for (band, rows) in frame.rgb.chunks(block * w * 3).enumerate() {
            let out = &mut sums[band * tw..(band + 1) * tw];
            for row in rows.chunks_exact(w * 3).step_by(2) {
                for (sum, pixels) in out.iter_mut().zip(row.chunks(block * 3)) {
                    *sum += byte_sum(pixels);
                }
            }
        }
        // Edge blocks may be partial: divide each by its own pixel count.
        let mut pixels = Vec::with_capacity(tw * th);
        for ty in 0..th {
            let rows = block.min(h - ty * block).div_ceil(2);
            for tx in 0..tw {
                let cols = block.min(w - tx * block);
                let n = (rows * cols * 3) as f32;
                pixels.push(sums[ty * tw + tx] as f32 / n);
            }
        }
        let mean = pixels.iter().sum::<f32>() / pixels.len() as f32;
        for p in &mut pixels {
            *p -= mean;
        }
        Self {
            width: tw as u32,
            height: th as u32,
            source: (frame.width, frame.height),
            pixels,
        }
    }

    fn blend_toward(&mut self, other: &Thumb, rate: f32) {
        for (a, b) in self.pixels.iter_mut().zip(&other.pixels) {
            *a += (b - *a) * rate;
        }
    }
}

/// The sum of `bytes`, 16 at a time: each group of 16 adds to at most 16 * 255, so only the
/// per-group additions are checked.
fn byte_sum(bytes: &[u8]) -> u32 {
    let mut groups = bytes.chunks_exact(16);
    let mut sum = 0u32;
    for g in &mut groups {
        let g: &[u8; 16] = g.try_into().expect("chunks of 16");
        sum += g.iter().map(|&b| u32::from(b)).sum::<u32>();
    }
    sum + groups
        .remainder()
        .iter()
        .map(|&b| u32::from(b))
        .sum::<u32>()
}

/// The share of thumbnail pixels that differ by more than `PIXEL_THRESHOLD`.
fn changed_share(a: &Thumb, b: &Thumb) -> f32 {
    debug_assert_eq!((a.width, a.height), (b.width, b.height));
    let changed = a
        .pixels
        .iter()
        .zip(&b.pixels)
        .filter(|(x, y)| (*x - *y).abs() > PIXEL_THRESHOLD)
        .count();
    changed as f32 / a.pixels.len().max(1) as f32
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    const W: u32 = 1280;
    const H: u32 = 720;

    fn settings() -> GateSettings {
        GateSettings {
            min_area: 0.002,
            max_reuse_ms: 10_000,
        }
    }

    /// A textured scene (gradients and stripes, so it is not flat), plus `shift` grey levels,
    /// plus noise of up to `noise` levels, plus a dark `size`-px square at `at`.
    fn scene(index: u64, shift: i32, noise: i32, square: Option<((u32, u32), u32)>) -> Frame {
        let mut rgb = Vec::with_capacity((W * H * 3) as usize);
        // A small deterministic generator, different per frame.
        let mut seed = 0x9e37_79b9u32.wrapping_mul(index as u32 + 1);
        for y in 0..H {
            for x in 0..W {
                let base = [
                    (x * 200 / W) as i32 + 20,
                    (y * 200 / H) as i32 + 20,
                    if (x / 40 + y / 40) % 2 == 0 { 60 } else { 160 },
                ];
                let inside = square.is_some_and(|((sx, sy), s)| {
                    (sx..sx + s).contains(&x) && (sy..sy + s).contains(&y)
                });
                for (c, v) in base.into_iter().enumerate() {
                    let v = if inside {
                        [30, 25, 20][c]
                    } else {
                        seed ^= seed << 13;
                        seed ^= seed >> 17;
                        seed ^= seed << 5;
                        let n = if noise > 0 {
                            (seed % (2 * noise as u32 + 1)) as i32 - noise
                        } else {
                            0
                        };
                        v + shift + n
                    };
                    rgb.push(v.clamp(0, 255) as u8);
                }
            }
        }
        let mut f = Frame::new(W, H, Bytes::from(rgb)).unwrap();
        f.index = index;
        f.capture_ms = index as i64 * 500;
        f
    }

    /// Runs the first frame through the model and answers it.
    fn primed(first: &Frame) -> SceneGate {
        let mut g = SceneGate::new(settings(), 1);
        assert_eq!(g.decide(first, Some(1)), Decision::Infer(Why::NoReference));
        g.answered(first.index, Some(1));
        g
    }

    #[test]
    fn a_thumbnail_is_about_80_px_on_the_long_side() {
        let t = Thumb::of(&scene(0, 0, 0, None));
        assert_eq!((t.width, t.height), (80, 45));
        let odd = Frame::new(7, 3, Bytes::from(vec![9u8; 63])).unwrap();
        let t = Thumb::of(&odd);
        assert_eq!((t.width, t.height), (7, 3));
        assert!(
            t.pixels.iter().all(|p| p.abs() < 1e-4),
            "flat image, mean removed"
        );
    }

    #[test]
    fn a_static_scene_is_reused_until_max_reuse_ms() {
        let mut g = primed(&scene(0, 0, 0, None));
        // Frames every 500 ms: reused for at least 7.5 s (max_reuse_ms less the spread),
        // refreshed by 10 s.
        let mut refreshed = None;
        for i in 1..=20 {
            match g.decide(&scene(i, 0, 0, None), Some(1)) {
                Decision::Reuse { from: 0 } => {}
                Decision::Infer(Why::Refresh) => {
                    refreshed = Some(i);
                    break;
                }
                other => panic!("frame {i}: {other:?}"),
            }
        }
        let at = refreshed.expect("refreshed by 10 s");
        assert!((15..=20).contains(&at), "refreshed at frame {at}");
    }

    #[test]
    fn jobs_started_together_refresh_at_different_moments() {
        let first = scene(0, 0, 0, None);
        // The capture time of the first frame that refreshes, frames every 100 ms.
        let refresh_ms = |seed: u64| {
            let mut g = SceneGate::new(settings(), seed);
            g.decide(&first, None);
            g.answered(0, None);
            let mut f = first.clone();
            (1..=100)
                .map(|i| i * 100)
                .find(|&ms| {
                    f.capture_ms = ms;
                    g.decide(&f, None) == Decision::Infer(Why::Refresh)
                })
                .expect("refreshed by max_reuse_ms")
        };
        let moments: std::collections::BTreeSet<i64> = (0..16).map(refresh_ms).collect();
        assert!(moments.len() >= 8, "{moments:?}");
        assert!(
            moments.iter().all(|ms| (7_500..=10_000).contains(ms)),
            "{moments:?}"
        );
        assert_eq!(
            refresh_ms(3),
            refresh_ms(3),
            "the same seed, the same moment"
        );
    }

    #[test]
    fn sensor_noise_is_not_a_change() {
        let mut g = primed(&scene(0, 0, 6, None));
        for i in 1..10 {
            assert_eq!(
                g.decide(&scene(i, 0, 6, None), Some(1)),
                Decision::Reuse { from: 0 }
            );
        }
    }

    #[test]
    fn a_global_brightness_change_is_not_a_change() {
        let mut g = primed(&scene(0, 0, 2, None));
        assert_eq!(
            g.decide(&scene(1, 30, 2, None), Some(1)),
            Decision::Reuse { from: 0 }
        );
        assert_eq!(
            g.decide(&scene(2, -25, 2, None), Some(1)),
            Decision::Reuse { from: 0 }
        );
    }

    #[test]
    fn a_small_object_entering_is_a_change_and_stays_one_while_it_moves() {
        let mut g = primed(&scene(0, 0, 4, None));
        // 48x48 px of a 1280x720 frame: a quarter of a percent.
        let mut x = 100;
        for i in 1..6 {
            let f = scene(i, 0, 4, Some(((x, 300), 48)));
            assert_eq!(
                g.decide(&f, Some(1)),
                Decision::Infer(Why::SceneChanged),
                "frame {i}"
            );
            g.answered(i, Some(1));
            x += 120;
        }
        // It stops: the scene is what the model last saw.
        let still = scene(6, 0, 4, Some(((x - 120, 300), 48)));
        assert_eq!(g.decide(&still, Some(1)), Decision::Reuse { from: 5 });
        // It leaves: a change again.
        assert_eq!(
            g.decide(&scene(7, 0, 4, None), Some(1)),
            Decision::Infer(Why::SceneChanged)
        );
    }

    #[test]
    fn a_new_prompt_version_a_new_size_and_no_answer_each_run_the_model() {
        let first = scene(0, 0, 0, None);
        let mut g = primed(&first);
        assert_eq!(
            g.decide(&scene(1, 0, 0, None), Some(2)),
            Decision::Infer(Why::PromptChanged)
        );
        // Frame 1 was lost (dropped before the model saw it): the reference stays frame 0.
        g.lost(1);
        assert_eq!(
            g.decide(&scene(2, 0, 0, None), Some(1)),
            Decision::Reuse { from: 0 }
        );
        let mut small = Frame::new(4, 4, Bytes::from(vec![0u8; 48])).unwrap();
        small.index = 3;
        small.capture_ms = 1500;
        assert_eq!(g.decide(&small, Some(1)), Decision::Infer(Why::SizeChanged));
        // A fresh gate (a resume) runs the model first.
        let mut fresh = SceneGate::new(settings(), 1);
        assert_eq!(
            fresh.decide(&first, Some(1)),
            Decision::Infer(Why::NoReference)
        );
        assert_eq!(
            fresh.decide(&first, Some(1)),
            Decision::Infer(Why::NoReference),
            "no answer yet: nothing to repeat"
        );
    }

    #[test]
    fn an_older_answer_does_not_replace_a_newer_reference() {
        let mut g = SceneGate::new(settings(), 1);
        let a = scene(0, 0, 0, None);
        let b = scene(1, 0, 0, Some(((600, 300), 100)));
        g.decide(&a, None);
        g.decide(&b, None);
        g.answered(1, None);
        g.answered(0, None);
        let again = scene(2, 0, 0, Some(((600, 300), 100)));
        assert_eq!(g.decide(&again, None), Decision::Reuse { from: 1 });
    }
}
