//! `MODEL_TYPE=test-colour`: a test model, not a vision model. It detects a colour by counting
//! pixels, so alert and scene-gate behaviour can be measured on generated video, where a
//! model with random weights sees nothing.
//!
//! The prompt is a comma-separated list of colour names from [`COLOURS`]. A colour is
//! detected in a frame when the pixels within [`CHANNEL_TOLERANCE`] of it on every channel
//! cover at least [`MIN_COVERAGE`] of the frame. The output reads like a box model's:
//! `{"detected": [{"label": "magenta", "score": 0.028}], "detections": [{"label": "magenta",
//! "score": 0.97, "box": [40, 10, 80, 50]}], "phrases": [{"phrase": "magenta", "coverage":
//! 0.028}]}`.
//!
//! - `detected`'s score is the share of the frame the colour covers (what alerts read).
//! - `detections` holds one box per detected colour: the bounding box of all its pixels, in
//!   source pixels (`[x1, y1, x2, y2]`, the far edges exclusive, scaled back when the worker
//!   shrank the frame). Its score is [`BOX_SCORE_FLOOR`] plus the rest of the way to 1 times
//!   the box's fill (the colour's pixels over the box's area): at least 0.7, so the
//!   tracker's default thresholds start a track on it, and 1 for a solid rectangle.

use crate::frame::Frame;
use crate::model::{ModelError, ModelInfo, VisionLanguageModel};
use crate::prompt::PromptRef;
use serde_json::{Value, json};
use std::sync::Arc;

/// The colours the prompt may name, as 8-bit RGB.
pub const COLOURS: [(&str, [u8; 3]); 8] = [
    ("red", [255, 0, 0]),
    ("green", [0, 255, 0]),
    ("blue", [0, 0, 255]),
    ("yellow", [255, 255, 0]),
    ("magenta", [255, 0, 255]),
    ("cyan", [0, 255, 255]),
    ("white", [255, 255, 255]),
    ("black", [0, 0, 0]),
];

/// How far (0 to 255) each channel of a pixel may be from the colour and still count: wide
/// enough for the colour shifts of 4:2:0 video compression.
pub const CHANNEL_TOLERANCE: u8 = 64;

/// The share of the frame (0 to 1) a colour must cover to be detected.
pub const MIN_COVERAGE: f64 = 0.01;

/// The least score of a box in `detections`: the tracker's default
/// `track_activation_threshold`, so every box this model gives can start a track.
pub const BOX_SCORE_FLOOR: f64 = 0.7;

/// A colour the prompt names, and its RGB value.
type NamedColour = (String, [u8; 3]);

pub struct ColourTestModel {
    info: ModelInfo,
    /// The last prompt's text and the colours it names, since a prompt repeats for every
    /// batch until it changes.
    parsed: Option<(Arc<str>, Vec<NamedColour>)>,
}

impl ColourTestModel {
    pub fn new(input_size: u32) -> Self {
        Self {
            info: ModelInfo {
                name: "test-colour".into(),
                task: "test".into(),
                input_size,
                device: "cpu".into(),
                dtype: "none".into(),
            },
            parsed: None,
        }
    }

    fn colours(&mut self, prompt: &Arc<str>) -> Result<&[NamedColour], ModelError> {
        if self.parsed.as_ref().is_none_or(|(text, _)| text != prompt) {
            self.parsed = Some((prompt.clone(), parse_prompt(prompt)?));
        }
        Ok(&self.parsed.as_ref().expect("set above").1)
    }
}

