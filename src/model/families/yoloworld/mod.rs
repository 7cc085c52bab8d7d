//! The YOLO-World backend: open-vocabulary detection fast enough for live cameras, in the v2
//! architecture Ultralytics builds from `yolov8{n,s,m,l,x}-worldv2.yaml` (`WorldModel`), run
//! "prompt then detect".
//!
//! # From prompt to weights
//!
//! The prompt's phrases ([`checked_phrases`], as they are: YOLO-World reads class names, not
//! a sentence template) go through the CLIP text tower ([`ClipTextEncoder`]) once per prompt
//! text; their projected embeddings are L2-normalised, as the reference's text model gives
//! them. From them come the per-prompt weights ([`net::PromptWeights`]): each text-guided
//! neck layer's guide, and the head's class branch folded into one 1x1 convolution with a
//! row per phrase ([`head`]). They are kept per prompt text, so a frame costs one
//! convolutional network whatever the number of phrases. A prompt may name at most
//! [`MAX_PHRASES`] phrases (the rule of every phrase model), checked when a job is claimed.
//!
//! # Frames
//!
//! Frames are letterboxed as the reference's `predict` does ([`letterbox`]): a 720p frame
//! becomes 640 x 384. The head's boxes and scores go through the reference's
//! non-maximum suppression ([`nms`]): confidence over `DETECT_THRESHOLD` (0.25 by default),
//! per-phrase IoU bound `NMS_IOU` (0.7 by default), at most 300 boxes.
//!
//! # Output
//!
//! Per frame, the shape OWL-ViT gives:
//! `{"detections":[{"label","score","box":[x1,y1,x2,y2]}...],"phrases":[{"phrase","max_score","count"}...],"detected":[...],"frame_size":[w,h]}`
//! with boxes in the source's pixels, clipped to the frame, best first; `max_score` is the
//! best score any anchor gave the phrase, `count` its kept boxes, and `detected` the phrases
//! with a kept box.
//!
//! [`MAX_PHRASES`]: crate::model::text::phrases::MAX_PHRASES

pub mod blocks;
pub mod config;
pub mod head;
pub mod letterbox;
pub mod net;
pub mod nms;

use crate::model::kernels::conv;
use crate::model::kernels::cpu_kernels::{self, Bf16Unit};
use crate::model::kernels::fused_linear::MatmulPrecision;
use crate::model::kind::ModelType;
use crate::model::loading::{
    DtypeChoice, ModelFiles, ModelSettings, Weights, device_name, read_config, resolve_precision,
};
use crate::model::testing::synthetic::{ModelSize, Scale, SyntheticModel};
use crate::model::text::phrases::checked_phrases;
use crate::model::text::prompt_cache::PromptCache;
use crate::model::text::tokenizer::{self, CLIP_BOS, CLIP_EOS};
use crate::model::towers::clip_text::ClipTextEncoder;
use crate::model::towers::scoring::{PhraseScore, l2_normalise, phrase_output, round2, round6};
use crate::model::{Frame, ModelError, ModelInfo, PromptRule, VisionLanguageModel};
use crate::prompt::PromptRef;
use candle_core::{DType, Device, Tensor};
use config::{STRIDE, YoloWorldSpec};
use letterbox::Letterbox;
use net::{Detector, PromptWeights};
use serde_json::{Value, json};
use std::sync::Arc;

/// The reference's IoU bound of its non-maximum suppression, used when `NMS_IOU` is unset.
pub const DEFAULT_NMS_IOU: f32 = 0.7;

/// One prompt's phrases and the weights folded from them.
struct Prompted {
    phrases: Vec<String>,
    weights: PromptWeights,
}

/// YOLO-World detection behind [`VisionLanguageModel`].
pub struct YoloWorldModel {
    info: ModelInfo,
    spec: YoloWorldSpec,
    text: ClipTextEncoder,
    detector: Detector,
    device: Device,
    confidence: f32,
    max_iou: f32,
    cache: PromptCache<Prompted>,
}

