//! The OWL-ViT backend: open-vocabulary detection with boxes, in the
//! google/owlvit-base-patch32 layout (transformers' `OwlViTForObjectDetection`).
//!
//! OWL-ViT is CLIP with every image token kept: the image tower and the text tower are the
//! project's CLIP towers ([`VisionTower`], [`ClipTextEncoder`]); on top of them sit a class
//! head and a box head that read every patch token (24 x 24 = 576 at 768 x 768).
//!
//! # From prompt to queries
//!
//! The prompt's phrases, by `clip`'s rule ([`prompt_phrases`]), are the text queries, put
//! to the text tower through `clip`'s template ([`PHRASE_TEMPLATE`]). Their embeddings are
//! kept per prompt text.
//!
//! # Output
//!
//! Per frame:
//! `{"detections":[{"label","score","box":[x1,y1,x2,y2]}...],"phrases":[{"phrase","max_score","count"}...],"detected":[...],"frame_size":[w,h]}`
//!
//! - Each patch token proposes one box and scores it against every query; as in
//!   transformers' `post_process_object_detection`, the box gets the query with the
//!   highest logit as its `label` and the sigmoid of that logit as its `score`, and it is
//!   kept when the score is over the detect threshold (0.1 by default).
//! - `box` is in pixels of the source's picture (`frame_size`, its width and height): the
//!   model sees the frame squashed to 768 x 768, and its boxes (relative to that square)
//!   are scaled by the source's width and height. Corners are not clipped to the frame, as
//!   in the reference. A source larger than `MAX_FRAME_SIDE` is scaled down at ingest, but
//!   the frame keeps its source's size ([`Frame::source_width`]), so boxes are still in the
//!   source's pixels.
//! - Detections are sorted by score, highest first.
//! - `phrases` has one entry per phrase: the best score any box gave it (kept or not) and
//!   the number of kept boxes labelled with it. `detected` lists the phrases with at least
//!   one kept box.
//! - With `NMS_IOU` set, kept boxes of one label that overlap a better one by more
//!   than that IoU are dropped (per-label non-maximum suppression). It is off by default,
//!   so that the output matches the reference, which has none for text queries.
//!
//! [`prompt_phrases`]: crate::model::text::phrases::prompt_phrases
//! [`PHRASE_TEMPLATE`]: crate::model::text::phrases::PHRASE_TEMPLATE

use crate::model::kind::ModelType;
use crate::model::loading::{
    ModelFiles, ModelSettings, TensorSpec, Weights, device_name, read_config, resolve_precision,
};
use crate::model::preprocess::Preprocessor;
use crate::model::preprocess::{CLIP_MEAN, CLIP_STD};
use crate::model::testing::synthetic::{ModelSize, SyntheticModel};
use crate::model::text::prompt_cache::PromptCache;
use crate::model::text::tokenizer;
use crate::model::text::tokenizer::{CLIP_BOS, CLIP_EOS};
use crate::model::towers::clip_text::{ClipDefaults, ClipSpec, ClipTextEncoder};
use crate::model::towers::scoring::{
    PhraseScore, l2_normalise, phrase_output, round2, round6, sigmoid, templated_phrases,
};
use crate::model::towers::specs::{layer_norm_specs, linear_specs};
use crate::model::towers::vit::{PreNormName, VisionTower};
use crate::model::{Frame, ModelError, ModelInfo, VisionLanguageModel};
use crate::prompt::PromptRef;
use candle_core::{D, DType, Device, Module, Tensor};
use candle_nn::{LayerNorm, Linear, VarBuilder};
use serde_json::{Value, json};
use std::sync::Arc;

/// transformers' OWL-ViT layer-norm epsilon (the CLIP backend refuses configs that change
/// it, and OWL-ViT's config is read by the same code).
const LAYER_NORM_EPS: f64 = 1e-5;
/// The class head's guard against dividing by a zero norm, as in the reference.
const NORM_EPS: f64 = 1e-6;

