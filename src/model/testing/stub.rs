//! The stand-in for a real model that the tests share and `MODEL_TYPE=null` runs: it answers
//! each frame with a fixed or computed output, and on demand waits for the test, sleeps,
//! fails or panics for a given prompt, or holds its calls for the test to answer (as a model
//! that waits on a remote server does). It counts the calls it gets.

use crate::frame::Frame;
use crate::model::{BatchReplies, ModelError, ModelInfo, PromptRule, VisionLanguageModel};
use crate::prompt::PromptRef;
use serde_json::Value;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// One frame as the stub sees it when it computes the frame's output.
pub struct Seen<'a> {
    pub frame: &'a Frame,
    pub prompt: &'a PromptRef,
    /// How many frames the call holds.
    pub batch: usize,
}

/// What the stub does instead of answering a call with a given prompt.
#[derive(Clone, Debug)]
pub enum Fault {
    /// The call fails with [`ModelError::Inference`] and this text.
    Error(String),
    /// The model panics with this message.
    Panic(String),
    /// The call answers no frame: `infer` returns no outputs at all, whatever the batch (a
    /// model that breaks its contract).
    NoOutputs,
}

/// A call handed to a stub that holds its calls: its frames' indices, and where their
/// answers go.
#[derive(Clone)]
pub struct HeldCall {
    pub indices: Vec<u64>,
    pub replies: BatchReplies,
}

/// The calls a holding stub was handed, oldest first, for the test to answer. Cheap to
/// clone.
#[derive(Clone, Default)]
pub struct HeldCalls(Arc<Mutex<Vec<HeldCall>>>);

impl HeldCalls {
    pub fn lock(&self) -> MutexGuard<'_, Vec<HeldCall>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The `n`th call handed over (from 0).
    pub fn get(&self, n: usize) -> HeldCall {
        self.lock()[n].clone()
    }
}

/// How many calls (`infer` or `submit`) a stub got. Cheap to clone.
#[derive(Clone, Default)]
pub struct CallCount(Arc<AtomicUsize>);

