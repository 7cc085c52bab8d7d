//! Workers serving a queue split over shards (`queue_shards` in `{fr}:settings`): each job
//! runs in the shard it was queued in, every queue call about it stays there, a worker
//! serving some shards never claims in the others, and a dead worker's entries in a shard
//! go to a live worker serving that shard.

use crate::common::claims::{SWEEPER_HOLD_MS, read_and_claim_in};
use crate::common::worker::InProcessWorker;
use crate::common::{TestRedis, eventually, unique_prefix};
use free_roam::store::Store;
use free_roam::store::functions::{self, CallIn};
use free_roam::store::keys::{Keys, QUEUE_SHARDS_FIELD, WORKER_GROUP, shard_of_job};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(20);

fn set_shards(redis: &TestRedis, p: &str, shards: u32) {
    let _: i64 = redis.cmd(&[
        "HSET",
        &Keys::new(p).settings(),
        QUEUE_SHARDS_FIELD,
        &shards.to_string(),
    ]);
}

fn status(redis: &TestRedis, keys: &Keys, job: &str) -> Option<String> {
    redis.hget(&keys.job(job), "status")
}

/// How many entries of a shard's stream are delivered and not acknowledged.
fn pending(redis: &TestRedis, keys: &Keys) -> i64 {
    let reply: redis::Value = redis.cmd(&["XPENDING", &keys.jobs(), WORKER_GROUP]);
    match reply {
        redis::Value::Array(parts) => redis::from_redis_value(parts[0].clone()).unwrap(),
        other => panic!("XPENDING answered {other:?}"),
    }
}

