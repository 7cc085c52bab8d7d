//! The model boundary: a narrow trait that turns a batch of frames and a prompt into one
//! output per frame. The engine calls it from its own OS thread.
//!
//! Models that compute in the worker answer synchronously in `infer`, one batch at a time. A
//! model that waits on a remote server instead says how many frames it can have out at once
//! (`max_inflight_frames`) and takes batches through `submit`, which returns at once and
//! answers each frame later through [`BatchReplies`], from whichever thread has the answer;
//! the engine then keeps forming and handing over batches while earlier ones are out.
//!
//! Only this module (and its children) may import candle. Concrete backends are chosen by
//! `MODEL_TYPE` and wired in the binary.

pub mod error;
pub mod families;
pub mod kernels;
pub mod kind;
pub mod loading;
pub mod preprocess;
pub mod registry;
pub mod remote;
pub mod testing;
pub mod text;
pub mod towers;

pub use error::{Cause, ErrorDetail, ModelError};
pub use kind::{ModelType, ParseSettingError};
pub use loading::{DEFAULT_MAX_NEW_TOKENS, DeviceChoice, DtypeChoice, ModelSettings};
pub use registry::{load_model, write_random_model};
pub use testing::synthetic::ModelSize;

/// Process-wide CPU threading choices for the model; call it first thing in `main`, before
/// any other thread starts (it may set environment variables).
///
/// With the `mkl` feature, MKL's OpenMP threads and candle's own thread pool take turns on
/// the same cores, and candle's pool threads spinning between its operations delay MKL's
/// (CLIP's image tower ran about 7% faster without the spin). So unless
/// `CANDLE_BARRIER_POOL_SPIN_LIMIT` is set, it is set to 0. Likewise MKL's OpenMP threads
/// spin for 200 ms after each product by default, on the cores that rayon's threads need
/// for the convolutions and the own bf16 products between two MKL calls (YOLO-World n in
/// bf16: a spinning OpenMP thread took 21% of the process's CPU time, 2% asleep), so unless
/// `OMP_WAIT_POLICY` or `KMP_BLOCKTIME` is set, `OMP_WAIT_POLICY` is set to `PASSIVE`: they
/// sleep as soon as a product ends. Without `mkl` this does nothing: there the spin
/// measured no different, and there is no OpenMP.
pub fn prepare_cpu_threads() {
    #[cfg(feature = "mkl")]
    for (name, value, unless) in [
        ("CANDLE_BARRIER_POOL_SPIN_LIMIT", "0", None),
        ("OMP_WAIT_POLICY", "PASSIVE", Some("KMP_BLOCKTIME")),
    ] {
        let set = |name: &str| std::env::var_os(name).is_some();
        if !set(name) && !unless.is_some_and(set) {
            // SAFETY: called before the process starts any other thread (see above), so
            // no thread can read the environment while it changes.
            unsafe { std::env::set_var(name, value) };
        }
    }
}

pub use crate::backend::BackendHealth;
use crate::frame::Frame;
pub use crate::prompt::PromptRef;

use serde::Serialize;
use std::sync::Arc;

/// What a model is, as reported in health output, worker heartbeats and result entries.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ModelInfo {
    /// Short name written into every result entry, e.g. `clip-vit-base-patch32`.
    pub name: String,
    /// What the outputs mean: `zero-shot-scoring`, `presence`, `detection`, `captioning`,
    /// `generation`, `test`.
    pub task: String,
    /// The square input side the model resizes frames to (224 for CLIP and PaliGemma, 384 for
    /// BLIP).
    pub input_size: u32,
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// `f32`, `f16`, `bf16`.
    pub dtype: String,
}

/// What a model needs of a prompt. A job's own prompt is checked against it once, when the
/// job is claimed, so a prompt the model cannot use fails the job there instead of failing
/// every frame.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PromptRule {
    /// Any text: captioning models continue it, test models ignore it.
    #[default]
    Any,
    /// Phrases to look for, by [`text::phrases::prompt_phrases`] (scoring and detection models): at
    /// least one, at most the number a model scores.
    Phrases,
}

impl PromptRule {
    /// Why `prompt` cannot be used, if it cannot.
    pub fn check(self, prompt: &str) -> Result<(), String> {
        match self {
            PromptRule::Any => Ok(()),
            PromptRule::Phrases => text::phrases::checked_phrases(prompt).map(|_| ()),
        }
    }
}

/// A vision-language model. Implementations may cache per-prompt work (text embeddings,
/// tokenised prefixes) keyed by the prompt text, since the same prompt repeats for every
/// batch until it changes.
pub trait VisionLanguageModel: Send {
    /// What this model is.
    fn info(&self) -> &ModelInfo;

    /// What it needs of a prompt.
    fn prompt_rule(&self) -> PromptRule {
        PromptRule::Any
    }

    /// Runs one batch: all `frames` share `prompt`. Returns exactly one JSON output per
    /// frame, in order.
    fn infer(
        &mut self,
        frames: &[&Frame],
        prompt: &PromptRef,
    ) -> Result<Vec<serde_json::Value>, ModelError>;

    /// How many frames this model can have out at once, across batches, when it answers
    /// through [`VisionLanguageModel::submit`]; `None` (the default) for a model that computes
    /// in `infer`, one batch at a time.
    fn max_inflight_frames(&self) -> Option<usize> {
        None
    }

    /// Starts a batch and returns as soon as the work is handed off; each frame's answer goes
    /// to `replies` under the frame's index in `frames`. The engine calls it only for a model
    /// whose `max_inflight_frames` is `Some`, never with more frames out than that. The default
    /// runs `infer` on the calling thread.
    fn submit(&mut self, frames: Vec<Frame>, prompt: &PromptRef, replies: BatchReplies) {
        let refs: Vec<&Frame> = frames.iter().collect();
        match self.infer(&refs, prompt) {
            Ok(outputs) if outputs.len() == frames.len() => {
                for (i, output) in outputs.into_iter().enumerate() {
                    replies.frame(i, Ok(output));
                }
            }
            Ok(outputs) => {
                let error = format!(
                    "the model returned {} outputs for {} frames",
                    outputs.len(),
                    frames.len()
                );
                replies.fail_all(frames.len(), &error);
            }
            Err(e) => replies.fail_all(frames.len(), &e.to_string()),
        }
    }

    /// The health of the service the model depends on, for `/health/ready`; `None` for a model
    /// that depends on none.
    fn backend_health(&self) -> Option<Arc<BackendHealth>> {
        None
    }
}

/// Where the answers to one batch handed to [`VisionLanguageModel::submit`] go, frame by frame,
/// from any thread. Cheap to clone; the first answer for a frame counts, later ones are ignored.
#[derive(Clone)]
pub struct BatchReplies {
    answer: Arc<dyn Fn(usize, Result<serde_json::Value, ModelError>) + Send + Sync>,
}

impl BatchReplies {
    pub fn new(
        answer: impl Fn(usize, Result<serde_json::Value, ModelError>) + Send + Sync + 'static,
    ) -> Self {
        Self {
            answer: Arc::new(answer),
        }
    }

    /// Answers frame `index` of the batch.
    pub fn frame(&self, index: usize, result: Result<serde_json::Value, ModelError>) {
        (self.answer)(index, result)
    }

    /// Fails frames `0..frames` with the same error.
    pub fn fail_all(&self, frames: usize, error: &str) {
        for i in 0..frames {
            self.frame(i, Err(ModelError::Inference(error.into())));
        }
    }
}
