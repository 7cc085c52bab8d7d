//! What the engine answers for each frame, and the job each answer goes to.

use crate::frame::Frame;
use tokio::sync::mpsc as tokio_mpsc;

/// Where a frame came from, carried back with its reply (the pixels are not).
#[derive(Clone, Debug, PartialEq)]
pub struct FrameMeta {
    pub index: u64,
    pub pts_ms: Option<i64>,
    pub capture_ms: i64,
    pub cursor: Option<String>,
    /// When the worker received the frame, for measuring how long its result took.
    pub received: std::time::Instant,
}

impl FrameMeta {
    pub(super) fn take_from(frame: &mut Frame) -> Self {
        Self {
            index: frame.index,
            pts_ms: frame.pts_ms,
            capture_ms: frame.capture_ms,
            cursor: frame.cursor.take(),
            received: frame.received,
        }
    }
}

/// What became of a submitted frame.
#[derive(Clone, Debug, PartialEq)]
pub enum ReplyOutcome {
    Output(serde_json::Value),
    /// The model failed on the frame's batch (error, panic, timeout).
    Error(String),
    /// Skipped unseen: older than MAX_FRAME_AGE_MS when the model could take it.
    TooOld,
}

/// The engine's answer for one frame.
#[derive(Clone, Debug, PartialEq)]
pub struct Reply {
    pub meta: FrameMeta,
    /// The version of the prompt the frame was run with (`None`: the job's own prompt).
    pub prompt_version: Option<u64>,
    /// How long the frame's model call took.
    pub latency_ms: f64,
    pub outcome: ReplyOutcome,
}

/// A frame's job, waiting for the frame's reply.
pub(super) struct ReplyTo {
    pub(super) meta: FrameMeta,
    pub(super) replies: tokio_mpsc::UnboundedSender<Reply>,
}

impl ReplyTo {
    /// Answers the job. A job that has gone no longer needs the answer.
    pub(super) fn send(self, prompt_version: Option<u64>, latency_ms: f64, outcome: ReplyOutcome) {
        let _ = self.replies.send(Reply {
            meta: self.meta,
            prompt_version,
            latency_ms,
            outcome,
        });
    }
}
