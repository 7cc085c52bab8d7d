//! For a model that computes in `infer`: one call at a time, waited on up to
//! INFERENCE_TIMEOUT_MS. A call given up on keeps the model busy until it returns, and the
//! calls behind it fail until then.

use super::batch::PromptGroup;
use super::call_error::CallError;
use super::model_thread::{ModelCall, ModelDone, count_call};
use super::reply::ReplyOutcome;
use super::state::Shared;
use crate::frame::Frame;
use crate::metrics::Metrics;
use crate::prompt::PromptRef;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

/// The batcher's end of the model thread.
pub(super) struct InferCaller {
    calls: mpsc::Sender<ModelCall>,
    done: mpsc::Receiver<ModelDone>,
    timeout: Duration,
    /// A call given up on that the model may still be running.
    busy: Option<u64>,
}

impl InferCaller {
    pub(super) fn new(
        calls: mpsc::Sender<ModelCall>,
        done: mpsc::Receiver<ModelDone>,
        timeout: Duration,
    ) -> Self {
        Self {
            calls,
            done,
            timeout,
            busy: None,
        }
    }

    /// Runs call `seq`, the frames of `group`, and replies to each frame's job.
    pub(super) fn run(&mut self, shared: &Shared, seq: u64, group: PromptGroup) {
        let deadline = Instant::now() + self.timeout;
        let (prompt, frames, targets) = group.split();
        let version = prompt.version;
        match self.call(&shared.metrics, seq, frames, prompt, deadline) {
            Ok((outputs, elapsed)) => {
                let latency_ms = elapsed.as_secs_f64() * 1000.0;
                for (to, output) in targets.into_iter().zip(outputs) {
                    to.send(version, latency_ms, ReplyOutcome::Output(output));
                }
            }
            Err(error) => {
                shared.metrics.inference_errors.inc();
                let error = error.to_string();
                tracing::warn!(%error, frames = targets.len(), "inference batch failed");
                let latency_ms = self
                    .timeout
                    .saturating_sub(deadline.saturating_duration_since(Instant::now()))
                    .as_secs_f64()
                    * 1000.0;
                for to in targets {
                    to.send(version, latency_ms, ReplyOutcome::Error(error.clone()));
                }
            }
        }
    }

    /// Hands the frames to the model once it is free and waits for its outputs and how long
    /// it took, all before `deadline`.
    fn call(
        &mut self,
        metrics: &Metrics,
        seq: u64,
        frames: Vec<Frame>,
        prompt: PromptRef,
        deadline: Instant,
    ) -> Result<(Vec<serde_json::Value>, Duration), CallError> {
        self.wait_out_busy(deadline)?;
        let n = frames.len();
        let call = ModelCall {
            seq,
            frames,
            prompt,
            replies: None,
        };
        self.calls.send(call).map_err(|_| CallError::ModelStopped)?;
        count_call(metrics, n);
        match self.wait_for(seq, deadline) {
            Ok(done) => {
                metrics.batch_latency.observe(done.elapsed.as_secs_f64());
                done.result.map(|out| (out, done.elapsed))
            }
            Err(RecvTimeoutError::Timeout) => {
                self.busy = Some(seq);
                Err(CallError::TimedOut(self.timeout))
            }
            Err(RecvTimeoutError::Disconnected) => Err(CallError::ModelStopped),
        }
    }

    /// Waits, up to `deadline`, for the model to return from a call given up on.
    fn wait_out_busy(&mut self, deadline: Instant) -> Result<(), CallError> {
        let Some(old) = self.busy else {
            return Ok(());
        };
        match self.wait_for(old, deadline) {
            Ok(_) => {
                self.busy = None;
                Ok(())
            }
            Err(RecvTimeoutError::Timeout) => Err(CallError::StillBusy(self.timeout)),
            Err(RecvTimeoutError::Disconnected) => Err(CallError::ModelStopped),
        }
    }

    /// The answer to call `want`, passing over late answers to calls given up on.
    fn wait_for(&self, want: u64, deadline: Instant) -> Result<ModelDone, RecvTimeoutError> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.done.recv_timeout(left) {
                Ok(d) if d.seq == want => return Ok(d),
                Ok(_) => continue,
                Err(e) => return Err(e),
            }
        }
    }
}
