//! Queue shards from the user's side, against a real Redis and no worker: the fleet's shard
//! count and the rule for changing it, jobs queued in their own shard and found, cancelled
//! and listed there, and the queue's depth over every shard.

use crate::common::process::{run_cli as run, stderr, stdout};
use crate::common::{TestRedis, unique_prefix};
use free_roam::client::{self, ClientError};
use free_roam::store::Store;
use free_roam::store::keys::{Keys, MAX_QUEUE_SHARDS, WORKER_GROUP, shard_of_job};
use std::process::Output;

fn json(o: &Output) -> serde_json::Value {
    assert_eq!(o.status.code(), Some(0), "{}", stderr(o));
    serde_json::from_str(&stdout(o)).unwrap_or_else(|e| panic!("{e}: {}", stdout(o)))
}

/// The first id of `cam-<n>` whose shard among `shards` is `shard`.
fn id_in_shard(shards: u32, shard: u32, taken: &[String]) -> String {
    (0..)
        .map(|n| format!("cam-{n}"))
        .find(|id| shard_of_job(id, shards) == shard && !taken.contains(id))
        .unwrap()
}

/// Sets three shards with the library and queues one job in each shard of `shards`, in
/// order; returns their ids.
async fn submit_in_shards(store: &Store, shards: &[u32]) -> Vec<String> {
    client::set_queue_shards(store, 3).await.unwrap();
    let mut ids: Vec<String> = Vec::new();
    for &shard in shards {
        let id = id_in_shard(3, shard, &ids);
        let fields = vec![
            (free_roam::job::JobField::StreamRef, "cam:1".to_string()),
            (free_roam::job::JobField::JobId, id.clone()),
        ];
        assert_eq!(client::submit(store, &fields).await.unwrap(), id);
        ids.push(id);
    }
    ids
}

