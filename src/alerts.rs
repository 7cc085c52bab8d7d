//! Alerts: turns a job's per-frame `detected` labels into start and end edge events for the
//! `{fr}:alerts` stream.
//!
//! Pure code: results in, events out. A label starts once it has been detected in
//! `min_frames` consecutive sampled frames, and ends once it has been absent for `clear_ms`
//! of capture time, when the prompt no longer asks for it, or when the job ends. The state
//! is plain data that serialises to the job hash with every result write, so a job resumed
//! by another worker neither repeats a start nor loses an end.
//!
//! An alert carries the best score its label had while present (`peak_score`) and, for
//! models that give boxes, the box that had it (`peak_box`).
//!
//! Models without labels (captions) have no `detected` list and make no alerts.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;

/// Consecutive frames a label must be detected in before it starts, unless the job says.
pub const DEFAULT_MIN_FRAMES: u32 = 2;
/// How long a label must be absent before it ends, unless the job says.
pub const DEFAULT_CLEAR_MS: u64 = 5000;
/// Most labels followed at once per job, so a model listing thousands cannot grow the
/// state without bound.
pub const MAX_LABELS: usize = 64;

/// A job's alert settings (`alert_min_frames`, `alert_clear_ms`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AlertSettings {
    pub min_frames: u32,
    pub clear_ms: u64,
}

impl Default for AlertSettings {
    fn default() -> Self {
        Self {
            min_frames: DEFAULT_MIN_FRAMES,
            clear_ms: DEFAULT_CLEAR_MS,
        }
    }
}

/// One label seen in one frame.
#[derive(Clone, Debug, PartialEq)]
pub struct Detection {
    pub label: String,
    pub score: Option<f64>,
    /// The box, for models that give one, as the model wrote it.
    pub bbox: Option<Value>,
}

/// What a frame's output says for alerts.
#[derive(Clone, Debug, PartialEq)]
pub struct Observation {
    pub detected: Vec<Detection>,
    /// Every label the prompt asks for, when the output lists them (CLIP's `phrases`).
    pub asked: Option<Vec<String>>,
}

impl Observation {
    /// Reads a model output: `detected` as a list of labels, or of objects with `label`
    /// (or `phrase`), `score` and `box`. A label's score and box are its own when the entry
    /// has them, else those of its best box in `detections` (OWL-ViT, PaliGemma's
    /// `detect`), else its phrase's `probability` in `phrases` (CLIP, SigLIP). `None` for
    /// outputs without `detected` (captions).
    pub fn from_output(output: &Value) -> Option<Self> {
        let detected = output.get("detected")?.as_array()?;
        let phrases = output.get("phrases").and_then(Value::as_array);
        let frame = FrameOutput {
            phrases: phrases.map(Vec::as_slice).unwrap_or_default(),
            detections: output
                .get("detections")
                .and_then(Value::as_array)
                .map(Vec::as_slice)
                .unwrap_or_default(),
        };
        let phrase_of = |p: &Value| p.get("phrase").and_then(Value::as_str).map(str::to_string);
        Some(Self {
            detected: detected.iter().filter_map(|d| frame.detection(d)).collect(),
            asked: phrases.map(|p| p.iter().filter_map(phrase_of).collect()),
        })
    }
}

/// The parts of a frame's output a detected label's score and box come from.
struct FrameOutput<'a> {
    phrases: &'a [Value],
    detections: &'a [Value],
}

