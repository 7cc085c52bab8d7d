//! The BLIP backend: one caption per frame, conditioned on the prompt as BLIP's text prefix,
//! with candle-transformers' BLIP (the Salesforce/blip-image-captioning-large layout).
//!
//! Decoding follows transformers' `BlipForConditionalGeneration.generate`: the prompt is
//! tokenised as `[CLS] prompt [SEP]`, its `[CLS]` becomes `[DEC]` (`bos_token_id`) and the
//! trailing `[SEP]` is dropped (an empty prompt leaves just `[DEC]`); tokens are then chosen
//! greedily until `[SEP]` (`sep_token_id`) or `max_new_tokens`. All frames of a call share
//! the prompt, so they go through the image tower and the decoder as one batch; the image's
//! cross-attention keys and values are projected once per call (see [`super::blip_net`]).
//! The caption is the whole sequence,
//! prompt included, decoded without special tokens, as transformers' processor gives it.
//! Output per frame: `{"caption": "..."}`.

pub mod net;

use crate::model::families::blip::net::{TextDecoder, VisionTower};
use crate::model::loading::config::check_patches;
use crate::model::loading::{
    ModelFiles, ModelSettings, TensorSpec, Weights, device_name, parse_config, read_config,
};
use crate::model::preprocess::Preprocessor;
use crate::model::preprocess::{CLIP_MEAN, CLIP_STD};
use crate::model::testing::synthetic::{ModelSize, SyntheticModel};
use crate::model::text::tokenizer::{self, BERT_CLS};
use crate::model::text::tokenizer::{BERT_MASK, BERT_PAD, BERT_SEP, BERT_UNK, BLIP_DEC, BLIP_ENC};
use crate::model::towers::specs::{layer_norm_specs, linear_specs};
use crate::model::{Frame, ModelError, ModelInfo, VisionLanguageModel};
use crate::prompt::PromptRef;
use candle_core::{D, Device, Tensor};
use candle_nn::Activation;
use candle_transformers::models::{blip, blip_text};
use serde::Deserialize;
use serde_json::{Value, json};
use std::sync::Arc;
use tokenizers::Tokenizer;

/// The tied output projection transformers 5 leaves out of saved checkpoints.
const DECODER_WEIGHT: &str = "text_decoder.cls.predictions.decoder.weight";
const WORD_EMBEDDINGS: &str = "text_decoder.bert.embeddings.word_embeddings.weight";

/// The BLIP architecture settings read from `config.json`.
#[derive(Clone, Debug)]
pub struct BlipSpec {
    pub config: blip::Config,
    pub bos_token_id: u32,
    pub sep_token_id: u32,
}

/// transformers' `BlipConfig` as `config.json` holds it; absent keys take transformers'
/// defaults.
#[derive(Deserialize)]
#[serde(default)]
struct BlipConfigFile {
    text_config: TextSection,
    vision_config: VisionSection,
    projection_dim: usize,
    image_text_hidden_size: usize,
}

impl Default for BlipConfigFile {
    fn default() -> Self {
        Self {
            text_config: TextSection::default(),
            vision_config: VisionSection::default(),
            projection_dim: 512,
            image_text_hidden_size: 256,
        }
    }
}

#[derive(Deserialize)]
#[serde(default)]
struct TextSection {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    projection_dim: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    max_position_embeddings: usize,
    hidden_act: Activation,
    layer_norm_eps: f64,
    is_decoder: bool,
    bos_token_id: u32,
    sep_token_id: u32,
}

impl Default for TextSection {
    fn default() -> Self {
        Self {
            vocab_size: 30524,
            hidden_size: 768,
            intermediate_size: 3072,
            projection_dim: 768,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 512,
            hidden_act: Activation::Gelu,
            layer_norm_eps: 1e-12,
            is_decoder: true,
            bos_token_id: 30522,
            sep_token_id: 102,
        }
    }
}

impl TextSection {
    /// Candle's settings of the text decoder, whose cross-attention reads image features of
    /// `encoder_hidden_size`.
    fn decoder(&self, encoder_hidden_size: usize) -> blip_text::Config {
        blip_text::Config {
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            encoder_hidden_size,
            intermediate_size: self.intermediate_size,
            projection_dim: self.projection_dim,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            max_position_embeddings: self.max_position_embeddings,
            hidden_act: self.hidden_act,
            layer_norm_eps: self.layer_norm_eps,
            is_decoder: self.is_decoder,
        }
    }
}