/// Where OWL-ViT's defaults differ from CLIP's: 768 x 768 images, 16 text positions.
const OWLVIT_DEFAULTS: ClipDefaults = ClipDefaults {
    image_size: 768,
    max_position_embeddings: 16,
};

/// The OWL-ViT architecture read from `config.json`: CLIP's, with OWL-ViT's defaults.
#[derive(Clone, Debug)]
pub struct OwlVitSpec {
    pub clip: ClipSpec,
}

impl OwlVitSpec {
    /// Reads a transformers `OwlViTConfig`. Missing keys take OWL-ViT's defaults where they
    /// differ from CLIP's ([`OWLVIT_DEFAULTS`]).
    pub fn from_config(config: &Value) -> Result<Self, ModelError> {
        let clip = ClipSpec::with_defaults(config, OWLVIT_DEFAULTS)?;
        if clip.projection_dim != clip.text.embed_dim {
            return Err(ModelError::Load(
                format!(
                    "config.json: projection_dim {} differs from the text hidden size {}; \
                     OWL-ViT's class head needs them equal",
                    clip.projection_dim, clip.text.embed_dim
                )
                .into(),
            ));
        }
        Ok(Self { clip })
    }

    /// Every tensor transformers' `OwlViTForObjectDetection` stores, with its shape.
    pub fn tensor_specs(&self) -> Vec<TensorSpec> {
        let mut specs: Vec<TensorSpec> = self
            .clip
            .tensor_specs()
            .into_iter()
            .map(|s| {
                let name = format!("owlvit.{}", s.name)
                    .replace(PreNormName::Clip.as_str(), PreNormName::OwlVit.as_str());
                TensorSpec::new(name, &s.shape)
            })
            .collect();
        let (v, t) = (self.clip.vision.embed_dim, self.clip.text.embed_dim);
        linear_specs(&mut specs, "class_head.dense0", t, v);
        linear_specs(&mut specs, "class_head.logit_shift", 1, v);
        linear_specs(&mut specs, "class_head.logit_scale", 1, v);
        linear_specs(&mut specs, "box_head.dense0", v, v);
        linear_specs(&mut specs, "box_head.dense1", v, v);
        linear_specs(&mut specs, "box_head.dense2", 4, v);
        layer_norm_specs(&mut specs, "layer_norm", v);
        specs
    }
}

/// The box bias of a `grid` x `grid` token map, `(grid * grid, 4)`: each token's box starts
/// centred on its own cell's far corner with the size of one cell, in logit space
/// (`compute_box_bias` in the reference, computed in f32 as there).
pub fn box_bias(grid: usize) -> Vec<[f32; 4]> {
    let logit = |c: f32| (c + 1e-4).ln() - (-c + 1e-4).ln_1p();
    let size = logit(1.0 / grid as f32);
    let mut out = Vec::with_capacity(grid * grid);
    for row in 0..grid {
        for col in 0..grid {
            let x = ((col + 1) as f32 / grid as f32).clamp(0.0, 1.0);
            let y = ((row + 1) as f32 / grid as f32).clamp(0.0, 1.0);
            out.push([logit(x), logit(y), size, size]);
        }
    }
    out
}

/// What the heads compute for a batch, before post-processing.
pub struct HeadOutput {
    /// `(batch, tokens, queries)`: the class logits.
    pub logits: Tensor,
    /// `(batch, tokens, 4)`: boxes as (cx, cy, w, h) relative to the model's input square.
    pub boxes: Tensor,
}

/// One kept box of one frame.
#[derive(Clone, Debug, PartialEq)]
pub struct Detection {
    /// Index into the prompt's phrases.
    pub label: usize,
    pub score: f32,
    /// `[x1, y1, x2, y2]` in frame pixels.
    pub corners: [f32; 4],
}