impl FrameOutput<'_> {
    /// One entry of `detected` as a [`Detection`]; `None` for an entry without a label.
    fn detection(&self, entry: &Value) -> Option<Detection> {
        let (label, own) = match entry {
            Value::String(label) => (label.as_str(), None),
            Value::Object(o) => (
                o.get("label").or_else(|| o.get("phrase"))?.as_str()?,
                Some(entry),
            ),
            _ => return None,
        };
        let best = self.best_box(label);
        let score = own
            .and_then(score_of)
            .or_else(|| best.and_then(score_of))
            .or_else(|| self.phrase_probability(label));
        let bbox = own
            .and_then(|o| o.get("box"))
            .or_else(|| best.and_then(|b| b.get("box")))
            .cloned();
        Some(Detection {
            label: label.to_string(),
            score,
            bbox,
        })
    }

    /// The label's highest-scored entry of `detections` (the first, when boxes have no
    /// score).
    fn best_box(&self, label: &str) -> Option<&Value> {
        self.detections
            .iter()
            .filter(|d| d.get("label").and_then(Value::as_str) == Some(label))
            .fold(None, |best, d| match best {
                Some(b) if score_of(d) <= score_of(b) => Some(b),
                _ => Some(d),
            })
    }

    /// The label's `probability` in `phrases`.
    fn phrase_probability(&self, label: &str) -> Option<f64> {
        self.phrases
            .iter()
            .find(|p| p.get("phrase").and_then(Value::as_str) == Some(label))?
            .get("probability")?
            .as_f64()
    }
}

/// An entry's own `score` (or `probability`).
fn score_of(entry: &Value) -> Option<f64> {
    entry
        .get("score")
        .or_else(|| entry.get("probability"))
        .and_then(Value::as_f64)
}

/// `start` or `end`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AlertKind {
    Start,
    End,
}

impl AlertKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AlertKind::Start => "start",
            AlertKind::End => "end",
        }
    }
}

/// Why an alert ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndReason {
    /// Absent for `alert_clear_ms`.
    Cleared,
    /// The prompt no longer asks for the label.
    PromptChanged,
    JobCompleted,
    JobCancelled,
    JobFailed,
}

impl EndReason {
    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::Cleared => "cleared",
            EndReason::PromptChanged => "prompt_changed",
            EndReason::JobCompleted => "job_completed",
            EndReason::JobCancelled => "job_cancelled",
            EndReason::JobFailed => "job_failed",
        }
    }
}

/// One entry of `{fr}:alerts`.
#[derive(Clone, Debug, PartialEq)]
pub struct AlertEvent {
    pub kind: AlertKind,
    pub label: String,
    pub first_frame: u64,
    pub first_capture_ms: i64,
    pub last_frame: u64,
    pub last_capture_ms: i64,
    pub peak_score: Option<f64>,
    pub peak_box: Option<Value>,
    pub prompt_version: Option<u64>,
    /// Ends only.
    pub reason: Option<EndReason>,
}

impl AlertEvent {
    /// The alert's identity, the same in its `start` and `end`: with `kind` it names one
    /// event, so a reader can drop the repeats a retried write may add.
    pub fn alert_id(&self, job_id: &str) -> String {
        format!("{job_id}:{}:{}", self.label, self.first_frame)
    }

    /// The event's fields as written to `{fr}:alerts` (after `job_id` and `alert_id`), in contract order.
    pub fn fields(&self) -> Vec<(&'static str, String)> {
        let mut f = vec![
            ("kind", self.kind.as_str().to_string()),
            ("label", self.label.clone()),
            ("first_frame", self.first_frame.to_string()),
            ("first_capture_ms", self.first_capture_ms.to_string()),
            ("last_frame", self.last_frame.to_string()),
            ("last_capture_ms", self.last_capture_ms.to_string()),
        ];
        if let Some(s) = self.peak_score {
            f.push(("peak_score", format!("{s:.4}")));
        }
        if let Some(b) = &self.peak_box {
            f.push(("peak_box", b.to_string()));
        }
        if let Some(v) = self.prompt_version {
            f.push(("prompt_version", v.to_string()));
        }
        if let Some(r) = self.reason {
            f.push(("reason", r.as_str().to_string()));
        }
        f
    }
}

/// One label's presence: a candidate until it starts, then open until it ends.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Presence {
    /// Consecutive frames it was detected in (counted up to the start).
    streak: u32,
    /// Whether its start was emitted.
    open: bool,
    first_frame: u64,
    first_capture_ms: i64,
    last_frame: u64,
    last_capture_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    peak_score: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    peak_box: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    prompt_version: Option<u64>,
}

/// Where and when a frame was seen: what a detection in it records.
struct Sighting {
    frame: u64,
    capture_ms: i64,
    prompt_version: Option<u64>,
}