#[derive(Deserialize)]
#[serde(default)]
struct VisionSection {
    hidden_size: usize,
    intermediate_size: usize,
    projection_dim: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    image_size: usize,
    patch_size: usize,
    hidden_act: Activation,
    layer_norm_eps: f64,
}

impl Default for VisionSection {
    fn default() -> Self {
        Self {
            hidden_size: 768,
            intermediate_size: 3072,
            projection_dim: 512,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            image_size: 384,
            patch_size: 16,
            hidden_act: Activation::Gelu,
            layer_norm_eps: 1e-5,
        }
    }
}

impl From<VisionSection> for blip::VisionConfig {
    fn from(v: VisionSection) -> Self {
        Self {
            hidden_size: v.hidden_size,
            intermediate_size: v.intermediate_size,
            projection_dim: v.projection_dim,
            num_hidden_layers: v.num_hidden_layers,
            num_attention_heads: v.num_attention_heads,
            image_size: v.image_size,
            patch_size: v.patch_size,
            hidden_act: v.hidden_act,
            layer_norm_eps: v.layer_norm_eps,
        }
    }
}

impl BlipSpec {
    /// Reads a transformers `BlipConfig`, filling missing keys with transformers' defaults
    /// and, like transformers, taking the text decoder's `encoder_hidden_size` from the
    /// vision tower (some published configs leave it out).
    pub fn from_config(config: &Value) -> Result<Self, ModelError> {
        let file: BlipConfigFile = parse_config(config, "BLIP")?;
        let text = &file.text_config;
        let (bos_token_id, sep_token_id) = (text.bos_token_id, text.sep_token_id);
        let config = blip::Config {
            text_config: text.decoder(file.vision_config.hidden_size),
            vision_config: file.vision_config.into(),
            projection_dim: file.projection_dim,
            image_text_hidden_size: file.image_text_hidden_size,
        };
        let v = &config.vision_config;
        check_patches(v.image_size, v.patch_size)?;
        let t = &config.text_config;
        for id in [bos_token_id, sep_token_id] {
            if id as usize >= t.vocab_size {
                return Err(ModelError::Load(
                    format!(
                        "config.json: token id {id} is outside the vocabulary of {}",
                        t.vocab_size
                    )
                    .into(),
                ));
            }
        }
        Ok(Self {
            config,
            bos_token_id,
            sep_token_id,
        })
    }

