//! The SigLIP backend: a presence score per phrase that does not depend on the other
//! phrases, in the google/siglip-base-patch16-224 layout.
//!
//! The image tower is the project's own ([`VisionTower::siglip`], with the fused layers and
//! the bf16 path of CLIP's) followed by SigLIP's attention-pooling head ([`PoolingHead`]);
//! the text tower, run once per prompt, is candle-transformers'.
//!
//! Phrases come from the prompt by the same rule as `clip` ([`prompt_phrases`]) and go to
//! the text tower through the same template ([`PHRASE_TEMPLATE`]), padded to the text
//! tower's full length as SigLIP was trained.
//!
//! # Output
//!
//! Per frame, the shape of `clip`'s:
//! `{"phrases":[{"phrase","probability","similarity"}...],"detected":[...]}`, where
//! `similarity` is the cosine similarity of the image and phrase embeddings and
//! `probability` is `sigmoid(logit_scale * similarity + logit_bias)`, SigLIP's own
//! probability that the phrase fits the frame. Each phrase is scored alone, so an empty
//! frame can give every phrase a low probability and two phrases can both be high.
//! `detected` lists the phrases whose probability is over the detect threshold.
//!
//! [`prompt_phrases`]: crate::model::text::phrases::prompt_phrases
//! [`PHRASE_TEMPLATE`]: crate::model::text::phrases::PHRASE_TEMPLATE

use crate::model::kernels::fused_linear::{Activation, FusedLinear, MatmulPrecision};
use crate::model::kind::ModelType;
use crate::model::loading::config::{check_heads, check_patches};
use crate::model::loading::{
    ModelFiles, ModelSettings, TensorSpec, Weights, device_name, parse_config, read_config,
    resolve_precision,
};
use crate::model::preprocess::Preprocessor;
use crate::model::preprocess::SIGLIP_MEAN_STD;
use crate::model::testing::synthetic::{ModelSize, SyntheticModel};
use crate::model::text::prompt_cache::PromptCache;
use crate::model::text::tokenizer::SIGLIP_UNK;
use crate::model::text::tokenizer::{self, SIGLIP_EOS};
use crate::model::towers::scoring::{
    PhraseScore, l2_normalise, phrase_output, round6, sigmoid, templated_phrases,
};
use crate::model::towers::specs::{
    TextTowerShape, layer_norm_specs, linear_specs, siglip_vision_specs, text_tower_specs,
};
use crate::model::towers::vit::VisionTower;
use crate::model::{Frame, ModelError, ModelInfo, VisionLanguageModel};
use crate::model::{kernels::batched_matmul, kernels::cpu_kernels};
use crate::prompt::PromptRef;
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{LayerNorm, VarBuilder};
use candle_transformers::models::siglip;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use std::sync::Arc;
use tokenizers::Tokenizer;

/// The SigLIP architecture read from `config.json` (transformers' `SiglipConfig`; missing
/// keys take transformers' defaults, which candle's defaults equal).
#[derive(Clone, Debug)]
pub struct SiglipSpec {
    pub config: siglip::Config,
    /// The image tower's activation, as the fused layers name it.
    pub activation: Activation,
}

/// transformers' `SiglipConfig` as `config.json` holds it: candle's settings of each tower
/// (whose defaults are transformers'), and the keys this backend checks.
#[derive(Deserialize)]
struct SiglipConfigFile {
    #[serde(default = "all_defaults")]
    text_config: TextSection,
    #[serde(default = "all_defaults")]
    vision_config: VisionSection,
}

#[derive(Deserialize)]
struct TextSection {
    #[serde(flatten)]
    tower: siglip::TextConfig,
    projection_size: Option<usize>,
}

#[derive(Deserialize)]
struct VisionSection {
    #[serde(flatten)]
    tower: siglip::VisionConfig,
    vision_use_head: Option<bool>,
}

/// A section that `config.json` leaves out: every key at its default.
fn all_defaults<T: DeserializeOwned>() -> T {
    serde_json::from_value(json!({})).expect("every SigLIP setting has a default")
}