/// The colours a prompt names, in its order, without repeats.
fn parse_prompt(prompt: &str) -> Result<Vec<NamedColour>, ModelError> {
    let mut out: Vec<NamedColour> = Vec::new();
    for word in prompt.split(',').map(str::trim).filter(|w| !w.is_empty()) {
        let name = word.to_ascii_lowercase();
        let Some((_, rgb)) = COLOURS.iter().find(|(n, _)| *n == name) else {
            let known: Vec<&str> = COLOURS.iter().map(|(n, _)| *n).collect();
            return Err(ModelError::Prompt(
                format!(
                    "the test-colour model knows only the colours {}, not {word:?}",
                    known.join(", ")
                )
                .into(),
            ));
        };
        if !out.iter().any(|(n, _)| *n == name) {
            out.push((name, *rgb));
        }
    }
    if out.is_empty() {
        return Err(ModelError::Prompt(
            "the test-colour model needs a comma-separated list of colour names".into(),
        ));
    }
    Ok(out)
}

/// Where a colour lies in a frame: how many pixels match it and their bounding box.
struct ColourPixels {
    count: usize,
    /// `[x_min, y_min, x_max, y_max]` of the matching pixels, inclusive, in frame pixels.
    bounds: Option<[usize; 4]>,
}

/// The pixels within `CHANNEL_TOLERANCE` of `rgb` on every channel.
fn find(frame: &Frame, rgb: [u8; 3]) -> ColourPixels {
    let width = frame.width as usize;
    let mut found = ColourPixels {
        count: 0,
        bounds: None,
    };
    let matching = frame
        .rgb
        .chunks_exact(3)
        .enumerate()
        .filter(|(_, p)| (0..3).all(|c| p[c].abs_diff(rgb[c]) <= CHANNEL_TOLERANCE));
    for (i, _) in matching {
        let (x, y) = (i % width, i / width);
        found.count += 1;
        let b = found.bounds.get_or_insert([x, y, x, y]);
        *b = [b[0].min(x), b[1].min(y), b[2].max(x), b[3].max(y)];
    }
    found
}

/// Rounded to 4 decimals, so outputs compare equal across runs and stay short.
fn rounded(x: f64) -> f64 {
    (x * 1e4).round() / 1e4
}

/// The `detections` entry of a colour's pixels: its box in source pixels and its score.
fn detection(frame: &Frame, name: &str, found: &ColourPixels, bounds: [usize; 4]) -> Value {
    let [x1, y1, x2, y2] = bounds;
    let area = ((x2 - x1 + 1) * (y2 - y1 + 1)) as f64;
    let fill = found.count as f64 / area;
    let sx = f64::from(frame.source_width) / f64::from(frame.width);
    let sy = f64::from(frame.source_height) / f64::from(frame.height);
    let corners = [
        x1 as f64 * sx,
        y1 as f64 * sy,
        (x2 + 1) as f64 * sx,
        (y2 + 1) as f64 * sy,
    ];
    json!({
        "label": name,
        "score": rounded(BOX_SCORE_FLOOR + (1.0 - BOX_SCORE_FLOOR) * fill),
        "box": corners.map(rounded),
    })
}

fn output(frame: &Frame, colours: &[NamedColour]) -> Value {
    let pixels = frame.width as f64 * frame.height as f64;
    let mut detected = Vec::new();
    let mut detections = Vec::new();
    let mut phrases = Vec::new();
    for (name, rgb) in colours {
        let found = find(frame, *rgb);
        let share = rounded(found.count as f64 / pixels);
        if share >= MIN_COVERAGE
            && let Some(bounds) = found.bounds
        {
            detected.push(json!({ "label": name, "score": share }));
            detections.push(detection(frame, name, &found, bounds));
        }
        phrases.push(json!({ "phrase": name, "coverage": share }));
    }
    json!({ "detected": detected, "detections": detections, "phrases": phrases })
}

