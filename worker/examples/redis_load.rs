//! What the worker costs Redis: commands and server CPU time per result written, per running
//! job per second (leases, heartbeats, reclaim passes), and per job lifecycle, read from
//! `INFO commandstats` and `INFO cpu` around each phase. Drives the real worker code.
//!
//! Env: REDIS_URL (or REDIS_PORT), RESULTS (default 5000), RUNNING (default 30),
//! SECONDS (default 10), JOBS (default 2000). Run it against a Redis nothing else uses.

use free_roam::config::Config;
use free_roam::metrics::Metrics;
use free_roam::queue::body::{BodyFuture, BodyOutcome, JobBody, JobContext};
use free_roam::queue::stop::StopSignal;
use free_roam::queue::{Worker, WorkerIdentity, WorkerState};
use free_roam::results::{FrameOutcome, Progress, ResultEntry, ResultSink};
use free_roam::store::Store;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Waits until stopped, writing nothing: a running job's fixed cost.
struct IdleBody;

impl JobBody for IdleBody {
    fn run(&self, ctx: JobContext) -> BodyFuture<'_> {
        Box::pin(async move {
            ctx.stop.stopped().await;
            Ok(BodyOutcome::Stopped)
        })
    }
}

/// Writes one result and completes: the lifecycle with the least work in it.
struct OneResultBody;

impl JobBody for OneResultBody {
    fn run(&self, ctx: JobContext) -> BodyFuture<'_> {
        Box::pin(async move {
            let entry = sample_entry(0);
            let progress = Progress::default();
            let _ = ctx.sink.write(&[entry], &progress).await;
            Ok(BodyOutcome::Completed)
        })
    }
}

/// A CLIP-sized result: a label list with scores, about 300 bytes of JSON.
fn sample_entry(frame: u64) -> ResultEntry {
    let output = serde_json::json!({
        "labels": [
            {"label": "a person walking", "score": 0.61},
            {"label": "a parked car", "score": 0.22},
            {"label": "an empty street", "score": 0.09},
            {"label": "a delivery van", "score": 0.05},
            {"label": "a cyclist", "score": 0.03}
        ],
        "top": "a person walking"
    });
    ResultEntry {
        frame,
        pts_ms: Some(frame as i64 * 500),
        capture_ms: free_roam::store::now_ms(),
        prompt_version: Some(1),
        model: Arc::from("clip"),
        latency_ms: 12.5,
        outcome: FrameOutcome::Output(output),
    }
}

/// One `INFO commandstats` + `INFO cpu` reading.
#[derive(Default)]
struct Sample {
    calls: BTreeMap<String, (u64, u64)>,
    cpu_us: u64,
}

