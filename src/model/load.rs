//! Choosing and loading a model: the settings the binary passes in (`MODEL_TYPE`,
//! `MODEL_PATH`, `MODEL_ID`, `DEVICE`, `DTYPE`, ...), finding the files in a local folder or on the
//! Hugging Face hub, picking the device, and opening safetensors weights with a check that
//! every tensor the architecture needs is really there.

use super::cpu_kernels;
use super::fused_linear::{self, MatmulPrecision};
use super::openai::{DEFAULT_IMAGE_MAX_SIDE, OpenAiModel, OpenAiSettings};
use super::{
    ModelError, VisionLanguageModel, blip::BlipModel, clip::ClipModel, owlvit::OwlVitModel,
    paligemma::PaliGemmaModel, siglip::SiglipModel,
};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, DeviceLocation};
use candle_nn::VarBuilder;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// Default bound on the tokens a BLIP caption or a PaliGemma answer may add
/// (`MAX_NEW_TOKENS`).
pub const DEFAULT_MAX_NEW_TOKENS: usize = 20;

/// Which backend to run (`MODEL_TYPE`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum ModelType {
    /// Zero-shot phrase scoring with CLIP (the openai/clip-vit-base-patch32 layout).
    #[default]
    Clip,
    /// A presence probability per phrase with SigLIP (the google/siglip-base-patch16-224
    /// layout).
    Siglip,
    /// Open-vocabulary detection with boxes with OWL-ViT (the google/owlvit-base-patch32
    /// layout).
    OwlVit,
    /// Prompt-conditioned captioning with BLIP (the Salesforce/blip-image-captioning-large
    /// layout).
    Blip,
    /// Any VLM behind an OpenAI-compatible chat-completions server; no weights in the worker.
    OpenAi,
    /// Answers to PaliGemma task prompts (captions, questions, boxes, text reading) with
    /// PaliGemma (the google/paligemma-3b-mix-224 layout).
    PaliGemma,
}

impl ModelType {
    /// The square side the model's preprocessing produces for the reference checkpoints:
    /// ingest can use it to pick a default maximum frame side.
    pub fn input_size(self) -> u32 {
        match self {
            ModelType::Clip | ModelType::Siglip | ModelType::PaliGemma => 224,
            ModelType::Blip => 384,
            ModelType::OwlVit => 768,
            ModelType::OpenAi => DEFAULT_IMAGE_MAX_SIDE,
        }
    }

    /// The hub model used when neither `MODEL_PATH` nor `MODEL_ID` is set (none for
    /// `openai`, whose MODEL_ID names the served model and is required).
    pub fn default_model_id(self) -> &'static str {
        match self {
            ModelType::Clip => "openai/clip-vit-base-patch32",
            ModelType::Siglip => "google/siglip-base-patch16-224",
            ModelType::OwlVit => "google/owlvit-base-patch32",
            ModelType::Blip => "Salesforce/blip-image-captioning-large",
            ModelType::OpenAi => "",
            ModelType::PaliGemma => "google/paligemma-3b-mix-224",
        }
    }

    /// The score over which a phrase is listed in `detected` when `DETECT_THRESHOLD` is
    /// unset: CLIP's presence against its neutral captions (0.5: the phrase fits better
    /// than every neutral caption), SigLIP's sigmoid probability, and OWL-ViT's box score
    /// (0.1, as transformers' examples use). BLIP lists nothing as detected, and PaliGemma
    /// lists the label of every box it generates (it gives no score).
    pub fn default_detect_threshold(self) -> f32 {
        match self {
            ModelType::Clip | ModelType::Blip | ModelType::OpenAi | ModelType::PaliGemma => 0.5,
            ModelType::Siglip | ModelType::OwlVit => 0.1,
        }
    }

    /// What the outputs mean, as reported in [`super::ModelInfo::task`].
    pub fn task(self) -> &'static str {
        match self {
            ModelType::Clip => "zero-shot-scoring",
            ModelType::Siglip => "presence",
            ModelType::OwlVit => "detection",
            ModelType::Blip => "captioning",
            ModelType::OpenAi => "chat",
            ModelType::PaliGemma => "generation",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ModelType::Clip => "clip",
            ModelType::Siglip => "siglip",
            ModelType::OwlVit => "owlvit",
            ModelType::Blip => "blip",
            ModelType::OpenAi => "openai",
            ModelType::PaliGemma => "paligemma",
        }
    }
}

