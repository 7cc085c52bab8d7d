//! Frame sources: turn a job's `stream_ref` into decoded frames, HLS (and other video URLs)
//! through an ffmpeg child, or a Redis stream of frames.
//!
//! A source runs as its own task and hands frames to the job through a slot. A live source
//! adds to the slot without waiting and the slot never drops: the job takes each frame at
//! once (also while it writes results) and moves it through the scene gate to the engine,
//! whose per-job queue is the one place frames wait and are dropped. A finished recording
//! waits for the slot to empty instead, so every sampled frame of a recording is inferred
//! and ffmpeg simply decodes at the model's pace.

pub mod allowed_hosts;
pub mod ffmpeg_args;
pub mod hls;
pub mod image_decode;
pub mod redis_frames;
pub mod stream_proxy;

use crate::frame::Frame;
use crate::job::{JobSpec, SourceKind};
use crate::queue::body::JobFailure;
use crate::results::ResumeState;
use crate::store::Store;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// An input that could not become a frame; it gets an error entry and the job goes on.
#[derive(Clone, Debug, PartialEq)]
pub struct BadFrame {
    pub index: u64,
    pub capture_ms: i64,
    pub cursor: Option<String>,
    pub error: String,
}

/// What a source has for the job next.
#[derive(Debug)]
pub enum SourceEvent {
    Frame(Frame),
    Bad(BadFrame),
    /// Something people reading the job hash should know (e.g. waiting for a stream).
    Note(String),
    /// The stream finished; every frame has been handed over.
    End,
    /// The source cannot go on; the message says why and what the input said.
    Failed(String),
}

/// Counts kept by the source, read by the job for its progress.
#[derive(Debug, Default)]
pub struct SourceCounters {
    /// Frames (or frame-stream entries) the source read.
    pub decoded: AtomicU64,
    /// Frames the sampler kept (HLS: every frame ffmpeg wrote, ffmpeg samples).
    pub sampled: AtomicU64,
    /// Sampled entries of one frame-stream read superseded by a newer one of the same read,
    /// skipped before decoding (they would only be dropped from the engine's queue).
    pub dropped: AtomicU64,
}

/// Most error entries held for the job at once; beyond it the oldest are counted dropped.
const MAX_PENDING_BAD: usize = 64;

#[derive(Default)]
struct SlotState {
    frames: VecDeque<Frame>,
    bad: VecDeque<BadFrame>,
    note: Option<String>,
    end: Option<SourceEvent>,
}

/// The hand-over between a source task and its job.
pub(crate) struct Slot {
    state: Mutex<SlotState>,
    /// Signalled when there is something for the job.
    ready: Notify,
    /// Signalled when the job took the frame.
    taken: Notify,
    live: AtomicBool,
    counters: SourceCounters,
}

