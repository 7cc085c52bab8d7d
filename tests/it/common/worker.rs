//! A test job body and an in-process worker running it. The body's `stream_ref` says what
//! to do: `paced:N:MS` writes N results MS apart (resuming after the results already
//! written), `fail:MSG` fails, `hang` ignores every stop request, `panic` panics.

use super::TestRedis;
use free_roam::config::Config;
use free_roam::engine::Engine;
use free_roam::metrics::Metrics;
use free_roam::model::VisionLanguageModel;
use free_roam::pipeline::StreamJobBody;
use free_roam::queue::body::{BodyFuture, BodyOutcome, JobBody, JobContext, JobFailure};
use free_roam::queue::{Worker, WorkerIdentity, WorkerState};
use free_roam::results::{FrameOutcome, Progress, ResultEntry};
use free_roam::store::Store;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

pub struct TestBody;

impl JobBody for TestBody {
    fn run(&self, ctx: JobContext) -> BodyFuture<'_> {
        Box::pin(async move {
            let stream_ref = ctx.spec.stream_ref.clone();
            let mut parts = stream_ref.splitn(3, ':');
            match parts.next().unwrap_or_default() {
                "paced" => {
                    let n: u64 = parts.next().unwrap().parse().unwrap();
                    let ms: u64 = parts.next().unwrap().parse().unwrap();
                    let model: Arc<str> = Arc::from("test-body");
                    for i in ctx.resume.results..n {
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_millis(ms)) => {}
                            _ = ctx.stop.stopped() => return Ok(BodyOutcome::Stopped),
                        }
                        let prompt = ctx.prompt.current();
                        let entry = ResultEntry {
                            frame: i,
                            pts_ms: Some(i as i64 * 500),
                            capture_ms: free_roam::store::now_ms(),
                            prompt_version: prompt.version,
                            model: model.clone(),
                            latency_ms: 1.0,
                            outcome: FrameOutcome::Output(
                                serde_json::json!({"i": i, "prompt": &*prompt.text}),
                            ),
                        };
                        let progress = Progress {
                            cursor: Some(i.to_string()),
                            ..Default::default()
                        };
                        if ctx.sink.write(&[entry], &progress).await.is_err() {
                            return Ok(BodyOutcome::Stopped);
                        }
                    }
                    Ok(BodyOutcome::Completed)
                }
                "fail" => Err(JobFailure::new(
                    parts.next().unwrap_or("failed").to_string(),
                )),
                "hang" => std::future::pending().await,
                "panic" => panic!("the test body panics"),
                other => Err(JobFailure::new(format!("unknown test body {other}"))),
            }
        })
    }
}

pub fn config(url: &str, prefix: &str, overrides: &[(&str, &str)]) -> Config {
    let mut map: HashMap<String, String> = HashMap::from([
        ("REDIS_URL".to_string(), url.to_string()),
        ("KEY_PREFIX".to_string(), prefix.to_string()),
        ("MODEL_TYPE".to_string(), "null".to_string()),
        ("RECLAIM_INTERVAL_MS".to_string(), "200".to_string()),
        ("SHUTDOWN_TIMEOUT_MS".to_string(), "3000".to_string()),
    ]);
    for (k, v) in overrides {
        map.insert(k.to_string(), v.to_string());
    }
    Config::from_lookup(&move |k| map.get(k).cloned()).expect("valid test config")
}

pub struct InProcessWorker {
    pub shutdown: CancellationToken,
    pub handle: tokio::task::JoinHandle<()>,
    pub metrics: Arc<Metrics>,
    pub state: Arc<WorkerState>,
}

impl InProcessWorker {
    pub fn start(redis: &TestRedis, prefix: &str, id: &str, overrides: &[(&str, &str)]) -> Self {
        let config = Arc::new(config(&redis.url(), prefix, overrides));
        let store = Store::new(&config.redis.url, &config.redis.key_prefix, 16).unwrap();
        let metrics = Arc::new(Metrics::default());
        let state = Arc::new(WorkerState::default());
        state.set_model(serde_json::json!({"name": "test-body"}));
        let identity = WorkerIdentity {
            id: id.to_string(),
            model: "test-body".into(),
            device: "cpu".into(),
        };
        let worker = Arc::new(Worker::new(
            store,
            Arc::new(config.queue.clone()),
            Arc::new(TestBody),
            metrics.clone(),
            state.clone(),
            identity,
        ));
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(worker.run(shutdown.clone()));
        Self {
            shutdown,
            handle,
            metrics,
            state,
        }
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(15), self.handle)
            .await
            .expect("worker stops within its shutdown timeout")
            .unwrap();
    }
}

/// A full worker in this process, wired as the binary wires it: the queue, the stream job
/// body and an engine running `model` (named in the worker's heartbeat by its own name).
pub struct StreamWorker {
    pub shutdown: CancellationToken,
    pub handle: tokio::task::JoinHandle<()>,
    pub metrics: Arc<Metrics>,
    pub engine: Engine,
}

impl StreamWorker {
    pub fn start(
        redis_url: &str,
        prefix: &str,
        id: &str,
        model: Box<dyn VisionLanguageModel>,
        overrides: &[(&str, &str)],
    ) -> Self {
        let config = config(redis_url, prefix, overrides);
        let store = Store::new(&config.redis.url, &config.redis.key_prefix, 16).unwrap();
        let metrics = Arc::new(Metrics::default());
        let identity = WorkerIdentity {
            id: id.to_string(),
            model: model.info().name.clone(),
            device: "cpu".into(),
        };
        let engine = Engine::start(model, config.engine.clone(), metrics.clone());
        let body = StreamJobBody::new(
            &config.pipeline,
            &config.source,
            engine.clone(),
            store.clone(),
            metrics.clone(),
        );
        let worker = Arc::new(Worker::new(
            store,
            Arc::new(config.queue.clone()),
            Arc::new(body),
            metrics.clone(),
            Arc::new(WorkerState::default()),
            identity,
        ));
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(worker.run(shutdown.clone()));
        Self {
            shutdown,
            handle,
            metrics,
            engine,
        }
    }

    /// Stops the worker (a job it runs is handed back), then its engine.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(15), self.handle).await;
        let engine = self.engine;
        tokio::task::spawn_blocking(move || engine.shutdown(Duration::from_secs(2)))
            .await
            .unwrap();
    }
}