/// The job ids of a stream's entries.
fn stream_jobs(redis: &TestRedis, key: &str) -> Vec<String> {
    redis
        .xrange(key)
        .into_iter()
        .filter_map(|(_, f)| f.get("job_id").cloned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_count_reads_one_when_unset_and_must_be_in_range() {
    let redis = TestRedis::start();
    let p = unique_prefix();
    let store = Store::new(&redis.url(), &p, 4).unwrap();
    assert_eq!(store.queue_shards().await.unwrap(), 1);
    let v = json(&run(&redis, &p, &["queue", "shards", "--json"]));
    assert_eq!(v["queue_shards"], 1);
    assert_eq!(v["shards"].as_array().unwrap().len(), 1);
    assert_eq!(v["shards"][0]["stream"], format!("{{{p}}}:jobs"));
    assert_eq!(v["shards"][0]["waiting"], 0);

    for bad in [0, MAX_QUEUE_SHARDS + 1] {
        let e = client::set_queue_shards(&store, bad).await.unwrap_err();
        assert!(
            matches!(e, ClientError::ShardCount { given, max } if given == bad && max == MAX_QUEUE_SHARDS),
            "{e}"
        );
        let o = run(&redis, &p, &["queue", "shards", &bad.to_string()]);
        assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    }
    assert_eq!(store.queue_shards().await.unwrap(), 1, "nothing written");
    let change = client::set_queue_shards(&store, MAX_QUEUE_SHARDS)
        .await
        .unwrap();
    assert_eq!((change.previous, change.now), (1, MAX_QUEUE_SHARDS));
    assert_eq!(store.queue_shards().await.unwrap(), MAX_QUEUE_SHARDS);
}

/// Sets three shards with the CLI and submits jobs to each of them (one with a generated
/// id); returns their ids.
fn submit_to_three_shards(redis: &TestRedis, p: &str) -> Vec<String> {
    let o = run(redis, p, &["queue", "shards", "3"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).contains("3 (was 1)"), "{}", stdout(&o));
    let mut ids: Vec<String> = Vec::new();
    for shard in [0, 1, 2, 1, 2, 0, 2] {
        let id = id_in_shard(3, shard, &ids);
        let o = run(
            redis,
            p,
            &["submit", "--stream-ref", "cam:1", "--job-id", &id],
        );
        assert_eq!(stdout(&o).trim(), id, "{}", stderr(&o));
        ids.push(id);
    }
    let v = json(&run(
        redis,
        p,
        &["submit", "--stream-ref", "cam:2", "--json"],
    ));
    ids.push(v["job_id"].as_str().unwrap().to_string());
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_job_is_queued_in_its_own_shard_and_found_there() {
    let redis = TestRedis::start();
    let p = unique_prefix();
    let keys = Keys::new(&p);
    let ids = submit_to_three_shards(&redis, &p);
    for id in &ids {
        let home = shard_of_job(id, 3);
        for shard in 0..3 {
            let here = keys.shard(shard);
            let in_stream = stream_jobs(&redis, &here.jobs()).contains(id);
            let status = redis.hget(&here.job(id), "status");
            if shard == home {
                assert!(in_stream, "{id} in {}", here.jobs());
                assert_eq!(status.as_deref(), Some("queued"), "{id}");
            } else {
                assert!(!in_stream && status.is_none(), "{id} not in shard {shard}");
            }
        }
        let v = json(&run(&redis, &p, &["status", id, "--json"]));
        assert_eq!(v["status"], "queued", "{id}");
        assert_eq!(v["queue_shard"], home, "{id}");
        assert_eq!(v["results_key"], format!("{{{p}:{id}}}:results"));
    }
    let o = run(&redis, &p, &["status", "nowhere"]);
    assert_eq!(o.status.code(), Some(1));

    // No worker serves any shard: all of it waits, flagged.
    let v = json(&run(&redis, &p, &["queue", "shards", "--json"]));
    assert_eq!(v["queue_shards"], 3);
    let shards = v["shards"].as_array().unwrap();
    let waiting: u64 = shards.iter().map(|s| s["waiting"].as_u64().unwrap()).sum();
    assert_eq!(waiting, ids.len() as u64);
    for s in shards {
        assert_eq!(s["live_workers"], 0);
        assert_eq!(s["unserved"], true, "{s}");
    }
    let text = stdout(&run(&redis, &p, &["queue", "shards"]));
    assert!(text.starts_with("queue shards: 3\n"), "{text}");
    assert_eq!(text.matches("jobs and no live worker").count(), 3, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_is_cancelled_in_its_shard_and_every_shard_is_listed() {
    let redis = TestRedis::start();
    let p = unique_prefix();
    let keys = Keys::new(&p);
    let ids = submit_to_three_shards(&redis, &p);

    // A queued job of shard 1 ends there, with its end entry.
    let victim = ids[1].clone();
    let o = run(&redis, &p, &["cancel", &victim]);
    assert_eq!(
        stdout(&o).trim(),
        format!("{victim}: cancelled"),
        "{}",
        stderr(&o)
    );
    assert_eq!(
        redis.hget(&keys.shard(1).job(&victim), "status").as_deref(),
        Some("cancelled")
    );
    assert!(redis.hget(&keys.job(&victim), "status").is_none());
    let end = redis.xrange(&keys.results(&victim));
    assert_eq!(end.len(), 1);
    assert_eq!(end[0].1["kind"], "end");
    assert_eq!(end[0].1["status"], "cancelled");

    // Every shard's jobs in one list, newest first.
    let v = json(&run(&redis, &p, &["jobs", "--json", "--limit", "100"]));
    let listed = v.as_array().unwrap();
    let created: Vec<i64> = listed
        .iter()
        .map(|j| j["created_ms"].as_i64().unwrap())
        .collect();
    assert!(created.windows(2).all(|w| w[0] >= w[1]), "{created:?}");
    let mut seen: Vec<&str> = listed
        .iter()
        .map(|j| j["job_id"].as_str().unwrap())
        .collect();
    seen.sort();
    let mut all: Vec<&str> = ids.iter().map(String::as_str).collect();
    all.sort();
    assert_eq!(seen, all);
    let v = json(&run(
        &redis,
        &p,
        &["jobs", "--json", "--status", "cancelled"],
    ));
    assert_eq!(v.as_array().unwrap().len(), 1);
    assert_eq!(v[0]["job_id"], victim.as_str());
    assert_eq!(v[0]["queue_shard"], 1);
    let v = json(&run(&redis, &p, &["jobs", "--json", "--limit", "3"]));
    assert_eq!(v.as_array().unwrap().len(), 3);
    // The cancelled entry stays in its stream until a worker acks it.
    let (_, queues) = client::queue_overview(&Store::new(&redis.url(), &p, 2).unwrap())
        .await
        .unwrap();
    assert_eq!(
        queues[1].waiting,
        ids.iter().filter(|i| shard_of_job(i, 3) == 1).count() as u64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn growing_is_allowed_and_shrinking_waits_for_empty_shards() {
    let redis = TestRedis::start();
    let p = unique_prefix();
    let keys = Keys::new(&p);
    let store = Store::new(&redis.url(), &p, 4).unwrap();
    submit_in_shards(&store, &[0, 1, 2, 2]).await;
    let change = client::set_queue_shards(&store, 4).await.unwrap();
    assert_eq!((change.previous, change.now), (3, 4));

    // Shard 2 holds two jobs: a shrink to 2 is refused, naming it, and changes nothing.
    let busy = |e: ClientError| match e {
        ClientError::ShardBusy {
            shard,
            waiting,
            running,
            ..
        } => (shard, waiting, running),
        other => panic!("not a busy shard: {other}"),
    };
    let e = client::set_queue_shards(&store, 2).await.unwrap_err();
    assert_eq!(busy(e), (2, 2, 0));
    let o = run(&redis, &p, &["queue", "shards", "2"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("shard 2"), "{}", stderr(&o));
    assert_eq!(store.queue_shards().await.unwrap(), 4);

    // A worker reads both entries and the stream loses them: they still run (pending).
    let s2 = keys.shard(2);
    let _: String = redis.cmd(&["XGROUP", "CREATE", &s2.jobs(), WORKER_GROUP, "0"]);
    let read: redis::Value = redis.cmd(&[
        "XREADGROUP",
        "GROUP",
        WORKER_GROUP,
        "w1",
        "STREAMS",
        &s2.jobs(),
        ">",
    ]);
    assert!(matches!(read, redis::Value::Array(_)));
    let entries: Vec<String> = redis
        .xrange(&s2.jobs())
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    for entry in &entries {
        let _: i64 = redis.cmd(&["XDEL", &s2.jobs(), entry]);
    }
    let e = client::set_queue_shards(&store, 2).await.unwrap_err();
    assert_eq!(busy(e), (2, 0, 2));
    let (_, queues) = client::queue_overview(&store).await.unwrap();
    assert_eq!((queues[2].waiting, queues[2].running), (0, 2));

    // Once they are finished (acked), shard 2 is empty and the shrink goes through.
    for entry in &entries {
        let _: i64 = redis.cmd(&["XACK", &s2.jobs(), WORKER_GROUP, entry]);
    }
    let change = client::set_queue_shards(&store, 2).await.unwrap();
    assert_eq!((change.previous, change.now), (4, 2));
    let v = json(&run(&redis, &p, &["queue", "shards", "--json"]));
    assert_eq!(v["queue_shards"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_xadd_jobs_are_found_in_shard_zero_whatever_their_id() {
    let redis = TestRedis::start();
    let p = unique_prefix();
    let keys = Keys::new(&p);
    let store = Store::new(&redis.url(), &p, 4).unwrap();
    client::set_queue_shards(&store, 3).await.unwrap();

    // An entry without job_id: found by its entry id, in shard 0.
    let entry = redis
        .cli(&["XADD", &keys.jobs(), "*", "stream_ref", "cam:9"])
        .trim()
        .to_string();
    let v = json(&run(&redis, &p, &["status", &entry, "--json"]));
    assert_eq!(v["status"], "queued");
    assert_eq!(v["entry_id"], entry.as_str());
    assert_eq!(v["queue_shard"], 0);

    // One with a job_id whose own shard is another: found in shard 0, a second job of
    // that id refused, and its cancel done in shard 0.
    let id = id_in_shard(3, 2, &[]);
    redis.cli(&[
        "XADD",
        &keys.jobs(),
        "*",
        "stream_ref",
        "cam:9",
        "job_id",
        &id,
    ]);
    let v = json(&run(&redis, &p, &["status", &id, "--json"]));
    assert_eq!(v["queue_shard"], 0);
    let o = run(&redis, &p, &["cancel", &id]);
    assert_eq!(
        stdout(&o).trim(),
        format!("{id}: cancelled"),
        "{}",
        stderr(&o)
    );
    assert_eq!(
        redis.hget(&keys.job(&id), "status").as_deref(),
        Some("cancelled")
    );
    let o = run(
        &redis,
        &p,
        &["submit", "--stream-ref", "cam:1", "--job-id", &id],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("already exists"), "{}", stderr(&o));
    assert!(stream_jobs(&redis, &keys.shard(2).jobs()).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_depth_sums_every_shard() {
    let redis = TestRedis::start();
    let p = unique_prefix();
    let keys = Keys::new(&p);
    let store = Store::new(&redis.url(), &p, 4).unwrap();
    submit_in_shards(&store, &[0, 1, 1, 2]).await;
    assert_eq!(
        free_roam::store::depth::queue_depth(&store).await.unwrap(),
        (4, 0),
        "no group anywhere: all of it waits"
    );
    let s1 = keys.shard(1).jobs();
    let _: String = redis.cmd(&["XGROUP", "CREATE", &s1, WORKER_GROUP, "0"]);
    let _: redis::Value = redis.cmd(&[
        "XREADGROUP",
        "GROUP",
        WORKER_GROUP,
        "w1",
        "COUNT",
        "1",
        "STREAMS",
        &s1,
        ">",
    ]);
    assert_eq!(
        free_roam::store::depth::queue_depth(&store).await.unwrap(),
        (3, 1)
    );
}