impl CallCount {
    pub fn get(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

type Answer = Box<dyn Fn(&Seen) -> Value + Send>;

/// A model that does no inference. Built with [`StubModel::named`] and the `with_`,
/// `answering`, `failing_on`, `gated` and `holding_calls` steps.
pub struct StubModel {
    info: ModelInfo,
    prompt_rule: PromptRule,
    answer: Answer,
    faults: Vec<(String, Fault)>,
    pause: Duration,
    /// One `()` from the test lets one `infer` call through.
    gate: Option<Receiver<()>>,
    /// Set for a stub that answers through `submit`: at most this many frames out, and
    /// where its calls wait for the test.
    held: Option<(usize, HeldCalls)>,
    calls: CallCount,
}

impl StubModel {
    /// A stub called `name` that answers `{}` for every frame: task `test`, input side
    /// 224, any prompt, on the CPU.
    pub fn named(name: &str) -> Self {
        Self {
            info: ModelInfo {
                name: name.into(),
                task: "test".into(),
                input_size: 224,
                device: "cpu".into(),
                dtype: "none".into(),
            },
            prompt_rule: PromptRule::Any,
            answer: Box::new(|_| serde_json::json!({})),
            faults: Vec::new(),
            pause: Duration::ZERO,
            gate: None,
            held: None,
            calls: CallCount::default(),
        }
    }

    pub fn with_task(mut self, task: &str) -> Self {
        self.info.task = task.into();
        self
    }

    pub fn with_input_size(mut self, side: u32) -> Self {
        self.info.input_size = side;
        self
    }

    /// Asks of prompts what a scoring or detection model asks.
    pub fn with_prompt_rule(mut self, rule: PromptRule) -> Self {
        self.prompt_rule = rule;
        self
    }

    /// Sleeps this long in every `infer` call, to be slower than a stream.
    pub fn with_pause(mut self, pause: Duration) -> Self {
        self.pause = pause;
        self
    }

    /// Answers each frame with what `answer` computes from it.
    pub fn answering(mut self, answer: impl Fn(&Seen) -> Value + Send + 'static) -> Self {
        self.answer = Box::new(answer);
        self
    }

    /// Fails every call whose prompt is `prompt` this way.
    pub fn failing_on(mut self, prompt: &str, fault: Fault) -> Self {
        self.faults.push((prompt.to_string(), fault));
        self
    }

    /// Lets one `infer` call through per `()` sent, to hold the model busy while frames
    /// queue; once the sender is dropped, every call goes through.
    pub fn gated(mut self) -> (Sender<()>, Self) {
        let (tx, rx) = channel();
        self.gate = Some(rx);
        (tx, self)
    }

    /// Answers through `submit`, with at most `max_inflight` frames out: each call waits in
    /// the returned list until the test answers it.
    pub fn holding_calls(mut self, max_inflight: usize) -> (HeldCalls, Self) {
        let held = HeldCalls::default();
        self.held = Some((max_inflight, held.clone()));
        (held, self)
    }

    /// Counts the calls this stub gets, from now on and from wherever it runs.
    pub fn call_count(&self) -> CallCount {
        self.calls.clone()
    }

    fn fault_for(&self, prompt: &PromptRef) -> Option<&Fault> {
        let text = &*prompt.text;
        self.faults
            .iter()
            .find_map(|(p, fault)| (p == text).then_some(fault))
    }

    fn outputs(&self, frames: &[&Frame], prompt: &PromptRef) -> Vec<Value> {
        let batch = frames.len();
        frames
            .iter()
            .map(|frame| {
                (self.answer)(&Seen {
                    frame,
                    prompt,
                    batch,
                })
            })
            .collect()
    }
}

impl VisionLanguageModel for StubModel {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn prompt_rule(&self) -> PromptRule {
        self.prompt_rule
    }

    fn infer(&mut self, frames: &[&Frame], prompt: &PromptRef) -> Result<Vec<Value>, ModelError> {
        self.calls.0.fetch_add(1, Ordering::SeqCst);
        if let Some(gate) = &self.gate {
            let _ = gate.recv();
        }
        if !self.pause.is_zero() {
            std::thread::sleep(self.pause);
        }
        match self.fault_for(prompt) {
            Some(Fault::Error(error)) => Err(ModelError::Inference(error.clone().into())),
            Some(Fault::Panic(message)) => panic!("{message}"),
            Some(Fault::NoOutputs) => Ok(Vec::new()),
            None => Ok(self.outputs(frames, prompt)),
        }
    }

    fn max_inflight_frames(&self) -> Option<usize> {
        self.held.as_ref().map(|(max_inflight, _)| *max_inflight)
    }

    /// Holds the call for the test when made with `holding_calls`, else answers at once.
    fn submit(&mut self, frames: Vec<Frame>, prompt: &PromptRef, replies: BatchReplies) {
        self.calls.0.fetch_add(1, Ordering::SeqCst);
        match self.fault_for(prompt) {
            Some(Fault::Error(error)) => replies.fail_all(frames.len(), error),
            Some(Fault::Panic(message)) => panic!("{message}"),
            Some(Fault::NoOutputs) => {}
            None => self.answer_or_hold(frames, prompt, replies),
        }
    }
}

impl StubModel {
    fn answer_or_hold(&self, frames: Vec<Frame>, prompt: &PromptRef, replies: BatchReplies) {
        if let Some((_, held)) = &self.held {
            let indices = frames.iter().map(|f| f.index).collect();
            held.lock().push(HeldCall { indices, replies });
            return;
        }
        let refs: Vec<&Frame> = frames.iter().collect();
        for (i, output) in self.outputs(&refs, prompt).into_iter().enumerate() {
            replies.frame(i, Ok(output));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::testing::null::NullModel;
    use bytes::Bytes;

    fn frame(index: u64) -> Frame {
        let mut f = Frame::new(2, 2, Bytes::from(vec![0u8; 12])).unwrap();
        f.index = index;
        f
    }

    fn prompt(text: &str) -> PromptRef {
        PromptRef {
            text: text.into(),
            version: None,
        }
    }

    #[test]
    fn the_null_model_answers_an_empty_object_per_frame_and_says_it_is_null() {
        let mut null = NullModel::new(384);
        let (a, b) = (frame(0), frame(1));
        let out = null.infer(&[&a, &b], &prompt("anything")).unwrap();
        assert_eq!(out, [serde_json::json!({}), serde_json::json!({})]);
        assert!(null.infer(&[], &prompt("")).unwrap().is_empty());
        let info = null.info();
        assert_eq!(
            (&*info.name, &*info.task, info.input_size),
            ("null", "none", 384)
        );
        assert_eq!((&*info.device, &*info.dtype), ("cpu", "none"));
        assert_eq!(null.prompt_rule(), PromptRule::Any);
        assert_eq!(null.max_inflight_frames(), None);
    }

    #[test]
    fn a_stub_computes_its_answers_fails_on_demand_and_counts_its_calls() {
        let mut stub = StubModel::named("s")
            .answering(|seen| serde_json::json!([seen.frame.index, seen.batch]))
            .failing_on("fail", Fault::Error("no luck".into()))
            .failing_on("short", Fault::NoOutputs);
        let calls = stub.call_count();
        let (a, b) = (frame(3), frame(4));
        let out = stub.infer(&[&a, &b], &prompt("p")).unwrap();
        assert_eq!(out, [serde_json::json!([3, 2]), serde_json::json!([4, 2])]);
        let error = stub.infer(&[&a], &prompt("fail")).unwrap_err();
        assert_eq!(error.to_string(), "inference failed: no luck");
        assert!(stub.infer(&[&a], &prompt("short")).unwrap().is_empty());
        assert_eq!(calls.get(), 3);
    }

    #[test]
    fn a_holding_stub_keeps_each_call_for_the_test() {
        let (held, mut stub) = StubModel::named("s").holding_calls(2);
        assert_eq!(stub.max_inflight_frames(), Some(2));
        let answers: Arc<Mutex<Vec<(usize, String)>>> = Arc::default();
        let log = answers.clone();
        let replies = BatchReplies::new(move |i, r| {
            log.lock().unwrap().push((i, format!("{r:?}")));
        });
        stub.submit(vec![frame(7), frame(8)], &prompt("p"), replies);
        assert_eq!(held.len(), 1);
        assert_eq!(held.get(0).indices, [7, 8]);
        assert!(answers.lock().unwrap().is_empty(), "nothing answered yet");
        held.get(0).replies.frame(1, Ok(serde_json::json!({})));
        assert_eq!(answers.lock().unwrap().len(), 1);
    }
}
