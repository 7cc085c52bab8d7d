//! The worker's only HTTP face: `/health`, `/health/ready`, `/health/live` and `/metrics`,
//! served with hyper. Everything else is a 404: the API is Redis. It is bounded so that a
//! slow, noisy or hostile client cannot tie it up: a cap on open connections, where a new
//! connection takes the place of the oldest one that has not sent its request yet (idle
//! connections cannot starve the kubelet's probes), a deadline for the request head and for
//! the whole exchange, a small request size, one request per connection.

use crate::metrics::Metrics;
use crate::queue::WorkerState;
use crate::store::Store;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Most connections open at once. One more closes the oldest connection that has not sent
/// its request yet; only when every open one is being answered is it told 503 and closed.
pub const MAX_CONNECTIONS: usize = 64;
/// How long a client may take to send its request head (slowloris).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest one connection is kept, whatever it does (a `/health` waits at most 2 s
/// on Redis).
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest request head read (hyper's smallest buffer); a larger one is refused.
pub const MAX_REQUEST_BYTES: usize = 8192;
/// Most header lines in a request.
pub const MAX_HEADERS: usize = 32;

const BUSY_RESPONSE: &[u8] =
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";

/// The paths the endpoint serves, parsed once from the request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Health,
    Ready,
    Live,
    Metrics,
}

impl Endpoint {
    /// Every path served, with its endpoint; any other path is a 404.
    pub const PATHS: [(&'static str, Endpoint); 4] = [
        ("/health", Endpoint::Health),
        ("/health/ready", Endpoint::Ready),
        ("/health/live", Endpoint::Live),
        ("/metrics", Endpoint::Metrics),
    ];

    pub fn from_path(path: &str) -> Option<Self> {
        Self::PATHS
            .iter()
            .find(|(p, _)| *p == path)
            .map(|(_, e)| *e)
    }
}

/// Where the health endpoint listens (`HEALTH_ADDR`).
#[derive(Clone, Debug)]
pub struct HealthSettings {
    pub addr: SocketAddr,
}

/// What the endpoint reports.
#[derive(Clone)]
pub struct HealthContext {
    pub store: Store,
    pub state: Arc<WorkerState>,
    pub metrics: Arc<Metrics>,
    pub worker_id: String,
    pub capacity: usize,
    pub started: Instant,
}

/// Binds `addr` and serves until `shutdown`. Returns the bound address (port 0 picks one).
pub async fn serve(
    addr: SocketAddr,
    ctx: HealthContext,
    shutdown: CancellationToken,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let ctx = Arc::new(ctx);
    let connections = Arc::new(Connections::default());
    let handle = tokio::spawn(async move {
        loop {
            let (stream, _) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "health accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = shutdown.cancelled() => return,
            };
            let Some(slot) = connections.admit() else {
                // Every open connection is being answered: say so without waiting on the
                // client, and close.
                let _ = stream.try_write(BUSY_RESPONSE);
                continue;
            };
            tokio::spawn(serve_connection(stream, ctx.clone(), slot));
        }
    });
    Ok((local, handle))
}

/// Serves one request on `stream`, unless a newer connection takes its slot first (it sent
/// no request head before the cap was reached).
async fn serve_connection(stream: TcpStream, ctx: Arc<HealthContext>, slot: ConnectionSlot) {
    let slot = Arc::new(slot);
    let evicted = slot.evicted.clone();
    let answering = slot.clone();
    let service = service_fn(move |req| {
        answering.answering();
        let ctx = ctx.clone();
        async move { Ok::<_, std::convert::Infallible>(route(&ctx, req).await) }
    });
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_REQUEST_BYTES)
        .max_headers(MAX_HEADERS)
        .keep_alive(false)
        .serve_connection(TokioIo::new(stream), service);
    tokio::select! {
        r = tokio::time::timeout(CONNECTION_TIMEOUT, connection) => match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!(error = %e, "health connection ended"),
            Err(_) => tracing::debug!("health connection closed: too slow"),
        },
        _ = evicted.cancelled() => {
            tracing::debug!("health connection closed: idle when the connection cap was reached");
        }
    }
}

