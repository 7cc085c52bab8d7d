//! The PaliGemma backend: a generated answer per frame to a PaliGemma task prompt
//! (`caption en`, `answer en <question>`, `detect person ; car`, `ocr`), in the
//! google/paligemma-3b-mix-224 layout (a SigLIP image tower, a linear projector and a
//! Gemma-2B decoder).
//!
//! The towers are candle-transformers' `siglip::VisionModel` and `gemma::Model`; the glue
//! is ours, because candle's `paligemma::Model` differs from transformers'
//! `PaliGemmaForConditionalGeneration` (5.x) in two ways:
//! - image features: transformers puts the projector's output into the sequence as it is,
//!   next to text embeddings scaled by sqrt(hidden); candle L2-normalises them. Gemma here
//!   scales the whole sequence, so the image features are divided by sqrt(hidden) first.
//! - positions: transformers counts them from 1, candle from 0; the offset says 1.
//!
//! Attention follows transformers' prefix-LM mask: image and prompt tokens see each other
//! both ways, generated tokens see everything before them. The prefix pass runs without a
//! mask (full attention) and each later step is one token attending to the whole cache.
//!
//! # Decoding
//!
//! The input is `<image>` x 256 (one per patch), `<bos>`, the prompt, then `\n`, as
//! transformers' processor builds it. All frames of a call share the prompt, so they have
//! one length and decode as one batch without padding: one prefix pass, then one token per
//! step for every frame with the KV cache, greedily, until each frame has produced a stop
//! token (`eos_token_id` of `generation_config.json`, else of `config.json`, else `<eos>`)
//! or `MAX_NEW_TOKENS` tokens.
//!
//! # Output
//!
//! Per frame `{"text": ...}`: the generated tokens decoded without special tokens (the
//! prompt is not repeated). For `detect a ; b` prompts also `detections`
//! (`[{"label","box":[x1,y1,x2,y2]}]` in frame pixels, in the order generated), `detected`
//! (their distinct labels) and `frame_size`, parsed by [`super::paligemma_detect`].
//! PaliGemma gives no score per box, so detections have none.

pub mod detect;

use crate::model::families::paligemma::detect::{PaliTask, detected_labels, parse_detections};
use crate::model::kind::ModelType;
use crate::model::loading::config::check_patches;
use crate::model::loading::{
    DtypeChoice, ModelFiles, ModelSettings, TensorSpec, Weights, device_name, parse_config,
    read_config,
};
use crate::model::preprocess::Preprocessor;
use crate::model::preprocess::SIGLIP_MEAN_STD;
use crate::model::testing::synthetic::{ModelSize, SyntheticModel};
use crate::model::text::tokenizer::{self, GEMMA_BOS, GEMMA_EOS, PALIGEMMA_IMAGE};
use crate::model::text::tokenizer::{GEMMA_PAD, GEMMA_UNK};
use crate::model::towers::scoring::round2;
use crate::model::towers::specs::{linear_specs, siglip_vision_specs};
use crate::model::{Frame, ModelError, ModelInfo, VisionLanguageModel};
use crate::prompt::PromptRef;
use candle_core::{D, Device, Module, Tensor};
use candle_nn::{Activation, Linear};
use candle_transformers::models::{gemma, siglip};
use serde::Deserialize;
use serde_json::{Value, json};
use std::path::Path;
use std::sync::Arc;
use tokenizers::Tokenizer;

/// transformers' `PaliGemmaModel` counts positions from 1.
const FIRST_POSITION: usize = 1;

/// The PaliGemma architecture read from `config.json` (transformers' `PaliGemmaConfig`;
/// missing keys take transformers' defaults).
#[derive(Clone, Debug)]
pub struct PaliGemmaSpec {
    pub vision: siglip::VisionConfig,
    pub text: gemma::Config,
    pub projection_dim: usize,
    /// Ids that end a generated text, from the config.
    pub eos_token_ids: Vec<u32>,
}