/// Post-processing of one frame as the reference's `post_process_object_detection`: per
/// token the best query and its sigmoid score, kept over `threshold`, the box turned into
/// corners and scaled by the frame's `width` and `height`. Returns the kept boxes sorted by
/// score (highest first) and, per query, the best score any token gave it.
pub fn post_process(
    logits: &[Vec<f32>],
    boxes: &[Vec<f32>],
    width: u32,
    height: u32,
    threshold: f32,
    queries: usize,
) -> (Vec<Detection>, Vec<f32>) {
    let mut best_per_query = vec![0f32; queries];
    let mut kept = Vec::new();
    let (w, h) = (width as f32, height as f32);
    for (token_logits, b) in logits.iter().zip(boxes) {
        // torch.max returns the first index of the maximum.
        let (label, logit) =
            token_logits
                .iter()
                .enumerate()
                .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &v)| {
                    if v > bv { (i, v) } else { (bi, bv) }
                });
        let score = sigmoid(logit);
        for (best, &l) in best_per_query.iter_mut().zip(token_logits) {
            *best = best.max(sigmoid(l));
        }
        if score > threshold {
            let (cx, cy, bw, bh) = (b[0], b[1], b[2], b[3]);
            kept.push(Detection {
                label,
                score,
                corners: [
                    (cx - 0.5 * bw) * w,
                    (cy - 0.5 * bh) * h,
                    (cx + 0.5 * bw) * w,
                    (cy + 0.5 * bh) * h,
                ],
            });
        }
    }
    kept.sort_by(|a, b| b.score.total_cmp(&a.score));
    (kept, best_per_query)
}

fn iou(a: &[f32; 4], b: &[f32; 4]) -> f32 {
    let area = |r: &[f32; 4]| (r[2] - r[0]).max(0.0) * (r[3] - r[1]).max(0.0);
    let iw = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let ih = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = iw * ih;
    let union = area(a) + area(b) - inter;
    if union > 0.0 { inter / union } else { 0.0 }
}

/// Per-label non-maximum suppression of score-sorted detections: drops a box that overlaps
/// a better box of the same label by more than `max_iou`.
pub fn suppress_overlaps(detections: Vec<Detection>, max_iou: f32) -> Vec<Detection> {
    let mut kept: Vec<Detection> = Vec::with_capacity(detections.len());
    for d in detections {
        if !kept
            .iter()
            .any(|k| k.label == d.label && iou(&k.corners, &d.corners) > max_iou)
        {
            kept.push(d);
        }
    }
    kept
}

/// Query embeddings of one prompt, kept while the prompt repeats.
struct Queries {
    phrases: Vec<String>,
    /// `(text hidden, queries)`: normalised as the class head does, transposed for the
    /// per-batch product.
    embeds_t: Tensor,
}

/// OWL-ViT detection behind [`VisionLanguageModel`].
pub struct OwlVitModel {
    info: ModelInfo,
    text: ClipTextEncoder,
    vision: VisionTower,
    /// The layer norm after merging each patch token with the class token.
    merge_norm: LayerNorm,
    class_dense: Linear,
    logit_shift: Linear,
    logit_scale: Linear,
    box_dense: [Linear; 3],
    /// `(tokens, 4)`.
    box_bias: Tensor,
    preprocessor: Preprocessor,
    device: Device,
    detect_threshold: f32,
    nms_iou: Option<f32>,
    cache: PromptCache<Queries>,
}

fn linear(vb: VarBuilder, inp: usize, out: usize) -> candle_core::Result<Linear> {
    candle_nn::linear(inp, out, vb)
}

