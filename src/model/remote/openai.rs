//! `MODEL_TYPE=openai`: any vision-language model behind an OpenAI-compatible
//! chat-completions server (vLLM, Ollama, llama.cpp's server, TGI, a hosted API), one request
//! per frame.
//!
//! Each frame is downscaled to OPENAI_IMAGE_MAX_SIDE (never up), encoded as a JPEG and sent as
//! a `data:` URI beside the prompt. The reply's text becomes `{"text": ...}`, plus
//! `{"json": ...}` when the text parses as JSON (also when the model wrapped it in a
//! ```` ```json ```` fence, as chat models often do).
//!
//! The model does no waiting on the engine's threads: `submit` queues the batch's frames for
//! a pool of OPENAI_MAX_INFLIGHT threads and returns, and each thread answers its frame when
//! its request is done (see `crate::engine`). A request that times out after
//! OPENAI_TIMEOUT_MS, or is answered 429, 5xx or not at all (connection refused, reset), is
//! retried up to OPENAI_MAX_RETRIES times with exponential backoff, waiting what a
//! `Retry-After` header asks when there is one; a frame that still fails is answered with
//! the error's kind and the job goes on. [`BackendHealth`] counts frames failing in a row, so
//! a server that stays down shows on `/health/ready`.
//!
//! The API key travels only in the `Authorization` header; [`ApiKey`] prints as `***`, and
//! error texts from the server are scrubbed of it before they go anywhere.

use crate::frame::Frame;
use crate::model::kind::DEFAULT_IMAGE_MAX_SIDE;
use crate::model::{
    BackendHealth, BatchReplies, Cause, ModelError, ModelInfo, VisionLanguageModel,
};
use crate::prompt::PromptRef;
use base64::Engine as _;
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, SystemTime};

/// JPEG quality of the frames sent: high enough that a VLM sees what the camera saw.
const JPEG_QUALITY: i32 = 90;
/// The first retry waits this long, each next one twice as long, up to `MAX_BACKOFF`.
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(8);
/// The longest a `Retry-After` header may make one retry wait.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(30);
/// How much of an error reply's body goes into the frame's error entry.
const ERROR_BODY_CHARS: usize = 200;

/// An API key. Its `Debug` prints `***`, and it has no `Display`: it is only ever written
/// into the `Authorization` header.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

impl ApiKey {
    pub fn new(key: impl Into<String>) -> Self {
        Self(key.into())
    }

    /// Replaces every occurrence of the key in `text` (an error body the server may echo).
    fn scrub(&self, text: &str) -> String {
        if self.0.is_empty() {
            text.to_string()
        } else {
            text.replace(&self.0, "***")
        }
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// How closely the server's vision tower looks at the image (`OPENAI_IMAGE_DETAIL`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ImageDetail {
    #[default]
    Auto,
    Low,
    High,
}

impl ImageDetail {
    pub fn as_str(self) -> &'static str {
        match self {
            ImageDetail::Auto => "auto",
            ImageDetail::Low => "low",
            ImageDetail::High => "high",
        }
    }
}

impl FromStr for ImageDetail {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(ImageDetail::Auto),
            "low" => Ok(ImageDetail::Low),
            "high" => Ok(ImageDetail::High),
            _ => Err(format!(
                "OPENAI_IMAGE_DETAIL must be one of auto, low, high, not {s:?}"
            )),
        }
    }
}

/// The `OPENAI_*` settings, validated by the binary.
#[derive(Clone, Debug, PartialEq)]
pub struct OpenAiSettings {
    /// The server's API root, e.g. `http://host:8000/v1`; requests go to
    /// `{base_url}/chat/completions`.
    pub base_url: String,
    pub api_key: Option<ApiKey>,
    pub image_detail: ImageDetail,
    /// Frames are scaled down (never up) so their long side is at most this.
    pub image_max_side: u32,
    /// Sent as `response_format`: either a whole `response_format` object (its `type` is
    /// `json_schema`, `json_object` or `text`) or a bare JSON schema, which is wrapped as
    /// `{"type": "json_schema", "json_schema": {"name": "output", "schema": ...}}`.
    pub response_format: Option<serde_json::Value>,
    /// Sent as `max_tokens` when set; else the server's default applies.
    pub max_tokens: Option<u32>,
    /// Requests out at once: the pool's size, and the engine's bound on frames in flight.
    pub max_inflight: usize,
    /// Bound on one request, connecting included.
    pub timeout: Duration,
    /// Further tries of a request that failed in a way worth retrying.
    pub max_retries: u32,
}