    /// Every tensor transformers' `BlipForConditionalGeneration` reads, with its shape.
    /// [`DECODER_WEIGHT`] is listed but tied to the word embeddings.
    pub fn tensor_specs(&self) -> Vec<TensorSpec> {
        let v = &self.config.vision_config;
        let t = &self.config.text_config;
        let (d, h) = (v.hidden_size, t.hidden_size);
        let positions = (v.image_size / v.patch_size).pow(2) + 1;
        let mut s = vec![
            TensorSpec::new("vision_model.embeddings.class_embedding", &[1, 1, d]),
            TensorSpec::new(
                "vision_model.embeddings.position_embedding",
                &[1, positions, d],
            ),
            TensorSpec::new(
                "vision_model.embeddings.patch_embedding.weight",
                &[d, 3, v.patch_size, v.patch_size],
            ),
            TensorSpec::new("vision_model.embeddings.patch_embedding.bias", &[d]),
        ];
        for i in 0..v.num_hidden_layers {
            let p = format!("vision_model.encoder.layers.{i}");
            linear_specs(&mut s, &format!("{p}.self_attn.qkv"), 3 * d, d);
            linear_specs(&mut s, &format!("{p}.self_attn.projection"), d, d);
            layer_norm_specs(&mut s, &format!("{p}.layer_norm1"), d);
            linear_specs(&mut s, &format!("{p}.mlp.fc1"), v.intermediate_size, d);
            linear_specs(&mut s, &format!("{p}.mlp.fc2"), d, v.intermediate_size);
            layer_norm_specs(&mut s, &format!("{p}.layer_norm2"), d);
        }
        layer_norm_specs(&mut s, "vision_model.post_layernorm", d);
        let e = "text_decoder.bert.embeddings";
        s.push(TensorSpec::new(WORD_EMBEDDINGS, &[t.vocab_size, h]));
        s.push(TensorSpec::new(
            format!("{e}.position_embeddings.weight"),
            &[t.max_position_embeddings, h],
        ));
        layer_norm_specs(&mut s, &format!("{e}.LayerNorm"), h);
        for i in 0..t.num_hidden_layers {
            let p = format!("text_decoder.bert.encoder.layer.{i}");
            for (attn, kv_in) in [("attention", h), ("crossattention", t.encoder_hidden_size)] {
                linear_specs(&mut s, &format!("{p}.{attn}.self.query"), h, h);
                linear_specs(&mut s, &format!("{p}.{attn}.self.key"), h, kv_in);
                linear_specs(&mut s, &format!("{p}.{attn}.self.value"), h, kv_in);
                linear_specs(&mut s, &format!("{p}.{attn}.output.dense"), h, h);
                layer_norm_specs(&mut s, &format!("{p}.{attn}.output.LayerNorm"), h);
            }
            linear_specs(
                &mut s,
                &format!("{p}.intermediate.dense"),
                t.intermediate_size,
                h,
            );
            linear_specs(&mut s, &format!("{p}.output.dense"), h, t.intermediate_size);
            layer_norm_specs(&mut s, &format!("{p}.output.LayerNorm"), h);
        }
        let c = "text_decoder.cls.predictions";
        linear_specs(&mut s, &format!("{c}.transform.dense"), h, h);
        layer_norm_specs(&mut s, &format!("{c}.transform.LayerNorm"), h);
        s.push(TensorSpec::new(format!("{c}.bias"), &[t.vocab_size]));
        s.push(TensorSpec::new(DECODER_WEIGHT, &[t.vocab_size, h]));
        s
    }
}

/// BLIP captioning behind [`VisionLanguageModel`]. The configuration is candle-transformers'
/// `blip::Config`; the network is [`super::blip_net`].
pub struct BlipModel {
    info: ModelInfo,
    vision: VisionTower,
    decoder: TextDecoder,
    tokenizer: Tokenizer,
    spec: BlipSpec,
    cls_id: Option<u32>,
    preprocessor: Preprocessor,
    device: Device,
    max_new_tokens: usize,
    /// The decoder prefix of the last prompt, since the same prompt repeats.
    prefix_cache: Option<(Arc<str>, Vec<u32>)>,
}

impl BlipModel {
    /// Loads BLIP from its files, after checking every tensor is present.
    pub fn load(
        files: &ModelFiles,
        device: Device,
        settings: &ModelSettings,
    ) -> Result<Self, ModelError> {
        let spec = BlipSpec::from_config(&read_config(&files.config)?)?;
        let tokenizer = tokenizer::load(&files.tokenizer)?;
        let cls_id = tokenizer.token_to_id(BERT_CLS);
        let weights = Weights::open(&files.weights)?;
        weights.check(&spec.tensor_specs(), &[DECODER_WEIGHT])?;
        // Read the tied output projection from the word embeddings when it was not saved.
        let tied = !weights.contains(DECODER_WEIGHT);
        let vb = weights.var_builder(&device);
        let build = || {
            Ok::<_, candle_core::Error>((
                VisionTower::new(&spec.config.vision_config, vb.pp("vision_model"))?,
                TextDecoder::new(&spec.config.text_config, tied, vb.pp("text_decoder"))?,
            ))
        };
        let (vision, decoder) = build().map_err(|e| ModelError::load("building BLIP", e))?;
        let side = spec.config.vision_config.image_size;
        Ok(Self {
            info: ModelInfo {
                name: files.name.clone(),
                task: "captioning".into(),
                input_size: side as u32,
                device: device_name(&device),
                dtype: "f32".into(),
            },
            vision,
            decoder,
            tokenizer,
            spec,
            cls_id,
            preprocessor: Preprocessor::blip(side),
            device,
            max_new_tokens: settings.max_new_tokens,
            prefix_cache: None,
        })
    }

    /// The preprocessing this model applies.
    pub fn preprocessor(&self) -> &Preprocessor {
        &self.preprocessor
    }

