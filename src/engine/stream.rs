//! A job's place in the engine: registering its stream, queueing its frames (the oldest
//! waiting frame gives way when the queue is full, unless it came with the same burst) and
//! receiving their replies.

use super::reply::Reply;
use super::settings::MAX_LIVE_QUEUE_FRAMES;
use super::state::{Pending, Shared, StreamState};
use crate::frame::Frame;
use crate::prompt::PromptFollow;
use std::collections::VecDeque;
use std::sync::Arc;
use tokio::sync::mpsc as tokio_mpsc;

/// What `submit` did with a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Submitted {
    Queued,
    /// Queued, and this many of the oldest frames the model had not taken yet were dropped
    /// for it (more than one only when a stream turned from live to recording).
    Replaced {
        dropped: u64,
    },
    /// The engine is shut down; nothing was queued.
    Closed,
}

/// A job's place in the engine. Dropping it withdraws the waiting frame, if any.
pub struct EngineStream {
    id: u64,
    shared: Arc<Shared>,
    replies: tokio_mpsc::UnboundedReceiver<Reply>,
}

impl EngineStream {
    /// Registers a stream sampled at `fps` (which sizes its live queue); see
    /// `Engine::register`.
    pub(super) fn register(shared: &Arc<Shared>, prompt: PromptFollow, fps: f64) -> Self {
        let live_depth = shared.settings.live_queue_frames(fps);
        let (tx, rx) = tokio_mpsc::unbounded_channel();
        let mut st = shared.lock();
        let id = st.next_id;
        st.next_id += 1;
        if !st.shutdown {
            st.streams.insert(
                id,
                StreamState {
                    waiting: VecDeque::new(),
                    live_depth,
                    prompt,
                    replies: tx,
                },
            );
        }
        EngineStream {
            id,
            shared: shared.clone(),
            replies: rx,
        }
    }

    /// Hands a frame to the engine, dropping this stream's oldest waiting frame if its
    /// queue is full. `live` frames are skipped once older than MAX_FRAME_AGE_MS.
    pub fn submit(&self, frame: Frame, live: bool) -> Submitted {
        let burst_window = self.shared.settings.live_queue;
        let mut st = self.shared.lock();
        let mut seq = st.next_seq;
        st.next_seq += 1;
        let Some(stream) = st.streams.get_mut(&self.id) else {
            return Submitted::Closed;
        };
        let depth = if live { stream.live_depth } else { 1 };
        let mut dropped_frames = 0;
        while let Some(oldest) = stream.waiting.front() {
            let waiting = stream.waiting.len();
            let full = waiting >= depth;
            // The oldest waiting frame came with this burst: keep the burst whole.
            let same_burst = live
                && waiting < MAX_LIVE_QUEUE_FRAMES
                && oldest.frame.received.elapsed() < burst_window;
            if !full || same_burst {
                break;
            }
            let Some((_, freed)) = stream.drop_oldest() else {
                break;
            };
            seq = freed;
            dropped_frames += 1;
        }
        stream.waiting.push_back(Pending { frame, live, seq });
        st.pending = st.pending + 1 - dropped_frames;

        drop(st);
        self.shared.wake.notify_all();
        if dropped_frames > 0 {
            Submitted::Replaced {
                dropped: dropped_frames as u64,
            }
        } else {
            Submitted::Queued
        }
    }

    /// The next reply; `None` once the engine has shut down.
    pub async fn recv(&mut self) -> Option<Reply> {
        self.replies.recv().await
    }

    /// A reply that is already there, without waiting.
    pub fn try_recv(&mut self) -> Option<Reply> {
        self.replies.try_recv().ok()
    }
}

impl Drop for EngineStream {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        if let Some(s) = st.streams.remove(&self.id) {
            st.pending -= s.waiting.len();
        }
    }
}
