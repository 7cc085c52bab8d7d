//! Support for the ingest tests: a worker's ingest half (store, engine, stream body) against
//! a private Redis, hand-built job contexts, HLS made by ffmpeg and served by a small HTTP
//! server that can 404 or vanish on demand, and a probe model that reports what it saw.

use crate::common::{TestRedis, temp_dir, unique_prefix};
use free_roam::config::Config;
use free_roam::engine::Engine;
use free_roam::job::JobSpec;
use free_roam::metrics::Metrics;
use free_roam::model::VisionLanguageModel;
use free_roam::model::testing::stub::StubModel;
use free_roam::pipeline::StreamJobBody;
use free_roam::prompt::PromptFollow;
use free_roam::prompt::PromptRef;
use free_roam::queue::body::{BodyOutcome, JobBody, JobContext, JobFailure};
use free_roam::queue::stop::StopSignal;
use free_roam::results::ResultSink;
use free_roam::results::ResumeState;
use free_roam::store::Store;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// A model that answers each frame with its size, the size it had before scaling, its mean
/// value and the prompt. `with_pause` makes it slower than the stream.
pub fn probe_model() -> StubModel {
    StubModel::named("probe").answering(|seen| {
        let f = seen.frame;
        let sum: u64 = f.rgb.iter().map(|v| u64::from(*v)).sum();
        serde_json::json!({
            "w": f.width,
            "h": f.height,
            "source": [f.source_width, f.source_height],
            "mean": sum / f.rgb.len() as u64,
            "prompt": &*seen.prompt.text,
        })
    })
}

/// The ingest half of a worker against a private Redis.
pub struct Harness {
    /// Held for its `Drop`: the server lives as long as the harness.
    _redis: TestRedis,
    pub config: Config,
    pub store: Store,
    pub metrics: Arc<Metrics>,
    pub engine: Engine,
    pub body: Arc<StreamJobBody>,
}

impl Harness {
    /// `settings` are environment-style overrides (e.g. `ALLOW_FILE_SOURCES`).
    pub fn new(model: Box<dyn VisionLanguageModel>, settings: &[(&str, &str)]) -> Self {
        let redis = TestRedis::start();
        let mut map: HashMap<String, String> = settings
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        map.insert("REDIS_URL".into(), redis.url());
        map.entry("KEY_PREFIX".into()).or_insert_with(unique_prefix);
        let config = Config::from_lookup(&move |k| map.get(k).cloned()).expect("valid test config");
        let store = Store::new(&config.redis.url, &config.redis.key_prefix, 8).unwrap();
        let metrics = Arc::new(Metrics::default());
        let engine = Engine::start(model, config.engine.clone(), metrics.clone());
        let body = StreamJobBody::new(
            &config.pipeline,
            &config.source,
            engine.clone(),
            store.clone(),
            metrics.clone(),
        );
        let mut options = body.source_options().clone();
        options.retry_initial = Duration::from_millis(100);
        options.retry_max = Duration::from_millis(400);
        if !settings.iter().any(|(k, _)| *k == "STALL_TIMEOUT_MS") {
            options.stall_timeout = Duration::from_secs(8);
        }
        let body = Arc::new(body.with_source_options(options));
        Self {
            _redis: redis,
            config,
            store,
            metrics,
            engine,
            body,
        }
    }

    /// A job spec as a producer would write it.
    pub fn spec(&self, fields: &[(&str, &str)]) -> JobSpec {
        let raw: Vec<(Vec<u8>, Vec<u8>)> = fields
            .iter()
            .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
            .collect();
        JobSpec::parse("1-0", &raw, 2.0, || "job".into()).expect("valid test spec")
    }

    /// Starts the body on `spec` with a fixed prompt; returns its stop signal and task.
    pub fn start(&self, spec: JobSpec, resume: ResumeState) -> RunningJob {
        self.start_with(
            spec,
            resume,
            PromptFollow::Fixed(PromptRef {
                text: "describe".into(),
                version: None,
            }),
        )
    }