/// transformers' `PaliGemmaConfig` as `config.json` holds it; absent keys take transformers'
/// defaults.
#[derive(Deserialize)]
#[serde(default)]
struct PaliGemmaConfigFile {
    vision_config: VisionSection,
    text_config: TextSection,
    projection_dim: usize,
    eos_token_id: Option<TokenIds>,
}

impl Default for PaliGemmaConfigFile {
    fn default() -> Self {
        Self {
            vision_config: VisionSection::default(),
            text_config: TextSection::default(),
            projection_dim: 2048,
            eos_token_id: None,
        }
    }
}

/// `eos_token_id` as transformers writes it: one id or a list.
#[derive(Deserialize)]
#[serde(untagged)]
enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

/// The ids of an `eos_token_id`, none when it is absent.
fn token_ids(ids: Option<TokenIds>) -> Vec<u32> {
    match ids {
        Some(TokenIds::One(id)) => vec![id],
        Some(TokenIds::Many(ids)) => ids,
        None => Vec::new(),
    }
}

/// The image tower's settings (SigLIP's, with PaliGemma's defaults).
#[derive(Deserialize)]
#[serde(default)]
struct VisionSection {
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_channels: usize,
    image_size: usize,
    patch_size: usize,
    hidden_act: Activation,
    layer_norm_eps: f64,
}

impl Default for VisionSection {
    fn default() -> Self {
        Self {
            hidden_size: 1152,
            intermediate_size: 4096,
            num_hidden_layers: 27,
            num_attention_heads: 16,
            num_channels: 3,
            image_size: 224,
            patch_size: 14,
            hidden_act: Activation::GeluPytorchTanh,
            layer_norm_eps: 1e-6,
        }
    }
}

impl From<VisionSection> for siglip::VisionConfig {
    fn from(v: VisionSection) -> Self {
        Self {
            hidden_size: v.hidden_size,
            intermediate_size: v.intermediate_size,
            num_hidden_layers: v.num_hidden_layers,
            num_attention_heads: v.num_attention_heads,
            num_channels: v.num_channels,
            image_size: v.image_size,
            patch_size: v.patch_size,
            hidden_act: v.hidden_act,
            layer_norm_eps: v.layer_norm_eps,
        }
    }
}

/// The Gemma decoder's settings.
#[derive(Deserialize)]
#[serde(default)]
struct TextSection {
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: usize,
    head_dim: usize,
    rms_norm_eps: f64,
    rope_theta: f64,
    /// transformers 5 nests `rope_theta` here.
    rope_parameters: Option<RopeParameters>,
    attention_bias: bool,
    max_position_embeddings: usize,
    vocab_size: usize,
    /// Gemma configs name the activation `hidden_activation` or `hidden_act`.
    hidden_activation: Option<Activation>,
    hidden_act: Option<Activation>,
    eos_token_id: Option<TokenIds>,
}

#[derive(Deserialize)]
struct RopeParameters {
    rope_theta: Option<f64>,
}

impl Default for TextSection {
    fn default() -> Self {
        Self {
            hidden_size: 2048,
            intermediate_size: 16384,
            num_hidden_layers: 18,
            num_attention_heads: 8,
            num_key_value_heads: 1,
            head_dim: 256,
            rms_norm_eps: 1e-6,
            rope_theta: 10000.0,
            rope_parameters: None,
            attention_bias: false,
            max_position_embeddings: 8192,
            vocab_size: 257152,
            hidden_activation: None,
            hidden_act: None,
            eos_token_id: None,
        }
    }
}

impl TextSection {
    /// Candle's Gemma settings. Candle refuses an activation named both ways, so it gets one.
    fn gemma(&self) -> gemma::Config {
        let rope_theta = self.rope_parameters.as_ref().and_then(|p| p.rope_theta);
        gemma::Config {
            attention_bias: self.attention_bias,
            head_dim: self.head_dim,
            hidden_act: Some(
                self.hidden_activation
                    .or(self.hidden_act)
                    .unwrap_or(Activation::GeluPytorchTanh),
            ),
            hidden_activation: None,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_attention_heads: self.num_attention_heads,
            num_hidden_layers: self.num_hidden_layers,
            num_key_value_heads: self.num_key_value_heads,
            rms_norm_eps: self.rms_norm_eps,
            rope_theta: rope_theta.unwrap_or(self.rope_theta),
            vocab_size: self.vocab_size,
            max_position_embeddings: self.max_position_embeddings,
        }
    }
}

