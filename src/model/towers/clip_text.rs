//! The CLIP architecture that CLIP and OWL-ViT share: its settings read from `config.json`
//! ([`ClipSpec`], with the tensor list a checkpoint must hold) and its text side
//! ([`ClipTextEncoder`]: tokenizer, text tower, projection).

use crate::model::ModelError;
use crate::model::loading::config::{check_heads, check_patches};
use crate::model::loading::{TensorSpec, parse_config};
use crate::model::text::tokenizer::{self, CLIP_EOS};
use crate::model::towers::specs::{
    TextTowerShape, encoder_specs, layer_norm_specs, text_tower_specs,
};
use candle_core::{D, Device, Module, Tensor};
use candle_nn::{Linear, VarBuilder};
use candle_transformers::models::clip::text_model::{
    Activation, ClipTextConfig, ClipTextTransformer,
};
use candle_transformers::models::clip::vision_model::ClipVisionConfig;
use serde::Deserialize;
use serde_json::Value;
use tokenizers::Tokenizer;

/// The CLIP architecture settings read from `config.json`.
#[derive(Clone, Debug)]
pub struct ClipSpec {
    pub text: ClipTextConfig,
    pub vision: ClipVisionConfig,
    pub projection_dim: usize,
    pub logit_scale_init_value: f64,
}

/// The sizes whose defaults OWL-ViT sets apart from CLIP's.
#[derive(Clone, Copy, Debug)]
pub struct ClipDefaults {
    pub image_size: usize,
    pub max_position_embeddings: usize,
}

impl ClipDefaults {
    /// transformers' `CLIPConfig`.
    pub const CLIP: Self = Self {
        image_size: 224,
        max_position_embeddings: 77,
    };
}

/// transformers' `CLIPConfig` as `config.json` holds it. `save_pretrained` leaves out values
/// equal to the defaults, so every key has transformers' default.
#[derive(Deserialize)]
#[serde(default)]
struct ClipConfigFile {
    projection_dim: usize,
    logit_scale_init_value: f64,
    text_config: TextSection,
    vision_config: VisionSection,
}

impl Default for ClipConfigFile {
    fn default() -> Self {
        Self {
            projection_dim: 512,
            logit_scale_init_value: 2.6592,
            text_config: TextSection::default(),
            vision_config: VisionSection::default(),
        }
    }
}

/// `text_config`; `None` takes the family's default ([`ClipDefaults`]).
#[derive(Deserialize)]
#[serde(default)]
struct TextSection {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    max_position_embeddings: Option<usize>,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    hidden_act: Option<String>,
    layer_norm_eps: Option<f64>,
}

impl Default for TextSection {
    fn default() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 512,
            intermediate_size: 2048,
            max_position_embeddings: None,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            hidden_act: None,
            layer_norm_eps: None,
        }
    }
}

/// `vision_config`; `None` takes the family's default ([`ClipDefaults`]).
#[derive(Deserialize)]
#[serde(default)]
struct VisionSection {
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_channels: usize,
    image_size: Option<usize>,
    patch_size: usize,
    hidden_act: Option<String>,
    layer_norm_eps: Option<f64>,
}

impl Default for VisionSection {
    fn default() -> Self {
        Self {
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            num_channels: 3,
            image_size: None,
            patch_size: 32,
            hidden_act: None,
            layer_norm_eps: None,
        }
    }
}

/// Candle's CLIP hard-codes quick_gelu and a LayerNorm eps of 1e-5: refuse anything else
/// rather than run a different model.
fn check_fixed(which: &str, act: Option<&str>, eps: Option<f64>) -> Result<(), ModelError> {
    if let Some(act) = act
        && act != "quick_gelu"
    {
        return Err(ModelError::Load(
            format!(
                "config.json: {which}.hidden_act is {act}; \
                 this CLIP backend supports quick_gelu only"
            )
            .into(),
        ));
    }
    if let Some(eps) = eps
        && (eps - 1e-5).abs() > 1e-12
    {
        return Err(ModelError::Load(
            format!(
                "config.json: {which}.layer_norm_eps is {eps}; \
                 this CLIP backend supports 1e-5 only"
            )
            .into(),
        ));
    }
    Ok(())
}

impl ClipSpec {
    /// Reads a transformers `CLIPConfig`, filling missing keys with transformers' defaults.
    pub fn from_config(config: &Value) -> Result<Self, ModelError> {
        Self::with_defaults(config, ClipDefaults::CLIP)
    }

