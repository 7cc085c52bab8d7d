//! The scaler's rule against a real Redis: KEDA's `streamLength` trigger on the jobs stream
//! (deploy/k8s/scaler.yaml) wants `ceil(XLEN / MAX_CONCURRENT_STREAMS)` replicas, and a
//! scale-down waits out a stabilisation window. No Kubernetes runs here, so this test plays
//! the autoscaler: every tick it reads the stream, computes the replicas wanted, and starts
//! or stops in-process workers to match, while long and short jobs start and finish.
//!
//! It shows that the replicas wanted never drop below what the running jobs need, that
//! scale-in loses no job, and that the group's lag (the old signal) would have.

use crate::common::worker::InProcessWorker;
use crate::common::{TestRedis, unique_prefix};
use free_roam::store::keys::{Keys, WORKER_GROUP};
use std::collections::VecDeque;
use std::time::{Duration, Instant};

const CAPACITY: u64 = 2;
const MIN_REPLICAS: u64 = 1;
const MAX_REPLICAS: u64 = 8;
/// The scale-down stabilisation window, shortened from the manifest's 300 s to fit a test.
const STABILISATION: Duration = Duration::from_millis(1500);
const TICK: Duration = Duration::from_millis(100);

/// KEDA's streamLength rule through the HPA: ceil(metric / target), within the bounds.
fn wanted_replicas(stream_length: u64) -> u64 {
    stream_length
        .div_ceil(CAPACITY)
        .clamp(MIN_REPLICAS, MAX_REPLICAS)
}

/// The jobs stream's length, and how many of its entries are delivered and not finished.
fn read_queue(redis: &TestRedis, keys: &Keys) -> (u64, u64) {
    let length: u64 = redis.cmd(&["XLEN", &keys.jobs()]);
    let summary: redis::Value = redis.cmd(&["XPENDING", &keys.jobs(), WORKER_GROUP]);
    let pending = match summary {
        redis::Value::Array(parts) => redis::from_redis_value(parts[0].clone()).unwrap(),
        other => panic!("XPENDING summary: {other:?}"),
    };
    (length, pending)
}

#[test]
fn wanted_replicas_round_up_within_the_bounds() {
    assert_eq!(wanted_replicas(0), 1);
    assert_eq!(wanted_replicas(1), 1);
    assert_eq!(wanted_replicas(3), 2);
    assert_eq!(wanted_replicas(4), 2);
    assert_eq!(wanted_replicas(100), MAX_REPLICAS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stream_length_never_wants_fewer_workers_than_running_jobs_need() {
    let redis = TestRedis::start();
    let prefix = unique_prefix();
    let keys = Keys::new(&prefix);
    let capacity = CAPACITY.to_string();
    let settings = [("MAX_CONCURRENT_STREAMS", capacity.as_str())];
    // (when, job id, results, ms between results): long cameras, a burst of short jobs
    // while they run, and a late long one after the burst has drained.
    let mut schedule: VecDeque<(u64, String, u64, u64)> = VecDeque::new();
    for i in 0..5 {
        schedule.push_back((0, format!("camera-{i}"), 30, 150));
    }
    for i in 0..6 {
        schedule.push_back((800, format!("short-{i}"), 3, 100));
    }
    schedule.push_back((3000, "camera-late".into(), 12, 150));
    let jobs: Vec<(String, u64)> = schedule.iter().map(|j| (j.1.clone(), j.2)).collect();
    // The queue exists before any worker does, as it would when the first one is scaled up.
    redis.cli(&[
        "XGROUP",
        "CREATE",
        &keys.jobs(),
        WORKER_GROUP,
        "0",
        "MKSTREAM",
    ]);

    let mut workers: Vec<InProcessWorker> = Vec::new();
    let mut started = 0;
    let mut history: VecDeque<(Instant, u64)> = VecDeque::new();
    let mut lag_rule_short = 0;
    let mut most_replicas = 0;
    let mut scale_ins = 0;
    let begin = Instant::now();
    loop {
        let now_ms = begin.elapsed().as_millis() as u64;
        while schedule.front().is_some_and(|j| j.0 <= now_ms) {
            let (_, id, n, pace) = schedule.pop_front().unwrap();
            redis.cli(&[
                "XADD",
                &keys.jobs(),
                "*",
                "stream_ref",
                &format!("paced:{n}:{pace}"),
                "job_id",
                &id,
            ]);
        }

        let (length, pending) = read_queue(&redis, &keys);
        let needed = pending.div_ceil(CAPACITY);
        let wanted = wanted_replicas(length);
        assert!(
            wanted >= needed,
            "at {now_ms} ms: XLEN {length} wants {wanted} workers, {pending} running jobs need {needed}"
        );
        // The old rule: the group's lag, entries not yet delivered to any worker.
        if (length - pending).div_ceil(CAPACITY).max(MIN_REPLICAS) < needed {
            lag_rule_short += 1;
        }

        // The HPA's scale-down stabilisation: the highest recommendation in the window.
        let now = Instant::now();
        history.push_back((now, wanted));
        while history
            .front()
            .is_some_and(|(t, _)| now - *t > STABILISATION)
        {
            history.pop_front();
        }
        let replicas = history.iter().map(|(_, w)| *w).max().unwrap();
        assert!(replicas >= needed);
        most_replicas = most_replicas.max(replicas);
        while (workers.len() as u64) < replicas {
            started += 1;
            workers.push(InProcessWorker::start(
                &redis,
                &prefix,
                &format!("w{started}"),
                &settings,
            ));
        }
        while (workers.len() as u64) > replicas {
            // Kubernetes picks any pod; its running jobs are handed back on SIGTERM.
            workers.remove(0).stop().await;
            scale_ins += 1;
        }

        if schedule.is_empty() && length == 0 {
            break;
        }
        assert!(
            begin.elapsed() < Duration::from_secs(60),
            "the jobs did not finish: XLEN {length}"
        );
        tokio::time::sleep(TICK).await;
    }

    // Scale-in lost nothing: every job completed with all its results.
    for (id, n) in &jobs {
        let hash = redis.hgetall(&keys.job(id));
        assert_eq!(hash["status"], "completed", "{id}: {hash:?}");
        let frames: Vec<String> = redis
            .xrange(&keys.results(id))
            .into_iter()
            .filter(|(_, f)| f["kind"] == "result")
            .map(|(_, f)| f["frame"].clone())
            .collect();
        let expected: Vec<String> = (0..*n).map(|i| i.to_string()).collect();
        assert_eq!(frames, expected, "{id}: each result once, in order");
    }
    eprintln!(
        "most replicas {most_replicas}, workers started {started}, scale-ins {scale_ins}, \
         ticks where the lag rule wanted too few: {lag_rule_short}"
    );
    assert!(most_replicas >= 5, "the burst scaled the fleet out");
    assert!(scale_ins > 0, "the fleet scaled back in");
    assert!(
        lag_rule_short > 0,
        "the lag falls to 0 while jobs run: scaling on it would evict them"
    );
    for w in workers {
        w.stop().await;
    }
}
