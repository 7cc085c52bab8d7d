//! Why a model call failed its frames, worded as each frame's error reply reads.

use crate::model::ModelError;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub(super) enum CallError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("the model returned {outputs} outputs for {frames} frames")]
    WrongCount { outputs: usize, frames: usize },
    #[error("the model panicked: {0}")]
    Panicked(String),
    /// The call ran past INFERENCE_TIMEOUT_MS (carried here) and was given up on.
    #[error("inference exceeded INFERENCE_TIMEOUT_MS ({} ms)", .0.as_millis())]
    TimedOut(Duration),
    /// A call given up on still held the model when the next one was due.
    #[error(
        "the model is still busy with a batch that exceeded INFERENCE_TIMEOUT_MS ({} ms)",
        .0.as_millis()
    )]
    StillBusy(Duration),
    #[error("the model thread has stopped")]
    ModelStopped,
}
