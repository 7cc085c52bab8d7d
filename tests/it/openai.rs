//! `MODEL_TYPE=openai` against a test server that implements the OpenAI chat-completions
//! request and response shapes (no real VLM server can run here): the request carries the
//! model, the prompt, a JPEG `data:` URI no larger than OPENAI_IMAGE_MAX_SIDE and the key;
//! 429 with `Retry-After`, 5xx, timeouts and a server that is down are retried or end in
//! error entries; and through the real worker binary a job gets one `{"text": ...}` per frame,
//! a server that stays down fails frames without stopping the job or the worker and shows on
//! `/health/ready`, and the key appears in no log nor health output.

use crate::common::process::{WAIT, http_get, raw_frame_xadd, signal};
use crate::common::{TestRedis, free_port, temp_dir, unique_prefix, wait_until};
use base64::Engine as _;
use free_roam::model::remote::openai::{ApiKey, OpenAiModel, OpenAiSettings};
use free_roam::model::{BackendHealth, VisionLanguageModel};
use free_roam::prompt::PromptRef;
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const KEY: &str = "sk-test-5b1e0c2f9d";

/// What the test server answers, request by request; the last answer repeats.
#[derive(Clone, Debug)]
enum Answer {
    /// 200 with a chat completion whose message content is this text.
    Text(&'static str),
    /// This status, with this `Retry-After` when given, and an error body.
    Status(u16, Option<&'static str>),
    /// Waits this long, then answers like `Text`.
    Slow(Duration, &'static str),
}

/// A request as the test server received it.
struct Received {
    at: Instant,
    path: String,
    /// Header names in lower case.
    headers: HashMap<String, String>,
    body: serde_json::Value,
}

/// An OpenAI-compatible chat-completions server on a free local port, answering from a
/// script.
struct TestServer {
    port: u16,
    received: Arc<Mutex<Vec<Received>>>,
}

impl TestServer {
    fn start(script: Vec<Answer>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let received: Arc<Mutex<Vec<Received>>> = Arc::default();
        let log = received.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (log, script) = (log.clone(), script.clone());
                std::thread::spawn(move || serve(stream, &log, &script));
            }
        });
        Self { port, received }
    }

    fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}/v1", self.port)
    }

    fn count(&self) -> usize {
        self.received.lock().unwrap().len()
    }
}

/// Answers requests on one connection until the client closes it.
fn serve(stream: TcpStream, log: &Mutex<Vec<Received>>, script: &[Answer]) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut out = stream;
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
            return;
        }
        let path = request_line
            .split_whitespace()
            .nth(1)
            .unwrap_or_default()
            .to_string();
        let mut headers = HashMap::new();
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_string());
            }
        }
        let length: usize = headers
            .get("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0u8; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let answer = {
            let mut log = log.lock().unwrap();
            log.push(Received {
                at: Instant::now(),
                path,
                headers,
                body: serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
            });
            script[(log.len() - 1).min(script.len() - 1)].clone()
        };
        let (status, extra, body) = match answer {
            Answer::Text(text) => (200, String::new(), completion(text)),
            Answer::Slow(wait, text) => {
                std::thread::sleep(wait);
                (200, String::new(), completion(text))
            }
            Answer::Status(status, retry_after) => (
                status,
                retry_after
                    .map(|v| format!("Retry-After: {v}\r\n"))
                    .unwrap_or_default(),
                serde_json::json!({"error": {"message": "the test server says no", "code": status}})
                    .to_string(),
            ),
        };
        let response = format!(
            "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{extra}\r\n{body}",
            body.len()
        );
        if out.write_all(response.as_bytes()).is_err() {
            return;
        }
    }
}

fn completion(text: &str) -> String {
    serde_json::json!({
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "model": "test-vlm",
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": "stop"
        }]
    })
    .to_string()
}

fn settings(base_url: String) -> OpenAiSettings {
    OpenAiSettings {
        base_url,
        api_key: Some(ApiKey::new(KEY)),
        image_max_side: 64,
        timeout: Duration::from_secs(5),
        max_retries: 2,
        ..OpenAiSettings::default()
    }
}

fn prompt(text: &str) -> PromptRef {
    PromptRef {
        text: text.into(),
        version: None,
    }
}

/// A `width` x `height` frame with a gradient, so the JPEG has something to encode.
fn frame(width: u32, height: u32) -> free_roam::frame::Frame {
    let mut rgb = Vec::with_capacity((width * height * 3) as usize);
    for y in 0..height {
        for x in 0..width {
            rgb.extend([(x % 256) as u8, (y % 256) as u8, 128]);
        }
    }
    free_roam::frame::Frame::new(width, height, rgb.into()).unwrap()
}