impl YoloWorldModel {
    /// Loads YOLO-World from its files, after checking every tensor is present.
    pub fn load(
        files: &ModelFiles,
        device: Device,
        settings: &ModelSettings,
    ) -> Result<Self, ModelError> {
        // DTYPE picks the convolutions' products; everything else (text tower, attention,
        // decoding) stays f32.
        let (precision, why) = conv_precision(settings.dtype, &device)?;
        tracing::info!(dtype = %precision, "YOLO-World convolutions: {why}");
        let spec = YoloWorldSpec::from_config(&read_config(&files.config)?)?;
        let tokenizer = tokenizer::load(&files.tokenizer)?;
        let weights = Weights::open(&files.weights)?;
        weights.check(&spec.tensor_specs(), &[])?;
        let vb = weights.var_builder(&device);
        let text = ClipTextEncoder::new(&spec.clip, tokenizer, vb.clone(), &device)?;
        let detector = Detector::new(&vb, &spec, precision)
            .map_err(|e| ModelError::load("building YOLO-World", e))?;
        Ok(Self {
            info: ModelInfo {
                name: files.name.clone(),
                task: ModelType::YoloWorld.task().into(),
                input_size: spec.image_size as u32,
                device: device_name(&device),
                dtype: precision.to_string(),
            },
            spec,
            text,
            detector,
            device,
            confidence: settings.detect_threshold(),
            max_iou: settings.nms_iou.unwrap_or(DEFAULT_NMS_IOU),
            cache: PromptCache::default(),
        })
    }

    /// The prompt's text embeddings as the reference's text model gives them: projected and
    /// L2-normalised, `(phrases, embed)`.
    pub fn text_embeddings(&self, phrases: &[String]) -> Result<Tensor, ModelError> {
        l2_normalise(&self.text.embeddings(phrases)?)
    }

    /// The letterboxed batch `(batch, 3, h, w)` and each frame's letterbox.
    pub fn preprocess(&self, frames: &[&Frame]) -> Result<(Tensor, Vec<Letterbox>), ModelError> {
        letterbox::batch(frames, self.spec.image_size, STRIDE, &self.device)
    }

    /// The head's output `(batch, 4 + phrases, anchors)` for letterboxed `pixels` and text
    /// embeddings `text`: with the prompt folded in, or (`folded` false) as the reference
    /// computes it.
    pub fn head_output(
        &self,
        pixels: &Tensor,
        text: &Tensor,
        folded: bool,
    ) -> Result<Tensor, ModelError> {
        let out = if folded {
            let weights = self.detector.prompt_weights(text)?;
            self.detector.forward(pixels, &weights)?
        } else {
            self.detector.forward_unfolded(pixels, text)?
        };
        Ok(out.0)
    }

    fn prompted(&mut self, prompt: &PromptRef) -> Result<Arc<Prompted>, ModelError> {
        let mut cache = std::mem::take(&mut self.cache);
        let entry = cache.get_or_try_insert(&prompt.text, || {
            let phrases =
                checked_phrases(&prompt.text).map_err(|e| ModelError::Prompt(e.into()))?;
            let text = self.text_embeddings(&phrases)?;
            let weights = self.detector.prompt_weights(&text)?;
            Ok(Prompted { phrases, weights })
        });
        self.cache = cache;
        entry
    }

    /// One frame's output (see the module docs) from its head output `(4 + phrases,
    /// anchors)`, row-major.
    fn frame_output(
        &self,
        frame: &Frame,
        lb: &Letterbox,
        values: &[f32],
        phrases: &[String],
    ) -> Value {
        let anchors = values.len() / (4 + phrases.len());
        let (kept, best) = nms::suppress(
            values,
            anchors,
            phrases.len(),
            self.confidence,
            self.max_iou,
        );
        // Boxes go to the frame's pixels, then to the source's where ingest scaled it down.
        let sx = frame.source_width as f32 / frame.width as f32;
        let sy = frame.source_height as f32 / frame.height as f32;
        let mut counts = vec![0usize; phrases.len()];
        let detections: Vec<Value> = kept
            .iter()
            .map(|k| {
                counts[k.label] += 1;
                let b = lb.to_source(k.corners);
                let corners = [b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy];
                json!({"label": phrases[k.label], "score": round6(k.score),
                       "box": corners.map(round2)})
            })
            .collect();
        let mut output = serde_json::Map::from_iter([("detections".into(), json!(detections))]);
        output.extend(phrase_output(phrases, |i| PhraseScore {
            numbers: json!({"max_score": round6(best[i]), "count": counts[i]}),
            detected: counts[i] > 0,
        }));
        output.insert(
            "frame_size".into(),
            json!([frame.source_width, frame.source_height]),
        );
        Value::Object(output)
    }
}

impl VisionLanguageModel for YoloWorldModel {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn prompt_rule(&self) -> PromptRule {
        PromptRule::Phrases
    }

    fn infer(&mut self, frames: &[&Frame], prompt: &PromptRef) -> Result<Vec<Value>, ModelError> {
        if frames.is_empty() {
            return Ok(Vec::new());
        }
        let prompted = self.prompted(prompt)?;
        let (pixels, boxes) = self.preprocess(frames)?;
        let out = self.detector.forward(&pixels, &prompted.weights)?;
        let values = out
            .0
            .to_dtype(DType::F32)?
            .flatten_from(1)?
            .to_vec2::<f32>()?;
        Ok(frames
            .iter()
            .zip(boxes.iter().zip(&values))
            .map(|(frame, (lb, v))| self.frame_output(frame, lb, v, &prompted.phrases))
            .collect())
    }
}

