//! Queue throughput: N jobs pushed with pipelined XADD, consumed by one in-process worker
//! whose job body does nothing, through the full lifecycle (claim function, lease, end
//! entry, hash, event, ack and delete). Prints one line in the format the queue peers use:
//! `SYSTEM jobs=N produce_s=X consume_s=Y jobs_per_s=Z`, then the requests the worker sent per
//! job (counted by the store) and the Redis server's CPU time per job; then the claim
//! latency at idle (`XADD` to the job's `running` event, one job at a time), p50 and p99.
//!
//! Env: REDIS_URL (or REDIS_PORT), JOBS (default 10000), CONCURRENCY (default 8),
//! LATENCY_JOBS (default 200).

use free_roam::config::Config;
use free_roam::metrics::Metrics;
use free_roam::queue::body::{BodyFuture, BodyOutcome, JobBody, JobContext};
use free_roam::queue::{Worker, WorkerIdentity, WorkerState};
use free_roam::store::Store;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

struct NoopBody;

impl JobBody for NoopBody {
    fn run(&self, _ctx: JobContext) -> BodyFuture<'_> {
        Box::pin(async { Ok(BodyOutcome::Completed) })
    }
}

#[tokio::main]
async fn main() {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| {
        let port = std::env::var("REDIS_PORT").unwrap_or_else(|_| "6379".into());
        format!("redis://127.0.0.1:{port}/0")
    });
    let jobs: usize = std::env::var("JOBS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let latency_jobs: usize = std::env::var("LATENCY_JOBS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200)
        .max(1);
    let concurrency: usize = std::env::var("CONCURRENCY")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    let prefix = format!("bench{}", std::process::id());
    let settings: HashMap<&str, String> = HashMap::from([
        ("REDIS_URL", url.clone()),
        ("KEY_PREFIX", prefix.clone()),
        ("MODEL_TYPE", "null".into()),
        ("MAX_CONCURRENT_STREAMS", concurrency.to_string()),
        ("RESULT_TTL_S", "300".into()),
    ]);
    let config = Arc::new(Config::from_lookup(&|k| settings.get(k).cloned()).expect("config"));
    let store = Store::new(&url, &prefix, concurrency * 3 + 8).expect("store");
    store.load_functions().await.expect("functions");
    store.ensure_group().await.expect("group");

    let produce_start = Instant::now();
    for chunk in (0..jobs).collect::<Vec<_>>().chunks(1000) {
        let mut pipe = redis::pipe();
        for i in chunk {
            pipe.cmd("XADD")
                .arg(store.keys().jobs())
                .arg("*")
                .arg("stream_ref")
                .arg(format!("bench:{i}"))
                .ignore();
        }
        store.pipe::<()>(&pipe).await.expect("xadd");
    }
    let produce_s = produce_start.elapsed().as_secs_f64();

    let worker = Arc::new(Worker::new(
        store.clone(),
        Arc::new(config.queue.clone()),
        Arc::new(NoopBody),
        Arc::new(Metrics::default()),
        Arc::new(WorkerState::default()),
        WorkerIdentity {
            id: "bench".into(),
            model: "none".into(),
            device: "cpu".into(),
        },
    ));
    let shutdown = CancellationToken::new();
    let cpu_start = redis_cpu_s(&store).await;
    let trips_start = store.round_trips();
    let mut polls = 0u64;
    let consume_start = Instant::now();
    let handle = tokio::spawn(worker.run(shutdown.clone()));
    loop {
        let left: usize = store
            .query(redis::cmd("XLEN").arg(store.keys().jobs()))
            .await
            .expect("xlen");
        polls += 1;
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let consume_s = consume_start.elapsed().as_secs_f64();
    // Requests the worker sent (each command, pipeline or function call one), less this
    // loop's own polls; and the server's CPU time, less the two INFO calls' share (tiny).
    let trips = store.round_trips() - trips_start - polls;
    let cpu_s = redis_cpu_s(&store).await - cpu_start;
    let latency = claim_latency(&store, latency_jobs).await;
    shutdown.cancel();
    let _ = handle.await;
    println!(
        "free-roam-c{concurrency} jobs={jobs} produce_s={produce_s:.3} consume_s={consume_s:.3} jobs_per_s={:.0} requests_per_job={:.2} redis_cpu_us_per_job={:.1}",
        jobs as f64 / consume_s,
        trips as f64 / jobs as f64,
        cpu_s * 1e6 / jobs as f64
    );
    let ms = |q: f64| latency[((latency.len() - 1) as f64 * q).round() as usize] * 1e3;
    println!(
        "free-roam-c{concurrency} claim_latency_ms n={} p50={:.2} p99={:.2} max={:.2}",
        latency.len(),
        ms(0.5),
        ms(0.99),
        ms(1.0)
    );
    // Leave nothing behind on a shared server.
    let mut cursor = 0u64;
    loop {
        let (next, keys): (u64, Vec<String>) = store
            .query(
                redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(format!("{{{prefix}}}*"))
                    .arg("COUNT")
                    .arg(1000),
            )
            .await
            .expect("scan");
        if !keys.is_empty() {
            let _: () = store
                .query(redis::cmd("UNLINK").arg(&keys))
                .await
                .expect("unlink");
        }
        if next == 0 {
            break;
        }
        cursor = next;
    }
}

