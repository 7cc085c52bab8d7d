//! What a job is: its spec parsed and validated from a `{fr}:jobs` entry, its statuses, and
//! the `JobBody` trait that the pipeline (or a test body) implements to do a job's work.

use crate::alerts::AlertSettings;
use std::collections::BTreeMap;

/// Longest accepted `prompt`, in bytes.
pub const MAX_PROMPT_BYTES: usize = 8 * 1024;
/// Longest accepted `stream_ref`, in bytes.
pub const MAX_STREAM_REF_BYTES: usize = 2 * 1024;
/// Longest accepted `job_id`.
pub const MAX_JOB_ID_LEN: usize = 128;
/// Highest accepted `fps`.
pub const MAX_FPS: f64 = 30.0;
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
}

impl JobField {
    pub const ALL: [JobField; 12] = [
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
            | JobField::RtspTransport => false,
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
        let mut values: BTreeMap<String, String> = BTreeMap::new();
        let mut first_error: Option<SpecError> = None;
        let mut warnings = Vec::new();
        if fields.len() > MAX_JOB_FIELDS {
            first_error = Some(SpecError::other(
                "entry",
                format!(
                    "has {} fields; at most {MAX_JOB_FIELDS} are allowed",
                    fields.len()
                ),
            ));
        }
        for (name, value) in fields {
            let Ok(name) = std::str::from_utf8(name) else {
                first_error.get_or_insert(SpecError::other(
                    &String::from_utf8_lossy(name),
                    "field name is not valid UTF-8",
                ));
                continue;
            };
            match std::str::from_utf8(value) {
                Ok(v) => {
                    if values.insert(name.to_string(), v.to_string()).is_some() {
                        warnings.push(format!("field `{name}` given twice; the last one counts"));
                    }
                }
                Err(_) => {
                    first_error.get_or_insert(SpecError::other(name, "value is not valid UTF-8"));
                }
            }
        }

        // The job id first, so that any later error is filed under the producer's id.
        let job_id = match values.get(JobField::JobId.name()) {
            Some(id) => match validate_job_id(id) {
                Ok(()) => Some(id.clone()),
                Err(e) => return Err((e, None)),
            },
            None => None,
        };
        if let Some(e) = first_error {
            return Err((e, job_id));
        }
        let fail = |e: SpecError| Err((e, job_id.clone()));

        let Some(stream_ref) = values.get(JobField::StreamRef.name()).cloned() else {
            return fail(SpecError::new(JobField::StreamRef, "is required"));
        };
        if let Err(e) = validate_stream_ref(&stream_ref) {
            return fail(e);
        }
        let source = match values.get(JobField::Source.name()).map(String::as_str) {
            None | Some("") | Some("auto") => SourceKind::detect(&stream_ref),
            Some("hls") => SourceKind::Hls,
            Some("redis") => SourceKind::Redis,
            Some(other) => {
                return fail(SpecError::new(
                    JobField::Source,
                    format!("must be `hls` or `redis` (or absent to detect), got `{other}`"),
                ));
            }
        };
        let fps = match values.get(JobField::Fps.name()) {
            None => default_fps,
            Some(raw) => match raw.trim().parse::<f64>() {
                Ok(f) if f.is_finite() && f > 0.0 && f <= MAX_FPS => f,
                _ => {
                    return fail(SpecError::new(
                        JobField::Fps,
                        format!("must be a number in (0, {MAX_FPS}], got `{raw}`"),
                    ));
                }
            },
        };
        let prompt = match values.get(JobField::Prompt.name()) {
            None => None,
            Some(p) if p.len() > MAX_PROMPT_BYTES => {
                return fail(SpecError::new(
                    JobField::Prompt,
                    format!(
                        "is {} bytes; at most {MAX_PROMPT_BYTES} are allowed",
                        p.len()
                    ),
                ));
            }
            Some(p) if p.trim().is_empty() => {
                return fail(SpecError::new(
                    JobField::Prompt,
                    "is empty; leave it out to follow the active prompt",
                ));
            }
            Some(p) => Some(p.clone()),
        };
        let max_frames = match values.get(JobField::MaxFrames.name()) {
            None => None,
            Some(raw) => match raw.trim().parse::<u64>() {
                Ok(n) if n > 0 => Some(n),
                _ => {
                    return fail(SpecError::new(
                        JobField::MaxFrames,
                        format!("must be a whole number above 0, got `{raw}`"),
                    ));
                }
            },
        };
        let max_duration_s = match values.get(JobField::MaxDurationS.name()) {
            None => None,
            Some(raw) => match raw.trim().parse::<f64>() {
                Ok(s) if s.is_finite() && s > 0.0 => Some(s),
                _ => {
                    return fail(SpecError::new(
                        JobField::MaxDurationS,
                        format!("must be a number of seconds above 0, got `{raw}`"),
                    ));
                }
            },
        };
        let scene_gate = match on_off(&values, JobField::SceneGate) {
            Ok(v) => v,
            Err(e) => return fail(e),
        };
        let alerts = match alert_settings(&values) {
            Ok(v) => v,
            Err(e) => return fail(e),
        };
        let rtsp_transport = match values.get(JobField::RtspTransport.name()) {
            None => RtspTransport::default(),
            Some(raw) => match RtspTransport::parse(raw) {
                Some(t) => t,
                None => {
                    return fail(SpecError::new(
                        JobField::RtspTransport,
                        format!("must be `tcp` or `udp`, got `{raw}`"),
                    ));
                }
            },
        };
        let extra: BTreeMap<String, String> = values
            .iter()
            .filter(|(k, _)| JobField::parse(k).is_none())
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for name in extra.keys() {
            warnings.push(format!(
                "unknown field `{name}` was kept in `extra` but is not used"
            ));
        }
        Ok(JobSpec {
            job_id: job_id.unwrap_or_else(new_id),
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
            extra,
            warnings,
        })
    }
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
            JobField::JobId
            | JobField::SceneGate
            | JobField::Alerts
            | JobField::AlertMinFrames
            | JobField::AlertClearMs
            | JobField::RtspTransport => None,
        }
    }
}

