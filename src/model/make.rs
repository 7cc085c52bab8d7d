//! Random-weight models for tests and benchmarks: writes a folder that loads exactly like a
//! real checkpoint (transformers' `config.json` layout, `model.safetensors` with the real
//! tensor names, a working `tokenizer.json`, and the tokenizer and preprocessor configs
//! transformers' processors read), deterministic from a seed.
//!
//! `tiny` models keep the real input sizes (224 for CLIP, 384 for BLIP) but are a few
//! layers of width 32, so they load and run in milliseconds; `full` models have the real
//! sizes of openai/clip-vit-base-patch32, Salesforce/blip-image-captioning-large and the
//! other reference checkpoints (google/paligemma-3b-mix-224: 12 GB of f32 weights).

use super::ModelError;
use super::blip::BlipSpec;
use super::clip::ClipSpec;
use super::load::{ModelType, ParseSettingError, TensorSpec};
use super::owlvit::OwlVitSpec;
use super::paligemma::PaliGemmaSpec;
use super::preprocess::{CLIP_MEAN, CLIP_STD, SIGLIP_MEAN_STD};
use super::siglip::SiglipSpec;
use super::tokenizer::{
    self, BERT_CLS, BERT_MASK, BERT_PAD, BERT_SEP, BERT_UNK, BLIP_DEC, BLIP_ENC, CLIP_BOS,
    CLIP_EOS, GEMMA_BOS, GEMMA_EOS, GEMMA_PAD, GEMMA_UNK, PALIGEMMA_IMAGE, SIGLIP_EOS, SIGLIP_UNK,
};
use serde_json::{Value, json};
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
}

impl FromStr for ModelSize {
    type Err = ParseSettingError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "tiny" => Ok(ModelSize::Tiny),
            "full" => Ok(ModelSize::Full),
            _ => Err(ParseSettingError {
                setting: "model size",
                expected: "tiny, full",
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
        })
    }
}

