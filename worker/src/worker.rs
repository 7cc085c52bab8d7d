//! `free-roam worker`: logging, the model, the job body, the health endpoint, signals, and
//! the queue worker, wired together.

use free_roam::config::{Config, LogFormat};
use free_roam::engine::Engine;
use free_roam::health::{self, HealthContext};
use free_roam::metrics::Metrics;
use free_roam::model::{ModelInfo, ModelSettings, VisionLanguageModel};
use free_roam::pipeline::StreamJobBody;
use free_roam::queue::body::JobBody;
use free_roam::queue::{Worker, WorkerIdentity, WorkerState, default_worker_id};
use free_roam::store::Store;
use std::ffi::OsStr;
use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;
use tokio_util::sync::CancellationToken;

fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(format!(
            "{level},free_roam={level},free_roam_worker={level}",
            level = config.log.level
        ))
    });
    let colour = log_colour(
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
    );
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    match config.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

/// Whether log lines carry ANSI colour codes: only on a terminal, so that a log file or a
/// pipe into another tool gets plain text, and never with `NO_COLOR` set to anything but
/// the empty string (no-color.org).
fn log_colour(stderr_is_terminal: bool, no_color: Option<&OsStr>) -> bool {
    stderr_is_terminal && no_color.is_none_or(OsStr::is_empty)
}

/// Runs the worker until SIGTERM/SIGINT; exits 0 after handing its jobs back.
pub async fn run(config: Config) -> ExitCode {
    init_logging(&config);
    let config = Arc::new(config);
    let metrics = Arc::new(Metrics::default());
    metrics
        .capacity
        .set(config.queue.max_concurrent_streams as u64);
    let state = Arc::new(WorkerState::default());
    let worker_id = config
        .queue
        .worker_id
        .clone()
        .unwrap_or_else(default_worker_id);
    let store = match Store::connect(&config.redis, config.queue.max_concurrent_streams * 3 + 8) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("free-roam: {e}");
            return ExitCode::from(2);
        }
    };

    let shutdown = CancellationToken::new();
    spawn_signal_handler(
        shutdown.clone(),
        config.queue.shutdown_timeout + std::time::Duration::from_secs(5),
    );

    // The health endpoint is up while the model loads, and says it is not ready yet.
    let health_ctx = HealthContext {
        store: store.clone(),
        state: state.clone(),
        metrics: metrics.clone(),
        worker_id: worker_id.clone(),
        capacity: config.queue.max_concurrent_streams,
        started: Instant::now(),
    };
    let health_stop = CancellationToken::new();
    let health_task = match start_health(&config, health_ctx, health_stop.clone()).await {
        Ok(task) => task,
        Err(code) => return code,
    };
    let model = match load_model_off_runtime(&config).await {
        Ok(model) => model,
        Err(code) => return code,
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
        Arc::new(config.queue.clone()),
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

/// The health endpoint on HEALTH_ADDR; exit code 2 when it cannot listen there.
async fn start_health(
    config: &Config,
    ctx: HealthContext,
    stop: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, ExitCode> {
    match health::serve(config.health.addr, ctx, stop).await {
        Ok((addr, task)) => {
            tracing::info!(%addr, "health endpoint listening");
            Ok(task)
        }
        Err(e) => {
            eprintln!(
                "free-roam: cannot listen on HEALTH_ADDR={}: {e}",
                config.health.addr
            );
            Err(ExitCode::from(2))
        }
    }
}

/// Loads the model on a blocking thread (the runtime keeps serving health meanwhile);
/// exit code 2 when the model cannot load, 1 when loading crashed.
async fn load_model_off_runtime(
    config: &Arc<Config>,
) -> Result<Box<dyn VisionLanguageModel>, ExitCode> {
    let config = config.clone();
    match tokio::task::spawn_blocking(move || load_model(&config.model)).await {
        Ok(Ok(m)) => Ok(m),
        Ok(Err(e)) => {
            eprintln!("free-roam: {e}");
            Err(ExitCode::from(2))
        }
        Err(e) => {
            eprintln!("free-roam: loading the model crashed: {e}");
            Err(ExitCode::from(1))
        }
    }
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
fn load_model(settings: &ModelSettings) -> Result<Box<dyn VisionLanguageModel>, String> {
    free_roam::model::load_model(settings).map_err(|e| e.to_string())
}

/// The job body every job runs: sources, sampler and the shared inference engine.
fn build_body(
    config: &Arc<Config>,
    model: Box<dyn VisionLanguageModel>,
    store: Store,
    metrics: Arc<Metrics>,
) -> (Arc<dyn JobBody>, Engine) {
    let engine = Engine::start(model, config.engine.clone(), metrics.clone());
    let body = StreamJobBody::new(
        &config.pipeline,
        &config.source,
        engine.clone(),
        store,
        metrics,
    );
    (Arc::new(body), engine)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_are_coloured_only_on_a_terminal_without_no_color() {
        assert!(log_colour(true, None));
        assert!(log_colour(true, Some(OsStr::new(""))));
        assert!(!log_colour(true, Some(OsStr::new("1"))));
        assert!(!log_colour(false, None));
        assert!(!log_colour(false, Some(OsStr::new(""))));
    }
}