impl SiglipSpec {
    pub fn from_config(config: &Value) -> Result<Self, ModelError> {
        let file: SiglipConfigFile = parse_config(config, "SigLIP")?;
        let (text, vision) = (file.text_config.tower, file.vision_config.tower);
        if let Some(p) = file.text_config.projection_size
            && p != text.hidden_size
        {
            return Err(ModelError::Load(
                format!(
                    "config.json: text_config.projection_size {p} differs from hidden_size; \
                     this SigLIP backend supports equal sizes only"
                )
                .into(),
            ));
        }
        if file.vision_config.vision_use_head == Some(false) {
            return Err(ModelError::Load(
                "config.json: vision_use_head is false; SigLIP needs its pooling head".into(),
            ));
        }
        check_patches(vision.image_size, vision.patch_size)?;
        check_heads(&[
            (text.hidden_size, text.num_attention_heads),
            (vision.hidden_size, vision.num_attention_heads),
        ])?;
        let activation = Activation::fused(vision.hidden_act).ok_or_else(|| {
            let act = vision.hidden_act;
            ModelError::Load(
                format!(
                    "config.json: vision_config.hidden_act {act:?} is not supported by the \
                     SigLIP image tower (gelu_pytorch_tanh, gelu_new or gelu)"
                )
                .into(),
            )
        })?;
        Ok(Self {
            config: siglip::Config {
                text_config: text,
                vision_config: vision,
            },
            activation,
        })
    }

    /// Every tensor transformers' `SiglipModel` stores, with its shape.
    pub fn tensor_specs(&self) -> Vec<TensorSpec> {
        let (t, v) = (&self.config.text_config, &self.config.vision_config);
        let mut specs = Vec::new();
        let text_shape = TextTowerShape {
            vocab: t.vocab_size,
            positions: t.max_position_embeddings,
            hidden: t.hidden_size,
            intermediate: t.intermediate_size,
            layers: t.num_hidden_layers,
        };
        text_tower_specs(&mut specs, "text_model", &text_shape);
        linear_specs(&mut specs, "text_model.head", t.hidden_size, t.hidden_size);
        siglip_vision_specs(&mut specs, "vision_model", v);
        let d = v.hidden_size;
        specs.push(TensorSpec::new("vision_model.head.probe", &[1, 1, d]));
        specs.push(TensorSpec::new(
            "vision_model.head.attention.in_proj_weight",
            &[3 * d, d],
        ));
        specs.push(TensorSpec::new(
            "vision_model.head.attention.in_proj_bias",
            &[3 * d],
        ));
        linear_specs(&mut specs, "vision_model.head.attention.out_proj", d, d);
        layer_norm_specs(&mut specs, "vision_model.head.layernorm", d);
        linear_specs(
            &mut specs,
            "vision_model.head.mlp.fc1",
            v.intermediate_size,
            d,
        );
        linear_specs(
            &mut specs,
            "vision_model.head.mlp.fc2",
            d,
            v.intermediate_size,
        );
        specs.push(TensorSpec::new("logit_scale", &[1]));
        specs.push(TensorSpec::new("logit_bias", &[1]));
        specs
    }
}

/// SigLIP's attention-pooling head (transformers' `SiglipMultiheadAttentionPoolingHead`): a
/// learned probe attends over every token of the tower, then a layer norm and an MLP with a
/// residual. The probe's query never changes, so it is projected (and scaled) once at load.
pub struct PoolingHead {
    /// The probe's query, split into heads and scaled: `(1, heads, 1, head_dim)`.
    query: Tensor,
    /// Key and value projections stacked, `(2 * dim, dim)`.
    key_value: FusedLinear,
    out_proj: FusedLinear,
    layer_norm: LayerNorm,
    fc1: FusedLinear,
    fc2: FusedLinear,
    activation: Activation,
    heads: usize,
}