fn ask(model: &mut OpenAiModel, text: &str) -> Result<serde_json::Value, String> {
    let f = frame(200, 100);
    model
        .infer(&[&f], &prompt(text))
        .map(|mut v| v.remove(0))
        .map_err(|e| e.to_string())
}

/// The image's width and height, decoded from a request's `data:` URI.
fn sent_image_size(request: &Received) -> (u32, u32) {
    let url = request.body["messages"][0]["content"][1]["image_url"]["url"]
        .as_str()
        .expect("an image_url part");
    let b64 = url
        .strip_prefix("data:image/jpeg;base64,")
        .expect("a JPEG data URI");
    let jpeg = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap();
    let image = image::load_from_memory_with_format(&jpeg, image::ImageFormat::Jpeg).unwrap();
    (image.width(), image.height())
}

#[test]
fn a_frame_is_sent_in_the_documented_shape_and_its_reply_becomes_text_and_json() {
    let server = TestServer::start(vec![
        Answer::Text("The gate is open."),
        Answer::Text("```json\n{\"open\": true, \"people\": 2}\n```"),
    ]);
    let mut model = OpenAiModel::connect("test-vlm", settings(server.base_url())).unwrap();
    assert_eq!(model.info().name, "test-vlm");
    assert_eq!(model.max_inflight_frames(), Some(8));
    assert_eq!(
        ask(&mut model, "Is the gate open?").unwrap(),
        serde_json::json!({"text": "The gate is open."})
    );
    let answer = ask(&mut model, "Answer in JSON").unwrap();
    assert_eq!(
        answer["json"],
        serde_json::json!({"open": true, "people": 2})
    );
    assert!(answer["text"].as_str().unwrap().contains("\"people\": 2"));

    let received = server.received.lock().unwrap();
    let first = &received[0];
    assert_eq!(first.path, "/v1/chat/completions");
    assert_eq!(
        first.headers.get("authorization").map(String::as_str),
        Some(format!("Bearer {KEY}").as_str())
    );
    assert_eq!(first.body["model"], "test-vlm");
    let content = &first.body["messages"][0]["content"];
    assert_eq!(first.body["messages"][0]["role"], "user");
    assert_eq!(content[0]["type"], "text");
    assert_eq!(content[0]["text"], "Is the gate open?");
    assert_eq!(content[1]["type"], "image_url");
    assert_eq!(content[1]["image_url"]["detail"], "auto");
    assert_eq!(
        sent_image_size(first),
        (64, 32),
        "200x100 scaled to a long side of 64"
    );
    assert_eq!(
        received[1].body["messages"][0]["content"][0]["text"],
        "Answer in JSON"
    );
}

#[test]
fn a_small_frame_is_never_scaled_up() {
    let server = TestServer::start(vec![Answer::Text("ok")]);
    let mut model = OpenAiModel::connect(
        "test-vlm",
        OpenAiSettings {
            image_max_side: 768,
            ..settings(server.base_url())
        },
    )
    .unwrap();
    ask(&mut model, "hi").unwrap();
    assert_eq!(
        sent_image_size(&server.received.lock().unwrap()[0]),
        (200, 100)
    );
}

#[test]
fn a_429_is_retried_after_what_retry_after_asks() {
    let server = TestServer::start(vec![Answer::Status(429, Some("1")), Answer::Text("fine")]);
    let mut model = OpenAiModel::connect("test-vlm", settings(server.base_url())).unwrap();
    assert_eq!(ask(&mut model, "p").unwrap()["text"], "fine");
    let received = server.received.lock().unwrap();
    assert_eq!(received.len(), 2);
    let waited = received[1].at - received[0].at;
    assert!(
        waited >= Duration::from_millis(950),
        "Retry-After: 1 was honoured, waited {waited:?}"
    );
}

#[test]
fn a_500_then_success_answers_the_frame() {
    let server = TestServer::start(vec![Answer::Status(500, None), Answer::Text("second try")]);
    let mut model = OpenAiModel::connect("test-vlm", settings(server.base_url())).unwrap();
    assert_eq!(ask(&mut model, "p").unwrap()["text"], "second try");
    assert_eq!(server.count(), 2);
    assert_eq!(model.backend_health().unwrap().down(), None);
}

#[test]
fn a_server_error_that_lasts_fails_the_frame_after_the_retries() {
    let server = TestServer::start(vec![Answer::Status(503, Some("0"))]);
    let mut model = OpenAiModel::connect("test-vlm", settings(server.base_url())).unwrap();
    let error = ask(&mut model, "p").unwrap_err();
    assert!(error.contains("openai server_error: HTTP 503"), "{error}");
    assert_eq!(
        server.count(),
        3,
        "one try and OPENAI_MAX_RETRIES=2 retries"
    );
}

