//! A job's own slot (`{fr:<id>}`): writes its output, one `results` entry per frame and its
//! `progress` hash, both in one atomic pipeline per batch, retried through Redis outages
//! (a batch's alert events go first, to `{fr}:alerts`); ends a job (its open alerts, then
//! the end entry through [`functions::end`]); reads where a job left off.

use crate::alerts::{AlertEvent, AlertState, EndReason};
use crate::job::JobStatus;
use crate::queue::stop::StopSignal;
use crate::store::functions::{self, EndRecord, Retention};
use crate::store::keys::{Keys, snapshot_name};
use crate::store::{Backoff, Store, StoreResult, now_ms};
use crate::zones::watch::{WatchState, ZoneEvent};
use bytes::Bytes;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// Per-job frame counters, written to the job hash as absolute values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FrameCounters {
    pub frames_decoded: u64,
    pub frames_sampled: u64,
    pub frames_dropped: u64,
    pub frames_failed: u64,
}

/// Where a reclaimed or handed-back job left off, read from its hash.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ResumeState {
    /// The body-specific resume position last saved (`cursor` in the job hash).
    pub cursor: Option<String>,
    /// Result entries already written.
    pub results: u64,
    pub counters: FrameCounters,
    /// Which delivery this is, counting from 1.
    pub attempt: u32,
}

/// What became of one frame.
#[derive(Clone, Debug, PartialEq)]
pub enum FrameOutcome {
    /// The model's output, serialised as the entry's `output` field.
    Output(serde_json::Value),
    /// The frame could not be decoded or inferred; the job goes on.
    Error(String),
    /// The scene gate found the scene unchanged: the output of frame `from`, repeated
    /// (serialised once, when that output came).
    Reused { output: Arc<str>, from: u64 },
}

/// One result entry: a frame's output or its error.
#[derive(Clone, Debug, PartialEq)]
pub struct ResultEntry {
    pub frame: u64,
    pub pts_ms: Option<i64>,
    pub capture_ms: i64,
    pub prompt_version: Option<u64>,
    pub model: Arc<str>,
    pub latency_ms: f64,
    pub outcome: FrameOutcome,
}

/// The job's progress written with each batch of entries: absolute values, so a retried
/// write never counts twice.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Progress {
    pub counters: FrameCounters,
    /// Where a reclaimed job resumes (body-specific); `None` leaves the saved one.
    pub cursor: Option<String>,
    /// A short note for people reading the hash (e.g. "waiting for frame stream").
    pub note: Option<String>,
    /// Frames whose output the scene gate reused, across deliveries; `None` leaves it.
    pub frames_reused: Option<u64>,
    /// Alert events to add to `{fr}:alerts` (written first, in the queue's slot) and the
    /// alert state to save in the progress hash with the entries they come from.
    pub alerts: Option<AlertWrite>,
    /// The job's tracker state (JSON), saved as `tracker_state` in its progress hash with
    /// the entries whose track ids it gave; `None` leaves the saved one.
    pub tracker_state: Option<String>,
    /// Zone and line events to add to `{fr}:alerts` (with the alert events, first), and
    /// the zone state and counts to save in the progress hash.
    pub zones: Option<ZoneWrite>,
    /// Event pictures (stored first, so an event never names a missing one) and the
    /// latest annotated frame.
    pub pictures: Option<PictureWrite>,
    /// The picture cap's window (JSON: when each picture of the last minute was taken),
    /// saved as `snapshot_cap` so that the cap holds across deliveries; `None` leaves the
    /// saved one.
    pub snapshot_cap: Option<String>,
}

/// A job's pictures for one write, each a JPEG.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PictureWrite {
    /// Each event's picture by its [`snapshot_name`]: stored at [`Keys::snapshot`], and
    /// named in the event's `snapshot` field.
    pub snapshots: Vec<(String, Bytes)>,
    /// The job's latest annotated frame, stored at [`Keys::latest_snapshot`].
    pub latest: Option<Bytes>,
    /// RESULT_TTL_S: every picture expires this long after it is stored, so none
    /// outlives the job's results.
    pub ttl_s: u64,
}

impl PictureWrite {
    /// The key of the event named `name`'s picture, if this write stores one.
    fn snapshot_key(&self, keys: &Keys, job_id: &str, name: &str) -> Option<String> {
        self.snapshots
            .iter()
            .any(|(n, _)| n == name)
            .then(|| keys.snapshot(job_id, name))
    }
}

