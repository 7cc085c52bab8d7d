//! The worker's and the CLI's handle on Redis, one node or a Cluster: a connection pool, the
//! contract's key names, and calls into the `freeroam` function library, which is loaded
//! again whenever the server has lost it (a restart without persistence, a `FUNCTION FLUSH`).

use crate::redact::redact_url;
use crate::store::keys::Keys;
use crate::store::settings::{RedisSettings, RedisTlsFiles};
use deadpool_redis::{Manager, Pool, PoolConfig, Runtime};
use redis::aio::ConnectionLike;
use redis::{AsyncConnectionConfig, FromRedisValue, IntoConnectionInfo, ToRedisArgs, Value};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

pub mod depth;
pub mod functions;
pub mod keys;
pub mod settings;

/// The Redis function library every worker and the CLI load with `FUNCTION LOAD REPLACE`.
pub const FUNCTIONS_LUA: &str = include_str!("functions.lua");

/// The longest a blocking read (`XREADGROUP`/`XREAD BLOCK`) may wait in one call; the reply
/// timeout sits well above it.
pub const MAX_BLOCK_MS: u64 = 2_000;
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// What went wrong talking to Redis, and whether trying again can help.
#[derive(Clone, Debug, thiserror::Error)]
pub enum StoreError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("redis connection pool: {0}")]
    Pool(String),
    #[error("bad redis url: {0}")]
    Url(String),
    #[error("redis tls: {0}")]
    Tls(String),
    /// The server answered, but not in the shape the contract gives that reply.
    #[error("redis reply: {0}")]
    Reply(String),
}

impl StoreError {
    /// True for failures of the connection (worth a retry after a backoff), false for
    /// errors the server answered (a bad argument, a script error).
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Redis(e) => {
                is_broken_connection(e)
                    || matches!(
                        e.kind(),
                        redis::ErrorKind::Server(redis::ServerErrorKind::BusyLoading)
                            | redis::ErrorKind::Server(redis::ServerErrorKind::TryAgain)
                            | redis::ErrorKind::Server(redis::ServerErrorKind::MasterDown)
                            | redis::ErrorKind::Server(redis::ServerErrorKind::ClusterDown)
                            | redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly)
                    )
                    || is_stale_route(e)
                    // Also inside an aborted MULTI/EXEC: a server restarting with AOF answers
                    // each queued command LOADING, and the transaction must be retried,
                    // not fail its job.
                    || server_codes(e).iter().any(|c| TRANSIENT_CODES.contains(&c.as_str()))
            }
            StoreError::Pool(_) => true,
            StoreError::Url(_) | StoreError::Tls(_) | StoreError::Reply(_) => false,
        }
    }

    /// True when the server refused the credentials (a wrong password or user name, or an
    /// unknown or disabled ACL user): retrying with the same settings cannot help.
    pub fn is_auth_failure(&self) -> bool {
        match self {
            StoreError::Redis(e) => {
                e.kind() == redis::ErrorKind::AuthenticationFailed
                    || matches!(e.code(), Some("WRONGPASS" | "NOAUTH"))
            }
            _ => false,
        }
    }

    /// The server refused the command or a key to this user (`NOPERM`, its ACL).
    pub fn is_permission_denied(&self) -> bool {
        self.code() == Some("NOPERM")
    }

    /// The error code the server answered with (`WRONGTYPE`, `NOGROUP`, a function's own
    /// code such as `JOBEXISTS`), if the server answered.
    pub fn code(&self) -> Option<&str> {
        match self {
            StoreError::Redis(e) => e.code(),
            _ => None,
        }
    }

    /// The message a function raised with `redis.error_reply`, without the `ERR` noise.
    pub fn server_message(&self) -> Option<String> {
        match self {
            StoreError::Redis(e) => e
                .detail()
                .map(str::to_string)
                .or_else(|| Some(e.to_string())),
            _ => None,
        }
    }
}

/// Server error codes that a wait cures: loading its data, a failover or a resharding under
/// way, a blocked command released.
const TRANSIENT_CODES: [&str; 6] = [
    "LOADING",
    "TRYAGAIN",
    "MASTERDOWN",
    "CLUSTERDOWN",
    "READONLY",
    "UNBLOCKED",
];

