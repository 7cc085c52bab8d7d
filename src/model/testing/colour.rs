//! `MODEL_TYPE=test-colour`: a test model, not a vision model. It detects a colour by counting
//! pixels, so alert and scene-gate behaviour can be measured on generated video, where a
//! model with random weights sees nothing.
//!
//! The prompt is a comma-separated list of colour names from [`COLOURS`]. A colour is
//! detected in a frame when the pixels within [`CHANNEL_TOLERANCE`] of it on every channel
//! cover at least [`MIN_COVERAGE`] of the frame. The output reads like a presence model's:
//! `{"detected": [{"label": "magenta", "score": 0.028}], "phrases": [{"phrase": "magenta",
//! "coverage": 0.028}]}`, the score being the share of the frame the colour covers.

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

/// The share of the frame's pixels within `CHANNEL_TOLERANCE` of `rgb` on every channel.
fn coverage(frame: &Frame, rgb: [u8; 3]) -> f64 {
    let matching = frame
        .rgb
        .chunks_exact(3)
        .filter(|p| (0..3).all(|c| p[c].abs_diff(rgb[c]) <= CHANNEL_TOLERANCE))
        .count();
    matching as f64 / (frame.width as f64 * frame.height as f64)
}

fn output(frame: &Frame, colours: &[NamedColour]) -> Value {
    let mut detected = Vec::new();
    let mut phrases = Vec::new();
    for (name, rgb) in colours {
        let share = coverage(frame, *rgb);
        // Rounded so outputs compare equal across runs and stay short.
        let share = (share * 1e4).round() / 1e4;
        if share >= MIN_COVERAGE {
            detected.push(json!({ "label": name, "score": share }));
        }
        phrases.push(json!({ "phrase": name, "coverage": share }));
    }
    json!({ "detected": detected, "phrases": phrases })
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