/// Writes a random `kind` model of `size` into `dir` (created if needed), deterministic from
/// `seed`: the same arguments always give byte-identical files.
pub fn write_random_model(
    kind: ModelType,
    size: ModelSize,
    seed: u64,
    dir: &Path,
) -> Result<(), ModelError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| ModelError::Load(format!("cannot create {}: {e}", dir.display())))?;
    let (config, tokenizer, tokenizer_config, preprocessor, specs) = match kind {
        ModelType::Clip => {
            let (tok, vocab) = tokenizer::clip_tiny_tokenizer();
            let config = clip_config(size, vocab);
            let spec = ClipSpec::from_config(&config)?;
            let side = spec.vision.image_size;
            let preprocessor = json!({
                "crop_size": {"height": side, "width": side},
                "do_center_crop": true, "do_convert_rgb": true, "do_normalize": true,
                "do_rescale": true, "do_resize": true,
                "image_mean": CLIP_MEAN, "image_std": CLIP_STD,
                "image_processor_type": "CLIPImageProcessor", "processor_class": "CLIPProcessor",
                "resample": 3, "rescale_factor": 1.0 / 255.0,
                "size": {"shortest_edge": side}
            });
            let tok_config = json!({
                "tokenizer_class": "CLIPTokenizer", "processor_class": "CLIPProcessor",
                "bos_token": CLIP_BOS, "eos_token": CLIP_EOS, "pad_token": CLIP_EOS,
                "unk_token": CLIP_EOS, "do_lower_case": true,
                "model_max_length": spec.text.max_position_embeddings
            });
            (config, tok, tok_config, preprocessor, spec.tensor_specs())
        }
        ModelType::OwlVit => {
            let (tok, vocab) = tokenizer::clip_tiny_tokenizer();
            let config = owlvit_config(size, vocab);
            let spec = OwlVitSpec::from_config(&config)?;
            let side = spec.clip.vision.image_size;
            let preprocessor = json!({
                "crop_size": {"height": side, "width": side},
                "do_center_crop": false, "do_convert_rgb": true, "do_normalize": true,
                "do_rescale": true, "do_resize": true,
                "image_mean": CLIP_MEAN, "image_std": CLIP_STD,
                "image_processor_type": "OwlViTImageProcessor",
                "processor_class": "OwlViTProcessor", "resample": 3,
                "rescale_factor": 1.0 / 255.0, "size": {"height": side, "width": side}
            });
            let tok_config = json!({
                "tokenizer_class": "CLIPTokenizer", "processor_class": "OwlViTProcessor",
                "bos_token": CLIP_BOS, "eos_token": CLIP_EOS, "pad_token": CLIP_EOS,
                "unk_token": CLIP_EOS, "do_lower_case": true,
                "model_max_length": spec.clip.text.max_position_embeddings
            });
            (config, tok, tok_config, preprocessor, spec.tensor_specs())
        }
        ModelType::Siglip => {
            let (tok, vocab) = tokenizer::siglip_tiny_tokenizer();
            let config = siglip_config(size, vocab);
            let spec = SiglipSpec::from_config(&config)?;
            let side = spec.config.vision_config.image_size;
            let preprocessor = json!({
                "do_convert_rgb": null, "do_normalize": true, "do_rescale": true,
                "do_resize": true, "image_mean": SIGLIP_MEAN_STD, "image_std": SIGLIP_MEAN_STD,
                "image_processor_type": "SiglipImageProcessor",
                "processor_class": "SiglipProcessor", "resample": 3,
                "rescale_factor": 1.0 / 255.0, "size": {"height": side, "width": side}
            });
            let tok_config = json!({
                "tokenizer_class": "PreTrainedTokenizerFast", "processor_class": "SiglipProcessor",
                "eos_token": SIGLIP_EOS, "pad_token": SIGLIP_EOS, "unk_token": SIGLIP_UNK,
                "model_max_length": spec.config.text_config.max_position_embeddings
            });
            (config, tok, tok_config, preprocessor, spec.tensor_specs())
        }
        ModelType::Blip => {
            let (tok, vocab, ids) = tokenizer::bert_tiny_tokenizer();
            let config = blip_config(size, vocab, ids);
            let spec = BlipSpec::from_config(&config)?;
            let side = spec.config.vision_config.image_size;
            let preprocessor = json!({
                "do_convert_rgb": true, "do_normalize": true, "do_rescale": true,
                "do_resize": true, "image_mean": CLIP_MEAN, "image_std": CLIP_STD,
                "image_processor_type": "BlipImageProcessor", "processor_class": "BlipProcessor",
                "resample": 3, "rescale_factor": 1.0 / 255.0,
                "size": {"height": side, "width": side}
            });
            let tok_config = json!({
                "tokenizer_class": "BertTokenizer", "processor_class": "BlipProcessor",
                "do_lower_case": true, "bos_token": BLIP_DEC, "cls_token": BERT_CLS,
                "sep_token": BERT_SEP, "pad_token": BERT_PAD, "unk_token": BERT_UNK,
                "mask_token": BERT_MASK, "additional_special_tokens": [BLIP_ENC],
                "model_max_length": spec.config.text_config.max_position_embeddings
            });
            // transformers 5 does not save the output projection tied to the word
            // embeddings; write what it writes.
            let specs = spec
                .tensor_specs()
                .into_iter()
                .filter(|s| s.name != "text_decoder.cls.predictions.decoder.weight")
                .collect();
            (config, tok, tok_config, preprocessor, specs)
        }
        ModelType::OpenAi => {
            return Err(ModelError::Load(
                "MODEL_TYPE=openai has no weights to write: it calls a server".into(),
            ));
        }
        ModelType::PaliGemma => {
            let (tok, vocab) = tokenizer::paligemma_tiny_tokenizer();
            let config = paligemma_config(size, vocab);
            let spec = PaliGemmaSpec::from_config(&config)?;
            let side = spec.vision.image_size;
            let preprocessor = json!({
                "do_convert_rgb": null, "do_normalize": true, "do_rescale": true,
                "do_resize": true, "image_mean": SIGLIP_MEAN_STD, "image_std": SIGLIP_MEAN_STD,
                "image_processor_type": "SiglipImageProcessor",
                "image_seq_length": spec.image_tokens(),
                "processor_class": "PaliGemmaProcessor", "resample": 3,
                "rescale_factor": 1.0 / 255.0, "size": {"height": side, "width": side}
            });
            let tok_config = json!({
                "tokenizer_class": "PreTrainedTokenizerFast",
                "processor_class": "PaliGemmaProcessor",
                "bos_token": GEMMA_BOS, "eos_token": GEMMA_EOS, "pad_token": GEMMA_PAD,
                "unk_token": GEMMA_UNK, "image_token": PALIGEMMA_IMAGE,
                "add_bos_token": false, "add_eos_token": false,
                "model_max_length": spec.text.max_position_embeddings
            });
            let generation = json!({"bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0});
            write_json(&dir.join("generation_config.json"), &generation)?;
            (config, tok, tok_config, preprocessor, spec.tensor_specs())
        }
    };
    write_json(&dir.join("config.json"), &config)?;
    write_json(&dir.join("tokenizer.json"), &tokenizer)?;
    write_json(&dir.join("tokenizer_config.json"), &tokenizer_config)?;
    write_json(&dir.join("preprocessor_config.json"), &preprocessor)?;
    write_weights(&dir.join("model.safetensors"), &specs, seed)
}

fn write_json(path: &Path, value: &Value) -> Result<(), ModelError> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| ModelError::Load(format!("cannot serialise {}: {e}", path.display())))?;
    std::fs::write(path, text + "\n")
        .map_err(|e| ModelError::Load(format!("cannot write {}: {e}", path.display())))
}

