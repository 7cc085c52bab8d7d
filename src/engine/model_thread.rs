//! The model's own thread: it runs each call it is handed, catching panics, and either
//! answers the batcher (a model that computes in `infer`) or leaves each frame's answer to
//! the model (a model that answers through `submit`).

use super::call_error::CallError;
use crate::frame::Frame;
use crate::metrics::Metrics;
use crate::model::{BatchReplies, VisionLanguageModel};
use crate::prompt::PromptRef;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// One call for the model: frames that share a prompt.
pub(super) struct ModelCall {
    pub(super) seq: u64,
    pub(super) frames: Vec<Frame>,
    pub(super) prompt: PromptRef,
    /// Set for a model that answers through `submit`: where its answers go.
    pub(super) replies: Option<BatchReplies>,
}

/// What an `infer` call came to.
pub(super) struct ModelDone {
    pub(super) seq: u64,
    pub(super) result: Result<Vec<serde_json::Value>, CallError>,
    pub(super) elapsed: Duration,
}

/// Runs the calls from `calls` until the batcher hangs up (or stops listening on `done`).
pub(super) fn model_loop(
    mut model: Box<dyn VisionLanguageModel>,
    calls: mpsc::Receiver<ModelCall>,
    done: mpsc::Sender<ModelDone>,
) {
    while let Ok(call) = calls.recv() {
        match call.replies {
            Some(replies) => submit(&mut *model, call.frames, &call.prompt, replies),
            None => {
                let answer = infer(&mut *model, call.seq, call.frames, &call.prompt);
                if done.send(answer).is_err() {
                    break;
                }
            }
        }
    }
}

/// Hands a call to the model's `submit`; a panic fails all its frames.
fn submit(
    model: &mut dyn VisionLanguageModel,
    frames: Vec<Frame>,
    prompt: &PromptRef,
    replies: BatchReplies,
) {
    let n = frames.len();
    let submitted = catch_unwind(AssertUnwindSafe(|| {
        model.submit(frames, prompt, replies.clone())
    }));
    if let Err(panic) = submitted {
        let error = CallError::Panicked(panic_message(&*panic));
        replies.fail_all(n, &error.to_string());
    }
}

/// Runs a call through the model's `infer`, which must answer every frame.
fn infer(
    model: &mut dyn VisionLanguageModel,
    seq: u64,
    frames: Vec<Frame>,
    prompt: &PromptRef,
) -> ModelDone {
    let start = Instant::now();
    let refs: Vec<&Frame> = frames.iter().collect();
    let result = match catch_unwind(AssertUnwindSafe(|| model.infer(&refs, prompt))) {
        Ok(Ok(out)) if out.len() == refs.len() => Ok(out),
        Ok(Ok(out)) => Err(CallError::WrongCount {
            outputs: out.len(),
            frames: refs.len(),
        }),
        Ok(Err(e)) => Err(CallError::Model(e)),
        Err(panic) => Err(CallError::Panicked(panic_message(&*panic))),
    };
    let elapsed = start.elapsed();
    drop(refs);
    // Free the pixels before answering.
    drop(frames);
    ModelDone {
        seq,
        result,
        elapsed,
    }
}

/// Counts a call handed to the model.
pub(super) fn count_call(metrics: &Metrics, frames: usize) {
    metrics.inference_batches.inc();
    metrics.inference_frames.add(frames as u64);
    metrics.batch_size.observe(frames as f64);
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".into()
    }
}