    pub fn start_with(
        &self,
        spec: JobSpec,
        resume: ResumeState,
        prompt: PromptFollow,
    ) -> RunningJob {
        let stop = StopSignal::new();
        let sink = ResultSink::new(
            self.store.clone(),
            &spec.job_id,
            self.config.queue.results_maxlen,
            stop.clone(),
            resume.results,
        );
        let ctx = JobContext {
            spec: Arc::new(spec),
            resume,
            sink,
            stop: stop.clone(),
            prompt,
        };
        let body = self.body.clone();
        let task = tokio::spawn(async move { body.run(ctx).await });
        RunningJob { stop, task }
    }

    /// The job's result entries, oldest first, as field maps.
    pub async fn results(&self, job_id: &str) -> Vec<HashMap<String, String>> {
        let reply: redis::streams::StreamRangeReply = self
            .store
            .query(
                redis::cmd("XRANGE")
                    .arg(self.store.keys().results(job_id))
                    .arg("-")
                    .arg("+"),
            )
            .await
            .unwrap();
        reply
            .ids
            .into_iter()
            .map(|e| {
                e.map
                    .into_iter()
                    .map(|(k, v)| (k, redis::from_redis_value::<String>(v).unwrap()))
                    .collect()
            })
            .collect()
    }

    /// The job's progress hash (counters, cursor, results written), in the job's own slot.
    pub async fn job_hash(&self, job_id: &str) -> HashMap<String, String> {
        self.store
            .query(redis::cmd("HGETALL").arg(self.store.keys().progress(job_id)))
            .await
            .unwrap()
    }

