//! The worker's settings: raw values (from flags or the environment) become one validated,
//! typed `Config` in a single step, or a one-line error naming the variable and what it
//! allows. `SETTINGS` is the one list of names, defaults and meanings; docs/configuration.md
//! and .env.example mirror it (a test keeps them in step).

use crate::engine::{EngineSettings, MAX_BATCH_SIZE_LIMIT};
use crate::health::HealthSettings;
use crate::job::{MAX_FPS, MAX_PROMPT_BYTES, validate_job_id};
use crate::model::remote::openai::{ApiKey, ImageDetail, OpenAiSettings};
use crate::model::{DeviceChoice, DtypeChoice, ModelSettings, ModelType, ParseSettingError};
use crate::pipeline::{PipelineSettings, SnapshotSettings};
use crate::queue::QueueSettings;
use crate::redact::{Secret, redact_url};
use crate::source::SourceSettings;
use crate::source::allowed_hosts::AllowedHosts;
use crate::store::settings::{RedisSettings, RedisTlsFiles};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// One setting: its environment name, its default (`None`: unset), and what it does.
pub struct Setting {
    pub env: &'static str,
    pub default: Option<&'static str>,
    pub help: &'static str,
}

const fn s(env: &'static str, default: Option<&'static str>, help: &'static str) -> Setting {
    Setting { env, default, help }
}

