//! Choosing and loading a model: the settings the binary passes in (`MODEL_TYPE`,
//! `MODEL_PATH`, `MODEL_ID`, `DEVICE`, `DTYPE`, ...), finding the files in a local folder or on the
//! Hugging Face hub, picking the device, and opening safetensors weights with a check that
//! every tensor the architecture needs is really there.

use crate::model::kernels::cpu_kernels;
use crate::model::kernels::fused_linear::{self, MatmulPrecision};
use crate::model::kind::{ModelType, ParseSettingError};
use crate::model::remote::openai::OpenAiSettings;
use crate::model::{ErrorDetail, ModelError};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, DeviceLocation};
use candle_nn::VarBuilder;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

pub mod config;
mod hub;

pub use config::{parse_config, read_config};

/// Default bound on the tokens a BLIP caption or a PaliGemma answer may add
/// (`MAX_NEW_TOKENS`).
pub const DEFAULT_MAX_NEW_TOKENS: usize = 20;

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
    /// OWL-ViT and YOLO-World: drop a kept box that overlaps a better box of the same label
    /// by more than this IoU; `None` (the default) keeps every box for OWL-ViT and means 0.7
    /// for YOLO-World, as their references do.
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
            return Err(ModelError::Load(
                format!("MODEL_PATH {} is not a folder", dir.display()).into(),
            ));
        }
        let need = |file: &str| {
            let path = dir.join(file);
            if path.is_file() {
                Ok(path)
            } else {
                Err(ModelError::Load(
                    format!("MODEL_PATH {} has no {file}", dir.display()).into(),
                ))
            }
        };
        let config = need("config.json")?;
        let tokenizer = need("tokenizer.json")?;
        let weights = if dir.join("model.safetensors").is_file() {
            vec![dir.join("model.safetensors")]
        } else if dir.join("model.safetensors.index.json").is_file() {
            shard_files(&dir.join("model.safetensors.index.json"))
                .map_err(ModelError::Load)?
                .into_iter()
                .map(|f| dir.join(f))
                .collect()
        } else {
            return Err(ModelError::Load(
                format!(
                    "MODEL_PATH {} has no model.safetensors (nor model.safetensors.index.json)",
                    dir.display()
                )
                .into(),
            ));
        };
        if let Some(missing) = weights.iter().find(|p| !p.is_file()) {
            return Err(ModelError::Load(
                format!("weight shard {} is missing", missing.display()).into(),
            ));
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
fn shard_files(index: &Path) -> Result<Vec<String>, ErrorDetail> {
    let text = std::fs::read_to_string(index)
        .map_err(|e| ErrorDetail::new(format!("cannot read {}", index.display()), e))?;
    let value: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| ErrorDetail::new(format!("{} is not JSON", index.display()), e))?;
    let map = value
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| ErrorDetail::from(format!("{} has no weight_map", index.display())))?;
    let mut seen = HashSet::new();
    Ok(map
        .values()
        .filter_map(|v| v.as_str())
        .filter(|f| seen.insert(f.to_string()))
        .map(str::to_string)
        .collect())
}

/// `MODEL_PATH` if set, else the hub.
pub(crate) fn resolve_files(settings: &ModelSettings) -> Result<ModelFiles, ModelError> {
    if let Some(dir) = &settings.model_path {
        return ModelFiles::from_dir(dir);
    }
    let id = settings
        .model_id
        .clone()
        .unwrap_or_else(|| settings.model_type.default_model_id().to_string());
    if id.is_empty() {
        return Err(ModelError::Load(
            format!(
                "MODEL_TYPE={} has no default checkpoint on the hub; set MODEL_PATH",
                settings.model_type
            )
            .into(),
        ));
    }
    hub::client()
        .and_then(|(api, cache)| hub::files(&api, &cache, &id))
        .map_err(|e| hub::error(&id, e))
}