    /// Waits until the job has at least `n` results (panics after `timeout`).
    pub async fn wait_results(
        &self,
        job_id: &str,
        n: usize,
        timeout: Duration,
    ) -> Vec<HashMap<String, String>> {
        let start = std::time::Instant::now();
        loop {
            let r = self.results(job_id).await;
            if r.len() >= n {
                return r;
            }
            assert!(
                start.elapsed() < timeout,
                "{} of {n} results after {timeout:?}",
                r.len()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// The job hash as counters the tests check.
    pub async fn counter(&self, job_id: &str, name: &str) -> u64 {
        self.job_hash(job_id)
            .await
            .get(name)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.engine.shutdown(Duration::from_secs(2));
    }
}

/// A body running in its own task.
pub struct RunningJob {
    pub stop: StopSignal,
    pub task: JoinHandle<Result<BodyOutcome, JobFailure>>,
}

impl RunningJob {
    /// Waits for the body to return (panics after `timeout`).
    pub async fn finish(self, timeout: Duration) -> Result<BodyOutcome, JobFailure> {
        tokio::time::timeout(timeout, self.task)
            .await
            .expect("the job body returned in time")
            .expect("the job body did not panic")
    }
}

/// Writes a finished (VOD) HLS playlist of `seconds` of 320x240 test video at 10 fps.
pub fn make_vod(dir: &Path, seconds: u32) -> PathBuf {
    let playlist = dir.join("vod.m3u8");
    let status = Command::new("ffmpeg")
        .args(["-hide_banner", "-loglevel", "error", "-y"])
        .args(["-f", "lavfi", "-i", "testsrc2=size=320x240:rate=10"])
        .args(["-t", &seconds.to_string()])
        .args(["-c:v", "libx264", "-preset", "ultrafast", "-g", "10"])
        .args(["-f", "hls", "-hls_time", "2", "-hls_list_size", "0"])
        .args(["-hls_playlist_type", "vod"])
        .arg(&playlist)
        .status()
        .expect("ffmpeg must be installed");
    assert!(status.success(), "ffmpeg could not make the test playlist");
    playlist
}

/// An ffmpeg writing a live playlist in real time (1 s segments, 6 listed) for `seconds`,
/// then finishing it with ENDLIST. Killed when dropped.
pub struct LiveEncoder {
    child: Child,
    pub playlist: PathBuf,
}

impl LiveEncoder {
    pub fn start(dir: &Path, seconds: u32) -> Self {
        let playlist = dir.join("live.m3u8");
        let child = Command::new("ffmpeg")
            .args(["-hide_banner", "-loglevel", "error", "-y", "-re"])
            .args(["-f", "lavfi", "-i", "testsrc2=size=320x240:rate=10"])
            .args(["-t", &seconds.to_string()])
            .args(["-c:v", "libx264", "-preset", "ultrafast", "-g", "10"])
            .args(["-f", "hls", "-hls_time", "1", "-hls_list_size", "6"])
            .arg(&playlist)
            .stdin(Stdio::null())
            .spawn()
            .expect("ffmpeg must be installed");
        Self { child, playlist }
    }

    /// Waits until the playlist lists `n` segments.
    pub async fn wait_segments(&self, n: usize) {
        let start = std::time::Instant::now();
        loop {
            let text = std::fs::read_to_string(&self.playlist).unwrap_or_default();
            if text.matches("#EXTINF").count() >= n {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(15),
                "live playlist did not grow"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for LiveEncoder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A minimal HTTP/1.1 file server over a directory, in the test's runtime. It can answer
/// 404 to everything, redirect a name (a `NAME.location` file beside it holds the target),
/// or vanish (stop listening, so connections are refused).
pub struct FileServer {
    pub port: u16,
    accept: JoinHandle<()>,
    requests: Arc<Mutex<Vec<String>>>,
}

impl FileServer {
    pub async fn start(dir: &Path) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let root = dir.to_path_buf();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let log = requests.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((mut sock, _)) = listener.accept().await else {
                    return;
                };
                let root = root.clone();
                let log = log.clone();
                tokio::spawn(async move {
                    let mut req = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                        match sock.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => req.extend_from_slice(&buf[..n]),
                        }
                    }
                    let line = String::from_utf8_lossy(&req);
                    let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
                    let name = path.trim_start_matches('/').split('?').next().unwrap_or("");
                    log.lock().unwrap().push(name.to_string());
                    let file = (!name.contains("..")).then(|| root.join(name));
                    // `NAME.location` beside a file answers NAME with a redirect there.
                    let location = file
                        .as_ref()
                        .and_then(|f| std::fs::read_to_string(f.with_extension("location")).ok());
                    if let Some(to) = location {
                        let head = format!(
                            "HTTP/1.1 302 Found\r\nLocation: {}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                            to.trim()
                        );
                        let _ = sock.write_all(head.as_bytes()).await;
                        let _ = sock.shutdown().await;
                        return;
                    }
                    let body = file.as_ref().and_then(|f| std::fs::read(f).ok());
                    let head = match &body {
                        Some(b) => format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: {}\r\nConnection: close\r\n\r\n",
                            b.len(),
                            if name.ends_with(".m3u8") { "application/vnd.apple.mpegurl" } else { "video/mp2t" }
                        ),
                        None => "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".into(),
                    };
                    let _ = sock.write_all(head.as_bytes()).await;
                    // `NAME.truncate` beside a file: its body stops at a fifth of the length
                    // the head declares, as from a server that dropped the connection.
                    let truncate = file
                        .as_ref()
                        .is_some_and(|f| f.with_extension("truncate").exists());
                    if let Some(b) = body {
                        let end = if truncate { b.len() / 5 } else { b.len() };
                        let _ = sock.write_all(&b[..end]).await;
                    }
                    let _ = sock.shutdown().await;
                });
            }
        });
        Self {
            port,
            accept,
            requests,
        }
    }

    /// Whether a file named `name` has been requested.
    pub fn requested(&self, name: &str) -> bool {
        self.requests.lock().unwrap().iter().any(|r| r == name)
    }

    /// Every name requested so far, in order.
    pub fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }

    /// Waits until a file named `name` has been requested.
    pub async fn wait_request(&self, name: &str) {
        let start = std::time::Instant::now();
        while !self.requests.lock().unwrap().iter().any(|r| r == name) {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "{name} was never requested"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn url(&self, name: &str) -> String {
        format!("http://127.0.0.1:{}/{name}", self.port)
    }

    /// Stops listening: new connections are refused from now on.
    pub async fn vanish(&self) {
        self.accept.abort();
        // Wait for the listener to be dropped with the task.
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for FileServer {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// A fresh directory for generated video, removed by the caller's `TempDir` guard.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        Self(temp_dir(tag))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Reads an integer field of a result entry.
pub fn num(entry: &HashMap<String, String>, field: &str) -> i64 {
    entry
        .get(field)
        .unwrap_or_else(|| panic!("entry has no `{field}`: {entry:?}"))
        .parse()
        .unwrap()
}