impl PoolingHead {
    /// Reads the head from `vb` at `vision_model.head`'s level.
    fn new(
        vb: VarBuilder,
        c: &siglip::VisionConfig,
        activation: Activation,
        precision: MatmulPrecision,
    ) -> candle_core::Result<Self> {
        let d = c.hidden_size;
        let heads = c.num_attention_heads;
        let attn = vb.pp("attention");
        let in_weight = attn.get((3 * d, d), "in_proj_weight")?;
        let in_bias = attn.get(3 * d, "in_proj_bias")?;
        let scale = ((d / heads) as f64).powf(-0.5);
        let query = (vb
            .get((1, 1, d), "probe")?
            .reshape((1, d))?
            .matmul(&in_weight.narrow(0, 0, d)?.t()?)?
            .broadcast_add(&in_bias.narrow(0, 0, d)?)?
            * scale)?
            .reshape((1, heads, 1, d / heads))?;
        let linear = |i, o, vb| FusedLinear::load_as(i, o, vb, precision);
        Ok(Self {
            query,
            key_value: FusedLinear::new_as(
                in_weight.narrow(0, d, 2 * d)?,
                in_bias.narrow(0, d, 2 * d)?,
                precision,
            ),
            out_proj: linear(d, d, attn.pp("out_proj"))?,
            layer_norm: candle_nn::layer_norm(d, c.layer_norm_eps, vb.pp("layernorm"))?,
            fc1: linear(d, c.intermediate_size, vb.pp("mlp").pp("fc1"))?,
            fc2: linear(c.intermediate_size, d, vb.pp("mlp").pp("fc2"))?,
            activation,
            heads,
        })
    }

    /// `tokens`: `(batch, tokens, dim)`; returns the pooled `(batch, dim)`.
    fn forward(&self, tokens: &Tensor) -> candle_core::Result<Tensor> {
        let (b, n, d) = tokens.dims3()?;
        let hd = d / self.heads;
        let kv = self
            .key_value
            .forward(tokens)?
            .reshape((b, n, 2, self.heads, hd))?
            .permute((2, 0, 3, 1, 4))?
            .contiguous()?;
        let (k, v) = (kv.get(0)?, kv.get(1)?);
        let q = self
            .query
            .broadcast_as((b, self.heads, 1, hd))?
            .contiguous()?;
        let weights = cpu_kernels::softmax_last_dim(&batched_matmul::matmul_t(&q, &k)?)?;
        let attended = batched_matmul::matmul(&weights, &v)?
            .transpose(1, 2)?
            .reshape((b, 1, d))?;
        let x = self.out_proj.forward(&attended)?;
        let h = self
            .fc1
            .forward_with(&self.layer_norm.forward(&x)?, None, self.activation)?;
        self.fc2.forward_add(&h, &x)?.squeeze(1)
    }
}

/// Text embeddings of one prompt, kept while the prompt repeats.
struct PromptEmbedding {
    phrases: Vec<String>,
    /// `(projection, phrases)`: L2-normalised and transposed for the per-batch product.
    text_t: Tensor,
}

/// SigLIP presence scoring behind [`VisionLanguageModel`].
pub struct SiglipModel {
    info: ModelInfo,
    text: siglip::TextModel,
    vision: VisionTower,
    head: PoolingHead,
    /// `exp(logit_scale)`, the factor from cosine similarity to logit.
    logit_scale: f32,
    logit_bias: f32,
    tokenizer: Tokenizer,
    eos_id: u32,
    pad_id: u32,
    max_positions: usize,
    preprocessor: Preprocessor,
    device: Device,
    detect_threshold: f32,
    cache: PromptCache<PromptEmbedding>,
}

