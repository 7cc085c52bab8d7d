//! Random-weight models for tests and benchmarks: writes a folder that loads exactly like a
//! real checkpoint (transformers' `config.json` layout, `model.safetensors` with the real
//! tensor names, a working `tokenizer.json`, and the tokenizer and preprocessor configs
//! transformers' processors read), deterministic from a seed.
//!
//! `tiny` models keep the real input sizes (224 for CLIP, 384 for BLIP) but are a few
//! layers of width 32, so they load and run in milliseconds; `full` models have the real
//! sizes of openai/clip-vit-base-patch32, Salesforce/blip-image-captioning-large and the
//! other reference checkpoints (google/paligemma-3b-mix-224: 12 GB of f32 weights).

use crate::model::ModelError;
use crate::model::kind::ParseSettingError;
use crate::model::loading::TensorSpec;
use serde_json::Value;
use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::str::FromStr;

/// How big a random model is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ModelSize {
    /// A few narrow layers: for tests.
    #[default]
    Tiny,
    /// The reference checkpoint's sizes: for benchmarks.
    Full,
    /// One of the published scales of a family that has several (yoloworld's n, s, m, l,
    /// x); the other families have none.
    Scale(Scale),
}

/// The published scales of the YOLO families, smallest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scale {
    N,
    S,
    M,
    L,
    X,
}

impl Scale {
    pub fn as_str(self) -> &'static str {
        match self {
            Scale::N => "n",
            Scale::S => "s",
            Scale::M => "m",
            Scale::L => "l",
            Scale::X => "x",
        }
    }
}

impl FromStr for ModelSize {
    type Err = ParseSettingError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "tiny" => Ok(ModelSize::Tiny),
            "full" => Ok(ModelSize::Full),
            "n" => Ok(ModelSize::Scale(Scale::N)),
            "s" => Ok(ModelSize::Scale(Scale::S)),
            "m" => Ok(ModelSize::Scale(Scale::M)),
            "l" => Ok(ModelSize::Scale(Scale::L)),
            "x" => Ok(ModelSize::Scale(Scale::X)),
            _ => Err(ParseSettingError {
                setting: "model size",
                expected: "tiny, full, or a scale n, s, m, l, x",
                value: s.to_string(),
            }),
        }
    }
}

impl fmt::Display for ModelSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ModelSize::Tiny => "tiny",
            ModelSize::Full => "full",
            ModelSize::Scale(scale) => scale.as_str(),
        })
    }
}

/// What a family's synthetic checkpoint holds: its `config.json`, tokenizer and processor
/// files, and the tensors to fill with random values. Each family makes its own
/// (`synthetic` in the family's module); [`write`] puts it on disk.
pub struct SyntheticModel {
    pub config: Value,
    pub tokenizer: Value,
    pub tokenizer_config: Value,
    pub preprocessor: Value,
    pub specs: Vec<TensorSpec>,
    /// Further JSON files (`generation_config.json`), by name.
    pub extra_files: Vec<(&'static str, Value)>,
}

/// Writes `model` into `dir` as a checkpoint folder, with weights drawn from `seed`.
pub fn write(model: &SyntheticModel, seed: u64, dir: &Path) -> Result<(), ModelError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| ModelError::load(format!("cannot create {}", dir.display()), e))?;
    for (name, value) in &model.extra_files {
        write_json(&dir.join(name), value)?;
    }
    write_json(&dir.join("config.json"), &model.config)?;
    write_json(&dir.join("tokenizer.json"), &model.tokenizer)?;
    write_json(&dir.join("tokenizer_config.json"), &model.tokenizer_config)?;
    write_json(&dir.join("preprocessor_config.json"), &model.preprocessor)?;
    write_weights(&dir.join("model.safetensors"), &model.specs, seed)
}

fn write_json(path: &Path, value: &Value) -> Result<(), ModelError> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| ModelError::load(format!("cannot serialise {}", path.display()), e))?;
    std::fs::write(path, text + "\n")
        .map_err(|e| ModelError::load(format!("cannot write {}", path.display()), e))
}

/// SplitMix64: tiny, fast, and the same on every platform.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1].
    fn unit(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    }
}

/// FNV-1a, so each tensor's stream depends on its name, not on the order of writing.
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Standard-normal values, as little-endian f32 bytes, scaled and shifted.
fn normal_bytes(seed: u64, name: &str, n: usize, mean: f64, std: f64) -> Vec<u8> {
    let mut rng = SplitMix64(seed ^ fnv1a(name));
    let mut out = Vec::with_capacity(n * 4);
    while out.len() < n * 4 {
        // Box-Muller gives two values per draw.
        let (u1, u2) = (rng.unit(), rng.unit());
        let r = (-2.0 * u1.ln()).sqrt();
        let theta = std::f64::consts::TAU * u2;
        for z in [r * theta.cos(), r * theta.sin()] {
            if out.len() < n * 4 {
                out.extend_from_slice(&((mean + std * z) as f32).to_le_bytes());
            }
        }
    }
    out
}