impl Slot {
    fn new(live: bool) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(SlotState::default()),
            ready: Notify::new(),
            taken: Notify::new(),
            live: AtomicBool::new(live),
            counters: SourceCounters::default(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SlotState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn set_live(&self, live: bool) {
        self.live.store(live, Ordering::Relaxed);
    }

    /// Live hand-over: never waits and never drops; the job takes frames as they come.
    pub(crate) fn put_latest(&self, frame: Frame) {
        self.lock().frames.push_back(frame);
        self.ready.notify_one();
    }

    /// Recording hand-over: waits until the job took the previous frame.
    pub(crate) async fn put_wait(&self, frame: Frame) {
        loop {
            {
                let mut st = self.lock();
                if st.frames.is_empty() {
                    st.frames.push_back(frame);
                    break;
                }
            }
            self.taken.notified().await;
        }
        self.ready.notify_one();
    }

    pub(crate) fn bad(&self, bad: BadFrame) {
        {
            let mut st = self.lock();
            if st.bad.len() >= MAX_PENDING_BAD {
                st.bad.pop_front();
                self.counters.dropped.fetch_add(1, Ordering::Relaxed);
            }
            st.bad.push_back(bad);
        }
        self.ready.notify_one();
    }

    pub(crate) fn note(&self, note: String) {
        self.lock().note = Some(note);
        self.ready.notify_one();
    }

    /// The last event: `End` or `Failed`. Handed over after every frame before it.
    pub(crate) fn finish(&self, event: SourceEvent) {
        self.lock().end.get_or_insert(event);
        self.ready.notify_one();
    }

    /// The next event for the job. Cancel-safe: nothing is taken until it is returned.
    async fn next(&self) -> SourceEvent {
        loop {
            {
                let mut st = self.lock();
                if let Some(note) = st.note.take() {
                    return SourceEvent::Note(note);
                }
                if let Some(bad) = st.bad.pop_front() {
                    return SourceEvent::Bad(bad);
                }
                if let Some(frame) = st.frames.pop_front() {
                    drop(st);
                    self.taken.notify_one();
                    return SourceEvent::Frame(frame);
                }
                if let Some(end) = st.end.take() {
                    // Leave a copy so a second call does not wait forever.
                    st.end = Some(match &end {
                        SourceEvent::Failed(m) => SourceEvent::Failed(m.clone()),
                        _ => SourceEvent::End,
                    });
                    return end;
                }
            }
            self.ready.notified().await;
        }
    }
}

/// The sources' own settings (`ALLOW_FILE_SOURCES`, `ALLOWED_STREAM_HOSTS`, `MAX_FRAME_SIDE`,
/// `MAX_FRAME_PIXELS`, `SOURCE_RETRIES`, `STALL_TIMEOUT_MS`).
#[derive(Clone, Debug)]
pub struct SourceSettings {
    pub allow_files: bool,
    pub allowed_hosts: allowed_hosts::AllowedHosts,
    /// Longest side of decoded HLS frames; `None`: from the model's input size.
    pub max_side: Option<u32>,
    pub max_pixels: u64,
    pub retries: u32,
    pub stall_timeout: Duration,
}

/// How sources behave; built once per worker.
#[derive(Clone, Debug)]
pub struct SourceOptions {
    /// Allow local paths and protocols other than http(s) and rtsp.
    pub allow_files: bool,
    /// ALLOWED_STREAM_HOSTS: where HLS and RTSP may be fetched from (empty: anywhere).
    pub allowed_hosts: allowed_hosts::AllowedHosts,
    /// Longest side of decoded HLS frames.
    pub max_side: u32,
    /// Largest image a frame-stream entry may decode to (width x height).
    pub max_pixels: u64,
    /// Restarts of a failed ffmpeg before the job fails.
    pub retries: u32,
    /// First delay before restarting ffmpeg; doubles per failure up to `retry_max`.
    pub retry_initial: Duration,
    pub retry_max: Duration,
    /// No frame for this long: ffmpeg is restarted (a stream that stopped); a frame
    /// stream's job fails.
    pub stall_timeout: Duration,
    /// Read timeout of network inputs.
    pub io_timeout: Duration,
    /// The ffmpeg program.
    pub ffmpeg: String,
}

impl SourceOptions {
    /// Options from the worker's settings; `max_side` is MAX_FRAME_SIDE's, else the model's.
    pub fn new(settings: &SourceSettings, max_side: u32) -> Self {
        Self {
            allow_files: settings.allow_files,
            allowed_hosts: settings.allowed_hosts.clone(),
            max_side,
            max_pixels: settings.max_pixels,
            retries: settings.retries,
            retry_initial: Duration::from_millis(500),
            retry_max: Duration::from_secs(10),
            stall_timeout: settings.stall_timeout,
            io_timeout: Duration::from_secs(10),
            ffmpeg: "ffmpeg".into(),
        }
    }
}

/// A running source. Dropping it stops the source task (and its ffmpeg) in the background;
/// `close` does the same and waits for it.
pub struct Source {
    slot: Arc<Slot>,
    cancel: CancellationToken,
    task: Option<JoinHandle<()>>,
    kind: SourceKind,
}

impl Source {
    /// Starts the source a job asks for. A `stream_ref` that may not be read is refused with
    /// a message that says why.
    pub fn open(
        spec: &JobSpec,
        resume: &ResumeState,
        options: &SourceOptions,
        store: &Store,
    ) -> Result<Self, JobFailure> {
        let cancel = CancellationToken::new();
        match spec.source {
            SourceKind::Hls => {
                let input = ffmpeg_args::plan_input(&spec.stream_ref, options.allow_files)
                    .and_then(|plan| ffmpeg_args::confine(plan, &options.allowed_hosts))
                    .map_err(|e| JobFailure::new(e.to_string()))?
                    .with_rtsp_transport(spec.rtsp_transport);
                let slot = Slot::new(true);
                let task = tokio::spawn(hls::run(
                    hls::HlsJob {
                        input,
                        fps: spec.fps,
                        resume_cursor: resume.cursor.clone(),
                        options: options.clone(),
                    },
                    slot.clone(),
                    cancel.clone(),
                ));
                Ok(Self {
                    slot,
                    cancel,
                    task: Some(task),
                    kind: SourceKind::Hls,
                })
            }
            SourceKind::Redis => {
                let key = redis_frames::stream_key(&spec.stream_ref, store.keys())
                    .map_err(|e| JobFailure::new(e.to_string()))?;
                let slot = Slot::new(true);
                let task = tokio::spawn(redis_frames::run(
                    redis_frames::FrameStreamJob {
                        key,
                        fps: spec.fps,
                        resume_cursor: resume.cursor.clone(),
                        first_index: resume.counters.frames_decoded,
                        max_pixels: options.max_pixels,
                        stall_timeout: options.stall_timeout,
                        store: store.clone(),
                    },
                    slot.clone(),
                    cancel.clone(),
                ));
                Ok(Self {
                    slot,
                    cancel,
                    task: Some(task),
                    kind: SourceKind::Redis,
                })
            }
        }
    }

