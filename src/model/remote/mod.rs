//! Backends that send frames to a model served elsewhere.

pub mod openai;