    /// The decoder's starting ids for a prompt: `[DEC]` then the prompt's tokens.
    pub fn prefix_ids(&self, prompt: &str) -> Result<Vec<u32>, ModelError> {
        let bos = self.spec.bos_token_id;
        if prompt.trim().is_empty() {
            return Ok(vec![bos]);
        }
        let mut ids = tokenizer::encode_ids(&self.tokenizer, prompt, true)?;
        if ids.last() == Some(&self.spec.sep_token_id) {
            ids.pop();
        }
        match ids.first() {
            Some(first) if Some(*first) == self.cls_id => ids[0] = bos,
            _ => ids.insert(0, bos),
        }
        let limit = self.spec.config.text_config.max_position_embeddings;
        if ids.len() + self.max_new_tokens > limit {
            return Err(ModelError::Prompt(format!(
                "the prompt is {} tokens; with {} new tokens it passes the model's {limit} positions",
                ids.len(),
                self.max_new_tokens
            ).into()));
        }
        Ok(ids)
    }

    fn cached_prefix(&mut self, prompt: &PromptRef) -> Result<Vec<u32>, ModelError> {
        if let Some((text, ids)) = &self.prefix_cache
            && *text == prompt.text
        {
            return Ok(ids.clone());
        }
        let ids = self.prefix_ids(&prompt.text)?;
        self.prefix_cache = Some((prompt.text.clone(), ids.clone()));
        Ok(ids)
    }

    /// Image features `(batch, patches + 1, hidden)` of preprocessed pixels.
    pub fn image_features(&self, pixels: &Tensor) -> Result<Tensor, ModelError> {
        Ok(self.vision.forward(pixels)?)
    }

    /// The prefix repeated for every image, `(batch, len)`.
    fn prefix_batch(&self, prefix: &[u32], batch: usize) -> Result<Tensor, ModelError> {
        Ok(Tensor::new(prefix, &self.device)?
            .unsqueeze(0)?
            .repeat((batch, 1))?)
    }

    /// The logits `(batch, vocab)` for the first generated token after `prefix`.
    #[cfg(test)]
    pub(crate) fn first_step_logits(
        &self,
        pixels: &Tensor,
        prefix: &[u32],
    ) -> Result<Tensor, ModelError> {
        let image = self.image_features(pixels)?;
        let input = self.prefix_batch(prefix, image.dim(0)?)?;
        let mut state = self.decoder.start(&image)?;
        Ok(self.decoder.step(&input, &mut state)?)
    }

    /// Greedy decoding for every image of `pixels`, all in one batch: each sequence is the
    /// prefix, then the generated ids up to and including `[SEP]` when it came.
    pub fn generate_ids(
        &self,
        pixels: &Tensor,
        prefix: &[u32],
    ) -> Result<Vec<Vec<u32>>, ModelError> {
        let image = self.image_features(pixels)?;
        let batch = image.dim(0)?;
        let mut sequences = vec![prefix.to_vec(); batch];
        let mut done = vec![false; batch];
        let mut input = self.prefix_batch(prefix, batch)?;
        let mut state = self.decoder.start(&image)?;
        for _ in 0..self.max_new_tokens {
            let next = self
                .decoder
                .step(&input, &mut state)?
                .argmax(D::Minus1)?
                .to_vec1::<u32>()?;
            for (row, &token) in next.iter().enumerate() {
                if !done[row] {
                    sequences[row].push(token);
                    done[row] = token == self.spec.sep_token_id;
                }
            }
            if done.iter().all(|d| *d) {
                break;
            }
            // Finished rows keep decoding alongside the others; their tokens are dropped.
            input = Tensor::new(next.as_slice(), &self.device)?.unsqueeze(1)?;
        }
        Ok(sequences)
    }

    /// The caption text of a generated sequence.
    pub fn decode(&self, ids: &[u32]) -> Result<String, ModelError> {
        tokenizer::decode(&self.tokenizer, ids)
    }
}

impl VisionLanguageModel for BlipModel {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn infer(&mut self, frames: &[&Frame], prompt: &PromptRef) -> Result<Vec<Value>, ModelError> {
        if frames.is_empty() {
            return Ok(Vec::new());
        }
        let prefix = self.cached_prefix(prompt)?;
        let pixels = self.preprocessor.batch(frames, &self.device)?;
        let sequences = self.generate_ids(&pixels, &prefix)?;
        sequences
            .iter()
            .map(|ids| Ok(json!({"caption": self.decode(ids)?})))
            .collect()
    }
}

