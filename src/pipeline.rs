//! The job body that turns a stream job into results: opens the job's source, passes each
//! sampled frame through the job's scene gate, hands the frames that need the model to the
//! shared inference engine, and writes one result entry per frame (a model output, an error,
//! or the last output reused) with the job's counters and resume cursor, in one pipelined
//! write per batch of replies.
//!
//! A frame's path reads straight through: source, gate, the engine's per-job queue (the one
//! place a frame waits, and so the one place it is dropped, counted in `frames_dropped`),
//! the model, the result entry. The job keeps taking frames while a write is under way, so
//! nothing waits on Redis.
//!
//! A box model's output goes through the job's tracker before anything else reads it, so
//! its entry, the alerts and the outputs the gate repeats all carry the same `track_id`s.
//!
//! An alert `start` and each zone or line event may carry a picture of its frame, and the
//! job keeps its latest annotated frame ([`crate::snapshot`]): the frames drawn are the ones
//! the job holds anyway, drawn and encoded off the runtime while the write waits for them.
//!
//! This is the only module that knows sources, the engine and the result sink together.

use crate::alerts::{AlertEvent, AlertKind, AlertSettings, AlertState, EndReason, Observation};
use crate::engine::{Engine, EngineStream, Reply, ReplyOutcome, Submitted};
use crate::frame::Frame;
use crate::gate::{Decision, GateSettings, SceneGate};
use crate::job::{JobField, JobSpec, SpecError};
use crate::metrics::Metrics;
use crate::model::{ModelInfo, ModelType};
use crate::queue::body::{BodyFuture, BodyOutcome, JobBody, JobContext, JobFailure};
use crate::queue::stop::StopReason;
use crate::results::{
    AlertWrite, FrameOutcome, PictureWrite, Progress, ResultEntry, ZoneWrite, zone_alert_id,
};
use crate::results::{FrameCounters, read_saved};
use crate::snapshot::{Pictures, Shot, snapshot_jpeg};
use crate::source::{BadFrame, Source, SourceCounters, SourceEvent, SourceOptions, SourceSettings};
use crate::store::Store;
use crate::store::keys::snapshot_name;
use crate::tracker::output::{leave_untracked, track_output};
use crate::tracker::{ByteTrack, TrackerState};
use crate::zones::output::sightings;
use crate::zones::watch::{WatchState, ZoneEvent, ZoneWatch};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// The longest side of decoded frames when MAX_FRAME_SIDE is unset: twice the model's input
/// side. Models resize the short side to their input and crop, so a 16:9 frame needs a long
/// side near twice the input to keep the short side at full resolution.
pub fn default_max_side(input_size: u32) -> u32 {
    input_size.saturating_mul(2).clamp(64, 8192)
}

/// The pipeline's own settings: the scene gate's (`SCENE_GATE`, `SCENE_CHANGE_MIN_AREA`,
/// `SCENE_MAX_REUSE_MS`), the cap of the alerts stream it writes to (`ALERTS_MAXLEN`) and
/// the pictures'.
#[derive(Clone, Debug)]
pub struct PipelineSettings {
    pub scene_gate: bool,
    pub scene_change_min_area: f32,
    pub scene_max_reuse: Duration,
    pub alerts_maxlen: usize,
    pub snapshots: SnapshotSettings,
}

/// A job's pictures: at most `per_minute` event pictures (`SNAPSHOTS_PER_MIN`, 0 = none),
/// the latest annotated frame every `interval` at most (`SNAPSHOT_INTERVAL_MS`, 0 = off),
/// each kept `ttl` from when it is stored (`RESULT_TTL_S`, so none outlives the results).
#[derive(Clone, Copy, Debug)]
pub struct SnapshotSettings {
    pub per_minute: u32,
    pub interval: Duration,
    pub ttl: Duration,
}

/// The stream job body, built once per worker and shared by all its jobs.
#[derive(Clone)]
pub struct StreamJobBody {
    engine: Engine,
    store: Store,
    metrics: Arc<Metrics>,
    sources: SourceOptions,
    /// SCENE_GATE: whether jobs without a `scene_gate` field use the gate.
    scene_gate: bool,
    gate: GateSettings,
    alerts_maxlen: usize,
    snapshots: SnapshotSettings,
}

impl StreamJobBody {
    pub fn new(
        settings: &PipelineSettings,
        sources: &SourceSettings,
        engine: Engine,
        store: Store,
        metrics: Arc<Metrics>,
    ) -> Self {
        let max_side = sources
            .max_side
            .unwrap_or_else(|| default_max_side(engine.model_info().input_size));
        Self {
            sources: SourceOptions::new(sources, max_side),
            engine,
            store,
            metrics,
            scene_gate: settings.scene_gate,
            gate: GateSettings {
                min_area: settings.scene_change_min_area,
                max_reuse_ms: settings.scene_max_reuse.as_millis() as i64,
            },
            alerts_maxlen: settings.alerts_maxlen,
            snapshots: settings.snapshots,
        }
    }

    /// How sources behave (retry delays, stall timeout, the ffmpeg program).
    pub fn source_options(&self) -> &SourceOptions {
        &self.sources
    }

    /// Replaces the source options, e.g. shorter retry delays in tests.
    pub fn with_source_options(mut self, options: SourceOptions) -> Self {
        self.sources = options;
        self
    }