impl OwlVitModel {
    /// Loads OWL-ViT from its files, after checking every tensor is present.
    pub fn load(
        files: &ModelFiles,
        device: Device,
        settings: &ModelSettings,
    ) -> Result<Self, ModelError> {
        let spec = OwlVitSpec::from_config(&read_config(&files.config)?)?;
        let tokenizer = tokenizer::load(&files.tokenizer)?;
        let weights = Weights::open(&files.weights)?;
        weights.check(&spec.tensor_specs(), &[])?;
        let vb = weights.var_builder(&device);
        let clip = &spec.clip;
        let text = ClipTextEncoder::new(clip, tokenizer, vb.pp("owlvit"), &device)?;
        let (v, t) = (clip.vision.embed_dim, clip.text.embed_dim);
        let grid = clip.vision.image_size / clip.vision.patch_size;
        let (precision, why) = resolve_precision(settings.dtype, &device)?;
        tracing::info!(dtype = %precision, "OWL-ViT image tower: {why}");
        let build = || -> candle_core::Result<_> {
            let vision = VisionTower::new(
                vb.pp("owlvit").pp("vision_model"),
                &clip.vision,
                PreNormName::OwlVit,
                precision,
            )?;
            let class = vb.pp("class_head");
            let boxes = vb.pp("box_head");
            let bias: Vec<f32> = box_bias(grid).into_iter().flatten().collect();
            Ok(Self {
                info: ModelInfo {
                    name: files.name.clone(),
                    task: ModelType::OwlVit.task().into(),
                    input_size: clip.vision.image_size as u32,
                    device: device_name(&device),
                    dtype: precision.to_string(),
                },
                text,
                vision,
                merge_norm: candle_nn::layer_norm(v, LAYER_NORM_EPS, vb.pp("layer_norm"))?,
                class_dense: linear(class.pp("dense0"), v, t)?,
                logit_shift: linear(class.pp("logit_shift"), v, 1)?,
                logit_scale: linear(class.pp("logit_scale"), v, 1)?,
                box_dense: [
                    linear(boxes.pp("dense0"), v, v)?,
                    linear(boxes.pp("dense1"), v, v)?,
                    linear(boxes.pp("dense2"), v, 4)?,
                ],
                box_bias: Tensor::from_vec(bias, (grid * grid, 4), &device)?,
                preprocessor: Preprocessor::owlvit(clip.vision.image_size),
                device: device.clone(),
                detect_threshold: settings.detect_threshold(),
                nms_iou: settings.nms_iou,
                cache: PromptCache::default(),
            })
        };
        build().map_err(|e| ModelError::load("building OWL-ViT", e))
    }

    /// Token ids of a query (see [`ClipTextEncoder::token_ids`]).
    pub fn token_ids(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        self.text.token_ids(text)
    }

    /// Query embeddings as the reference's `text_embeds`: projected and L2-normalised,
    /// `(texts, text hidden)`.
    pub fn query_embeddings(&self, texts: &[String]) -> Result<Tensor, ModelError> {
        l2_normalise(&self.text.embeddings(texts)?)
    }

    /// The preprocessing this model applies.
    pub fn preprocessor(&self) -> &Preprocessor {
        &self.preprocessor
    }

    /// The heads on every patch token of preprocessed `pixels`, against `queries_t`
    /// (`(text hidden, queries)`, from [`Self::normalised_queries_t`]).
    pub fn heads(&self, pixels: &Tensor, queries_t: &Tensor) -> Result<HeadOutput, ModelError> {
        let run = || -> candle_core::Result<HeadOutput> {
            let tokens = self.vision.forward_tokens(pixels)?;
            let n = tokens.dim(1)? - 1;
            let class = tokens.narrow(1, 0, 1)?;
            let feats = self
                .merge_norm
                .forward(&tokens.narrow(1, 1, n)?.broadcast_mul(&class)?)?;

            let mut b = self.box_dense[0].forward(&feats)?.gelu_erf()?;
            b = self.box_dense[1].forward(&b)?.gelu_erf()?;
            let boxes = candle_nn::ops::sigmoid(
                &self.box_dense[2]
                    .forward(&b)?
                    .broadcast_add(&self.box_bias)?,
            )?;

            let ic = self.class_dense.forward(&feats)?;
            let norm = (ic.sqr()?.sum_keepdim(D::Minus1)?.sqrt()? + NORM_EPS)?;
            let ic = ic.broadcast_div(&norm)?;
            let logits = ic.broadcast_matmul(queries_t)?;
            let shift = self.logit_shift.forward(&feats)?;
            let scale = (self.logit_scale.forward(&feats)?.elu(1.0)? + 1.0)?;
            let logits = logits.broadcast_add(&shift)?.broadcast_mul(&scale)?;
            Ok(HeadOutput { logits, boxes })
        };
        Ok(run()?)
    }