impl Presence {
    /// A label's presence from its first detection, before that detection is counted.
    fn first_seen(at: &Sighting) -> Self {
        Presence {
            streak: 0,
            open: false,
            first_frame: at.frame,
            first_capture_ms: at.capture_ms,
            last_frame: at.frame,
            last_capture_ms: at.capture_ms,
            peak_score: None,
            peak_box: None,
            prompt_version: at.prompt_version,
        }
    }

    /// Counts a detection: extends the streak and keeps the best-scored (or first boxed) one.
    fn saw(&mut self, d: &Detection, at: &Sighting) {
        self.streak = self.streak.saturating_add(1);
        self.last_frame = at.frame;
        self.last_capture_ms = at.capture_ms;
        self.prompt_version = at.prompt_version;
        let better = match (d.score, self.peak_score) {
            (Some(s), Some(peak)) => s > peak,
            (Some(_), None) => true,
            (None, _) => self.peak_box.is_none() && d.bbox.is_some(),
        };
        if better {
            self.peak_score = d.score.or(self.peak_score);
            self.peak_box = d.bbox.clone();
        }
    }
}

/// A job's alert state, saved in its hash (`alert_state`, JSON).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AlertState {
    labels: BTreeMap<String, Presence>,
    /// The newest frame taken into account; older ones (answered late) are ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    last_frame: Option<u64>,
}

impl AlertState {
    /// Whether any label has started and not ended.
    pub fn has_open(&self) -> bool {
        self.labels.values().any(|p| p.open)
    }

    /// Takes one frame's observation into account and returns the edges it causes.
    pub fn observe(
        &mut self,
        settings: &AlertSettings,
        frame: u64,
        capture_ms: i64,
        prompt_version: Option<u64>,
        obs: &Observation,
    ) -> Vec<AlertEvent> {
        if self.last_frame.is_some_and(|last| frame <= last) {
            return Vec::new();
        }
        self.last_frame = Some(frame);
        let mut events = Vec::new();
        if let Some(asked) = &obs.asked {
            self.forget_unasked(asked, &mut events);
        }
        let sighting = Sighting {
            frame,
            capture_ms,
            prompt_version,
        };
        for d in &obs.detected {
            events.extend(self.see(settings, d, &sighting));
        }
        self.clear_absent(settings, &obs.detected, capture_ms, &mut events);
        events
    }

    /// Forgets the labels the prompt no longer asks for, ending those that were open.
    fn forget_unasked(&mut self, asked: &[String], events: &mut Vec<AlertEvent>) {
        let gone: Vec<String> = self
            .labels
            .keys()
            .filter(|l| !asked.contains(l))
            .cloned()
            .collect();
        for label in gone {
            let p = self.labels.remove(&label).expect("listed above");
            if p.open {
                events.push(event(
                    AlertKind::End,
                    label,
                    &p,
                    Some(EndReason::PromptChanged),
                ));
            }
        }
    }

    /// Counts one detection; returns the label's start when this one makes it start.
    fn see(
        &mut self,
        settings: &AlertSettings,
        d: &Detection,
        sighting: &Sighting,
    ) -> Option<AlertEvent> {
        if !self.labels.contains_key(&d.label) && self.labels.len() >= MAX_LABELS {
            return None;
        }
        let p = self
            .labels
            .entry(d.label.clone())
            .or_insert_with(|| Presence::first_seen(sighting));
        p.saw(d, sighting);
        if !p.open && p.streak >= settings.min_frames.max(1) {
            p.open = true;
            return Some(event(AlertKind::Start, d.label.clone(), p, None));
        }
        None
    }

    /// Resets the streak of every label not detected in this frame: a candidate is dropped,
    /// an open label ends once it has been absent for `clear_ms`.
    fn clear_absent(
        &mut self,
        settings: &AlertSettings,
        detected: &[Detection],
        capture_ms: i64,
        events: &mut Vec<AlertEvent>,
    ) {
        let absent: Vec<String> = self
            .labels
            .keys()
            .filter(|l| !detected.iter().any(|d| &d.label == *l))
            .cloned()
            .collect();
        for label in absent {
            let p = self.labels.get_mut(&label).expect("listed above");
            p.streak = 0;
            if !p.open {
                // A candidate that did not last: it never started.
                self.labels.remove(&label);
            } else if capture_ms.saturating_sub(p.last_capture_ms) >= settings.clear_ms as i64 {
                let p = self.labels.remove(&label).expect("listed above");
                events.push(event(AlertKind::End, label, &p, Some(EndReason::Cleared)));
            }
        }
    }

