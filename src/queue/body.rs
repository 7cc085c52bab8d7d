//! The running job as the queue hands it to its body: the [`JobBody`] trait a job's work
//! implements, the context it runs with, how it is told to stop, and how it ends.

use crate::job::{JobSpec, SpecError};
use crate::prompt::PromptFollow;
use crate::queue::stop::StopSignal;
use crate::results::{ResultSink, ResumeState};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

/// Everything a job body needs to run one job.
pub struct JobContext {
    pub spec: Arc<JobSpec>,
    pub resume: ResumeState,
    pub sink: ResultSink,
    pub stop: StopSignal,
    pub prompt: PromptFollow,
}

/// How a body ended without an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyOutcome {
    /// The job's work is done (end of stream, `max_frames`, `max_duration_s`: the body
    /// owns these bounds, the queue knows nothing of them).
    Completed,
    /// The body returned because its `StopSignal` fired; the runner reads the reason.
    Stopped,
}

/// A job that cannot go on; the message ends up in the job hash and the end entry, so it
/// should tell a person what to fix.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct JobFailure {
    pub message: String,
}

impl JobFailure {
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
        }
    }
}

/// The boxed future a body returns.
pub type BodyFuture<'a> =
    Pin<Box<dyn Future<Output = Result<BodyOutcome, JobFailure>> + Send + 'a>>;

/// A job's work: reads frames, writes results through `ctx.sink`, returns at the next frame
/// boundary once `ctx.stop` fires. The pipeline implements it; tests plug in their own.
pub trait JobBody: Send + Sync + 'static {
    /// What this body refuses in a spec that parsed, checked once when the job is claimed
    /// (e.g. a prompt the model cannot use): the job then ends `failed` with the error and
    /// never runs. Accepts every spec unless a body says otherwise.
    fn check(&self, _spec: &JobSpec) -> Result<(), SpecError> {
        Ok(())
    }

    fn run(&self, ctx: JobContext) -> BodyFuture<'_>;
}