/// A transformers 5 `CLIPConfig`, as `save_pretrained` writes it.
fn clip_config(size: ModelSize, tiny_vocab: usize) -> Value {
    let (bos, eos) = (tiny_vocab - 2, tiny_vocab - 1);
    let (vocab, t_hidden, t_inter, t_layers, t_heads, v_hidden, v_inter, v_layers, v_heads, proj) =
        match size {
            ModelSize::Tiny => (tiny_vocab, 32, 64, 2, 4, 32, 64, 2, 4, 16),
            ModelSize::Full => (49408, 512, 2048, 12, 8, 768, 3072, 12, 12, 512),
        };
    json!({
        "_name_or_path": format!("random-clip-{size}"),
        "architectures": ["CLIPModel"],
        "dtype": "float32",
        "initializer_factor": 1.0,
        "logit_scale_init_value": 2.6592,
        "model_type": "clip",
        "projection_dim": proj,
        "text_config": {
            "attention_dropout": 0.0, "bos_token_id": bos, "eos_token_id": eos,
            "hidden_act": "quick_gelu", "hidden_size": t_hidden, "initializer_factor": 1.0,
            "initializer_range": 0.02, "intermediate_size": t_inter, "layer_norm_eps": 1e-5,
            "max_position_embeddings": 77, "model_type": "clip_text_model",
            "num_attention_heads": t_heads, "num_hidden_layers": t_layers,
            "pad_token_id": eos, "projection_dim": proj, "vocab_size": vocab
        },
        "transformers_version": "5.23.0",
        "vision_config": {
            "attention_dropout": 0.0, "hidden_act": "quick_gelu", "hidden_size": v_hidden,
            "image_size": 224, "initializer_factor": 1.0, "initializer_range": 0.02,
            "intermediate_size": v_inter, "layer_norm_eps": 1e-5,
            "model_type": "clip_vision_model", "num_attention_heads": v_heads,
            "num_channels": 3, "num_hidden_layers": v_layers, "patch_size": 32,
            "projection_dim": proj
        }
    })
}

/// A transformers 5 `OwlViTConfig`, as `save_pretrained` writes it. OWL-ViT's class head
/// needs `projection_dim` equal to the text hidden size, so the tiny one projects to 32.
fn owlvit_config(size: ModelSize, tiny_vocab: usize) -> Value {
    let (bos, eos) = (tiny_vocab - 2, tiny_vocab - 1);
    let (vocab, t_hidden, t_inter, t_layers, t_heads, v_hidden, v_inter, v_layers, v_heads) =
        match size {
            ModelSize::Tiny => (tiny_vocab, 32, 64, 2, 4, 32, 64, 2, 4),
            ModelSize::Full => (49408, 512, 2048, 12, 8, 768, 3072, 12, 12),
        };
    json!({
        "_name_or_path": format!("random-owlvit-{size}"),
        "architectures": ["OwlViTForObjectDetection"],
        "dtype": "float32",
        "initializer_factor": 1.0,
        "logit_scale_init_value": 2.6592,
        "model_type": "owlvit",
        "projection_dim": t_hidden,
        "return_dict": true,
        "text_config": {
            "attention_dropout": 0.0, "bos_token_id": bos, "eos_token_id": eos,
            "hidden_act": "quick_gelu", "hidden_size": t_hidden, "initializer_factor": 1.0,
            "initializer_range": 0.02, "intermediate_size": t_inter, "layer_norm_eps": 1e-5,
            "max_position_embeddings": 16, "model_type": "owlvit_text_model",
            "num_attention_heads": t_heads, "num_hidden_layers": t_layers,
            "pad_token_id": 0, "vocab_size": vocab
        },
        "transformers_version": "5.24.0",
        "vision_config": {
            "attention_dropout": 0.0, "hidden_act": "quick_gelu", "hidden_size": v_hidden,
            "image_size": 768, "initializer_factor": 1.0, "initializer_range": 0.02,
            "intermediate_size": v_inter, "layer_norm_eps": 1e-5,
            "model_type": "owlvit_vision_model", "num_attention_heads": v_heads,
            "num_channels": 3, "num_hidden_layers": v_layers, "patch_size": 32
        }
    })
}