impl fmt::Display for ModelType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A setting value that is not one of the accepted words.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{setting} must be one of {expected}, not {value:?}")]
pub struct ParseSettingError {
    pub setting: &'static str,
    pub expected: &'static str,
    pub value: String,
}

impl FromStr for ModelType {
    type Err = ParseSettingError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "clip" => Ok(ModelType::Clip),
            "siglip" => Ok(ModelType::Siglip),
            "owlvit" => Ok(ModelType::OwlVit),
            "blip" => Ok(ModelType::Blip),
            "openai" => Ok(ModelType::OpenAi),
            "paligemma" => Ok(ModelType::PaliGemma),
            _ => Err(ParseSettingError {
                setting: "MODEL_TYPE",
                expected: "clip, siglip, owlvit, blip, openai, paligemma",
                value: s.to_string(),
            }),
        }
    }
}

/// Where to run (`DEVICE`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// CUDA when built with the `cuda` feature and a GPU answers, else CPU.
    #[default]
    Auto,
    Cpu,
    /// CUDA device 0; an error when the build lacks the `cuda` feature or no GPU answers.
    Cuda,
}

impl FromStr for DeviceChoice {
    type Err = ParseSettingError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" | "" => Ok(DeviceChoice::Auto),
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" | "gpu" => Ok(DeviceChoice::Cuda),
            _ => Err(ParseSettingError {
                setting: "DEVICE",
                expected: "auto, cpu, cuda",
                value: s.to_string(),
            }),
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DeviceChoice::Auto => "auto",
            DeviceChoice::Cpu => "cpu",
            DeviceChoice::Cuda => "cuda",
        })
    }
}

/// The number format of the image towers' matrix products (`DTYPE`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DtypeChoice {
    /// bf16 where it is fast (on the CPU, where it has AMX-BF16 or AVX512-BF16), else f32.
    #[default]
    Auto,
    F32,
    /// bf16 products; an error where there is no bf16 product (not the CPU, or a CPU
    /// without AVX512-BF16 in a build without MKL).
    Bf16,
}

impl FromStr for DtypeChoice {
    type Err = ParseSettingError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" | "" => Ok(DtypeChoice::Auto),
            "f32" | "fp32" | "float32" => Ok(DtypeChoice::F32),
            "bf16" | "bfloat16" => Ok(DtypeChoice::Bf16),
            _ => Err(ParseSettingError {
                setting: "DTYPE",
                expected: "auto, f32, bf16",
                value: s.to_string(),
            }),
        }
    }
}

/// What `DTYPE` comes to on this build, device and CPU, with the reason to log.
pub fn resolve_precision(
    choice: DtypeChoice,
    device: &Device,
) -> Result<(MatmulPrecision, String), ModelError> {
    let product = fused_linear::bf16_product().filter(|_| device.is_cpu());
    match choice {
        DtypeChoice::F32 => Ok((MatmulPrecision::F32, "DTYPE=f32".into())),
        DtypeChoice::Bf16 if product.is_some() => Ok((MatmulPrecision::Bf16, "DTYPE=bf16".into())),
        DtypeChoice::Bf16 => Err(ModelError::Load(
            "DTYPE=bf16 needs the CPU, and a CPU with AVX512-BF16 or the mkl build \
             (scripts/build); use DTYPE=auto or f32"
                .into(),
        )),
        DtypeChoice::Auto => match (cpu_kernels::bf16_matrix_unit(), product) {
            (Some(unit), Some(_)) => Ok((
                MatmulPrecision::Bf16,
                format!("DTYPE=auto: bf16, this CPU has {unit}"),
            )),
            (None, _) => Ok((
                MatmulPrecision::F32,
                "DTYPE=auto: f32, this CPU has neither AMX-BF16 nor AVX512-BF16".into(),
            )),
            (Some(_), None) => Ok((
                MatmulPrecision::F32,
                "DTYPE=auto: f32, bf16 runs on the CPU only".into(),
            )),
        },
    }
}

