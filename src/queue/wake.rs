//! A worker's wake-ups: it waits (`BLPOP`) on its own wake-up list, where `fr_cancel` puts
//! the running jobs to stop, and, while it may reclaim, on its shard's orphan tokens, one per
//! entry that became an orphan. Both act at once what the ticks would find later: a tick is
//! still the guarantee, a wake-up only spares the wait for it.

use super::Worker;
use super::lane::Lane;
use super::stop::StopReason;
use crate::store::keys::Keys;
use crate::store::{Backoff, Dedicated, StoreResult};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How long one wait for a wake-up blocks: each wait that ends empty is a call, so a long
/// one keeps an idle worker's cost low, and it stays well under the reply timeout.
const WAKE_BLOCK_S: u64 = 6;

/// What one wake-up asks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Wake {
    /// `fr_cancel` asked this worker to stop this job.
    Cancel(String),
    /// An entry became an orphan: a reclaim pass would take it.
    Orphans,
}

impl Wake {
    /// Reads `BLPOP`'s `(key, value)` reply against the lists this worker waits on; `None`
    /// for a key it did not ask for.
    pub(crate) fn from_reply(keys: &Keys, worker: &str, key: &str, value: String) -> Option<Self> {
        if key == keys.wake(worker) {
            Some(Self::Cancel(value))
        } else if key == keys.orphans_wake() {
            Some(Self::Orphans)
        } else {
            None
        }
    }
}

impl Worker {
    /// Waits for wake-ups in one shard until `stop`, on a connection of its own (one per
    /// shard served, outside the pool). Orphan tokens are only taken while the worker may
    /// reclaim (as a tick's pass, up to twice its capacity) and is not shutting down
    /// (`shutdown`), so that they go to workers that run what they announce.
    pub(super) async fn wake_loop(
        self: Arc<Self>,
        lane: Arc<Lane>,
        shutdown: CancellationToken,
        stop: CancellationToken,
    ) {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
        let mut conn = None;
        while !stop.is_cancelled() {
            let takes_orphans = !shutdown.is_cancelled()
                && !self.state.draining.load(Ordering::Relaxed)
                && self.may_reclaim();
            let waited = tokio::select! {
                waited = self.wait_for_wake(&lane, &mut conn, takes_orphans) => waited,
                _ = stop.cancelled() => return,
            };
            match waited {
                Ok(wake) => {
                    backoff.reset();
                    if let Some(wake) = wake {
                        self.on_wake(&lane, wake);
                    }
                }
                Err(e) => {
                    conn = None;
                    self.on_redis_error(&e, "waiting for wake-ups").await;
                    tokio::select! {
                        _ = tokio::time::sleep(backoff.next_delay()) => {}
                        _ = stop.cancelled() => return,
                    }
                }
            }
        }
    }

    /// One wait (`BLPOP`, up to [`WAKE_BLOCK_S`]) on this worker's wake-up list in the
    /// lane's shard, and on its orphan tokens when `takes_orphans`; `None` when it ended
    /// empty.
    async fn wait_for_wake(
        &self,
        lane: &Lane,
        conn: &mut Option<Dedicated>,
        takes_orphans: bool,
    ) -> StoreResult<Option<Wake>> {
        let keys = lane.store.keys();
        let mut cmd = redis::cmd("BLPOP");
        cmd.arg(keys.wake(&self.identity.id));
        if takes_orphans {
            cmd.arg(keys.orphans_wake());
        }
        cmd.arg(WAKE_BLOCK_S);
        let conn = match conn {
            Some(conn) => conn,
            None => conn.insert(lane.store.dedicated().await?),
        };
        let reply: Option<(String, String)> = conn.query(&cmd).await?;
        Ok(reply.and_then(|(key, value)| {
            let wake = Wake::from_reply(keys, &self.identity.id, &key, value);
            if wake.is_none() {
                tracing::warn!(%key, "a wake-up from a list not waited on");
            }
            wake
        }))
    }

    fn on_wake(&self, lane: &Lane, wake: Wake) {
        match wake {
            Wake::Cancel(job_id) => {
                for (_, job) in self.state.shard_snapshot(lane.shard) {
                    if job.job_id == job_id {
                        tracing::info!(job = %job_id, "a cancel request woke the worker");
                        job.stop.stop(StopReason::Cancelled);
                    }
                }
            }
            Wake::Orphans => {
                if self.may_reclaim() {
                    lane.reclaim_due.notify_one();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wake_ups_are_read_by_their_list() {
        let keys = Keys::new("fr").shard(2);
        let cancel = Wake::from_reply(&keys, "w1", &keys.wake("w1"), "job-7".into());
        assert_eq!(cancel, Some(Wake::Cancel("job-7".into())));
        let orphans = Wake::from_reply(&keys, "w1", &keys.orphans_wake(), "1".into());
        assert_eq!(orphans, Some(Wake::Orphans));
        assert_eq!(
            Wake::from_reply(&keys, "w1", &keys.wake("w2"), "x".into()),
            None
        );
        let shard0 = Keys::new("fr");
        assert_eq!(
            Wake::from_reply(&keys, "w1", &shard0.wake("w1"), "x".into()),
            None
        );
    }
}