/// A transformers 5 `SiglipConfig`, as `save_pretrained` writes it. The text tower pads
/// with `</s>` (id 1), as google's checkpoints do.
fn siglip_config(size: ModelSize, tiny_vocab: usize) -> Value {
    let (vocab, hidden, inter, layers, heads) = match size {
        ModelSize::Tiny => (tiny_vocab, 32, 64, 2, 4),
        ModelSize::Full => (32000, 768, 3072, 12, 12),
    };
    json!({
        "_name_or_path": format!("random-siglip-{size}"),
        "architectures": ["SiglipModel"],
        "dtype": "float32",
        "initializer_factor": 1.0,
        "model_type": "siglip",
        "text_config": {
            "attention_dropout": 0.0, "bos_token_id": 49406, "eos_token_id": 1,
            "hidden_act": "gelu_pytorch_tanh", "hidden_size": hidden,
            "intermediate_size": inter, "layer_norm_eps": 1e-6,
            "max_position_embeddings": 64, "model_type": "siglip_text_model",
            "num_attention_heads": heads, "num_hidden_layers": layers, "pad_token_id": 1,
            "projection_size": hidden, "vocab_size": vocab
        },
        "transformers_version": "5.24.0",
        "vision_config": {
            "attention_dropout": 0.0, "hidden_act": "gelu_pytorch_tanh", "hidden_size": hidden,
            "image_size": 224, "intermediate_size": inter, "layer_norm_eps": 1e-6,
            "model_type": "siglip_vision_model", "num_attention_heads": heads,
            "num_channels": 3, "num_hidden_layers": layers, "patch_size": 16,
            "vision_use_head": true
        }
    })
}

/// A transformers 5 `BlipConfig`, as `save_pretrained` writes it.
fn blip_config(size: ModelSize, tiny_vocab: usize, ids: tokenizer::BertSpecialIds) -> Value {
    let (vocab, t_hidden, t_inter, t_layers, t_heads, v_hidden, v_inter, v_layers, v_heads, patch) =
        match size {
            ModelSize::Tiny => (tiny_vocab, 32, 64, 2, 4, 32, 64, 2, 4, 32),
            ModelSize::Full => (30524, 768, 3072, 12, 12, 1024, 4096, 24, 16, 16),
        };
    json!({
        "_name_or_path": format!("random-blip-{size}"),
        "architectures": ["BlipForConditionalGeneration"],
        "dtype": "float32",
        "image_text_hidden_size": 256,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "label_smoothing": 0.0,
        "logit_scale_init_value": 2.6592,
        "model_type": "blip",
        "projection_dim": 512,
        "text_config": {
            "attention_probs_dropout_prob": 0.0, "bos_token_id": ids.dec,
            "encoder_hidden_size": v_hidden, "eos_token_id": ids.sep, "hidden_act": "gelu",
            "hidden_dropout_prob": 0.0, "hidden_size": t_hidden, "initializer_range": 0.02,
            "intermediate_size": t_inter, "is_decoder": true, "label_smoothing": 0.0,
            "layer_norm_eps": 1e-12, "max_position_embeddings": 512,
            "model_type": "blip_text_model", "num_attention_heads": t_heads,
            "num_hidden_layers": t_layers, "pad_token_id": ids.pad, "projection_dim": 768,
            "sep_token_id": ids.sep, "tie_word_embeddings": true, "use_cache": true,
            "vocab_size": vocab
        },
        "tie_word_embeddings": true,
        "transformers_version": "5.23.0",
        "vision_config": {
            "attention_dropout": 0.0, "hidden_act": "gelu", "hidden_size": v_hidden,
            "image_size": 384, "initializer_range": 1e-10, "intermediate_size": v_inter,
            "layer_norm_eps": 1e-5, "model_type": "blip_vision_model",
            "num_attention_heads": v_heads, "num_hidden_layers": v_layers,
            "patch_size": patch, "projection_dim": 512
        }
    })
}

