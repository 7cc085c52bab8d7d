//! Runs the stream job body outside the worker, for scripts/bench-ingest: N jobs on one
//! stream URL at once, every frame going to the null model, results written to Redis.
//! Prints one JSON line with the results, the peak resident memory of this process plus its
//! ffmpeg children (sampled every 20 ms), and this process's own peak.
//!
//! Usage: `bench_ingest URL [STREAMS] [FPS]`, settings from the environment (REDIS_URL,
//! MAX_FRAME_SIDE, ...), as the worker reads them.

use free_roam::config::Config;
use free_roam::engine::Engine;
use free_roam::job::JobSpec;
use free_roam::metrics::Metrics;
use free_roam::model::testing::null::NullModel;
use free_roam::pipeline::StreamJobBody;
use free_roam::prompt::PromptFollow;
use free_roam::prompt::PromptRef;
use free_roam::queue::body::{JobBody, JobContext};
use free_roam::queue::stop::StopSignal;
use free_roam::results::ResultSink;
use free_roam::results::ResumeState;
use free_roam::store::Store;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A memory figure in KiB of one process (`VmRSS`, `VmHWM`), from /proc.
fn status_kib(pid: &str, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn rss_kib(pid: &str) -> u64 {
    status_kib(pid, "VmRSS:")
}

/// This process's resident memory plus that of its direct children.
fn total_rss_kib() -> u64 {
    let mut total = rss_kib("self");
    if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
        for t in tasks.flatten() {
            let children = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
            total += children.split_whitespace().map(rss_kib).sum::<u64>();
        }
    }
    total
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let Some(url) = args.get(1).cloned() else {
        eprintln!("usage: bench_ingest URL [STREAMS] [FPS]");
        std::process::exit(2);
    };
    let streams: usize = args
        .get(2)
        .map_or(1, |s| s.parse().expect("STREAMS is a number"));
    let fps = args.get(3).cloned().unwrap_or_else(|| "2".into());
    let config = match Config::from_lookup(&|k| std::env::var(k).ok()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("bench_ingest: {e}");
            std::process::exit(2);
        }
    };

    let peak = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, done) = (peak.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                peak.fetch_max(total_rss_kib(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let started = Instant::now();
    let (results, failures) = runtime.block_on(async {
        let store =
            Store::new(&config.redis.url, &config.redis.key_prefix, 16).expect("a redis url");
        let metrics = Arc::new(Metrics::default());
        let engine = Engine::start(
            Box::new(NullModel::new(224)),
            config.engine.clone(),
            metrics.clone(),
        );
        let body = Arc::new(StreamJobBody::new(
            &config.pipeline,
            &config.source,
            engine.clone(),
            store.clone(),
            metrics,
        ));
        let run_id = uuid::Uuid::new_v4().simple().to_string();
        let mut tasks = Vec::new();
        for i in 0..streams {
            let job_id = format!("bench-{}-{i}", &run_id[..8]);
            let fields: Vec<(Vec<u8>, Vec<u8>)> = [
                ("stream_ref", url.as_str()),
                ("fps", &fps),
                ("job_id", &job_id),
            ]
            .iter()
            .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
            .collect();
            let spec = JobSpec::parse("0-1", &fields, config.queue.default_fps, || job_id.clone())
                .expect("a valid job");
            let stop = StopSignal::new();
            let ctx = JobContext {
                sink: ResultSink::new(
                    store.clone(),
                    &job_id,
                    config.queue.results_maxlen,
                    stop.clone(),
                    0,
                ),
                spec: Arc::new(spec),
                resume: ResumeState::default(),
                stop,
                prompt: PromptFollow::Fixed(PromptRef {
                    text: "bench".into(),
                    version: None,
                }),
            };
            let body = body.clone();
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                let outcome = body.run(ctx).await;
                let results_key = store.keys().results(&job_id);
                let n: u64 = store
                    .query(redis::cmd("XLEN").arg(&results_key))
                    .await
                    .unwrap_or(0);
                let _: Result<(), _> = store
                    .query(
                        redis::cmd("DEL")
                            .arg(&results_key)
                            .arg(store.keys().job(&job_id)),
                    )
                    .await;
                (outcome, n)
            }));
        }
        let mut results = Vec::new();
        let mut failures = Vec::new();
        for t in tasks {
            let (outcome, n) = t.await.expect("job task");
            results.push(n);
            if let Err(e) = outcome {
                failures.push(e.message);
            }
        }
        tokio::task::spawn_blocking(move || engine.shutdown(Duration::from_secs(5)))
            .await
            .expect("engine shutdown");
        (results, failures)
    });
    let wall = started.elapsed().as_secs_f64();
    done.store(true, Ordering::Relaxed);
    let _ = sampler.join();
    println!(
        "{}",
        serde_json::json!({
            "streams": streams,
            "results": results,
            "failures": failures,
            "wall_s": (wall * 100.0).round() / 100.0,
            "peak_rss_kib": peak.load(Ordering::Relaxed),
            "self_peak_rss_kib": status_kib("self", "VmHWM:"),
        })
    );
    if !failures.is_empty() {
        std::process::exit(1);
    }
}
