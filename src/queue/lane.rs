//! One queue shard a worker serves (a lane): the shard's store handle and what the worker
//! keeps per shard (its batched finishes, its reclaim signal, its registry writes). A job
//! runs in the lane whose stream it was read from, and every queue call about it goes to
//! that lane's shard.

use super::finishes::Finisher;
use super::registry::RegistryWrites;
use crate::store::Store;
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

pub(crate) struct Lane {
    pub(crate) shard: u32,
    /// The shard's handle: its functions and queue keys ([`Store::shard`]).
    pub(crate) store: Store,
    pub(crate) finisher: Finisher,
    /// Set by a tick that says a reclaim pass in this shard would find something; the
    /// lane's reclaim task waits on it.
    pub(crate) reclaim_due: Notify,
    /// What the ticks wrote into the shard's registry hash of this worker.
    registry_writes: Mutex<RegistryWrites>,
}

impl Lane {
    pub(crate) fn new(base: &Store, shard: u32, worker_id: &str) -> Arc<Self> {
        let store = base.shard(shard);
        Arc::new(Self {
            shard,
            finisher: Finisher::new(store.clone(), worker_id.to_string()),
            store,
            reclaim_due: Notify::new(),
            registry_writes: Mutex::default(),
        })
    }

    pub(crate) fn registry_writes(&self) -> std::sync::MutexGuard<'_, RegistryWrites> {
        self.registry_writes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }
}

/// The shards this worker serves, and the fleet's shard count they were chosen from (0
/// before Redis first answered).
#[derive(Default)]
pub(crate) struct Layout {
    pub(crate) shards: u32,
    pub(crate) lanes: Vec<Arc<Lane>>,
}