#[test]
fn a_rejected_request_is_not_retried() {
    let server = TestServer::start(vec![Answer::Status(401, None)]);
    let mut model = OpenAiModel::connect("test-vlm", settings(server.base_url())).unwrap();
    let error = ask(&mut model, "p").unwrap_err();
    assert!(error.contains("openai rejected: HTTP 401"), "{error}");
    assert_eq!(server.count(), 1);
}

#[test]
fn a_reply_slower_than_the_timeout_fails_as_a_timeout() {
    let server = TestServer::start(vec![Answer::Slow(Duration::from_secs(3), "too late")]);
    let mut model = OpenAiModel::connect(
        "test-vlm",
        OpenAiSettings {
            timeout: Duration::from_millis(300),
            max_retries: 0,
            ..settings(server.base_url())
        },
    )
    .unwrap();
    let error = ask(&mut model, "p").unwrap_err();
    assert!(error.contains("openai timeout"), "{error}");
}

/// A port nothing listens on.
fn closed_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

#[test]
fn a_server_that_stays_down_fails_frames_and_marks_the_backend_down() {
    let base_url = format!("http://127.0.0.1:{}/v1", closed_port());
    let mut model = OpenAiModel::connect(
        "test-vlm",
        OpenAiSettings {
            max_retries: 1,
            ..settings(base_url)
        },
    )
    .unwrap();
    let health = model.backend_health().unwrap();
    for _ in 0..BackendHealth::DOWN_AFTER_FAILURES {
        assert_eq!(health.down(), None);
        let error = ask(&mut model, "p").unwrap_err();
        assert!(error.contains("openai connection"), "{error}");
        assert!(!error.contains(KEY));
    }
    let down = health.down().expect("down after failures in a row");
    assert!(down.contains("connection"), "{down}");
}

/// `free-roam worker` on `MODEL_TYPE=openai`, logging at debug level into `log`.
fn openai_worker(
    redis: &TestRedis,
    prefix: &str,
    health_port: u16,
    base_url: &str,
    log: &std::path::Path,
    extra: &[(&str, &str)],
) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_free-roam"));
    cmd.arg("worker")
        .env_clear()
        .env("REDIS_URL", redis.url())
        .env("KEY_PREFIX", prefix)
        .env("MODEL_TYPE", "openai")
        .env("MODEL_ID", "test-vlm")
        .env("OPENAI_BASE_URL", base_url)
        .env("OPENAI_API_KEY", KEY)
        .env("SCENE_GATE", "false")
        .env("HEALTH_ADDR", format!("127.0.0.1:{health_port}"))
        .env("LOG_LEVEL", "debug")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap());
    for (k, v) in extra {
        cmd.env(k, v);
    }
    cmd.spawn().expect("the free-roam binary starts")
}

fn entries(redis: &TestRedis, prefix: &str, job: &str) -> Vec<HashMap<String, String>> {
    redis
        .xrange(&free_roam::store::keys::Keys::new(prefix).results(job))
        .into_iter()
        .map(|(_, f)| f)
        .collect()
}

fn end_status(redis: &TestRedis, prefix: &str, job: &str) -> Option<String> {
    entries(redis, prefix, job)
        .into_iter()
        .find(|f| f.get("kind").map(String::as_str) == Some("end"))
        .map(|f| f["status"].clone())
}

/// Appends an 8x8 frame to a frame stream every 100 ms (of capture and wall-clock time), as a
/// camera would, until `stop`.
fn feed_live(url: String, key: &'static str, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut con = redis::Client::open(url).unwrap().get_connection().unwrap();
        let mut i: i64 = 0;
        while !stop.load(Ordering::Relaxed) {
            let _: String = raw_frame_xadd(key, None, (i * 37 % 255) as u8, 1_000_000 + i * 100)
                .query(&mut con)
                .unwrap();
            i += 1;
            std::thread::sleep(Duration::from_millis(100));
        }
    })
}

fn push_job(redis: &TestRedis, prefix: &str, stream: &str, job: &str, prompt: &str) {
    redis.cli(&[
        "XADD",
        &format!("{{{prefix}}}:jobs"),
        "*",
        "stream_ref",
        stream,
        "prompt",
        prompt,
        "fps",
        "2",
        "max_duration_s",
        "2",
        "job_id",
        job,
    ]);
}