    async fn run_job(&self, ctx: JobContext) -> Result<BodyOutcome, JobFailure> {
        let source = Source::open(&ctx.spec, &ctx.resume, &self.sources, &self.store)?;
        let saved = self.saved_camera_state(&ctx.spec.job_id).await?;
        let stream = self.engine.register(ctx.prompt.clone(), ctx.spec.fps);
        let gate = ctx
            .spec
            .scene_gate
            .unwrap_or(self.scene_gate)
            .then(|| SceneGate::new(self.gate, gate_seed(&ctx.spec.job_id)));
        let pictures = &self.snapshots;
        let mut run = Run {
            job_id: ctx.spec.job_id.as_str().into(),
            pictures: Pictures::new(
                pictures.per_minute,
                pictures.interval,
                ctx.spec.places.clone(),
                saved.snapshot_cap,
            ),
            unsent_pictures: Vec::new(),
            picture_ttl: pictures.ttl,
            model: self.engine.model_name(),
            metrics: &self.metrics,
            base: ctx.resume.counters,
            base_reused: saved.frames_reused,
            reported: FrameCounters::default(),
            reported_reused: 0,
            dropped: 0,
            failed: 0,
            reused: 0,
            pending: Vec::new(),
            pending_received: Vec::new(),
            writing: 0,
            held: Vec::new(),
            dirty: false,
            cursor: None,
            note: None,
            in_flight: 0,
            gate,
            last_output: None,
            source_done: false,
            source_failed: None,
            alerts: ctx.spec.alerts.map(|settings| Alerts {
                settings,
                state: saved.alerts,
                events: Vec::new(),
                changed: false,
                maxlen: self.alerts_maxlen,
                last: None,
            }),
            tracks: Tracks {
                tracker: ByteTrack::new(ctx.spec.tracker, saved.tracker),
                changed: false,
                last_frame: None,
            },
            zones: (!ctx.spec.places.is_empty()).then(|| Zones {
                watch: ZoneWatch::new(
                    ctx.spec.places.clone(),
                    ctx.spec.tracker.max_missed_frames(),
                    saved.zones,
                ),
                events: Vec::new(),
                changed: false,
                maxlen: self.alerts_maxlen,
                source_size: (0, 0),
            }),
        };
        run.reported = run.counters(source.counters());
        run.reported_reused = run.base_reused;
        let outcome = run.drive(&ctx, &source, stream).await;
        source.close().await;
        outcome
    }

    /// What earlier deliveries of the job saved beyond the resume state: per-frame state,
    /// so it lives in the job's progress hash, in the job's own slot.
    async fn saved_camera_state(&self, job_id: &str) -> Result<SavedState, JobFailure> {
        let key = self.store.keys().progress(job_id);
        let mut cmd = redis::cmd("HMGET");
        cmd.arg(&key)
            .arg("frames_reused")
            .arg(crate::results::ALERT_STATE_FIELD)
            .arg(crate::results::TRACKER_STATE_FIELD)
            .arg(crate::results::ZONE_STATE_FIELD)
            .arg(crate::results::SNAPSHOT_CAP_FIELD);
        let v = match self.store.query::<Vec<Option<String>>>(&cmd).await {
            Ok(v) => v,
            Err(e) => {
                return Err(JobFailure::new(format!(
                    "reading the job's saved alert, tracker and zone state failed: {e}"
                )));
            }
        };
        let field = |i: usize| v.get(i).cloned().flatten();
        let tracker = match read_saved::<TrackerState>(job_id, "tracker", field(2)) {
            Some(state) if !state.is_sound() => {
                tracing::warn!(job = %job_id, "the saved tracker state is not sound; starting afresh");
                TrackerState::default()
            }
            state => state.unwrap_or_default(),
        };
        Ok(SavedState {
            frames_reused: field(0).and_then(|n| n.parse().ok()).unwrap_or(0),
            alerts: read_saved(job_id, "alert", field(1)).unwrap_or_default(),
            tracker,
            zones: read_saved(job_id, "zone", field(3)).unwrap_or_default(),
            snapshot_cap: read_saved(job_id, "snapshot cap", field(4)).unwrap_or_default(),
        })
    }
}

/// What a job's progress hash holds for the camera behaviour of earlier deliveries.
#[derive(Debug, Default)]
struct SavedState {
    frames_reused: u64,
    alerts: AlertState,
    tracker: TrackerState,
    zones: WatchState,
    /// The picture cap's window.
    snapshot_cap: Vec<i64>,
}

impl JobBody for StreamJobBody {
    /// A job's own prompt must suit the model (phrases for the scoring and detection
    /// models); a job that follows the active prompt is not checked here. Zones and lines
    /// need a model that gives boxes.
    fn check(&self, spec: &JobSpec) -> Result<(), SpecError> {
        match &spec.prompt {
            Some(prompt) => self
                .engine
                .prompt_rule()
                .check(prompt)
                .map_err(|reason| SpecError::new(JobField::Prompt, reason)),
            None => Ok(()),
        }?;
        check_places(spec, self.engine.model_info())
    }

    fn run(&self, ctx: JobContext) -> BodyFuture<'_> {
        Box::pin(self.run_job(ctx))
    }
}

/// The model types whose outputs never hold boxes: a job with zones or lines is refused on
/// them, since nothing would ever be counted.
const BOXLESS_MODELS: [ModelType; 4] = [
    ModelType::Clip,
    ModelType::Siglip,
    ModelType::Blip,
    ModelType::Null,
];