/// Picks the device for a `DEVICE` choice.
pub fn select_device(choice: DeviceChoice) -> Result<Device, ModelError> {
    match choice {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Cuda => cuda_device(),
        DeviceChoice::Auto => Ok(auto_device()),
    }
}

/// `DEVICE=auto`: the GPU when the binary has CUDA and one answers, else the CPU, said in
/// one log line with the reason.
fn auto_device() -> Device {
    if !cfg!(feature = "cuda") {
        tracing::info!(
            device = "cpu",
            "DEVICE=auto: built without the cuda feature"
        );
        return Device::Cpu;
    }
    match cuda_device() {
        Ok(device) => {
            tracing::info!(device = %device_name(&device), "DEVICE=auto: a GPU answered");
            device
        }
        Err(e) => {
            tracing::warn!(device = "cpu", error = %e, "DEVICE=auto: no usable GPU");
            Device::Cpu
        }
    }
}

#[cfg(feature = "cuda")]
fn cuda_device() -> Result<Device, ModelError> {
    Device::new_cuda(0).map_err(|e| ModelError::load("DEVICE=cuda: no usable GPU", e))
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
            .map_err(|e| ModelError::load(format!("cannot open weights {files}"), e))?;
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
            return Err(ModelError::Load(
                format!(
                    "{} lacks {} tensor(s) the model needs: {shown}{}",
                    self.files,
                    missing.len(),
                    if more > 0 {
                        format!(" and {more} more")
                    } else {
                        String::new()
                    }
                )
                .into(),
            ));
        }
        if !wrong.is_empty() {
            return Err(ModelError::Load(
                format!(
                    "{} does not match config.json: {}",
                    self.files,
                    wrong.into_iter().take(8).collect::<Vec<_>>().join("; ")
                )
                .into(),
            ));
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

#[cfg(test)]
mod tests {
    use super::*;

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
    fn sharded_weights_load_like_a_single_file() {
        use crate::model::registry::load_model;
        use crate::model::testing::util::{frame, scratch_dir};
        use crate::model::{ModelSize, write_random_model};
        use crate::prompt::PromptRef;
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
    fn a_checkpoint_of_another_family_is_named_instead_of_its_missing_tensors() {
        use crate::model::registry::load_model;
        use crate::model::testing::util::{scratch_dir, tiny_model};
        let load_error = |kind: ModelType, dir: &Path| {
            let settings = ModelSettings {
                model_type: kind,
                model_path: Some(dir.to_path_buf()),
                ..ModelSettings::default()
            };
            match load_model(&settings) {
                Ok(_) => panic!("MODEL_TYPE={kind} loaded {}", dir.display()),
                Err(e) => e,
            }
        };
        let owlvit = tiny_model(ModelType::OwlVit);
        let err = load_error(ModelType::Clip, owlvit);
        assert!(matches!(err, ModelError::Load(_)));
        let text = err.to_string();
        assert!(
            text.contains(r#"its config.json names model_type "owlvit", a MODEL_TYPE=owlvit checkpoint; set MODEL_TYPE=owlvit"#),
            "{text}"
        );
        assert!(!text.contains("lacks"), "{text}");
        let text = load_error(ModelType::OwlVit, tiny_model(ModelType::Clip)).to_string();
        assert!(text.contains("a MODEL_TYPE=clip checkpoint"), "{text}");

        // A model_type the worker does not know: the load goes ahead, and its failure says
        // first what the config names.
        let dir = scratch_dir("load-unknown-family");
        for file in ["config.json", "tokenizer.json", "model.safetensors"] {
            std::fs::copy(tiny_model(ModelType::Clip).join(file), dir.join(file)).unwrap();
        }
        let mut config = read_config(&dir.join("config.json")).unwrap();
        config["model_type"] = "clip_fancy".into();
        std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
        let text = load_error(ModelType::Siglip, &dir).to_string();
        assert!(
            text.starts_with(
                r#"model weights: config.json names model_type "clip_fancy", not "siglip": "#
            ),
            "{text}"
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
