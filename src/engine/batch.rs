//! A batch as the batcher takes it from the streams' queues: up to BATCH_WINDOW_MS of waiting
//! for more frames, the stale ends of bursts, then the longest-waiting frames first; and the
//! frames the model is to see, grouped by prompt, one model call per group.

use super::reply::{FrameMeta, Reply, ReplyOutcome, ReplyTo};
use super::state::{Shared, State};
use crate::frame::Frame;
use crate::prompt::PromptRef;
use std::sync::MutexGuard;
use std::time::{Duration, Instant};
use tokio::sync::mpsc as tokio_mpsc;

/// One frame taken for a batch.
pub(super) struct Taken {
    frame: Frame,
    live: bool,
    /// Waited past LIVE_QUEUE_MS while newer frames of its stream waited behind it: it is
    /// answered as too old, unseen.
    stale: bool,
    prompt: PromptRef,
    replies: tokio_mpsc::UnboundedSender<Reply>,
}

/// Frames that share a prompt: one model call.
pub(super) struct PromptGroup {
    prompt: PromptRef,
    taken: Vec<Taken>,
}

impl PromptGroup {
    /// Parts the frames, for the model, from the jobs waiting for their replies (in the
    /// same order), with the prompt they share.
    pub(super) fn split(self) -> (PromptRef, Vec<Frame>, Vec<ReplyTo>) {
        let mut frames = Vec::with_capacity(self.taken.len());
        let mut targets = Vec::with_capacity(self.taken.len());
        for mut t in self.taken {
            targets.push(ReplyTo {
                meta: FrameMeta::take_from(&mut t.frame),
                replies: t.replies,
            });
            frames.push(t.frame);
        }
        (self.prompt, frames, targets)
    }
}

/// Waits for frames (and, with `max_inflight`, a free slot) and takes up to one batch;
/// `None` once shut down.
pub(super) fn take_batch(shared: &Shared, max_inflight: Option<usize>) -> Option<Vec<Taken>> {
    let free = |st: &State| max_inflight.map_or(usize::MAX, |n| n.saturating_sub(st.in_flight));
    let mut st = shared.lock();
    while (st.pending == 0 || free(&st) == 0) && !st.shutdown {
        st = shared.wait(st);
    }
    let batch_size = shared.settings.max_batch_size.min(free(&st));
    let mut st = wait_out_window(shared, st, batch_size);
    if st.shutdown {
        return None;
    }
    let mut taken = take_stale(&mut st, shared.settings.live_queue);
    taken.extend(take_longest_waiting(&mut st, batch_size));
    Some(taken)
}

/// Waits up to BATCH_WINDOW_MS for `batch_size` frames or a frame from every stream.
fn wait_out_window<'a>(
    shared: &Shared,
    mut st: MutexGuard<'a, State>,
    batch_size: usize,
) -> MutexGuard<'a, State> {
    // Once every stream has a frame, waiting out the window can only add frames of streams
    // already in the batch, which then wait one call longer.
    let deadline = Instant::now() + shared.settings.batch_window;
    while !st.shutdown
        && st.pending < batch_size
        && st.streams.values().any(|s| s.waiting.is_empty())
    {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        st = shared.wait_timeout(st, deadline - now);
    }
    st
}

/// A burst kept whole that the model cannot get through in LIVE_QUEUE_MS gives way to its
/// newest frames: takes a live stream's frames past its count that waited longer than that,
/// to be answered as too old.
fn take_stale(st: &mut State, live_queue: Duration) -> Vec<Taken> {
    let mut taken = Vec::new();
    for s in st.streams.values_mut() {
        while s.waiting.len() > s.live_depth
            && s.waiting
                .front()
                .is_some_and(|p| p.live && p.frame.received.elapsed() >= live_queue)
        {
            let (p, _) = s.drop_oldest().expect("checked above");
            taken.push(Taken {
                frame: p.frame,
                live: true,
                stale: true,
                prompt: s.prompt.current(),
                replies: s.replies.clone(),
            });
        }
    }
    st.pending -= taken.len();
    taken
}

/// Takes up to `batch_size` frames, longest-waiting first, so that no stream starves when
/// there are more than a batch.
fn take_longest_waiting(st: &mut State, batch_size: usize) -> Vec<Taken> {
    // A stream's frames are listed in queue order, so taking each from the front matches.
    let mut order: Vec<(u64, u64)> = st
        .streams
        .iter()
        .flat_map(|(id, s)| s.waiting.iter().map(move |p| (p.seq, *id)))
        .collect();
    order.sort_unstable();
    order.truncate(batch_size);
    let mut taken = Vec::with_capacity(order.len());
    for (_, id) in order {
        let s = st.streams.get_mut(&id).expect("listed above");
        let p = s.waiting.pop_front().expect("listed above");
        taken.push(Taken {
            frame: p.frame,
            live: p.live,
            stale: false,
            prompt: s.prompt.current(),
            replies: s.replies.clone(),
        });
    }
    st.pending -= taken.len();
    taken
}

/// Answers the frames too old for the model (stale, or live and past MAX_FRAME_AGE_MS) and
/// groups the rest by prompt, in the order each prompt first appears.
pub(super) fn into_groups(shared: &Shared, taken: Vec<Taken>) -> Vec<PromptGroup> {
    let metrics = &shared.metrics;
    let mut groups: Vec<PromptGroup> = Vec::new();
    for mut t in taken {
        let age = t.frame.received.elapsed();
        if t.stale || (t.live && age > shared.settings.max_frame_age) {
            metrics.frames_too_old.inc();
            let to = ReplyTo {
                meta: FrameMeta::take_from(&mut t.frame),
                replies: t.replies,
            };
            to.send(t.prompt.version, 0.0, ReplyOutcome::TooOld);
            continue;
        }
        metrics.frame_age.observe(age.as_secs_f64());
        match groups.iter_mut().find(|g| g.prompt == t.prompt) {
            Some(g) => g.taken.push(t),
            None => groups.push(PromptGroup {
                prompt: t.prompt.clone(),
                taken: vec![t],
            }),
        }
    }
    groups
}
