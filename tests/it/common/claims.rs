//! Claims made by hand, as a worker's claim loop and reclaim pass make them: for tests that
//! stand in for a worker that then goes quiet.

/// How long the sweeper role stays with a hand-made ticker after its tick: three of a
/// worker's default heartbeats, as `QueueSettings::sweeper_hold` gives.
pub const SWEEPER_HOLD_MS: u64 = 3000;

/// Reads up to `count` new entries of `store`'s shard as `worker` and claims them; the
/// entry ids claimed to run.
pub async fn read_and_claim_in(store: &free_roam::store::Store, worker: &str) -> Vec<String> {
    let cmd = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(free_roam::store::keys::WORKER_GROUP)
        .arg(worker)
        .arg("COUNT")
        .arg(10)
        .arg("STREAMS")
        .arg(store.keys().jobs())
        .arg(">")
        .to_owned();
    let reply: redis::Value = store.query(&cmd).await.unwrap();
    let entries = free_roam::queue::entries::parse_read_reply(&reply);
    claim_all(store, worker, entries).await
}

pub async fn claim_all(
    store: &free_roam::store::Store,
    worker: &str,
    entries: Vec<free_roam::queue::entries::Entry>,
) -> Vec<String> {
    use free_roam::job::JobSpec;
    use free_roam::store::functions::{self, ClaimEntry, ClaimVerdict};
    let specs: Vec<JobSpec> = entries
        .iter()
        .map(|e| JobSpec::parse(&e.id, &e.fields, 2.0, || e.id.clone()).unwrap())
        .collect();
    let fields: Vec<_> = specs.iter().map(JobSpec::hash_fields).collect();
    let batch: Vec<ClaimEntry<'_>> = specs
        .iter()
        .zip(&fields)
        .map(|(s, f)| ClaimEntry {
            entry_id: &s.entry_id,
            job_id: &s.job_id,
            fields: f,
        })
        .collect();
    let verdicts = functions::claim(store, worker, 3, &batch).await.unwrap();
    specs
        .iter()
        .zip(verdicts)
        .filter(|(_, v)| matches!(v, ClaimVerdict::Run { .. }))
        .map(|(s, _)| s.entry_id.clone())
        .collect()
}