/// Claim latency at idle: `n` jobs submitted one at a time to the idle worker, each timed
/// from before its `XADD` to the moment its `running` event is read from the events stream
/// (sorted, in seconds).
async fn claim_latency(store: &Store, n: usize) -> Vec<f64> {
    let events = store.keys().events();
    let mut last: String = store
        .query::<redis::streams::StreamRangeReply>(
            redis::cmd("XREVRANGE")
                .arg(&events)
                .arg("+")
                .arg("-")
                .arg("COUNT")
                .arg(1),
        )
        .await
        .expect("xrevrange")
        .ids
        .first()
        .map(|e| e.id.clone())
        .unwrap_or_else(|| "0".into());
    let mut latencies = Vec::with_capacity(n);
    for i in 0..n {
        let job_id = format!("latency-{i}");
        let start = Instant::now();
        let _: String = store
            .query(
                redis::cmd("XADD")
                    .arg(store.keys().jobs())
                    .arg("*")
                    .arg("stream_ref")
                    .arg(format!("bench:latency:{i}"))
                    .arg("job_id")
                    .arg(&job_id),
            )
            .await
            .expect("xadd");
        'wait: loop {
            let reply: redis::streams::StreamReadReply = store
                .query_blocking(
                    redis::cmd("XREAD")
                        .arg("BLOCK")
                        .arg(5000)
                        .arg("STREAMS")
                        .arg(&events)
                        .arg(&last),
                )
                .await
                .expect("xread");
            assert!(
                !reply.keys.is_empty(),
                "no running event for {job_id} in 5 s"
            );
            for entry in reply.keys.iter().flat_map(|k| &k.ids) {
                last = entry.id.clone();
                let field = |name: &str| entry.get::<String>(name).unwrap_or_default();
                if field("job_id") == job_id && field("to") == "running" {
                    latencies.push(start.elapsed().as_secs_f64());
                    break 'wait;
                }
            }
        }
    }
    latencies.sort_by(f64::total_cmp);
    latencies
}

/// The server's CPU time so far (`used_cpu_user` + `used_cpu_sys`), in seconds.
async fn redis_cpu_s(store: &Store) -> f64 {
    let info: String = store
        .query(redis::cmd("INFO").arg("cpu"))
        .await
        .expect("info");
    info.lines()
        .filter_map(|l| l.split_once(':'))
        .filter(|(k, _)| *k == "used_cpu_user" || *k == "used_cpu_sys")
        .filter_map(|(_, v)| v.trim().parse::<f64>().ok())
        .sum()
}
