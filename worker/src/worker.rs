//! `free-roam worker`: logging, the model, the job body, the health endpoint, signals, and
//! the queue worker, wired together.

use crate::cli::ModelCommand;
use free_roam::config::{Config, LogFormat};
use free_roam::engine::{Engine, EngineSettings};
use free_roam::health::{self, HealthContext};
use free_roam::job::JobBody;
use free_roam::metrics::Metrics;
use free_roam::model::{ModelInfo, VisionLanguageModel};
use free_roam::pipeline::StreamJobBody;
use free_roam::queue::{Worker, WorkerIdentity, WorkerState, default_worker_id};
use free_roam::store::Store;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;
use tokio_util::sync::CancellationToken;

fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(format!(
            "{level},free_roam={level},free_roam_worker={level}",
            level = config.log_level
        ))
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match config.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

/// Runs the worker until SIGTERM/SIGINT; exits 0 after handing its jobs back.
pub async fn run(config: Config) -> ExitCode {
    init_logging(&config);
    let config = Arc::new(config);
    let metrics = Arc::new(Metrics::default());
    metrics.capacity.set(config.max_concurrent_streams as u64);
    let state = Arc::new(WorkerState::default());
    let worker_id = config.worker_id.clone().unwrap_or_else(default_worker_id);
    let store = match Store::for_config(&config, config.max_concurrent_streams * 3 + 8) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("free-roam: {e}");
            return ExitCode::from(2);
        }
    };

    let shutdown = CancellationToken::new();
    spawn_signal_handler(
        shutdown.clone(),
        config.shutdown_timeout + std::time::Duration::from_secs(5),
    );

    // The health endpoint is up while the model loads, and says it is not ready yet.
    let health_ctx = HealthContext {
        store: store.clone(),
        state: state.clone(),
        metrics: metrics.clone(),
        worker_id: worker_id.clone(),
        capacity: config.max_concurrent_streams,
        started: Instant::now(),
    };
    let health_stop = CancellationToken::new();
    let health_task = match health::serve(config.health_addr, health_ctx, health_stop.clone()).await
    {
        Ok((addr, task)) => {
            tracing::info!(%addr, "health endpoint listening");
            task
        }
        Err(e) => {
            eprintln!(
                "free-roam: cannot listen on HEALTH_ADDR={}: {e}",
                config.health_addr
            );
            return ExitCode::from(2);
        }
    };

    let model = {
        let config = config.clone();
        match tokio::task::spawn_blocking(move || load_model(&config)).await {
            Ok(Ok(m)) => m,
            Ok(Err(e)) => {
                eprintln!("free-roam: {e}");
                return ExitCode::from(2);
            }
            Err(e) => {
                eprintln!("free-roam: loading the model crashed: {e}");
                return ExitCode::from(1);
            }
        }
    };
    let info: ModelInfo = model.info().clone();
    tracing::info!(model = %info.name, device = %info.device, dtype = %info.dtype, "model loaded");
    if let Some(health) = model.backend_health() {
        state.set_backend_health(health);
    }
    state.set_model(serde_json::to_value(&info).unwrap_or_default());

    let (body, engine) = build_body(&config, model, store.clone(), metrics.clone());
    let identity = WorkerIdentity {
        id: worker_id,
        model: info.name.clone(),
        device: info.device.clone(),
    };
    let worker = Arc::new(Worker::new(
        store,
        config.clone(),
        body,
        metrics,
        state,
        identity,
    ));
    worker.run(shutdown).await;
    let engine_done =
        tokio::task::spawn_blocking(move || engine.shutdown(std::time::Duration::from_secs(2)));
    let _ = engine_done.await;
    health_stop.cancel();
    let _ = health_task.await;
    ExitCode::SUCCESS
}

fn spawn_signal_handler(shutdown: CancellationToken, bound: std::time::Duration) {
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            tracing::error!("cannot install signal handlers");
            return;
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: draining"),
            _ = int.recv() => tracing::info!("SIGINT: draining"),
        }
        shutdown.cancel();
        // The last resort behind SHUTDOWN_TIMEOUT_MS: a worker that cannot reach Redis to
        // hand its jobs back still exits; they are reclaimed after the lease.
        tokio::time::sleep(bound).await;
        tracing::error!("shutdown took too long; exiting without finishing the hand-back");
        std::process::exit(0);
    });
}

/// The model chosen by MODEL_TYPE.
fn load_model(config: &Config) -> Result<Box<dyn VisionLanguageModel>, String> {
    use free_roam::model::{DeviceChoice, DtypeChoice, ModelSettings, ModelType, load_model};
    if config.model_type == "null" {
        return Ok(Box::new(free_roam::model::null::NullModel::new(224)));
    }
    if config.model_type == "test-colour" {
        return Ok(Box::new(
            free_roam::model::colour_test::ColourTestModel::new(224),
        ));
    }
    let model_type: ModelType = config.model_type.parse().map_err(|e| format!("{e}"))?;
    let device: DeviceChoice = config.device.parse().map_err(|e| format!("{e}"))?;
    let dtype: DtypeChoice = config.dtype.parse().map_err(|e| format!("{e}"))?;
    let settings = ModelSettings {
        model_type,
        model_path: config.model_path.clone(),
        model_id: config.model_id.clone(),
        device,
        dtype,
        max_new_tokens: config.max_new_tokens,
        detect_threshold: config.detect_threshold,
        nms_iou: config.nms_iou,
        openai: config.openai.clone(),
    };
    load_model(&settings).map_err(|e| e.to_string())
}

/// The job body every job runs: sources, sampler and the shared inference engine.
fn build_body(
    config: &Arc<Config>,
    model: Box<dyn VisionLanguageModel>,
    store: Store,
    metrics: Arc<Metrics>,
) -> (Arc<dyn JobBody>, Engine) {
    let engine = Engine::start(model, EngineSettings::from_config(config), metrics.clone());
    let body = StreamJobBody::new(config, engine.clone(), store, metrics);
    (Arc::new(body), engine)
}

/// `free-roam model ...`.
pub fn model_command(cmd: ModelCommand) -> ExitCode {
    use free_roam::model::{ModelSize, ModelType, write_random_model};
    match cmd {
        ModelCommand::Make {
            kind,
            size,
            seed,
            dir,
        } => {
            let kind: ModelType = match kind.parse() {
                Ok(k) => k,
                Err(e) => {
                    eprintln!("free-roam: --type: {e}");
                    return ExitCode::from(2);
                }
            };
            let size: ModelSize = match size.parse() {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("free-roam: --size: {e}");
                    return ExitCode::from(2);
                }
            };
            match write_random_model(kind, size, seed, &dir) {
                Ok(()) => {
                    println!("{}", dir.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("free-roam: {e}");
                    ExitCode::from(1)
                }
            }
        }
    }
}