/// This family's synthetic checkpoint at `size` (`free-roam model make`), in the layout
/// transformers 5 writes.
pub fn synthetic(size: ModelSize) -> Result<SyntheticModel, ModelError> {
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
    Ok(SyntheticModel {
        config,
        tokenizer: tok,
        tokenizer_config: tok_config,
        preprocessor,
        specs,
        extra_files: Vec::new(),
    })
}

/// A transformers 5 `BlipConfig`, as `save_pretrained` writes it.
fn blip_config(size: ModelSize, tiny_vocab: usize, ids: tokenizer::BertSpecialIds) -> Value {
    let (vocab, t_hidden, t_inter, t_layers, t_heads, v_hidden, v_inter, v_layers, v_heads, patch) =
        match size {
            ModelSize::Tiny => (tiny_vocab, 32, 64, 2, 4, 32, 64, 2, 4, 32),
            ModelSize::Full | ModelSize::Scale(_) => {
                (30524, 768, 3072, 12, 12, 1024, 4096, 24, 16, 16)
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::kind::ModelType;
    use crate::model::registry::load_model;
    use crate::model::testing::util::{frame, frames, prompt, tiny_model};
    use std::time::Instant;

    fn tiny(max_new_tokens: usize) -> BlipModel {
        let files = ModelFiles::from_dir(tiny_model(ModelType::Blip)).unwrap();
        let settings = ModelSettings {
            max_new_tokens,
            ..ModelSettings::default()
        };
        BlipModel::load(&files, Device::Cpu, &settings).unwrap()
    }

    #[test]
    fn captions_every_frame() {
        let dir = tiny_model(ModelType::Blip);
        let start = Instant::now();
        let settings = ModelSettings {
            model_type: ModelType::Blip,
            model_path: Some(dir.to_path_buf()),
            ..ModelSettings::default()
        };
        let mut model = load_model(&settings).unwrap();
        let loaded = start.elapsed();
        assert_eq!(model.info().task, "captioning");
        assert_eq!(model.info().input_size, 384);
        let frames = frames();
        let refs: Vec<&Frame> = frames.iter().collect();
        let out = model.infer(&refs, &prompt("a picture of")).unwrap();
        assert_eq!(out.len(), frames.len());
        for o in &out {
            let caption = o["caption"].as_str().unwrap();
            assert!(caption.starts_with("a picture of"), "{caption:?}");
        }
        eprintln!(
            "tiny blip load {loaded:?}, load + infer of 5 frames {:?}",
            start.elapsed()
        );
    }

    #[test]
    fn the_prompt_becomes_the_decoder_prefix() {
        let model = tiny(20);
        let bos = model.spec.bos_token_id;
        assert_eq!(model.prefix_ids("").unwrap(), [bos]);
        assert_eq!(model.prefix_ids("   ").unwrap(), [bos]);
        let id = |t: &str| model.tokenizer.token_to_id(t).unwrap();
        assert_eq!(
            model.prefix_ids("A picture OF").unwrap(),
            [bos, id("a"), id("picture"), id("of")]
        );
        let long = "dog ".repeat(600);
        assert!(matches!(
            model.prefix_ids(&long),
            Err(ModelError::Prompt(_))
        ));
    }

    #[test]
    fn decoding_stops_at_the_token_bound_and_batches_like_single_frames() {
        let model = tiny(5);
        let frames = frames();
        let refs: Vec<&Frame> = frames.iter().collect();
        let pixels = model.preprocessor.batch(&refs, &Device::Cpu).unwrap();
        let prefix = model.prefix_ids("a picture of").unwrap();
        let batched = model.generate_ids(&pixels, &prefix).unwrap();
        for (i, seq) in batched.iter().enumerate() {
            assert!(seq.starts_with(&prefix));
            let added = seq.len() - prefix.len();
            assert!(added <= 5);
            if added < 5 {
                assert_eq!(seq.last(), Some(&model.spec.sep_token_id));
            }
            let one = pixels.narrow(0, i, 1).unwrap();
            assert_eq!(&model.generate_ids(&one, &prefix).unwrap()[0], seq);
        }
    }

    #[test]
    fn the_tied_output_projection_is_read_from_the_word_embeddings() {
        // The writer leaves it out, as transformers 5 does; loading must still work and
        // give logits that depend on the word embeddings.
        let dir = tiny_model(ModelType::Blip);
        let weights = Weights::open(&[dir.join("model.safetensors")]).unwrap();
        assert!(!weights.contains(DECODER_WEIGHT));
        let model = tiny(3);
        let f = frame("checker", 64, 64);
        let pixels = model.preprocessor.batch(&[&f], &Device::Cpu).unwrap();
        let logits = model
            .first_step_logits(&pixels, &[model.spec.bos_token_id])
            .unwrap();
        let v = logits.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(v.len(), model.spec.config.text_config.vocab_size);
        assert!(v.iter().any(|x| x.abs() > 1e-3));
    }

    #[test]
    fn full_size_config_has_the_reference_shapes() {
        let spec = BlipSpec::from_config(&json!({
            "text_config": {"num_attention_heads": 12},
            "vision_config": {"hidden_size": 1024, "intermediate_size": 4096,
                              "num_hidden_layers": 24, "num_attention_heads": 16}
        }))
        .unwrap();
        assert_eq!(spec.config.text_config.encoder_hidden_size, 1024);
        let specs = spec.tensor_specs();
        let params: usize = specs
            .iter()
            .filter(|s| s.name != DECODER_WEIGHT)
            .map(|s| s.shape.iter().product::<usize>())
            .sum();
        assert_eq!(params, BLIP_LARGE_PARAMS);
    }

    /// transformers' `num_parameters()` of Salesforce/blip-image-captioning-large.
    const BLIP_LARGE_PARAMS: usize = 446_290_492;
}

#[cfg(test)]
mod stop_tests {
    use super::*;
    use crate::model::kind::ModelType;
    use crate::model::testing::util::{frames, scratch_dir};
    use crate::model::{ModelSize, write_random_model};

    /// Rewrites a tiny model so that `[SEP]` always wins, and with the tied output
    /// projection written out explicitly.
    fn model_that_stops_at_once() -> (BlipModel, std::path::PathBuf) {
        let dir = scratch_dir("blip-stop");
        write_random_model(ModelType::Blip, ModelSize::Tiny, 11, &dir).unwrap();
        let path = dir.join("model.safetensors");
        let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
        let spec = BlipSpec::from_config(&read_config(&dir.join("config.json")).unwrap()).unwrap();
        let bias_name = "text_decoder.cls.predictions.bias";
        let mut bias = tensors[bias_name].to_vec1::<f32>().unwrap();
        bias[spec.sep_token_id as usize] = 1e4;
        let n = bias.len();
        tensors.insert(
            bias_name.into(),
            Tensor::from_vec(bias, n, &Device::Cpu).unwrap(),
        );
        let embeddings = tensors[WORD_EMBEDDINGS].clone();
        tensors.insert(DECODER_WEIGHT.into(), embeddings);
        candle_core::safetensors::save(&tensors, &path).unwrap();
        let files = ModelFiles::from_dir(&dir).unwrap();
        let model = BlipModel::load(&files, Device::Cpu, &ModelSettings::default()).unwrap();
        (model, dir)
    }

    #[test]
    fn decoding_stops_at_sep_and_the_caption_is_the_prompt() {
        let (mut model, dir) = model_that_stops_at_once();
        let frames = frames();
        let refs: Vec<&Frame> = frames.iter().collect();
        let p = PromptRef {
            text: Arc::from("A picture of"),
            version: Some(3),
        };
        let pixels = model.preprocessor.batch(&refs, &Device::Cpu).unwrap();
        let prefix = model.prefix_ids("A picture of").unwrap();
        for seq in model.generate_ids(&pixels, &prefix).unwrap() {
            assert_eq!(seq.len(), prefix.len() + 1);
            assert_eq!(seq.last(), Some(&model.spec.sep_token_id));
        }
        for out in model.infer(&refs, &p).unwrap() {
            assert_eq!(out, json!({"caption": "a picture of"}));
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