impl SiglipModel {
    /// Loads SigLIP from its files, after checking every tensor is present.
    pub fn load(
        files: &ModelFiles,
        device: Device,
        settings: &ModelSettings,
    ) -> Result<Self, ModelError> {
        let config = read_config(&files.config)?;
        let spec = SiglipSpec::from_config(&config)?;
        let tokenizer = tokenizer::load(&files.tokenizer)?;
        let eos_id = tokenizer::required_id(&tokenizer, SIGLIP_EOS)?;
        let t = &spec.config.text_config;
        // The checkpoints pad with `pad_token_id` (1, which is `</s>`, in google's).
        let pad_id = t.pad_token_id;
        if eos_id as usize >= t.vocab_size || pad_id as usize >= t.vocab_size {
            let vocab = t.vocab_size;
            return Err(ModelError::Load(
                format!(
                    "tokenizer's {SIGLIP_EOS} id {eos_id} or pad id {pad_id} is outside the \
                     model's vocabulary of {vocab}"
                )
                .into(),
            ));
        }
        let weights = Weights::open(&files.weights)?;
        weights.check(&spec.tensor_specs(), &[])?;
        let vb = weights.var_builder(&device);
        let (precision, why) = resolve_precision(settings.dtype, &device)?;
        tracing::info!(dtype = %precision, "SigLIP image tower: {why}");
        let v = &spec.config.vision_config;
        let build = || -> candle_core::Result<_> {
            let text = siglip::TextModel::new(t, vb.pp("text_model"))?;
            let vision = VisionTower::siglip(vb.pp("vision_model"), v, precision)?;
            let head = vb.pp("vision_model").pp("head");
            let head = PoolingHead::new(head, v, spec.activation, precision)?;
            let scalar = |name| vb.get(1, name)?.squeeze(0)?.to_scalar::<f32>();
            let (logit_scale, logit_bias) = (scalar("logit_scale")?, scalar("logit_bias")?);
            Ok((text, vision, head, logit_scale, logit_bias))
        };
        let (text, vision, head, logit_scale, logit_bias) =
            build().map_err(|e| ModelError::load("building SigLIP", e))?;
        let side = v.image_size;
        Ok(Self {
            info: ModelInfo {
                name: files.name.clone(),
                task: ModelType::Siglip.task().into(),
                input_size: side as u32,
                device: device_name(&device),
                dtype: precision.to_string(),
            },
            text,
            vision,
            head,
            logit_scale: logit_scale.exp(),
            logit_bias,
            tokenizer,
            eos_id,
            pad_id,
            max_positions: t.max_position_embeddings,
            preprocessor: Preprocessor::siglip(side),
            device,
            detect_threshold: settings.detect_threshold(),
            cache: PromptCache::default(),
        })
    }

    /// Token ids as the text tower reads them: the text's pieces and `</s>`, cut to the
    /// position limit with `</s>` kept last, then padded to the limit (the tower pools
    /// the last position).
    pub fn token_ids(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        let mut ids = tokenizer::encode_ids(&self.tokenizer, text, true)?;
        if ids.len() > self.max_positions {
            ids.truncate(self.max_positions - 1);
            ids.push(self.eos_id);
        }
        ids.resize(self.max_positions, self.pad_id);
        Ok(ids)
    }

    /// Text embeddings (not normalised), `(texts, hidden)`.
    pub fn text_embeddings(&self, texts: &[String]) -> Result<Tensor, ModelError> {
        let mut flat = Vec::with_capacity(texts.len() * self.max_positions);
        for t in texts {
            flat.extend(self.token_ids(t)?);
        }
        let ids = Tensor::from_vec(flat, (texts.len(), self.max_positions), &self.device)?;
        Ok(self.text.forward(&ids)?)
    }

    /// Image embeddings (not normalised) of preprocessed pixels, `(batch, hidden)`.
    pub fn image_embeddings_from_pixels(&self, pixels: &Tensor) -> Result<Tensor, ModelError> {
        let tokens = self.vision.forward_tokens(pixels)?;
        Ok(self.head.forward(&tokens)?)
    }

    /// The preprocessing this model applies.
    pub fn preprocessor(&self) -> &Preprocessor {
        &self.preprocessor
    }

    /// `exp(logit_scale)` and `logit_bias`: logit = scale * cosine + bias.
    #[cfg(test)]
    pub(crate) fn logit_scale_and_bias(&self) -> (f32, f32) {
        (self.logit_scale, self.logit_bias)
    }