    /// Query embeddings normalised as the class head does (the reference divides the
    /// already unit-length `text_embeds` by their norm plus 1e-6), transposed.
    pub fn normalised_queries_t(&self, texts: &[String]) -> Result<Tensor, ModelError> {
        let q = self.query_embeddings(texts)?;
        let norm = (q.sqr()?.sum_keepdim(D::Minus1)?.sqrt()? + NORM_EPS)?;
        Ok(q.broadcast_div(&norm)?.t()?.contiguous()?)
    }

    fn queries(&mut self, prompt: &PromptRef) -> Result<Arc<Queries>, ModelError> {
        let mut cache = std::mem::take(&mut self.cache);
        let entry = cache.get_or_try_insert(&prompt.text, || {
            let (phrases, texts) = templated_phrases(&prompt.text)?;
            let embeds_t = self.normalised_queries_t(&texts)?;
            Ok(Queries { phrases, embeds_t })
        });
        self.cache = cache;
        entry
    }
}

impl VisionLanguageModel for OwlVitModel {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn prompt_rule(&self) -> crate::model::PromptRule {
        crate::model::PromptRule::Phrases
    }

    fn infer(&mut self, frames: &[&Frame], prompt: &PromptRef) -> Result<Vec<Value>, ModelError> {
        if frames.is_empty() {
            return Ok(Vec::new());
        }
        let queries = self.queries(prompt)?;
        let pixels = self.preprocessor.batch(frames, &self.device)?;
        let out = self.heads(&pixels, &queries.embeds_t)?;
        let logits = out.logits.to_dtype(DType::F32)?.to_vec3::<f32>()?;
        let boxes = out.boxes.to_dtype(DType::F32)?.to_vec3::<f32>()?;
        Ok(frames
            .iter()
            .zip(logits.iter().zip(&boxes))
            .map(|(frame, (l, b))| self.frame_output(frame, l, b, &queries.phrases))
            .collect())
    }
}

impl OwlVitModel {
    /// One frame's output (see the module docs) from its tokens' `logits` and `boxes`.
    fn frame_output(
        &self,
        frame: &Frame,
        logits: &[Vec<f32>],
        boxes: &[Vec<f32>],
        phrases: &[String],
    ) -> Value {
        let (w, h) = (frame.source_width, frame.source_height);
        let (mut kept, best) =
            post_process(logits, boxes, w, h, self.detect_threshold, phrases.len());
        if let Some(max_iou) = self.nms_iou {
            kept = suppress_overlaps(kept, max_iou);
        }
        let mut counts = vec![0usize; phrases.len()];
        for d in &kept {
            counts[d.label] += 1;
        }
        let detections: Vec<Value> = kept
            .iter()
            .map(|d| {
                json!({"label": phrases[d.label], "score": round6(d.score),
                       "box": d.corners.map(round2)})
            })
            .collect();
        let mut output = serde_json::Map::from_iter([("detections".into(), json!(detections))]);
        output.extend(phrase_output(phrases, |i| PhraseScore {
            numbers: json!({"max_score": round6(best[i]), "count": counts[i]}),
            detected: counts[i] > 0,
        }));
        output.insert("frame_size".into(), json!([w, h]));
        Value::Object(output)
    }
}

