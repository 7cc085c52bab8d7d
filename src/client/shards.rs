//! Queue shards as the user sees them: which shard holds a job, what each shard's queue
//! holds and who serves it, and the rule for changing the fleet's shard count (growing is
//! always allowed, shrinking only off shards that hold no job).

use super::ClientError;
use crate::store::depth::shard_depth;
use crate::store::keys::{MAX_QUEUE_SHARDS, QUEUE_SHARDS_FIELD, shard_of_job};
use crate::store::{Store, StoreError};

/// The shards to look in for a job, in order: its own ([`shard_of_job`], where `fr_submit`
/// and the CLI queue it), then shard 0 (where a plain `XADD {fr}:jobs` queues it whatever its
/// id), then the others (a job queued under another shard count).
pub fn search_order(job_id: &str, shards: u32) -> Vec<u32> {
    let shards = shards.max(1);
    let home = shard_of_job(job_id, shards);
    let mut order = vec![home];
    if home != 0 {
        order.push(0);
    }
    order.extend((1..shards).filter(|s| *s != home));
    order
}

/// The shard whose job hash holds `job_id`, looked for in [`search_order`] among the
/// fleet's `shards`; `None` when none has it (an entry no worker has read yet, or no job).
pub async fn shard_holding(
    store: &Store,
    job_id: &str,
    shards: u32,
) -> Result<Option<u32>, StoreError> {
    for shard in search_order(job_id, shards) {
        if super::exists(store, &store.keys().shard(shard).job(job_id)).await? {
            return Ok(Some(shard));
        }
    }
    Ok(None)
}

/// One queue shard's jobs and workers, as `free-roam queue shards` shows them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardQueue {
    pub shard: u32,
    /// The shard's job stream (`{fr}:jobs`, `{fr:q<i>}:jobs`).
    pub stream: String,
    /// Entries no worker has read yet: the group's lag, or every entry of a stream that has
    /// no group yet (no worker ever served the shard).
    pub waiting: u64,
    /// Entries delivered and not yet finished: the group's pending count.
    pub running: u64,
    /// Members of the shard's `workers:alive` whose deadline is still ahead.
    pub live_workers: u64,
}

impl ShardQueue {
    /// No job waits or runs in the shard.
    pub fn is_empty(&self) -> bool {
        self.waiting == 0 && self.running == 0
    }

    /// Jobs are in the shard and no live worker serves it: they wait until one serves it (a
    /// worker serving all shards follows a larger count within about 30 s; one with
    /// `QUEUE_SHARDS_SERVED` set chooses its shards when it starts).
    pub fn unserved(&self) -> bool {
        !self.is_empty() && self.live_workers == 0
    }
}

/// The server's clock in ms: lease deadlines are written with it, so they are compared
/// with it, not with this machine's.
async fn server_now_ms(store: &Store) -> Result<i64, StoreError> {
    let (secs, micros): (i64, i64) = store.query(&redis::cmd("TIME")).await?;
    Ok(secs * 1000 + micros / 1000)
}

/// One shard's queue: its depth and its live leases.
async fn shard_queue(store: &Store, shard: u32, now_ms: i64) -> Result<ShardQueue, StoreError> {
    let keys = store.keys().shard(shard);
    let (waiting, running) = shard_depth(store, shard).await?;
    let mut cmd = redis::cmd("ZCOUNT");
    cmd.arg(keys.workers_alive())
        .arg(format!("({now_ms}"))
        .arg("+inf");
    let live_workers: u64 = store.query(&cmd).await?;
    Ok(ShardQueue {
        shard,
        stream: keys.jobs(),
        waiting,
        running,
        live_workers,
    })
}

/// The fleet's shard count and each of its shards' queues, shard 0 first.
pub async fn queue_overview(store: &Store) -> Result<(u32, Vec<ShardQueue>), ClientError> {
    let shards = store.queue_shards().await?;
    let now = server_now_ms(store).await?;
    let mut out = Vec::with_capacity(shards as usize);
    for shard in 0..shards {
        out.push(shard_queue(store, shard, now).await?);
    }
    Ok((shards, out))
}

/// What a change of the shard count did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShardCountChange {
    pub previous: u32,
    pub now: u32,
}

/// Sets the fleet's shard count (`queue_shards` in shard 0's settings hash) to `shards`.
/// Growing is always allowed. Shrinking is refused ([`ClientError::ShardBusy`], naming the
/// first such shard) while a shard the new count drops has a job waiting or running: no
/// worker would serve it any more. A count outside 1..=[`MAX_QUEUE_SHARDS`] is refused
/// ([`ClientError::ShardCount`]).
///
/// The check and the write are not one atomic step (the shards are other slots): a producer
/// that read the old count may queue into a dropped shard meanwhile, so shrink with the
/// producers stopped. Workers read the count at start and about every 30 s.
pub async fn set_queue_shards(store: &Store, shards: u32) -> Result<ShardCountChange, ClientError> {
    if !(1..=MAX_QUEUE_SHARDS).contains(&shards) {
        return Err(ClientError::ShardCount {
            given: shards,
            max: MAX_QUEUE_SHARDS,
        });
    }
    let previous = store.queue_shards().await?;
    if shards < previous {
        let now = server_now_ms(store).await?;
        for shard in shards..previous {
            let q = shard_queue(store, shard, now).await?;
            if !q.is_empty() {
                return Err(ClientError::ShardBusy {
                    shard,
                    stream: q.stream,
                    waiting: q.waiting,
                    running: q.running,
                });
            }
        }
    }
    let mut cmd = redis::cmd("HSET");
    cmd.arg(store.keys().shard(0).settings())
        .arg(QUEUE_SHARDS_FIELD)
        .arg(shards);
    let _: i64 = store.query(&cmd).await?;
    Ok(ShardCountChange {
        previous,
        now: shards,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_is_looked_for_in_its_shard_then_the_front_door_then_the_rest() {
        assert_eq!(search_order("anything", 1), vec![0]);
        assert_eq!(search_order("anything", 0), vec![0]);
        for id in ["a", "cam-1", "lobby-1", "x.y:z"] {
            let order = search_order(id, 4);
            let home = shard_of_job(id, 4);
            assert_eq!(order[0], home, "{id}");
            let mut sorted = order.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, vec![0, 1, 2, 3], "each shard once: {order:?}");
            if home != 0 {
                assert_eq!(order[1], 0, "the front door second: {order:?}");
            }
        }
    }

    #[test]
    fn a_shard_with_jobs_and_no_live_worker_is_unserved() {
        let q = ShardQueue {
            shard: 1,
            stream: "{fr:q1}:jobs".into(),
            waiting: 0,
            running: 0,
            live_workers: 0,
        };
        assert!(q.is_empty() && !q.unserved());
        let waiting = ShardQueue {
            waiting: 2,
            ..q.clone()
        };
        assert!(waiting.unserved());
        let served = ShardQueue {
            live_workers: 1,
            ..waiting
        };
        assert!(!served.unserved());
    }
}