/// Every setting the worker reads.
pub const SETTINGS: &[Setting] = &[
    s(
        "REDIS_URL",
        None,
        "Redis URL (redis:// or rediss:// for TLS). When unset it is built from REDIS_HOST, REDIS_PORT, REDIS_PASSWORD and REDIS_DB.",
    ),
    s(
        "REDIS_CLUSTER_NODES",
        None,
        "Seed nodes of a Redis Cluster, comma-separated (`redis://host:port`, `rediss://` for TLS, or `host:port`, which takes REDIS_PASSWORD, so that a scaler can read the same list). When set, the worker and the CLI use the Cluster and REDIS_URL and its parts are not used.",
    ),
    s(
        "REDIS_HOST",
        Some("localhost"),
        "Redis host, used when REDIS_URL is unset.",
    ),
    s(
        "REDIS_PORT",
        Some("6379"),
        "Redis port, used when REDIS_URL is unset.",
    ),
    s(
        "REDIS_PASSWORD",
        None,
        "Redis password, used when REDIS_URL is unset, and for REDIS_CLUSTER_NODES given as host:port.",
    ),
    s(
        "REDIS_DB",
        Some("0"),
        "Redis database number, used when REDIS_URL is unset.",
    ),
    s(
        "REDIS_TLS_CA_FILE",
        None,
        "PEM file of the certificate authorities a rediss:// server's certificate must chain to, instead of the system's (a private CA). Only with a rediss:// REDIS_URL.",
    ),
    s(
        "REDIS_TLS_CERT_FILE",
        None,
        "PEM client certificate for mutual TLS (Redis `tls-auth-clients yes`); needs REDIS_TLS_KEY_FILE. Only with a rediss:// REDIS_URL.",
    ),
    s(
        "REDIS_TLS_KEY_FILE",
        None,
        "PEM private key of REDIS_TLS_CERT_FILE.",
    ),
    s(
        "KEY_PREFIX",
        Some("fr"),
        "Prefix of every key: the queue's keys are `{KEY_PREFIX}:...` (one hash tag, one Cluster slot), each job's results and progress `{KEY_PREFIX:<job_id>}:...` (a slot of its own).",
    ),
    s(
        "MODEL_TYPE",
        Some("clip"),
        "Model backend: clip, siglip, owlvit, yoloworld (open-vocabulary boxes fast enough for live cameras; MODEL_PATH from scripts/convert-yoloworld.py), blip, paligemma (a generative VLM: PaliGemma task prompts), openai (a VLM behind an OpenAI-compatible server, see OPENAI_BASE_URL), null (no model: one empty output per frame, for pipeline tests and benchmarks), or test-colour (a test model that detects the colours the prompt names by counting pixels, for alert tests and benchmarks: see docs/models.md).",
    ),
    s(
        "MODEL_PATH",
        None,
        "Local folder with config.json, model.safetensors and tokenizer.json.",
    ),
    s(
        "MODEL_ID",
        None,
        "Hugging Face model id, used when MODEL_PATH is unset and the hub is reachable (default per MODEL_TYPE). With MODEL_TYPE=openai: the model name the server serves (required).",
    ),
    s(
        "DEVICE",
        Some("auto"),
        "auto, cpu or cuda (cuda needs a build with the `cuda` feature).",
    ),
    s(
        "DTYPE",
        Some("auto"),
        "Number format of the image towers' matrix products: auto, f32 or bf16. auto picks bf16 on a CPU with AMX-BF16 or AVX512-BF16 (yoloworld's convolutions: with AMX-BF16, or with AVX512-BF16 on a CPU that is not Intel's), else f32; bf16 where there is no bf16 product is an error (docs/models.md).",
    ),
    s(
        "DEFAULT_FPS",
        Some("2.0"),
        "Frames per second sampled when a job gives no fps; (0, 30].",
    ),
    s(
        "DEFAULT_PROMPT",
        Some("Detect all people and vehicles"),
        "Prompt for jobs that follow the active prompt while none has been set (reported as version 0).",
    ),
    s(
        "MAX_BATCH_SIZE",
        Some("8"),
        "Most frames per model batch, across all jobs of the worker; 1 to 64 (the larger batches are for a GPU).",
    ),
    s(
        "BATCH_WINDOW_MS",
        Some("20"),
        "How long the engine waits to fill a batch once it has a frame.",
    ),
    s(
        "MAX_FRAME_AGE_MS",
        Some("5000"),
        "Frames older than this when the model could take them are skipped and counted.",
    ),
    s(
        "LIVE_QUEUE_MS",
        Some("1000"),
        "How much of a live stream may wait for the model: this long's worth of frames at the job's fps, and every frame that arrived within this long (a whole HLS segment arrives at once), at most 64 frames; past that the oldest waiting frame is dropped for a newer one.",
    ),
    s(
        "INFERENCE_TIMEOUT_MS",
        Some("30000"),
        "Bound on one model batch; its frames get error entries when it is exceeded.",
    ),
    s(
        "DETECT_THRESHOLD",
        None,
        "Score over which a phrase is listed as detected; [0, 1]. Default per model: clip 0.5 (presence against neutral captions), siglip 0.1 (probability), owlvit 0.1 (box score), yoloworld 0.25 (box score, the reference's confidence threshold); paligemma has no scores and lists the label of every box it generates; see docs/models.md.",
    ),
    s(
        "NMS_IOU",
        None,
        "owlvit and yoloworld: drop a box that overlaps a better box of the same label by more than this IoU, in (0, 1]; unset keeps every box for owlvit and means 0.7 for yoloworld, as their references do.",
    ),
    s(
        "SCENE_GATE",
        Some("true"),
        "Skip the model on frames where the scene has not changed and repeat the last output (entries say `reused_from`); a job's `scene_gate` field (on/off) overrides it.",
    ),
    s(
        "SCENE_CHANGE_MIN_AREA",
        Some("0.002"),
        "Share of the frame (0 to 1] that must change, against what the model last saw, for the model to run on a frame when the scene gate is on.",
    ),
    s(
        "SCENE_MAX_REUSE_MS",
        Some("10000"),
        "The longest (in capture time) the scene gate repeats one model output before the model runs again; each job refreshes at a moment of its own in the last quarter of it, so jobs started together do not all refresh at once.",
    ),
    s(
        "SNAPSHOTS_PER_MIN",
        Some("6"),
        "Most event pictures (JPEG, at most 1280x720 and 100,000 bytes) a job keeps per minute, across its deliveries: an alert `start` or a zone or line event beyond it carries no `snapshot`; 0 turns them off. Each is kept RESULT_TTL_S from when it was taken.",
    ),
    s(
        "SNAPSHOT_INTERVAL_MS",
        Some("5000"),
        "How often a running job refreshes its latest annotated frame (`{fr:<job_id>}:latest`, what `free-roam snapshot` shows), at most; 0 turns it off.",
    ),
    s(
        "MAX_NEW_TOKENS",
        Some("20"),
        "blip and paligemma: most tokens generated per caption or answer.",
    ),
    s(
        "OPENAI_BASE_URL",
        None,
        "openai: the server's API root, requests go to {OPENAI_BASE_URL}/chat/completions (e.g. http://host:8000/v1 for vLLM, http://host:11434/v1 for Ollama, http://host:8080/v1 for llama.cpp); required with MODEL_TYPE=openai.",
    ),
    s(
        "OPENAI_API_KEY",
        None,
        "openai: sent as `Authorization: Bearer`; unset sends none. Never logged nor shown in health output or heartbeats.",
    ),
    s(
        "OPENAI_IMAGE_DETAIL",
        Some("auto"),
        "openai: the image part's `detail`: auto, low or high.",
    ),
    s(
        "OPENAI_IMAGE_MAX_SIDE",
        Some("768"),
        "openai: frames are scaled down (never up) to this long side, 16 to 8192, before JPEG encoding.",
    ),
    s(
        "OPENAI_RESPONSE_FORMAT",
        None,
        "openai: JSON sent as `response_format`, for servers with structured output: a whole response_format object (type json_schema, json_object or text) or a bare JSON schema, sent as {\"type\": \"json_schema\", \"json_schema\": {\"name\": \"output\", \"schema\": ...}}.",
    ),
    s(
        "OPENAI_MAX_TOKENS",
        None,
        "openai: sent as `max_tokens` when set; unset leaves the server's default.",
    ),
    s(
        "OPENAI_MAX_INFLIGHT",
        Some("8"),
        "openai: most requests out at once per worker (frames of one batch and of later batches are sent while earlier ones are out).",
    ),
    s(
        "OPENAI_TIMEOUT_MS",
        Some("20000"),
        "openai: bound on one request, connecting included; a frame's retries together are bounded by INFERENCE_TIMEOUT_MS.",
    ),
    s(
        "OPENAI_MAX_RETRIES",
        Some("3"),
        "openai: retries of a request answered 429 or 5xx, timed out or not answered, with exponential backoff from 250 ms (up to 8 s), or what `Retry-After` asks (up to 30 s).",
    ),
    s(
        "MAX_CONCURRENT_STREAMS",
        Some("10"),
        "Most jobs one worker runs at once.",
    ),
    s(
        "JOB_LEASE_MS",
        Some("15000"),
        "A running job's entry that has not been renewed for this long is reclaimed by another worker.",
    ),
    s(
        "RECLAIM_INTERVAL_MS",
        Some("1000"),
        "How often the fleet's sweeper (one worker) ticks and so asks whether a worker's lease lapsed, whose entries are then taken at once: every second or at this period, whichever is shorter; the other workers tick every 3 s and are woken at once for handed-back entries and cancels. Below JOB_LEASE_MS.",
    ),
    s(
        "MAX_ATTEMPTS",
        Some("3"),
        "Deliveries (not counting graceful hand-backs) after which a job is dead-lettered.",
    ),
    s(
        "RESULT_TTL_S",
        Some("86400"),
        "How long a finished job's hash and results are kept.",
    ),
    s(
        "RESULTS_MAXLEN",
        Some("10000"),
        "Approximate cap on each results stream (MAXLEN ~).",
    ),
    s(
        "EVENTS_MAXLEN",
        Some("10000"),
        "Approximate cap on the events stream (MAXLEN ~).",
    ),
    s(
        "ALERTS_MAXLEN",
        Some("10000"),
        "Approximate cap on the alerts stream (MAXLEN ~).",
    ),
    s(
        "PROMPT_HISTORY_MAX",
        Some("100"),
        "Prompt versions kept in the prompt history, newest first (`fr_prompt_set` trims the rest).",
    ),
    s(
        "QUEUE_SHARDS_SERVED",
        Some("0"),
        "How many of the fleet's queue shards this worker serves (`free-roam queue shards` sets the fleet's count; workers read it at start and about every 30 s): 0 serves all of them, and the shards a larger count adds; N serves N consecutive shards from the one the worker's id hashes to. See docs/operations.md, \"Queue shards\".",
    ),
    s(
        "SOURCE_RETRIES",
        Some("5"),
        "Restarts of a failed HLS source (exponential backoff) before the job fails.",
    ),
    s(
        "STALL_TIMEOUT_MS",
        Some("30000"),
        "A stream that delivers no frame for this long is broken: an HLS or RTSP source restarts ffmpeg (up to SOURCE_RETRIES times, then the job fails); a Redis frame stream job fails (a stream deleted mid-job, a producer that stopped, a stream never written). Time while Redis itself does not answer is not counted.",
    ),
    s(
        "ALLOW_FILE_SOURCES",
        Some("false"),
        "Allow local paths and file: URLs as stream_ref (off: a stream_ref comes from anyone who can write to Redis).",
    ),
    s(
        "ALLOWED_STREAM_HOSTS",
        None,
        "Hosts HLS and RTSP streams may be fetched from, comma-separated: `cam1.example.com`, `*.example.com` (names below it), `10.0.0.5`, `[fd00::5]`, each optionally with `:port`; unset allows any host. A job whose stream_ref names another host fails at once. An http:// stream is fetched through a proxy inside the worker that refuses any other host a playlist points to (variants, segments, keys, redirects) and fails the job naming it; https:// streams are refused while it is set (docs/security.md).",
    ),
    s(
        "MAX_FRAME_SIDE",
        None,
        "Longest side HLS frames are scaled to when decoded (default: twice the model's input size, so a 16:9 frame keeps its short side at full model resolution).",
    ),
    s(
        "MAX_FRAME_PIXELS",
        Some("16777216"),
        "Largest image (width x height) a frame stream entry may decode to, checked from its header before decoding. The default, 4096 x 4096, is 48 MiB of decoded RGB per frame and job (a small compressed file can claim that much: a 117 KB PNG or a 234 KB JPEG decodes to 120 MB at 6320 x 6320); 4K UHD is 8.3 MP and large cameras 12 MP. Raise it only for a camera that needs it: the worst case is MAX_CONCURRENT_STREAMS times this times 3 bytes.",
    ),
    s(
        "HEALTH_ADDR",
        Some("0.0.0.0:8080"),
        "Address of the health and metrics endpoint.",
    ),
    s(
        "LOG_LEVEL",
        Some("info"),
        "trace, debug, info, warning (warn), error (critical).",
    ),
    s(
        "LOG_FORMAT",
        Some("text"),
        "text or json. Text is coloured only when stderr is a terminal; NO_COLOR turns colour off.",
    ),
    s(
        "WORKER_ID",
        None,
        "This worker's consumer name; default host-pid-<boot uuid>.",
    ),
    s(
        "SHUTDOWN_TIMEOUT_MS",
        Some("10000"),
        "How long a stopping worker waits for its jobs to hand back before it exits.",
    ),
];

