//! The model boundary: a narrow, synchronous trait that turns a batch of frames and a prompt
//! into one output per frame. The engine calls it from its own OS thread.
//!
//! Only this module (and its children) may import candle. Concrete backends are chosen by
//! `MODEL_TYPE` and wired in the binary.

pub mod blip;
pub mod blip_net;
pub mod clip;
pub mod clip_vision;
pub mod cpu_kernels;
pub mod fused_linear;
pub mod load;
pub mod make;
pub mod owlvit;
pub mod paligemma;
pub mod paligemma_detect;
#[cfg(test)]
mod parity;
#[cfg(test)]
mod parity_jpeg;
pub mod preprocess;
pub mod siglip;
#[cfg(test)]
mod testutil;
pub mod tokenizer;

pub use load::{
    DEFAULT_MAX_NEW_TOKENS, DeviceChoice, DtypeChoice, ModelSettings, ModelType, ParseSettingError,
    load_model,
};
pub use make::{ModelSize, write_random_model};

/// Process-wide CPU threading choices for the model; call it first thing in `main`, before
/// any other thread starts (it may set environment variables).
///
/// With the `mkl` feature, MKL's OpenMP threads and candle's own thread pool take turns on
/// the same cores, and candle's pool threads spinning between its operations delay MKL's
/// (CLIP's image tower ran about 7% faster without the spin). So unless
/// `CANDLE_BARRIER_POOL_SPIN_LIMIT` is set, it is set to 0. Without `mkl` this does nothing:
/// there the spin measured no different.
pub fn prepare_cpu_threads() {
    #[cfg(feature = "mkl")]
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        // SAFETY: called before the process starts any other thread (see above), so no
        // thread can read the environment while it changes.
        unsafe { std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "0") };
    }
}

use crate::frame::Frame;
pub mod null;

use serde::Serialize;

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

/// The prompt a batch runs with. `version` is the `{fr}:prompt` version for jobs that follow
/// the active prompt, and `None` for jobs that carry their own prompt.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PromptRef {
    pub text: std::sync::Arc<str>,
    pub version: Option<u64>,
}

/// A model failure. `batch` errors fail every frame of the batch; the worker goes on.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("model weights: {0}")]
    Load(String),
    #[error("bad prompt: {0}")]
    Prompt(String),
    #[error("inference failed: {0}")]
    Inference(String),
}

/// A vision-language model. Implementations may cache per-prompt work (text embeddings,
/// tokenised prefixes) keyed by the prompt text, since the same prompt repeats for every
/// batch until it changes.
pub trait VisionLanguageModel: Send {
    /// What this model is.
    fn info(&self) -> &ModelInfo;

    /// Runs one batch: all `frames` share `prompt`. Returns exactly one JSON output per
    /// frame, in order.
    fn infer(
        &mut self,
        frames: &[&Frame],
        prompt: &PromptRef,
    ) -> Result<Vec<serde_json::Value>, ModelError>;
}