impl PaliGemmaSpec {
    pub fn from_config(config: &Value) -> Result<Self, ModelError> {
        let file: PaliGemmaConfigFile = parse_config(config, "PaliGemma")?;
        let text = file.text_config.gemma();
        let vision: siglip::VisionConfig = file.vision_config.into();
        let projection_dim = file.projection_dim;
        check_patches(vision.image_size, vision.patch_size)?;
        if !vision
            .hidden_size
            .is_multiple_of(vision.num_attention_heads)
            || text.num_key_value_heads == 0
            || !text
                .num_attention_heads
                .is_multiple_of(text.num_key_value_heads)
        {
            return Err(ModelError::Load(
                "config.json: attention heads do not divide the sizes".into(),
            ));
        }
        if projection_dim != text.hidden_size {
            return Err(ModelError::Load(
                format!(
                    "config.json: projection_dim {projection_dim} differs from the text \
                     hidden_size {}",
                    text.hidden_size
                )
                .into(),
            ));
        }
        let mut eos_token_ids = token_ids(file.eos_token_id);
        if eos_token_ids.is_empty() {
            eos_token_ids = token_ids(file.text_config.eos_token_id);
        }
        Ok(Self {
            vision,
            text,
            projection_dim,
            eos_token_ids,
        })
    }

    /// The image tokens in the input: one per patch.
    pub fn image_tokens(&self) -> usize {
        self.vision.num_patches()
    }

    /// Every tensor the hub checkpoint stores, with its shape (the output projection is
    /// tied to the token embeddings and not stored).
    pub fn tensor_specs(&self) -> Vec<TensorSpec> {
        let (v, t) = (&self.vision, &self.text);
        let d = v.hidden_size;
        let mut specs = Vec::new();
        siglip_vision_specs(&mut specs, "vision_tower.vision_model", v);
        linear_specs(
            &mut specs,
            "multi_modal_projector.linear",
            self.projection_dim,
            d,
        );
        let (h, q, kv) = (
            t.hidden_size,
            t.num_attention_heads * t.head_dim,
            t.num_key_value_heads * t.head_dim,
        );
        let lp = "language_model.model";
        specs.push(TensorSpec::new(
            format!("{lp}.embed_tokens.weight"),
            &[t.vocab_size, h],
        ));
        for i in 0..t.num_hidden_layers {
            let p = format!("{lp}.layers.{i}");
            for (name, shape) in [
                ("self_attn.q_proj", [q, h]),
                ("self_attn.k_proj", [kv, h]),
                ("self_attn.v_proj", [kv, h]),
                ("self_attn.o_proj", [h, q]),
                ("mlp.gate_proj", [t.intermediate_size, h]),
                ("mlp.up_proj", [t.intermediate_size, h]),
                ("mlp.down_proj", [h, t.intermediate_size]),
            ] {
                specs.push(TensorSpec::new(format!("{p}.{name}.weight"), &shape));
            }
            for norm in ["input_layernorm", "post_attention_layernorm"] {
                specs.push(TensorSpec::new(format!("{p}.{norm}.weight"), &[h]));
            }
        }
        specs.push(TensorSpec::new(format!("{lp}.norm.weight"), &[h]));
        specs
    }
}

/// What the stop ids are read from in `generation_config.json`.
#[derive(Deserialize)]
struct GenerationConfig {
    eos_token_id: Option<TokenIds>,
}

/// The stop ids: `generation_config.json` next to `config.json` when it names them, else
/// the config's, else the tokenizer's `<eos>`.
fn stop_ids(config_path: &Path, spec: &PaliGemmaSpec, eos: u32) -> Vec<u32> {
    let generation = config_path.with_file_name("generation_config.json");
    let from_generation = std::fs::read_to_string(&generation)
        .ok()
        .and_then(|text| serde_json::from_str::<GenerationConfig>(&text).ok())
        .map(|g| token_ids(g.eos_token_id))
        .unwrap_or_default();
    [from_generation, spec.eos_token_ids.clone(), vec![eos]]
        .into_iter()
        .find(|ids| !ids.is_empty())
        .unwrap_or_default()
}