    /// Reads a CLIP-shaped config whose family's defaults are `defaults` where they differ.
    pub fn with_defaults(config: &Value, defaults: ClipDefaults) -> Result<Self, ModelError> {
        let file: ClipConfigFile = parse_config(config, "CLIP")?;
        let (t, v) = (file.text_config, file.vision_config);
        check_fixed("text_config", t.hidden_act.as_deref(), t.layer_norm_eps)?;
        check_fixed("vision_config", v.hidden_act.as_deref(), v.layer_norm_eps)?;
        let image_size = v.image_size.unwrap_or(defaults.image_size);
        check_patches(image_size, v.patch_size)?;
        check_heads(&[
            (t.hidden_size, t.num_attention_heads),
            (v.hidden_size, v.num_attention_heads),
        ])?;
        let projection_dim = file.projection_dim;
        let text = ClipTextConfig {
            vocab_size: t.vocab_size,
            embed_dim: t.hidden_size,
            activation: Activation::QuickGelu,
            intermediate_size: t.intermediate_size,
            max_position_embeddings: t
                .max_position_embeddings
                .unwrap_or(defaults.max_position_embeddings),
            pad_with: None,
            num_hidden_layers: t.num_hidden_layers,
            num_attention_heads: t.num_attention_heads,
            projection_dim,
        };
        let vision = ClipVisionConfig {
            embed_dim: v.hidden_size,
            activation: Activation::QuickGelu,
            intermediate_size: v.intermediate_size,
            num_hidden_layers: v.num_hidden_layers,
            num_attention_heads: v.num_attention_heads,
            projection_dim,
            num_channels: v.num_channels,
            image_size,
            patch_size: v.patch_size,
        };
        Ok(Self {
            text,
            vision,
            projection_dim,
            logit_scale_init_value: file.logit_scale_init_value,
        })
    }

    /// Every tensor transformers' `CLIPModel` stores, with its shape.
    pub fn tensor_specs(&self) -> Vec<TensorSpec> {
        let (t, v) = (&self.text, &self.vision);
        let mut specs = Vec::new();
        let text_shape = TextTowerShape {
            vocab: t.vocab_size,
            positions: t.max_position_embeddings,
            hidden: t.embed_dim,
            intermediate: t.intermediate_size,
            layers: t.num_hidden_layers,
        };
        text_tower_specs(&mut specs, "text_model", &text_shape);
        let patches = (v.image_size / v.patch_size).pow(2);
        specs.push(TensorSpec::new(
            "vision_model.embeddings.class_embedding",
            &[v.embed_dim],
        ));
        specs.push(TensorSpec::new(
            "vision_model.embeddings.patch_embedding.weight",
            &[v.embed_dim, v.num_channels, v.patch_size, v.patch_size],
        ));
        specs.push(TensorSpec::new(
            "vision_model.embeddings.position_embedding.weight",
            &[patches + 1, v.embed_dim],
        ));
        layer_norm_specs(&mut specs, "vision_model.pre_layrnorm", v.embed_dim);
        encoder_specs(
            &mut specs,
            "vision_model.encoder",
            v.num_hidden_layers,
            v.embed_dim,
            v.intermediate_size,
        );
        layer_norm_specs(&mut specs, "vision_model.post_layernorm", v.embed_dim);
        specs.push(TensorSpec::new(
            "visual_projection.weight",
            &[self.projection_dim, v.embed_dim],
        ));
        specs.push(TensorSpec::new(
            "text_projection.weight",
            &[self.projection_dim, t.embed_dim],
        ));
        specs.push(TensorSpec::new("logit_scale", &[]));
        specs
    }
}

/// CLIP's text side: tokenizer, text tower and projection. Built from candle-transformers'
/// text tower rather than its `ClipModel`, to take the projection size from the top-level
/// `projection_dim` (as transformers does) and to pool text at the first end-of-text token
/// (as transformers 5 does) instead of at the highest token id. OWL-ViT's text side is the
/// same.
pub struct ClipTextEncoder {
    tower: ClipTextTransformer,
    projection: Linear,
    tokenizer: Tokenizer,
    eos_id: u32,
    max_positions: usize,
    device: Device,
}

/// Tokenised texts, padded with end-of-text to one length.
struct TextBatch {
    ids: Tensor,
    /// Per text, the position of its first end-of-text token (where it is pooled).
    eos_positions: Vec<usize>,
}

impl ClipTextEncoder {
    /// Reads the text side: `vb` at the level holding `text_model` and `text_projection`.
    pub fn new(
        spec: &ClipSpec,
        tokenizer: Tokenizer,
        vb: VarBuilder,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let eos_id = tokenizer::required_id(&tokenizer, CLIP_EOS)?;
        if eos_id as usize >= spec.text.vocab_size {
            return Err(ModelError::Load(
                format!(
                    "tokenizer's {CLIP_EOS} id {eos_id} is outside the model's vocabulary of {}",
                    spec.text.vocab_size
                )
                .into(),
            ));
        }
        let build = || -> candle_core::Result<_> {
            Ok((
                ClipTextTransformer::new(vb.pp("text_model"), &spec.text)?,
                candle_nn::linear_no_bias(
                    spec.text.embed_dim,
                    spec.projection_dim,
                    vb.pp("text_projection"),
                )?,
            ))
        };
        let (tower, projection) =
            build().map_err(|e| ModelError::load("building the text tower", e))?;
        Ok(Self {
            tower,
            projection,
            tokenizer,
            eos_id,
            max_positions: spec.text.max_position_embeddings,
            device: device.clone(),
        })
    }