/// A job with zones or lines needs a model that gives boxes.
fn check_places(spec: &JobSpec, model: &ModelInfo) -> Result<(), SpecError> {
    if spec.places.is_empty() || !BOXLESS_MODELS.iter().any(|m| m.task() == model.task) {
        return Ok(());
    }
    let field = if spec.places.zones.is_empty() {
        JobField::Lines
    } else {
        JobField::Zones
    };
    Err(SpecError::new(
        field,
        format!(
            "the model `{}` ({}) gives no boxes, so it cannot place tracks in zones or on \
             lines; use a box model (owlvit, yoloworld, paligemma with a `detect` prompt)",
            model.name, model.task
        ),
    ))
}

/// The newest model output of a job, kept for the scene gate to repeat.
struct LastOutput {
    index: u64,
    prompt_version: Option<u64>,
    /// Serialised once, repeated in every reused entry.
    json: Arc<str>,
}

/// A job's alerts while it runs.
struct Alerts {
    settings: AlertSettings,
    state: AlertState,
    /// Events not yet written.
    events: Vec<AlertEvent>,
    /// The state changed since it was last written.
    changed: bool,
    maxlen: usize,
    /// What the newest model output said, for the frames that reuse it.
    last: Option<(u64, Option<Observation>)>,
}

impl Alerts {
    /// Takes a model output of frame `index` into account.
    fn output(
        &mut self,
        index: u64,
        capture_ms: i64,
        version: Option<u64>,
        output: &serde_json::Value,
    ) {
        let obs = Observation::from_output(output);
        if let Some(o) = &obs {
            self.observe(index, capture_ms, version, o);
        }
        if self.last.as_ref().is_none_or(|(i, _)| *i < index) {
            self.last = Some((index, obs));
        }
    }

    /// Takes a frame that reused frame `from`'s output into account.
    fn reused(&mut self, index: u64, capture_ms: i64, version: Option<u64>, from: u64) {
        if let Some((i, Some(obs))) = self.last.take() {
            if i == from {
                self.observe(index, capture_ms, version, &obs);
            }
            self.last = Some((i, Some(obs)));
        }
    }

    fn observe(&mut self, index: u64, capture_ms: i64, version: Option<u64>, obs: &Observation) {
        let events = self
            .state
            .observe(&self.settings, index, capture_ms, version, obs);
        self.events.extend(events);
        self.changed = true;
    }

    fn close(&mut self, reason: EndReason) {
        let events = self.state.close_all(reason);
        self.changed |= !events.is_empty();
        self.events.extend(events);
    }

    /// The events and state for the next write, if there is anything new.
    fn take_write(&mut self) -> Option<AlertWrite> {
        if !self.changed && self.events.is_empty() {
            return None;
        }
        self.changed = false;
        Some(AlertWrite {
            events: std::mem::take(&mut self.events),
            state: serde_json::to_string(&self.state).unwrap_or_default(),
            maxlen: self.maxlen,
        })
    }
}

/// A job's tracker while it runs: fed the outputs of the frames the model answered, in
/// frame order. Frames whose output the gate reuses repeat the ids of the output they
/// reuse, and do not step it.
struct Tracks {
    tracker: ByteTrack,
    /// The state changed since it was last written.
    changed: bool,
    /// The newest frame tracked in this delivery.
    last_frame: Option<u64>,
}

impl Tracks {
    /// Gives the boxes of frame `index`'s output their `track_id`s; returns whether the
    /// tracker stepped. An output older than one already tracked (replies out of order)
    /// does not step the tracker back in time: its boxes get no id.
    fn output(&mut self, index: u64, output: &mut serde_json::Value) -> bool {
        if self.last_frame.is_some_and(|last| index <= last) {
            leave_untracked(output);
            return false;
        }
        let stepped = track_output(&mut self.tracker, output);
        if stepped {
            self.last_frame = Some(index);
            self.changed = true;
        }
        stepped
    }

    /// The state to save with the next write, if it changed.
    fn take_write(&mut self) -> Option<String> {
        std::mem::take(&mut self.changed)
            .then(|| serde_json::to_string(self.tracker.state()).unwrap_or_default())
    }
}

/// A job's zones and lines while it runs: fed the tracked outputs in the tracker's order,
/// and the frames that reuse them.
struct Zones {
    watch: ZoneWatch,
    /// Events not yet written.
    events: Vec<ZoneEvent>,
    /// The state changed since it was last written.
    changed: bool,
    maxlen: usize,
    /// The source picture's size, which normalised zones are fractions of.
    source_size: (u32, u32),
}

impl Zones {
    fn tracked(&mut self, index: u64, capture_ms: i64, output: &serde_json::Value) {
        let units = self.watch.places().units;
        let seen = sightings(output, units, self.source_size);
        self.events
            .extend(self.watch.observe(index, capture_ms, &seen));
        self.changed = true;
    }

    fn reused(&mut self, index: u64, capture_ms: i64) {
        self.events.extend(self.watch.reused(index, capture_ms));
        self.changed = true;
    }

    /// The job ends: the tracks still inside zones leave them.
    fn close(&mut self, reason: EndReason) {
        let events = self.watch.close_all(reason.as_str());
        self.changed |= !events.is_empty();
        self.events.extend(events);
    }

    /// The events, state and counts for the next write, if there is anything new.
    fn take_write(&mut self) -> Option<ZoneWrite> {
        std::mem::take(&mut self.changed).then(|| ZoneWrite {
            events: std::mem::take(&mut self.events),
            state: serde_json::to_string(self.watch.state()).unwrap_or_default(),
            counts: self.watch.state().counts(),
            maxlen: self.maxlen,
        })
    }
}