/// A prompt made ready once while it repeats.
struct PreparedPrompt {
    /// `<bos>`, the prompt's tokens, `\n`: what follows the image tokens.
    text_ids: Vec<u32>,
    task: PaliTask,
}

/// PaliGemma behind [`VisionLanguageModel`].
pub struct PaliGemmaModel {
    info: ModelInfo,
    vision: siglip::VisionModel,
    projector: Linear,
    language: gemma::Model,
    tokenizer: Tokenizer,
    spec: PaliGemmaSpec,
    bos_id: u32,
    image_id: u32,
    stop_ids: Vec<u32>,
    preprocessor: Preprocessor,
    device: Device,
    max_new_tokens: usize,
    prompt_cache: Option<(Arc<str>, Arc<PreparedPrompt>)>,
}

impl PaliGemmaModel {
    /// Loads PaliGemma from its files, after checking every tensor is present.
    pub fn load(
        files: &ModelFiles,
        device: Device,
        settings: &ModelSettings,
    ) -> Result<Self, ModelError> {
        if settings.dtype == DtypeChoice::Bf16 {
            return Err(ModelError::Load(
                "DTYPE=bf16: the paligemma backend runs in f32 only; use DTYPE=auto or f32".into(),
            ));
        }
        let spec = PaliGemmaSpec::from_config(&read_config(&files.config)?)?;
        let tokenizer = tokenizer::load(&files.tokenizer)?;
        let bos_id = tokenizer::required_id(&tokenizer, GEMMA_BOS)?;
        let eos_id = tokenizer::required_id(&tokenizer, GEMMA_EOS)?;
        let image_id = tokenizer::required_id(&tokenizer, PALIGEMMA_IMAGE)?;
        let stop_ids = stop_ids(&files.config, &spec, eos_id);
        let vocab = spec.text.vocab_size;
        if let Some(id) = [bos_id, image_id]
            .iter()
            .chain(&stop_ids)
            .find(|&&id| id as usize >= vocab)
        {
            return Err(ModelError::Load(
                format!("token id {id} is outside the model's vocabulary of {vocab}").into(),
            ));
        }
        let weights = Weights::open(&files.weights)?;
        weights.check(&spec.tensor_specs(), &[])?;
        let vb = weights.var_builder(&device);
        let build = || -> candle_core::Result<_> {
            Ok((
                siglip::VisionModel::new(&spec.vision, false, vb.pp("vision_tower.vision_model"))?,
                candle_nn::linear(
                    spec.vision.hidden_size,
                    spec.projection_dim,
                    vb.pp("multi_modal_projector.linear"),
                )?,
                gemma::Model::new(false, &spec.text, vb.pp("language_model"))?,
            ))
        };
        let (vision, projector, language) =
            build().map_err(|e| ModelError::load("building PaliGemma", e))?;
        let side = spec.vision.image_size;
        Ok(Self {
            info: ModelInfo {
                name: files.name.clone(),
                task: ModelType::PaliGemma.task().into(),
                input_size: side as u32,
                device: device_name(&device),
                dtype: "f32".into(),
            },
            vision,
            projector,
            language,
            tokenizer,
            spec,
            bos_id,
            image_id,
            stop_ids,
            preprocessor: Preprocessor::siglip(side),
            device,
            max_new_tokens: settings.max_new_tokens,
            prompt_cache: None,
        })
    }

    /// The preprocessing this model applies.
    pub fn preprocessor(&self) -> &Preprocessor {
        &self.preprocessor
    }

    /// The ids that end a generated text.
    pub fn stop_ids(&self) -> &[u32] {
        &self.stop_ids
    }

