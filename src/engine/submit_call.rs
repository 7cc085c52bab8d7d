//! For a model that answers through `submit` (one that waits on a remote server): calls are
//! handed over without waiting, each frame is answered as the model answers it, and a
//! deadline thread fails the frames still unanswered at INFERENCE_TIMEOUT_MS. A frame's
//! slot stays taken until the model answers it, so the server never has more than the
//! model's limit to work on.

use super::batch::PromptGroup;
use super::call_error::CallError;
use super::model_thread::{ModelCall, count_call};
use super::reply::ReplyOutcome;
use super::state::{OpenCall, Shared, State};
use crate::model::{BatchReplies, ModelError};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Instant;

/// Hands call `seq`, the frames of `group`, to the model without waiting for it: the
/// frames' slots are taken now and freed as the model answers them.
pub(super) fn hand_over(
    shared: &Arc<Shared>,
    seq: u64,
    group: PromptGroup,
    calls: &mpsc::Sender<ModelCall>,
) {
    let (prompt, frames, targets) = group.split();
    let n = frames.len();
    let started = Instant::now();
    {
        let mut st = shared.lock();
        st.in_flight += n;
        st.open_calls.insert(
            seq,
            OpenCall {
                targets: targets.into_iter().map(Some).collect(),
                answered: vec![false; n],
                unanswered: n,
                prompt_version: prompt.version,
                started,
                deadline: started + shared.settings.inference_timeout,
                failed: false,
            },
        );
    }
    // The deadline thread may be waiting with no call out.
    shared.wake.notify_all();
    count_call(&shared.metrics, n);
    let weak = Arc::downgrade(shared);
    let replies = BatchReplies::new(move |index, result| {
        if let Some(shared) = weak.upgrade() {
            answer_frame(&shared, seq, index, result);
        }
    });
    let call = ModelCall {
        seq,
        frames,
        prompt,
        replies: Some(replies.clone()),
    };
    if calls.send(call).is_err() {
        replies.fail_all(n, &CallError::ModelStopped.to_string());
    }
}

/// Records the model's answer to frame `index` of call `seq` and replies to its job, unless
/// the deadline already did.
fn answer_frame(
    shared: &Shared,
    seq: u64,
    index: usize,
    result: Result<serde_json::Value, ModelError>,
) {
    let mut st = shared.lock();
    let Some(call) = st.open_calls.get_mut(&seq) else {
        return;
    };
    if index >= call.answered.len() || std::mem::replace(&mut call.answered[index], true) {
        return;
    }
    call.unanswered -= 1;
    let latency_ms = call.started.elapsed().as_secs_f64() * 1000.0;
    let outcome = match result {
        Ok(output) => ReplyOutcome::Output(output),
        Err(e) => {
            let error = e.to_string();
            tracing::warn!(%error, "inference failed for a frame");
            if !std::mem::replace(&mut call.failed, true) {
                shared.metrics.inference_errors.inc();
            }
            ReplyOutcome::Error(error)
        }
    };
    if let Some(to) = call.targets[index].take() {
        to.send(call.prompt_version, latency_ms, outcome);
    }
    if call.unanswered == 0 {
        shared
            .metrics
            .batch_latency
            .observe(call.started.elapsed().as_secs_f64());
        st.open_calls.remove(&seq);
    }
    st.in_flight -= 1;
    drop(st);
    // A slot is free: the batcher may take the next frames.
    shared.wake.notify_all();
}

/// The deadline thread: gives the frames still unanswered at INFERENCE_TIMEOUT_MS their
/// error replies, until shutdown. Their slots stay taken until the model answers.
pub(super) fn deadline_loop(shared: &Shared) {
    let mut st = shared.lock();
    while !st.shutdown {
        st = match fail_overdue(shared, &mut st) {
            Some(at) => {
                let wait = at.saturating_duration_since(Instant::now());
                shared.wait_timeout(st, wait)
            }
            None => shared.wait(st),
        };
    }
}

/// Fails the unanswered frames of every call past its deadline; returns the next deadline
/// of a call with frames still unanswered.
fn fail_overdue(shared: &Shared, st: &mut State) -> Option<Instant> {
    let timeout = shared.settings.inference_timeout;
    let now = Instant::now();
    let mut next: Option<Instant> = None;
    for call in st.open_calls.values_mut() {
        if call.targets.iter().all(Option::is_none) {
            continue;
        }
        if call.deadline > now {
            next = Some(next.map_or(call.deadline, |n| n.min(call.deadline)));
            continue;
        }
        let error = CallError::TimedOut(timeout).to_string();
        tracing::warn!(%error, "frames of a call given up on");
        if !std::mem::replace(&mut call.failed, true) {
            shared.metrics.inference_errors.inc();
        }
        let version = call.prompt_version;
        for to in call.targets.iter_mut().filter_map(Option::take) {
            let outcome = ReplyOutcome::Error(error.clone());
            to.send(version, timeout.as_secs_f64() * 1000.0, outcome);
        }
    }
    next
}