    pub fn kind(&self) -> SourceKind {
        self.kind
    }

    /// The next event. Cancel-safe, so it can sit in a `select!`.
    pub async fn next(&self) -> SourceEvent {
        self.slot.next().await
    }

    /// False for a finished recording, whose frames are all kept (see the module docs).
    pub fn is_live(&self) -> bool {
        self.slot.live.load(Ordering::Relaxed)
    }

    pub fn counters(&self) -> &SourceCounters {
        &self.slot.counters
    }

    /// Stops the source and waits (briefly) until its ffmpeg, if any, has exited.
    pub async fn close(mut self) {
        self.cancel.cancel();
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
    }
}

impl Drop for Source {
    fn drop(&mut self) {
        // The task sees the token and stops its child itself.
        self.cancel.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn frame(index: u64) -> Frame {
        let mut f = Frame::new(1, 1, Bytes::from_static(&[0, 0, 0])).unwrap();
        f.index = index;
        f
    }

    async fn next_index(slot: &Slot) -> u64 {
        match slot.next().await {
            SourceEvent::Frame(f) => f.index,
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_live_slot_keeps_a_burst_in_order_and_drops_nothing() {
        let slot = Slot::new(true);
        let n = 20;
        for i in 0..n {
            slot.put_latest(frame(i));
        }
        assert_eq!(slot.counters.dropped.load(Ordering::Relaxed), 0);
        for i in 0..n {
            assert_eq!(next_index(&slot).await, i);
        }
        slot.finish(SourceEvent::End);
        assert!(matches!(slot.next().await, SourceEvent::End));
    }

    #[tokio::test]
    async fn a_recording_slot_waits_until_the_job_took_the_frame() {
        let slot = Slot::new(false);
        slot.put_wait(frame(0)).await;
        let second = {
            let slot = slot.clone();
            tokio::spawn(async move { slot.put_wait(frame(1)).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            !second.is_finished(),
            "the second frame waits for the first to go"
        );
        assert_eq!(next_index(&slot).await, 0);
        second.await.unwrap();
        assert_eq!(next_index(&slot).await, 1);
        assert_eq!(slot.counters.dropped.load(Ordering::Relaxed), 0);
    }
}