    /// What follows the image tokens for `prompt`: `<bos>`, the prompt's tokens, `\n`.
    pub fn text_ids(&self, prompt: &str) -> Result<Vec<u32>, ModelError> {
        let mut ids = vec![self.bos_id];
        ids.extend(tokenizer::encode_ids(
            &self.tokenizer,
            &format!("{prompt}\n"),
            false,
        )?);
        let total = self.spec.image_tokens() + FIRST_POSITION + ids.len() + self.max_new_tokens;
        let limit = self.spec.text.max_position_embeddings;
        if total > limit {
            return Err(ModelError::Prompt(
                format!(
                    "the prompt is {} tokens; with the image and {} new tokens it passes the \
                     model's {limit} positions",
                    ids.len(),
                    self.max_new_tokens
                )
                .into(),
            ));
        }
        Ok(ids)
    }

    /// The whole input as transformers' processor builds it: `<image>` per patch, then
    /// [`Self::text_ids`]. (The model itself puts the image features where the `<image>`
    /// ids stand, so it only needs the text ids.)
    pub fn input_ids(&self, prompt: &str) -> Result<Vec<u32>, ModelError> {
        let mut ids = vec![self.image_id; self.spec.image_tokens()];
        ids.extend(self.text_ids(prompt)?);
        Ok(ids)
    }

    fn prepared(&mut self, prompt: &PromptRef) -> Result<Arc<PreparedPrompt>, ModelError> {
        if let Some((text, prepared)) = &self.prompt_cache
            && *text == prompt.text
        {
            return Ok(prepared.clone());
        }
        let prepared = Arc::new(PreparedPrompt {
            text_ids: self.text_ids(&prompt.text)?,
            task: PaliTask::of_prompt(&prompt.text),
        });
        self.prompt_cache = Some((prompt.text.clone(), prepared.clone()));
        Ok(prepared)
    }

    /// Runs the prefix (image tokens and `text_ids`) for every image of `pixels` and returns
    /// the logits `(batch, vocab)` for the first generated token. Starts a fresh KV cache.
    pub fn prefix_logits(
        &mut self,
        pixels: &Tensor,
        text_ids: &[u32],
    ) -> Result<Tensor, ModelError> {
        let batch = pixels.dim(0)?;
        let mut forward = || -> candle_core::Result<Tensor> {
            self.language.clear_kv_cache();
            let hidden = self.spec.text.hidden_size as f64;
            // Gemma scales the whole sequence by sqrt(hidden); the image features enter
            // transformers' sequence unscaled.
            let image = self
                .vision
                .forward(pixels)?
                .apply(&self.projector)?
                .affine(1.0 / hidden.sqrt(), 0.0)?;
            let ids = Tensor::new(text_ids, &self.device)?
                .unsqueeze(0)?
                .repeat((batch, 1))?;
            let text = self.language.embed_tokens().forward(&ids)?;
            let sequence = Tensor::cat(&[image, text], 1)?;
            self.language
                .forward_embeds(&sequence, None, FIRST_POSITION)?
                .squeeze(1)
        };
        Ok(forward()?)
    }

    /// Greedy decoding for every image of `pixels`, as one batch: per image the generated
    /// ids, ending with the stop id when one came before `max_new_tokens`.
    pub fn generate_ids(
        &mut self,
        pixels: &Tensor,
        text_ids: &[u32],
    ) -> Result<Vec<Vec<u32>>, ModelError> {
        let batch = pixels.dim(0)?;
        let mut out: Vec<Vec<u32>> = vec![Vec::new(); batch];
        let mut done = vec![false; batch];
        if self.max_new_tokens == 0 {
            return Ok(out);
        }
        let mut logits = self.prefix_logits(pixels, text_ids)?;
        // The position of the token generated at step 0, fed back at step 1.
        let first_generated = FIRST_POSITION + self.spec.image_tokens() + text_ids.len();
        for step in 0..self.max_new_tokens {
            let next: Vec<u32> = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
            for (i, &id) in next.iter().enumerate() {
                if !done[i] {
                    out[i].push(id);
                    done[i] = self.stop_ids.contains(&id);
                }
            }
            if done.iter().all(|&d| d) || step + 1 == self.max_new_tokens {
                break;
            }
            // Finished frames keep stepping with the others; their tokens are not kept.
            let input = Tensor::new(next.as_slice(), &self.device)?.unsqueeze(1)?;
            logits = self
                .language
                .forward(&input, first_generated + step)?
                .squeeze(1)?;
        }
        self.language.clear_kv_cache();
        Ok(out)
    }

