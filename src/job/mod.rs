//! What a job is: its spec parsed and validated from a `{fr}:jobs` entry (each field read
//! through `fields::EntryFields`), its fields, limits and statuses.

mod fields;
mod tracking;

use crate::alerts::AlertSettings;
use crate::tracker::TrackerSettings;
use crate::zones::Places;
use fields::EntryFields;
use std::collections::BTreeMap;

/// Longest accepted `prompt`, in bytes.
pub const MAX_PROMPT_BYTES: usize = 8 * 1024;
/// Longest accepted `stream_ref`, in bytes.
pub const MAX_STREAM_REF_BYTES: usize = 2 * 1024;
/// Longest accepted `job_id`.
pub const MAX_JOB_ID_LEN: usize = 128;
/// Highest accepted `fps`.
pub const MAX_FPS: f64 = 30.0;
/// Longest accepted `max_duration_s`: a year. A job that should run for ever leaves it
/// out; the bound keeps the deadline a worker computes from it inside its clock's range.
pub const MAX_DURATION_S: f64 = 365.0 * 24.0 * 3600.0;
/// Longest accepted `alert_clear_ms`: a day. Capture times are signed milliseconds; the
/// bound keeps every sum and conversion with them exact.
pub const MAX_ALERT_CLEAR_MS: u64 = 24 * 3600 * 1000;
/// Most fields a job entry may carry: every known field several times over, so only an
/// entry built to abuse the parser meets it.
pub const MAX_JOB_FIELDS: usize = 64;

/// A field a job entry may carry; anything else is kept and warned about. This is the one
/// list of them: parsing, the job hash, the CLI's submissions and the function library's
/// copy of the hash fields (checked against [`JobField::in_hash`] by a test) all follow it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobField {
    StreamRef,
    Prompt,
    Fps,
    JobId,
    MaxFrames,
    MaxDurationS,
    Source,
    SceneGate,
    Alerts,
    AlertMinFrames,
    AlertClearMs,
    RtspTransport,
    TrackActivationThreshold,
    TrackHighThreshold,
    TrackMinIou,
    TrackMinFrames,
    TrackLostBuffer,
    TrackFrameRate,
    Zones,
    Lines,
    ZoneUnits,
}

impl JobField {
    pub const ALL: [JobField; 21] = [
        JobField::StreamRef,
        JobField::Prompt,
        JobField::Fps,
        JobField::JobId,
        JobField::MaxFrames,
        JobField::MaxDurationS,
        JobField::Source,
        JobField::SceneGate,
        JobField::Alerts,
        JobField::AlertMinFrames,
        JobField::AlertClearMs,
        JobField::RtspTransport,
        JobField::TrackActivationThreshold,
        JobField::TrackHighThreshold,
        JobField::TrackMinIou,
        JobField::TrackMinFrames,
        JobField::TrackLostBuffer,
        JobField::TrackFrameRate,
        JobField::Zones,
        JobField::Lines,
        JobField::ZoneUnits,
    ];