impl Default for OpenAiSettings {
    fn default() -> Self {
        Self {
            base_url: String::new(),
            api_key: None,
            image_detail: ImageDetail::Auto,
            image_max_side: DEFAULT_IMAGE_MAX_SIDE,
            response_format: None,
            max_tokens: None,
            max_inflight: 8,
            timeout: Duration::from_secs(20),
            max_retries: 3,
        }
    }
}

/// Why a frame's request failed, by kind. Shown as `openai <kind>: <message>`.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum OpenAiError {
    #[error("HTTP 429: {body}")]
    RateLimited {
        retry_after: Option<Duration>,
        body: String,
    },
    #[error("HTTP {status}: {body}")]
    Server {
        status: u16,
        retry_after: Option<Duration>,
        body: String,
    },
    /// A 4xx other than 429: the request itself is wrong (model name, key, image); never
    /// retried.
    #[error("HTTP {status}: {body}")]
    Rejected { status: u16, body: String },
    #[error("no reply within OPENAI_TIMEOUT_MS ({0} ms)")]
    Timeout(u64),
    #[error("{0}")]
    Connection(String),
    /// A 200 whose body is not a chat completion with a message.
    #[error("not a chat completion: {0}")]
    BadReply(String),
    #[error("JPEG encoding: {0}")]
    Encode(String),
}