/// The open connections, oldest first, at most [`MAX_CONNECTIONS`]. A connection is idle
/// until its request head has been read; a new connection that finds the cap reached takes
/// the place of the oldest idle one. A probe sends its request as soon as it connects, so
/// however many idle connections are opened, and however often, the probe is answered;
/// idle ones are also cut after [`HEADER_READ_TIMEOUT`] as before.
#[derive(Default)]
struct Connections {
    open: Mutex<OpenConnections>,
}

#[derive(Default)]
struct OpenConnections {
    next_id: u64,
    by_age: VecDeque<OpenConnection>,
}

struct OpenConnection {
    id: u64,
    idle: bool,
    evict: CancellationToken,
}

impl Connections {
    /// A slot for a new connection, closing the oldest idle one when the cap is reached;
    /// `None` when every open connection is being answered.
    fn admit(self: &Arc<Self>) -> Option<ConnectionSlot> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if open.by_age.len() >= MAX_CONNECTIONS {
            let oldest_idle = open.by_age.iter().position(|c| c.idle)?;
            if let Some(old) = open.by_age.remove(oldest_idle) {
                old.evict.cancel();
            }
        }
        let id = open.next_id;
        open.next_id += 1;
        let evicted = CancellationToken::new();
        open.by_age.push_back(OpenConnection {
            id,
            idle: true,
            evict: evicted.clone(),
        });
        Some(ConnectionSlot {
            id,
            evicted,
            connections: self.clone(),
        })
    }

    fn update(&self, id: u64, change: impl FnOnce(&mut OpenConnections, usize)) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(at) = open.by_age.iter().position(|c| c.id == id) {
            change(&mut open, at);
        }
    }
}

/// One open connection's place under the cap, given back when dropped.
struct ConnectionSlot {
    id: u64,
    /// Cancelled when a newer connection took this one's place.
    evicted: CancellationToken,
    connections: Arc<Connections>,
}

impl ConnectionSlot {
    /// The request head has been read: the connection is answered, never evicted.
    fn answering(&self) {
        self.connections
            .update(self.id, |open, at| open.by_age[at].idle = false);
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.connections.update(self.id, |open, at| {
            open.by_age.remove(at);
        });
    }
}

fn respond(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid")
}

fn json(status: StatusCode, v: serde_json::Value) -> Response<Full<Bytes>> {
    respond(status, "application/json", v.to_string())
}

async fn route(ctx: &HealthContext, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return json(
            StatusCode::METHOD_NOT_ALLOWED,
            serde_json::json!({"error": "only GET"}),
        );
    }
    match Endpoint::from_path(req.uri().path()) {
        Some(Endpoint::Health) => health(ctx).await,
        Some(Endpoint::Ready) => ready(ctx).await,
        Some(Endpoint::Live) => json(StatusCode::OK, serde_json::json!({"status": "alive"})),
        Some(Endpoint::Metrics) => {
            read_queue_depth(ctx).await;
            respond(
                StatusCode::OK,
                "text/plain; version=0.0.4",
                ctx.metrics.render(),
            )
        }
        None => json(
            StatusCode::NOT_FOUND,
            serde_json::json!({"error": "not found"}),
        ),
    }
}

/// Reads the queue's depth into the queue gauges, once per scrape: the fleet's totals over
/// every queue shard (the shard count is read each time, one `HGET`), so an autoscaler on
/// them sees the whole queue. Left as they were when Redis does not answer in time.
async fn read_queue_depth(ctx: &HealthContext) {
    match tokio::time::timeout(
        Duration::from_secs(1),
        crate::store::depth::queue_depth(&ctx.store),
    )
    .await
    {
        Ok(Ok((waiting, running))) => {
            ctx.metrics.queue_running.set(running);
            ctx.metrics.queue_waiting.set(waiting);
        }
        Ok(Err(e)) => tracing::debug!(error = %e, "reading the queue depth for /metrics"),
        Err(_) => tracing::debug!("reading the queue depth for /metrics timed out"),
    }
}

