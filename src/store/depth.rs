//! How many jobs wait and run in the queue's shards: each shard's group lag and pending
//! count, read for `/metrics` and `free-roam queue shards`.

use crate::store::keys::WORKER_GROUP;
use crate::store::{Store, StoreError};
use redis::streams::StreamInfoGroupsReply;

/// The `workers` group's pending count and lag on `stream`; `None` for a stream without it.
async fn group_counts(
    store: &Store,
    stream: &str,
) -> Result<Option<(u64, Option<u64>)>, StoreError> {
    let mut cmd = redis::cmd("XINFO");
    cmd.arg("GROUPS").arg(stream);
    let reply: StreamInfoGroupsReply = store.query(&cmd).await?;
    Ok(reply
        .groups
        .into_iter()
        .find(|g| g.name == WORKER_GROUP)
        .map(|g| (g.pending as u64, g.lag.map(|l| l as u64))))
}

/// A shard's jobs waiting and running: its group's lag and pending count, or, for a stream
/// no worker has made the group in yet, every entry waiting. What `free-roam queue shards`
/// and `/metrics` count, per shard.
pub async fn shard_depth(store: &Store, shard: u32) -> Result<(u64, u64), StoreError> {
    let stream = store.keys().shard(shard).jobs();
    let mut pipe = redis::pipe();
    pipe.cmd("EXISTS").arg(&stream).cmd("XLEN").arg(&stream);
    // The group lives in the stream: no stream, no job of the shard waits or runs.
    let (exists, length): (bool, u64) = store.pipe(&pipe).await?;
    if !exists {
        return Ok((0, 0));
    }
    Ok(match group_counts(store, &stream).await? {
        // The lag is unknown to the server after some deletions; the entries not pending
        // are then the waiting ones (a finished entry is deleted).
        Some((pending, lag)) => (lag.unwrap_or(length.saturating_sub(pending)), pending),
        None => (length, 0),
    })
}

/// The jobs waiting and running in all the fleet's queue shards, as `/metrics` reports
/// them ([`shard_depth`] of each shard, added up).
pub async fn queue_depth(store: &Store) -> Result<(u64, u64), StoreError> {
    let (mut waiting, mut running) = (0u64, 0u64);
    for shard in 0..store.queue_shards().await? {
        let (w, r) = shard_depth(store, shard).await?;
        waiting += w;
        running += r;
    }
    Ok((waiting, running))
}