/// One job's bookkeeping while it runs.
struct Run<'a> {
    job_id: Arc<str>,
    /// `None` when the job's pictures are off.
    pictures: Option<Pictures>,
    /// Event pictures of a write that failed, by snapshot name: stored with the next
    /// write, which carries their events again, so those keep their `snapshot`.
    unsent_pictures: Vec<(String, bytes::Bytes)>,
    /// How long each picture is kept.
    picture_ttl: Duration,
    model: Arc<str>,
    metrics: &'a Metrics,
    /// Counters saved by earlier deliveries.
    base: FrameCounters,
    base_reused: u64,
    /// What has already been added to the worker's metrics.
    reported: FrameCounters,
    reported_reused: u64,
    /// Frames the engine dropped (replaced or too old) for this job: the one place a
    /// sampled frame waits, and so the one place it is dropped.
    dropped: u64,
    failed: u64,
    /// Frames whose entry repeated the last output.
    reused: u64,
    /// Entries not yet written.
    pending: Vec<ResultEntry>,
    /// When each pending entry's frame reached the worker.
    pending_received: Vec<std::time::Instant>,
    /// Entries in the write under way.
    writing: u64,
    /// Reused entries (with their frame's arrival and cursor) made while earlier frames
    /// were still with the model: released once those are answered, so entries, the
    /// cursor and alerts follow frame order.
    held: Vec<(ResultEntry, std::time::Instant, Option<String>)>,
    /// Something the job hash should show has changed since the last write.
    dirty: bool,
    /// The newest finished frame's index and resume cursor, not yet written.
    cursor: Option<(u64, String)>,
    note: Option<String>,
    /// Frames handed to the engine and not answered yet.
    in_flight: u64,
    /// The scene gate, when the job uses it.
    gate: Option<SceneGate>,
    last_output: Option<LastOutput>,
    source_done: bool,
    /// The source cannot go on: why.
    source_failed: Option<String>,
    /// `None` when the job's alerts are off.
    alerts: Option<Alerts>,
    tracks: Tracks,
    /// `None` when the job has neither zones nor lines.
    zones: Option<Zones>,
}

enum Step {
    Stop,
    Done,
    Fail(JobFailure),
}

