//! The CLIP backend: zero-shot scoring of each frame against phrases taken from the prompt,
//! with candle-transformers' CLIP text tower and our own image tower (`towers::vit`), in the
//! openai/clip-vit-base-patch32 layout.
//!
//! # From prompt to phrases
//!
//! The prompt becomes phrases by the rule in [`crate::model::text::phrases`] ("Detect all
//! people and vehicles" gives `people`, `vehicles`); each phrase is scored through the
//! template `PHRASE_TEMPLATE` ("a photo of {phrase}.").
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
//!
//! [`prompt_phrases`]: crate::model::text::phrases::prompt_phrases
//! [`FILLER_WORDS`]: crate::model::text::phrases::FILLER_WORDS
//! [`PHRASE_TEMPLATE`]: crate::model::text::phrases::PHRASE_TEMPLATE

use crate::model::kind::ModelType;
use crate::model::loading::{
    ModelFiles, ModelSettings, Weights, device_name, read_config, resolve_precision,
};
use crate::model::preprocess::Preprocessor;
use crate::model::preprocess::{CLIP_MEAN, CLIP_STD};
use crate::model::testing::synthetic::{ModelSize, SyntheticModel};
use crate::model::text::prompt_cache::PromptCache;
use crate::model::text::tokenizer::{self};
use crate::model::text::tokenizer::{CLIP_BOS, CLIP_EOS};
use crate::model::towers::clip_text::{ClipSpec, ClipTextEncoder};
use crate::model::towers::scoring::{
    PhraseScore, l2_normalise, phrase_output, round6, sigmoid, templated_phrases,
};
use crate::model::towers::vit::{PreNormName, VisionTower};
use crate::model::{Frame, ModelError, ModelInfo, VisionLanguageModel};
use crate::prompt::PromptRef;
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::Linear;
use serde_json::{Value, json};
use std::sync::Arc;

/// Captions that fit any photo, against which each phrase's presence is scored (see the
/// module docs). Their embeddings are computed once, at load.
pub const NEUTRAL_TEXTS: &[&str] = &[
    "a photo.",
    "a photo of something.",
    "a photo of a scene.",
    "a photo of an object.",
    "a photo of a place.",
];
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
    sigmoid(logit_scale * (phrase - best_neutral))
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
            build().map_err(|e| ModelError::load("building CLIP", e))?;
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
        let x = self.vision.forward(pixels)?;
        Ok(self.visual_projection.forward(&x)?)
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
            let (phrases, texts) = templated_phrases(&prompt.text)?;
            let text = l2_normalise(&self.text_embeddings(&texts)?)?;
            let text_t = Tensor::cat(&[&text, &self.neutral], 0)?.t()?.contiguous()?;
            Ok(PromptEmbedding { phrases, text_t })
        });
        self.cache = cache;
        entry
    }
}

impl VisionLanguageModel for ClipModel {
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
        let prompt_embedding = self.prompt_embedding(prompt)?;
        let phrase_count = prompt_embedding.phrases.len();
        let image = l2_normalise(&self.image_embeddings(frames)?)?;
        let all = image.matmul(&prompt_embedding.text_t)?;
        let similarity = all.narrow(1, 0, phrase_count)?;
        let logits = (&similarity * self.logit_scale() as f64)?;
        let probability = candle_nn::ops::softmax_last_dim(&logits)?
            .to_dtype(DType::F32)?
            .to_vec2::<f32>()?;
        let all = all.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        let scale = self.logit_scale();
        Ok(all
            .iter()
            .zip(&probability)
            .map(|(row, probs)| {
                let (sims, neutral) = row.split_at(phrase_count);
                let best_neutral = neutral.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let output = phrase_output(&prompt_embedding.phrases, |i| {
                    let presence = presence(sims[i], best_neutral, scale);
                    PhraseScore {
                        numbers: json!({"probability": round6(probs[i]),
                                        "presence": round6(presence),
                                        "similarity": round6(sims[i])}),
                        detected: presence > self.detect_threshold,
                    }
                });
                Value::Object(output)
            })
            .collect())
    }
}

/// This family's synthetic checkpoint at `size` (`free-roam model make`), in the layout
/// transformers 5 writes.
pub fn synthetic(size: ModelSize) -> Result<SyntheticModel, ModelError> {
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
    Ok(SyntheticModel {
        config,
        tokenizer: tok,
        tokenizer_config: tok_config,
        preprocessor,
        specs: spec.tensor_specs(),
        extra_files: Vec::new(),
    })
}

/// A transformers 5 `CLIPConfig`, as `save_pretrained` writes it.
fn clip_config(size: ModelSize, tiny_vocab: usize) -> Value {
    let (bos, eos) = (tiny_vocab - 2, tiny_vocab - 1);
    let (vocab, t_hidden, t_inter, t_layers, t_heads, v_hidden, v_inter, v_layers, v_heads, proj) =
        match size {
            ModelSize::Tiny => (tiny_vocab, 32, 64, 2, 4, 32, 64, 2, 4, 16),
            ModelSize::Full | ModelSize::Scale(_) => {
                (49408, 512, 2048, 12, 8, 768, 3072, 12, 12, 512)
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::kind::ModelType;
    use crate::model::registry::load_model;
    use crate::model::testing::util::{frame, frames, prompt, scratch_dir, tiny_model};
    use crate::model::text::prompt_cache::PROMPT_CACHE;
    use crate::model::{ModelSize, write_random_model};
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

    /// The bf16 image tower stays within cosine 0.9999 of the f32 one on the parity frames.
    #[test]
    fn bf16_image_embeddings_stay_close_to_f32() {
        if crate::model::kernels::fused_linear::bf16_product().is_none() {
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
        let worst = crate::model::testing::util::lowest_row_cosine(&f32_rows, &bf16_rows);
        eprintln!("bf16 against f32 image embeddings: lowest cosine {worst}");
        assert!(worst >= 0.9999, "cosine {worst}");
        assert_ne!(
            f32_rows.to_vec2::<f32>().unwrap(),
            bf16_rows.to_vec2::<f32>().unwrap()
        );
    }
}
