//! The inference engine: one model on its own OS thread, shared by every job of the worker,
//! fed in batches formed across all running streams.
//!
//! Each job registers a stream with a short queue of waiting frames: one frame for a
//! recording (its job sends the next frame once the last is answered), and for a live
//! stream LIVE_QUEUE_MS worth of frames at the job's rate, plus every frame that arrived
//! within the last LIVE_QUEUE_MS (at most [`MAX_LIVE_QUEUE_FRAMES`]): live HLS arrives a
//! whole segment at a time, sometimes two when a playlist reload falls just after a second
//! segment appeared, and a queue bounded by count alone would make each burst replace its
//! own frames though the model keeps up on average. Past that, the oldest waiting frame is
//! dropped for the new one, and when the model takes frames, those past the count that
//! waited longer than LIVE_QUEUE_MS are answered as too old: a slow model makes streams skip
//! frames instead of falling further behind. A batcher thread
//! waits up to BATCH_WINDOW_MS for up to MAX_BATCH_SIZE frames (or a frame from every
//! stream), takes the longest-waiting frames first, skips frames older than
//! MAX_FRAME_AGE_MS, groups the rest by prompt (one `infer` call per prompt) and bounds each
//! call with INFERENCE_TIMEOUT_MS. The model itself runs on a second thread, so a call that never
//! returns can be given up on: its frames get error entries and the engine goes on once the
//! model is free again. A model error or panic fails only that call's frames.
//!
//! A model that waits on a remote server (`max_inflight_frames` is `Some`) is not waited on:
//! the model thread hands each call to the model's `submit`, which returns at once, and the
//! batcher goes on forming batches while earlier ones are out, as long as fewer frames than
//! the model's limit are unanswered (taking fewer frames than MAX_BATCH_SIZE when only a few
//! slots are free). Each frame is answered on its own, from the model's threads, straight to
//! its job. A deadline thread gives frames still unanswered at INFERENCE_TIMEOUT_MS their
//! error entries; their slots stay taken until the model really answers, so the server never
//! has more than the limit to work on.

use crate::frame::Frame;
use crate::metrics::Metrics;
use crate::model::{BatchReplies, ModelError, ModelInfo, PromptRule, VisionLanguageModel};
use crate::prompt::PromptFollow;
use crate::prompt::PromptRef;
use std::collections::{HashMap, VecDeque};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::sync::mpsc as tokio_mpsc;

/// The engine's knobs, from the worker's settings.
#[derive(Clone, Debug)]
pub struct EngineSettings {
    pub max_batch_size: usize,
    pub batch_window: Duration,
    pub max_frame_age: Duration,
    pub inference_timeout: Duration,
    /// How much of a live stream, in time at the job's frame rate, may wait for the model.
    pub live_queue: Duration,
}

impl EngineSettings {
    /// How many frames of a live stream sampled at `fps` may wait for the model: LIVE_QUEUE_MS
    /// worth, rounded up, at least one and at most `MAX_LIVE_QUEUE_FRAMES`.
    pub fn live_queue_frames(&self, fps: f64) -> usize {
        let frames = (fps * self.live_queue.as_secs_f64()).ceil();
        if frames.is_finite() && frames >= 1.0 {
            (frames as usize).min(MAX_LIVE_QUEUE_FRAMES)
        } else {
            1
        }
    }
}

