//! free-roam: a Redis-native fleet of stateless workers that run vision-language models on
//! live video.
//!
//! # Layout
//!
//! - [`frame`]: the decoded frame type (pure).
//! - [`model`]: the model trait and its candle backends (the only place candle is used).
pub mod frame;
pub mod model;