#[test]
fn the_worker_gets_one_text_answer_per_frame_from_the_server() {
    let server = TestServer::start(vec![Answer::Text("No helmet.")]);
    let redis = TestRedis::start();
    let p = unique_prefix();
    let port = free_port();
    let log = temp_dir("openai-worker").join("worker.log");
    let mut w = openai_worker(&redis, &p, port, &server.base_url(), &log, &[]);
    wait_until(WAIT, || {
        http_get(port, "/health/ready").is_some_and(|(c, _)| c == 200)
    });
    let stop = Arc::new(AtomicBool::new(false));
    let feeder = feed_live(redis.url(), "cam:1", stop.clone());
    push_job(
        &redis,
        &p,
        "cam:1",
        "j",
        "answer en is anyone wearing a helmet?",
    );
    wait_until(WAIT, || end_status(&redis, &p, "j").is_some());
    stop.store(true, Ordering::Relaxed);
    feeder.join().unwrap();
    assert_eq!(end_status(&redis, &p, "j").as_deref(), Some("completed"));
    let results: Vec<HashMap<String, String>> = entries(&redis, &p, "j")
        .into_iter()
        .filter(|f| f["kind"] == "result")
        .collect();
    assert!(!results.is_empty(), "the sampled frames reach the server");
    for r in &results {
        let output: serde_json::Value = serde_json::from_str(&r["output"]).unwrap();
        assert_eq!(output, serde_json::json!({"text": "No helmet."}), "{r:?}");
        assert_eq!(r["model"], "test-vlm");
    }
    assert_eq!(server.count(), results.len(), "one request per frame");
    let first = &server.received.lock().unwrap()[0];
    assert_eq!(
        first.body["messages"][0]["content"][0]["text"],
        "answer en is anyone wearing a helmet?"
    );
    let (long, short) = sent_image_size(first);
    assert!(long.max(short) <= 768);
    let (_, health) = http_get(port, "/health").unwrap();
    assert!(!health.contains(KEY), "{health}");
    let health: serde_json::Value = serde_json::from_str(&health).unwrap();
    assert_eq!(health["status"], "ok");
    assert_eq!(health["model"]["backend"]["answering"], true);
    signal(&w, 15);
    assert!(w.wait().unwrap().success());
    let logs = std::fs::read_to_string(&log).unwrap();
    assert!(logs.contains("using an OpenAI-compatible server"), "{logs}");
    assert!(!logs.contains(KEY), "the key is in the worker's log");
}

#[test]
fn a_server_that_stays_down_gives_error_entries_and_shows_on_ready() {
    let redis = TestRedis::start();
    let p = unique_prefix();
    let port = free_port();
    let log = temp_dir("openai-down").join("worker.log");
    let base_url = format!("http://127.0.0.1:{}/v1", closed_port());
    let mut w = openai_worker(
        &redis,
        &p,
        port,
        &base_url,
        &log,
        &[("OPENAI_MAX_RETRIES", "0")],
    );
    wait_until(WAIT, || {
        http_get(port, "/health/ready").is_some_and(|(c, _)| c == 200)
    });
    let stop = Arc::new(AtomicBool::new(false));
    let feeder = feed_live(redis.url(), "cam:2", stop.clone());
    push_job(&redis, &p, "cam:2", "down", "Is the gate open?");
    wait_until(WAIT, || end_status(&redis, &p, "down").is_some());
    stop.store(true, Ordering::Relaxed);
    feeder.join().unwrap();
    assert_eq!(end_status(&redis, &p, "down").as_deref(), Some("completed"));
    let errors: Vec<HashMap<String, String>> = entries(&redis, &p, "down")
        .into_iter()
        .filter(|f| f["kind"] == "error")
        .collect();
    assert!(
        errors.len() as u32 >= BackendHealth::DOWN_AFTER_FAILURES,
        "one error entry per frame: {errors:?}"
    );
    for e in &errors {
        assert!(e["error"].contains("openai connection"), "{e:?}");
    }
    assert!(w.try_wait().unwrap().is_none(), "the worker stays up");
    let (code, ready) = http_get(port, "/health/ready").unwrap();
    assert_eq!(code, 503, "{ready}");
    assert!(ready.contains("the model's server is failing"), "{ready}");
    let (_, health) = http_get(port, "/health").unwrap();
    assert!(!health.contains(KEY), "{health}");
    let health: serde_json::Value = serde_json::from_str(&health).unwrap();
    assert_eq!(health["status"], "degraded");
    assert_eq!(health["model"]["backend"]["answering"], false);
    signal(&w, 15);
    assert!(w.wait().unwrap().success());
    let logs = std::fs::read_to_string(&log).unwrap();
    assert!(!logs.contains(KEY), "the key is in the worker's log");
}