async fn ping(ctx: &HealthContext) -> Result<Duration, String> {
    match tokio::time::timeout(Duration::from_secs(2), ctx.store.ping()).await {
        Ok(Ok(rtt)) => Ok(rtt),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("redis did not answer PING within 2 s".into()),
    }
}

async fn health(ctx: &HealthContext) -> Response<Full<Bytes>> {
    let redis = ping(ctx).await;
    let model_loaded = ctx.state.model_loaded.load(Ordering::Relaxed);
    let draining = ctx.state.draining.load(Ordering::Relaxed);
    let backend_down = ctx.state.backend_down();
    let status = match (&redis, model_loaded && backend_down.is_none(), draining) {
        (_, _, true) => "draining",
        (Ok(_), true, false) => "ok",
        _ => "degraded",
    };
    let backend = ctx
        .state
        .has_backend()
        .then(|| serde_json::json!({ "answering": backend_down.is_none(), "error": backend_down }));
    json(
        StatusCode::OK,
        serde_json::json!({
            "status": status,
            "worker_id": ctx.worker_id,
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_s": ctx.started.elapsed().as_secs(),
            "redis": {
                "reachable": redis.is_ok(),
                "rtt_ms": redis.as_ref().ok().map(|d| d.as_secs_f64() * 1000.0),
                "error": redis.as_ref().err(),
            },
            "model": { "loaded": model_loaded, "info": ctx.state.model_info(), "backend": backend },
            "jobs": { "running": ctx.state.running_jobs(), "capacity": ctx.capacity, "ids": ctx.state.running_job_ids() },
            "queue": ctx.state.queue_shards().map(|(shards, served)| serde_json::json!({ "shards": shards, "served": served })),
            "draining": draining,
        }),
    )
}

async fn ready(ctx: &HealthContext) -> Response<Full<Bytes>> {
    let mut reasons: Vec<String> = Vec::new();
    if ctx.state.draining.load(Ordering::Relaxed) {
        reasons.push("worker is draining (shutting down)".into());
    }
    if !ctx.state.model_loaded.load(Ordering::Relaxed) {
        reasons.push("model is not loaded".into());
    }
    if let Some(error) = ctx.state.backend_down() {
        reasons.push(format!(
            "the model's server is failing ({} frames in a row): {error}",
            crate::backend::BackendHealth::DOWN_AFTER_FAILURES
        ));
    }
    if let Err(e) = ping(ctx).await {
        reasons.push(format!("redis unreachable: {e}"));
    } else if !ctx.state.redis_ready.load(Ordering::Relaxed) {
        let why = ctx
            .state
            .last_redis_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .unwrap_or_else(|| "connecting".into());
        reasons.push(format!("redis not set up yet: {why}"));
    }
    if reasons.is_empty() {
        json(StatusCode::OK, serde_json::json!({"status": "ready"}))
    } else {
        json(
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({"status": "not ready", "reasons": reasons}),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Idle connections up to the cap and past it: each new one closes the oldest idle
    /// one, never more than the cap are open, and only a cap of connections being answered
    /// refuses a new one.
    #[test]
    fn idle_connections_make_room_and_answered_ones_do_not() {
        let connections = Arc::new(Connections::default());
        let mut slots: Vec<ConnectionSlot> = (0..MAX_CONNECTIONS)
            .map(|_| connections.admit().expect("room under the cap"))
            .collect();
        slots[0].answering();
        let newer = connections.admit().expect("an idle one makes room");
        assert!(!slots[0].evicted.is_cancelled(), "answered: kept");
        assert!(slots[1].evicted.is_cancelled(), "the oldest idle one goes");
        assert!(!slots[2].evicted.is_cancelled());
        let open = || connections.open.lock().unwrap().by_age.len();
        assert_eq!(open(), MAX_CONNECTIONS);
        // The evicted one's task ends and gives its slot back, without touching another.
        drop(slots.remove(1));
        assert_eq!(open(), MAX_CONNECTIONS);
        slots.push(newer);
        for slot in &slots {
            slot.answering();
        }
        assert!(connections.admit().is_none(), "all being answered: busy");
        drop(slots.pop());
        assert!(connections.admit().is_some(), "room again once one is done");
    }
}