/// Everything needed to load a model, already validated by the binary.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelSettings {
    pub model_type: ModelType,
    /// A local folder with `config.json`, `tokenizer.json` and `model.safetensors` (or a
    /// `model.safetensors.index.json` with its shards). Wins over `model_id`.
    pub model_path: Option<PathBuf>,
    /// A hub model id (`owner/name`); defaults to [`ModelType::default_model_id`].
    pub model_id: Option<String>,
    pub device: DeviceChoice,
    /// The image towers' matrix products: f32 or bf16.
    pub dtype: DtypeChoice,
    /// BLIP and PaliGemma: the most tokens a caption or answer may add after the prompt.
    pub max_new_tokens: usize,
    /// The score over which a phrase is listed in `detected`; `None` for the model's
    /// default ([`ModelType::default_detect_threshold`]).
    pub detect_threshold: Option<f32>,
    /// OWL-ViT: drop a kept box that overlaps a better box of the same label by more than
    /// this IoU; `None` (the default) keeps every box, as the reference does.
    pub nms_iou: Option<f32>,
    /// openai: the server and how to talk to it (`model_id` names the served model).
    pub openai: OpenAiSettings,
}

impl ModelSettings {
    /// The detect threshold in force: the one set, else the model's default.
    pub fn detect_threshold(&self) -> f32 {
        self.detect_threshold
            .unwrap_or_else(|| self.model_type.default_detect_threshold())
    }
}

impl Default for ModelSettings {
    fn default() -> Self {
        Self {
            model_type: ModelType::Clip,
            model_path: None,
            model_id: None,
            device: DeviceChoice::Auto,
            dtype: DtypeChoice::Auto,
            max_new_tokens: DEFAULT_MAX_NEW_TOKENS,
            detect_threshold: None,
            nms_iou: None,
            openai: OpenAiSettings::default(),
        }
    }
}

/// Loads the model the settings describe. Blocking: reads (and maybe downloads) weights.
pub fn load_model(settings: &ModelSettings) -> Result<Box<dyn VisionLanguageModel>, ModelError> {
    if settings.model_type == ModelType::OpenAi {
        let model_id = settings.model_id.as_deref().unwrap_or_default();
        return Ok(Box::new(OpenAiModel::connect(
            model_id,
            settings.openai.clone(),
        )?));
    }
    load_weights(settings)
}

/// Loads a model that runs in the worker, from its weight files.
fn load_weights(settings: &ModelSettings) -> Result<Box<dyn VisionLanguageModel>, ModelError> {
    let files = resolve_files(settings)?;
    let device = select_device(settings.device)?;
    tracing::info!(
        model_type = %settings.model_type,
        source = %files.source,
        device = %device_name(&device),
        "loading model"
    );
    Ok(match settings.model_type {
        ModelType::Clip => Box::new(ClipModel::load(&files, device, settings)?),
        ModelType::Siglip => Box::new(SiglipModel::load(&files, device, settings)?),
        ModelType::OwlVit => Box::new(OwlVitModel::load(&files, device, settings)?),
        ModelType::Blip => Box::new(BlipModel::load(&files, device, settings)?),
        ModelType::OpenAi => {
            return Err(ModelError::Load(
                "MODEL_TYPE=openai has no weight files: it calls a server".into(),
            ));
        }
        ModelType::PaliGemma => Box::new(PaliGemmaModel::load(&files, device, settings)?),
    })
}

/// The files of one model, wherever they came from.
#[derive(Clone, Debug)]
pub struct ModelFiles {
    /// Where they came from: the folder, or the hub id.
    pub source: String,
    /// A short name for results: the hub id's last part or the folder's name.
    pub name: String,
    pub config: PathBuf,
    pub tokenizer: PathBuf,
    pub weights: Vec<PathBuf>,
}