/// The settings that say where Redis is and which keys are ours: the only ones the client
/// commands (`submit`, `status`, `results`, ...) take; every other setting is the worker's.
pub const CONNECTION_SETTINGS: &[&str] = &[
    "REDIS_URL",
    "REDIS_CLUSTER_NODES",
    "REDIS_HOST",
    "REDIS_PORT",
    "REDIS_PASSWORD",
    "REDIS_DB",
    "REDIS_TLS_CA_FILE",
    "REDIS_TLS_CERT_FILE",
    "REDIS_TLS_KEY_FILE",
    "KEY_PREFIX",
];

/// Settings whose values are or may hold a secret: never shown (`--help` hides their
/// values; errors and `Debug` mask the Redis URLs through [`crate::redact`], and the API key
/// is an [`ApiKey`], whose `Debug` prints `***`).
pub const SECRET_SETTINGS: &[&str] = &[
    "REDIS_URL",
    "REDIS_CLUSTER_NODES",
    "REDIS_PASSWORD",
    "OPENAI_API_KEY",
];

/// A bad setting: which variable, what it held, what is allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {name}={value:?}: {allowed}")]
pub struct ConfigError {
    pub name: String,
    pub value: String,
    pub allowed: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// The validated configuration, one part per component, each part owned by the component
/// that uses it. The Redis URLs are [`Secret`]s: printing a `Config` masks their passwords.
#[derive(Clone, Debug)]
pub struct Config {
    pub redis: RedisSettings,
    pub queue: QueueSettings,
    pub engine: EngineSettings,
    pub model: ModelSettings,
    pub source: SourceSettings,
    pub pipeline: PipelineSettings,
    pub health: HealthSettings,
    pub log: LogSettings,
}

/// How the worker logs (`LOG_LEVEL`, `LOG_FORMAT`); the binary sets its subscriber up from it.
#[derive(Clone, Debug)]
pub struct LogSettings {
    pub level: String,
    pub format: LogFormat,
}

struct Reader<'a> {
    lookup: &'a dyn Fn(&str) -> Option<String>,
}

