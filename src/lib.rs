//! free-roam: a Redis-native fleet of stateless workers that run vision-language models on
//! live video. Everything a user touches lives in Redis; see docs/redis-contract.md.
//!
//! # Layout
//!
//! The folder tree is the architecture; `scripts/check-layers` keeps its rules (no import
//! circle; only `model::registry` names a model family; the pure modules import no I/O).
//!
//! - [`job`]: the job spec, its fields, limits and statuses (pure).
//! - [`config`]: every setting, validated in one step into one part per component
//!   ([`store::settings::RedisSettings`], [`queue::QueueSettings`],
//!   [`engine::EngineSettings`], [`model::ModelSettings`], [`source::SourceSettings`],
//!   [`pipeline::PipelineSettings`], [`health::HealthSettings`]).
//! - [`store`]: the Redis pool and function calls; [`store::keys`] the contract's key names,
//!   [`store::functions`] each function's typed call and reply (the library itself is
//!   `store/functions.lua`).
//! - [`queue`]: the worker: claiming, leases, reclaiming, dead-lettering, hand-back;
//!   [`queue::body`] the [`queue::body::JobBody`] trait a job's work implements and its
//!   context, [`queue::stop`] how a running job is told to stop.
//! - [`results`]: result entries, job progress and where a job left off.
//! - [`prompt`]: the prompt a batch runs with and how a job follows it; [`prompt::active`]
//!   the active prompt in Redis.
//! - [`client`]: the user-side operations the CLI speaks (submit, status, cancel, ...).
//! - [`health`]: the HTTP health and metrics endpoint; [`metrics`]: the counters.
//! - [`backend`]: whether a remote model's server answers (pure), shared by the model, the
//!   queue and the health endpoint.
//! - [`redact`]: masking secrets (URL passwords) before anything is shown (pure).
//! - [`frame`]: the decoded frame type (pure); [`sampler`]: fps sampling by timestamp (pure).
//! - [`source`]: frame sources (HLS and RTSP through an ffmpeg child, Redis frame streams).
//! - [`gate`]: the scene-change gate that lets a job reuse the last output on a still scene
//!   (pure).
//! - [`alerts`]: start and end events from a job's detected labels (pure).
//! - [`tracker`]: ByteTrack, a job's track ids for the boxes of box models (pure).
//! - [`zones`]: a job's zones and lines: enter, leave, cross and loiter events and counts
//!   from its tracks (pure).
//! - [`snapshot`]: pictures of a job's events and its latest frame: boxes, track ids, zones
//!   and lines drawn on the frame, a JPEG, and the per-minute cap (pure).
//! - [`engine`]: the model on its own thread, batching frames across all jobs: `stream` (a
//!   job's queue and replies), `batch` and `batcher` (forming batches, grouped by prompt),
//!   `model_thread`, and `infer_call` and `submit_call` (a model waited on, or one that
//!   answers through `submit`).
//! - [`pipeline`]: the stream job body tying a source, the engine and the result sink.
//! - [`model`]: the model trait and everything behind it, the only place candle is used:
//!   `kernels/` (fused linear layers, the bf16 product, batched products, row kernels),
//!   `towers/` (the shared ViT tower, CLIP's text side, weight specs, scoring), `text/`
//!   (tokenizers, phrase rules, the prompt cache), `loading/` (settings, files, config.json,
//!   the hub, device and dtype), `error` (what failed, with the library's error as its cause), `kind` (the families by name), `registry` (the one place that names
//!   every family), `families/` (clip, siglip, owlvit, yoloworld, blip, paligemma), `remote/`
//!   (openai), `testing/` (the null, stub and test-colour models, synthetic weights, parity
//!   checks).
pub mod alerts;
pub mod backend;
pub mod client;
pub mod config;
pub mod engine;
pub mod frame;
#[doc(hidden)]
pub mod fuzzing;
pub mod gate;
pub mod health;
pub mod job;
pub mod metrics;
pub mod model;
pub mod pipeline;
pub mod prompt;
pub mod queue;
pub mod redact;
pub mod results;
pub mod sampler;
pub mod snapshot;
pub mod source;
pub mod store;
pub mod tracker;
pub mod zones;