impl ModelFiles {
    /// Finds the files in a local folder.
    pub fn from_dir(dir: &Path) -> Result<Self, ModelError> {
        if !dir.is_dir() {
            return Err(ModelError::Load(format!(
                "MODEL_PATH {} is not a folder",
                dir.display()
            )));
        }
        let need = |file: &str| {
            let path = dir.join(file);
            if path.is_file() {
                Ok(path)
            } else {
                Err(ModelError::Load(format!(
                    "MODEL_PATH {} has no {file}",
                    dir.display()
                )))
            }
        };
        let config = need("config.json")?;
        let tokenizer = need("tokenizer.json")?;
        let weights = if dir.join("model.safetensors").is_file() {
            vec![dir.join("model.safetensors")]
        } else if dir.join("model.safetensors.index.json").is_file() {
            shard_files(&dir.join("model.safetensors.index.json"))?
                .into_iter()
                .map(|f| dir.join(f))
                .collect()
        } else {
            return Err(ModelError::Load(format!(
                "MODEL_PATH {} has no model.safetensors (nor model.safetensors.index.json)",
                dir.display()
            )));
        };
        if let Some(missing) = weights.iter().find(|p| !p.is_file()) {
            return Err(ModelError::Load(format!(
                "weight shard {} is missing",
                missing.display()
            )));
        }
        let name = dir
            .canonicalize()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| dir.display().to_string());
        Ok(Self {
            source: dir.display().to_string(),
            name,
            config,
            tokenizer,
            weights,
        })
    }
}

/// The shard file names listed by a `model.safetensors.index.json`, in first-seen order.
fn shard_files(index: &Path) -> Result<Vec<String>, ModelError> {
    let text = std::fs::read_to_string(index)
        .map_err(|e| ModelError::Load(format!("cannot read {}: {e}", index.display())))?;
    let value: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| ModelError::Load(format!("{} is not JSON: {e}", index.display())))?;
    let map = value
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| ModelError::Load(format!("{} has no weight_map", index.display())))?;
    let mut seen = HashSet::new();
    Ok(map
        .values()
        .filter_map(|v| v.as_str())
        .filter(|f| seen.insert(f.to_string()))
        .map(str::to_string)
        .collect())
}

/// `MODEL_PATH` if set, else the hub.
fn resolve_files(settings: &ModelSettings) -> Result<ModelFiles, ModelError> {
    if let Some(dir) = &settings.model_path {
        return ModelFiles::from_dir(dir);
    }
    let id = settings
        .model_id
        .clone()
        .unwrap_or_else(|| settings.model_type.default_model_id().to_string());
    let (api, cache) = hub_client().map_err(|e| hub_error(&id, &e))?;
    hub_files(&api, &cache, &id).map_err(|e| hub_error(&id, &e))
}

/// The hub client and its cache, configured by the variables the Python tools read:
/// `HF_HUB_CACHE` (else `HF_HOME`/hub), `HF_ENDPOINT` and `HF_TOKEN` (else the token file).
fn hub_client() -> Result<(hf_hub::api::sync::Api, hf_hub::Cache), String> {
    let cache = match std::env::var_os("HF_HUB_CACHE") {
        Some(dir) => hf_hub::Cache::new(dir.into()),
        None => hf_hub::Cache::from_env(),
    };
    let mut builder = hf_hub::api::sync::ApiBuilder::from_cache(cache.clone()).with_progress(false);
    if let Ok(endpoint) = std::env::var("HF_ENDPOINT") {
        builder = builder.with_endpoint(endpoint);
    }
    if let Some(token) = std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty()) {
        builder = builder.with_token(Some(token));
    }
    let api = builder.build().map_err(|e| e.to_string())?;
    Ok((api, cache))
}

/// The error when the hub cannot supply a model: says exactly what to set instead.
fn hub_error(id: &str, cause: &str) -> ModelError {
    ModelError::Load(format!(
        "no MODEL_PATH set and {id} could not be fetched from the Hugging Face hub ({cause}). \
         Set MODEL_PATH to a folder holding config.json, tokenizer.json and \
         model.safetensors (`free-roam model make` writes a random one for tests), or make \
         the hub reachable and set MODEL_ID"
    ))
}