    /// The text of generated ids: without the stop id and special tokens.
    pub fn decode(&self, generated: &[u32]) -> Result<String, ModelError> {
        let ids = match generated.split_last() {
            Some((last, rest)) if self.stop_ids.contains(last) => rest,
            _ => generated,
        };
        tokenizer::decode(&self.tokenizer, ids)
    }
}

impl VisionLanguageModel for PaliGemmaModel {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn infer(&mut self, frames: &[&Frame], prompt: &PromptRef) -> Result<Vec<Value>, ModelError> {
        if frames.is_empty() {
            return Ok(Vec::new());
        }
        let prepared = self.prepared(prompt)?;
        let pixels = self.preprocessor.batch(frames, &self.device)?;
        let generated = self.generate_ids(&pixels, &prepared.text_ids)?;
        frames
            .iter()
            .zip(&generated)
            .map(|(frame, ids)| {
                let text = self.decode(ids)?;
                Ok(match &prepared.task {
                    PaliTask::Text => json!({ "text": text }),
                    PaliTask::Detect { .. } => {
                        let boxes =
                            parse_detections(&text, frame.source_width, frame.source_height);
                        let detections: Vec<Value> = boxes
                            .iter()
                            .map(|b| json!({"label": b.label, "box": b.corners.map(round2)}))
                            .collect();
                        json!({
                            "text": text,
                            "detections": detections,
                            "detected": detected_labels(&boxes),
                            "frame_size": [frame.source_width, frame.source_height],
                        })
                    }
                })
            })
            .collect()
    }
}