impl Run<'_> {
    fn counters(&self, src: &SourceCounters) -> FrameCounters {
        let b = &self.base;
        FrameCounters {
            frames_decoded: b.frames_decoded + src.decoded.load(Ordering::Relaxed),
            frames_sampled: b.frames_sampled + src.sampled.load(Ordering::Relaxed),
            frames_dropped: b.frames_dropped + src.dropped.load(Ordering::Relaxed) + self.dropped,
            frames_failed: b.frames_failed + self.failed,
        }
    }

    fn finished(&mut self, index: u64, cursor: Option<String>) {
        if let Some(c) = cursor
            && self.cursor.as_ref().is_none_or(|(i, _)| index >= *i)
        {
            self.cursor = Some((index, c));
        }
    }

    /// Result entries written, being written and waiting: what counts toward `max_frames`.
    fn done(&self, ctx: &JobContext) -> u64 {
        ctx.sink.written() + self.writing + (self.pending.len() + self.held.len()) as u64
    }

    /// The `max_frames` rule, its one owner: how many more result entries the job may
    /// make (`None` without a bound). The job ends at 0 and takes a frame only while the
    /// frames with the model leave room.
    fn frames_left(&self, ctx: &JobContext) -> Option<u64> {
        ctx.spec
            .max_frames
            .map(|m| m.saturating_sub(self.done(ctx)))
    }

    /// Whether the job takes the source's next event now. A live stream's frames go on to
    /// the engine as they come (its per-job queue keeps the newest); a recording sends its
    /// next frame once the last one is answered. Never more than `max_frames` allows.
    fn accepts(&self, ctx: &JobContext, source: &Source) -> bool {
        !self.source_done
            && self.source_failed.is_none()
            && (source.is_live() || self.in_flight == 0)
            && self
                .frames_left(ctx)
                .is_none_or(|left| self.in_flight < left)
    }

    fn reply(&mut self, r: Reply) {
        self.in_flight = self.in_flight.saturating_sub(1);
        self.dirty = true;
        let index = r.meta.index;
        let marks = self.event_marks();
        let outcome = match r.outcome {
            ReplyOutcome::Output(mut v) => {
                if self.tracks.output(index, &mut v)
                    && let Some(z) = &mut self.zones
                {
                    z.tracked(index, r.meta.capture_ms, &v);
                }
                if let Some(a) = &mut self.alerts {
                    a.output(index, r.meta.capture_ms, r.prompt_version, &v);
                }
                if let Some(gate) = &mut self.gate {
                    gate.answered(index, r.prompt_version);
                    if self.last_output.as_ref().is_none_or(|l| l.index < index) {
                        self.last_output = Some(LastOutput {
                            index,
                            prompt_version: r.prompt_version,
                            json: v.to_string().into(),
                        });
                    }
                }
                self.pictured(index, true, marks, || Some(v.clone()));
                FrameOutcome::Output(v)
            }
            ReplyOutcome::Error(e) => {
                self.failed += 1;
                self.unpictured(index);
                if let Some(gate) = &mut self.gate {
                    gate.lost(index);
                }
                FrameOutcome::Error(e)
            }
            ReplyOutcome::TooOld => {
                self.dropped += 1;
                self.unpictured(index);
                if let Some(gate) = &mut self.gate {
                    gate.lost(index);
                }
                self.finished(index, r.meta.cursor);
                if self.in_flight == 0 {
                    self.release_held();
                }
                return;
            }
        };
        self.pending_received.push(r.meta.received);
        self.pending.push(ResultEntry {
            frame: index,
            pts_ms: r.meta.pts_ms,
            capture_ms: r.meta.capture_ms,
            prompt_version: r.prompt_version,
            model: self.model.clone(),
            latency_ms: r.latency_ms,
            outcome,
        });
        self.finished(index, r.meta.cursor);
        if self.in_flight == 0 {
            self.release_held();
        }
    }

    fn bad(&mut self, b: BadFrame, prompt_version: Option<u64>) {
        self.failed += 1;
        self.dirty = true;
        self.pending_received.push(std::time::Instant::now());
        self.pending.push(ResultEntry {
            frame: b.index,
            pts_ms: None,
            capture_ms: b.capture_ms,
            prompt_version,
            model: self.model.clone(),
            latency_ms: 0.0,
            outcome: FrameOutcome::Error(b.error),
        });
        self.finished(b.index, b.cursor);
    }

    /// Moves held reused entries to the pending ones (nothing is with the model now).
    fn release_held(&mut self) {
        for (entry, received, cursor) in std::mem::take(&mut self.held) {
            let FrameOutcome::Reused { from, output } = &entry.outcome else {
                continue;
            };
            self.reused += 1;
            self.dirty = true;
            let marks = self.event_marks();
            if let Some(a) = &mut self.alerts {
                a.reused(entry.frame, entry.capture_ms, entry.prompt_version, *from);
            }
            if let Some(z) = &mut self.zones {
                z.reused(entry.frame, entry.capture_ms);
            }
            self.pictured(entry.frame, false, marks, || {
                serde_json::from_str(output).ok()
            });
            self.finished(entry.frame, cursor);
            self.pending_received.push(received);
            self.pending.push(entry);
        }
    }

    /// How many alert and zone events are waiting, to tell which ones a frame brought.
    fn event_marks(&self) -> (usize, usize) {
        (
            self.alerts.as_ref().map_or(0, |a| a.events.len()),
            self.zones.as_ref().map_or(0, |z| z.events.len()),
        )
    }

    /// The snapshot names of the events that came after `marks` and may have a picture:
    /// alert starts, and every zone and line event.
    fn new_event_names(&self, marks: (usize, usize)) -> Vec<String> {
        let mut names = Vec::new();
        if let Some(a) = &self.alerts {
            let starts = a.events.get(marks.0..).unwrap_or_default();
            names.extend(
                starts
                    .iter()
                    .filter(|e| e.kind == AlertKind::Start)
                    .map(|e| snapshot_name(e.kind.as_str(), &e.alert_id(&self.job_id))),
            );
        }
        if let Some(z) = &self.zones {
            let events = z.events.get(marks.1..).unwrap_or_default();
            names.extend(
                events
                    .iter()
                    .map(|e| snapshot_name(e.kind.as_str(), &zone_alert_id(&self.job_id, e))),
            );
        }
        names
    }

    /// Frame `index` is done: a picture of it for the events since `marks` and as the
    /// latest frame, as the job's pictures allow; `output` is what to draw on it.
    fn pictured(
        &mut self,
        index: u64,
        answered: bool,
        marks: (usize, usize),
        output: impl FnOnce() -> Option<serde_json::Value>,
    ) {
        if self.pictures.is_none() {
            return;
        }
        let names = self.new_event_names(marks);
        if let Some(p) = &mut self.pictures {
            p.answered(index, answered, names, output);
        }
    }

    /// Frame `index` is done without an output: nothing to draw.
    fn unpictured(&mut self, index: u64) {
        if let Some(p) = &mut self.pictures {
            p.release(index);
        }
    }

    /// Takes one source event; a frame goes through the gate to the engine, or becomes a
    /// reused entry at once.
    fn on_event(
        &mut self,
        event: SourceEvent,
        ctx: &JobContext,
        source: &Source,
        stream: &EngineStream,
    ) {
        match event {
            SourceEvent::Frame(frame) => self.on_frame(frame, ctx, source.is_live(), stream),
            SourceEvent::Bad(b) => self.bad(b, ctx.prompt.version()),
            SourceEvent::Note(n) => {
                self.note = Some(n);
                self.dirty = true;
            }
            SourceEvent::End => self.source_done = true,
            SourceEvent::Failed(msg) => self.source_failed = Some(msg),
        }
    }

    fn on_frame(&mut self, frame: Frame, ctx: &JobContext, live: bool, stream: &EngineStream) {
        if let Some(p) = &mut self.pictures {
            p.hold(&frame);
        }
        if let Some(z) = &mut self.zones {
            z.source_size = (frame.source_width, frame.source_height);
        }
        let reuse = match &mut self.gate {
            Some(gate) => match gate.decide(&frame, ctx.prompt.version()) {
                Decision::Reuse { from } => self
                    .last_output
                    .as_ref()
                    .filter(|l| l.index == from)
                    .map(|l| (from, l.prompt_version, l.json.clone())),
                Decision::Infer(_) => None,
            },
            None => None,
        };
        if let Some((from, version, output)) = reuse {
            let entry = ResultEntry {
                frame: frame.index,
                pts_ms: frame.pts_ms,
                capture_ms: frame.capture_ms,
                prompt_version: version,
                model: self.model.clone(),
                latency_ms: 0.0,
                outcome: FrameOutcome::Reused { output, from },
            };
            self.held.push((entry, frame.received, frame.cursor));
            if self.in_flight == 0 {
                self.release_held();
            }
            return;
        }
        match stream.submit(frame, live) {
            Submitted::Queued => self.in_flight += 1,
            Submitted::Replaced { dropped } => {
                self.dropped += dropped;
                self.in_flight = (self.in_flight + 1).saturating_sub(dropped);
            }
            Submitted::Closed => {
                self.source_failed = Some("the inference engine has stopped".into());
            }
        }
    }

    /// Writes pending entries with the job's counters and cursor in one round trip, and
    /// adds what changed to the worker's metrics. While the write is under way the job
    /// keeps taking the source's events, so frames never wait on Redis: they wait only in
    /// the engine's per-job queue.
    async fn flush(
        &mut self,
        ctx: &JobContext,
        source: &Source,
        stream: Option<&EngineStream>,
    ) -> Result<(), Step> {
        let src = source.counters();
        let counters = self.counters(src);
        let reused = self.base_reused + self.reused;
        let shots = self
            .pictures
            .as_mut()
            .map(Pictures::take)
            .unwrap_or_default();
        let unsent = std::mem::take(&mut self.unsent_pictures);
        let picture_ttl = self.picture_ttl;
        let mut progress = Progress {
            counters,
            cursor: self.cursor.as_ref().map(|(_, c)| c.clone()),
            note: self.note.take(),
            frames_reused: self.gate.is_some().then_some(reused),
            alerts: self.alerts.as_mut().and_then(Alerts::take_write),
            tracker_state: self.tracks.take_write(),
            zones: self.zones.as_mut().and_then(Zones::take_write),
            pictures: None,
            snapshot_cap: self
                .pictures
                .as_mut()
                .and_then(Pictures::take_cap)
                .map(|window| serde_json::to_string(&window).unwrap_or_default()),
        };
        let entries = std::mem::take(&mut self.pending);
        let received = std::mem::take(&mut self.pending_received);
        self.dirty = false;
        self.writing = entries.len() as u64;
        let alert_events = progress.alerts.as_ref().map_or(0, |a| a.events.len());
        let result = {
            let write = async {
                progress.pictures = render(shots, unsent, picture_ttl).await;
                ctx.sink.write(&entries, &progress).await
            };
            tokio::pin!(write);
            loop {
                tokio::select! {
                    biased;
                    r = &mut write => break r,
                    event = source.next(), if stream.is_some() && self.accepts(ctx, source) => {
                        if let Some(stream) = stream {
                            self.on_event(event, ctx, source, stream);
                        }
                    }
                }
            }
        };
        self.writing = 0;
        if let Err(e) = result {
            self.keep_unwritten(progress, entries);
            return Err(if ctx.stop.is_stopped() {
                Step::Stop
            } else {
                Step::Fail(JobFailure::new(format!(
                    "writing results to Redis failed: {e}"
                )))
            });
        }
        self.report_written(counters, reused, entries.len(), received, alert_events);
        Ok(())
    }

    /// Keeps the entries, events and event pictures of a write that failed for the next
    /// write, in order (the latest frame is not kept: a newer one comes).
    fn keep_unwritten(&mut self, progress: Progress, mut entries: Vec<ResultEntry>) {
        if let Some(p) = progress.pictures {
            self.unsent_pictures = p.snapshots;
        }
        if let (Some(a), Some(w)) = (&mut self.alerts, progress.alerts) {
            let newer = std::mem::replace(&mut a.events, w.events);
            a.events.extend(newer);
            a.changed = true;
        }
        self.tracks.changed |= progress.tracker_state.is_some();
        if let (Some(p), Some(_)) = (&mut self.pictures, &progress.snapshot_cap) {
            p.cap_unsaved();
        }
        if let (Some(z), Some(w)) = (&mut self.zones, progress.zones) {
            let newer = std::mem::replace(&mut z.events, w.events);
            z.events.extend(newer);
            z.changed = true;
        }
        entries.append(&mut self.pending);
        self.pending = entries;
    }

    /// Adds what a write saved to the worker's metrics.
    fn report_written(
        &mut self,
        counters: FrameCounters,
        reused: u64,
        written: usize,
        received: Vec<std::time::Instant>,
        alert_events: usize,
    ) {
        let m = self.metrics;
        let r = &self.reported;
        m.results_written.add(written as u64);
        for at in received {
            m.result_delay.observe(at.elapsed().as_secs_f64());
        }
        m.frames_decoded
            .add(counters.frames_decoded.saturating_sub(r.frames_decoded));
        m.frames_sampled
            .add(counters.frames_sampled.saturating_sub(r.frames_sampled));
        m.frames_dropped
            .add(counters.frames_dropped.saturating_sub(r.frames_dropped));
        m.frames_failed
            .add(counters.frames_failed.saturating_sub(r.frames_failed));
        m.frames_reused
            .add(reused.saturating_sub(self.reported_reused));
        m.alerts_written.add(alert_events as u64);
        self.reported = counters;
        self.reported_reused = reused;
    }

    async fn drive(
        &mut self,
        ctx: &JobContext,
        source: &Source,
        mut stream: EngineStream,
    ) -> Result<BodyOutcome, JobFailure> {
        // The `max_duration_s` rule, its one owner: the job ends `completed` when it has run
        // this long in this delivery.
        let deadline = ctx
            .spec
            .max_duration_s
            .map(|s| tokio::time::Instant::now() + Duration::from_secs_f64(s));
        let step = 'drive: loop {
            if let Some(msg) = self.source_failed.take() {
                break Step::Fail(JobFailure::new(msg));
            }
            if self.frames_left(ctx) == Some(0) || (self.source_done && self.in_flight == 0) {
                break Step::Done;
            }
            let accept = self.accepts(ctx, source);
            tokio::select! {
                biased;
                _ = ctx.stop.stopped() => break Step::Stop,
                _ = sleep_until(deadline) => break Step::Done,
                reply = stream.recv() => {
                    let Some(r) = reply else {
                        break Step::Fail(JobFailure::new("the inference engine has stopped"));
                    };
                    self.reply(r);
                    while let Some(r) = stream.try_recv() {
                        self.reply(r);
                    }
                }
                event = source.next(), if accept => self.on_event(event, ctx, source, &stream),
            }
            // Frames taken while a write was under way leave entries of their own: they are
            // written now, not when the next event comes (a second later on HLS).
            while self.dirty {
                if let Err(step) = self.flush(ctx, source, Some(&stream)).await {
                    break 'drive step;
                }
            }
        };
        drop(stream);
        // A job that ends closes its open alerts and zone stays here, before the queue writes
        // its end entry (`fr_job_end`) and finishes it; one handed back or taken over keeps
        // them open in its progress hash for the next delivery.
        let end_reason = match (&step, ctx.stop.reason()) {
            (Step::Fail(_), _) => Some(EndReason::JobFailed),
            (Step::Done, _) => Some(EndReason::JobCompleted),
            (Step::Stop, Some(StopReason::Cancelled)) => Some(EndReason::JobCancelled),
            (Step::Stop, _) => None,
        };
        if let Some(reason) = end_reason {
            if let Some(a) = &mut self.alerts {
                a.close(reason);
            }
            if let Some(z) = &mut self.zones {
                z.close(reason);
            }
        }
        // Save what is in hand (the final counters and cursor) unless another worker owns
        // the job now.
        let save = !matches!(ctx.stop.reason(), Some(StopReason::LeaseLost));
        let flushed = if save {
            self.flush(ctx, source, None).await
        } else {
            Ok(())
        };
        match (step, flushed) {
            (Step::Fail(f), _) => Err(f),
            (_, Err(Step::Fail(f))) => Err(f),
            (Step::Stop, _) | (_, Err(_)) => Ok(BodyOutcome::Stopped),
            (Step::Done, Ok(())) => Ok(BodyOutcome::Completed),
        }
    }
}