/// Bounds the frames one live stream holds in memory, whatever LIVE_QUEUE_MS and fps say.
pub const MAX_LIVE_QUEUE_FRAMES: usize = 64;

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
    fn take_from(frame: &mut Frame) -> Self {
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

struct Pending {
    frame: Frame,
    /// Frames of a live stream expire; frames of a recording wait as long as it takes.
    live: bool,
    /// Place in line across all streams: lower goes first.
    seq: u64,
}

struct StreamState {
    /// Oldest first; `seq`s rise along the queue.
    waiting: VecDeque<Pending>,
    /// How many live frames may wait (a recording's frames wait one at a time).
    live_depth: usize,
    prompt: PromptFollow,
    replies: tokio_mpsc::UnboundedSender<Reply>,
}

impl StreamState {
    /// Removes the oldest waiting frame. Every frame behind it moves up into the place in
    /// line of the one before it, so a stream that always has newer frames is not pushed to
    /// the back when there are more streams than a batch. Returns the freed place (the
    /// newest frame's old `seq`, for a frame queued next) with the frame.
    fn drop_oldest(&mut self) -> Option<(Pending, u64)> {
        let dropped = self.waiting.pop_front()?;
        let mut carry = dropped.seq;
        for p in self.waiting.iter_mut() {
            std::mem::swap(&mut p.seq, &mut carry);
        }
        Some((dropped, carry))
    }
}

#[derive(Default)]
struct State {
    streams: HashMap<u64, StreamState>,
    pending: usize,
    next_id: u64,
    next_seq: u64,
    shutdown: bool,
    /// Frames handed to a model that answers through `submit`, not answered by it yet.
    in_flight: usize,
    /// Calls out with such a model, by call number.
    open_calls: HashMap<u64, OpenCall>,
}

/// A call handed to a model that answers through `submit`, while any of its frames is
/// unanswered by the model.
struct OpenCall {
    /// Each frame's job, until it has its reply (from the model, or the deadline).
    targets: Vec<Option<(FrameMeta, tokio_mpsc::UnboundedSender<Reply>)>>,
    /// Which frames the model has answered.
    answered: Vec<bool>,
    unanswered: usize,
    prompt_version: Option<u64>,
    started: Instant,
    deadline: Instant,
    failed: bool,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    settings: EngineSettings,
    metrics: Arc<Metrics>,
    info: ModelInfo,
    prompt_rule: PromptRule,
    model_name: Arc<str>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A handle on the worker's engine. Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    shared: Arc<Shared>,
}

/// One frame taken for a batch.
struct Taken {
    frame: Frame,
    live: bool,
    /// Waited past LIVE_QUEUE_MS while newer frames of its stream waited behind it: it is
    /// answered as too old, unseen.
    stale: bool,
    prompt: PromptRef,
    replies: tokio_mpsc::UnboundedSender<Reply>,
}

struct ModelCall {
    seq: u64,
    frames: Vec<Frame>,
    prompt: PromptRef,
    /// Set for a model that answers through `submit`: where its answers go.
    replies: Option<BatchReplies>,
}

struct ModelDone {
    seq: u64,
    result: Result<Vec<serde_json::Value>, String>,
    elapsed: Duration,
}

impl Engine {
    /// Starts the batcher and model threads. The model moves to its own thread and stays
    /// there until `shutdown`.
    pub fn start(
        model: Box<dyn VisionLanguageModel>,
        settings: EngineSettings,
        metrics: Arc<Metrics>,
    ) -> Engine {
        let info = model.info().clone();
        let max_inflight = model.max_inflight_frames().map(|n| n.max(1));
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
            model_name: info.name.as_str().into(),
            info,
            prompt_rule: model.prompt_rule(),
            settings,
            metrics,
            threads: Mutex::new(Vec::new()),
        });
        let (call_tx, call_rx) = mpsc::channel::<ModelCall>();
        let (done_tx, done_rx) = mpsc::channel::<ModelDone>();
        let model_thread = std::thread::Builder::new()
            .name("fr-model".into())
            .spawn(move || model_loop(model, call_rx, done_tx))
            .expect("spawning the model thread");
        let batcher = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("fr-batcher".into())
                .spawn(move || batch_loop(&shared, max_inflight, call_tx, done_rx))
                .expect("spawning the batcher thread")
        };
        let mut threads = vec![batcher, model_thread];
        if max_inflight.is_some() {
            let shared = shared.clone();
            threads.push(
                std::thread::Builder::new()
                    .name("fr-deadlines".into())
                    .spawn(move || deadline_loop(&shared))
                    .expect("spawning the deadline thread"),
            );
        }
        shared
            .threads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(threads);
        Engine { shared }
    }

    pub fn model_info(&self) -> &ModelInfo {
        &self.shared.info
    }

    /// What the model needs of a prompt.
    pub fn prompt_rule(&self) -> PromptRule {
        self.shared.prompt_rule
    }

    /// The model name written into result entries.
    pub fn model_name(&self) -> Arc<str> {
        self.shared.model_name.clone()
    }

    /// Registers a job's stream, sampled at `fps` (which sizes its live queue). The prompt
    /// is read when a frame is taken for a batch, so a new version of a followed prompt
    /// applies from the next batch.
    pub fn register(&self, prompt: PromptFollow, fps: f64) -> EngineStream {
        let live_depth = self.shared.settings.live_queue_frames(fps);
        let (tx, rx) = tokio_mpsc::unbounded_channel();
        let mut st = self.shared.lock();
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
            shared: self.shared.clone(),
            replies: rx,
        }
    }

    /// Stops taking frames, lets the model finish its current call and waits up to
    /// `timeout` for both threads to end; true when they did. Blocking: call it from a
    /// blocking context (`spawn_blocking`, or after the runtime has stopped).
    pub fn shutdown(&self, timeout: Duration) -> bool {
        {
            let mut st = self.shared.lock();
            st.shutdown = true;
            // Dropping the reply senders tells waiting jobs the engine is gone.
            st.streams.clear();
            st.open_calls.clear();
            st.pending = 0;
        }
        self.shared.wake.notify_all();
        let deadline = Instant::now() + timeout;
        let mut threads = std::mem::take(
            &mut *self
                .shared
                .threads
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        );
        while Instant::now() < deadline && threads.iter().any(|t| !t.is_finished()) {
            std::thread::sleep(Duration::from_millis(5));
        }
        let all = threads.iter().all(|t| t.is_finished());
        for t in threads.drain(..) {
            if t.is_finished() {
                let _ = t.join();
            }
        }
        all
    }
}

/// A job's place in the engine. Dropping it withdraws the waiting frame, if any.
pub struct EngineStream {
    id: u64,
    shared: Arc<Shared>,
    replies: tokio_mpsc::UnboundedReceiver<Reply>,
}