/// An optional `on`/`off` field.
fn on_off(values: &BTreeMap<String, String>, field: JobField) -> Result<Option<bool>, SpecError> {
    match values
        .get(field.name())
        .map(|v| v.trim().to_ascii_lowercase())
    {
        None => Ok(None),
        Some(v) if v == "on" => Ok(Some(true)),
        Some(v) if v == "off" => Ok(Some(false)),
        Some(v) => Err(SpecError::new(
            field,
            format!("must be `on` or `off`, got `{v}`"),
        )),
    }
}

/// Most consecutive frames `alert_min_frames` may ask for.
pub const MAX_ALERT_MIN_FRAMES: u32 = 1000;

/// The `alerts`, `alert_min_frames` and `alert_clear_ms` fields.
fn alert_settings(values: &BTreeMap<String, String>) -> Result<Option<AlertSettings>, SpecError> {
    if on_off(values, JobField::Alerts)? == Some(false) {
        return Ok(None);
    }
    let mut settings = AlertSettings::default();
    if let Some(raw) = values.get(JobField::AlertMinFrames.name()) {
        settings.min_frames = match raw.trim().parse::<u32>() {
            Ok(n) if (1..=MAX_ALERT_MIN_FRAMES).contains(&n) => n,
            _ => {
                return Err(SpecError::new(
                    JobField::AlertMinFrames,
                    format!("must be a whole number from 1 to {MAX_ALERT_MIN_FRAMES}, got `{raw}`"),
                ));
            }
        };
    }
    if let Some(raw) = values.get(JobField::AlertClearMs.name()) {
        settings.clear_ms = raw.trim().parse::<u64>().map_err(|_| {
            SpecError::new(
                JobField::AlertClearMs,
                format!("must be a whole number of milliseconds, got `{raw}`"),
            )
        })?;
    }
    Ok(Some(settings))
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