    /// The field's name in the entry (and in the job hash).
    pub fn name(self) -> &'static str {
        match self {
            JobField::StreamRef => "stream_ref",
            JobField::Prompt => "prompt",
            JobField::Fps => "fps",
            JobField::JobId => "job_id",
            JobField::MaxFrames => "max_frames",
            JobField::MaxDurationS => "max_duration_s",
            JobField::Source => "source",
            JobField::SceneGate => "scene_gate",
            JobField::Alerts => "alerts",
            JobField::AlertMinFrames => "alert_min_frames",
            JobField::AlertClearMs => "alert_clear_ms",
            JobField::RtspTransport => "rtsp_transport",
            JobField::TrackActivationThreshold => "track_activation_threshold",
            JobField::TrackHighThreshold => "track_high_threshold",
            JobField::TrackMinIou => "track_min_iou",
            JobField::TrackMinFrames => "track_min_frames",
            JobField::TrackLostBuffer => "track_lost_buffer",
            JobField::TrackFrameRate => "track_frame_rate",
            JobField::Zones => "zones",
            JobField::Lines => "lines",
            JobField::ZoneUnits => "zone_units",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.name() == name)
    }

    /// Whether the job hash shows the field (the value after defaults once a worker read the
    /// entry; the value as given when only a function saw it: `fr_submit`, `fr_cancel`).
    pub fn in_hash(self) -> bool {
        match self {
            JobField::StreamRef
            | JobField::Source
            | JobField::Fps
            | JobField::Prompt
            | JobField::MaxFrames
            | JobField::MaxDurationS => true,
            JobField::JobId
            | JobField::SceneGate
            | JobField::Alerts
            | JobField::AlertMinFrames
            | JobField::AlertClearMs
            | JobField::RtspTransport
            | JobField::TrackActivationThreshold
            | JobField::TrackHighThreshold
            | JobField::TrackMinIou
            | JobField::TrackMinFrames
            | JobField::TrackLostBuffer
            | JobField::TrackFrameRate
            | JobField::Zones
            | JobField::Lines
            | JobField::ZoneUnits => false,
        }
    }
}

/// Where a job's frames come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceKind {
    /// An HTTP(S) playlist or other stream decoded by an ffmpeg child.
    Hls,
    /// A Redis stream of frames.
    Redis,
}

impl SourceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SourceKind::Hls => "hls",
            SourceKind::Redis => "redis",
        }
    }

    /// Detection when the entry has no `source`: URLs ffmpeg reads are HLS, anything else a
    /// Redis key.
    pub fn detect(stream_ref: &str) -> Self {
        let lower = stream_ref.to_ascii_lowercase();
        if ["http://", "https://", "rtsp://", "rtsps://"]
            .iter()
            .any(|scheme| lower.starts_with(scheme))
        {
            SourceKind::Hls
        } else {
            SourceKind::Redis
        }
    }
}

/// How an RTSP camera sends its media: the job field `rtsp_transport`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RtspTransport {
    /// Interleaved on the RTSP connection: passes NAT and firewalls, loses nothing.
    #[default]
    Tcp,
    /// RTP over UDP: lower latency on a clean network, may lose packets.
    Udp,
}

impl RtspTransport {
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "tcp" => Some(RtspTransport::Tcp),
            "udp" => Some(RtspTransport::Udp),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RtspTransport::Tcp => "tcp",
            RtspTransport::Udp => "udp",
        }
    }
}

/// A job's lifecycle states, as written in the job hash.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobStatus {
    Queued,
    Running,
    Completed,
    Failed,
    Cancelled,
    Dead,
}

impl JobStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Completed => "completed",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
            JobStatus::Dead => "dead",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "queued" => JobStatus::Queued,
            "running" => JobStatus::Running,
            "completed" => JobStatus::Completed,
            "failed" => JobStatus::Failed,
            "cancelled" => JobStatus::Cancelled,
            "dead" => JobStatus::Dead,
            _ => return None,
        })
    }

    pub fn is_terminal(self) -> bool {
        !matches!(self, JobStatus::Queued | JobStatus::Running)
    }
}

/// A validated job, as read from one `{fr}:jobs` entry.
#[derive(Clone, Debug, PartialEq)]
pub struct JobSpec {
    pub job_id: String,
    /// The `{fr}:jobs` entry id that carries this job.
    pub entry_id: String,
    pub stream_ref: String,
    pub source: SourceKind,
    /// The job's own prompt; `None` means it follows the active prompt, live.
    pub prompt: Option<String>,
    pub fps: f64,
    pub max_frames: Option<u64>,
    pub max_duration_s: Option<f64>,
    /// `scene_gate`: on or off for this job; `None` follows SCENE_GATE.
    pub scene_gate: Option<bool>,
    /// `alerts` (on/off, default on), `alert_min_frames`, `alert_clear_ms`: `None` when
    /// alerts are off.
    pub alerts: Option<AlertSettings>,
    /// `rtsp_transport`: `tcp` (default) or `udp`, for `rtsp://` and `rtsps://` streams.
    pub rtsp_transport: RtspTransport,
    /// The box tracker's parameters: the `track_*` fields, each defaulting to the
    /// reference's value (`track_frame_rate` to the job's `fps`).
    pub tracker: TrackerSettings,
    /// `zones`, `lines` and `zone_units`: where the job counts its tracks (`crate::zones`);
    /// empty when the job has neither.
    pub places: Places,
    /// Fields the contract does not know, kept as they came.
    pub extra: BTreeMap<String, String>,
    /// Things the producer should know about but that did not stop the job.
    pub warnings: Vec<String>,
}