/// The values one tensor gets. Scaled so that a signal survives every layer (weights with
/// standard deviation 1/sqrt(fan-in), embeddings of unit-ish size): with the usual 0.02 of a
/// fresh model the tiny towers would barely see their input, and parity checks would not
/// notice a wrong image path. Layer and batch norm scales sit near 1 (batch norm variances
/// too), biases and means near 0, and CLIP's logit
/// scale at its usual initial value.
fn tensor_bytes(spec: &TensorSpec, seed: u64) -> Vec<u8> {
    let n = spec.shape.iter().product();
    let name = spec.name.as_str();
    if name == "logit_scale" {
        return 2.6592f32.to_le_bytes().to_vec();
    }
    let lower = name.to_ascii_lowercase();
    if lower.ends_with(".running_var") {
        // A batch norm's variance: positive, near 1.
        return normal_bytes(seed, name, n, 1.0, 0.1);
    }
    let is_norm = lower.contains("norm") || lower.contains("layrnorm") || lower.contains(".bn.");
    let fan_in: usize = spec.shape.iter().skip(1).product();
    if is_norm {
        if name.ends_with(".weight") {
            normal_bytes(seed, name, n, 1.0, 0.1)
        } else {
            normal_bytes(seed, name, n, 0.0, 0.05)
        }
    } else if lower.contains("embedding") && !lower.contains("patch_embedding") {
        normal_bytes(seed, name, n, 0.0, 0.5)
    } else if spec.shape.len() >= 2 {
        normal_bytes(seed, name, n, 0.0, 1.0 / (fan_in as f64).sqrt())
    } else {
        normal_bytes(seed, name, n, 0.0, 0.02)
    }
}

fn write_weights(path: &Path, specs: &[TensorSpec], seed: u64) -> Result<(), ModelError> {
    let data: Vec<(String, Vec<usize>, Vec<u8>)> = specs
        .iter()
        .map(|s| (s.name.clone(), s.shape.clone(), tensor_bytes(s, seed)))
        .collect();
    let views = data
        .iter()
        .map(|(name, shape, bytes)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                .map(|v| (name.clone(), v))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ModelError::load("bad random tensor", e))?;
    // transformers refuses safetensors files whose metadata does not say "pt".
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::tensor::serialize_to_file(views, Some(metadata), path)
        .map_err(|e| ModelError::load(format!("cannot write {}", path.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_values_are_deterministic_and_plausible() {
        let a = normal_bytes(7, "x", 10_000, 0.0, 1.0);
        assert_eq!(a, normal_bytes(7, "x", 10_000, 0.0, 1.0));
        assert_ne!(a, normal_bytes(8, "x", 10_000, 0.0, 1.0));
        assert_ne!(a, normal_bytes(7, "y", 10_000, 0.0, 1.0));
        let v: Vec<f32> = a
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        let mean = v.iter().sum::<f32>() / v.len() as f32;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / v.len() as f32;
        assert!(
            mean.abs() < 0.05 && (var - 1.0).abs() < 0.05,
            "{mean} {var}"
        );
    }

    #[test]
    fn full_configs_have_the_reference_parameter_counts() {
        // transformers' num_parameters() of the reference checkpoints.
        use crate::model::families::{blip, clip};
        let count = |model: SyntheticModel| -> usize {
            model
                .specs
                .iter()
                .map(|s| s.shape.iter().product::<usize>())
                .sum()
        };
        assert_eq!(
            count(clip::synthetic(ModelSize::Full).unwrap()),
            151_277_313
        );
        // transformers 5 does not save BLIP's output projection (tied to the embeddings).
        assert_eq!(
            count(blip::synthetic(ModelSize::Full).unwrap()),
            446_290_492
        );
    }

    #[test]
    fn sizes_parse() {
        assert_eq!("TINY".parse::<ModelSize>().unwrap(), ModelSize::Tiny);
        assert_eq!("full".parse::<ModelSize>().unwrap(), ModelSize::Full);
        assert_eq!(
            "S".parse::<ModelSize>().unwrap(),
            ModelSize::Scale(Scale::S)
        );
        assert_eq!(ModelSize::Scale(Scale::M).to_string(), "m");
        assert!("huge".parse::<ModelSize>().is_err());
    }
}