/// Draws and encodes `shots` off the runtime (a 720p picture takes milliseconds), after
/// `unsent`, the pictures of a write that failed; a shot that cannot be made is left out,
/// and its events carry no `snapshot`.
async fn render(
    shots: Vec<Shot>,
    unsent: Vec<(String, bytes::Bytes)>,
    ttl: Duration,
) -> Option<PictureWrite> {
    if shots.is_empty() && unsent.is_empty() {
        return None;
    }
    let made = tokio::task::spawn_blocking(move || {
        let mut write = PictureWrite {
            snapshots: unsent,
            ttl_s: ttl.as_secs(),
            ..PictureWrite::default()
        };
        for shot in shots {
            match snapshot_jpeg(&shot.frame, shot.output.as_ref(), &shot.places) {
                Ok(jpeg) => {
                    let jpeg = bytes::Bytes::from(jpeg);
                    if shot.latest {
                        write.latest = Some(jpeg.clone());
                    }
                    write
                        .snapshots
                        .extend(shot.names.into_iter().map(|name| (name, jpeg.clone())));
                }
                Err(e) => tracing::warn!(error = %e, frame = shot.frame.index, "a snapshot could not be made"),
            }
        }
        write
    })
    .await;
    made.ok()
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// The scene gate's seed for a job: its id, hashed (the same on every worker and delivery).
fn gate_seed(job_id: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    job_id.hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tracker::TrackerSettings;

    fn tracks() -> Tracks {
        Tracks {
            tracker: ByteTrack::new(TrackerSettings::at_fps(2.0), TrackerState::default()),
            changed: false,
            last_frame: None,
        }
    }

    fn boxes(x: f64) -> serde_json::Value {
        serde_json::json!({"detections": [{"label": "red", "score": 0.9, "box": [x, 0.0, x + 20.0, 20.0]}]})
    }

    fn track_id(output: &serde_json::Value) -> serde_json::Value {
        output["detections"][0]["track_id"].clone()
    }

    #[test]
    fn the_tracker_steps_once_per_answered_frame_in_order_and_saves_what_changed() {
        let mut t = tracks();
        assert_eq!(t.take_write(), None);
        let mut captions = serde_json::json!({"caption": "a street"});
        t.output(0, &mut captions);
        assert_eq!(t.take_write(), None, "no boxes, nothing to save");
        for (frame, x) in [(1, 0.0), (2, 2.0)] {
            let mut o = boxes(x);
            t.output(frame, &mut o);
            assert_eq!(
                track_id(&o),
                if frame == 1 {
                    serde_json::Value::Null
                } else {
                    0.into()
                }
            );
        }
        let saved = t.take_write().expect("the state after the boxes");
        assert_eq!(t.take_write(), None, "written once");
        // A reply for a frame older than one tracked gets no id and changes nothing.
        let mut late = boxes(1.0);
        t.output(2, &mut late);
        assert_eq!(track_id(&late), serde_json::Value::Null);
        assert_eq!(t.take_write(), None);
        // The saved state carries the ids on, as a delivery taking the job over reads it.
        let state = read_saved::<TrackerState>("job", "tracker", Some(saved)).unwrap();
        let mut next = Tracks {
            tracker: ByteTrack::new(TrackerSettings::at_fps(2.0), state),
            ..tracks()
        };
        let mut o = boxes(4.0);
        next.output(0, &mut o);
        assert_eq!(track_id(&o), serde_json::json!(0));
        assert_eq!(
            read_saved::<TrackerState>("job", "tracker", Some("{".into())),
            None
        );
        assert_eq!(read_saved::<TrackerState>("job", "tracker", None), None);
    }

    /// A job's run with nothing done yet, its pictures on.
    fn run(metrics: &Metrics) -> Run<'_> {
        let places = crate::zones::Places {
            units: crate::zones::Units::Pixels,
            zones: Vec::new(),
            lines: Vec::new(),
        };
        Run {
            job_id: "cam".into(),
            pictures: Pictures::new(6, Duration::ZERO, places, Vec::new()),
            unsent_pictures: Vec::new(),
            picture_ttl: Duration::from_secs(60),
            model: "test".into(),
            metrics,
            base: FrameCounters::default(),
            base_reused: 0,
            reported: FrameCounters::default(),
            reported_reused: 0,
            dropped: 0,
            failed: 0,
            reused: 0,
            pending: Vec::new(),
            pending_received: Vec::new(),
            writing: 0,
            held: Vec::new(),
            dirty: false,
            cursor: None,
            note: None,
            in_flight: 0,
            gate: None,
            last_output: None,
            source_done: false,
            source_failed: None,
            alerts: None,
            tracks: tracks(),
            zones: None,
        }
    }

    #[tokio::test]
    async fn the_pictures_of_a_failed_write_go_with_the_next_one_before_its_own() {
        let metrics = Metrics::default();
        let mut run = run(&metrics);
        let kept = (
            "enter:cam:zone:dock:1:3".to_string(),
            bytes::Bytes::from_static(b"a"),
        );
        let failed = Progress {
            pictures: Some(PictureWrite {
                snapshots: vec![kept.clone()],
                latest: Some(bytes::Bytes::from_static(b"latest")),
                ttl_s: 60,
            }),
            snapshot_cap: Some("[1]".into()),
            ..Default::default()
        };
        run.keep_unwritten(failed, Vec::new());
        assert_eq!(run.unsent_pictures, std::slice::from_ref(&kept));
        let p = run.pictures.as_mut().unwrap();
        assert_eq!(
            p.take_cap(),
            Some(Vec::new()),
            "the cap's window is saved again"
        );
        // The next write: its own shot's picture after the kept one.
        let mut frame = Frame::new(8, 8, bytes::Bytes::from(vec![50u8; 192])).unwrap();
        frame.index = 4;
        let shot = Shot {
            names: vec!["cross:cam:line:gate:1:east".into()],
            latest: false,
            frame,
            output: None,
            places: Arc::new(crate::zones::Places {
                units: crate::zones::Units::Pixels,
                zones: Vec::new(),
                lines: Vec::new(),
            }),
        };
        let unsent = std::mem::take(&mut run.unsent_pictures);
        let write = render(vec![shot], unsent, Duration::from_secs(60))
            .await
            .expect("pictures to store");
        let names: Vec<&str> = write.snapshots.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, [kept.0.as_str(), "cross:cam:line:gate:1:east"]);
        assert_eq!(write.snapshots[0].1, kept.1);
        assert_eq!(write.latest, None);
        assert_eq!(render(Vec::new(), Vec::new(), Duration::ZERO).await, None);
    }

    #[test]
    fn zones_and_lines_are_refused_for_a_model_without_boxes_by_field() {
        let spec = |pairs: &[(&str, &str)]| {
            let mut f = vec![(b"stream_ref".to_vec(), b"frames:cam".to_vec())];
            f.extend(
                pairs
                    .iter()
                    .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec())),
            );
            JobSpec::parse("1-0", &f, 2.0, || "j".into()).unwrap()
        };
        let info = |kind: ModelType| ModelInfo {
            name: kind.as_str().into(),
            task: kind.task().into(),
            input_size: 224,
            device: "cpu".into(),
            dtype: "f32".into(),
        };
        let zoned = spec(&[("zones", r#"{"z": [[0,0],[9,0],[9,9]]}"#)]);
        let lined = spec(&[("lines", r#"{"l": [[0,0],[9,9]]}"#)]);
        let err = check_places(&zoned, &info(ModelType::Clip)).unwrap_err();
        assert_eq!(err.field, "zones");
        assert!(
            err.reason
                .contains("`clip` (zero-shot-scoring) gives no boxes"),
            "{err}"
        );
        assert_eq!(
            check_places(&lined, &info(ModelType::Blip))
                .unwrap_err()
                .field,
            "lines"
        );
        for kind in [
            ModelType::OwlVit,
            ModelType::YoloWorld,
            ModelType::PaliGemma,
            ModelType::TestColour,
        ] {
            assert_eq!(check_places(&zoned, &info(kind)), Ok(()), "{kind:?}");
        }
        assert_eq!(check_places(&spec(&[]), &info(ModelType::Siglip)), Ok(()));
    }

    #[test]
    fn default_side_is_twice_the_model_input_within_bounds() {
        assert_eq!(default_max_side(224), 448);
        assert_eq!(default_max_side(384), 768);
        assert_eq!(default_max_side(1), 64);
        assert_eq!(default_max_side(u32::MAX), 8192);
    }
}
