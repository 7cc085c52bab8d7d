//! The CLIP architecture that CLIP and OWL-ViT share: its settings read from `config.json`
//! ([`ClipSpec`], with the tensor list a checkpoint must hold) and its text side
//! ([`ClipTextEncoder`]: tokenizer, text tower, projection).

use crate::model::ModelError;
use crate::model::loading::TensorSpec;
use crate::model::text::tokenizer::{self, CLIP_EOS};
use crate::model::towers::scoring::infer_err;
use crate::model::towers::specs::{encoder_specs, layer_norm_specs};
use candle_core::{D, Device, Module, Tensor};
use candle_nn::{Linear, VarBuilder};
use candle_transformers::models::clip::text_model::{
    Activation, ClipTextConfig, ClipTextTransformer,
};
use candle_transformers::models::clip::vision_model::ClipVisionConfig;
use serde_json::{Value, json};
use tokenizers::Tokenizer;

/// The CLIP architecture settings read from `config.json`.
#[derive(Clone, Debug)]
pub struct ClipSpec {
    pub text: ClipTextConfig,
    pub vision: ClipVisionConfig,
    pub projection_dim: usize,
    pub logit_scale_init_value: f64,
}

fn get_usize(section: &Value, key: &str, default: usize) -> Result<usize, ModelError> {
    match section.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => v
            .as_u64()
            .map(|v| v as usize)
            .ok_or_else(|| ModelError::Load(format!("config.json: {key} is not a count: {v}"))),
    }
}

/// Candle's CLIP hard-codes quick_gelu and a LayerNorm eps of 1e-5: refuse anything else
/// rather than run a different model.
fn check_fixed(section: &Value, which: &str) -> Result<(), ModelError> {
    if let Some(act) = section.get("hidden_act").and_then(Value::as_str)
        && act != "quick_gelu"
    {
        return Err(ModelError::Load(format!(
            "config.json: {which}.hidden_act is {act}; this CLIP backend supports quick_gelu only"
        )));
    }
    if let Some(eps) = section.get("layer_norm_eps").and_then(Value::as_f64)
        && (eps - 1e-5).abs() > 1e-12
    {
        return Err(ModelError::Load(format!(
            "config.json: {which}.layer_norm_eps is {eps}; this CLIP backend supports 1e-5 only"
        )));
    }
    Ok(())
}

impl ClipSpec {
    /// Reads a transformers `CLIPConfig`, filling missing keys with transformers' defaults
    /// (`save_pretrained` leaves out values equal to the defaults).
    pub fn from_config(config: &Value) -> Result<Self, ModelError> {
        let empty = json!({});
        let text = config.get("text_config").unwrap_or(&empty);
        let vision = config.get("vision_config").unwrap_or(&empty);
        check_fixed(text, "text_config")?;
        check_fixed(vision, "vision_config")?;
        let projection_dim = get_usize(config, "projection_dim", 512)?;
        let text = ClipTextConfig {
            vocab_size: get_usize(text, "vocab_size", 49408)?,
            embed_dim: get_usize(text, "hidden_size", 512)?,
            activation: Activation::QuickGelu,
            intermediate_size: get_usize(text, "intermediate_size", 2048)?,
            max_position_embeddings: get_usize(text, "max_position_embeddings", 77)?,
            pad_with: None,
            num_hidden_layers: get_usize(text, "num_hidden_layers", 12)?,
            num_attention_heads: get_usize(text, "num_attention_heads", 8)?,
            projection_dim,
        };
        let vision = ClipVisionConfig {
            embed_dim: get_usize(vision, "hidden_size", 768)?,
            activation: Activation::QuickGelu,
            intermediate_size: get_usize(vision, "intermediate_size", 3072)?,
            num_hidden_layers: get_usize(vision, "num_hidden_layers", 12)?,
            num_attention_heads: get_usize(vision, "num_attention_heads", 12)?,
            projection_dim,
            num_channels: get_usize(vision, "num_channels", 3)?,
            image_size: get_usize(vision, "image_size", 224)?,
            patch_size: get_usize(vision, "patch_size", 32)?,
        };
        if vision.patch_size == 0 || !vision.image_size.is_multiple_of(vision.patch_size) {
            return Err(ModelError::Load(format!(
                "config.json: image_size {} is not a multiple of patch_size {}",
                vision.image_size, vision.patch_size
            )));
        }
        if !text.embed_dim.is_multiple_of(text.num_attention_heads)
            || !vision.embed_dim.is_multiple_of(vision.num_attention_heads)
        {
            return Err(ModelError::Load(
                "config.json: hidden_size is not a multiple of num_attention_heads".into(),
            ));
        }
        Ok(Self {
            text,
            vision,
            projection_dim,
            logit_scale_init_value: config
                .get("logit_scale_init_value")
                .and_then(Value::as_f64)
                .unwrap_or(2.6592),
        })
    }

    /// Every tensor transformers' `CLIPModel` stores, with its shape.
    pub fn tensor_specs(&self) -> Vec<TensorSpec> {
        let (t, v) = (&self.text, &self.vision);
        let mut specs = vec![
            TensorSpec::new(
                "text_model.embeddings.token_embedding.weight",
                &[t.vocab_size, t.embed_dim],
            ),
            TensorSpec::new(
                "text_model.embeddings.position_embedding.weight",
                &[t.max_position_embeddings, t.embed_dim],
            ),
        ];
        encoder_specs(
            &mut specs,
            "text_model.encoder",
            t.num_hidden_layers,
            t.embed_dim,
            t.intermediate_size,
        );
        layer_norm_specs(&mut specs, "text_model.final_layer_norm", t.embed_dim);
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
            return Err(ModelError::Load(format!(
                "tokenizer's {CLIP_EOS} id {eos_id} is outside the model's vocabulary of {}",
                spec.text.vocab_size
            )));
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
            build().map_err(|e| ModelError::Load(format!("building the text tower: {e}")))?;
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
        let enc = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| ModelError::Prompt(format!("cannot tokenise {text:?}: {e}")))?;
        let mut ids = enc.get_ids().to_vec();
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
        let ids = Tensor::from_vec(flat, (all.len(), len), &self.device).map_err(infer_err)?;
        Ok(TextBatch { ids, eos_positions })
    }

    /// Projected (not normalised) text embeddings, `(texts, projection_dim)`.
    pub fn embeddings(&self, texts: &[String]) -> Result<Tensor, ModelError> {
        let batch = self.text_batch(texts)?;
        let (n, len) = batch.ids.dims2().map_err(infer_err)?;
        let hidden = self
            .tower
            .forward_with_mask(&batch.ids, usize::MAX)
            .map_err(infer_err)?;
        let rows: Vec<u32> = batch
            .eos_positions
            .iter()
            .enumerate()
            .map(|(i, &p)| (i * len + p) as u32)
            .collect();
        let rows = Tensor::from_vec(rows, n, &self.device).map_err(infer_err)?;
        let dim = hidden.dim(D::Minus1).map_err(infer_err)?;
        hidden
            .reshape((n * len, dim))
            .and_then(|h| h.index_select(&rows, 0))
            .and_then(|pooled| self.projection.forward(&pooled))
            .map_err(infer_err)
    }
}