/// The server error codes inside an error, including each command's in an aborted
/// `MULTI`/`EXEC`.
fn server_codes(e: &redis::RedisError) -> Vec<String> {
    e.clone()
        .into_server_errors()
        .map(|errs| errs.iter().map(|(_, s)| s.code().to_string()).collect())
        .unwrap_or_default()
}

/// A failure of the connection itself: the server went away, refused it, or a reply timed
/// out.
fn is_broken_connection(e: &redis::RedisError) -> bool {
    e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() || e.is_timeout()
}

/// A Cluster answer that the slot moved (a failover, a resharding), also inside an aborted
/// transaction, which the cluster client does not follow by itself: the connection's slot
/// map is stale, and a retry on a fresh connection succeeds.
fn is_stale_route(e: &redis::RedisError) -> bool {
    matches!(
        e.kind(),
        redis::ErrorKind::Server(redis::ServerErrorKind::Moved)
            | redis::ErrorKind::Server(redis::ServerErrorKind::Ask)
    ) || server_codes(e).iter().any(|c| c == "MOVED" || c == "ASK")
}

fn cluster_pool_error(e: deadpool_redis::cluster::PoolError) -> StoreError {
    match e {
        deadpool_redis::cluster::PoolError::Backend(e) => StoreError::Redis(e),
        other => StoreError::Pool(other.to_string()),
    }
}

impl From<deadpool_redis::PoolError> for StoreError {
    fn from(e: deadpool_redis::PoolError) -> Self {
        match e {
            deadpool_redis::PoolError::Backend(e) => StoreError::Redis(e),
            other => StoreError::Pool(other.to_string()),
        }
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// Connections to one Redis node, or to a Cluster (each pooled connection then reaches
/// every master, and commands go to the node that owns their key).
#[derive(Clone)]
enum Pools {
    Node(Pool),
    Cluster(deadpool_redis::cluster::Pool),
}

/// A connection to one node or to a Cluster, whichever the handle was built for.
#[derive(Clone)]
pub enum NodeOrCluster<N, C> {
    Node(N),
    Cluster(C),
}

/// One pooled connection, to a node or to a Cluster.
pub type Conn = NodeOrCluster<deadpool_redis::Connection, deadpool_redis::cluster::Connection>;

/// The connection every request except a blocking read shares. Requests from concurrent
/// tasks go out pipelined on it, and none pays the pool's check on checkout (an
/// `UNWATCH`+`PING` round trip), which doubled the round trips of every call.
type SharedConn =
    NodeOrCluster<redis::aio::MultiplexedConnection, deadpool_redis::cluster::ClusterConnection>;

/// A connection out of the pool, for one task's blocking commands ([`Store::dedicated`]).
pub struct Dedicated(SharedConn);

impl Dedicated {
    /// Runs one command, a blocking one too; after an error, make a new connection.
    pub async fn query<T: FromRedisValue>(&mut self, cmd: &redis::Cmd) -> StoreResult<T> {
        Ok(cmd.query_async(&mut self.0).await?)
    }
}

impl Conn {
    /// Takes the connection out of its pool for good and closes it: for a connection with
    /// a blocking read still pending on it.
    pub fn discard(self) {
        drop(self.take());
    }

    /// Takes the connection out of its pool for good, as a connection of its own.
    fn take(self) -> SharedConn {
        match self {
            Conn::Node(c) => SharedConn::Node(deadpool_redis::Connection::take(c)),
            Conn::Cluster(c) => SharedConn::Cluster(deadpool_redis::cluster::Connection::take(c)),
        }
    }
}

impl<N: ConnectionLike, C: ConnectionLike> ConnectionLike for NodeOrCluster<N, C> {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            NodeOrCluster::Node(c) => c.req_packed_command(cmd),
            NodeOrCluster::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipe: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            NodeOrCluster::Node(c) => c.req_packed_commands(pipe, offset, count),
            NodeOrCluster::Cluster(c) => c.req_packed_commands(pipe, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            NodeOrCluster::Node(c) => c.get_db(),
            NodeOrCluster::Cluster(c) => c.get_db(),
        }
    }
}

/// A Redis handle bound to one key prefix: one shared multiplexed connection for requests,
/// and a pool for blocking reads, which would stall everything queued behind them on a
/// shared connection. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    pool: Pools,
    /// Made from the pool on first need; dropped when it breaks, so the next request makes
    /// a fresh one.
    shared: Arc<std::sync::Mutex<Option<SharedConn>>>,
    keys: Keys,
    /// Requests sent through this handle (a pipeline is one), for benchmarks to count.
    round_trips: Arc<AtomicU64>,
}