/// This family's synthetic checkpoint at `size` (`free-roam model make`), in the layout
/// transformers 5 writes.
pub fn synthetic(size: ModelSize) -> Result<SyntheticModel, ModelError> {
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
    Ok(SyntheticModel {
        config,
        tokenizer: tok,
        tokenizer_config: tok_config,
        preprocessor,
        specs: spec.tensor_specs(),
        extra_files: vec![("generation_config.json", generation)],
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
        ModelSize::Full | ModelSize::Scale(_) => (1152, 4304, 27, 16),
    };
    let (vocab, t_hidden, t_inter, t_layers, t_heads, head_dim) = match size {
        ModelSize::Tiny => (tiny_vocab, 32, 64, 2, 4, 8),
        ModelSize::Full | ModelSize::Scale(_) => (257216, 2048, 16384, 18, 8, 256),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::registry::load_model;
    use crate::model::testing::util::{frames, prompt, tiny_model};

    fn tiny(max_new_tokens: usize) -> PaliGemmaModel {
        let files = ModelFiles::from_dir(tiny_model(ModelType::PaliGemma)).unwrap();
        let settings = ModelSettings {
            max_new_tokens,
            ..ModelSettings::default()
        };
        PaliGemmaModel::load(&files, Device::Cpu, &settings).unwrap()
    }

    #[test]
    fn a_batch_decodes_like_frames_one_by_one() {
        let settings = ModelSettings {
            model_type: ModelType::PaliGemma,
            model_path: Some(tiny_model(ModelType::PaliGemma).to_path_buf()),
            max_new_tokens: 6,
            ..ModelSettings::default()
        };
        let mut model = load_model(&settings).unwrap();
        assert_eq!(model.info().task, "generation");
        let frames = frames();
        let refs: Vec<&Frame> = frames.iter().take(3).collect();
        let question = prompt("answer en is anyone wearing a helmet?");
        let together = model.infer(&refs, &question).unwrap();
        assert_eq!(together.len(), 3);
        for (f, out) in refs.iter().zip(&together) {
            let alone = model.infer(&[f], &question).unwrap();
            assert_eq!(&alone[0], out);
            assert!(out["text"].is_string(), "{out}");
            assert!(out.get("detections").is_none());
        }
    }

    #[test]
    fn detect_prompts_get_the_detection_shape() {
        let mut model = tiny(4);
        let frames = frames();
        let out = model
            .infer(&[&frames[0]], &prompt("detect person ; car"))
            .unwrap();
        let o = &out[0];
        assert!(o["text"].is_string());
        assert!(o["detections"].is_array(), "{o}");
        assert!(o["detected"].is_array(), "{o}");
        assert_eq!(o["frame_size"], json!([frames[0].width, frames[0].height]));
    }

    #[test]
    fn generation_stops_at_the_stop_id_and_the_limit() {
        let mut model = tiny(5);
        let frames = frames();
        let refs: Vec<&Frame> = frames.iter().collect();
        let pixels = model.preprocessor().batch(&refs, &Device::Cpu).unwrap();
        let ids = model.text_ids("caption en").unwrap();
        for seq in model.generate_ids(&pixels, &ids).unwrap() {
            assert!(!seq.is_empty() && seq.len() <= 5, "{seq:?}");
            let stops = seq.iter().filter(|i| model.stop_ids().contains(i)).count();
            assert!(stops == 0 || (stops == 1 && model.stop_ids().contains(seq.last().unwrap())));
        }
        // The prompt is `<bos>`, its tokens and the newline.
        assert_eq!(ids[0], model.bos_id);
        let newline = model.tokenizer.token_to_id("\n").unwrap();
        assert_eq!(*ids.last().unwrap(), newline);
    }

    #[test]
    fn too_long_prompts_and_bf16_are_refused() {
        let model = tiny(20);
        let long = "person ".repeat(9000);
        assert!(matches!(model.text_ids(&long), Err(ModelError::Prompt(_))));
        let files = ModelFiles::from_dir(tiny_model(ModelType::PaliGemma)).unwrap();
        let settings = ModelSettings {
            dtype: DtypeChoice::Bf16,
            ..ModelSettings::default()
        };
        let err = PaliGemmaModel::load(&files, Device::Cpu, &settings)
            .err()
            .unwrap();
        assert!(err.to_string().contains("f32 only"), "{err}");
    }

    #[test]
    fn the_activation_rope_and_stop_ids_are_read_from_either_place() {
        let spec = PaliGemmaSpec::from_config(&json!({
            "text_config": {
                "hidden_activation": "gelu", "hidden_act": "gelu_pytorch_tanh",
                "rope_parameters": {"rope_theta": 5000.0}, "eos_token_id": [1, 107]
            }
        }))
        .unwrap();
        assert_eq!(spec.text.hidden_act, Some(Activation::Gelu));
        assert_eq!(spec.text.hidden_activation, None);
        assert_eq!(spec.text.rope_theta, 5000.0);
        assert_eq!(spec.eos_token_ids, [1, 107]);
        let spec = PaliGemmaSpec::from_config(&json!({
            "eos_token_id": 1, "text_config": {"eos_token_id": [1, 107], "rope_theta": 20.0}
        }))
        .unwrap();
        assert_eq!(spec.text.hidden_act, Some(Activation::GeluPytorchTanh));
        assert_eq!(spec.text.rope_theta, 20.0);
        assert_eq!(spec.eos_token_ids, [1]);
        let err = PaliGemmaSpec::from_config(&json!({"projection_dim": 1024}))
            .err()
            .unwrap();
        assert!(
            err.to_string()
                .contains("projection_dim 1024 differs from the text hidden_size 2048"),
            "{err}"
        );
    }

    #[test]
    fn full_size_config_has_the_reference_parameter_count() {
        let spec = PaliGemmaSpec::from_config(&json!({
            "vision_config": {"intermediate_size": 4304},
            "text_config": {"vocab_size": 257216}
        }))
        .unwrap();
        let params: usize = spec
            .tensor_specs()
            .iter()
            .map(|s| s.shape.iter().product::<usize>())
            .sum();
        // transformers' PaliGemmaForConditionalGeneration for google/paligemma-3b-mix-224
        // (num_parameters() counts the tied output projection once).
        assert_eq!(params, 2_923_466_480);
    }
}