impl Reader<'_> {
    /// The raw value: given, or the default from `SETTINGS`.
    fn raw(&self, name: &str) -> Option<String> {
        (self.lookup)(name)
            .filter(|v| !v.trim().is_empty())
            .or_else(|| {
                SETTINGS
                    .iter()
                    .find(|s| s.env == name)
                    .and_then(|s| s.default.map(str::to_string))
            })
    }

    fn err(name: &str, value: &str, allowed: &str) -> ConfigError {
        ConfigError {
            name: name.into(),
            value: redact_url(value),
            allowed: allowed.into(),
        }
    }

    fn string(&self, name: &str) -> String {
        self.raw(name).unwrap_or_default()
    }

    fn parse<T: std::str::FromStr>(
        &self,
        name: &str,
        allowed: &str,
        ok: impl Fn(&T) -> bool,
    ) -> Result<T, ConfigError> {
        let raw = self.string(name);
        match raw.trim().parse::<T>() {
            Ok(v) if ok(&v) => Ok(v),
            _ => Err(Self::err(name, &raw, allowed)),
        }
    }

    fn millis(&self, name: &str, min: u64) -> Result<Duration, ConfigError> {
        self.parse::<u64>(
            name,
            &format!("a whole number of milliseconds, at least {min}"),
            |v| *v >= min,
        )
        .map(Duration::from_millis)
    }

    fn count(&self, name: &str, min: usize) -> Result<usize, ConfigError> {
        self.parse::<usize>(name, &format!("a whole number, at least {min}"), |v| {
            *v >= min
        })
    }

    fn boolean(&self, name: &str) -> Result<bool, ConfigError> {
        let raw = self.string(name);
        match raw.trim().to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => Ok(true),
            "0" | "false" | "no" | "off" => Ok(false),
            _ => Err(Self::err(name, &raw, "true or false")),
        }
    }

    /// A word the model's own types parse, with their message of what they accept.
    fn word<T: std::str::FromStr<Err = ParseSettingError>>(
        &self,
        name: &str,
    ) -> Result<T, ConfigError> {
        let raw = self.string(name);
        raw.parse().map_err(|e: ParseSettingError| {
            Self::err(name, &raw, &format!("one of {}", e.expected))
        })
    }

    fn one_of(&self, name: &str, allowed: &[&str]) -> Result<String, ConfigError> {
        let raw = self.string(name);
        let v = raw.trim().to_ascii_lowercase();
        if allowed.contains(&v.as_str()) {
            Ok(v)
        } else {
            Err(Self::err(
                name,
                &raw,
                &format!("one of {}", allowed.join(", ")),
            ))
        }
    }
}

impl Reader<'_> {
    /// The OPENAI_* settings; OPENAI_BASE_URL and MODEL_ID are required when `used`.
    fn openai(&self, used: bool) -> Result<OpenAiSettings, ConfigError> {
        let base_url = self.raw("OPENAI_BASE_URL").unwrap_or_default();
        let base_url = base_url.trim();
        if !(base_url.starts_with("http://") || base_url.starts_with("https://"))
            && (used || !base_url.is_empty())
        {
            return Err(Self::err(
                "OPENAI_BASE_URL",
                base_url,
                "an http:// or https:// URL of the server's API root, e.g. http://host:8000/v1",
            ));
        }
        if used && self.raw("MODEL_ID").is_none() {
            return Err(Self::err(
                "MODEL_ID",
                "",
                "the model name the server serves (required with MODEL_TYPE=openai)",
            ));
        }
        let image_detail: ImageDetail = self
            .one_of("OPENAI_IMAGE_DETAIL", &["auto", "low", "high"])?
            .parse()
            .map_err(|_| Self::err("OPENAI_IMAGE_DETAIL", "", "one of auto, low, high"))?;
        let response_format = match self.raw("OPENAI_RESPONSE_FORMAT") {
            None => None,
            Some(raw) => match serde_json::from_str::<serde_json::Value>(&raw) {
                Ok(v) if v.is_object() => Some(v),
                _ => {
                    return Err(Self::err(
                        "OPENAI_RESPONSE_FORMAT",
                        &raw,
                        "a JSON object: a response_format or a JSON schema",
                    ));
                }
            },
        };
        Ok(OpenAiSettings {
            base_url: base_url.to_string(),
            api_key: self.raw("OPENAI_API_KEY").map(ApiKey::new),
            image_detail,
            image_max_side: self.parse(
                "OPENAI_IMAGE_MAX_SIDE",
                "a number of pixels, 16 to 8192",
                |v: &u32| (16..=8192).contains(v),
            )?,
            response_format,
            max_tokens: match self.raw("OPENAI_MAX_TOKENS") {
                None => None,
                Some(_) => Some(self.parse(
                    "OPENAI_MAX_TOKENS",
                    "a whole number, at least 1",
                    |v: &u32| *v >= 1,
                )?),
            },
            max_inflight: self.count("OPENAI_MAX_INFLIGHT", 1)?,
            timeout: self.millis("OPENAI_TIMEOUT_MS", 1)?,
            max_retries: self.parse(
                "OPENAI_MAX_RETRIES",
                "a whole number, 0 or more",
                |_: &u32| true,
            )?,
        })
    }
}