/// Logs a file's download progress through `tracing`, one line every 10%.
#[derive(Default)]
struct LogProgress {
    file: String,
    total: usize,
    done: usize,
    reported: Option<usize>,
}

impl hf_hub::api::Progress for LogProgress {
    fn init(&mut self, size: usize, filename: &str) {
        self.file = filename.to_string();
        self.total = size;
        tracing::info!(file = %self.file, bytes = size, "hub download started");
    }

    fn update(&mut self, size: usize) {
        self.done += size;
        let tenth = (self.done * 10).checked_div(self.total).unwrap_or(10);
        if self.reported != Some(tenth) {
            self.reported = Some(tenth);
            tracing::info!(
                file = %self.file,
                bytes = self.done,
                total = self.total,
                "hub download {}%",
                tenth * 10
            );
        }
    }

    fn finish(&mut self) {
        tracing::info!(file = %self.file, "hub download complete");
    }
}

/// Finds the files of a hub model in the hub cache (`HF_HOME`), downloading those missing.
fn hub_files(
    api: &hf_hub::api::sync::Api,
    cache: &hf_hub::Cache,
    id: &str,
) -> Result<ModelFiles, String> {
    let name = id.rsplit('/').next().unwrap_or(id);
    let cached = cache.model(id.to_string());
    let repo = api.model(id.to_string());
    // HF_HUB_OFFLINE=1 means the cache only, as in the Python tools.
    let offline = std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1" || v == "true");
    let get = |file: &str| -> Result<PathBuf, String> {
        match cached.get(file) {
            Some(path) => Ok(path),
            None if offline => Err(format!("{file} is not in the hub cache (HF_HUB_OFFLINE)")),
            None => repo
                .download_with_progress(file, LogProgress::default())
                .map_err(|e| e.to_string()),
        }
    };
    let config = get("config.json")?;
    let tokenizer = get("tokenizer.json").map_err(|e| format!("tokenizer.json: {e}"))?;
    let weights = match get("model.safetensors") {
        Ok(path) => vec![path],
        Err(single) => {
            let index = get("model.safetensors.index.json")
                .map_err(|_| format!("model.safetensors: {single}"))?;
            shard_files(&index)
                .map_err(|e| e.to_string())?
                .iter()
                .map(|f| get(f).map_err(|e| format!("{f}: {e}")))
                .collect::<Result<Vec<_>, _>>()?
        }
    };
    Ok(ModelFiles {
        source: format!("hub:{id}"),
        name: name.to_string(),
        config,
        tokenizer,
        weights,
    })
}

/// Picks the device for a `DEVICE` choice.
pub fn select_device(choice: DeviceChoice) -> Result<Device, ModelError> {
    match choice {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Cuda => cuda_device(),
        DeviceChoice::Auto => {
            if cfg!(feature = "cuda") {
                match cuda_device() {
                    Ok(device) => return Ok(device),
                    Err(e) => tracing::warn!(error = %e, "no usable GPU, running on the CPU"),
                }
            }
            Ok(Device::Cpu)
        }
    }
}

#[cfg(feature = "cuda")]
fn cuda_device() -> Result<Device, ModelError> {
    Device::new_cuda(0).map_err(|e| ModelError::Load(format!("DEVICE=cuda: no usable GPU: {e}")))
}

#[cfg(not(feature = "cuda"))]
fn cuda_device() -> Result<Device, ModelError> {
    Err(ModelError::Load(
        "DEVICE=cuda needs free-roam built with the `cuda` cargo feature; \
         use DEVICE=cpu or DEVICE=auto"
            .into(),
    ))
}

