//! The batcher thread: takes batches from the streams' queues, answers the frames too old
//! for the model, and hands each prompt's frames to the model thread, waiting for the
//! answer or not by the kind of model.

use super::batch::{into_groups, take_batch};
use super::infer_call::InferCaller;
use super::model_thread::ModelCall;
use super::state::Shared;
use super::submit_call::hand_over;
use std::sync::Arc;
use std::sync::mpsc;

/// How the batcher reaches the model, by the kind of model.
pub(super) enum ModelPath {
    /// A model that computes in `infer`: one call at a time, waited on.
    Infer(InferCaller),
    /// A model that answers through `submit`: calls handed over without waiting, with at
    /// most `max_inflight` frames unanswered.
    Submit {
        calls: mpsc::Sender<ModelCall>,
        max_inflight: usize,
    },
}

/// Forms and hands over batches until shutdown.
pub(super) fn batch_loop(shared: &Arc<Shared>, mut path: ModelPath) {
    let max_inflight = match &path {
        ModelPath::Infer(_) => None,
        ModelPath::Submit { max_inflight, .. } => Some(*max_inflight),
    };
    let mut seq = 0u64;
    while let Some(taken) = take_batch(shared, max_inflight) {
        for group in into_groups(shared, taken) {
            seq += 1;
            match &mut path {
                ModelPath::Infer(caller) => caller.run(shared, seq, group),
                ModelPath::Submit { calls, .. } => hand_over(shared, seq, group, calls),
            }
        }
    }
}
