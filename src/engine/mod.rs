//! The inference engine: one model on its own OS thread, shared by every job of the worker,
//! fed in batches formed across all running streams.
//!
//! Each job registers a stream with a short queue of waiting frames: one frame for a
//! recording (its job sends the next frame once the last is answered), and for a live
//! stream LIVE_QUEUE_MS worth of frames at the job's rate, plus every frame that arrived
//! within the last LIVE_QUEUE_MS (at most [`MAX_LIVE_QUEUE_FRAMES`]): live HLS arrives a
//! whole segment at a time, sometimes two when a playlist reload falls just after a second
//! segment appeared, and a queue bounded by count alone would make each burst replace its
//! own frames though the model keeps up on average. Past that, the oldest waiting frame is
//! dropped for the new one, and when the model takes frames, those past the count that
//! waited longer than LIVE_QUEUE_MS are answered as too old: a slow model makes streams skip
//! frames instead of falling further behind. A batcher thread
//! waits up to BATCH_WINDOW_MS for up to MAX_BATCH_SIZE frames (or a frame from every
//! stream), takes the longest-waiting frames first, skips frames older than
//! MAX_FRAME_AGE_MS, groups the rest by prompt (one `infer` call per prompt) and bounds each
//! call with INFERENCE_TIMEOUT_MS. The model itself runs on a second thread, so a call that never
//! returns can be given up on: its frames get error entries and the engine goes on once the
//! model is free again. A model error or panic fails only that call's frames.
//!
//! A model that waits on a remote server (`max_inflight_frames` is `Some`) is not waited on:
//! the model thread hands each call to the model's `submit`, which returns at once, and the
//! batcher goes on forming batches while earlier ones are out, as long as fewer frames than
//! the model's limit are unanswered (taking fewer frames than MAX_BATCH_SIZE when only a few
//! slots are free). Each frame is answered on its own, from the model's threads, straight to
//! its job. A deadline thread gives frames still unanswered at INFERENCE_TIMEOUT_MS their
//! error entries; their slots stay taken until the model really answers, so the server never
//! has more than the limit to work on.
//!
//! The files: `settings` (the knobs), `reply` (what each frame gets back), `state` (what the
//! threads share under one lock), `stream` (a job's queue and its replies), `batch` (taking a
//! batch and grouping it by prompt), `batcher` (the batcher thread), `model_thread` (the
//! model's thread), `infer_call` and `submit_call` (the two ways a call reaches the model),
//! `call_error` (why a call failed its frames).

mod batch;
mod batcher;
mod call_error;
mod infer_call;
mod model_thread;
mod reply;
mod settings;
mod state;
mod stream;
mod submit_call;
#[cfg(test)]
mod tests;

pub use reply::{FrameMeta, Reply, ReplyOutcome};
pub use settings::{EngineSettings, MAX_BATCH_SIZE_LIMIT, MAX_LIVE_QUEUE_FRAMES};
pub use stream::{EngineStream, Submitted};

use crate::metrics::Metrics;
use crate::model::{ModelInfo, PromptRule, VisionLanguageModel};
use crate::prompt::PromptFollow;
use batcher::{ModelPath, batch_loop};
use infer_call::InferCaller;
use model_thread::{ModelCall, ModelDone, model_loop};
use state::{Shared, State};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use submit_call::deadline_loop;

/// A handle on the worker's engine. Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    shared: Arc<Shared>,
}

impl Engine {
    /// Starts the batcher and model threads. The model moves to its own thread and stays
    /// there until `shutdown`.
    pub fn start(
        model: Box<dyn VisionLanguageModel>,
        settings: EngineSettings,
        metrics: Arc<Metrics>,
    ) -> Engine {
        let info = model.info().clone();
        let max_inflight = model.max_inflight_frames().map(|n| n.max(1));
        let (calls, call_rx) = mpsc::channel::<ModelCall>();
        let (done_tx, done) = mpsc::channel::<ModelDone>();
        let path = match max_inflight {
            Some(max_inflight) => ModelPath::Submit {
                calls,
                max_inflight,
            },
            None => ModelPath::Infer(InferCaller::new(calls, done, settings.inference_timeout)),
        };
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
            model_name: info.name.as_str().into(),
            info,
            prompt_rule: model.prompt_rule(),
            settings,
            metrics,
            threads: Mutex::new(Vec::new()),
        });
        let mut threads = vec![spawn("fr-model", move || {
            model_loop(model, call_rx, done_tx)
        })];
        let batcher = shared.clone();
        threads.push(spawn("fr-batcher", move || batch_loop(&batcher, path)));
        if max_inflight.is_some() {
            let shared = shared.clone();
            threads.push(spawn("fr-deadlines", move || deadline_loop(&shared)));
        }
        shared
            .threads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(threads);
        Engine { shared }
    }

    pub fn model_info(&self) -> &ModelInfo {
        &self.shared.info
    }

    /// What the model needs of a prompt.
    pub fn prompt_rule(&self) -> PromptRule {
        self.shared.prompt_rule
    }

    /// The model name written into result entries.
    pub fn model_name(&self) -> Arc<str> {
        self.shared.model_name.clone()
    }

    /// Registers a job's stream, sampled at `fps` (which sizes its live queue). The prompt
    /// is read when a frame is taken for a batch, so a new version of a followed prompt
    /// applies from the next batch.
    pub fn register(&self, prompt: PromptFollow, fps: f64) -> EngineStream {
        EngineStream::register(&self.shared, prompt, fps)
    }

    /// Stops taking frames, lets the model finish its current call and waits up to
    /// `timeout` for both threads to end; true when they did. Blocking: call it from a
    /// blocking context (`spawn_blocking`, or after the runtime has stopped).
    pub fn shutdown(&self, timeout: Duration) -> bool {
        {
            let mut st = self.shared.lock();
            st.shutdown = true;
            // Dropping the reply senders tells waiting jobs the engine is gone.
            st.streams.clear();
            st.open_calls.clear();
            st.pending = 0;
        }
        self.shared.wake.notify_all();
        let deadline = Instant::now() + timeout;
        let mut threads = std::mem::take(
            &mut *self
                .shared
                .threads
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        );
        while Instant::now() < deadline && threads.iter().any(|t| !t.is_finished()) {
            std::thread::sleep(Duration::from_millis(5));
        }
        let all = threads.iter().all(|t| t.is_finished());
        for t in threads.drain(..) {
            if t.is_finished() {
                let _ = t.join();
            }
        }
        all
    }
}

/// Starts one of the engine's threads.
fn spawn(name: &str, run: impl FnOnce() + Send + 'static) -> JoinHandle<()> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(run)
        .unwrap_or_else(|e| panic!("spawning the {name} thread: {e}"))
}