/// The `alert_id` of a zone or line event of job `job_id` (with `kind`, it names one
/// event).
pub fn zone_alert_id(job_id: &str, event: &ZoneEvent) -> String {
    format!("{job_id}:{}", event.event_id)
}

/// The progress hash field that holds a job's alert state (JSON of `AlertState`).
pub const ALERT_STATE_FIELD: &str = "alert_state";

/// The progress hash field that holds a job's tracker state (JSON of
/// [`crate::tracker::TrackerState`]), so a job taken over keeps its track ids.
pub const TRACKER_STATE_FIELD: &str = "tracker_state";

/// The progress hash field that holds a job's zone state (JSON of
/// [`crate::zones::watch::WatchState`]), so a job taken over neither loses nor repeats a
/// zone or line event.
pub const ZONE_STATE_FIELD: &str = "zone_state";

/// The progress hash field that holds a job's picture cap window (JSON: the wall-clock
/// milliseconds of each picture of the last minute), so that a job taken over keeps to
/// `SNAPSHOTS_PER_MIN`.
pub const SNAPSHOT_CAP_FIELD: &str = "snapshot_cap";

/// A job's zone and line output for one write.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ZoneWrite {
    pub events: Vec<ZoneEvent>,
    /// The zone state (JSON), saved as `zone_state`.
    pub state: String,
    /// The running counts, each a progress hash field.
    pub counts: Vec<(String, u64)>,
    /// ALERTS_MAXLEN.
    pub maxlen: usize,
}

/// A job's alert output for one write.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AlertWrite {
    pub events: Vec<AlertEvent>,
    /// The job's alert state (JSON), saved as `alert_state` in its progress hash.
    pub state: String,
    /// ALERTS_MAXLEN.
    pub maxlen: usize,
}

/// A job's handle for writing results. Cheap to clone.
#[derive(Clone)]
pub struct ResultSink {
    store: Store,
    job_id: Arc<str>,
    progress_key: Arc<str>,
    results_key: Arc<str>,
    maxlen: usize,
    stop: StopSignal,
    written: Arc<AtomicU64>,
    alert_state_saved: Arc<AtomicBool>,
}

/// Whether a job's progress hash may hold alerts still open, or tracks still inside zones,
/// when the job ends, so that [`write_end`] must read it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpenAlerts {
    /// An earlier delivery, or this one, saved an alert or zone state.
    Possible,
    /// A first delivery whose sink never saved one: the hash holds none.
    NoneSaved,
}