    /// Token ids as the text tower reads them: `<|startoftext|> ... <|endoftext|>`, cut to
    /// the position limit with the end-of-text kept last.
    pub fn token_ids(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        let mut ids = tokenizer::encode_ids(&self.tokenizer, text, true)?;
        if ids.len() > self.max_positions {
            ids.truncate(self.max_positions - 1);
            ids.push(self.eos_id);
        }
        if !ids.contains(&self.eos_id) {
            ids.push(self.eos_id);
        }
        Ok(ids)
    }

    fn text_batch(&self, texts: &[String]) -> Result<TextBatch, ModelError> {
        let all: Vec<Vec<u32>> = texts
            .iter()
            .map(|t| self.token_ids(t))
            .collect::<Result<_, _>>()?;
        let len = all.iter().map(Vec::len).max().unwrap_or(1);
        let mut flat = Vec::with_capacity(all.len() * len);
        let mut eos_positions = Vec::with_capacity(all.len());
        for ids in &all {
            eos_positions.push(ids.iter().position(|&i| i == self.eos_id).unwrap_or(0));
            flat.extend_from_slice(ids);
            // Padding sits after the pooled token; the causal mask keeps it out of the result.
            flat.extend(std::iter::repeat_n(self.eos_id, len - ids.len()));
        }
        let ids = Tensor::from_vec(flat, (all.len(), len), &self.device)?;
        Ok(TextBatch { ids, eos_positions })
    }

    /// Projected (not normalised) text embeddings, `(texts, projection_dim)`.
    pub fn embeddings(&self, texts: &[String]) -> Result<Tensor, ModelError> {
        let batch = self.text_batch(texts)?;
        let (n, len) = batch.ids.dims2()?;
        let hidden = self.tower.forward_with_mask(&batch.ids, usize::MAX)?;
        let rows: Vec<u32> = batch
            .eos_positions
            .iter()
            .enumerate()
            .map(|(i, &p)| (i * len + p) as u32)
            .collect();
        let rows = Tensor::from_vec(rows, n, &self.device)?;
        let dim = hidden.dim(D::Minus1)?;
        let pooled = hidden.reshape((n * len, dim))?.index_select(&rows, 0)?;
        Ok(self.projection.forward(&pooled)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn absent_and_null_keys_take_the_familys_defaults() {
        let config =
            json!({"text_config": {"hidden_size": null}, "vision_config": {"patch_size": 16}});
        let clip = ClipSpec::from_config(&config).unwrap();
        assert_eq!(clip.text.embed_dim, 512);
        assert_eq!(clip.text.max_position_embeddings, 77);
        assert_eq!((clip.vision.image_size, clip.vision.patch_size), (224, 16));
        let owlvit = ClipDefaults {
            image_size: 768,
            max_position_embeddings: 16,
        };
        let spec = ClipSpec::with_defaults(&config, owlvit).unwrap();
        assert_eq!(spec.text.max_position_embeddings, 16);
        assert_eq!(spec.vision.image_size, 768);
        let set = json!({"vision_config": {"image_size": 336, "patch_size": 14}});
        assert_eq!(
            ClipSpec::with_defaults(&set, owlvit)
                .unwrap()
                .vision
                .image_size,
            336
        );
    }

    #[test]
    fn configs_candle_cannot_run_are_refused_with_the_reason() {
        let refused = |config: Value| ClipSpec::from_config(&config).unwrap_err().to_string();
        let err = refused(json!({"text_config": {"hidden_act": "gelu"}}));
        assert!(
            err.contains(
                "text_config.hidden_act is gelu; this CLIP backend supports quick_gelu only"
            ),
            "{err}"
        );
        let err = refused(json!({"vision_config": {"layer_norm_eps": 1e-6}}));
        assert!(
            err.contains("vision_config.layer_norm_eps is 0.000001"),
            "{err}"
        );
        let err = refused(json!({"vision_config": {"patch_size": 30}}));
        assert!(
            err.contains("image_size 224 is not a multiple of patch_size 30"),
            "{err}"
        );
        let err = refused(json!({"text_config": {"num_attention_heads": 7}}));
        assert!(
            err.contains("hidden_size is not a multiple of num_attention_heads"),
            "{err}"
        );
        let err = refused(json!({"projection_dim": "wide"}));
        assert!(err.contains("config.json is not a CLIP config"), "{err}");
    }
}
