//! The CLIP backend: zero-shot scoring of each frame against phrases taken from the prompt,
//! with candle-transformers' CLIP text tower and our own image tower (`clip_vision`), in the
//! openai/clip-vit-base-patch32 layout.
//!
//! # From prompt to phrases
//!
//! [`prompt_phrases`] turns the prompt into candidate phrases:
//! 1. split on `,` `;` `:` `|` and line breaks, and on the standalone words `and`, `or`, `&`;
//! 2. in each piece, lower-case it, collapse white space and trim surrounding punctuation;
//! 3. drop leading instruction words ([`FILLER_WORDS`]: verbs such as "detect", "find",
//!    "look", quantifiers and articles such as "all", "any", "the", "a"); a piece made only
//!    of them ("Detect:") is dropped;
//! 4. drop empty pieces and repeats, keeping the first order.
//!
//! "Detect all people and vehicles" gives `people`, `vehicles`; "person, car, dog" gives
//! three phrases. Each phrase is scored through the template [`PHRASE_TEMPLATE`]
//! ("a photo of {phrase}.").
//!
//! # Output
//!
//! Per frame:
//! `{"phrases":[{"phrase","probability","presence","similarity"}...],"detected":[...]}`.
//!
//! - `similarity`: the cosine similarity of the image and phrase embeddings.
//! - `probability`: the softmax over the prompt's phrases of the similarities times CLIP's
//!   logit scale. It is relative: the probabilities of one frame add up to 1, so a lone
//!   phrase always gets 1 and an empty scene still gives some phrase the most.
//! - `presence`: the phrase against [`NEUTRAL_TEXTS`], captions that fit any photo. It is
//!   `sigmoid(logit_scale * (similarity - best neutral similarity))`, the softmax of the
//!   phrase against the closest neutral caption alone; it does not depend on the other
//!   phrases, and it is under 0.5 when some neutral caption fits the frame better than the
//!   phrase does.
//! - `detected`: the phrases whose presence is over the detect threshold (0.5 by default:
//!   the phrase fits better than every neutral caption). A frame can list nothing.
//!
//! CLIP says whether a phrase fits the frame, not where: use `owlvit` for boxes.

use super::clip_vision::{PreNormName, VisionTower};
use super::load::{
    ModelFiles, ModelSettings, ModelType, TensorSpec, Weights, device_name, read_config,
    resolve_precision,
};
use super::preprocess::Preprocessor;
use super::tokenizer::{self, CLIP_EOS};
use super::{Frame, ModelError, ModelInfo, PromptRef, VisionLanguageModel};
use candle_core::{D, DType, Device, Module, Tensor};
use candle_nn::{Linear, VarBuilder};
use candle_transformers::models::clip::text_model::{
    Activation, ClipTextConfig, ClipTextTransformer,
};
use candle_transformers::models::clip::vision_model::ClipVisionConfig;
use serde_json::{Value, json};
use std::collections::VecDeque;
use std::sync::Arc;
use tokenizers::Tokenizer;

/// How each phrase is put to the text tower.
pub const PHRASE_TEMPLATE: &str = "a photo of {phrase}.";
/// Captions that fit any photo, against which each phrase's presence is scored (see the
/// module docs). Their embeddings are computed once, at load.
pub const NEUTRAL_TEXTS: &[&str] = &[
    "a photo.",
    "a photo of something.",
    "a photo of a scene.",
    "a photo of an object.",
    "a photo of a place.",
];
/// Words dropped from the front of a phrase (see the module docs).
pub const FILLER_WORDS: &[&str] = &[
    "detect",
    "detecting",
    "find",
    "finding",
    "identify",
    "locate",
    "spot",
    "show",
    "count",
    "search",
    "look",
    "track",
    "highlight",
    "recognize",
    "recognise",
    "see",
    "check",
    "list",
    "label",
    "classify",
    "please",
    "me",
    "for",
    "out",
    "all",
    "any",
    "every",
    "each",
    "the",
    "a",
    "an",
    "some",
    "there",
    "is",
    "are",
];
/// The most phrases one prompt may produce (each is a text-tower pass when the prompt
/// changes, and a column of every frame's output).
pub const MAX_PHRASES: usize = 64;
/// How many prompts' text embeddings are kept.
pub const PROMPT_CACHE: usize = 16;

