//! free-roam: a Redis-native fleet of stateless workers that run vision-language models on
//! live video. Everything a user touches lives in Redis; see docs/redis-contract.md.
//!
//! # Layout
//!
//! - [`config`]: every setting, validated in one step.
//! - [`keys`]: the contract's key names; [`store`]: the Redis pool and function calls
//!   (the function library itself is `functions.lua`); [`functions`]: each function's
//!   typed call and reply.
//! - [`job`]: job specs, statuses, and the [`job::JobBody`] trait a job's work implements.
//! - [`queue`]: the worker: claiming, leases, reclaiming, dead-lettering, hand-back.
//! - [`results`]: result entries and job progress; [`prompt`]: the active prompt.
//! - [`client`]: the user-side operations the CLI speaks (submit, status, cancel, ...).
//! - [`health`]: the HTTP health and metrics endpoint; [`metrics`]: the counters.
//! - [`redact`]: masking secrets (URL passwords) before anything is shown (pure).
//! - [`frame`]: the decoded frame type (pure); [`sampler`]: fps sampling by timestamp (pure).
//! - [`source`]: frame sources (HLS through an ffmpeg child, Redis frame streams).
//! - [`gate`]: the scene-change gate that lets a job reuse the last output on a still scene
//!   (pure).
//! - [`alerts`]: start and end events from a job's detected labels (pure).
//! - [`engine`]: the model on its own thread, batching frames across all jobs.
//! - [`pipeline`]: the stream job body tying a source, the engine and the result sink.
//! - [`model`]: the model trait and its candle backends (the only place candle is used).
pub mod alerts;
pub mod client;
pub mod config;
pub mod engine;
pub mod frame;
pub mod functions;
#[doc(hidden)]
pub mod fuzzing;
pub mod gate;
pub mod health;
pub mod job;
pub mod keys;
pub mod metrics;
pub mod model;
pub mod pipeline;
pub mod prompt;
pub mod queue;
pub mod redact;
pub mod results;
pub mod sampler;
pub mod source;
pub mod store;
