//! What the scoring families share between their towers and their JSON: embeddings
//! normalised for cosine similarity, scores rounded for output, candle errors as inference
//! failures.

use crate::model::ModelError;
use candle_core::{D, Tensor};

pub fn infer_err(e: candle_core::Error) -> ModelError {
    ModelError::Inference(e.to_string())
}

pub fn l2_normalise(x: &Tensor) -> Result<Tensor, ModelError> {
    x.sqr()
        .and_then(|s| s.sum_keepdim(D::Minus1))
        .and_then(|s| s.sqrt())
        .and_then(|n| x.broadcast_div(&n))
        .map_err(infer_err)
}

/// Rounds for the JSON output: six decimals is far below CLIP's own noise.
pub fn round6(x: f32) -> f64 {
    (x as f64 * 1e6).round() / 1e6
}