/// A transformers 5 `PaliGemmaConfig` in google/paligemma-3b-mix-224's layout. The image
/// side and patch keep the real 256 image tokens at both sizes. The image token is the
/// small tokenizer's `<image>` (its last id), so that transformers' processor agrees with
/// the model; the full model keeps the real vocabulary size, of which the small tokenizer
/// spells only the first ids.
fn paligemma_config(size: ModelSize, tiny_vocab: usize) -> Value {
    let image_token = tiny_vocab - 1;
    let (v_hidden, v_inter, v_layers, v_heads) = match size {
        ModelSize::Tiny => (32, 64, 2, 4),
        ModelSize::Full => (1152, 4304, 27, 16),
    };
    let (vocab, t_hidden, t_inter, t_layers, t_heads, head_dim) = match size {
        ModelSize::Tiny => (tiny_vocab, 32, 64, 2, 4, 8),
        ModelSize::Full => (257216, 2048, 16384, 18, 8, 256),
    };
    json!({
        "_name_or_path": format!("random-paligemma-{size}"),
        "architectures": ["PaliGemmaForConditionalGeneration"],
        "bos_token_id": 2,
        "dtype": "float32",
        "eos_token_id": 1,
        "hidden_size": t_hidden,
        "image_token_index": image_token,
        "model_type": "paligemma",
        "pad_token_id": 0,
        "projection_dim": t_hidden,
        "text_config": {
            "attention_bias": false, "attention_dropout": 0.0, "head_dim": head_dim,
            "hidden_act": "gelu_pytorch_tanh", "hidden_size": t_hidden,
            "intermediate_size": t_inter, "max_position_embeddings": 8192,
            "model_type": "gemma", "num_attention_heads": t_heads,
            "num_hidden_layers": t_layers, "num_image_tokens": 256,
            "num_key_value_heads": 1, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
            "vocab_size": vocab
        },
        "transformers_version": "5.24.0",
        "vision_config": {
            "attention_dropout": 0.0, "hidden_act": "gelu_pytorch_tanh",
            "hidden_size": v_hidden, "image_size": 224, "intermediate_size": v_inter,
            "layer_norm_eps": 1e-6, "model_type": "siglip_vision_model",
            "num_attention_heads": v_heads, "num_channels": 3, "num_hidden_layers": v_layers,
            "patch_size": 14, "projection_dim": t_hidden, "vision_use_head": false
        },
        "vocab_size": vocab
    })
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
/// notice a wrong image path. LayerNorm scales sit near 1, biases near 0, and CLIP's logit
/// scale at its usual initial value.
fn tensor_bytes(spec: &TensorSpec, seed: u64) -> Vec<u8> {
    let n = spec.shape.iter().product();
    let name = spec.name.as_str();
    if name == "logit_scale" {
        return 2.6592f32.to_le_bytes().to_vec();
    }
    let lower = name.to_ascii_lowercase();
    let is_norm = lower.contains("norm") || lower.contains("layrnorm");
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
        .map_err(|e| ModelError::Load(format!("bad random tensor: {e}")))?;
    // transformers refuses safetensors files whose metadata does not say "pt".
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::tensor::serialize_to_file(views, Some(metadata), path)
        .map_err(|e| ModelError::Load(format!("cannot write {}: {e}", path.display())))
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
        let (_, vocab) = tokenizer::clip_tiny_tokenizer();
        let spec = ClipSpec::from_config(&clip_config(ModelSize::Full, vocab)).unwrap();
        let count = |specs: Vec<TensorSpec>| -> usize {
            specs
                .iter()
                .map(|s| s.shape.iter().product::<usize>())
                .sum()
        };
        assert_eq!(count(spec.tensor_specs()), 151_277_313);
        let (_, vocab, ids) = tokenizer::bert_tiny_tokenizer();
        let spec = BlipSpec::from_config(&blip_config(ModelSize::Full, vocab, ids)).unwrap();
        let untied = spec
            .tensor_specs()
            .into_iter()
            .filter(|s| s.name != "text_decoder.cls.predictions.decoder.weight")
            .collect();
        assert_eq!(count(untied), 446_290_492);
    }

    #[test]
    fn sizes_parse() {
        assert_eq!("TINY".parse::<ModelSize>().unwrap(), ModelSize::Tiny);
        assert_eq!("full".parse::<ModelSize>().unwrap(), ModelSize::Full);
        assert!("huge".parse::<ModelSize>().is_err());
    }
}