impl ResultSink {
    pub fn new(
        store: Store,
        job_id: &str,
        maxlen: usize,
        stop: StopSignal,
        already_written: u64,
    ) -> Self {
        Self {
            job_id: job_id.into(),
            progress_key: store.keys().progress(job_id).into(),
            results_key: store.keys().results(job_id).into(),
            store,
            maxlen,
            stop,
            written: Arc::new(AtomicU64::new(already_written)),
            alert_state_saved: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Set once this sink has sent an alert or zone state to the progress hash (before the
    /// write, since a write whose reply was lost may still have landed).
    pub fn alert_state_saved(&self) -> Arc<AtomicBool> {
        self.alert_state_saved.clone()
    }

    /// Result entries written for this job so far, across deliveries.
    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    /// Writes `progress`'s alert events to `{fr}:alerts`, then `entries` and `progress` in
    /// one atomic round trip in the job's slot. The two slots cannot share a transaction on
    /// a Cluster, so the events go first: a failure between the steps repeats events (each
    /// carries its `alert_id`) and never loses one. Connection failures are retried with
    /// backoff until Redis answers or the job is stopped.
    pub async fn write(&self, entries: &[ResultEntry], progress: &Progress) -> StoreResult<()> {
        if progress.alerts.is_some() || progress.zones.is_some() {
            self.alert_state_saved.store(true, Ordering::Relaxed);
        }
        let pictures = progress.pictures.as_ref();
        if let Some(p) = pictures.filter(|p| !p.snapshots.is_empty()) {
            let mut pipe = redis::pipe();
            for (name, jpeg) in &p.snapshots {
                let key = self.store.keys().snapshot(&self.job_id, name);
                set_picture(&mut pipe, &key, jpeg, p.ttl_s);
            }
            self.send(&pipe).await?;
        }
        if let Some(pipe) = self.events(progress) {
            self.send(&pipe).await?;
        }
        self.send(&self.build(entries, progress)).await?;
        self.written
            .fetch_add(entries.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// The XADDs of a write's alert, zone and line events to `{fr}:alerts`, each naming
    /// its picture where the write stores one; `None` without events.
    fn events(&self, progress: &Progress) -> Option<redis::Pipeline> {
        let alerts = progress.alerts.as_ref().filter(|a| !a.events.is_empty());
        let zones = progress.zones.as_ref().filter(|z| !z.events.is_empty());
        if alerts.is_none() && zones.is_none() {
            return None;
        }
        let mut pipe = redis::pipe();
        let keys = self.store.keys();
        let pictures = progress.pictures.as_ref();
        let snapshot = |name: &str| pictures?.snapshot_key(keys, &self.job_id, name);
        if let Some(a) = alerts {
            let events = EventWrite::new(&self.job_id, a.maxlen, &snapshot);
            add_alert_events(&mut pipe, &self.store, &events, &a.events);
        }
        if let Some(z) = zones {
            let events = EventWrite::new(&self.job_id, z.maxlen, &snapshot);
            add_zone_events(&mut pipe, &self.store, &events, &z.events);
        }
        Some(pipe)
    }

    async fn send(&self, pipe: &redis::Pipeline) -> StoreResult<()> {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            match self.store.pipe::<redis::Value>(pipe).await {
                Ok(_) => return Ok(()),
                Err(e) if e.is_transient() && !self.stop.is_stopped() => {
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %e, job = %self.job_id, ?delay, "result write failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = self.stop.stopped() => {}
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Saves progress alone (no entries), e.g. a note while waiting for a source.
    pub async fn progress(&self, progress: &Progress) -> StoreResult<()> {
        self.write(&[], progress).await
    }

    /// The atomic pipeline of one write: an XADD per entry, the progress hash, the count.
    fn build(&self, entries: &[ResultEntry], progress: &Progress) -> redis::Pipeline {
        let mut pipe = redis::pipe();
        pipe.atomic();
        for e in entries {
            self.add_entry(&mut pipe, e);
        }
        let last_version = entries.iter().rev().find_map(|e| e.prompt_version);
        self.add_progress(&mut pipe, progress, last_version);
        if let Some(p) = &progress.pictures
            && let Some(jpeg) = &p.latest
        {
            let key = self.store.keys().latest_snapshot(&self.job_id);
            set_picture(&mut pipe, &key, jpeg, p.ttl_s);
        }
        if !entries.is_empty() {
            pipe.cmd("HINCRBY")
                .arg(&*self.progress_key)
                .arg("results")
                .arg(entries.len())
                .ignore();
        }
        pipe
    }

    /// One entry's XADD to the job's results stream.
    fn add_entry(&self, pipe: &mut redis::Pipeline, e: &ResultEntry) {
        let cmd = pipe
            .cmd("XADD")
            .arg(&*self.results_key)
            .arg("MAXLEN")
            .arg("~")
            .arg(self.maxlen)
            .arg("*");
        match &e.outcome {
            FrameOutcome::Output(_) | FrameOutcome::Reused { .. } => cmd.arg("kind").arg("result"),
            FrameOutcome::Error(_) => cmd.arg("kind").arg("error"),
        };
        cmd.arg("frame").arg(e.frame);
        if let Some(pts) = e.pts_ms {
            cmd.arg("pts_ms").arg(pts);
        }
        cmd.arg("capture_ms").arg(e.capture_ms);
        if let Some(v) = e.prompt_version {
            cmd.arg("prompt_version").arg(v);
        }
        cmd.arg("model")
            .arg(&*e.model)
            .arg("latency_ms")
            .arg(format!("{:.2}", e.latency_ms));
        match &e.outcome {
            FrameOutcome::Output(v) => cmd.arg("output").arg(v.to_string()),
            FrameOutcome::Error(msg) => cmd.arg("error").arg(msg),
            FrameOutcome::Reused { output, from } => cmd
                .arg("output")
                .arg(&**output)
                .arg("reused_from")
                .arg(*from),
        };
        cmd.ignore();
    }

    /// The HSET of the job's progress hash; `prompt_version` is the last one an entry of
    /// this write ran with.
    fn add_progress(
        &self,
        pipe: &mut redis::Pipeline,
        progress: &Progress,
        prompt_version: Option<u64>,
    ) {
        let c = &progress.counters;
        let hset = pipe
            .cmd("HSET")
            .arg(&*self.progress_key)
            .arg("updated_ms")
            .arg(now_ms())
            .arg("frames_decoded")
            .arg(c.frames_decoded)
            .arg("frames_sampled")
            .arg(c.frames_sampled)
            .arg("frames_dropped")
            .arg(c.frames_dropped)
            .arg("frames_failed")
            .arg(c.frames_failed);
        if let Some(cursor) = &progress.cursor {
            hset.arg("cursor").arg(cursor);
        }
        if let Some(n) = progress.frames_reused {
            hset.arg("frames_reused").arg(n);
        }
        if let Some(a) = &progress.alerts {
            hset.arg(ALERT_STATE_FIELD).arg(&a.state);
        }
        if let Some(state) = &progress.tracker_state {
            hset.arg(TRACKER_STATE_FIELD).arg(state);
        }
        if let Some(z) = &progress.zones {
            hset.arg(ZONE_STATE_FIELD).arg(&z.state);
            for (field, n) in &z.counts {
                hset.arg(field).arg(n);
            }
        }
        if let Some(window) = &progress.snapshot_cap {
            hset.arg(SNAPSHOT_CAP_FIELD).arg(window);
        }
        if let Some(note) = &progress.note {
            hset.arg("note").arg(note);
        }
        if let Some(v) = prompt_version {
            hset.arg("prompt_version").arg(v);
        }
        hset.ignore();
    }
}

/// A picture's SET, expiring after `ttl_s`.
fn set_picture(pipe: &mut redis::Pipeline, key: &str, jpeg: &Bytes, ttl_s: u64) {
    pipe.cmd("SET")
        .arg(key)
        .arg(&jpeg[..])
        .arg("EX")
        .arg(ttl_s.max(1))
        .ignore();
}

/// How one job's events go to `{fr}:alerts`: the job, the stream's cap, and the key of
/// each event's picture where the write stores one (by [`snapshot_name`]).
struct EventWrite<'a> {
    job_id: &'a str,
    maxlen: usize,
    snapshot: &'a dyn Fn(&str) -> Option<String>,
}

impl<'a> EventWrite<'a> {
    fn new(job_id: &'a str, maxlen: usize, snapshot: &'a dyn Fn(&str) -> Option<String>) -> Self {
        Self {
            job_id,
            maxlen,
            snapshot,
        }
    }

    /// One entry: `fields` (which start with `kind`), then `snapshot` when there is one.
    fn add(
        &self,
        pipe: &mut redis::Pipeline,
        alerts_key: &str,
        alert_id: &str,
        kind: &str,
        fields: impl IntoIterator<Item = (&'static str, String)>,
    ) {
        let cmd = pipe
            .cmd("XADD")
            .arg(alerts_key)
            .arg("MAXLEN")
            .arg("~")
            .arg(self.maxlen)
            .arg("*")
            .arg("job_id")
            .arg(self.job_id)
            .arg("alert_id")
            .arg(alert_id);
        for (name, value) in fields {
            cmd.arg(name).arg(value);
        }
        if let Some(key) = (self.snapshot)(&snapshot_name(kind, alert_id)) {
            cmd.arg("snapshot").arg(key);
        }
        cmd.ignore();
    }
}

/// Zone and line `events` as XADDs to `{fr}:alerts` beside the label alerts, each with
/// its `alert_id` ([`zone_alert_id`]) to dedupe by with `kind`.
fn add_zone_events(
    pipe: &mut redis::Pipeline,
    store: &Store,
    write: &EventWrite<'_>,
    events: &[ZoneEvent],
) {
    let alerts_key = store.keys().alerts();
    for e in events {
        let kind = e.kind.as_str();
        let alert_id = zone_alert_id(write.job_id, e);
        let fields = std::iter::once(("kind", kind.to_string())).chain(e.fields());
        write.add(pipe, &alerts_key, &alert_id, kind, fields);
    }
}

/// Label alert `events` as XADDs to `{fr}:alerts`.
fn add_alert_events(
    pipe: &mut redis::Pipeline,
    store: &Store,
    write: &EventWrite<'_>,
    events: &[AlertEvent],
) {
    let alerts_key = store.keys().alerts();
    for e in events {
        let alert_id = e.alert_id(write.job_id);
        write.add(pipe, &alerts_key, &alert_id, e.kind.as_str(), e.fields());
    }
}

impl std::fmt::Debug for ResultSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResultSink")
            .field("results_key", &self.results_key)
            .finish()
    }
}

/// What a job's progress hash says: where it left off, and whether its end entry is written.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SavedProgress {
    /// The resume state, less the attempt (the queue's slot counts those).
    pub resume: ResumeState,
    /// The final status in the end entry, once written.
    pub ended: Option<JobStatus>,
}

const PROGRESS_FIELDS: [&str; 7] = [
    "ended",
    "cursor",
    "results",
    "frames_decoded",
    "frames_sampled",
    "frames_dropped",
    "frames_failed",
];

/// Reads a job's progress hash (one `HMGET` in its slot).
pub async fn saved_progress(store: &Store, job_id: &str) -> StoreResult<SavedProgress> {
    let mut cmd = redis::cmd("HMGET");
    cmd.arg(store.keys().progress(job_id))
        .arg(&PROGRESS_FIELDS[..]);
    let v: Vec<Option<String>> = store.query(&cmd).await?;
    let text = |i: usize| v.get(i).cloned().flatten().filter(|s| !s.is_empty());
    let num = |i: usize| text(i).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
    Ok(SavedProgress {
        ended: text(0).as_deref().and_then(JobStatus::parse),
        resume: ResumeState {
            cursor: text(1),
            results: num(2),
            counters: FrameCounters {
                frames_decoded: num(3),
                frames_sampled: num(4),
                frames_dropped: num(5),
                frames_failed: num(6),
            },
            attempt: 0,
        },
    })
}

/// Writes a job's end entry unless one is there ([`functions::end`], in the job's slot);
/// returns the final status and results count as recorded, which may be an earlier call's.
///
/// First it ends the alerts the job's progress hash still holds open, and the stays of the
/// tracks still inside its zones: a job that ends while no worker runs it (cancelled after
/// it was handed back, dead-lettered) has nobody else to end them. A worker that ran the
/// job to its end closed them already and saved that, so for it this finds none. With
/// [`OpenAlerts::NoneSaved`] the read is skipped.
pub async fn write_end(
    store: &Store,
    job_id: &str,
    status: JobStatus,
    error: &str,
    retention: Retention,
    open_alerts: OpenAlerts,
) -> StoreResult<EndRecord> {
    if open_alerts == OpenAlerts::Possible {
        close_saved(store, job_id, status, retention.alerts_maxlen).await?;
    }
    functions::end(store, job_id, status, error, retention).await
}

/// Why a job's open alerts end when it ends with `status`; `None` for a status that is not
/// an end.
fn end_reason(status: JobStatus) -> Option<EndReason> {
    match status {
        JobStatus::Completed => Some(EndReason::JobCompleted),
        JobStatus::Cancelled => Some(EndReason::JobCancelled),
        JobStatus::Failed | JobStatus::Dead => Some(EndReason::JobFailed),
        JobStatus::Queued | JobStatus::Running => None,
    }
}

/// Ends the open alerts and zone stays saved in a job's progress hash: their `end` and
/// `leave` events go to `{fr}:alerts`, then the states without them (and the zone counts)
/// replace the saved ones. Repeating it after a failure between the two steps repeats the
/// events, each with its `alert_id`, and loses none (as a result write does).
async fn close_saved(
    store: &Store,
    job_id: &str,
    status: JobStatus,
    maxlen: usize,
) -> StoreResult<()> {
    let Some(reason) = end_reason(status) else {
        return Ok(());
    };
    let progress = store.keys().progress(job_id);
    let mut get = redis::cmd("HMGET");
    get.arg(&progress)
        .arg(ALERT_STATE_FIELD)
        .arg(ZONE_STATE_FIELD);
    let saved: Vec<Option<String>> = store.query(&get).await?;
    let field = |i: usize| saved.get(i).cloned().flatten();
    let mut alerts = read_saved::<AlertState>(job_id, "alert", field(0));
    let mut zones = read_saved::<WatchState>(job_id, "zone", field(1));
    let alert_events = alerts
        .as_mut()
        .map(|s| s.close_all(reason))
        .unwrap_or_default();
    let zone_events = zones
        .as_mut()
        .map(|s| s.close_all(reason.as_str()))
        .unwrap_or_default();
    if alert_events.is_empty() && zone_events.is_empty() {
        return Ok(());
    }
    let pipe = {
        let mut pipe = redis::pipe();
        let no_pictures = |_: &str| None;
        let write = EventWrite::new(job_id, maxlen, &no_pictures);
        add_alert_events(&mut pipe, store, &write, &alert_events);
        add_zone_events(&mut pipe, store, &write, &zone_events);
        pipe
    };
    store.pipe::<redis::Value>(&pipe).await?;
    let mut set = redis::cmd("HSET");
    set.arg(&progress);
    if let Some(state) = alerts.filter(|_| !alert_events.is_empty()) {
        set.arg(ALERT_STATE_FIELD)
            .arg(serde_json::to_string(&state).unwrap_or_default());
    }
    if let Some(state) = zones.filter(|_| !zone_events.is_empty()) {
        set.arg(ZONE_STATE_FIELD)
            .arg(serde_json::to_string(&state).unwrap_or_default());
        for (field, n) in state.counts() {
            set.arg(field).arg(n);
        }
    }
    store.query::<redis::Value>(&set).await?;
    Ok(())
}

/// A state saved as JSON in a job's progress hash (`what`: alert, tracker, zone, ...);
/// `None` when there is none, or when it cannot be read (said in the log: a delivery
/// starts that state afresh, and its open events cannot be ended).
pub fn read_saved<T: serde::de::DeserializeOwned>(
    job_id: &str,
    what: &str,
    json: Option<String>,
) -> Option<T> {
    serde_json::from_str(&json?)
        .inspect_err(|e| {
            tracing::warn!(job = %job_id, error = %e, "the saved {what} state is unreadable; it is left out");
        })
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sink() -> ResultSink {
        let store = Store::new("redis://127.0.0.1:1/0", "fr", 1).expect("a lazy pool");
        ResultSink::new(store, "cam", 100, StopSignal::new(), 0)
    }

    /// The progress HSET of one write, as the words it sends.
    fn progress_words(progress: &Progress) -> Vec<String> {
        words(&sink().build(&[], progress))
            .into_iter()
            .find(|c| c[0] == "HSET")
            .expect("an HSET")
    }

    /// The words of every command of `pipe`.
    fn words(pipe: &redis::Pipeline) -> Vec<Vec<String>> {
        pipe.cmd_iter()
            .map(|c| {
                c.args_iter()
                    .map(|a| match a {
                        redis::Arg::Simple(b) => String::from_utf8_lossy(b).into_owned(),
                        _ => String::new(),
                    })
                    .collect()
            })
            .collect()
    }

    fn enter(track_id: u64) -> ZoneEvent {
        ZoneEvent {
            kind: crate::zones::watch::EventKind::Enter,
            event_id: format!("zone:dock:{track_id}:3"),
            place: "dock".into(),
            track_id,
            label: "red".into(),
            frame: 3,
            capture_ms: 300,
            dwell_ms: None,
            direction: None,
            reason: None,
        }
    }

    #[test]
    fn an_event_names_its_picture_only_when_the_write_stores_it() {
        let pictured = snapshot_name("enter", &zone_alert_id("cam", &enter(1)));
        let progress = Progress {
            zones: Some(ZoneWrite {
                events: vec![enter(1), enter(2)],
                maxlen: 100,
                ..Default::default()
            }),
            pictures: Some(PictureWrite {
                snapshots: vec![(pictured.clone(), Bytes::from_static(b"jpeg"))],
                latest: None,
                ttl_s: 60,
            }),
            ..Default::default()
        };
        let adds = words(&sink().events(&progress).expect("two events"));
        assert_eq!(adds.len(), 2);
        let at = adds[0].iter().position(|w| w == "snapshot").expect("named");
        assert_eq!(adds[0][at + 1], format!("{{fr:cam}}:snap:{pictured}"));
        assert!(!adds[1].iter().any(|w| w == "snapshot"), "{:?}", adds[1]);
        assert!(sink().events(&Progress::default()).is_none());
    }

    #[test]
    fn the_tracker_state_is_saved_with_the_progress_only_when_given() {
        let words = progress_words(&Progress {
            tracker_state: Some(r#"{"next_id":3,"tracks":[]}"#.into()),
            ..Default::default()
        });
        let at = words
            .iter()
            .position(|w| w == TRACKER_STATE_FIELD)
            .expect("the field");
        assert_eq!(words[at + 1], r#"{"next_id":3,"tracks":[]}"#);
        assert_eq!(words[1], "{fr:cam}:progress");
        let words = progress_words(&Progress::default());
        assert!(!words.iter().any(|w| w == TRACKER_STATE_FIELD), "{words:?}");
    }
}
