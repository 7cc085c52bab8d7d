//! What a worker shares between its queue loops and its health endpoint: whether it is
//! draining, ready, and which jobs it runs in which queue shard.

use crate::backend::BackendHealth;
use crate::queue::stop::StopSignal;
use crate::store::StoreError;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

/// What the health endpoint reads about the worker.
#[derive(Debug, Default)]
pub struct WorkerState {
    pub draining: AtomicBool,
    pub redis_ready: AtomicBool,
    pub model_loaded: AtomicBool,
    /// What the model reports about itself, once loaded.
    model_info: Mutex<serde_json::Value>,
    /// Why the worker is not ready, when it is not (Redis unreachable at start, ...).
    pub last_redis_error: Mutex<Option<String>>,
    running: Mutex<HashMap<EntryKey, RunningJob>>,
    /// The health of the server a remote model calls, when it calls one.
    backend: std::sync::OnceLock<Arc<BackendHealth>>,
    /// The fleet's queue shard count the worker follows, and the shards it serves.
    shards: Mutex<Option<(u32, Vec<u32>)>>,
}

impl WorkerState {
    /// Records the loaded model; the worker is ready from now on (Redis permitting).
    pub fn set_model(&self, info: serde_json::Value) {
        *self.model_info.lock().unwrap_or_else(|e| e.into_inner()) = info;
        self.model_loaded.store(true, Ordering::Relaxed);
    }

    /// Records the health of the server the loaded model calls.
    pub fn set_backend_health(&self, health: Arc<BackendHealth>) {
        let _ = self.backend.set(health);
    }

    /// Why the model's server counts as down (see [`BackendHealth::down`]); `None` while it
    /// answers, or when the model calls none.
    pub fn backend_down(&self) -> Option<String> {
        self.backend.get().and_then(|h| h.down())
    }

    /// Whether the model calls a server at all.
    pub fn has_backend(&self) -> bool {
        self.backend.get().is_some()
    }

    /// The fleet's queue shard count this worker follows, and the shards it serves; `None`
    /// before Redis first answered.
    pub fn queue_shards(&self) -> Option<(u32, Vec<u32>)> {
        self.shards
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(super) fn set_queue_shards(&self, shards: u32, served: Vec<u32>) {
        *self.shards.lock().unwrap_or_else(|e| e.into_inner()) = Some((shards, served));
    }

    pub fn model_info(&self) -> serde_json::Value {
        self.model_info
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn running_jobs(&self) -> usize {
        self.lock_running().len()
    }

    pub fn running_job_ids(&self) -> Vec<String> {
        self.lock_running()
            .values()
            .map(|r| r.job_id.clone())
            .collect()
    }

    pub(super) fn is_running(&self, shard: u32, entry_id: &str) -> bool {
        self.lock_running()
            .contains_key(&(shard, entry_id.to_string()))
    }

    /// The running jobs with their entries, copied out so no lock is held across an await.
    pub(super) fn snapshot(&self) -> Vec<(EntryKey, RunningJob)> {
        self.lock_running()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// The running jobs of one shard, by entry id.
    pub(super) fn shard_snapshot(&self, shard: u32) -> Vec<(String, RunningJob)> {
        self.lock_running()
            .iter()
            .filter(|((s, _), _)| *s == shard)
            .map(|((_, entry_id), v)| (entry_id.clone(), v.clone()))
            .collect()
    }

    pub(super) fn lock_running(&self) -> std::sync::MutexGuard<'_, HashMap<EntryKey, RunningJob>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn redis_ok(&self) {
        self.redis_ready.store(true, Ordering::Relaxed);
        *self
            .last_redis_error
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = None;
    }

    pub(super) fn redis_failed(&self, e: &StoreError) {
        self.redis_ready.store(false, Ordering::Relaxed);
        *self
            .last_redis_error
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(e.to_string());
    }
}

/// A running job's entry: its queue shard and its entry id there (ids repeat across the
/// shards' streams).
pub(super) type EntryKey = (u32, String);

#[derive(Clone, Debug)]
pub(super) struct RunningJob {
    pub(super) job_id: String,
    pub(super) stop: StopSignal,
    pub(super) done: Arc<Notify>,
    pub(super) finished: Arc<AtomicBool>,
}