/// The convolutions' precision for `DTYPE`: as for the other families, except that `auto`
/// picks bf16 only where bf16 convolutions were measured to pay: with AMX-BF16, and where
/// they run on the own AVX512-BF16 product (AMD's CPUs: YOLO-World s at 640x384 in 84 to
/// 115 against 144 to 237 ms a frame in f32 on a Zen 4 EPYC, BENCHMARKS.md). On an Intel CPU
/// with AVX512-BF16 alone they run on MKL's bf16 product, slower than in f32 (189 against
/// 127 ms a frame on a Xeon without AMX).
fn conv_precision(
    choice: DtypeChoice,
    device: &Device,
) -> Result<(MatmulPrecision, String), ModelError> {
    let (precision, why) = resolve_precision(choice, device)?;
    let amx = cpu_kernels::bf16_matrix_unit() == Some(Bf16Unit::AmxBf16);
    let pays = amx || conv::bf16_on_own_product();
    if choice == DtypeChoice::Auto && precision == MatmulPrecision::Bf16 && !pays {
        return Ok((
            MatmulPrecision::F32,
            "DTYPE=auto: f32, bf16 convolutions pay only with AMX-BF16, or with AVX512-BF16 \
             on a CPU that is not Intel's"
                .into(),
        ));
    }
    Ok((precision, why))
}

/// This family's synthetic checkpoint at `size` (`free-roam model make`): `tiny` for tests,
/// a scale (or `full`, which is `s`) for benchmarks, with the CLIP ViT-B/32 text tower.
pub fn synthetic(size: ModelSize) -> Result<SyntheticModel, ModelError> {
    let (tok, vocab) = tokenizer::clip_tiny_tokenizer();
    let config = yoloworld_config(size, vocab);
    let spec = YoloWorldSpec::from_config(&config)?;
    let tok_config = json!({
        "tokenizer_class": "CLIPTokenizer",
        "bos_token": CLIP_BOS, "eos_token": CLIP_EOS, "pad_token": CLIP_EOS,
        "unk_token": CLIP_EOS, "do_lower_case": true,
        "model_max_length": spec.clip.text.max_position_embeddings
    });
    let preprocessor = json!({
        "letterbox": {"size": spec.image_size, "stride": STRIDE, "pad": letterbox::PAD,
                      "interpolation": "cv2.INTER_LINEAR"},
        "rescale_factor": 1.0 / 255.0
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

/// The `config.json` of a synthetic checkpoint: the scale, and the CLIP text tower's
/// settings in transformers' layout. The tiny scale is narrow (width 1/8, 40 classes) with a
/// two-layer text tower of width 32, projecting to the 512 wide embeddings the reference
/// network is built for.
fn yoloworld_config(size: ModelSize, tiny_vocab: usize) -> Value {
    let (bos, eos) = (tiny_vocab - 2, tiny_vocab - 1);
    let scale = match size {
        ModelSize::Tiny => None,
        ModelSize::Full => Some(Scale::S),
        ModelSize::Scale(scale) => Some(scale),
    };
    let (vocab, hidden, inter, layers, heads, proj) = match scale {
        None => (tiny_vocab, 32, 64, 2, 4, 512),
        Some(_) => (49408, 512, 2048, 12, 8, 512),
    };
    let mut config = json!({
        "_name_or_path": format!("random-yoloworld-{size}"),
        "architectures": ["WorldModel"],
        "model_type": config::MODEL_TYPE,
        "nc": 80,
        "reg_max": 16,
        "image_size": 640,
        "batch_norm_eps": 1e-3,
        "projection_dim": proj,
        "text_config": {
            "bos_token_id": bos, "eos_token_id": eos, "hidden_act": "quick_gelu",
            "hidden_size": hidden, "intermediate_size": inter, "layer_norm_eps": 1e-5,
            "max_position_embeddings": 77, "model_type": "clip_text_model",
            "num_attention_heads": heads, "num_hidden_layers": layers,
            "pad_token_id": eos, "projection_dim": proj, "vocab_size": vocab
        }
    });
    match scale {
        Some(scale) => config["scale"] = scale.as_str().into(),
        None => {
            config["scale"] = "tiny".into();
            config["depth_multiple"] = 0.33.into();
            config["width_multiple"] = 0.125.into();
            config["max_channels"] = 1024.into();
            config["nc"] = 40.into();
        }
    }
    config
}

#[cfg(test)]
mod tests;
