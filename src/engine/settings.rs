//! The engine's settings, and the bound on the frames one live stream may hold.

use std::time::Duration;

/// The engine's knobs, from the worker's settings.
#[derive(Clone, Debug)]
pub struct EngineSettings {
    pub max_batch_size: usize,
    pub batch_window: Duration,
    pub max_frame_age: Duration,
    pub inference_timeout: Duration,
    /// How much of a live stream, in time at the job's frame rate, may wait for the model.
    pub live_queue: Duration,
}

impl EngineSettings {
    /// How many frames of a live stream sampled at `fps` may wait for the model: LIVE_QUEUE_MS
    /// worth, rounded up, at least one and at most `MAX_LIVE_QUEUE_FRAMES`.
    pub fn live_queue_frames(&self, fps: f64) -> usize {
        let frames = (fps * self.live_queue.as_secs_f64()).ceil();
        if frames.is_finite() && frames >= 1.0 {
            (frames as usize).min(MAX_LIVE_QUEUE_FRAMES)
        } else {
            1
        }
    }
}

/// The largest MAX_BATCH_SIZE: a GPU's batch (scripts/gpu-check times up to it); past it a
/// batch only holds frames back longer.
pub const MAX_BATCH_SIZE_LIMIT: usize = 64;

/// Bounds the frames one live stream holds in memory, whatever LIVE_QUEUE_MS and fps say.
pub const MAX_LIVE_QUEUE_FRAMES: usize = 64;