/// `cpu` or `cuda:N`, as reported in [`super::ModelInfo::device`].
pub fn device_name(device: &Device) -> String {
    match device.location() {
        DeviceLocation::Cpu => "cpu".into(),
        DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// A tensor the architecture reads: its checkpoint name and shape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
}

impl TensorSpec {
    pub fn new(name: impl Into<String>, shape: &[usize]) -> Self {
        Self {
            name: name.into(),
            shape: shape.to_vec(),
        }
    }
}

/// Memory-mapped safetensors weights, checked before candle reads them.
pub struct Weights {
    tensors: MmapedSafetensors,
    files: String,
}

impl Weights {
    pub fn open(paths: &[PathBuf]) -> Result<Self, ModelError> {
        let files = paths
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        // SAFETY: the files are mapped read-only and the mapping is only read; like every
        // memory-mapped loader this relies on nobody truncating the files while the model
        // runs, which the folder layout (write once, then serve) gives.
        let tensors = unsafe { MmapedSafetensors::multi(paths) }
            .map_err(|e| ModelError::Load(format!("cannot open weights {files}: {e}")))?;
        Ok(Self { tensors, files })
    }

    /// Checks that every `expected` tensor is present with the expected shape, except those
    /// in `optional` (which the caller substitutes itself). Candle would otherwise fail
    /// late, or silently invent values for some of them.
    pub fn check(&self, expected: &[TensorSpec], optional: &[&str]) -> Result<(), ModelError> {
        let present: HashMap<String, Vec<usize>> = self
            .tensors
            .tensors()
            .into_iter()
            .map(|(name, view)| (name, view.shape().to_vec()))
            .collect();
        let mut missing = Vec::new();
        let mut wrong = Vec::new();
        for spec in expected {
            match present.get(&spec.name) {
                None if optional.contains(&spec.name.as_str()) => {}
                None => missing.push(spec.name.as_str()),
                Some(shape) if shape != &spec.shape => wrong.push(format!(
                    "{} is {:?}, expected {:?}",
                    spec.name, shape, spec.shape
                )),
                Some(_) => {}
            }
        }
        if !missing.is_empty() {
            let shown = missing
                .iter()
                .take(8)
                .copied()
                .collect::<Vec<_>>()
                .join(", ");
            let more = missing.len().saturating_sub(8);
            return Err(ModelError::Load(format!(
                "{} lacks {} tensor(s) the model needs: {shown}{}",
                self.files,
                missing.len(),
                if more > 0 {
                    format!(" and {more} more")
                } else {
                    String::new()
                }
            )));
        }
        if !wrong.is_empty() {
            return Err(ModelError::Load(format!(
                "{} does not match config.json: {}",
                self.files,
                wrong.into_iter().take(8).collect::<Vec<_>>().join("; ")
            )));
        }
        Ok(())
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.get(name).is_ok()
    }

    /// A var builder reading these weights as f32 on `device`.
    pub fn var_builder(self, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self.tensors), DType::F32, device.clone())
    }
}