impl Config {
    /// Reads every setting through `lookup` (flag value, else environment), applies the
    /// defaults, and validates. The first bad value is the error.
    pub fn from_lookup(lookup: &dyn Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let r = Reader { lookup };
        Ok(Config {
            redis: r.redis()?,
            queue: r.queue()?,
            engine: r.engine()?,
            model: r.model()?,
            source: r.source()?,
            pipeline: r.pipeline()?,
            health: HealthSettings {
                addr: r.parse(
                    "HEALTH_ADDR",
                    "host:port, e.g. 0.0.0.0:8080",
                    |_: &SocketAddr| true,
                )?,
            },
            log: r.log()?,
        })
    }

    /// The defaults alone (what an empty environment gives).
    pub fn defaults() -> Self {
        Self::from_lookup(&|_| None).expect("the defaults are valid")
    }
}

impl Reader<'_> {
    /// `REDIS_URL`, else one built from `REDIS_HOST`, `REDIS_PORT`, `REDIS_DB` and
    /// `REDIS_PASSWORD`.
    fn redis_url(&self) -> Result<String, ConfigError> {
        let Some(url) = (self.lookup)("REDIS_URL").filter(|v| !v.trim().is_empty()) else {
            let host = self.string("REDIS_HOST");
            let port: u16 = self.parse("REDIS_PORT", "a port number, 1 to 65535", |p| *p > 0)?;
            let db: u32 = self.parse("REDIS_DB", "a database number, 0 or more", |_| true)?;
            return Ok(match self.raw("REDIS_PASSWORD") {
                Some(pw) => format!("redis://:{}@{host}:{port}/{db}", percent_encode(&pw)),
                None => format!("redis://{host}:{port}/{db}"),
            });
        };
        let url = url.trim().to_string();
        let schemes = ["redis://", "rediss://", "unix://", "redis+unix://"];
        if !schemes.iter().any(|s| url.starts_with(s)) {
            return Err(Self::err(
                "REDIS_URL",
                &url,
                "a redis://, rediss:// or unix:// URL",
            ));
        }
        Ok(url)
    }

    fn cluster_nodes(&self) -> Result<Vec<String>, ConfigError> {
        let Some(list) = self.raw("REDIS_CLUSTER_NODES") else {
            return Ok(Vec::new());
        };
        let password = self.raw("REDIS_PASSWORD");
        let mut nodes = Vec::new();
        for node in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            let url = match &password {
                _ if node.contains("://") => node.to_string(),
                Some(pw) => format!("redis://:{}@{node}", percent_encode(pw)),
                None => format!("redis://{node}"),
            };
            if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
                return Err(Self::err(
                    "REDIS_CLUSTER_NODES",
                    &list,
                    "comma-separated redis://host:port, rediss://host:port or host:port",
                ));
            }
            nodes.push(url);
        }
        if nodes.is_empty() {
            return Err(Self::err(
                "REDIS_CLUSTER_NODES",
                &list,
                "at least one node: redis://host:port or host:port",
            ));
        }
        Ok(nodes)
    }

    fn redis_tls(&self) -> Result<RedisTlsFiles, ConfigError> {
        let client_cert = match (
            self.raw("REDIS_TLS_CERT_FILE"),
            self.raw("REDIS_TLS_KEY_FILE"),
        ) {
            (None, None) => None,
            (Some(cert), Some(key)) => Some((PathBuf::from(cert), PathBuf::from(key))),
            (Some(cert), None) => {
                let why = "set together with REDIS_TLS_KEY_FILE";
                return Err(Self::err("REDIS_TLS_CERT_FILE", &cert, why));
            }
            (None, Some(key)) => {
                let why = "set together with REDIS_TLS_CERT_FILE";
                return Err(Self::err("REDIS_TLS_KEY_FILE", &key, why));
            }
        };
        Ok(RedisTlsFiles {
            ca_file: self.raw("REDIS_TLS_CA_FILE").map(PathBuf::from),
            client_cert,
        })
    }

    fn redis(&self) -> Result<RedisSettings, ConfigError> {
        let url = self.redis_url()?;
        let cluster_nodes = self.cluster_nodes()?;
        let tls = self.redis_tls()?;
        if !tls.is_empty() {
            let name = if tls.ca_file.is_some() {
                "REDIS_TLS_CA_FILE"
            } else {
                "REDIS_TLS_CERT_FILE"
            };
            let value = self.string(name);
            if !cluster_nodes.is_empty() {
                return Err(Self::err(
                    name,
                    &value,
                    "not supported with REDIS_CLUSTER_NODES yet (a Cluster over rediss:// uses the system's trust store)",
                ));
            }
            if !url.starts_with("rediss://") {
                return Err(Self::err(name, &value, "only with a rediss:// REDIS_URL"));
            }
        }
        let key_prefix = self.string("KEY_PREFIX");
        let allowed = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':');
        if key_prefix.is_empty() || key_prefix.len() > 64 || !key_prefix.bytes().all(allowed) {
            return Err(Self::err(
                "KEY_PREFIX",
                &key_prefix,
                "1 to 64 of letters, digits, '_', '-', '.', ':'",
            ));
        }
        Ok(RedisSettings {
            url: Secret::new(url),
            cluster_nodes: cluster_nodes.into_iter().map(Secret::new).collect(),
            tls,
            key_prefix,
        })
    }

    fn log(&self) -> Result<LogSettings, ConfigError> {
        let levels = [
            "trace", "debug", "info", "warn", "warning", "error", "critical",
        ];
        let level = match self.one_of("LOG_LEVEL", &levels)?.as_str() {
            "warning" => "warn".to_string(),
            "critical" => "error".to_string(),
            other => other.to_string(),
        };
        let format = match self.one_of("LOG_FORMAT", &["text", "json"])?.as_str() {
            "json" => LogFormat::Json,
            _ => LogFormat::Text,
        };
        Ok(LogSettings { level, format })
    }

    fn queue(&self) -> Result<QueueSettings, ConfigError> {
        let worker_id = match self.raw("WORKER_ID") {
            Some(id) if validate_job_id(&id).is_err() => {
                let why = "1 to 128 of letters, digits, '.', '_', ':', '-'";
                return Err(Self::err("WORKER_ID", &id, why));
            }
            other => other,
        };
        let job_lease = self.millis("JOB_LEASE_MS", 1000)?;
        // A worker calls in once per pass: passes a lease apart would read as the server's
        // outage and hold reclaiming for good (fr_job_reclaim).
        let reclaim_interval = self.millis("RECLAIM_INTERVAL_MS", 50)?;
        if reclaim_interval >= job_lease {
            return Err(Self::err(
                "RECLAIM_INTERVAL_MS",
                &self.string("RECLAIM_INTERVAL_MS"),
                "a whole number of milliseconds, at least 50 and below JOB_LEASE_MS",
            ));
        }
        let default_prompt = self.string("DEFAULT_PROMPT");
        if default_prompt.len() > MAX_PROMPT_BYTES {
            return Err(Self::err(
                "DEFAULT_PROMPT",
                &default_prompt,
                "at most 8192 bytes",
            ));
        }
        Ok(QueueSettings {
            worker_id,
            max_concurrent_streams: self.count("MAX_CONCURRENT_STREAMS", 1)?,
            job_lease,
            reclaim_interval,
            max_attempts: self.parse("MAX_ATTEMPTS", "a whole number, at least 1", |v: &u32| {
                *v >= 1
            })?,
            shutdown_timeout: self.millis("SHUTDOWN_TIMEOUT_MS", 0)?,
            default_fps: self.parse("DEFAULT_FPS", "a number in (0, 30]", |f: &f64| {
                f.is_finite() && *f > 0.0 && *f <= MAX_FPS
            })?,
            default_prompt,
            result_ttl: self.result_ttl()?,
            results_maxlen: self.count("RESULTS_MAXLEN", 1)?,
            events_maxlen: self.count("EVENTS_MAXLEN", 1)?,
            alerts_maxlen: self.count("ALERTS_MAXLEN", 1)?,
            prompt_history_max: self.count("PROMPT_HISTORY_MAX", 1)?,
            shards_served: self.parse::<u32>("QUEUE_SHARDS_SERVED", "a whole number", |_| true)?,
        })
    }

    fn engine(&self) -> Result<EngineSettings, ConfigError> {
        Ok(EngineSettings {
            max_batch_size: self.parse::<usize>(
                "MAX_BATCH_SIZE",
                &format!("a whole number from 1 to {MAX_BATCH_SIZE_LIMIT}"),
                |v| (1..=MAX_BATCH_SIZE_LIMIT).contains(v),
            )?,
            batch_window: self.millis("BATCH_WINDOW_MS", 0)?,
            max_frame_age: self.millis("MAX_FRAME_AGE_MS", 1)?,
            inference_timeout: self.millis("INFERENCE_TIMEOUT_MS", 1)?,
            live_queue: self.millis("LIVE_QUEUE_MS", 0)?,
        })
    }

    /// A setting that is unset (`None`) or one value `ok` accepts.
    fn optional<T: std::str::FromStr>(
        &self,
        name: &str,
        allowed: &str,
        ok: impl Fn(&T) -> bool,
    ) -> Result<Option<T>, ConfigError> {
        match self.raw(name) {
            None => Ok(None),
            Some(_) => self.parse(name, allowed, ok).map(Some),
        }
    }

    fn model(&self) -> Result<ModelSettings, ConfigError> {
        let model_type = self.word::<ModelType>("MODEL_TYPE")?;
        let device = self.word::<DeviceChoice>("DEVICE")?;
        let dtype = self.word::<DtypeChoice>("DTYPE")?;
        Ok(ModelSettings {
            model_type,
            model_path: self.raw("MODEL_PATH").map(PathBuf::from),
            model_id: self.raw("MODEL_ID"),
            device,
            dtype,
            max_new_tokens: self.count("MAX_NEW_TOKENS", 1)?,
            detect_threshold: self.optional(
                "DETECT_THRESHOLD",
                "a score in [0, 1]",
                |t: &f32| (0.0..=1.0).contains(t),
            )?,
            nms_iou: self.optional("NMS_IOU", "an IoU in (0, 1]", |t: &f32| {
                *t > 0.0 && *t <= 1.0
            })?,
            openai: self.openai(model_type == ModelType::OpenAi)?,
        })
    }

    fn source(&self) -> Result<SourceSettings, ConfigError> {
        let hosts = self.string("ALLOWED_STREAM_HOSTS");
        Ok(SourceSettings {
            retries: self.parse("SOURCE_RETRIES", "a whole number, 0 or more", |_: &u32| {
                true
            })?,
            stall_timeout: self.millis("STALL_TIMEOUT_MS", 1000)?,
            allow_files: self.boolean("ALLOW_FILE_SOURCES")?,
            allowed_hosts: AllowedHosts::parse(&hosts)
                .map_err(|why| Self::err("ALLOWED_STREAM_HOSTS", &hosts, &why))?,
            max_side: self.optional("MAX_FRAME_SIDE", "a number of pixels, 16 to 8192", |v| {
                (16..=8192).contains(v)
            })?,
            max_pixels: self.parse(
                "MAX_FRAME_PIXELS",
                "a whole number, at least 1",
                |v: &u64| *v >= 1,
            )?,
        })
    }

    /// RESULT_TTL_S: how long a job's results, and so its pictures, are kept.
    fn result_ttl(&self) -> Result<Duration, ConfigError> {
        Ok(Duration::from_secs(self.parse(
            "RESULT_TTL_S",
            "a whole number of seconds, at least 1",
            |v: &u64| *v >= 1,
        )?))
    }

    fn pipeline(&self) -> Result<PipelineSettings, ConfigError> {
        Ok(PipelineSettings {
            scene_gate: self.boolean("SCENE_GATE")?,
            scene_change_min_area: self.parse(
                "SCENE_CHANGE_MIN_AREA",
                "a share of the frame in (0, 1]",
                |a: &f32| *a > 0.0 && *a <= 1.0,
            )?,
            scene_max_reuse: self.millis("SCENE_MAX_REUSE_MS", 0)?,
            alerts_maxlen: self.count("ALERTS_MAXLEN", 1)?,
            snapshots: SnapshotSettings {
                per_minute: self.parse("SNAPSHOTS_PER_MIN", "a whole number", |_: &u32| true)?,
                interval: self.millis("SNAPSHOT_INTERVAL_MS", 0)?,
                ttl: self.result_ttl()?,
            },
        })
    }
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::path::Path;

    fn with(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(&move |name| map.get(name).cloned())
    }

    #[test]
    fn defaults_match_the_contract() {
        let c = Config::defaults();
        assert_eq!(c.redis.url, "redis://localhost:6379/0");
        assert_eq!(c.redis.key_prefix, "fr");
        assert_eq!(c.queue.default_fps, 2.0);
        assert_eq!(c.queue.job_lease, Duration::from_millis(15000));
        assert_eq!(c.queue.max_attempts, 3);
        assert_eq!(c.queue.result_ttl, Duration::from_secs(86400));
        assert_eq!(c.model.model_type, ModelType::Clip);
        assert!(!c.source.allow_files);
        assert!(c.source.allowed_hosts.is_empty());
        assert!(c.pipeline.scene_gate);
        assert_eq!(c.pipeline.scene_change_min_area, 0.002);
        assert_eq!(c.pipeline.scene_max_reuse, Duration::from_secs(10));
        assert_eq!(c.pipeline.snapshots.per_minute, 6);
        assert_eq!(c.pipeline.snapshots.interval, Duration::from_secs(5));
        assert_eq!(c.pipeline.snapshots.ttl, c.queue.result_ttl);
    }

    #[test]
    fn cluster_nodes_given_as_host_port_take_the_password() {
        let c = with(&[
            ("REDIS_CLUSTER_NODES", "a:7000, redis://:own@b:7001"),
            ("REDIS_PASSWORD", "p@ss word"),
        ])
        .unwrap();
        let nodes: Vec<&str> = c.redis.cluster_nodes.iter().map(|n| n.expose()).collect();
        assert_eq!(
            nodes,
            ["redis://:p%40ss%20word@a:7000", "redis://:own@b:7001"]
        );
        assert!(!format!("{:?}", c.redis).contains("p%40ss"));
        let c = with(&[("REDIS_CLUSTER_NODES", "a:7000")]).unwrap();
        assert_eq!(c.redis.cluster_nodes[0].expose(), "redis://a:7000");
    }

    #[test]
    fn redis_url_is_built_from_parts_with_an_escaped_password() {
        let c = with(&[
            ("REDIS_HOST", "cache"),
            ("REDIS_PORT", "6380"),
            ("REDIS_PASSWORD", "p@ss word"),
            ("REDIS_DB", "2"),
        ])
        .unwrap();
        assert_eq!(c.redis.url, "redis://:p%40ss%20word@cache:6380/2");
        let c = with(&[("REDIS_URL", "rediss://h:6379"), ("REDIS_HOST", "ignored")]).unwrap();
        assert_eq!(c.redis.url, "rediss://h:6379");
    }

    #[test]
    fn max_batch_size_goes_up_to_a_gpus_batch() {
        let c = with(&[("MAX_BATCH_SIZE", "64")]).unwrap();
        assert_eq!(c.engine.max_batch_size, MAX_BATCH_SIZE_LIMIT);
    }

    #[test]
    fn bad_values_name_the_variable_and_what_is_allowed() {
        let cases = [
            ("DEFAULT_FPS", "0"),
            ("DEFAULT_FPS", "abc"),
            ("MAX_BATCH_SIZE", "0"),
            ("MAX_BATCH_SIZE", "65"),
            ("JOB_LEASE_MS", "10"),
            ("LOG_FORMAT", "xml"),
            ("DEVICE", "tpu"),
            ("HEALTH_ADDR", "nowhere"),
            ("KEY_PREFIX", "a{b}"),
            ("ALLOW_FILE_SOURCES", "maybe"),
            ("ALLOWED_STREAM_HOSTS", "cam.example,a*.example.com"),
            ("REDIS_URL", "http://x"),
            ("MODEL_TYPE", "gpt"),
            ("SCENE_GATE", "sometimes"),
            ("SCENE_CHANGE_MIN_AREA", "0"),
            ("SCENE_CHANGE_MIN_AREA", "1.5"),
            ("OPENAI_IMAGE_DETAIL", "ultra"),
            ("OPENAI_IMAGE_MAX_SIDE", "8"),
            ("OPENAI_RESPONSE_FORMAT", "not json"),
            ("OPENAI_BASE_URL", "ftp://x"),
        ];
        for (name, value) in cases {
            let e = with(&[(name, value)]).unwrap_err();
            assert_eq!(e.name, name);
            let line = e.to_string();
            assert!(line.starts_with(&format!("invalid {name}=")), "{line}");
            assert!(!line.contains('\n'));
        }
    }

    #[test]
    fn openai_needs_a_server_and_a_model_and_hides_its_key() {
        let e = with(&[("MODEL_TYPE", "openai"), ("MODEL_ID", "m")]).unwrap_err();
        assert_eq!(e.name, "OPENAI_BASE_URL");
        let e = with(&[
            ("MODEL_TYPE", "openai"),
            ("OPENAI_BASE_URL", "http://h:8000/v1"),
        ])
        .unwrap_err();
        assert_eq!(e.name, "MODEL_ID");
        let c = with(&[
            ("MODEL_TYPE", "openai"),
            ("MODEL_ID", "qwen2-vl"),
            ("OPENAI_BASE_URL", "http://h:8000/v1"),
            ("OPENAI_API_KEY", "sk-very-secret"),
            ("OPENAI_IMAGE_DETAIL", "LOW"),
            ("OPENAI_RESPONSE_FORMAT", r#"{"type": "object"}"#),
        ])
        .unwrap();
        assert_eq!(c.model.openai.image_detail, ImageDetail::Low);
        assert_eq!(c.model.openai.image_max_side, 768);
        assert_eq!(c.model.openai.max_inflight, 8);
        assert_eq!(
            c.model.openai.response_format,
            Some(serde_json::json!({"type": "object"}))
        );
        assert!(!format!("{c:?}").contains("sk-very-secret"));
    }

    #[test]
    fn redis_passwords_never_appear_in_errors_or_debug_output() {
        let e = with(&[("REDIS_URL", "http://u:hunter2@cache:6379")]).unwrap_err();
        assert!(!e.to_string().contains("hunter2"), "{e}");
        assert!(e.to_string().contains("u:***@cache"), "{e}");
        let e = with(&[("REDIS_CLUSTER_NODES", "redis://:hunter2@a:1,http://b:2")]).unwrap_err();
        assert!(!e.to_string().contains("hunter2"), "{e}");
        let c = with(&[
            ("REDIS_URL", "redis://u:hunter2@cache:6379"),
            ("REDIS_PASSWORD", "ignored"),
        ])
        .unwrap();
        assert!(!format!("{c:?}").contains("hunter2"));
        let c = with(&[("REDIS_PASSWORD", "hunter2")]).unwrap();
        assert!(!format!("{c:?}").contains("hunter2"));
        assert!(
            SECRET_SETTINGS
                .iter()
                .all(|n| SETTINGS.iter().any(|s| s.env == *n))
        );
    }

    #[test]
    fn connection_settings_are_settings_and_enough_for_a_client() {
        for name in CONNECTION_SETTINGS {
            assert!(SETTINGS.iter().any(|s| s.env == *name), "{name}");
        }
        // A client reads only these; every other setting takes its default.
        let c = with(&[("REDIS_URL", "redis://cache:6380/1"), ("KEY_PREFIX", "cam")]).unwrap();
        assert_eq!(c.redis.url, "redis://cache:6380/1");
        assert_eq!(c.redis.key_prefix, "cam");
    }

    #[test]
    fn tls_files_need_rediss_and_come_as_a_pair() {
        let c = with(&[
            ("REDIS_URL", "rediss://cache:6380"),
            ("REDIS_TLS_CA_FILE", "/etc/ca.pem"),
            ("REDIS_TLS_CERT_FILE", "/etc/c.pem"),
            ("REDIS_TLS_KEY_FILE", "/etc/c.key"),
        ])
        .unwrap();
        assert_eq!(
            c.redis.tls.ca_file.as_deref(),
            Some(Path::new("/etc/ca.pem"))
        );
        assert!(c.redis.tls.client_cert.is_some());
        let e = with(&[("REDIS_TLS_CA_FILE", "/etc/ca.pem")]).unwrap_err();
        assert_eq!(e.name, "REDIS_TLS_CA_FILE");
        let e = with(&[
            ("REDIS_URL", "rediss://cache:6380"),
            ("REDIS_TLS_CERT_FILE", "/etc/c.pem"),
        ])
        .unwrap_err();
        assert_eq!(e.name, "REDIS_TLS_CERT_FILE");
        let e = with(&[
            ("REDIS_CLUSTER_NODES", "rediss://a:1"),
            ("REDIS_TLS_CA_FILE", "/etc/ca.pem"),
        ])
        .unwrap_err();
        assert_eq!(e.name, "REDIS_TLS_CA_FILE");
    }

    #[test]
    fn seed_log_levels_are_accepted() {
        assert_eq!(with(&[("LOG_LEVEL", "WARNING")]).unwrap().log.level, "warn");
        assert_eq!(
            with(&[("LOG_LEVEL", "CRITICAL")]).unwrap().log.level,
            "error"
        );
    }

    #[test]
    fn docs_and_env_example_list_every_setting() {
        let docs = include_str!("../docs/configuration.md");
        let example = include_str!("../.env.example");
        for s in SETTINGS {
            assert!(
                docs.contains(&format!("`{}`", s.env)),
                "docs/configuration.md lacks {}",
                s.env
            );
            assert!(
                example.contains(&format!("{}=", s.env)),
                ".env.example lacks {}",
                s.env
            );
        }
    }
}