impl EngineStream {
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

/// Waits for frames (and, with `max_inflight`, a free slot) and takes up to one batch;
/// `None` once shut down.
fn take_batch(shared: &Shared, max_inflight: Option<usize>) -> Option<Vec<Taken>> {
    let settings = &shared.settings;
    let free = |st: &State| max_inflight.map_or(usize::MAX, |n| n.saturating_sub(st.in_flight));
    let mut st = shared.lock();
    while (st.pending == 0 || free(&st) == 0) && !st.shutdown {
        st = shared.wake.wait(st).unwrap_or_else(|e| e.into_inner());
    }
    let batch_size = settings.max_batch_size.min(free(&st));
    // Once every stream has a frame, waiting out the window can only add frames of streams
    // already in the batch, which then wait one call longer.
    let deadline = Instant::now() + settings.batch_window;
    while !st.shutdown
        && st.pending < batch_size
        && st.streams.values().any(|s| s.waiting.is_empty())
    {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        st = shared
            .wake
            .wait_timeout(st, deadline - now)
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
    if st.shutdown {
        return None;
    }
    // A burst kept whole that the model cannot get through in LIVE_QUEUE_MS gives way to
    // its newest frames: a live stream's frames past its count that waited longer than that
    // are answered as too old.
    let mut taken = Vec::new();
    for s in st.streams.values_mut() {
        while s.waiting.len() > s.live_depth
            && s.waiting
                .front()
                .is_some_and(|p| p.live && p.frame.received.elapsed() >= settings.live_queue)
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
    // Longest-waiting frames first, so no stream starves when there are more than a batch.
    // A stream's frames are listed in queue order, so taking each from the front matches.
    let mut order: Vec<(u64, u64)> = st
        .streams
        .iter()
        .flat_map(|(id, s)| s.waiting.iter().map(move |p| (p.seq, *id)))
        .collect();
    order.sort_unstable();
    order.truncate(batch_size);
    for (_, id) in order {
        let s = st.streams.get_mut(&id).expect("listed above");
        let p = s.waiting.pop_front().expect("listed above");
        let prompt = s.prompt.current();
        let replies = s.replies.clone();
        st.pending -= 1;
        taken.push(Taken {
            frame: p.frame,
            live: p.live,
            stale: false,
            prompt,
            replies,
        });
    }
    Some(taken)
}

fn batch_loop(
    shared: &Arc<Shared>,
    max_inflight: Option<usize>,
    calls: mpsc::Sender<ModelCall>,
    done: mpsc::Receiver<ModelDone>,
) {
    let mut seq = 0u64;
    // A call given up on that the model may still be running.
    let mut busy: Option<u64> = None;
    while let Some(taken) = take_batch(shared, max_inflight) {
        let metrics = &shared.metrics;
        let mut groups: Vec<(PromptRef, Vec<Taken>)> = Vec::new();
        for t in taken {
            let age = t.frame.received.elapsed();
            if t.stale || (t.live && age > shared.settings.max_frame_age) {
                metrics.frames_too_old.inc();
                let mut frame = t.frame;
                let _ = t.replies.send(Reply {
                    meta: FrameMeta::take_from(&mut frame),
                    prompt_version: t.prompt.version,
                    latency_ms: 0.0,
                    outcome: ReplyOutcome::TooOld,
                });
                continue;
            }
            metrics.frame_age.observe(age.as_secs_f64());
            match groups.iter_mut().find(|(p, _)| *p == t.prompt) {
                Some((_, g)) => g.push(t),
                None => groups.push((t.prompt.clone(), vec![t])),
            }
        }
        for (prompt, group) in groups {
            seq += 1;
            if max_inflight.is_some() {
                hand_over_group(shared, seq, prompt, group, &calls);
            } else {
                run_group(shared, seq, &mut busy, prompt, group, &calls, &done);
            }
        }
    }
}

/// Runs one `infer` call for frames that share a prompt and replies to each frame's job.
fn run_group(
    shared: &Shared,
    seq: u64,
    busy: &mut Option<u64>,
    prompt: PromptRef,
    group: Vec<Taken>,
    calls: &mpsc::Sender<ModelCall>,
    done: &mpsc::Receiver<ModelDone>,
) {
    let metrics = &shared.metrics;
    let timeout = shared.settings.inference_timeout;
    let deadline = Instant::now() + timeout;
    let mut frames = Vec::with_capacity(group.len());
    let mut targets = Vec::with_capacity(group.len());
    for mut t in group {
        targets.push((FrameMeta::take_from(&mut t.frame), t.replies));
        frames.push(t.frame);
    }
    let n = frames.len();

    let wait_for = |want: u64| -> Result<ModelDone, RecvTimeoutError> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match done.recv_timeout(left) {
                Ok(d) if d.seq == want => return Ok(d),
                Ok(_) => continue, // a late answer to a call already given up on
                Err(e) => return Err(e),
            }
        }
    };

    let result: Result<(Vec<serde_json::Value>, Duration), String> = (|| {
        if let Some(old) = *busy {
            match wait_for(old) {
                Ok(_) => *busy = None,
                Err(RecvTimeoutError::Timeout) => {
                    return Err(format!(
                        "the model is still busy with a batch that exceeded INFERENCE_TIMEOUT_MS ({} ms)",
                        timeout.as_millis()
                    ));
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err("the model thread has stopped".into());
                }
            }
        }
        if calls
            .send(ModelCall {
                seq,
                frames,
                prompt: prompt.clone(),
                replies: None,
            })
            .is_err()
        {
            return Err("the model thread has stopped".into());
        }
        metrics.inference_batches.inc();
        metrics.inference_frames.add(n as u64);
        metrics.batch_size.observe(n as f64);
        match wait_for(seq) {
            Ok(d) => {
                metrics.batch_latency.observe(d.elapsed.as_secs_f64());
                d.result.map(|out| (out, d.elapsed))
            }
            Err(RecvTimeoutError::Timeout) => {
                *busy = Some(seq);
                Err(format!(
                    "inference exceeded INFERENCE_TIMEOUT_MS ({} ms)",
                    timeout.as_millis()
                ))
            }
            Err(RecvTimeoutError::Disconnected) => Err("the model thread has stopped".into()),
        }
    })();

    match result {
        Ok((outputs, elapsed)) => {
            let latency_ms = elapsed.as_secs_f64() * 1000.0;
            for ((meta, replies), output) in targets.into_iter().zip(outputs) {
                let _ = replies.send(Reply {
                    meta,
                    prompt_version: prompt.version,
                    latency_ms,
                    outcome: ReplyOutcome::Output(output),
                });
            }
        }
        Err(error) => {
            metrics.inference_errors.inc();
            tracing::warn!(%error, frames = n, "inference batch failed");
            let latency_ms = timeout
                .saturating_sub(deadline.saturating_duration_since(Instant::now()))
                .as_secs_f64()
                * 1000.0;
            for (meta, replies) in targets {
                let _ = replies.send(Reply {
                    meta,
                    prompt_version: prompt.version,
                    latency_ms,
                    outcome: ReplyOutcome::Error(error.clone()),
                });
            }
        }
    }
}

/// Hands one group to a model that answers through `submit`, without waiting for it: the
/// frames' slots are taken now and freed as the model answers them.
fn hand_over_group(
    shared: &Arc<Shared>,
    seq: u64,
    prompt: PromptRef,
    group: Vec<Taken>,
    calls: &mpsc::Sender<ModelCall>,
) {
    let n = group.len();
    let mut frames = Vec::with_capacity(n);
    let mut targets = Vec::with_capacity(n);
    for mut t in group {
        targets.push(Some((FrameMeta::take_from(&mut t.frame), t.replies)));
        frames.push(t.frame);
    }
    let started = Instant::now();
    {
        let mut st = shared.lock();
        st.in_flight += n;
        st.open_calls.insert(
            seq,
            OpenCall {
                targets,
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
    let metrics = &shared.metrics;
    metrics.inference_batches.inc();
    metrics.inference_frames.add(n as u64);
    metrics.batch_size.observe(n as f64);
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
        replies.fail_all(n, "the model thread has stopped");
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
    if let Some((meta, replies)) = call.targets[index].take() {
        let _ = replies.send(Reply {
            meta,
            prompt_version: call.prompt_version,
            latency_ms,
            outcome,
        });
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

/// For a model that answers through `submit`: gives the frames still unanswered at
/// INFERENCE_TIMEOUT_MS their error replies. Their slots stay taken until the model answers.
fn deadline_loop(shared: &Shared) {
    let timeout = shared.settings.inference_timeout;
    let mut st = shared.lock();
    while !st.shutdown {
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
            let error = format!(
                "inference exceeded INFERENCE_TIMEOUT_MS ({} ms)",
                timeout.as_millis()
            );
            tracing::warn!(%error, "frames of a call given up on");
            if !std::mem::replace(&mut call.failed, true) {
                shared.metrics.inference_errors.inc();
            }
            for (meta, replies) in call.targets.iter_mut().filter_map(Option::take) {
                let _ = replies.send(Reply {
                    meta,
                    prompt_version: call.prompt_version,
                    latency_ms: timeout.as_secs_f64() * 1000.0,
                    outcome: ReplyOutcome::Error(error.clone()),
                });
            }
        }
        st = match next {
            Some(at) => {
                let wait = at.saturating_duration_since(Instant::now());
                shared
                    .wake
                    .wait_timeout(st, wait)
                    .unwrap_or_else(|e| e.into_inner())
                    .0
            }
            None => shared.wake.wait(st).unwrap_or_else(|e| e.into_inner()),
        };
    }
}

fn model_loop(
    mut model: Box<dyn VisionLanguageModel>,
    calls: mpsc::Receiver<ModelCall>,
    done: mpsc::Sender<ModelDone>,
) {
    while let Ok(call) = calls.recv() {
        if let Some(replies) = call.replies {
            let n = call.frames.len();
            let frames = call.frames;
            let submitted = catch_unwind(AssertUnwindSafe(|| {
                model.submit(frames, &call.prompt, replies.clone())
            }));
            if let Err(panic) = submitted {
                let error = format!("the model panicked: {}", panic_message(&*panic));
                replies.fail_all(n, &error);
            }
            continue;
        }
        let start = Instant::now();
        let refs: Vec<&Frame> = call.frames.iter().collect();
        let result = match catch_unwind(AssertUnwindSafe(|| model.infer(&refs, &call.prompt))) {
            Ok(Ok(out)) if out.len() == refs.len() => Ok(out),
            Ok(Ok(out)) => Err(format!(
                "the model returned {} outputs for {} frames",
                out.len(),
                refs.len()
            )),
            Ok(Err(e)) => Err(e.to_string()),
            Err(panic) => Err(format!("the model panicked: {}", panic_message(&*panic))),
        };
        let elapsed = start.elapsed();
        drop(refs);
        // Free the pixels before answering.
        drop(call.frames);
        if done
            .send(ModelDone {
                seq: call.seq,
                result,
                elapsed,
            })
            .is_err()
        {
            break;
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ModelError;
    use crate::model::testing::null::NullModel;
    use bytes::Bytes;
    use tokio::sync::watch;

    fn frame(index: u64) -> Frame {
        let mut f = Frame::new(2, 2, Bytes::from(vec![0u8; 12])).unwrap();
        f.index = index;
        f.cursor = Some(format!("c{index}"));
        f
    }

    /// A frame that reached the worker longer ago than the live queue's burst window (1 s
    /// in [`settings`]), but not so long that it is too old for the model.
    fn earlier_frame(index: u64) -> Frame {
        let mut f = frame(index);
        f.received = Instant::now() - Duration::from_secs(2);
        f
    }

    fn settings() -> EngineSettings {
        EngineSettings {
            max_batch_size: 8,
            batch_window: Duration::from_millis(20),
            max_frame_age: Duration::from_secs(5),
            inference_timeout: Duration::from_secs(5),
            live_queue: Duration::from_secs(1),
        }
    }

    fn fixed(text: &str) -> PromptFollow {
        PromptFollow::Fixed(PromptRef {
            text: text.into(),
            version: None,
        })
    }

    /// A model that does what the test says: echoes batch sizes and prompts, fails, panics,
    /// or sleeps.
    struct Scripted {
        info: ModelInfo,
        gate: Option<std::sync::mpsc::Receiver<()>>,
    }

    impl Scripted {
        fn new() -> Self {
            Self {
                info: NullModel::new(224).info().clone(),
                gate: None,
            }
        }
    }

    impl Scripted {
        /// A model that answers one call per `()` sent, to hold it busy while frames queue.
        fn gated() -> (std::sync::mpsc::Sender<()>, Self) {
            let (tx, rx) = std::sync::mpsc::channel();
            let mut model = Self::new();
            model.gate = Some(rx);
            (tx, model)
        }
    }

    /// Waits until no frame is waiting: the (gated) model holds whatever was submitted.
    async fn until_the_model_took_everything(engine: &Engine) {
        while engine.shared.lock().pending > 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    impl VisionLanguageModel for Scripted {
        fn info(&self) -> &ModelInfo {
            &self.info
        }
        fn infer(
            &mut self,
            frames: &[&Frame],
            prompt: &PromptRef,
        ) -> Result<Vec<serde_json::Value>, ModelError> {
            if let Some(gate) = &self.gate {
                let _ = gate.recv();
            }
            match &*prompt.text {
                "fail" => Err(ModelError::Inference("out of memory".into())),
                "panic" => panic!("tensor shape mismatch"),
                "short" => Ok(vec![]),
                _ => Ok(frames
                    .iter()
                    .map(|f| serde_json::json!({"batch": frames.len(), "prompt": &*prompt.text, "index": f.index}))
                    .collect()),
            }
        }
    }

    fn start(
        model: impl VisionLanguageModel + 'static,
        s: EngineSettings,
    ) -> (Engine, Arc<Metrics>) {
        let metrics = Arc::new(Metrics::default());
        (Engine::start(Box::new(model), s, metrics.clone()), metrics)
    }

    #[tokio::test]
    async fn frames_of_many_streams_share_a_batch_and_come_back_to_their_job() {
        let (tx, model) = Scripted::gated();
        let (engine, metrics) = start(model, settings());
        // Hold the model on a first frame, so the next three wait together.
        let mut first = engine.register(fixed("p"), 1.0);
        first.submit(frame(100), true);
        until_the_model_took_everything(&engine).await;
        let mut streams: Vec<EngineStream> =
            (0..3).map(|_| engine.register(fixed("p"), 1.0)).collect();
        for (i, s) in streams.iter().enumerate() {
            assert_eq!(s.submit(frame(i as u64), true), Submitted::Queued);
        }
        tx.send(()).unwrap();
        tx.send(()).unwrap();
        assert_eq!(first.recv().await.unwrap().meta.index, 100);
        for (i, s) in streams.iter_mut().enumerate() {
            let r = s.recv().await.unwrap();
            assert_eq!(r.meta.index, i as u64);
            assert_eq!(r.meta.cursor.as_deref(), Some(format!("c{i}").as_str()));
            let ReplyOutcome::Output(v) = r.outcome else {
                panic!("{r:?}")
            };
            assert_eq!(v["batch"], 3, "the three waiting frames form one batch");
        }
        assert_eq!(metrics.inference_batches.get(), 2);
        assert_eq!(metrics.inference_frames.get(), 4);
        assert_eq!(metrics.frame_age.count(), 4);
        drop(tx);
        assert!(engine.shutdown(Duration::from_secs(5)));
    }

    #[tokio::test]
    async fn a_newer_frame_replaces_one_the_model_has_not_taken() {
        let (tx, model) = Scripted::gated();
        let (engine, _) = start(model, settings());
        let mut s = engine.register(fixed("p"), 1.0);
        s.submit(frame(0), true);
        // Wait until the model holds frame 0 (its gate is closed), then queue two more.
        until_the_model_took_everything(&engine).await;
        assert_eq!(s.submit(earlier_frame(1), true), Submitted::Queued);
        assert_eq!(s.submit(frame(2), true), Submitted::Replaced { dropped: 1 });
        tx.send(()).unwrap();
        tx.send(()).unwrap();
        assert_eq!(s.recv().await.unwrap().meta.index, 0);
        assert_eq!(s.recv().await.unwrap().meta.index, 2);
        drop(tx);
        engine.shutdown(Duration::from_secs(5));
    }

    #[test]
    fn a_live_queue_holds_live_queue_ms_of_frames_within_bounds() {
        let s = settings();
        assert_eq!(s.live_queue_frames(2.0), 2);
        assert_eq!(s.live_queue_frames(1.5), 2);
        assert_eq!(s.live_queue_frames(0.5), 1);
        assert_eq!(s.live_queue_frames(1000.0), MAX_LIVE_QUEUE_FRAMES);
        let none = EngineSettings {
            live_queue: Duration::ZERO,
            ..settings()
        };
        assert_eq!(none.live_queue_frames(30.0), 1);
    }

    #[tokio::test]
    async fn a_live_burst_waits_its_turn_and_overflow_drops_the_oldest() {
        let (tx, model) = Scripted::gated();
        let (engine, _) = start(model, settings());
        // Two frames a second for one second of queue: two may wait.
        let mut s = engine.register(fixed("p"), 2.0);
        s.submit(frame(0), true);
        until_the_model_took_everything(&engine).await;
        // A segment's frames wait while the model is busy with frame 0; the next segment's
        // first frame comes a while later.
        assert_eq!(s.submit(earlier_frame(1), true), Submitted::Queued);
        assert_eq!(s.submit(earlier_frame(2), true), Submitted::Queued);
        assert_eq!(
            s.submit(frame(3), true),
            Submitted::Replaced { dropped: 1 },
            "the queue is full: frame 1 goes"
        );
        // A recording's frames still wait one at a time.
        assert_eq!(
            s.submit(frame(4), false),
            Submitted::Replaced { dropped: 2 }
        );
        assert_eq!(engine.shared.lock().pending, 1);
        assert_eq!(s.submit(frame(5), true), Submitted::Queued);
        tx.send(()).unwrap();
        tx.send(()).unwrap();
        assert_eq!(s.recv().await.unwrap().meta.index, 0);
        let mut batch = Vec::new();
        for _ in 0..2 {
            let r = s.recv().await.unwrap();
            let ReplyOutcome::Output(v) = r.outcome else {
                panic!("{r:?}")
            };
            batch.push((r.meta.index, v["batch"].as_u64()));
        }
        assert_eq!(
            batch,
            [(4, Some(2)), (5, Some(2))],
            "one stream's waiting frames share a batch, oldest first"
        );
        drop(tx);
        engine.shutdown(Duration::from_secs(5));
    }

    #[tokio::test]
    async fn frames_that_arrive_together_are_kept_together_up_to_the_cap() {
        let (tx, model) = Scripted::gated();
        let (engine, _) = start(model, settings());
        // Two frames a second for one second of queue: two may wait by count.
        let s = engine.register(fixed("p"), 2.0);
        s.submit(frame(0), true);
        until_the_model_took_everything(&engine).await;
        // Two segments' frames arrive at once (a playlist reload that found two): all wait.
        for i in 1..=4 {
            assert_eq!(s.submit(frame(i), true), Submitted::Queued, "frame {i}");
        }
        // A burst never holds more than the cap.
        for i in 5..=MAX_LIVE_QUEUE_FRAMES as u64 {
            assert_eq!(s.submit(frame(i), true), Submitted::Queued, "frame {i}");
        }
        assert_eq!(
            s.submit(frame(MAX_LIVE_QUEUE_FRAMES as u64 + 1), true),
            Submitted::Replaced { dropped: 1 }
        );
        assert_eq!(engine.shared.lock().pending, MAX_LIVE_QUEUE_FRAMES);
        drop(tx);
        engine.shutdown(Duration::from_secs(5));
    }

    #[tokio::test]
    async fn a_burst_the_model_cannot_get_through_gives_way_to_its_newest_frames() {
        let (tx, model) = Scripted::gated();
        let (engine, _) = start(model, settings());
        // Two may wait by count; a burst of four is kept whole at first.
        let mut s = engine.register(fixed("p"), 2.0);
        s.submit(frame(0), true);
        until_the_model_took_everything(&engine).await;
        for i in 1..=4 {
            assert_eq!(s.submit(frame(i), true), Submitted::Queued);
        }
        // The model stays busy past LIVE_QUEUE_MS (1 s): the two oldest are skipped when
        // it takes the next frames, the two newest go to it.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        tx.send(()).unwrap();
        tx.send(()).unwrap();
        let mut outcomes = Vec::new();
        for _ in 0..5 {
            let r = s.recv().await.unwrap();
            outcomes.push((r.meta.index, matches!(r.outcome, ReplyOutcome::TooOld)));
        }
        outcomes.sort();
        assert_eq!(
            outcomes,
            [(0, false), (1, true), (2, true), (3, false), (4, false)]
        );
        drop(tx);
        engine.shutdown(Duration::from_secs(5));
    }

    #[tokio::test]
    async fn a_full_queue_keeps_its_place_in_line() {
        let (tx, model) = Scripted::gated();
        let mut s = settings();
        s.max_batch_size = 2;
        let (engine, _) = start(model, s);
        let mut a = engine.register(fixed("p"), 2.0);
        let mut b = engine.register(fixed("p"), 2.0);
        a.submit(frame(0), true);
        until_the_model_took_everything(&engine).await;
        // A's two frames wait first, then B's; A's newest pushes out A's oldest and A
        // stays ahead of B.
        a.submit(earlier_frame(1), true);
        a.submit(earlier_frame(2), true);
        b.submit(frame(10), true);
        b.submit(frame(11), true);
        assert_eq!(a.submit(frame(3), true), Submitted::Replaced { dropped: 1 });
        tx.send(()).unwrap();
        tx.send(()).unwrap();
        assert_eq!(a.recv().await.unwrap().meta.index, 0);
        assert_eq!(a.recv().await.unwrap().meta.index, 2);
        assert_eq!(a.recv().await.unwrap().meta.index, 3);
        assert!(b.try_recv().is_none(), "B waits for the next batch");
        tx.send(()).unwrap();
        assert_eq!(b.recv().await.unwrap().meta.index, 10);
        assert_eq!(b.recv().await.unwrap().meta.index, 11);
        drop(tx);
        engine.shutdown(Duration::from_secs(5));
    }

    #[tokio::test]
    async fn a_replaced_frame_keeps_its_place_in_line() {
        let (tx, model) = Scripted::gated();
        let mut s = settings();
        s.max_batch_size = 1;
        let (engine, _) = start(model, s);
        let mut a = engine.register(fixed("p"), 1.0);
        let mut b = engine.register(fixed("p"), 1.0);
        a.submit(frame(0), true);
        until_the_model_took_everything(&engine).await;
        // A waits first, then B, then A gets a newer frame: A is still first in line.
        a.submit(earlier_frame(1), true);
        b.submit(frame(2), true);
        assert_eq!(a.submit(frame(3), true), Submitted::Replaced { dropped: 1 });
        // Let two calls through: frame 0 and the next batch of one.
        tx.send(()).unwrap();
        tx.send(()).unwrap();
        let wait = Duration::from_secs(10);
        assert_eq!(a.recv().await.unwrap().meta.index, 0);
        let second = tokio::time::timeout(wait, a.recv()).await;
        assert_eq!(
            second.ok().flatten().map(|r| r.meta.index),
            Some(3),
            "A went second"
        );
        assert!(b.try_recv().is_none());
        tx.send(()).unwrap();
        assert_eq!(b.recv().await.unwrap().meta.index, 2);
        drop(tx);
        engine.shutdown(Duration::from_secs(5));
    }

    #[tokio::test]
    async fn batches_are_split_by_prompt_and_follow_a_live_prompt() {
        let (engine, metrics) = start(Scripted::new(), settings());
        let (ptx, prx) = watch::channel(PromptRef {
            text: "cars".into(),
            version: Some(1),
        });
        let mut live = engine.register(PromptFollow::Live(prx), 1.0);
        let mut own = engine.register(fixed("boats"), 1.0);
        live.submit(frame(0), true);
        own.submit(frame(1), true);
        let a = live.recv().await.unwrap();
        let b = own.recv().await.unwrap();
        assert_eq!(a.prompt_version, Some(1));
        assert_eq!(b.prompt_version, None);
        let (ReplyOutcome::Output(a), ReplyOutcome::Output(b)) = (a.outcome, b.outcome) else {
            panic!()
        };
        assert_eq!(
            (a["prompt"].as_str(), a["batch"].as_u64()),
            (Some("cars"), Some(1))
        );
        assert_eq!(
            (b["prompt"].as_str(), b["batch"].as_u64()),
            (Some("boats"), Some(1))
        );
        ptx.send(PromptRef {
            text: "people".into(),
            version: Some(2),
        })
        .unwrap();
        live.submit(frame(2), true);
        let c = live.recv().await.unwrap();
        assert_eq!(c.prompt_version, Some(2));
        assert!(matches!(c.outcome, ReplyOutcome::Output(v) if v["prompt"] == "people"));
        assert!(metrics.inference_batches.get() >= 3);
        engine.shutdown(Duration::from_secs(5));
    }

    #[tokio::test]
    async fn errors_panics_and_wrong_output_counts_fail_only_their_batch() {
        let (engine, metrics) = start(Scripted::new(), settings());
        for (prompt, expect) in [
            ("fail", "out of memory"),
            ("panic", "panicked: tensor shape mismatch"),
            ("short", "returned 0 outputs for 1 frames"),
        ] {
            let mut s = engine.register(fixed(prompt), 1.0);
            s.submit(frame(0), true);
            let r = s.recv().await.unwrap();
            assert!(
                matches!(&r.outcome, ReplyOutcome::Error(e) if e.contains(expect)),
                "{r:?}"
            );
        }
        let mut ok = engine.register(fixed("fine"), 1.0);
        ok.submit(frame(9), true);
        assert!(matches!(
            ok.recv().await.unwrap().outcome,
            ReplyOutcome::Output(_)
        ));
        assert_eq!(metrics.inference_errors.get(), 3);
        engine.shutdown(Duration::from_secs(5));
    }

    #[tokio::test]
    async fn a_call_over_the_timeout_fails_its_frames_and_the_engine_recovers() {
        let (tx, model) = Scripted::gated();
        let mut s = settings();
        s.inference_timeout = Duration::from_millis(100);
        let (engine, _) = start(model, s);
        let mut st = engine.register(fixed("p"), 1.0);
        st.submit(frame(0), true);
        let r = st.recv().await.unwrap();
        assert!(
            matches!(&r.outcome, ReplyOutcome::Error(e) if e.contains("INFERENCE_TIMEOUT_MS")),
            "{r:?}"
        );
        // Release the stuck call and one more: the next frame is answered normally.
        tx.send(()).unwrap();
        tx.send(()).unwrap();
        st.submit(frame(1), true);
        let r = st.recv().await.unwrap();
        assert_eq!(r.meta.index, 1);
        assert!(matches!(r.outcome, ReplyOutcome::Output(_)), "{r:?}");
        drop(tx);
        engine.shutdown(Duration::from_secs(5));
    }

    #[tokio::test]
    async fn live_frames_past_their_age_are_skipped_but_recordings_wait() {
        let mut s = settings();
        s.max_frame_age = Duration::from_millis(50);
        let (engine, metrics) = start(Scripted::new(), s);
        let mut st = engine.register(fixed("p"), 1.0);
        let mut old = frame(0);
        old.received = Instant::now() - Duration::from_secs(1);
        st.submit(old.clone(), true);
        assert_eq!(st.recv().await.unwrap().outcome, ReplyOutcome::TooOld);
        assert_eq!(metrics.frames_too_old.get(), 1);
        st.submit(old, false);
        assert!(matches!(
            st.recv().await.unwrap().outcome,
            ReplyOutcome::Output(_)
        ));
        engine.shutdown(Duration::from_secs(5));
    }

    /// The calls a `Remote` model was handed: each frame's index, and where its answers go.
    type Calls = Arc<Mutex<Vec<(Vec<u64>, BatchReplies)>>>;

    /// A model that answers through `submit` when the test says: each call waits in `calls`
    /// with its frame indices until the test answers it.
    struct Remote {
        info: ModelInfo,
        max_inflight: usize,
        calls: Calls,
    }

    impl VisionLanguageModel for Remote {
        fn info(&self) -> &ModelInfo {
            &self.info
        }
        fn infer(
            &mut self,
            _frames: &[&Frame],
            _prompt: &PromptRef,
        ) -> Result<Vec<serde_json::Value>, ModelError> {
            unreachable!("the engine uses submit")
        }
        fn max_inflight_frames(&self) -> Option<usize> {
            Some(self.max_inflight)
        }
        fn submit(&mut self, frames: Vec<Frame>, prompt: &PromptRef, replies: BatchReplies) {
            if &*prompt.text == "panic" {
                panic!("lost the connection pool");
            }
            let indices = frames.iter().map(|f| f.index).collect();
            self.calls.lock().unwrap().push((indices, replies));
        }
    }

    fn remote(max_inflight: usize) -> (Calls, Remote) {
        let calls: Calls = Arc::default();
        let model = Remote {
            info: NullModel::new(224).info().clone(),
            max_inflight,
            calls: calls.clone(),
        };
        (calls, model)
    }

    async fn until_calls(calls: &Calls, n: usize) {
        let wait = async {
            while calls.lock().unwrap().len() < n {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), wait)
            .await
            .expect("the engine hands over the call");
    }

    #[tokio::test]
    async fn a_remote_model_gets_the_next_batch_while_one_is_out() {
        let (calls, model) = remote(2);
        let (engine, metrics) = start(model, settings());
        let mut s = engine.register(fixed("p"), 2.0);
        s.submit(frame(0), true);
        until_calls(&calls, 1).await;
        s.submit(frame(1), true);
        until_calls(&calls, 2).await;
        // Both slots are taken: a third frame waits for one.
        s.submit(frame(2), true);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(calls.lock().unwrap().len(), 2);
        assert_eq!(engine.shared.lock().pending, 1);
        // The second call answers first, and its frame's reply does not wait for the first.
        let second = calls.lock().unwrap()[1].1.clone();
        second.frame(0, Ok(serde_json::json!({"text": "b"})));
        let r = s.recv().await.unwrap();
        assert_eq!(r.meta.index, 1);
        assert_eq!(
            r.outcome,
            ReplyOutcome::Output(serde_json::json!({"text": "b"}))
        );
        // Its slot went to the waiting frame.
        until_calls(&calls, 3).await;
        assert_eq!(calls.lock().unwrap()[2].0, [2]);
        let first = calls.lock().unwrap()[0].1.clone();
        first.frame(
            0,
            Err(ModelError::Inference(
                "openai server_error: HTTP 500".into(),
            )),
        );
        let r = s.recv().await.unwrap();
        assert_eq!(r.meta.index, 0);
        assert!(
            matches!(&r.outcome, ReplyOutcome::Error(e) if e.contains("HTTP 500")),
            "{r:?}"
        );
        // A second answer for the same frame is ignored.
        first.frame(0, Ok(serde_json::json!({})));
        assert!(s.try_recv().is_none());
        assert_eq!(metrics.inference_batches.get(), 3);
        assert_eq!(metrics.inference_errors.get(), 1);
        assert_eq!(engine.shared.lock().in_flight, 1);
        assert!(engine.shutdown(Duration::from_secs(5)));
    }

    #[tokio::test]
    async fn a_remote_batch_takes_only_the_free_slots() {
        let (calls, model) = remote(3);
        // A second stream that stays empty makes the batcher wait out the window for a full
        // batch (of the free slots), so the frames below go out together.
        let mut s = settings();
        s.batch_window = Duration::from_secs(1);
        let (engine, _) = start(model, s);
        let mut a = engine.register(fixed("p"), 4.0);
        let _idle = engine.register(fixed("p"), 4.0);
        a.submit(frame(0), true);
        until_calls(&calls, 1).await;
        for i in 1..4 {
            a.submit(frame(i), true);
        }
        until_calls(&calls, 2).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let handed: Vec<Vec<u64>> = calls.lock().unwrap().iter().map(|c| c.0.clone()).collect();
        assert_eq!(
            handed,
            [vec![0], vec![1, 2]],
            "two slots were free, one frame waits"
        );
        for (indices, replies) in calls.lock().unwrap().iter() {
            for i in 0..indices.len() {
                replies.frame(i, Ok(serde_json::json!({})));
            }
        }
        for i in 0..3 {
            assert_eq!(a.recv().await.unwrap().meta.index, i);
        }
        until_calls(&calls, 3).await;
        assert_eq!(calls.lock().unwrap()[2].0, [3]);
        engine.shutdown(Duration::from_secs(5));
    }

    #[tokio::test]
    async fn a_remote_frame_past_the_timeout_fails_but_keeps_its_slot_until_answered() {
        let (calls, model) = remote(1);
        let mut s = settings();
        s.inference_timeout = Duration::from_millis(100);
        let (engine, metrics) = start(model, s);
        let mut st = engine.register(fixed("p"), 1.0);
        st.submit(frame(0), false);
        let r = st.recv().await.unwrap();
        assert!(
            matches!(&r.outcome, ReplyOutcome::Error(e) if e.contains("INFERENCE_TIMEOUT_MS")),
            "{r:?}"
        );
        assert_eq!(metrics.inference_errors.get(), 1);
        // The server still has frame 0: frame 1 waits for its slot.
        st.submit(frame(1), false);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(calls.lock().unwrap().len(), 1);
        let late = calls.lock().unwrap()[0].1.clone();
        late.frame(0, Ok(serde_json::json!({"late": true})));
        until_calls(&calls, 2).await;
        let next = calls.lock().unwrap()[1].1.clone();
        next.frame(0, Ok(serde_json::json!({"text": "ok"})));
        let r = st.recv().await.unwrap();
        assert_eq!(r.meta.index, 1, "the late answer to frame 0 was dropped");
        assert!(matches!(r.outcome, ReplyOutcome::Output(_)));
        engine.shutdown(Duration::from_secs(5));
    }

    #[tokio::test]
    async fn a_remote_model_that_panics_in_submit_fails_only_that_call() {
        let (calls, model) = remote(4);
        let (engine, _) = start(model, settings());
        let mut bad = engine.register(fixed("panic"), 1.0);
        bad.submit(frame(0), true);
        let r = bad.recv().await.unwrap();
        assert!(
            matches!(&r.outcome, ReplyOutcome::Error(e) if e.contains("lost the connection pool")),
            "{r:?}"
        );
        let mut good = engine.register(fixed("p"), 1.0);
        good.submit(frame(1), true);
        until_calls(&calls, 1).await;
        calls.lock().unwrap()[0]
            .1
            .frame(0, Ok(serde_json::json!({})));
        assert_eq!(good.recv().await.unwrap().meta.index, 1);
        assert_eq!(engine.shared.lock().in_flight, 0);
        engine.shutdown(Duration::from_secs(5));
    }

    #[tokio::test]
    async fn shutdown_closes_streams() {
        let (engine, _) = start(Scripted::new(), settings());
        let mut st = engine.register(fixed("p"), 1.0);
        assert!(engine.shutdown(Duration::from_secs(5)));
        assert_eq!(st.submit(frame(0), true), Submitted::Closed);
        assert!(st.recv().await.is_none());
    }
}