fn alive(redis: &TestRedis, keys: &Keys) -> Vec<String> {
    redis.cmd(&["ZRANGE", &keys.workers_alive(), "0", "-1"])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_serves_every_shard_and_each_job_ends_in_its_own() {
    let redis = TestRedis::start();
    let p = unique_prefix();
    set_shards(&redis, &p, 3);
    let w = InProcessWorker::start(&redis, &p, "w1", &[]);
    let store = Store::new(&redis.url(), &p, 4).unwrap();
    let base = Keys::new(&p);
    for s in 0..3 {
        let fields = [("stream_ref", "paced:2:50".to_string())];
        functions::submit(&store.shard(s), &format!("job-{s}"), &fields)
            .await
            .unwrap();
    }
    // The front door for redis-cli users is shard 0's stream.
    let _: String = redis.cmd(&[
        "XADD",
        &base.jobs(),
        "*",
        "stream_ref",
        "paced:2:50",
        "job_id",
        "plain",
    ]);
    let jobs = [(0, "job-0"), (1, "job-1"), (2, "job-2"), (0, "plain")];
    eventually(WAIT, "every job completed in its shard", || {
        jobs.iter()
            .all(|(s, j)| status(&redis, &base.shard(*s), j).as_deref() == Some("completed"))
    })
    .await;
    for (s, job) in jobs {
        let shard = base.shard(s);
        let hash = redis.hgetall(&shard.job(job));
        assert_eq!(hash["attempts"], "1", "{job}: {hash:?}");
        assert_eq!(hash["worker"], "w1", "{job}: {hash:?}");
        // Its results are in the job's own tag, whatever the shard.
        let results: i64 = redis.cmd(&["XLEN", &base.results(job)]);
        assert!(results >= 2, "{job}: {results} results");
        for other in (0..3).filter(|o| *o != s) {
            assert!(
                redis.hgetall(&base.shard(other).job(job)).is_empty(),
                "{job} has a hash in shard {other} too"
            );
        }
    }
    for s in 0..3 {
        let shard = base.shard(s);
        assert_eq!(pending(&redis, &shard), 0, "shard {s}");
        assert_eq!(alive(&redis, &shard), vec!["w1".to_string()], "shard {s}");
        // The functions of each shard read that shard's copy of the settings.
        assert!(
            redis.hget(&shard.settings(), "result_ttl_s").is_some(),
            "shard {s}"
        );
    }
    assert_eq!(w.metrics.jobs_completed.get(), 4);
    w.stop().await;
    for s in 0..3 {
        let shard = base.shard(s);
        assert!(alive(&redis, &shard).is_empty(), "shard {s}: still leased");
        assert!(redis.hgetall(&shard.worker("w1")).is_empty(), "shard {s}");
    }
}

/// A worker id whose one served shard among `shards` is `shard`.
fn id_serving(shard: u32, shards: u32) -> String {
    (0..)
        .map(|i| format!("w{i}"))
        .find(|id| shard_of_job(id, shards) == shard)
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_serving_one_shard_claims_there_only_and_takes_a_dead_workers_entry_there() {
    let redis = TestRedis::start();
    let p = unique_prefix();
    set_shards(&redis, &p, 2);
    let store = Store::new(&redis.url(), &p, 4).unwrap();
    store.load_functions().await.unwrap();
    let base = Keys::new(&p);
    let (zero, one) = (store.shard(0), store.shard(1));
    for shard in [&zero, &one] {
        shard.ensure_group().await.unwrap();
    }
    // A worker that claimed a job in shard 1, ticked once with a 1.5 s lease, and died.
    let fields = [("stream_ref", "paced:2:50".to_string())];
    functions::submit(&one, "held", &fields).await.unwrap();
    assert_eq!(read_and_claim_in(&one, "ghost").await.len(), 1);
    let call_in = CallIn {
        quiet_ms: 60_000,
        lease_ms: 1500,
    };
    functions::tick(&one, "ghost", call_in, SWEEPER_HOLD_MS, &[])
        .await
        .unwrap();
    // A job in shard 0, which no worker serves.
    functions::submit(&zero, "elsewhere", &fields)
        .await
        .unwrap();

    let id = id_serving(1, 2);
    let w = InProcessWorker::start(
        &redis,
        &p,
        &id,
        &[("QUEUE_SHARDS_SERVED", "1"), ("JOB_LEASE_MS", "1500")],
    );
    eventually(
        WAIT,
        "the dead worker's job completed by the live one",
        || status(&redis, &base.shard(1), "held").as_deref() == Some("completed"),
    )
    .await;
    let hash = redis.hgetall(&base.shard(1).job("held"));
    assert_eq!(hash["attempts"], "2", "{hash:?}");
    assert_eq!(hash["worker"], id, "{hash:?}");
    assert_eq!(w.metrics.jobs_reclaimed.get(), 1);
    // Shard 0's job waits for a worker serving shard 0: this one never read it.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        status(&redis, &base.shard(0), "elsewhere").as_deref(),
        Some("queued")
    );
    assert_eq!(pending(&redis, &base.shard(0)), 0);
    assert!(alive(&redis, &base.shard(0)).is_empty());
    assert_eq!(alive(&redis, &base.shard(1)), vec![id.clone()]);
    w.stop().await;
}

/// The shard count is fleet-wide: a worker serving all shards (the default) starts serving
/// the shards a larger count adds within 30 ticks, while its running jobs go on. No job is
/// lost or run twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_shard_count_grown_under_running_jobs_loses_no_job() {
    let redis = TestRedis::start();
    let p = unique_prefix();
    let base = Keys::new(&p);
    let store = Store::new(&redis.url(), &p, 4).unwrap();
    let w = InProcessWorker::start(&redis, &p, "w1", &[]);
    let long = [("stream_ref", "paced:30:100".to_string())];
    for job in ["a", "b"] {
        functions::submit(&store, job, &long).await.unwrap();
    }
    eventually(WAIT, "the first jobs running", || {
        ["a", "b"]
            .iter()
            .all(|j| status(&redis, &base, j).as_deref() == Some("running"))
    })
    .await;
    assert_eq!(w.state.queue_shards(), Some((1, vec![0])));

    set_shards(&redis, &p, 2);
    let short = [("stream_ref", "paced:2:50".to_string())];
    functions::submit(&store.shard(1), "c", &short)
        .await
        .unwrap();
    functions::submit(&store, "d", &short).await.unwrap();
    // 30 ticks of 200 ms (RECLAIM_INTERVAL_MS in the tests) to see the new count.
    eventually(WAIT, "the new shard's job run", || {
        status(&redis, &base.shard(1), "c").as_deref() == Some("completed")
    })
    .await;
    assert_eq!(w.state.queue_shards(), Some((2, vec![0, 1])));
    assert_eq!(alive(&redis, &base.shard(1)), vec!["w1".to_string()]);
    assert!(
        redis
            .hget(&base.shard(1).settings(), "result_ttl_s")
            .is_some(),
        "the worker's settings in the new shard"
    );
    eventually(WAIT, "the other jobs ended", || {
        ["a", "b", "d"]
            .iter()
            .all(|j| status(&redis, &base, j).as_deref() == Some("completed"))
    })
    .await;
    for job in ["a", "b", "d"] {
        let hash = redis.hgetall(&base.job(job));
        assert_eq!(hash["attempts"], "1", "{job}: {hash:?}");
    }
    assert_eq!(w.metrics.jobs_completed.get(), 4);
    w.stop().await;
}