impl VisionLanguageModel for ColourTestModel {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn infer(&mut self, frames: &[&Frame], prompt: &PromptRef) -> Result<Vec<Value>, ModelError> {
        let colours = self.colours(&prompt.text)?;
        Ok(frames.iter().map(|f| output(f, colours)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alerts::Observation;
    use bytes::Bytes;

    /// A 100x50 grey frame with a `side`-px square of `rgb` in it.
    fn frame(rgb: [u8; 3], side: usize) -> Frame {
        let (w, h) = (100usize, 50usize);
        let mut px = vec![90u8; w * h * 3];
        for y in 10..10 + side {
            for x in 20..20 + side {
                px[(y * w + x) * 3..][..3].copy_from_slice(&rgb);
            }
        }
        Frame::new(w as u32, h as u32, Bytes::from(px)).unwrap()
    }

    fn prompt(text: &str) -> PromptRef {
        PromptRef {
            text: text.into(),
            version: None,
        }
    }

    #[test]
    fn a_colour_covering_enough_of_the_frame_is_detected_with_its_share() {
        let mut m = ColourTestModel::new(224);
        // 10x10 of 100x50 px is 2% of the frame, near-magenta as compression leaves it.
        let seen = frame([240, 20, 230], 10);
        // 4x4 px is 0.32%: under MIN_COVERAGE.
        let speck = frame([255, 0, 255], 4);
        let out = m
            .infer(&[&seen, &speck], &prompt("Magenta, red, magenta"))
            .unwrap();
        assert_eq!(
            out[0],
            json!({
                "detected": [{ "label": "magenta", "score": 0.02 }],
                "detections": [
                    { "label": "magenta", "score": 1.0, "box": [20.0, 10.0, 30.0, 20.0] }
                ],
                "phrases": [
                    { "phrase": "magenta", "coverage": 0.02 },
                    { "phrase": "red", "coverage": 0.0 }
                ]
            })
        );
        let obs = Observation::from_output(&out[1]).unwrap();
        assert!(obs.detected.is_empty());
        assert_eq!(
            obs.asked,
            Some(vec!["magenta".to_string(), "red".to_string()])
        );
        let obs = Observation::from_output(&out[0]).unwrap();
        assert_eq!(obs.detected[0].label, "magenta");
        assert_eq!(obs.detected[0].score, Some(0.02));
    }

    #[test]
    fn each_colour_gets_its_bounding_box_in_source_pixels_scored_by_its_fill() {
        let mut m = ColourTestModel::new(224);
        // Two 10x10 red squares on one row: a 30x10 box, a third of it empty. The worker
        // halved the picture, so the box doubles back to source pixels.
        let (w, h) = (100usize, 50usize);
        let mut px = vec![90u8; w * h * 3];
        for y in 5..15 {
            for x in (10..20).chain(30..40) {
                px[(y * w + x) * 3..][..3].copy_from_slice(&[255, 0, 0]);
            }
        }
        let f = Frame::new(w as u32, h as u32, Bytes::from(px))
            .unwrap()
            .with_source_size(200, 100);
        let out = m.infer(&[&f], &prompt("red, blue")).unwrap();
        let fill = 200.0 / 300.0;
        assert_eq!(
            out[0]["detections"],
            json!([{
                "label": "red",
                "score": rounded(BOX_SCORE_FLOOR + (1.0 - BOX_SCORE_FLOOR) * fill),
                "box": [20.0, 10.0, 80.0, 30.0]
            }])
        );
        let score = out[0]["detections"][0]["score"].as_f64().unwrap();
        let defaults = crate::tracker::TrackerSettings::default();
        assert!(score >= defaults.track_activation_threshold && score < 1.0);
        assert_eq!(
            out[0]["detected"],
            json!([{ "label": "red", "score": 0.04 }])
        );
    }

    #[test]
    fn an_unknown_colour_or_an_empty_prompt_is_a_prompt_error() {
        let mut m = ColourTestModel::new(224);
        let f = frame([255, 0, 0], 10);
        for p in ["red, a dog", " , "] {
            assert!(
                matches!(m.infer(&[&f], &prompt(p)), Err(ModelError::Prompt(_))),
                "{p:?}"
            );
        }
        // A bad prompt does not stick: the next good one works.
        assert!(m.infer(&[&f], &prompt("red")).is_ok());
    }
}