/// Reads and parses `config.json`.
pub fn read_config(path: &Path) -> Result<serde_json::Value, ModelError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ModelError::Load(format!("cannot read {}: {e}", path.display())))?;
    serde_json::from_str(&text)
        .map_err(|e| ModelError::Load(format!("{} is not valid JSON: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_setting_words() {
        assert_eq!("CLIP".parse::<ModelType>().unwrap(), ModelType::Clip);
        assert_eq!(" blip ".parse::<ModelType>().unwrap(), ModelType::Blip);
        assert_eq!("OpenAI".parse::<ModelType>().unwrap(), ModelType::OpenAi);
        let err = "llava".parse::<ModelType>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "MODEL_TYPE must be one of clip, siglip, owlvit, blip, openai, paligemma, not \"llava\""
        );
        assert_eq!("cpu".parse::<DeviceChoice>().unwrap(), DeviceChoice::Cpu);
        assert_eq!("Auto".parse::<DeviceChoice>().unwrap(), DeviceChoice::Auto);
        assert_eq!("cuda".parse::<DeviceChoice>().unwrap(), DeviceChoice::Cuda);
        assert!("tpu".parse::<DeviceChoice>().is_err());
        assert_eq!(ModelType::Clip.input_size(), 224);
        assert_eq!(ModelType::Blip.input_size(), 384);
    }

    #[test]
    fn auto_and_cpu_devices_work_here() {
        assert_eq!(
            device_name(&select_device(DeviceChoice::Cpu).unwrap()),
            "cpu"
        );
        assert!(select_device(DeviceChoice::Auto).is_ok());
        #[cfg(not(feature = "cuda"))]
        assert!(
            select_device(DeviceChoice::Cuda)
                .unwrap_err()
                .to_string()
                .contains("cuda` cargo feature")
        );
    }

    #[test]
    fn an_unreachable_hub_says_what_to_set() {
        // A closed local port stands in for a hub the network does not reach.
        let cache = std::env::temp_dir().join(format!("fr-hub-cache-{}", std::process::id()));
        let api = hf_hub::api::sync::ApiBuilder::from_cache(hf_hub::Cache::new(cache.clone()))
            .with_endpoint("http://127.0.0.1:9".to_string())
            .with_progress(false)
            .build()
            .unwrap();
        let id = ModelType::Clip.default_model_id();
        let cause = hub_files(&api, &hf_hub::Cache::new(cache.clone()), id).unwrap_err();
        let err = hub_error(id, &cause).to_string();
        assert!(
            err.contains("Set MODEL_PATH to a folder holding config.json"),
            "{err}"
        );
        assert!(err.contains("openai/clip-vit-base-patch32"), "{err}");
        let _ = std::fs::remove_dir_all(&cache);
    }

    #[test]
    fn sharded_weights_load_like_a_single_file() {
        use crate::model::PromptRef;
        use crate::model::make::{ModelSize, write_random_model};
        use crate::model::testutil::{frame, scratch_dir};
        let dir = scratch_dir("clip-sharded");
        write_random_model(ModelType::Clip, ModelSize::Tiny, 5, &dir).unwrap();
        let settings = ModelSettings {
            model_path: Some(dir.clone()),
            ..ModelSettings::default()
        };
        let f = frame("rings", 80, 60);
        let prompt = PromptRef {
            text: "person, car".into(),
            version: None,
        };
        let single = load_model(&settings)
            .unwrap()
            .infer(&[&f], &prompt)
            .unwrap();

        // Split the weights in two shards with an index, as large hub checkpoints are.
        let path = dir.join("model.safetensors");
        let tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
        let (mut first, mut second) = (HashMap::new(), HashMap::new());
        let mut weight_map = serde_json::Map::new();
        for (i, (name, t)) in tensors.into_iter().enumerate() {
            let file = if i % 2 == 0 {
                "model-00001-of-00002.safetensors"
            } else {
                "model-00002-of-00002.safetensors"
            };
            weight_map.insert(name.clone(), file.into());
            if i % 2 == 0 {
                first.insert(name, t);
            } else {
                second.insert(name, t);
            }
        }
        candle_core::safetensors::save(&first, dir.join("model-00001-of-00002.safetensors"))
            .unwrap();
        candle_core::safetensors::save(&second, dir.join("model-00002-of-00002.safetensors"))
            .unwrap();
        let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
        std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
        std::fs::remove_file(&path).unwrap();

        let files = ModelFiles::from_dir(&dir).unwrap();
        assert_eq!(files.weights.len(), 2);
        let sharded = load_model(&settings)
            .unwrap()
            .infer(&[&f], &prompt)
            .unwrap();
        assert_eq!(single, sharded);

        std::fs::remove_file(dir.join("model-00002-of-00002.safetensors")).unwrap();
        let err = ModelFiles::from_dir(&dir).unwrap_err().to_string();
        assert!(
            err.contains("model-00002-of-00002.safetensors is missing"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_folder_without_files_names_what_is_missing() {
        let dir = std::env::temp_dir().join(format!("fr-load-empty-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let err = ModelFiles::from_dir(&dir).unwrap_err().to_string();
        assert!(err.contains("has no config.json"), "{err}");
        std::fs::write(dir.join("config.json"), "{}").unwrap();
        std::fs::write(dir.join("tokenizer.json"), "{}").unwrap();
        let err = ModelFiles::from_dir(&dir).unwrap_err().to_string();
        assert!(err.contains("has no model.safetensors"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