impl OpenAiError {
    /// Short name of the kind, first in a frame's error entry.
    pub fn kind(&self) -> &'static str {
        match self {
            OpenAiError::RateLimited { .. } => "rate_limited",
            OpenAiError::Server { .. } => "server_error",
            OpenAiError::Rejected { .. } => "rejected",
            OpenAiError::Timeout(_) => "timeout",
            OpenAiError::Connection(_) => "connection",
            OpenAiError::BadReply(_) => "bad_reply",
            OpenAiError::Encode(_) => "encode",
        }
    }

    /// Whether another try may succeed: 429, 5xx, timeouts and connection failures.
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            OpenAiError::RateLimited { .. }
                | OpenAiError::Server { .. }
                | OpenAiError::Timeout(_)
                | OpenAiError::Connection(_)
        )
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            OpenAiError::RateLimited { retry_after, .. }
            | OpenAiError::Server { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// How long to wait before retry number `retry` (0 for the first) after `error`: what the
/// server's `Retry-After` asks (at most `MAX_RETRY_AFTER`), else exponential backoff.
pub fn retry_delay(error: &OpenAiError, retry: u32) -> Duration {
    match error.retry_after() {
        Some(asked) => asked.min(MAX_RETRY_AFTER),
        None => FIRST_BACKOFF
            .saturating_mul(1u32.checked_shl(retry).unwrap_or(u32::MAX))
            .min(MAX_BACKOFF),
    }
}

/// A `Retry-After` value: delay-seconds or an HTTP date.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// A frame's output from the reply text: `{"text": ...}`, with `"json"` when the text (or
/// the inside of one ```` ``` ```` / ```` ```json ```` fence around all of it) parses as JSON.
pub fn output_for(text: &str) -> serde_json::Value {
    let mut out = serde_json::json!({ "text": text });
    let trimmed = text.trim();
    let inner = strip_fence(trimmed).unwrap_or(trimmed);
    if let Ok(json) = serde_json::from_str::<serde_json::Value>(inner) {
        out["json"] = json;
    }
    out
}

fn strip_fence(text: &str) -> Option<&str> {
    let rest = text.strip_prefix("```")?.strip_suffix("```")?;
    let (info, body) = rest.split_once('\n')?;
    let info = info.trim();
    (info.is_empty() || info.eq_ignore_ascii_case("json")).then_some(body)
}

/// The reply text of a chat completion body: `choices[0].message.content`, a string or a
/// list of text parts. A body that has none is quoted in the error as [`error_body`] shows
/// it, scrubbed of `key`.
pub fn reply_text(body: &str, key: Option<&ApiKey>) -> Result<String, OpenAiError> {
    let v: serde_json::Value =
        serde_json::from_str(body).map_err(|e| OpenAiError::BadReply(format!("not JSON: {e}")))?;
    match &v["choices"][0]["message"]["content"] {
        serde_json::Value::String(text) => Ok(text.clone()),
        serde_json::Value::Array(parts) => Ok(parts
            .iter()
            .filter_map(|p| p["text"].as_str())
            .collect::<Vec<_>>()
            .join("")),
        _ => Err(OpenAiError::BadReply(format!(
            "no choices[0].message.content in {}",
            error_body(body, key)
        ))),
    }
}

/// What an error shows of a server's body: scrubbed of the key first, then clipped, so a
/// key that straddles the cut leaves no prefix behind.
fn error_body(body: &str, key: Option<&ApiKey>) -> String {
    match key {
        Some(key) => clip(&key.scrub(body)),
        None => clip(body),
    }
}

fn clip(text: &str) -> String {
    let mut out: String = text.chars().take(ERROR_BODY_CHARS).collect();
    if out.len() < text.len() {
        out.push('…');
    }
    out
}

/// The size a `width` x `height` frame is sent at: the long side at most `max_side`, the
/// aspect ratio kept, never larger than the frame.
pub fn wire_size(width: u32, height: u32, max_side: u32) -> (u32, u32) {
    let long = width.max(height);
    if long <= max_side {
        return (width, height);
    }
    let scale = max_side as f64 / long as f64;
    let side = |s: u32| ((s as f64 * scale).round() as u32).clamp(1, max_side);
    (side(width), side(height))
}

/// Scales a frame to its wire size and encodes it as a JPEG.
fn encode_frame(
    frame: &Frame,
    max_side: u32,
    compressor: &mut turbojpeg::Compressor,
) -> Result<turbojpeg::OwnedBuf, OpenAiError> {
    let (width, height) = wire_size(frame.width, frame.height, max_side);
    let scaled;
    let pixels: &[u8] = if (width, height) == (frame.width, frame.height) {
        &frame.rgb
    } else {
        let source = image::ImageBuffer::<image::Rgb<u8>, &[u8]>::from_raw(
            frame.width,
            frame.height,
            &frame.rgb[..],
        )
        .ok_or_else(|| OpenAiError::Encode("the frame's buffer does not match its size".into()))?;
        scaled = image::imageops::resize(
            &source,
            width,
            height,
            image::imageops::FilterType::Triangle,
        );
        scaled.as_raw()
    };
    let image = turbojpeg::Image {
        pixels,
        width: width as usize,
        pitch: width as usize * 3,
        height: height as usize,
        format: turbojpeg::PixelFormat::RGB,
    };
    compressor
        .compress_to_owned(image)
        .map_err(|e| OpenAiError::Encode(e.to_string()))
}

/// The request body around the image, built once per prompt: a frame's body is
/// `before_image + base64 JPEG + after_image`.
struct RequestTemplate {
    before_image: String,
    after_image: String,
}

impl RequestTemplate {
    fn new(model: &str, prompt: &str, settings: &OpenAiSettings) -> Self {
        let quote = |s: &str| serde_json::Value::from(s).to_string();
        let before_image = format!(
            r#"{{"model":{},"messages":[{{"role":"user","content":[{{"type":"text","text":{}}},{{"type":"image_url","image_url":{{"url":"data:image/jpeg;base64,"#,
            quote(model),
            quote(prompt)
        );
        let mut after_image = format!(
            r#"","detail":{}}}}}]}}]"#,
            quote(settings.image_detail.as_str())
        );
        if let Some(max_tokens) = settings.max_tokens {
            after_image.push_str(&format!(r#","max_tokens":{max_tokens}"#));
        }
        if let Some(format) = &settings.response_format {
            after_image.push_str(&format!(
                r#","response_format":{}"#,
                response_format(format)
            ));
        }
        after_image.push('}');
        Self {
            before_image,
            after_image,
        }
    }

    fn body(&self, jpeg: &[u8]) -> String {
        let engine = base64::engine::general_purpose::STANDARD;
        let mut body = String::with_capacity(
            self.before_image.len() + jpeg.len().div_ceil(3) * 4 + self.after_image.len(),
        );
        body.push_str(&self.before_image);
        engine.encode_string(jpeg, &mut body);
        body.push_str(&self.after_image);
        body
    }
}

/// OPENAI_RESPONSE_FORMAT as sent: a whole `response_format` object as given, a bare schema
/// wrapped as a `json_schema` one.
fn response_format(value: &serde_json::Value) -> serde_json::Value {
    match value["type"].as_str() {
        Some("json_schema" | "json_object" | "text") => value.clone(),
        _ => serde_json::json!({
            "type": "json_schema",
            "json_schema": { "name": "output", "schema": value },
        }),
    }
}

/// One frame for the pool.
struct FrameRequest {
    frame: Frame,
    index: usize,
    template: Arc<RequestTemplate>,
    replies: BatchReplies,
}

/// What every pool thread shares.
struct Client {
    agent: ureq::Agent,
    url: String,
    authorization: Option<(String, ApiKey)>,
    settings: OpenAiSettings,
    health: Arc<BackendHealth>,
}

impl Client {
    /// One try: the reply text, or why there is none.
    fn send_once(&self, body: &str) -> Result<String, OpenAiError> {
        let mut request = self
            .agent
            .post(&self.url)
            .set("Content-Type", "application/json");
        if let Some((header, _)) = &self.authorization {
            request = request.set("Authorization", header);
        }
        match request.send_string(body) {
            Ok(response) => {
                let text = response
                    .into_string()
                    .map_err(|e| self.transport_error(&e))?;
                reply_text(&text, self.key())
            }
            Err(ureq::Error::Status(status, response)) => {
                let retry_after = response
                    .header("retry-after")
                    .and_then(|v| parse_retry_after(v, SystemTime::now()));
                let body = error_body(&response.into_string().unwrap_or_default(), self.key());
                Err(match status {
                    429 => OpenAiError::RateLimited { retry_after, body },
                    500..=599 => OpenAiError::Server {
                        status,
                        retry_after,
                        body,
                    },
                    _ => OpenAiError::Rejected { status, body },
                })
            }
            Err(ureq::Error::Transport(transport)) => Err(self.classify_transport(&transport)),
        }
    }

    fn classify_transport(&self, transport: &ureq::Transport) -> OpenAiError {
        let timed_out = std::error::Error::source(transport)
            .and_then(|s| s.downcast_ref::<std::io::Error>())
            .is_some_and(|e| e.kind() == std::io::ErrorKind::TimedOut);
        if timed_out {
            OpenAiError::Timeout(self.settings.timeout.as_millis() as u64)
        } else {
            OpenAiError::Connection(self.scrub(&transport.to_string()))
        }
    }

    fn transport_error(&self, e: &std::io::Error) -> OpenAiError {
        if e.kind() == std::io::ErrorKind::TimedOut {
            OpenAiError::Timeout(self.settings.timeout.as_millis() as u64)
        } else {
            OpenAiError::Connection(self.scrub(&e.to_string()))
        }
    }

    fn key(&self) -> Option<&ApiKey> {
        self.authorization.as_ref().map(|(_, key)| key)
    }

    fn scrub(&self, text: &str) -> String {
        match self.key() {
            Some(key) => key.scrub(text),
            None => text.to_string(),
        }
    }

    /// A frame's output after up to `max_retries` retries.
    fn ask(
        &self,
        request: &FrameRequest,
        compressor: &mut turbojpeg::Compressor,
    ) -> Result<serde_json::Value, OpenAiError> {
        let jpeg = encode_frame(&request.frame, self.settings.image_max_side, compressor)?;
        let body = request.template.body(&jpeg);
        drop(jpeg);
        let mut retry = 0;
        loop {
            match self.send_once(&body) {
                Ok(text) => return Ok(output_for(&text)),
                Err(e) if e.retryable() && retry < self.settings.max_retries => {
                    let wait = retry_delay(&e, retry);
                    tracing::debug!(kind = e.kind(), error = %e, ?wait, "retrying a request");
                    std::thread::sleep(wait);
                    retry += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

fn pool_thread(client: Arc<Client>, queue: Arc<Mutex<mpsc::Receiver<FrameRequest>>>) {
    let mut compressor = match turbojpeg::Compressor::new().and_then(|mut c| {
        c.set_quality(JPEG_QUALITY)?;
        c.set_subsamp(turbojpeg::Subsamp::Sub2x2)?;
        Ok(c)
    }) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot start a JPEG encoder");
            return;
        }
    };
    loop {
        let next = queue.lock().unwrap_or_else(|e| e.into_inner()).recv();
        let Ok(request) = next else { return };
        let result = client.ask(&request, &mut compressor);
        let FrameRequest { index, replies, .. } = request;
        match result {
            Ok(output) => {
                client.health.record_success();
                replies.frame(index, Ok(output));
            }
            Err(e) => {
                let kind = format!("openai {}", e.kind());
                client.health.record_failure(&format!("{kind}: {e}"));
                let error = ModelError::inference(kind, Cause::Remote(Box::new(e)));
                replies.frame(index, Err(error));
            }
        }
    }
}

/// The model: a prompt cache and the sending end of the pool's queue.
pub struct OpenAiModel {
    info: ModelInfo,
    model_id: String,
    settings: OpenAiSettings,
    queue: mpsc::Sender<FrameRequest>,
    health: Arc<BackendHealth>,
    /// The request body around the image for the last prompt seen.
    template: Option<(Arc<str>, Arc<RequestTemplate>)>,
}

impl OpenAiModel {
    /// Starts the pool; sends nothing yet (the server may come up later).
    pub fn connect(model_id: &str, settings: OpenAiSettings) -> Result<Self, ModelError> {
        if model_id.trim().is_empty() {
            return Err(ModelError::Load(
                "MODEL_TYPE=openai needs MODEL_ID: the model name the server serves".into(),
            ));
        }
        let base = settings.base_url.trim().trim_end_matches('/');
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(ModelError::Load(
                "MODEL_TYPE=openai needs OPENAI_BASE_URL, an http:// or https:// URL such as http://host:8000/v1".into(),
            ));
        }
        let max_inflight = settings.max_inflight.max(1);
        let agent = ureq::AgentBuilder::new()
            .timeout(settings.timeout)
            .max_idle_connections_per_host(max_inflight)
            .build();
        let health = Arc::new(BackendHealth::default());
        let client = Arc::new(Client {
            agent,
            url: format!("{base}/chat/completions"),
            authorization: settings
                .api_key
                .clone()
                .filter(|k| !k.0.is_empty())
                .map(|k| (format!("Bearer {}", k.0), k)),
            settings: settings.clone(),
            health: health.clone(),
        });
        let (queue, receiver) = mpsc::channel();
        let receiver = Arc::new(Mutex::new(receiver));
        for i in 0..max_inflight {
            let (client, receiver) = (client.clone(), receiver.clone());
            std::thread::Builder::new()
                .name(format!("fr-openai-{i}"))
                .spawn(move || pool_thread(client, receiver))
                .map_err(|e| ModelError::load("cannot start a request thread", e))?;
        }
        tracing::info!(
            model = model_id,
            max_inflight,
            "using an OpenAI-compatible server"
        );
        Ok(Self {
            info: ModelInfo {
                name: model_id.to_string(),
                task: crate::model::ModelType::OpenAi.task().into(),
                input_size: settings.image_max_side,
                device: "remote".into(),
                dtype: "remote".into(),
            },
            model_id: model_id.to_string(),
            settings,
            queue,
            health,
            template: None,
        })
    }

    fn template(&mut self, prompt: &PromptRef) -> Arc<RequestTemplate> {
        match &self.template {
            Some((text, template)) if *text == prompt.text => template.clone(),
            _ => {
                let template = Arc::new(RequestTemplate::new(
                    &self.model_id,
                    &prompt.text,
                    &self.settings,
                ));
                self.template = Some((prompt.text.clone(), template.clone()));
                template
            }
        }
    }
}

impl VisionLanguageModel for OpenAiModel {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// Sends every frame at once and waits for all of them (the engine uses `submit`).
    fn infer(
        &mut self,
        frames: &[&Frame],
        prompt: &PromptRef,
    ) -> Result<Vec<serde_json::Value>, ModelError> {
        let (tx, rx) = mpsc::channel();
        let replies = BatchReplies::new(move |i, r| {
            let _ = tx.send((i, r));
        });
        self.submit(
            frames.iter().map(|f| (*f).clone()).collect(),
            prompt,
            replies,
        );
        let mut outputs = vec![serde_json::Value::Null; frames.len()];
        for _ in 0..frames.len() {
            let (i, result) = rx
                .recv()
                .map_err(|_| ModelError::Inference("the request threads stopped".into()))?;
            outputs[i] = result?;
        }
        Ok(outputs)
    }

    fn max_inflight_frames(&self) -> Option<usize> {
        Some(self.settings.max_inflight.max(1))
    }

    fn submit(&mut self, frames: Vec<Frame>, prompt: &PromptRef, replies: BatchReplies) {
        let template = self.template(prompt);
        for (index, frame) in frames.into_iter().enumerate() {
            let request = FrameRequest {
                frame,
                index,
                template: template.clone(),
                replies: replies.clone(),
            };
            if let Err(mpsc::SendError(request)) = self.queue.send(request) {
                request.replies.frame(
                    index,
                    Err(ModelError::Inference("the request threads stopped".into())),
                );
            }
        }
    }

    fn backend_health(&self) -> Option<Arc<BackendHealth>> {
        Some(self.health.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_never_prints() {
        let settings = OpenAiSettings {
            api_key: Some(ApiKey::new("sk-secret-123")),
            ..OpenAiSettings::default()
        };
        let shown = format!("{settings:?}");
        assert!(!shown.contains("sk-secret-123"), "{shown}");
        assert!(shown.contains("***"));
        assert_eq!(
            ApiKey::new("sk-1").scrub("bad key sk-1 given"),
            "bad key *** given"
        );
    }

    /// A server that echoes the key where the error body is cut: the key is scrubbed
    /// before the clip, so not even its first characters are shown.
    #[test]
    fn a_key_across_the_clip_leaves_no_prefix() {
        let key = ApiKey::new("sk-live-0123456789abcdef");
        // `prefix`, padding, then the key from 3 characters before the cut on.
        let straddling = |prefix: &str| {
            let pad = ERROR_BODY_CHARS - prefix.len() - 3;
            format!(
                "{prefix}{}sk-live-0123456789abcdef and more",
                "x".repeat(pad)
            )
        };
        let shown = error_body(&straddling(""), Some(&key));
        assert!(!shown.contains("sk-"), "{shown}");
        assert!(shown.ends_with('…'), "{shown}");
        let reply = format!("{}\"}}", straddling(r#"{"choices":[],"echo":""#));
        let err = reply_text(&reply, Some(&key)).unwrap_err().to_string();
        assert!(!err.contains("sk-"), "{err}");
        assert!(err.contains("no choices"), "{err}");
    }

    #[test]
    fn frames_shrink_to_the_long_side_and_never_grow() {
        assert_eq!(wire_size(1920, 1080, 768), (768, 432));
        assert_eq!(wire_size(1080, 1920, 768), (432, 768));
        assert_eq!(wire_size(640, 360, 768), (640, 360));
        assert_eq!(wire_size(4000, 1, 768), (768, 1));
    }

    #[test]
    fn replies_become_text_and_json_when_they_parse() {
        assert_eq!(output_for("yes"), serde_json::json!({"text": "yes"}));
        assert_eq!(
            output_for(r#"{"open": true}"#),
            serde_json::json!({"text": r#"{"open": true}"#, "json": {"open": true}})
        );
        let fenced = "```json\n{\"count\": 3}\n```";
        assert_eq!(output_for(fenced)["json"], serde_json::json!({"count": 3}));
        assert_eq!(
            output_for("```\n[1, 2]\n```")["json"],
            serde_json::json!([1, 2])
        );
        assert!(output_for("```python\nprint(1)\n```").get("json").is_none());
        assert_eq!(output_for(" 3 ")["json"], serde_json::json!(3));
    }

    #[test]
    fn reply_text_reads_the_message_content() {
        let body = r#"{"choices":[{"message":{"role":"assistant","content":"a gate"}}]}"#;
        assert_eq!(reply_text(body, None).unwrap(), "a gate");
        let parts = r#"{"choices":[{"message":{"content":[{"type":"text","text":"a "},{"type":"text","text":"gate"}]}}]}"#;
        assert_eq!(reply_text(parts, None).unwrap(), "a gate");
        assert_eq!(
            reply_text("not json", None).unwrap_err().kind(),
            "bad_reply"
        );
        assert_eq!(
            reply_text(r#"{"error":{"message":"x"}}"#, None)
                .unwrap_err()
                .kind(),
            "bad_reply"
        );
    }

    #[test]
    fn retries_wait_what_the_server_asks_else_back_off() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        assert_eq!(parse_retry_after("2", now), Some(Duration::from_secs(2)));
        let date = httpdate::fmt_http_date(now + Duration::from_secs(5));
        assert_eq!(parse_retry_after(&date, now), Some(Duration::from_secs(5)));
        assert_eq!(parse_retry_after("soon", now), None);
        let limited = OpenAiError::RateLimited {
            retry_after: Some(Duration::from_secs(3)),
            body: String::new(),
        };
        assert_eq!(retry_delay(&limited, 5), Duration::from_secs(3));
        let asked_too_long = OpenAiError::RateLimited {
            retry_after: Some(Duration::from_secs(3600)),
            body: String::new(),
        };
        assert_eq!(retry_delay(&asked_too_long, 0), MAX_RETRY_AFTER);
        let down = OpenAiError::Connection("refused".into());
        assert_eq!(retry_delay(&down, 0), FIRST_BACKOFF);
        assert_eq!(retry_delay(&down, 1), FIRST_BACKOFF * 2);
        assert_eq!(retry_delay(&down, 40), MAX_BACKOFF);
        assert!(down.retryable());
        assert!(
            !OpenAiError::Rejected {
                status: 401,
                body: String::new()
            }
            .retryable()
        );
    }

    #[test]
    fn the_body_is_valid_json_with_the_prompt_image_and_format() {
        let settings = OpenAiSettings {
            image_detail: ImageDetail::Low,
            max_tokens: Some(64),
            response_format: Some(serde_json::json!({"type": "object", "properties": {}})),
            ..OpenAiSettings::default()
        };
        let template = RequestTemplate::new("qwen \"vl\"", "Is the gate open?\n", &settings);
        let body: serde_json::Value = serde_json::from_str(&template.body(&[1, 2, 3])).unwrap();
        assert_eq!(body["model"], "qwen \"vl\"");
        let content = &body["messages"][0]["content"];
        assert_eq!(content[0]["text"], "Is the gate open?\n");
        assert_eq!(
            content[1]["image_url"]["url"],
            "data:image/jpeg;base64,AQID"
        );
        assert_eq!(content[1]["image_url"]["detail"], "low");
        assert_eq!(body["max_tokens"], 64);
        assert_eq!(body["response_format"]["type"], "json_schema");
        assert_eq!(
            body["response_format"]["json_schema"]["schema"]["type"],
            "object"
        );
        let whole = serde_json::json!({"type": "json_object"});
        assert_eq!(response_format(&whole), whole);
    }

    #[test]
    fn a_frame_encodes_to_a_jpeg_of_its_wire_size() {
        let frame = Frame::new(100, 50, bytes::Bytes::from(vec![128u8; 100 * 50 * 3])).unwrap();
        let mut compressor = turbojpeg::Compressor::new().unwrap();
        let jpeg = encode_frame(&frame, 40, &mut compressor).unwrap();
        let header = turbojpeg::read_header(&jpeg).unwrap();
        assert_eq!((header.width, header.height), (40, 20));
    }
}