/// This family's synthetic checkpoint at `size` (`free-roam model make`), in the layout
/// transformers 5 writes.
pub fn synthetic(size: ModelSize) -> Result<SyntheticModel, ModelError> {
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
    Ok(SyntheticModel {
        config,
        tokenizer: tok,
        tokenizer_config: tok_config,
        preprocessor,
        specs: spec.tensor_specs(),
        extra_files: Vec::new(),
    })
}

/// A transformers 5 `OwlViTConfig`, as `save_pretrained` writes it. OWL-ViT's class head
/// needs `projection_dim` equal to the text hidden size, so the tiny one projects to 32.
fn owlvit_config(size: ModelSize, tiny_vocab: usize) -> Value {
    let (bos, eos) = (tiny_vocab - 2, tiny_vocab - 1);
    let (vocab, t_hidden, t_inter, t_layers, t_heads, v_hidden, v_inter, v_layers, v_heads) =
        match size {
            ModelSize::Tiny => (tiny_vocab, 32, 64, 2, 4, 32, 64, 2, 4),
            ModelSize::Full | ModelSize::Scale(_) => (49408, 512, 2048, 12, 8, 768, 3072, 12, 12),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::registry::load_model;
    use crate::model::testing::util::{frame, frames, max_abs_difference, prompt, tiny_model};

    fn settings(threshold: Option<f32>) -> ModelSettings {
        ModelSettings {
            model_type: ModelType::OwlVit,
            model_path: Some(tiny_model(ModelType::OwlVit).to_path_buf()),
            detect_threshold: threshold,
            ..ModelSettings::default()
        }
    }

    #[test]
    fn boxes_are_in_frame_pixels_sorted_and_summarised() {
        let mut model = load_model(&settings(Some(0.3))).unwrap();
        assert_eq!(model.info().task, "detection");
        assert_eq!(model.info().input_size, 768);
        let frames = frames();
        let refs: Vec<&Frame> = frames.iter().collect();
        let out = model
            .infer(&refs, &prompt("Detect all people and vehicles"))
            .unwrap();
        assert_eq!(out.len(), frames.len());
        let mut any = 0;
        for (o, f) in out.iter().zip(&frames) {
            let dets = o["detections"].as_array().unwrap();
            any += dets.len();
            let scores: Vec<f64> = dets.iter().map(|d| d["score"].as_f64().unwrap()).collect();
            assert!(scores.windows(2).all(|w| w[0] >= w[1]), "{scores:?}");
            assert!(scores.iter().all(|s| *s > 0.3));
            for d in dets {
                let b: Vec<f64> = d["box"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_f64().unwrap())
                    .collect();
                assert!(b[0] < b[2] && b[1] < b[3], "{b:?}");
                // Centres lie inside the frame (corners may not, as in the reference).
                let (cx, cy) = ((b[0] + b[2]) / 2.0, (b[1] + b[3]) / 2.0);
                assert!(cx >= 0.0 && cx <= f.width as f64 && cy >= 0.0 && cy <= f.height as f64);
            }
            let phrases = o["phrases"].as_array().unwrap();
            assert_eq!(phrases[0]["phrase"], "people");
            assert_eq!(phrases[1]["phrase"], "vehicles");
            let mut detected = Vec::new();
            for p in phrases {
                let count = p["count"].as_u64().unwrap() as usize;
                let label = p["phrase"].as_str().unwrap();
                assert_eq!(count, dets.iter().filter(|d| d["label"] == label).count());
                if count > 0 {
                    detected.push(label);
                    assert!(p["max_score"].as_f64().unwrap() > 0.3);
                }
            }
            assert_eq!(o["detected"], json!(detected));
            assert_eq!(o["frame_size"], json!([f.width, f.height]));
        }
        assert!(any > 0, "the tiny model should keep some boxes at 0.3");
        assert_ne!(out[0]["phrases"], out[1]["phrases"]);
    }

    #[test]
    fn boxes_of_a_scaled_frame_are_in_its_source_pixels() {
        let mut model = load_model(&settings(Some(0.3))).unwrap();
        let f = frame("checker", 120, 90);
        // The same pixels, as if ingest had scaled a 480 x 270 source down to them.
        let scaled = f.clone().with_source_size(480, 270);
        let out = model
            .infer(&[&f, &scaled], &prompt("people, cars"))
            .unwrap();
        assert_eq!(out[1]["frame_size"], json!([480, 270]));
        let own = out[0]["detections"].as_array().unwrap();
        let source = out[1]["detections"].as_array().unwrap();
        assert!(
            !own.is_empty(),
            "the tiny model should keep some boxes at 0.3"
        );
        assert_eq!(own.len(), source.len());
        for (a, b) in own.iter().zip(source) {
            assert_eq!(a["label"], b["label"]);
            assert_eq!(a["score"], b["score"]);
            let (a, b) = (a["box"].as_array().unwrap(), b["box"].as_array().unwrap());
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                let ratio = if i % 2 == 0 { 4.0 } else { 3.0 };
                let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
                // Both are rounded to 0.01 px: the scaled one by 0.01, the other by 0.01 x ratio.
                assert!(
                    (x * ratio - y).abs() <= 0.005 * ratio + 0.005,
                    "{x} x {ratio} vs {y}"
                );
            }
        }
    }

    #[test]
    fn a_high_threshold_keeps_nothing() {
        let mut model = load_model(&settings(Some(1.0))).unwrap();
        let f = frame("checker", 120, 90);
        let out = model.infer(&[&f], &prompt("people, cars")).unwrap();
        assert_eq!(out[0]["detections"], json!([]));
        assert_eq!(out[0]["detected"], json!([]));
        assert!(out[0]["phrases"][0]["max_score"].as_f64().unwrap() > 0.0);
    }

    #[test]
    fn the_box_bias_matches_the_reference_formula() {
        let bias = box_bias(24);
        assert_eq!(bias.len(), 576);
        // Token (row 0, col 0): its cell's far corner is (1/24, 1/24).
        let c = 1.0f32 / 24.0;
        let l = (c + 1e-4).ln() - (1e-4 - c).ln_1p();
        assert!((bias[0][0] - l).abs() < 1e-6 && (bias[0][1] - l).abs() < 1e-6);
        // Row-major: token 1 is one column to the right, same row.
        assert!(bias[1][0] > bias[0][0] && bias[1][1] == bias[0][1]);
        // The last cell's corner is (1, 1): a large positive logit.
        assert!(bias[575][0] > 9.0);
    }

    #[test]
    fn post_processing_scales_to_the_frame_and_keeps_over_threshold() {
        let logits = vec![vec![2.0, -1.0], vec![-3.0, -2.5], vec![0.5, 1.5]];
        let boxes = vec![
            vec![0.5, 0.5, 0.2, 0.4],
            vec![0.1, 0.1, 0.1, 0.1],
            vec![0.25, 0.75, 0.5, 0.5],
        ];
        let (kept, best) = post_process(&logits, &boxes, 640, 480, 0.5, 2);
        assert_eq!(kept.len(), 2);
        assert_eq!(kept[0].label, 0);
        assert!((kept[0].score - sigmoid(2.0)).abs() < 1e-6);
        assert_eq!(kept[0].corners, [256.0, 144.0, 384.0, 336.0]);
        assert_eq!(kept[1].label, 1);
        assert_eq!(kept[1].corners, [0.0, 240.0, 320.0, 480.0]);
        assert!((best[0] - sigmoid(2.0)).abs() < 1e-6);
        assert!((best[1] - sigmoid(1.5)).abs() < 1e-6);
    }

    #[test]
    fn suppression_is_per_label() {
        let d = |label, score, x: f32| Detection {
            label,
            score,
            corners: [x, 0.0, x + 10.0, 10.0],
        };
        let kept = suppress_overlaps(
            vec![
                d(0, 0.9, 0.0),
                d(1, 0.8, 1.0),
                d(0, 0.7, 1.0),
                d(0, 0.6, 50.0),
            ],
            0.5,
        );
        let labels: Vec<(usize, f32)> = kept.iter().map(|k| (k.label, k.score)).collect();
        assert_eq!(labels, [(0, 0.9), (1, 0.8), (0, 0.6)]);
    }

    #[test]
    fn query_embeddings_are_cached_per_prompt() {
        let files = ModelFiles::from_dir(tiny_model(ModelType::OwlVit)).unwrap();
        let mut model = OwlVitModel::load(&files, Device::Cpu, &ModelSettings::default()).unwrap();
        let f = frame("rings", 64, 48);
        model.infer(&[&f], &prompt("person, car")).unwrap();
        model.infer(&[&f], &prompt("person, car")).unwrap();
        assert_eq!(model.cache.len(), 1);
        model.infer(&[&f], &prompt("dog")).unwrap();
        assert_eq!(model.cache.len(), 2);
    }

    #[test]
    fn full_size_config_has_the_reference_shapes() {
        let spec = OwlVitSpec::from_config(&json!({})).unwrap();
        let params: usize = spec
            .tensor_specs()
            .iter()
            .map(|s| s.shape.iter().product::<usize>())
            .sum();
        // transformers' OwlViTForObjectDetection in google/owlvit-base-patch32's
        // configuration.
        assert_eq!(params, 153_231_879);
    }

    /// In bf16 (the tower's products, attention's included where the own product runs),
    /// boxes stay within half a per cent of the input side of their f32 values, and logits
    /// within a per cent of the largest.
    #[test]
    fn bf16_boxes_and_logits_stay_close_to_f32() {
        use crate::model::DtypeChoice;
        use crate::model::loading::ModelFiles;
        if crate::model::kernels::fused_linear::bf16_product().is_none() {
            eprintln!("skipped: no bf16 product in this build on this CPU");
            return;
        }
        let files = ModelFiles::from_dir(tiny_model(ModelType::OwlVit)).unwrap();
        let frames = frames();
        let refs: Vec<&Frame> = frames.iter().collect();
        let run = |dtype| {
            let settings = ModelSettings {
                dtype,
                ..settings(None)
            };
            let model = OwlVitModel::load(&files, Device::Cpu, &settings).unwrap();
            let pixels = model.preprocessor().batch(&refs, &Device::Cpu).unwrap();
            let queries = model
                .normalised_queries_t(&["a cat".to_string(), "a red car".to_string()])
                .unwrap();
            (
                model.info().dtype.clone(),
                model.heads(&pixels, &queries).unwrap(),
            )
        };
        let (f32_name, f32_out) = run(DtypeChoice::F32);
        let (bf16_name, bf16_out) = run(DtypeChoice::Bf16);
        assert_eq!((f32_name.as_str(), bf16_name.as_str()), ("f32", "bf16"));
        let largest = |t: &Tensor| {
            t.abs()
                .and_then(|a| a.flatten_all())
                .and_then(|a| a.max(0))
                .and_then(|a| a.to_scalar::<f32>())
                .unwrap() as f64
        };
        let boxes = max_abs_difference(&f32_out.boxes, &bf16_out.boxes);
        let logits =
            max_abs_difference(&f32_out.logits, &bf16_out.logits) / largest(&f32_out.logits);
        eprintln!("bf16 against f32: boxes off by {boxes}, logits by {logits} of the largest");
        // Boxes are fractions of the model's input side: 5e-3 is 4 pixels of 768 (the
        // tiny random model gave 2.3e-3 with attention in bf16).
        assert!(boxes > 0.0 && boxes < 5e-3, "boxes {boxes}");
        assert!(logits < 1e-2, "logits {logits}");
    }
}