/// Why a job entry was refused: names the field and the reason.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("field `{field}`: {reason}")]
pub struct SpecError {
    pub field: String,
    pub reason: String,
}

impl SpecError {
    pub fn new(field: JobField, reason: impl Into<String>) -> Self {
        Self {
            field: field.name().to_string(),
            reason: reason.into(),
        }
    }

    /// An error in a field the contract does not know (a name that is not UTF-8, say).
    fn other(field: &str, reason: impl Into<String>) -> Self {
        Self {
            field: field.to_string(),
            reason: reason.into(),
        }
    }
}

/// A job id a user can type: 1 to 128 of `A-Z a-z 0-9 . _ : -`.
pub fn validate_job_id(id: &str) -> Result<(), SpecError> {
    if id.is_empty() || id.len() > MAX_JOB_ID_LEN {
        return Err(SpecError::new(
            JobField::JobId,
            format!("must be 1 to {MAX_JOB_ID_LEN} characters"),
        ));
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
    {
        return Err(SpecError::new(
            JobField::JobId,
            "may hold only letters, digits, '.', '_', ':' and '-'",
        ));
    }
    Ok(())
}

/// Checks a stream reference for what would be unsafe to hand to ffmpeg or Redis whatever
/// the source: a leading `-` (an ffmpeg option), control characters, excessive length.
pub fn validate_stream_ref(stream_ref: &str) -> Result<(), SpecError> {
    if stream_ref.trim().is_empty() {
        return Err(SpecError::new(
            JobField::StreamRef,
            "is required and may not be empty",
        ));
    }
    if stream_ref.len() > MAX_STREAM_REF_BYTES {
        return Err(SpecError::new(
            JobField::StreamRef,
            format!("is longer than {MAX_STREAM_REF_BYTES} bytes"),
        ));
    }
    if stream_ref.starts_with('-') {
        return Err(SpecError::new(
            JobField::StreamRef,
            "may not start with '-'",
        ));
    }
    if stream_ref.chars().any(char::is_control) {
        return Err(SpecError::new(
            JobField::StreamRef,
            "may not hold control characters",
        ));
    }
    Ok(())
}

/// The result of reading raw entry fields: either a spec, or an error plus whatever job id
/// could be recovered (so the failure can be recorded under the producer's id).
pub type ParsedEntry = Result<JobSpec, (SpecError, Option<String>)>;

impl JobSpec {
    /// Parses the raw fields of a job entry. `new_id` supplies an id when the entry has
    /// none; `default_fps` fills a missing `fps`.
    pub fn parse(
        entry_id: &str,
        fields: &[(Vec<u8>, Vec<u8>)],
        default_fps: f64,
        new_id: impl FnOnce() -> String,
    ) -> ParsedEntry {
        let (entry, entry_error) = EntryFields::decode(fields);
        // The job id first, so that any later error is filed under the producer's id.
        let job_id = match entry.raw(JobField::JobId) {
            Some(id) => {
                if let Err(e) = validate_job_id(id) {
                    return Err((e, None));
                }
                Some(id.to_string())
            }
            None => None,
        };
        if let Some(e) = entry_error {
            return Err((e, job_id));
        }
        let id_for_errors = job_id.clone();
        Self::read(entry, entry_id, default_fps, || {
            job_id.unwrap_or_else(new_id)
        })
        .map_err(|e| (e, id_for_errors))
    }

    /// Reads and checks each field of a decoded entry, in the order errors are reported.
    fn read(
        entry: EntryFields,
        entry_id: &str,
        default_fps: f64,
        job_id: impl FnOnce() -> String,
    ) -> Result<JobSpec, SpecError> {
        let stream_ref = entry.required(JobField::StreamRef)?.to_string();
        validate_stream_ref(&stream_ref)?;
        let source = entry
            .parsed(JobField::Source, SOURCE_EXPECTED, |raw| {
                source_named(raw, &stream_ref)
            })?
            .unwrap_or_else(|| SourceKind::detect(&stream_ref));
        let fps = entry
            .number(
                JobField::Fps,
                &format!("must be a number in (0, {MAX_FPS}]"),
                |f: &f64| f.is_finite() && *f > 0.0 && *f <= MAX_FPS,
            )?
            .unwrap_or(default_fps);
        let prompt = entry.checked(JobField::Prompt, checked_prompt)?;
        let max_frames = entry.number(
            JobField::MaxFrames,
            "must be a whole number above 0",
            |n: &u64| *n > 0,
        )?;
        let max_duration_s = entry.number(
            JobField::MaxDurationS,
            &format!(
                "must be a number of seconds above 0, at most {MAX_DURATION_S} (leave it out \
                 for no limit)"
            ),
            |s: &f64| s.is_finite() && *s > 0.0 && *s <= MAX_DURATION_S,
        )?;
        let scene_gate = entry.on_off(JobField::SceneGate)?;
        let alerts = alert_settings(&entry)?;
        let rtsp_transport = entry
            .parsed(
                JobField::RtspTransport,
                "must be `tcp` or `udp`",
                RtspTransport::parse,
            )?
            .unwrap_or_default();
        let tracker = tracking::tracker_settings(&entry, fps)?;
        let places = tracking::places(&entry)?;
        let extra = entry.unknown();
        let mut warnings = entry.warnings;
        warnings.extend(
            extra
                .keys()
                .map(|name| format!("unknown field `{name}` was kept in `extra` but is not used")),
        );
        Ok(JobSpec {
            job_id: job_id(),
            entry_id: entry_id.to_string(),
            stream_ref,
            source,
            prompt,
            fps,
            max_frames,
            max_duration_s,
            scene_gate,
            alerts,
            rtsp_transport,
            tracker,
            places,
            extra,
            warnings,
        })
    }
}

/// What the `source` field accepts, for its error.
const SOURCE_EXPECTED: &str = "must be `hls` or `redis` (or absent to detect)";

/// The `source` field's value: a kind by name, or detection from the stream reference when
/// it is blank or `auto`.
fn source_named(raw: &str, stream_ref: &str) -> Option<SourceKind> {
    match raw {
        "" | "auto" => Some(SourceKind::detect(stream_ref)),
        "hls" => Some(SourceKind::Hls),
        "redis" => Some(SourceKind::Redis),
        _ => None,
    }
}

/// A job's own prompt: not over [`MAX_PROMPT_BYTES`], and not blank (a job without a prompt
/// leaves the field out).
fn checked_prompt(prompt: &str) -> Result<String, String> {
    if prompt.len() > MAX_PROMPT_BYTES {
        return Err(format!(
            "is {} bytes; at most {MAX_PROMPT_BYTES} are allowed",
            prompt.len()
        ));
    }
    if prompt.trim().is_empty() {
        return Err("is empty; leave it out to follow the active prompt".to_string());
    }
    Ok(prompt.to_string())
}

impl JobSpec {
    /// The job hash fields recorded when a worker claims the job: each [`JobField::in_hash`]
    /// field it has, after defaults, then `prompt_mode`, `extra` and `warnings`.
    pub fn hash_fields(&self) -> Vec<(&'static str, String)> {
        let mut fields: Vec<(&'static str, String)> = JobField::ALL
            .into_iter()
            .filter(|f| f.in_hash())
            .filter_map(|f| Some((f.name(), self.value_in_hash(f)?)))
            .collect();
        let mode = if self.prompt.is_some() {
            "fixed"
        } else {
            "live"
        };
        fields.push(("prompt_mode", mode.to_string()));
        if !self.extra.is_empty() {
            fields.push((
                "extra",
                serde_json::to_string(&self.extra).unwrap_or_default(),
            ));
        }
        if !self.warnings.is_empty() {
            fields.push(("warnings", self.warnings.join("; ")));
        }
        fields
    }

    /// A hash field's value, `None` when the job has none.
    fn value_in_hash(&self, field: JobField) -> Option<String> {
        match field {
            JobField::StreamRef => Some(self.stream_ref.clone()),
            JobField::Source => Some(self.source.as_str().to_string()),
            JobField::Fps => Some(self.fps.to_string()),
            JobField::Prompt => self.prompt.clone(),
            JobField::MaxFrames => self.max_frames.map(|n| n.to_string()),
            JobField::MaxDurationS => self.max_duration_s.map(|s| s.to_string()),
            // The rest are kept out of the hash (`JobField::in_hash` is their one list).
            _ => None,
        }
    }
}

/// Most consecutive frames `alert_min_frames` may ask for.
pub const MAX_ALERT_MIN_FRAMES: u32 = 1000;

/// The `alerts`, `alert_min_frames` and `alert_clear_ms` fields.
fn alert_settings(entry: &EntryFields) -> Result<Option<AlertSettings>, SpecError> {
    if entry.on_off(JobField::Alerts)? == Some(false) {
        return Ok(None);
    }
    let defaults = AlertSettings::default();
    let min_frames = entry.number(
        JobField::AlertMinFrames,
        &format!("must be a whole number from 1 to {MAX_ALERT_MIN_FRAMES}"),
        |n: &u32| (1..=MAX_ALERT_MIN_FRAMES).contains(n),
    )?;
    let clear_ms = entry.number(
        JobField::AlertClearMs,
        &format!("must be a whole number of milliseconds, at most {MAX_ALERT_CLEAR_MS}"),
        |ms: &u64| *ms <= MAX_ALERT_CLEAR_MS,
    )?;
    Ok(Some(AlertSettings {
        min_frames: min_frames.unwrap_or(defaults.min_frames),
        clear_ms: clear_ms.unwrap_or(defaults.clear_ms),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(pairs: &[(&str, &str)]) -> Vec<(Vec<u8>, Vec<u8>)> {
        pairs
            .iter()
            .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
            .collect()
    }

    fn parse(pairs: &[(&str, &str)]) -> ParsedEntry {
        JobSpec::parse("1-0", &fields(pairs), 2.0, || "generated".into())
    }

    #[test]
    fn minimal_entry_gets_defaults_and_detected_source() {
        let spec = parse(&[("stream_ref", "https://cam/live.m3u8")]).unwrap();
        assert_eq!(spec.job_id, "generated");
        assert_eq!(spec.source, SourceKind::Hls);
        assert_eq!(spec.fps, 2.0);
        assert_eq!(spec.prompt, None);
        assert_eq!(spec.scene_gate, None);
        assert_eq!(spec.alerts, Some(AlertSettings::default()));
        let spec = parse(&[("stream_ref", "frames:cam1"), ("job_id", "j-1")]).unwrap();
        assert_eq!(spec.source, SourceKind::Redis);
        assert_eq!(spec.job_id, "j-1");
    }

    #[test]
    fn every_bad_field_is_named() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[("prompt", "x")], "stream_ref"),
            (&[("stream_ref", "a"), ("fps", "0")], "fps"),
            (&[("stream_ref", "a"), ("fps", "31")], "fps"),
            (&[("stream_ref", "a"), ("fps", "abc")], "fps"),
            (&[("stream_ref", "a"), ("source", "ftp")], "source"),
            (&[("stream_ref", "-i x")], "stream_ref"),
            (&[("stream_ref", "a\nb")], "stream_ref"),
            (&[("stream_ref", "a"), ("max_frames", "-1")], "max_frames"),
            (
                &[("stream_ref", "a"), ("max_duration_s", "0")],
                "max_duration_s",
            ),
            (&[("stream_ref", "a"), ("job_id", "has space")], "job_id"),
            (&[("stream_ref", "a"), ("scene_gate", "yes")], "scene_gate"),
            (&[("stream_ref", "a"), ("alerts", "1")], "alerts"),
            (
                &[("stream_ref", "a"), ("alert_min_frames", "0")],
                "alert_min_frames",
            ),
            (
                &[("stream_ref", "a"), ("alert_clear_ms", "-5")],
                "alert_clear_ms",
            ),
            // Values that would overflow a deadline or a capture-time sum.
            (
                &[("stream_ref", "a"), ("max_duration_s", "1e300")],
                "max_duration_s",
            ),
            (
                &[("stream_ref", "a"), ("max_duration_s", "31536000.5")],
                "max_duration_s",
            ),
            (
                &[
                    ("stream_ref", "a"),
                    ("alert_clear_ms", "18446744073709551615"),
                ],
                "alert_clear_ms",
            ),
            (
                &[("stream_ref", "a"), ("alert_clear_ms", "86400001")],
                "alert_clear_ms",
            ),
            (
                &[("stream_ref", "a"), ("alert_min_frames", "4294967296")],
                "alert_min_frames",
            ),
            (
                &[("stream_ref", "a"), ("max_frames", "18446744073709551616")],
                "max_frames",
            ),
        ];
        for (pairs, field) in cases {
            let (err, _) = parse(pairs).unwrap_err();
            assert_eq!(&err.field, field, "{pairs:?}");
        }
        // Too many fields: refused, still filed under the producer's id.
        let names: Vec<String> = (0..MAX_JOB_FIELDS).map(|i| format!("x{i}")).collect();
        let mut many: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "v")).collect();
        many.push(("stream_ref", "a"));
        many.push(("job_id", "crowded"));
        let (err, id) = parse(&many).unwrap_err();
        assert_eq!(err.field, "entry");
        assert!(err.reason.contains("at most 64"), "{}", err.reason);
        assert_eq!(id.as_deref(), Some("crowded"));
        let long = "p".repeat(MAX_PROMPT_BYTES + 1);
        let (err, id) =
            parse(&[("stream_ref", "a"), ("prompt", &long), ("job_id", "j")]).unwrap_err();
        assert_eq!(err.field, "prompt");
        assert_eq!(
            id.as_deref(),
            Some("j"),
            "the producer's id is kept for the report"
        );
    }

    /// The refusals' words reach producers (the job hash's `error`, the dead letters), so
    /// they are kept word for word.
    #[test]
    fn every_refusal_says_why_in_the_same_words() {
        let long = "p".repeat(MAX_PROMPT_BYTES + 1);
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[("prompt", "x")], "field `stream_ref`: is required"),
            (
                &[("stream_ref", " ")],
                "field `stream_ref`: is required and may not be empty",
            ),
            (
                &[("stream_ref", "-i x")],
                "field `stream_ref`: may not start with '-'",
            ),
            (
                &[("stream_ref", "a"), ("source", "ftp")],
                "field `source`: must be `hls` or `redis` (or absent to detect), got `ftp`",
            ),
            (
                &[("stream_ref", "a"), ("fps", " 0")],
                "field `fps`: must be a number in (0, 30], got ` 0`",
            ),
            (
                &[("stream_ref", "a"), ("prompt", " ")],
                "field `prompt`: is empty; leave it out to follow the active prompt",
            ),
            (
                &[("stream_ref", "a"), ("prompt", &long)],
                "field `prompt`: is 8193 bytes; at most 8192 are allowed",
            ),
            (
                &[("stream_ref", "a"), ("max_frames", "-1")],
                "field `max_frames`: must be a whole number above 0, got `-1`",
            ),
            (
                &[("stream_ref", "a"), ("max_duration_s", "inf")],
                "field `max_duration_s`: must be a number of seconds above 0, at most 31536000 \
                 (leave it out for no limit), got `inf`",
            ),
            (
                &[("stream_ref", "a"), ("scene_gate", " YES ")],
                "field `scene_gate`: must be `on` or `off`, got `yes`",
            ),
            (
                &[("stream_ref", "a"), ("alerts", "1")],
                "field `alerts`: must be `on` or `off`, got `1`",
            ),
            (
                &[("stream_ref", "a"), ("alert_min_frames", "1001")],
                "field `alert_min_frames`: must be a whole number from 1 to 1000, got `1001`",
            ),
            (
                &[("stream_ref", "a"), ("alert_clear_ms", "-5")],
                "field `alert_clear_ms`: must be a whole number of milliseconds, at most \
                 86400000, got `-5`",
            ),
            (
                &[("stream_ref", "a"), ("rtsp_transport", "quic")],
                "field `rtsp_transport`: must be `tcp` or `udp`, got `quic`",
            ),
            (
                &[("stream_ref", "a"), ("job_id", "has space")],
                "field `job_id`: may hold only letters, digits, '.', '_', ':' and '-'",
            ),
            // Fields are checked in a fixed order: the first bad one is reported.
            (
                &[("stream_ref", "a"), ("rtsp_transport", "x"), ("fps", "x")],
                "field `fps`: must be a number in (0, 30], got `x`",
            ),
        ];
        for (pairs, want) in cases {
            let (err, _) = parse(pairs).unwrap_err();
            assert_eq!(err.to_string(), *want, "{pairs:?}");
        }
    }

    /// The largest values accepted are safe where they are used: a deadline `max_duration_s`
    /// from now, and `alert_clear_ms` as the signed milliseconds capture times are counted in.
    #[test]
    fn the_largest_accepted_durations_and_counts_stay_in_range() {
        let spec = parse(&[
            ("stream_ref", "a"),
            ("max_duration_s", &MAX_DURATION_S.to_string()),
            ("alert_clear_ms", &MAX_ALERT_CLEAR_MS.to_string()),
            ("max_frames", &u64::MAX.to_string()),
        ])
        .unwrap();
        let duration = std::time::Duration::from_secs_f64(spec.max_duration_s.unwrap());
        assert!(std::time::Instant::now().checked_add(duration).is_some());
        let clear_ms = spec.alerts.unwrap().clear_ms;
        assert_eq!(clear_ms as i64 as u64, clear_ms, "exact as i64");
        assert_eq!(
            spec.max_frames,
            Some(u64::MAX),
            "a count that is only compared"
        );
    }

    #[test]
    fn optional_fields_are_read_with_their_defaults() {
        let spec = parse(&[
            ("stream_ref", "rtsp://cam/1"),
            ("source", "auto"),
            ("fps", " 30 "),
            ("alert_min_frames", "3"),
            ("alert_clear_ms", "250"),
            ("rtsp_transport", " UDP "),
            ("scene_gate", "On"),
            ("fps", "30"),
        ])
        .unwrap();
        assert_eq!(spec.source, SourceKind::Hls);
        assert_eq!(spec.fps, 30.0);
        assert_eq!(spec.scene_gate, Some(true));
        assert_eq!(
            spec.alerts,
            Some(AlertSettings {
                min_frames: 3,
                clear_ms: 250
            })
        );
        assert_eq!(spec.rtsp_transport, RtspTransport::Udp);
        assert_eq!(
            spec.warnings,
            vec!["field `fps` given twice; the last one counts".to_string()]
        );
        let spec = parse(&[
            ("stream_ref", "a"),
            ("alerts", "OFF"),
            ("alert_min_frames", "0"),
        ])
        .unwrap();
        assert_eq!(
            spec.alerts, None,
            "with alerts off their settings are not read"
        );
        assert_eq!(spec.rtsp_transport, RtspTransport::Tcp);
        let spec = parse(&[("stream_ref", "https://x"), ("source", "redis")]).unwrap();
        assert_eq!(spec.source, SourceKind::Redis);
    }

    #[test]
    fn non_utf8_values_are_refused_and_unknown_fields_kept() {
        let mut f = fields(&[("stream_ref", "a")]);
        f.push((b"prompt".to_vec(), vec![0xff, 0xfe]));
        let (err, _) = JobSpec::parse("1-0", &f, 2.0, || "g".into()).unwrap_err();
        assert_eq!(err.field, "prompt");
        assert!(err.reason.contains("UTF-8"));

        let spec = parse(&[("stream_ref", "a"), ("colour", "red")]).unwrap();
        assert_eq!(spec.extra.get("colour").map(String::as_str), Some("red"));
        assert!(spec.warnings[0].contains("colour"));
    }

    #[test]
    fn field_names_round_trip_and_the_hash_shows_its_fields_only() {
        for f in JobField::ALL {
            assert_eq!(JobField::parse(f.name()), Some(f));
        }
        assert_eq!(JobField::parse("colour"), None);
        let spec = parse(&[
            ("stream_ref", "frames:cam"),
            ("prompt", "cars"),
            ("max_frames", "5"),
            ("max_duration_s", "2.5"),
            ("scene_gate", "off"),
            ("colour", "red"),
        ])
        .unwrap();
        let got: BTreeMap<&str, String> = spec.hash_fields().into_iter().collect();
        let want: BTreeMap<&str, String> = [
            ("stream_ref", "frames:cam"),
            ("source", "redis"),
            ("fps", "2"),
            ("prompt", "cars"),
            ("max_frames", "5"),
            ("max_duration_s", "2.5"),
            ("prompt_mode", "fixed"),
            ("extra", r#"{"colour":"red"}"#),
            (
                "warnings",
                "unknown field `colour` was kept in `extra` but is not used",
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k, v.to_string()))
        .collect();
        assert_eq!(got, want);
    }

    /// `fr_submit` refuses what the worker refuses: the library's copy of the job id's
    /// length bound is this one, and its character class lets through exactly the
    /// characters [`validate_job_id`] does.
    #[test]
    fn the_function_library_bounds_job_ids_as_the_worker_does() {
        let lua = crate::store::FUNCTIONS_LUA;
        let bound = format!("local MAX_JOB_ID_LEN = {MAX_JOB_ID_LEN}\n");
        assert!(lua.contains(&bound), "functions.lua: {bound}");
        assert!(lua.contains("job_id:find('[^%w%._:%-]')"));
        // `%w` is ASCII letters and digits in Redis's Lua (C locale).
        for b in 0u8..=127 {
            let c = b as char;
            let lua_ok = c.is_ascii_alphanumeric() || ".:_-".contains(c);
            assert_eq!(validate_job_id(&c.to_string()).is_ok(), lua_ok, "{c:?}");
        }
    }

    /// The function library keeps its own copy of the hash fields (`fr_submit` and
    /// `fr_cancel` record them before any worker has read the entry): it must be this list.
    #[test]
    fn the_function_library_records_the_same_hash_fields() {
        let lua = crate::store::FUNCTIONS_LUA;
        let line = lua
            .lines()
            .find(|l| l.starts_with("local HASH_FIELDS = {"))
            .expect("functions.lua declares HASH_FIELDS on one line");
        let inner = line
            .split_once('{')
            .and_then(|(_, rest)| rest.rsplit_once('}'))
            .map(|(inner, _)| inner)
            .unwrap();
        let mut lua_names: Vec<&str> = inner
            .split(',')
            .map(|n| n.trim().trim_matches('\''))
            .filter(|n| !n.is_empty())
            .collect();
        let mut rust_names: Vec<&str> = JobField::ALL
            .into_iter()
            .filter(|f| f.in_hash())
            .map(JobField::name)
            .collect();
        lua_names.sort_unstable();
        rust_names.sort_unstable();
        assert_eq!(lua_names, rust_names);
    }
}
