//! What the engine's threads share under one lock: each stream's waiting frames, the count
//! of frames waiting, and the calls out with a model that answers through `submit`.

use super::reply::{Reply, ReplyTo};
use super::settings::EngineSettings;
use crate::frame::Frame;
use crate::metrics::Metrics;
use crate::model::{ModelInfo, PromptRule};
use crate::prompt::PromptFollow;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::sync::mpsc as tokio_mpsc;

/// A frame waiting for the model.
pub(super) struct Pending {
    pub(super) frame: Frame,
    /// Frames of a live stream expire; frames of a recording wait as long as it takes.
    pub(super) live: bool,
    /// Place in line across all streams: lower goes first.
    pub(super) seq: u64,
}

/// One job's stream: its waiting frames, its prompt and where its replies go.
pub(super) struct StreamState {
    /// Oldest first; `seq`s rise along the queue.
    pub(super) waiting: VecDeque<Pending>,
    /// How many live frames may wait (a recording's frames wait one at a time).
    pub(super) live_depth: usize,
    pub(super) prompt: PromptFollow,
    pub(super) replies: tokio_mpsc::UnboundedSender<Reply>,
}

impl StreamState {
    /// Removes the oldest waiting frame. Every frame behind it moves up into the place in
    /// line of the one before it, so a stream that always has newer frames is not pushed to
    /// the back when there are more streams than a batch. Returns the freed place (the
    /// newest frame's old `seq`, for a frame queued next) with the frame.
    pub(super) fn drop_oldest(&mut self) -> Option<(Pending, u64)> {
        let dropped = self.waiting.pop_front()?;
        let mut carry = dropped.seq;
        for p in self.waiting.iter_mut() {
            std::mem::swap(&mut p.seq, &mut carry);
        }
        Some((dropped, carry))
    }
}

#[derive(Default)]
pub(super) struct State {
    pub(super) streams: HashMap<u64, StreamState>,
    pub(super) pending: usize,
    pub(super) next_id: u64,
    pub(super) next_seq: u64,
    pub(super) shutdown: bool,
    /// Frames handed to a model that answers through `submit`, not answered by it yet.
    pub(super) in_flight: usize,
    /// Calls out with such a model, by call number.
    pub(super) open_calls: HashMap<u64, OpenCall>,
}

/// A call handed to a model that answers through `submit`, while any of its frames is
/// unanswered by the model.
pub(super) struct OpenCall {
    /// Each frame's job, until it has its reply (from the model, or the deadline).
    pub(super) targets: Vec<Option<ReplyTo>>,
    /// Which frames the model has answered.
    pub(super) answered: Vec<bool>,
    pub(super) unanswered: usize,
    pub(super) prompt_version: Option<u64>,
    pub(super) started: Instant,
    pub(super) deadline: Instant,
    pub(super) failed: bool,
}

/// The engine's side that every thread and handle holds.
pub(super) struct Shared {
    pub(super) state: Mutex<State>,
    /// Woken on every change a waiting thread may care about: a frame queued, a slot freed,
    /// a call out, shutdown.
    pub(super) wake: Condvar,
    pub(super) settings: EngineSettings,
    pub(super) metrics: Arc<Metrics>,
    pub(super) info: ModelInfo,
    pub(super) prompt_rule: PromptRule,
    pub(super) model_name: Arc<str>,
    pub(super) threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Shared {
    /// The state, also after a thread panicked while holding the lock.
    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits for the next wake-up.
    pub(super) fn wait<'a>(&self, st: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        self.wake.wait(st).unwrap_or_else(|e| e.into_inner())
    }

    /// Waits for the next wake-up, or `timeout`.
    pub(super) fn wait_timeout<'a>(
        &self,
        st: MutexGuard<'a, State>,
        timeout: Duration,
    ) -> MutexGuard<'a, State> {
        self.wake
            .wait_timeout(st, timeout)
            .unwrap_or_else(|e| e.into_inner())
            .0
    }
}
