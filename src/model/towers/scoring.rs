//! What the phrase-scoring families (clip, siglip, owlvit) share between their towers and
//! their JSON: the prompt's phrases and the texts the text tower reads for them, embeddings
//! normalised for cosine similarity, and each frame's `{"phrases":[...],"detected":[...]}`
//! with its numbers rounded for output.

use crate::model::ModelError;
use crate::model::text::phrases::{PHRASE_TEMPLATE, checked_phrases};
use candle_core::{D, Tensor};
use serde_json::{Map, Value, json};

/// The prompt's phrases and, for each, the text the text tower reads
/// ([`PHRASE_TEMPLATE`]); a prompt without usable phrases is a prompt error.
pub fn templated_phrases(prompt: &str) -> Result<(Vec<String>, Vec<String>), ModelError> {
    let phrases = checked_phrases(prompt).map_err(|e| ModelError::Prompt(e.into()))?;
    let texts = phrases
        .iter()
        .map(|p| PHRASE_TEMPLATE.replace("{phrase}", p))
        .collect();
    Ok((phrases, texts))
}

pub fn l2_normalise(x: &Tensor) -> Result<Tensor, ModelError> {
    let norm = x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?;
    Ok(x.broadcast_div(&norm)?)
}

pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// Rounds for the JSON output: six decimals is far below CLIP's own noise.
pub fn round6(x: f32) -> f64 {
    (x as f64 * 1e6).round() / 1e6
}

/// Rounds a box corner in pixels to two decimals for the JSON output.
pub fn round2(x: f32) -> f64 {
    (x as f64 * 100.0).round() / 100.0
}

/// One phrase's part of a frame's output: its numbers (without the phrase, which
/// [`phrase_output`] adds) and whether the frame counts it as detected.
pub struct PhraseScore {
    pub numbers: Value,
    pub detected: bool,
}

/// A frame's `{"phrases":[{"phrase", ...numbers}...],"detected":[...]}`, both in the prompt's
/// order: `score` gives each phrase's numbers and verdict by its index.
pub fn phrase_output(
    phrases: &[String],
    mut score: impl FnMut(usize) -> PhraseScore,
) -> Map<String, Value> {
    let mut detected: Vec<&String> = Vec::new();
    let entries: Vec<Value> = phrases
        .iter()
        .enumerate()
        .map(|(i, phrase)| {
            let scored = score(i);
            if scored.detected {
                detected.push(phrase);
            }
            let mut entry = Map::from_iter([("phrase".to_string(), json!(phrase))]);
            if let Value::Object(numbers) = scored.numbers {
                entry.extend(numbers);
            }
            Value::Object(entry)
        })
        .collect();
    Map::from_iter([
        ("phrases".to_string(), Value::Array(entries)),
        ("detected".to_string(), json!(detected)),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phrases_keep_their_order_and_detected_lists_those_that_pass() {
        let phrases = ["people".to_string(), "cars".to_string(), "dogs".to_string()];
        let scores = [0.9f32, 0.1, 0.6];
        let out = phrase_output(&phrases, |i| PhraseScore {
            numbers: json!({"probability": round6(scores[i])}),
            detected: scores[i] > 0.5,
        });
        assert_eq!(
            Value::Object(out),
            json!({
                "phrases": [
                    {"phrase": "people", "probability": 0.9},
                    {"phrase": "cars", "probability": 0.1},
                    {"phrase": "dogs", "probability": 0.6}
                ],
                "detected": ["people", "dogs"]
            })
        );
    }

    #[test]
    fn phrases_become_templated_texts_and_an_empty_prompt_is_a_prompt_error() {
        let (phrases, texts) = templated_phrases("Detect all people and cars").unwrap();
        assert_eq!(phrases, ["people", "cars"]);
        assert_eq!(texts, ["a photo of people.", "a photo of cars."]);
        assert!(matches!(
            templated_phrases(" , detect all "),
            Err(ModelError::Prompt(_))
        ));
    }
}