impl Store {
    /// Builds the pool. Connections are made lazily, so this succeeds while Redis is down.
    pub fn new(redis_url: &str, key_prefix: &str, max_connections: usize) -> StoreResult<Self> {
        Self::with_tls(
            redis_url,
            &RedisTlsFiles::default(),
            key_prefix,
            max_connections,
        )
    }

    /// [`Store::new`] for a `rediss://` URL whose server certificate chains to a private CA,
    /// or that asks for a client certificate: the files are read once, here.
    pub fn with_tls(
        redis_url: &str,
        tls: &RedisTlsFiles,
        key_prefix: &str,
        max_connections: usize,
    ) -> StoreResult<Self> {
        let url_error = |e: redis::RedisError| StoreError::Url(redact_url(&e.to_string()));
        let info = if tls.is_empty() {
            redis_url.into_connection_info().map_err(url_error)?
        } else {
            redis::Client::build_with_tls(redis_url, tls_certificates(tls)?)
                .map_err(url_error)?
                .get_connection_info()
                .clone()
        };
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT));
        let manager = Manager::new_with_config(info, config).map_err(url_error)?;
        let pool = Pool::builder(manager)
            .config(pool_config(max_connections))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(pool_build_error)?;
        Ok(Self::over(Pools::Node(pool), key_prefix))
    }

    /// A Redis Cluster through its seed nodes (`redis://host:port`, any reachable subset of
    /// the nodes); the client learns the rest of the topology and follows its changes.
    pub fn cluster<N: AsRef<str>>(
        nodes: &[N],
        key_prefix: &str,
        max_connections: usize,
    ) -> StoreResult<Self> {
        let nodes: Vec<&str> = nodes.iter().map(AsRef::as_ref).collect();
        let manager = deadpool_redis::cluster::Manager::new(nodes, false)
            .map_err(|e| StoreError::Url(redact_url(&e.to_string())))?;
        let pool = deadpool_redis::cluster::Pool::builder(manager)
            .config(pool_config(max_connections))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(pool_build_error)?;
        Ok(Self::over(Pools::Cluster(pool), key_prefix))
    }

    /// A handle over a pool just built, with no shared connection yet.
    fn over(pool: Pools, key_prefix: &str) -> Self {
        Self {
            pool,
            shared: Arc::default(),
            keys: Keys::new(key_prefix),
            round_trips: Arc::new(AtomicU64::new(0)),
        }
    }

    /// The handle the settings ask for: a Cluster when `REDIS_CLUSTER_NODES` is set, else
    /// the one node of `REDIS_URL`.
    pub fn connect(settings: &RedisSettings, max_connections: usize) -> StoreResult<Self> {
        if settings.cluster_nodes.is_empty() {
            Self::with_tls(
                &settings.url,
                &settings.tls,
                &settings.key_prefix,
                max_connections,
            )
        } else {
            Self::cluster(
                &settings.cluster_nodes,
                &settings.key_prefix,
                max_connections,
            )
        }
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// A handle on queue shard `shard` ([`Keys::shard`]) over the same connections: its
    /// functions and queue keys are the shard's.
    pub fn shard(&self, shard: u32) -> Self {
        Self {
            keys: self.keys.shard(shard),
            ..self.clone()
        }
    }

    /// The fleet's number of queue shards: `queue_shards` in shard 0's `{fr}:settings`, which
    /// `free-roam queue shards` sets; 1 (the one-slot layout) when unset or unreadable as a
    /// count in 1..=[`keys::MAX_QUEUE_SHARDS`].
    pub async fn queue_shards(&self) -> StoreResult<u32> {
        let mut cmd = redis::cmd("HGET");
        cmd.arg(self.keys.shard(0).settings())
            .arg(keys::QUEUE_SHARDS_FIELD);
        let raw: Option<String> = self.query(&cmd).await?;
        Ok(raw
            .and_then(|v| v.trim().parse::<u32>().ok())
            .filter(|k| (1..=keys::MAX_QUEUE_SHARDS).contains(k))
            .unwrap_or(1))
    }

    /// Requests sent through this handle and its clones so far: commands, pipelines and
    /// function calls each count one (blocking reads on a [`Store::conn`] are not counted).
    pub fn round_trips(&self) -> u64 {
        self.round_trips.load(Ordering::Relaxed)
    }

    fn count_trip(&self) {
        self.round_trips.fetch_add(1, Ordering::Relaxed);
    }

    /// A connection of its own from the pool, for a blocking read; hold it only for that
    /// one exchange. Everything else goes through [`Store::query`] and [`Store::pipe`].
    pub async fn conn(&self) -> StoreResult<Conn> {
        Ok(match &self.pool {
            Pools::Node(p) => Conn::Node(p.get().await?),
            Pools::Cluster(p) => Conn::Cluster(p.get().await.map_err(cluster_pool_error)?),
        })
    }

    /// A connection of its own, out of the pool for good: for a task that waits on Redis
    /// nearly all the time (a worker's wait for wake-ups), which would otherwise keep a
    /// pooled connection from the requests that need one.
    pub async fn dedicated(&self) -> StoreResult<Dedicated> {
        Ok(Dedicated(self.conn().await?.take()))
    }

    /// The shared connection, made from the pool when there is none.
    async fn shared(&self) -> StoreResult<SharedConn> {
        if let Some(conn) = self.lock_shared().clone() {
            return Ok(conn);
        }
        let fresh = self.conn().await?.take();
        Ok(self.lock_shared().get_or_insert(fresh).clone())
    }

    fn lock_shared(&self) -> std::sync::MutexGuard<'_, Option<SharedConn>> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Drops the shared connection after a failure that says it is broken (the server went
    /// away, a reply timed out) or that its Cluster slot map is stale.
    fn check_shared<T>(&self, reply: redis::RedisResult<T>) -> redis::RedisResult<T> {
        if let Err(e) = &reply
            && (is_broken_connection(e) || is_stale_route(e))
        {
            self.lock_shared().take();
        }
        reply
    }

    /// Runs one command on the shared connection. Not for a blocking read: see
    /// [`Store::query_blocking`].
    pub async fn query<T: FromRedisValue>(&self, cmd: &redis::Cmd) -> StoreResult<T> {
        let mut conn = self.shared().await?;
        self.count_trip();
        let reply = cmd.query_async(&mut conn).await;
        Ok(self.check_shared(reply)?)
    }

    /// Runs a blocking read (`XREADGROUP`/`XREAD` with `BLOCK`) on a connection of its own.
    pub async fn query_blocking<T: FromRedisValue>(&self, cmd: &redis::Cmd) -> StoreResult<T> {
        let mut conn = self.conn().await?;
        self.count_trip();
        let reply = cmd.query_async(&mut conn).await;
        Ok(drop_if_stale(conn, reply)?)
    }

    /// Runs a pipeline on the shared connection.
    pub async fn pipe<T: FromRedisValue>(&self, pipe: &redis::Pipeline) -> StoreResult<T> {
        let mut conn = self.shared().await?;
        self.count_trip();
        let reply = pipe.query_async(&mut conn).await;
        Ok(self.check_shared(reply)?)
    }

    /// Round trip time of a `PING`.
    pub async fn ping(&self) -> StoreResult<Duration> {
        let start = std::time::Instant::now();
        let _: String = self.query(&redis::cmd("PING")).await?;
        Ok(start.elapsed())
    }

    /// Loads (or replaces) the `freeroam` function library.
    pub async fn load_functions(&self) -> StoreResult<()> {
        let mut conn = self.conn().await?;
        load_functions_on(&mut conn).await
    }

    /// Calls one of the queue's functions with the contract's hash tag as its only key,
    /// loading the library first when the server does not have it.
    pub async fn fcall<T: FromRedisValue>(
        &self,
        function: &str,
        args: &[&dyn ToRedisArgsDyn],
    ) -> StoreResult<T> {
        self.fcall_on(self.keys.tag(), function, args).await
    }

    /// Calls a function whose one key is `tag` (a job's own tag for `fr_job_end`).
    pub async fn fcall_on<T: FromRedisValue>(
        &self,
        tag: &str,
        function: &str,
        args: &[&dyn ToRedisArgsDyn],
    ) -> StoreResult<T> {
        let mut cmd = redis::cmd("FCALL");
        cmd.arg(function).arg(1).arg(tag);
        for a in args {
            a.write_to(&mut cmd);
        }
        let mut conn = self.shared().await?;
        self.count_trip();
        match self.check_shared(cmd.query_async(&mut conn).await) {
            Err(e) if e.code() == Some("ERR") => {
                // A missing function is a plain ERR, like a script's own errors: ask the
                // node that serves this tag whether it has the library rather than read
                // the message. The probe names the same key, so it goes where the call
                // went; on a Cluster another node may have the library already.
                self.count_trip();
                match library_loaded_on(&mut conn, tag).await {
                    Ok(false) => {
                        self.count_trip();
                        load_functions_on(&mut conn).await?;
                    }
                    // Loaded now: the error was the call's own, or another client (a
                    // worker starting) loaded the library between the call and the probe.
                    // The call runs once more and its answer stands; the functions check
                    // their arguments before they write, so a refused call writes nothing
                    // either time.
                    Ok(true) => {}
                    Err(_) => return Err(e.into()),
                }
                self.count_trip();
                Ok(self.check_shared(cmd.query_async(&mut conn).await)?)
            }
            other => Ok(other?),
        }
    }

    /// Creates the job stream and the `workers` group if either is missing.
    pub async fn ensure_group(&self) -> StoreResult<()> {
        let result: redis::RedisResult<()> = {
            let mut conn = self.conn().await?;
            redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(self.keys.jobs())
                .arg(crate::store::keys::WORKER_GROUP)
                .arg("0")
                .arg("MKSTREAM")
                .query_async(&mut conn)
                .await
        };
        match result {
            Ok(()) => Ok(()),
            Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

/// The pool's size and timeouts, the same for one node and a Cluster.
fn pool_config(max_connections: usize) -> PoolConfig {
    let mut config = PoolConfig::new(max_connections.max(4));
    config.timeouts.wait = Some(Duration::from_secs(10));
    config.timeouts.create = Some(CONNECT_TIMEOUT * 2);
    config.timeouts.recycle = Some(Duration::from_secs(2));
    config
}

fn pool_build_error(e: deadpool_redis::BuildError) -> StoreError {
    StoreError::Pool(e.to_string())
}

/// The CA and client certificate files, read for the TLS client.
fn tls_certificates(files: &RedisTlsFiles) -> StoreResult<redis::TlsCertificates> {
    let read = |path: &std::path::Path| {
        std::fs::read(path)
            .map_err(|e| StoreError::Tls(format!("cannot read {}: {e}", path.display())))
    };
    Ok(redis::TlsCertificates {
        root_cert: files.ca_file.as_deref().map(read).transpose()?,
        client_tls: match &files.client_cert {
            Some((cert, key)) => Some(redis::ClientTlsConfig {
                client_cert: read(cert)?,
                client_key: read(key)?,
            }),
            None => None,
        },
    })
}

/// Closes a connection whose slot map proved stale, so the pool makes a fresh one.
fn drop_if_stale<T>(conn: Conn, reply: redis::RedisResult<T>) -> redis::RedisResult<T> {
    if let Err(e) = &reply
        && is_stale_route(e)
    {
        conn.discard();
    }
    reply
}

async fn load_functions_on<C: ConnectionLike + Send>(conn: &mut C) -> StoreResult<()> {
    let _: String = redis::cmd("FUNCTION")
        .arg("LOAD")
        .arg("REPLACE")
        .arg(FUNCTIONS_LUA)
        .query_async(conn)
        .await?;
    Ok(())
}

/// The library's function that probes for it: it names the tag as its key, writes nothing
/// and replies with an error only when the node has no such function (a wrong key type
/// answers `WRONGTYPE`, not `ERR`). Both ACL users may call it, with `FCALL`.
const LIBRARY_PROBE: &str = "fr_prompt_get";

/// Whether the node serving `tag` has the `freeroam` library loaded. `FUNCTION LIST` would
/// go to a random node of a Cluster, and needs a right the worker's ACL user lacks.
async fn library_loaded_on<C: ConnectionLike + Send>(conn: &mut C, tag: &str) -> StoreResult<bool> {
    let probe: redis::RedisResult<Value> = redis::cmd("FCALL")
        .arg(LIBRARY_PROBE)
        .arg(1)
        .arg(tag)
        .query_async(conn)
        .await;
    match probe {
        Ok(_) => Ok(true),
        Err(e) if e.code() == Some("ERR") => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// An argument of mixed type for [`Store::fcall`].
pub trait ToRedisArgsDyn: Sync {
    fn write_to(&self, cmd: &mut redis::Cmd);
}

impl<T: ToRedisArgs + Sync> ToRedisArgsDyn for T {
    fn write_to(&self, cmd: &mut redis::Cmd) {
        cmd.arg(self);
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Exponential backoff with a cap, for reconnect loops.
#[derive(Clone, Debug)]
pub struct Backoff {
    next: Duration,
    initial: Duration,
    max: Duration,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            next: initial,
            initial,
            max,
        }
    }

    /// The delay to wait now; each call doubles the next one up to the cap.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }

    pub fn reset(&mut self) {
        self.next = self.initial;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_library_probe_is_a_function_that_writes_nothing() {
        let name = format!("function_name = '{LIBRARY_PROBE}'");
        assert!(
            FUNCTIONS_LUA
                .lines()
                .any(|l| l.contains(&name) && l.contains("flags = { 'no-writes' }"))
        );
    }

    /// A Redis that answers every command queued in a MULTI with `code`, as a server still
    /// loading its AOF does, and EXEC with EXECABORT; the error of one atomic pipeline.
    fn aborted_transaction(code: &'static str) -> StoreError {
        use std::io::{BufRead, BufReader, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            let (sock, _) = listener.accept().unwrap();
            let mut out = sock.try_clone().unwrap();
            let mut lines = BufReader::new(sock).lines();
            let mut in_multi = false;
            while let Some(Ok(head)) = lines.next() {
                let n: usize = head.trim_start_matches('*').parse().unwrap_or(0);
                let mut args = Vec::new();
                for _ in 0..n {
                    lines.next();
                    args.push(lines.next().unwrap().unwrap().to_ascii_uppercase());
                }
                let reply = match args.first().map(String::as_str) {
                    Some("MULTI") => {
                        in_multi = true;
                        "+OK\r\n".to_string()
                    }
                    Some("EXEC") => {
                        in_multi = false;
                        "-EXECABORT Transaction discarded because of previous errors.\r\n".into()
                    }
                    _ if in_multi => format!("-{code} the server is not ready\r\n"),
                    _ => "+OK\r\n".to_string(),
                };
                out.write_all(reply.as_bytes()).unwrap();
            }
        });
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap();
        let mut con = client.get_connection().unwrap();
        redis::pipe()
            .atomic()
            .cmd("XADD")
            .arg("k")
            .arg("*")
            .arg("f")
            .arg("v")
            .cmd("HSET")
            .arg("h")
            .arg("f")
            .arg("v")
            .query::<()>(&mut con)
            .map_err(StoreError::from)
            .unwrap_err()
    }

    /// scripts/chaos found results writes failing their jobs when Redis restarted with AOF:
    /// the transaction came back aborted, each command answered LOADING.
    #[test]
    fn a_transaction_aborted_by_a_loading_server_is_transient() {
        for code in ["LOADING", "TRYAGAIN", "MASTERDOWN"] {
            let e = aborted_transaction(code);
            assert!(e.is_transient(), "{code}: {e}");
        }
        let e = aborted_transaction("WRONGTYPE");
        assert!(!e.is_transient(), "a real error stays one: {e}");
    }

    #[test]
    fn backoff_doubles_to_its_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(350));
        let got: Vec<u128> = (0..4).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(got, vec![100, 200, 350, 350]);
        b.reset();
        assert_eq!(b.next_delay().as_millis(), 100);
    }
}
