//! The integration tests, one binary: each module is one area, run against real
//! `redis-server`, ffmpeg and `free-roam` processes. Run an area alone with its module path,
//! e.g. `cargo test -p free-roam-worker --test it lifecycle::`.

mod common;
mod ingest_support;

mod camera;
mod camera_paths;
mod cli;
mod cluster;
mod dashboard;
mod fleet;
mod frame_memory;
mod ingest_hls;
mod ingest_redis;
mod ingest_rtsp;
mod layers;
mod lifecycle;
mod openai;
mod queue_shards;
mod readme;
mod scaling;
mod security;
mod shards;
mod snapshots;
mod tracks;
mod worker_binary;
mod zones;