async fn sample(store: &Store) -> Sample {
    let text: String = store
        .query(redis::cmd("INFO").arg("commandstats"))
        .await
        .expect("info");
    let mut s = Sample::default();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("cmdstat_") else {
            continue;
        };
        let Some((name, stats)) = rest.split_once(':') else {
            continue;
        };
        let field = |key: &str| {
            stats
                .split(',')
                .find_map(|kv| kv.strip_prefix(key))
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        s.calls
            .insert(name.to_string(), (field("calls="), field("usec=")));
    }
    let cpu: String = store
        .query(redis::cmd("INFO").arg("cpu"))
        .await
        .expect("info");
    let secs = |key: &str| {
        cpu.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    s.cpu_us = ((secs("used_cpu_sys:") + secs("used_cpu_user:")) * 1e6) as u64;
    s
}

/// Prints the commands and CPU between two samples, divided by `units`. Commands that a
/// function runs inside Redis are counted too (marked `in FCALL`): FCALL's own time
/// already includes theirs, so only the rows without the mark add up.
fn report(title: &str, unit: &str, units: f64, before: &Sample, after: &Sample, round_trips: u64) {
    println!("\n## {title} (per {unit}, {units} {unit}s)");
    println!("| command | calls | µs in command |");
    println!("| --- | ---: | ---: |");
    let inner = [
        "xack", "xdel", "xclaim", "xpending", "hget", "hmget", "hdel", "hincrby", "exists", "time",
        "zadd", "expire", "hsetnx", "xrange", "zrem", "lpush",
    ];
    let has_fcall = after.calls.contains_key("fcall");
    for (name, (calls, usec)) in &after.calls {
        let (c0, u0) = before.calls.get(name).copied().unwrap_or((0, 0));
        let (dc, du) = (calls - c0, usec - u0);
        if dc == 0 || matches!(name.as_str(), "info" | "config|resetstat" | "xlen") {
            continue;
        }
        let mark = if has_fcall && inner.contains(&name.as_str()) {
            " (in FCALL)"
        } else {
            ""
        };
        println!(
            "| {name}{mark} | {:.2} | {:.1} |",
            dc as f64 / units,
            du as f64 / units
        );
    }
    println!(
        "| **redis-server CPU (user+sys)** | | **{:.1}** |",
        (after.cpu_us - before.cpu_us) as f64 / units
    );
    println!(
        "| client round trips | {:.2} | |",
        round_trips as f64 / units
    );
}

fn env_num(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn worker(store: &Store, url: &str, prefix: &str, cap: usize, body: Arc<dyn JobBody>) -> Worker {
    let settings: HashMap<&str, String> = HashMap::from([
        ("REDIS_URL", url.to_string()),
        ("KEY_PREFIX", prefix.to_string()),
        ("MODEL_TYPE", "null".into()),
        ("MAX_CONCURRENT_STREAMS", cap.to_string()),
        ("RESULT_TTL_S", "300".into()),
    ]);
    let config = Arc::new(Config::from_lookup(&|k| settings.get(k).cloned()).expect("config"));
    Worker::new(
        store.clone(),
        Arc::new(config.queue.clone()),
        body,
        Arc::new(Metrics::default()),
        Arc::new(WorkerState::default()),
        WorkerIdentity {
            id: format!("load-{cap}"),
            model: "none".into(),
            device: "cpu".into(),
        },
    )
}

async fn push_jobs(store: &Store, n: usize, tag: &str) {
    for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
        let mut pipe = redis::pipe();
        for i in chunk {
            pipe.cmd("XADD")
                .arg(store.keys().jobs())
                .arg("*")
                .arg("stream_ref")
                .arg(format!("load:{i}"))
                .arg("job_id")
                .arg(format!("{tag}-{i}"))
                .ignore();
        }
        store.pipe::<()>(&pipe).await.expect("xadd");
    }
}

async fn wait_until<F: Fn(usize) -> bool>(store: &Store, key: String, done: F) {
    loop {
        let n: usize = store
            .query(redis::cmd("XLEN").arg(&key))
            .await
            .expect("xlen");
        if done(n) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::main]
async fn main() {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| {
        let port = std::env::var("REDIS_PORT").unwrap_or_else(|_| "6379".into());
        format!("redis://127.0.0.1:{port}/0")
    });
    let results = env_num("RESULTS", 5000);
    let running = env_num("RUNNING", 30);
    let seconds = env_num("SECONDS", 10);
    let jobs = env_num("JOBS", 2000);
    let prefix = "load";
    let store = Store::new(&url, prefix, 64).expect("store");
    // Readings and setup go through their own handle, so `store` counts the worker's trips.
    let probe = Store::new(&url, prefix, 4).expect("store");
    probe.load_functions().await.expect("functions");
    probe.ensure_group().await.expect("group");
    let reset = || async {
        let _: () = probe
            .query(redis::cmd("CONFIG").arg("RESETSTAT"))
            .await
            .expect("resetstat");
    };

    // 0. The server's own idle cost (its timers), to subtract from the running-jobs phase.
    let before = sample(&probe).await;
    tokio::time::sleep(Duration::from_secs(seconds as u64)).await;
    let after = sample(&probe).await;
    println!(
        "\nidle redis-server CPU: {:.0} µs per second",
        (after.cpu_us - before.cpu_us) as f64 / seconds as f64
    );

    // 1. Result writes, one entry per write as a 2-FPS stream makes them.
    let sink = ResultSink::new(store.clone(), "load-results", 10_000, StopSignal::new(), 0);
    reset().await;
    let before = sample(&probe).await;
    let trips0 = store.round_trips();
    for frame in 0..results as u64 {
        sink.write(&[sample_entry(frame)], &Progress::default())
            .await
            .expect("write");
    }
    let trips = store.round_trips() - trips0;
    let after = sample(&probe).await;
    report(
        "Result writes",
        "result",
        results as f64,
        &before,
        &after,
        trips,
    );

    // 2. Running jobs that write nothing: leases, heartbeats, reclaim passes.
    let w = Arc::new(worker(
        &store,
        &url,
        prefix,
        running,
        Arc::new(IdleBody) as Arc<dyn JobBody>,
    ));
    let state = w.state();
    let shutdown = CancellationToken::new();
    let handle = tokio::spawn(w.run(shutdown.clone()));
    push_jobs(&probe, running, "idle").await;
    while state.running_jobs() < running {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    reset().await;
    let before = sample(&probe).await;
    let trips0 = store.round_trips();
    let start = Instant::now();
    tokio::time::sleep(Duration::from_secs(seconds as u64)).await;
    let elapsed = start.elapsed().as_secs_f64();
    let trips = store.round_trips() - trips0;
    let after = sample(&probe).await;
    report(
        "Running jobs",
        "running job-second",
        running as f64 * elapsed,
        &before,
        &after,
        trips,
    );
    for id in (0..running).map(|i| format!("idle-{i}")) {
        let _: String = probe.fcall("fr_cancel", &[&id]).await.expect("cancel");
    }
    wait_until(&probe, probe.keys().jobs(), |n| n == 0).await;
    shutdown.cancel();
    let _ = handle.await;

    // 3. Whole lifecycles: claim, one result, end entry, ack, with the body doing nothing else.
    let w = Arc::new(worker(
        &store,
        &url,
        prefix,
        32,
        Arc::new(OneResultBody) as Arc<dyn JobBody>,
    ));
    push_jobs(&probe, jobs, "life").await;
    reset().await;
    let before = sample(&probe).await;
    let trips0 = store.round_trips();
    let shutdown = CancellationToken::new();
    let handle = tokio::spawn(w.run(shutdown.clone()));
    wait_until(&probe, probe.keys().jobs(), |n| n == 0).await;
    let trips = store.round_trips() - trips0;
    let after = sample(&probe).await;
    shutdown.cancel();
    let _ = handle.await;
    report(
        "Job lifecycle with one result",
        "job",
        jobs as f64,
        &before,
        &after,
        trips,
    );
}