/// Per-prompt work (text embeddings) kept while prompts repeat: the last [`PROMPT_CACHE`]
/// prompt texts, oldest dropped first.
pub struct PromptCache<T> {
    entries: VecDeque<(Arc<str>, Arc<T>)>,
}

impl<T> Default for PromptCache<T> {
    fn default() -> Self {
        Self {
            entries: VecDeque::new(),
        }
    }
}

impl<T> PromptCache<T> {
    /// The entry for `text`, made by `make` when it is not kept.
    pub fn get_or_try_insert(
        &mut self,
        text: &Arc<str>,
        make: impl FnOnce() -> Result<T, ModelError>,
    ) -> Result<Arc<T>, ModelError> {
        if let Some((_, hit)) = self.entries.iter().find(|(k, _)| k == text) {
            return Ok(hit.clone());
        }
        let entry = Arc::new(make()?);
        if self.entries.len() >= PROMPT_CACHE {
            self.entries.pop_front();
        }
        self.entries.push_back((text.clone(), entry.clone()));
        Ok(entry)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// The phrases of a prompt by [`prompt_phrases`], or a prompt error when there are none or
/// too many.
pub fn checked_phrases(prompt: &str) -> Result<Vec<String>, ModelError> {
    let phrases = prompt_phrases(prompt);
    if phrases.is_empty() {
        return Err(ModelError::Prompt(
            "the prompt names nothing to look for; give phrases such as \"person, car, dog\""
                .into(),
        ));
    }
    if phrases.len() > MAX_PHRASES {
        return Err(ModelError::Prompt(format!(
            "the prompt gives {} phrases; at most {MAX_PHRASES} are scored",
            phrases.len()
        )));
    }
    Ok(phrases)
}

/// Splits a prompt into candidate phrases by the rule in the module docs.
pub fn prompt_phrases(prompt: &str) -> Vec<String> {
    let mut phrases: Vec<String> = Vec::new();
    let lower = prompt.to_lowercase();
    for piece in lower.split([',', ';', ':', '|', '\n', '\r']) {
        let mut current: Vec<&str> = Vec::new();
        let mut pieces: Vec<Vec<&str>> = Vec::new();
        for word in piece.split_whitespace() {
            if matches!(word, "and" | "or" | "&") {
                pieces.push(std::mem::take(&mut current));
            } else {
                current.push(word);
            }
        }
        pieces.push(current);
        for words in pieces {
            let joined = words.join(" ");
            let trimmed = joined.trim_matches(|c: char| {
                c.is_whitespace()
                    || matches!(c, '.' | '!' | '?' | '"' | '\'' | '(' | ')' | '[' | ']')
            });
            let words: Vec<&str> = trimmed.split_whitespace().collect();
            // Skipped by index: removing them one by one from the front was quadratic in
            // the number of leading filler words.
            let first = words
                .iter()
                .position(|w| !FILLER_WORDS.contains(w))
                .unwrap_or(words.len());
            let phrase = words[first..].join(" ");
            if !phrase.is_empty() && !phrases.contains(&phrase) {
                phrases.push(phrase);
            }
        }
    }
    phrases
}

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

pub(super) fn layer_norm_specs(specs: &mut Vec<TensorSpec>, prefix: &str, dim: usize) {
    specs.push(TensorSpec::new(format!("{prefix}.weight"), &[dim]));
    specs.push(TensorSpec::new(format!("{prefix}.bias"), &[dim]));
}

pub(super) fn linear_specs(specs: &mut Vec<TensorSpec>, prefix: &str, out: usize, inp: usize) {
    specs.push(TensorSpec::new(format!("{prefix}.weight"), &[out, inp]));
    specs.push(TensorSpec::new(format!("{prefix}.bias"), &[out]));
}

pub(super) fn encoder_specs(
    specs: &mut Vec<TensorSpec>,
    prefix: &str,
    layers: usize,
    d: usize,
    inter: usize,
) {
    for i in 0..layers {
        let p = format!("{prefix}.layers.{i}");
        for proj in ["k_proj", "v_proj", "q_proj", "out_proj"] {
            linear_specs(specs, &format!("{p}.self_attn.{proj}"), d, d);
        }
        layer_norm_specs(specs, &format!("{p}.layer_norm1"), d);
        linear_specs(specs, &format!("{p}.mlp.fc1"), inter, d);
        linear_specs(specs, &format!("{p}.mlp.fc2"), d, inter);
        layer_norm_specs(specs, &format!("{p}.layer_norm2"), d);
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

/// Text embeddings of one prompt, kept while the prompt repeats.
struct PromptEmbedding {
    phrases: Vec<String>,
    /// `(phrases + neutral texts, projection_dim)`, L2-normalised and transposed, so one
    /// product per batch scores the phrases and the neutral captions together.
    text_t: Tensor,
}

/// The presence of a phrase with cosine similarity `phrase` when the best neutral caption
/// has `best_neutral` (see the module docs).
pub fn presence(phrase: f32, best_neutral: f32, logit_scale: f32) -> f32 {
    1.0 / (1.0 + (-(logit_scale * (phrase - best_neutral))).exp())
}

/// CLIP zero-shot scoring behind [`VisionLanguageModel`].
pub struct ClipModel {
    info: ModelInfo,
    text: ClipTextEncoder,
    vision: VisionTower,
    visual_projection: Linear,
    logit_scale: f32,
    preprocessor: Preprocessor,
    device: Device,
    detect_threshold: f32,
    /// `(neutral texts, projection_dim)`, L2-normalised.
    neutral: Tensor,
    cache: PromptCache<PromptEmbedding>,
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

impl ClipModel {
    /// Loads CLIP from its files, after checking every tensor is present.
    pub fn load(
        files: &ModelFiles,
        device: Device,
        settings: &ModelSettings,
    ) -> Result<Self, ModelError> {
        let spec = ClipSpec::from_config(&read_config(&files.config)?)?;
        let tokenizer = tokenizer::load(&files.tokenizer)?;
        let weights = Weights::open(&files.weights)?;
        weights.check(&spec.tensor_specs(), &[])?;
        let vb = weights.var_builder(&device);
        let text = ClipTextEncoder::new(&spec, tokenizer, vb.clone(), &device)?;
        let (precision, why) = resolve_precision(settings.dtype, &device)?;
        tracing::info!(dtype = %precision, "CLIP image tower: {why}");
        let build = || -> candle_core::Result<_> {
            Ok((
                VisionTower::new(
                    vb.pp("vision_model"),
                    &spec.vision,
                    PreNormName::Clip,
                    precision,
                )?,
                candle_nn::linear_no_bias(
                    spec.vision.embed_dim,
                    spec.projection_dim,
                    vb.pp("visual_projection"),
                )?,
                vb.get((), "logit_scale")?.to_scalar::<f32>()?,
            ))
        };
        let (vision, visual_projection, logit_scale) =
            build().map_err(|e| ModelError::Load(format!("building CLIP: {e}")))?;
        let neutral: Vec<String> = NEUTRAL_TEXTS.iter().map(|t| t.to_string()).collect();
        let neutral = l2_normalise(&text.embeddings(&neutral)?)?;
        Ok(Self {
            info: ModelInfo {
                name: files.name.clone(),
                task: ModelType::Clip.task().into(),
                input_size: spec.vision.image_size as u32,
                device: device_name(&device),
                dtype: precision.to_string(),
            },
            text,
            vision,
            visual_projection,
            logit_scale,
            preprocessor: Preprocessor::clip(spec.vision.image_size),
            device,
            detect_threshold: settings.detect_threshold(),
            neutral,
            cache: PromptCache::default(),
        })
    }

    /// Token ids as the text tower reads them (see [`ClipTextEncoder::token_ids`]).
    pub fn token_ids(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        self.text.token_ids(text)
    }

    /// Projected (not normalised) text embeddings, `(texts, projection_dim)`.
    pub fn text_embeddings(&self, texts: &[String]) -> Result<Tensor, ModelError> {
        self.text.embeddings(texts)
    }

    /// Projected (not normalised) image embeddings of preprocessed pixels.
    pub fn image_embeddings_from_pixels(&self, pixels: &Tensor) -> Result<Tensor, ModelError> {
        self.vision
            .forward(pixels)
            .and_then(|x| self.visual_projection.forward(&x))
            .map_err(infer_err)
    }

    /// Projected (not normalised) image embeddings, one row per frame, in one batch.
    pub fn image_embeddings(&self, frames: &[&Frame]) -> Result<Tensor, ModelError> {
        let pixels = self.preprocessor.batch(frames, &self.device)?;
        self.image_embeddings_from_pixels(&pixels)
    }

    /// The preprocessing this model applies.
    pub fn preprocessor(&self) -> &Preprocessor {
        &self.preprocessor
    }

    /// `exp(logit_scale)`, the factor from cosine similarity to logit.
    pub fn logit_scale(&self) -> f32 {
        self.logit_scale.exp()
    }

    /// Text embeddings of a prompt's phrases, from the cache when the prompt repeats.
    fn prompt_embedding(&mut self, prompt: &PromptRef) -> Result<Arc<PromptEmbedding>, ModelError> {
        let mut cache = std::mem::take(&mut self.cache);
        let entry = cache.get_or_try_insert(&prompt.text, || {
            let phrases = checked_phrases(&prompt.text)?;
            let texts: Vec<String> = phrases
                .iter()
                .map(|p| PHRASE_TEMPLATE.replace("{phrase}", p))
                .collect();
            let text = l2_normalise(&self.text_embeddings(&texts)?)?;
            let text_t = Tensor::cat(&[&text, &self.neutral], 0)
                .and_then(|t| t.t())
                .and_then(|t| t.contiguous())
                .map_err(infer_err)?;
            Ok(PromptEmbedding { phrases, text_t })
        });
        self.cache = cache;
        entry
    }
}

pub(super) fn infer_err(e: candle_core::Error) -> ModelError {
    ModelError::Inference(e.to_string())
}

pub(super) fn l2_normalise(x: &Tensor) -> Result<Tensor, ModelError> {
    x.sqr()
        .and_then(|s| s.sum_keepdim(D::Minus1))
        .and_then(|s| s.sqrt())
        .and_then(|n| x.broadcast_div(&n))
        .map_err(infer_err)
}

/// Rounds for the JSON output: six decimals is far below CLIP's own noise.
pub(super) fn round6(x: f32) -> f64 {
    (x as f64 * 1e6).round() / 1e6
}

impl VisionLanguageModel for ClipModel {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn prompt_rule(&self) -> super::PromptRule {
        super::PromptRule::Phrases
    }

    fn infer(&mut self, frames: &[&Frame], prompt: &PromptRef) -> Result<Vec<Value>, ModelError> {
        if frames.is_empty() {
            return Ok(Vec::new());
        }
        let prompt_embedding = self.prompt_embedding(prompt)?;
        let phrase_count = prompt_embedding.phrases.len();
        let image = l2_normalise(&self.image_embeddings(frames)?)?;
        let all = image.matmul(&prompt_embedding.text_t).map_err(infer_err)?;
        let similarity = all.narrow(1, 0, phrase_count).map_err(infer_err)?;
        let probability = (&similarity * self.logit_scale() as f64)
            .and_then(|logits| candle_nn::ops::softmax_last_dim(&logits))
            .and_then(|p| p.to_dtype(DType::F32))
            .and_then(|p| p.to_vec2::<f32>())
            .map_err(infer_err)?;
        let all = all
            .to_dtype(DType::F32)
            .and_then(|s| s.to_vec2::<f32>())
            .map_err(infer_err)?;
        let scale = self.logit_scale();
        Ok(all
            .iter()
            .zip(&probability)
            .map(|(row, probs)| {
                let (sims, neutral) = row.split_at(phrase_count);
                let best_neutral = neutral.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut detected: Vec<&String> = Vec::new();
                let phrases: Vec<Value> = prompt_embedding
                    .phrases
                    .iter()
                    .zip(sims.iter().zip(probs))
                    .map(|(phrase, (s, p))| {
                        let presence = presence(*s, best_neutral, scale);
                        if presence > self.detect_threshold {
                            detected.push(phrase);
                        }
                        json!({"phrase": phrase, "probability": round6(*p),
                               "presence": round6(presence), "similarity": round6(*s)})
                    })
                    .collect();
                json!({"phrases": phrases, "detected": detected})
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::load::{ModelType, load_model};
    use crate::model::make::{ModelSize, write_random_model};
    use crate::model::testutil::{frame, frames, prompt, scratch_dir, tiny_model};
    use std::time::Instant;

    fn tiny() -> ClipModel {
        let files = ModelFiles::from_dir(tiny_model(ModelType::Clip)).unwrap();
        ClipModel::load(&files, Device::Cpu, &ModelSettings::default()).unwrap()
    }

    fn probabilities(out: &Value) -> Vec<f64> {
        out["phrases"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["probability"].as_f64().unwrap())
            .collect()
    }

    #[test]
    fn scores_every_frame_against_every_phrase() {
        let dir = tiny_model(ModelType::Clip);
        let start = Instant::now();
        let settings = ModelSettings {
            model_path: Some(dir.to_path_buf()),
            detect_threshold: Some(0.3),
            ..ModelSettings::default()
        };
        let mut model = load_model(&settings).unwrap();
        let loaded = start.elapsed();
        assert_eq!(model.info().task, "zero-shot-scoring");
        assert_eq!(model.info().input_size, 224);
        assert_eq!(model.info().device, "cpu");
        let frames = frames();
        let refs: Vec<&Frame> = frames.iter().collect();
        let out = model
            .infer(&refs, &prompt("Detect all people, cars and dogs"))
            .unwrap();
        assert_eq!(out.len(), frames.len());
        for o in &out {
            let names: Vec<&str> = o["phrases"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p["phrase"].as_str().unwrap())
                .collect();
            assert_eq!(names, ["people", "cars", "dogs"]);
            let probs = probabilities(o);
            assert!((probs.iter().sum::<f64>() - 1.0).abs() < 1e-4, "{probs:?}");
            let detected: Vec<&str> = o["detected"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_str().unwrap())
                .collect();
            let expect: Vec<&str> = o["phrases"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|p| p["presence"].as_f64().unwrap() > 0.3)
                .map(|p| p["phrase"].as_str().unwrap())
                .collect();
            assert_eq!(detected, expect);
            for p in o["phrases"].as_array().unwrap() {
                assert!(p["similarity"].as_f64().unwrap().abs() <= 1.0);
                assert!((0.0..=1.0).contains(&p["presence"].as_f64().unwrap()));
            }
        }
        // Different images must score differently, or the image tower is not being read.
        assert_ne!(out[0]["phrases"], out[1]["phrases"]);
        eprintln!(
            "tiny clip load {loaded:?}, load + infer of 5 frames {:?}",
            start.elapsed()
        );
    }

    #[test]
    fn presence_is_the_phrase_against_the_best_neutral_caption() {
        assert!((presence(0.3, 0.3, 100.0) - 0.5).abs() < 1e-6);
        assert!(presence(0.25, 0.3, 100.0) < 0.01);
        assert!(presence(0.35, 0.3, 100.0) > 0.99);
    }

    /// A lone phrase gets probability 1 by construction, but its presence is its own: over
    /// several one-phrase prompts and frames, some are absent and some present, and
    /// `detected` follows presence alone.
    #[test]
    fn a_one_phrase_prompt_is_not_detected_on_every_frame() {
        let mut model = tiny();
        let frames = frames();
        let refs: Vec<&Frame> = frames.iter().collect();
        let (mut absent, mut present) = (0, 0);
        for phrase in ["people", "cars", "dogs", "a red boat", "trees"] {
            for o in model.infer(&refs, &prompt(phrase)).unwrap() {
                let p = &o["phrases"][0];
                assert_eq!(p["probability"].as_f64().unwrap(), 1.0);
                let detected = !o["detected"].as_array().unwrap().is_empty();
                assert_eq!(detected, p["presence"].as_f64().unwrap() > 0.5);
                if detected {
                    present += 1;
                } else {
                    absent += 1;
                }
            }
        }
        assert!(
            absent > 0 && present > 0,
            "absent {absent}, present {present}"
        );
    }

    #[test]
    fn a_batch_scores_like_single_frames() {
        let mut model = tiny();
        let frames = frames();
        let refs: Vec<&Frame> = frames.iter().collect();
        let p = prompt("person, car, dog");
        let batched = model.infer(&refs, &p).unwrap();
        for (f, b) in refs.iter().zip(&batched) {
            let single = model.infer(&[*f], &p).unwrap();
            for (x, y) in probabilities(&single[0]).iter().zip(probabilities(b)) {
                assert!((x - y).abs() < 1e-5, "{x} vs {y}");
            }
        }
    }

    #[test]
    fn text_embeddings_are_cached_per_prompt_and_bounded() {
        let mut model = tiny();
        let f = frame("gradient", 64, 48);
        model.infer(&[&f], &prompt("person, car")).unwrap();
        model.infer(&[&f], &prompt("person, car")).unwrap();
        assert_eq!(model.cache.len(), 1);
        model.infer(&[&f], &prompt("dog")).unwrap();
        assert_eq!(model.cache.len(), 2);
        for i in 0..PROMPT_CACHE + 5 {
            model.infer(&[&f], &prompt(&format!("thing {i}"))).unwrap();
        }
        assert_eq!(model.cache.len(), PROMPT_CACHE);
    }

    #[test]
    fn padding_does_not_change_a_phrase_embedding() {
        let model = tiny();
        let short = "a photo of people.".to_string();
        let long = "a photo of zebras jumping over many tall fences.".to_string();
        let alone = model.text_embeddings(std::slice::from_ref(&short)).unwrap();
        let padded = model.text_embeddings(&[short, long]).unwrap();
        let a = alone.get(0).unwrap().to_vec1::<f32>().unwrap();
        let b = padded.get(0).unwrap().to_vec1::<f32>().unwrap();
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 1e-5);
        }
    }

    #[test]
    fn a_prompt_without_phrases_is_a_prompt_error() {
        let mut model = tiny();
        let f = frame("gradient", 32, 32);
        let err = model.infer(&[&f], &prompt(" , detect all ")).unwrap_err();
        assert!(matches!(err, ModelError::Prompt(_)), "{err}");
        assert!(model.infer(&[], &prompt("person")).unwrap().is_empty());
    }

    #[test]
    fn a_missing_tensor_is_named() {
        let dir = scratch_dir("clip-missing");
        write_random_model(ModelType::Clip, ModelSize::Tiny, 1, &dir).unwrap();
        let path = dir.join("model.safetensors");
        let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
        tensors.remove("vision_model.embeddings.class_embedding");
        candle_core::safetensors::save(&tensors, &path).unwrap();
        let settings = ModelSettings {
            model_path: Some(dir.clone()),
            ..ModelSettings::default()
        };
        let err = load_model(&settings).err().unwrap().to_string();
        assert!(
            err.contains("lacks 1 tensor(s)")
                && err.contains("vision_model.embeddings.class_embedding"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_writer_is_deterministic() {
        let (a, b) = (scratch_dir("clip-det-a"), scratch_dir("clip-det-b"));
        write_random_model(ModelType::Clip, ModelSize::Tiny, 3, &a).unwrap();
        write_random_model(ModelType::Clip, ModelSize::Tiny, 3, &b).unwrap();
        for file in ["config.json", "tokenizer.json", "model.safetensors"] {
            assert_eq!(
                std::fs::read(a.join(file)).unwrap(),
                std::fs::read(b.join(file)).unwrap(),
                "{file}"
            );
        }
        write_random_model(ModelType::Clip, ModelSize::Tiny, 4, &b).unwrap();
        assert_ne!(
            std::fs::read(a.join("model.safetensors")).unwrap(),
            std::fs::read(b.join("model.safetensors")).unwrap()
        );
        std::fs::remove_dir_all(&a).unwrap();
        std::fs::remove_dir_all(&b).unwrap();
    }

    #[test]
    fn full_size_config_has_the_reference_shapes() {
        let spec = ClipSpec::from_config(&serde_json::json!({})).unwrap();
        let specs = spec.tensor_specs();
        let params: usize = specs
            .iter()
            .map(|s| s.shape.iter().product::<usize>())
            .sum();
        // openai/clip-vit-base-patch32 has 151,277,313 parameters.
        assert_eq!(params, 151_277_313);
    }

    #[test]
    fn phrases_drop_instructions_and_split_on_lists() {
        assert_eq!(
            prompt_phrases("Detect all people and vehicles"),
            ["people", "vehicles"]
        );
        assert_eq!(prompt_phrases("person, car, dog"), ["person", "car", "dog"]);
        assert_eq!(
            prompt_phrases("Find: a red car; the dogs & cats."),
            ["red car", "dogs", "cats"]
        );
        assert_eq!(
            prompt_phrases("look for any people or bicycles\nwatch"),
            ["people", "bicycles", "watch"]
        );
        assert_eq!(prompt_phrases("Person,  PERSON , person"), ["person"]);
        assert_eq!(
            prompt_phrases("fire in the kitchen"),
            ["fire in the kitchen"]
        );
        assert!(prompt_phrases(" , ; and ").is_empty());
    }

    /// The bf16 image tower stays within cosine 0.9999 of the f32 one on the parity frames.
    #[test]
    fn bf16_image_embeddings_stay_close_to_f32() {
        if crate::model::fused_linear::bf16_product().is_none() {
            eprintln!("skipped: no bf16 product in this build on this CPU");
            return;
        }
        use crate::model::DtypeChoice;
        let files = ModelFiles::from_dir(tiny_model(ModelType::Clip)).unwrap();
        let embed = |dtype| {
            let settings = ModelSettings {
                dtype,
                ..ModelSettings::default()
            };
            let model = ClipModel::load(&files, Device::Cpu, &settings).unwrap();
            let frames = frames();
            let refs: Vec<&Frame> = frames.iter().collect();
            let pixels = model.preprocessor().batch(&refs, &Device::Cpu).unwrap();
            (
                model.info().dtype.clone(),
                model.image_embeddings_from_pixels(&pixels).unwrap(),
            )
        };
        let (f32_name, f32_rows) = embed(DtypeChoice::F32);
        let (bf16_name, bf16_rows) = embed(DtypeChoice::Bf16);
        assert_eq!((f32_name.as_str(), bf16_name.as_str()), ("f32", "bf16"));
        let worst = crate::model::testutil::lowest_row_cosine(&f32_rows, &bf16_rows);
        eprintln!("bf16 against f32 image embeddings: lowest cosine {worst}");
        assert!(worst >= 0.9999, "cosine {worst}");
        assert_ne!(
            f32_rows.to_vec2::<f32>().unwrap(),
            bf16_rows.to_vec2::<f32>().unwrap()
        );
    }
}