    /// Ends every open alert (the job ended) and forgets candidates.
    pub fn close_all(&mut self, reason: EndReason) -> Vec<AlertEvent> {
        std::mem::take(&mut self.labels)
            .into_iter()
            .filter(|(_, p)| p.open)
            .map(|(label, p)| event(AlertKind::End, label, &p, Some(reason)))
            .collect()
    }
}

fn event(kind: AlertKind, label: String, p: &Presence, reason: Option<EndReason>) -> AlertEvent {
    AlertEvent {
        kind,
        label,
        first_frame: p.first_frame,
        first_capture_ms: p.first_capture_ms,
        last_frame: p.last_frame,
        last_capture_ms: p.last_capture_ms,
        peak_score: p.peak_score,
        peak_box: p.peak_box.clone(),
        prompt_version: p.prompt_version,
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn settings() -> AlertSettings {
        AlertSettings {
            min_frames: 2,
            clear_ms: 1000,
        }
    }

    fn seen(labels: &[(&str, f64)]) -> Observation {
        Observation {
            detected: labels
                .iter()
                .map(|(l, s)| Detection {
                    label: l.to_string(),
                    score: Some(*s),
                    bbox: None,
                })
                .collect(),
            asked: None,
        }
    }

    /// Feeds frames 500 ms apart from `first`, returning (frame, kind, label) per event.
    fn feed(
        state: &mut AlertState,
        first: u64,
        frames: &[Observation],
    ) -> Vec<(u64, AlertKind, String)> {
        let mut out = Vec::new();
        for (i, obs) in frames.iter().enumerate() {
            let f = first + i as u64;
            for e in state.observe(&settings(), f, f as i64 * 500, Some(1), obs) {
                out.push((f, e.kind, e.label));
            }
        }
        out
    }

    #[test]
    fn a_label_starts_after_min_frames_and_ends_after_clear_ms() {
        let mut s = AlertState::default();
        let car = seen(&[("car", 0.6)]);
        let peak = seen(&[("car", 0.9)]);
        let none = seen(&[]);
        let events = feed(
            &mut s,
            0,
            &[
                car.clone(),
                car.clone(),
                peak,
                car.clone(),
                none.clone(),
                none.clone(),
                none,
            ],
        );
        assert_eq!(
            events,
            [
                (1, AlertKind::Start, "car".to_string()),
                // Last seen at frame 3 (1500 ms); absent 1000 ms at frame 5.
                (5, AlertKind::End, "car".to_string()),
            ]
        );
    }

    #[test]
    fn an_end_carries_the_whole_presence() {
        let mut s = AlertState::default();
        let boxed = |score: f64, b: [u32; 4]| Observation {
            detected: vec![Detection {
                label: "person".into(),
                score: Some(score),
                bbox: Some(json!(b)),
            }],
            asked: None,
        };
        for (f, o) in [
            (10, boxed(0.5, [0, 0, 5, 5])),
            (11, boxed(0.8, [1, 1, 6, 6])),
            (12, boxed(0.7, [2, 2, 7, 7])),
        ] {
            s.observe(&settings(), f, f as i64 * 500, Some(3), &o);
        }
        let ends = s.close_all(EndReason::JobCancelled);
        assert_eq!(
            ends,
            [AlertEvent {
                kind: AlertKind::End,
                label: "person".into(),
                first_frame: 10,
                first_capture_ms: 5000,
                last_frame: 12,
                last_capture_ms: 6000,
                peak_score: Some(0.8),
                peak_box: Some(json!([1, 1, 6, 6])),
                prompt_version: Some(3),
                reason: Some(EndReason::JobCancelled),
            }]
        );
        assert!(!s.has_open());
    }

    #[test]
    fn a_flicker_shorter_than_min_frames_never_starts() {
        let mut s = AlertState::default();
        let car = seen(&[("car", 0.6)]);
        let none = seen(&[]);
        assert!(feed(&mut s, 0, &[car.clone(), none.clone(), car, none]).is_empty());
        assert_eq!(
            s,
            AlertState {
                labels: BTreeMap::new(),
                last_frame: Some(3)
            }
        );
    }

    #[test]
    fn a_short_gap_does_not_end_and_restart() {
        let mut s = AlertState::default();
        let car = seen(&[("car", 0.6)]);
        let none = seen(&[]);
        let events = feed(
            &mut s,
            0,
            &[car.clone(), car.clone(), none, car.clone(), car],
        );
        assert_eq!(events, [(1, AlertKind::Start, "car".to_string())]);
    }

    #[test]
    fn a_label_the_prompt_drops_ends_at_once() {
        let mut s = AlertState::default();
        let asked = |labels: &[&str], detected: &[&str]| Observation {
            detected: detected
                .iter()
                .map(|l| Detection {
                    label: l.to_string(),
                    score: None,
                    bbox: None,
                })
                .collect(),
            asked: Some(labels.iter().map(|l| l.to_string()).collect()),
        };
        feed(
            &mut s,
            0,
            &[
                asked(&["car", "dog"], &["car"]),
                asked(&["car", "dog"], &["car"]),
            ],
        );
        let events = s.observe(&settings(), 2, 1000, Some(2), &asked(&["dog"], &[]));
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].reason, Some(EndReason::PromptChanged));
        assert_eq!(events[0].label, "car");
    }

    #[test]
    fn saved_state_resumes_without_repeating_a_start_or_losing_an_end() {
        let mut s = AlertState::default();
        let car = seen(&[("car", 0.6)]);
        assert_eq!(feed(&mut s, 0, &[car.clone(), car.clone()]).len(), 1);
        let saved = serde_json::to_string(&s).unwrap();
        // Another worker takes over: frames it already counted are ignored, the label is
        // still open, and its end still comes.
        let mut resumed: AlertState = serde_json::from_str(&saved).unwrap();
        assert!(resumed.has_open());
        assert!(feed(&mut resumed, 1, &[car.clone(), car]).is_empty());
        let ends = feed(&mut resumed, 3, &[seen(&[]), seen(&[]), seen(&[])]);
        assert_eq!(ends, [(4, AlertKind::End, "car".to_string())]);
    }

    #[test]
    fn outputs_are_read_as_labels_with_scores_and_captions_make_none() {
        let clip = json!({
            "phrases": [
                {"phrase": "a car", "probability": 0.7, "similarity": 0.3},
                {"phrase": "a dog", "probability": 0.3, "similarity": 0.2}
            ],
            "detected": ["a car"]
        });
        let o = Observation::from_output(&clip).unwrap();
        assert_eq!(o.detected[0].label, "a car");
        assert_eq!(o.detected[0].score, Some(0.7));
        assert_eq!(
            o.asked.as_deref(),
            Some(&["a car".to_string(), "a dog".to_string()][..])
        );
        let boxes = json!({"detected": [{"label": "cat", "score": 0.9, "box": [1, 2, 3, 4]}]});
        let o = Observation::from_output(&boxes).unwrap();
        assert_eq!(o.detected[0].bbox, Some(json!([1, 2, 3, 4])));
        assert_eq!(o.asked, None);
        assert_eq!(
            Observation::from_output(&json!({"caption": "a street"})),
            None
        );
    }

    #[test]
    fn a_label_takes_its_best_box_from_detections() {
        // OWL-ViT's shape: `detected` lists labels, boxes and scores are in `detections`.
        let owlvit = json!({
            "detections": [
                {"label": "car", "score": 0.31, "box": [1.0, 2.0, 3.0, 4.0]},
                {"label": "dog", "score": 0.9, "box": [5.0, 5.0, 9.0, 9.0]},
                {"label": "car", "score": 0.72, "box": [10.0, 20.0, 30.0, 40.0]}
            ],
            "phrases": [
                {"phrase": "car", "max_score": 0.72, "count": 2},
                {"phrase": "dog", "max_score": 0.9, "count": 1}
            ],
            "detected": ["car", "dog"],
            "frame_size": [640, 480]
        });
        let o = Observation::from_output(&owlvit).unwrap();
        assert_eq!(o.detected[0].label, "car");
        assert_eq!(o.detected[0].score, Some(0.72));
        assert_eq!(o.detected[0].bbox, Some(json!([10.0, 20.0, 30.0, 40.0])));
        assert_eq!(o.detected[1].score, Some(0.9));
        // PaliGemma's `detect`: boxes without scores, the first one stands.
        let paligemma = json!({
            "text": "<loc0100><loc0200><loc0300><loc0400> car",
            "detections": [
                {"label": "car", "box": [1, 2, 3, 4]},
                {"label": "car", "box": [5, 6, 7, 8]}
            ],
            "detected": ["car"]
        });
        let o = Observation::from_output(&paligemma).unwrap();
        assert_eq!(o.detected[0].score, None);
        assert_eq!(o.detected[0].bbox, Some(json!([1, 2, 3, 4])));
    }

    /// The first start two frames of `output` make for `label`.
    fn start_of(output: &Value, label: &str) -> AlertEvent {
        let obs = Observation::from_output(output).expect("the output has `detected`");
        let mut state = AlertState::default();
        let mut events = state.observe(&settings(), 0, 0, None, &obs);
        events.extend(state.observe(&settings(), 1, 500, None, &obs));
        events
            .into_iter()
            .find(|e| e.kind == AlertKind::Start && e.label == label)
            .expect("a start")
    }

    #[test]
    fn owlvit_alerts_carry_the_best_score_and_its_box() {
        use crate::model::testing::util::{frame, prompt, tiny_model};
        use crate::model::{ModelSettings, ModelType, load_model};
        let settings = ModelSettings {
            model_type: ModelType::OwlVit,
            model_path: Some(tiny_model(ModelType::OwlVit).to_path_buf()),
            ..ModelSettings::default()
        };
        let mut model = load_model(&settings).unwrap();
        let out = model
            .infer(&[&frame("rings", 97, 61)], &prompt("person, car"))
            .unwrap()
            .remove(0);
        let label = out["detected"][0]
            .as_str()
            .expect("the random model keeps a box")
            .to_string();
        let boxes: Vec<&Value> = out["detections"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|d| d["label"] == label.as_str())
            .collect();
        let best = boxes
            .iter()
            .filter_map(|d| d["score"].as_f64())
            .fold(f64::MIN, f64::max);

        let start = start_of(&out, &label);
        assert_eq!(start.peak_score, Some(best));
        let peak_box = start.peak_box.clone().expect("a box");
        assert!(
            boxes
                .iter()
                .any(|d| d["box"] == peak_box && d["score"].as_f64() == Some(best)),
            "{peak_box} is the box with the best score"
        );
        let fields = start.fields();
        assert!(fields.contains(&("peak_score", format!("{best:.4}"))));
        assert!(fields.contains(&("peak_box", peak_box.to_string())));
    }

    #[test]
    fn test_colour_alerts_carry_the_share_as_their_score() {
        use crate::frame::Frame;
        use crate::model::VisionLanguageModel;
        use crate::model::testing::colour::ColourTestModel;
        use crate::model::testing::util::prompt;
        // A 100 x 50 grey frame with a 20 x 20 magenta square: 8% of the frame.
        let (w, h) = (100usize, 50usize);
        let mut px = vec![90u8; w * h * 3];
        for y in 10..30 {
            for x in 40..60 {
                px[(y * w + x) * 3..][..3].copy_from_slice(&[255, 0, 255]);
            }
        }
        let f = Frame::new(w as u32, h as u32, bytes::Bytes::from(px)).unwrap();
        let out = ColourTestModel::new(224)
            .infer(&[&f], &prompt("magenta, red"))
            .unwrap()
            .remove(0);
        let start = start_of(&out, "magenta");
        assert_eq!(start.peak_score, Some(0.08));
        // Its box, where the output gives one.
        let own = &out["detected"][0];
        let boxed = own.get("box").or_else(|| {
            out.get("detections")?
                .as_array()?
                .iter()
                .find(|d| d["label"] == "magenta")?
                .get("box")
        });
        assert_eq!(start.peak_box.as_ref(), boxed);
    }
}