    fn prompt_embedding(&mut self, prompt: &PromptRef) -> Result<Arc<PromptEmbedding>, ModelError> {
        let mut cache = std::mem::take(&mut self.cache);
        let entry = cache.get_or_try_insert(&prompt.text, || {
            let (phrases, texts) = templated_phrases(&prompt.text)?;
            let text_t = l2_normalise(&self.text_embeddings(&texts)?)?
                .t()?
                .contiguous()?;
            Ok(PromptEmbedding { phrases, text_t })
        });
        self.cache = cache;
        entry
    }
}

impl VisionLanguageModel for SiglipModel {
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
        let pixels = self.preprocessor.batch(frames, &self.device)?;
        let similarity = l2_normalise(&self.image_embeddings_from_pixels(&pixels)?)?
            .matmul(&prompt_embedding.text_t)?
            .to_dtype(DType::F32)?
            .to_vec2::<f32>()?;
        Ok(similarity
            .iter()
            .map(|sims| {
                let output = phrase_output(&prompt_embedding.phrases, |i| {
                    let p = sigmoid(self.logit_scale * sims[i] + self.logit_bias);
                    PhraseScore {
                        numbers: json!({"probability": round6(p), "similarity": round6(sims[i])}),
                        detected: p > self.detect_threshold,
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
    Ok(SyntheticModel {
        config,
        tokenizer: tok,
        tokenizer_config: tok_config,
        preprocessor,
        specs: spec.tensor_specs(),
        extra_files: Vec::new(),
    })
}

/// A transformers 5 `SiglipConfig`, as `save_pretrained` writes it. The text tower pads
/// with `</s>` (id 1), as google's checkpoints do.
fn siglip_config(size: ModelSize, tiny_vocab: usize) -> Value {
    let (vocab, hidden, inter, layers, heads) = match size {
        ModelSize::Tiny => (tiny_vocab, 32, 64, 2, 4),
        ModelSize::Full | ModelSize::Scale(_) => (32000, 768, 3072, 12, 12),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::registry::load_model;
    use crate::model::testing::util::{frames, prompt, tiny_model};

    fn tiny() -> SiglipModel {
        let files = ModelFiles::from_dir(tiny_model(ModelType::Siglip)).unwrap();
        SiglipModel::load(&files, Device::Cpu, &ModelSettings::default()).unwrap()
    }

    #[test]
    fn each_phrase_is_scored_alone() {
        let settings = ModelSettings {
            model_type: ModelType::Siglip,
            model_path: Some(tiny_model(ModelType::Siglip).to_path_buf()),
            ..ModelSettings::default()
        };
        let mut model = load_model(&settings).unwrap();
        assert_eq!(model.info().task, "presence");
        let frames = frames();
        let refs: Vec<&Frame> = frames.iter().collect();
        let both = model.infer(&refs, &prompt("people, cars")).unwrap();
        let alone = model.infer(&refs, &prompt("people")).unwrap();
        let threshold = ModelType::Siglip.default_detect_threshold() as f64;
        for (b, a) in both.iter().zip(&alone) {
            // Adding a phrase does not move another phrase's probability (beyond the
            // rounding of a wider product).
            let (pb, pa) = (&b["phrases"][0], &a["phrases"][0]);
            assert_eq!(pb["phrase"], pa["phrase"]);
            let diff = pb["probability"].as_f64().unwrap() - pa["probability"].as_f64().unwrap();
            assert!(diff.abs() < 1e-5, "{pb} vs {pa}");
            let detected: Vec<&str> = b["phrases"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|p| p["probability"].as_f64().unwrap() > threshold)
                .map(|p| p["phrase"].as_str().unwrap())
                .collect();
            assert_eq!(b["detected"], json!(detected));
        }
        assert_ne!(both[0]["phrases"], both[1]["phrases"]);
    }

    #[test]
    fn probabilities_need_not_add_up_and_can_all_be_low() {
        let mut model = tiny();
        let frames = frames();
        let refs: Vec<&Frame> = frames.iter().collect();
        // A bias far below zero is SigLIP's way of saying "usually absent".
        model.logit_bias = -50.0;
        for o in model.infer(&refs, &prompt("people, cars, dogs")).unwrap() {
            assert_eq!(o["detected"], json!([]));
        }
        model.logit_bias = 50.0;
        for o in model.infer(&refs, &prompt("people, cars, dogs")).unwrap() {
            assert_eq!(o["detected"], json!(["people", "cars", "dogs"]));
        }
    }

    #[test]
    fn token_ids_are_padded_to_the_full_length() {
        let model = tiny();
        let ids = model.token_ids("a photo of people.").unwrap();
        assert_eq!(ids.len(), model.max_positions);
        let long = "people ".repeat(200);
        let ids = model.token_ids(&long).unwrap();
        assert_eq!(ids.len(), model.max_positions);
        assert_eq!(*ids.last().unwrap(), model.eos_id);
    }

    /// The bf16 image tower (and pooling head) stays within cosine 0.9999 of the f32 one.
    #[test]
    fn bf16_image_embeddings_stay_close_to_f32() {
        if crate::model::kernels::fused_linear::bf16_product().is_none() {
            eprintln!("skipped: no bf16 product in this build on this CPU");
            return;
        }
        use crate::model::DtypeChoice;
        use crate::model::testing::util::{SIGLIP_IMAGES, frames_of, lowest_row_cosine};
        let files = ModelFiles::from_dir(tiny_model(ModelType::Siglip)).unwrap();
        let frames = frames_of(SIGLIP_IMAGES);
        let refs: Vec<&Frame> = frames.iter().collect();
        let embed = |dtype| {
            let settings = ModelSettings {
                dtype,
                ..ModelSettings::default()
            };
            let model = SiglipModel::load(&files, Device::Cpu, &settings).unwrap();
            let pixels = model.preprocessor().batch(&refs, &Device::Cpu).unwrap();
            let rows = model.image_embeddings_from_pixels(&pixels).unwrap();
            (model.info().dtype.clone(), rows)
        };
        let (f32_name, f32_rows) = embed(DtypeChoice::F32);
        let (bf16_name, bf16_rows) = embed(DtypeChoice::Bf16);
        assert_eq!((f32_name.as_str(), bf16_name.as_str()), ("f32", "bf16"));
        let worst = lowest_row_cosine(&f32_rows, &bf16_rows);
        assert!(worst >= 0.9999, "cosine {worst}");
        assert_ne!(
            f32_rows.to_vec2::<f32>().unwrap(),
            bf16_rows.to_vec2::<f32>().unwrap()
        );
    }

    #[test]
    fn configs_this_backend_cannot_run_are_refused_with_the_reason() {
        let refused = |config: Value| SiglipSpec::from_config(&config).err().unwrap().to_string();
        let err = refused(json!({"text_config": {"projection_size": 512}}));
        assert!(
            err.contains("text_config.projection_size 512 differs from hidden_size"),
            "{err}"
        );
        let err = refused(json!({"vision_config": {"vision_use_head": false}}));
        assert!(err.contains("vision_use_head is false"), "{err}");
        let err = refused(json!({"vision_config": {"hidden_act": "relu"}}));
        assert!(
            err.contains("is not supported by the SigLIP image tower"),
            "{err}"
        );
        let err = refused(json!({"vision_config": {"patch_size": 15}}));
        assert!(
            err.contains("image_size 224 is not a multiple of patch_size 15"),
            "{err}"
        );
        let err = refused(json!({"text_config": {"hidden_size": "wide"}}));
        assert!(err.contains("config.json is not a SigLIP config"), "{err}");
        // A null counts as absent, and an absent section takes every default.
        let spec = SiglipSpec::from_config(&json!({"text_config": null})).unwrap();
        assert_eq!(spec.config.text_config.hidden_size, 768);
    }

    #[test]
    fn full_size_config_has_the_reference_shapes() {
        let spec = SiglipSpec::from_config(&json!({"vision_config": {"patch_size": 16}})).unwrap();
        let params: usize = spec
            .tensor_specs()
            .iter()
            .map(|s| s.shape.iter().product::<usize>())
            .sum();
        // transformers' SiglipModel in google/siglip-base-patch16-224's configuration.
        assert_eq!(params, 203_155_970);
    }
}
