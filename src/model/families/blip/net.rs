//! BLIP's vision tower and caption decoder, built from candle-nn layers and fused linear
//! layers ([`FusedLinear`]) on the same checkpoint names as transformers'
//! `BlipForConditionalGeneration`.
//!
//! candle-transformers' BLIP falls short for serving: its decoder recomputes the
//! cross-attention keys and values of all image tokens at every generated token (at full
//! size that about doubles the work per frame), its text embeddings do not broadcast over a
//! batch, and its constructor always builds a second, unused copy of the decoder. Here the
//! image keys and values are projected once per call and kept in [`DecodeState`], and all
//! frames of a call decode as one batch.

use crate::model::kernels::cpu_kernels;
use crate::model::kernels::fused_linear::{self, FusedLinear};
use candle_core::{D, DType, Device, Module, Result, Tensor};
use candle_nn::{Activation, Conv2d, Conv2dConfig, Embedding, LayerNorm, VarBuilder};
use candle_transformers::models::{blip, blip_text};

/// Splits `(batch, len, heads * dim)` into `(batch, heads, len, dim)`.
fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, len, hidden) = x.dims3()?;
    x.reshape((b, len, heads, hidden / heads))?
        .transpose(1, 2)?
        .contiguous()
}

/// Joins `(batch, heads, len, dim)` back into `(batch, len, heads * dim)`.
fn join_heads(x: &Tensor) -> Result<Tensor> {
    let (b, heads, len, dim) = x.dims4()?;
    x.transpose(1, 2)?.reshape((b, len, heads * dim))
}

/// Dot-product attention for queries that already carry the `1 / sqrt(head_dim)` scale.
fn attend_prescaled(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    cpu_kernels::softmax_last_dim(&q.matmul(&k.t()?)?)?.matmul(v)
}

/// Scaled dot-product attention with an optional additive mask.
fn attend(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    let scale = 1.0 / (q.dim(D::Minus1)? as f64).sqrt();
    let scores = (q.matmul(&k.t()?)? * scale)?;
    let scores = match mask {
        Some(m) => scores.broadcast_add(m)?,
        None => scores,
    };
    cpu_kernels::softmax_last_dim(&scores)?.matmul(v)
}

/// A configured activation, folded into the linear layer before it where it can be.
#[derive(Clone, Copy)]
struct Act(Activation);

impl Act {
    /// `act(layer(x))`.
    fn after(self, layer: &FusedLinear, x: &Tensor) -> Result<Tensor> {
        match fused_linear::Activation::fused(self.0) {
            Some(fused) => layer.forward_with(x, None, fused),
            None => layer.forward(x)?.apply(&self.0),
        }
    }
}

struct VisionLayer {
    norm1: LayerNorm,
    /// The checkpoint's fused projection with the attention scale folded into its query
    /// third, so the `(heads, tokens, tokens)` scores need no extra pass per layer.
    qkv: FusedLinear,
    projection: FusedLinear,
    norm2: LayerNorm,
    fc1: FusedLinear,
    fc2: FusedLinear,
    act: Act,
    heads: usize,
}

impl VisionLayer {
    fn new(cfg: &blip::VisionConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.hidden_size;
        let eps = cfg.layer_norm_eps;
        let scale = ((d / cfg.num_attention_heads) as f64).powf(-0.5);
        let fused = vb.pp("self_attn.qkv");
        let (weight, bias) = (fused.get((3 * d, d), "weight")?, fused.get(3 * d, "bias")?);
        let scale_query = |t: &Tensor| -> Result<Tensor> {
            Tensor::cat(&[(t.narrow(0, 0, d)? * scale)?, t.narrow(0, d, 2 * d)?], 0)
        };
        Ok(Self {
            norm1: candle_nn::layer_norm(d, eps, vb.pp("layer_norm1"))?,
            qkv: FusedLinear::new(scale_query(&weight)?, scale_query(&bias)?),
            projection: FusedLinear::load(d, d, vb.pp("self_attn.projection"))?,
            norm2: candle_nn::layer_norm(d, eps, vb.pp("layer_norm2"))?,
            fc1: FusedLinear::load(d, cfg.intermediate_size, vb.pp("mlp.fc1"))?,
            fc2: FusedLinear::load(cfg.intermediate_size, d, vb.pp("mlp.fc2"))?,
            act: Act(cfg.hidden_act),
            heads: cfg.num_attention_heads,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, n, d) = x.dims3()?;
        let qkv = self
            .norm1
            .forward(x)?
            .apply(&self.qkv)?
            .reshape((b, n, 3, self.heads, d / self.heads))?
            .permute((2, 0, 3, 1, 4))?
            .contiguous()?;
        let (q, k, v) = (qkv.get(0)?, qkv.get(1)?, qkv.get(2)?);
        let attended = join_heads(&attend_prescaled(&q, &k, &v)?)?;
        let x = self.projection.forward_add(&attended, x)?;
        let h = self.act.after(&self.fc1, &self.norm2.forward(&x)?)?;
        self.fc2.forward_add(&h, &x)
    }
}

/// The ViT image tower; returns every token's final hidden state, as the decoder reads it.
pub struct VisionTower {
    class_embedding: Tensor,
    patch_embedding: Conv2d,
    position_embedding: Tensor,
    layers: Vec<VisionLayer>,
    post_layernorm: LayerNorm,
}

impl VisionTower {
    pub fn new(cfg: &blip::VisionConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.hidden_size;
        let positions = (cfg.image_size / cfg.patch_size).pow(2) + 1;
        let e = vb.pp("embeddings");
        let conv = Conv2dConfig {
            stride: cfg.patch_size,
            ..Default::default()
        };
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| VisionLayer::new(cfg, vb.pp(format!("encoder.layers.{i}"))))
            .collect::<Result<_>>()?;
        Ok(Self {
            class_embedding: e.get((1, 1, d), "class_embedding")?,
            patch_embedding: candle_nn::conv2d(
                3,
                d,
                cfg.patch_size,
                conv,
                e.pp("patch_embedding"),
            )?,
            position_embedding: e.get((1, positions, d), "position_embedding")?,
            layers,
            post_layernorm: candle_nn::layer_norm(d, cfg.layer_norm_eps, vb.pp("post_layernorm"))?,
        })
    }

    /// `(batch, 3, side, side)` pixels to `(batch, patches + 1, hidden)` features.
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let b = pixels.dim(0)?;
        let patches = self
            .patch_embedding
            .forward(pixels)?
            .flatten_from(2)?
            .transpose(1, 2)?;
        let d = self.class_embedding.dim(D::Minus1)?;
        let class = self.class_embedding.broadcast_as((b, 1, d))?;
        let mut x = Tensor::cat(&[&class, &patches], 1)?.broadcast_add(&self.position_embedding)?;
        for layer in &self.layers {
            x = layer.forward(&x)?;
        }
        self.post_layernorm.forward(&x)
    }
}

/// One BERT-style attention block: attention, output projection, residual, LayerNorm.
struct AttentionBlock {
    query: FusedLinear,
    key: FusedLinear,
    value: FusedLinear,
    dense: FusedLinear,
    norm: LayerNorm,
}

impl AttentionBlock {
    fn new(cfg: &blip_text::Config, kv_in: usize, vb: VarBuilder) -> Result<Self> {
        let h = cfg.hidden_size;
        Ok(Self {
            query: FusedLinear::load(h, h, vb.pp("self.query"))?,
            key: FusedLinear::load(kv_in, h, vb.pp("self.key"))?,
            value: FusedLinear::load(kv_in, h, vb.pp("self.value"))?,
            dense: FusedLinear::load(h, h, vb.pp("output.dense"))?,
            norm: candle_nn::layer_norm(h, cfg.layer_norm_eps, vb.pp("output.LayerNorm"))?,
        })
    }

    fn finish(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        self.norm
            .forward(&self.dense.forward_add(&join_heads(context)?, x)?)
    }
}

struct DecoderLayer {
    self_attn: AttentionBlock,
    cross_attn: AttentionBlock,
    intermediate: FusedLinear,
    output: FusedLinear,
    output_norm: LayerNorm,
}

/// Keys and values kept between decoding steps.
pub struct DecodeState {
    /// Per layer: self-attention keys and values of the tokens so far.
    self_kv: Vec<Option<(Tensor, Tensor)>>,
    /// Per layer: cross-attention keys and values of the image tokens, computed once.
    cross_kv: Vec<(Tensor, Tensor)>,
    /// How many tokens have been fed.
    position: usize,
}

/// The caption decoder (`text_decoder.*`): BERT layers with causal self-attention and
/// cross-attention to the image, and the language-model head.
pub struct TextDecoder {
    word_embeddings: Embedding,
    position_embeddings: Embedding,
    embeddings_norm: LayerNorm,
    layers: Vec<DecoderLayer>,
    transform: FusedLinear,
    transform_norm: LayerNorm,
    act: Act,
    output_weight: Tensor,
    output_bias: Tensor,
    heads: usize,
}

impl TextDecoder {
    /// `output_weight` is `text_decoder.cls.predictions.decoder.weight` when the checkpoint
    /// has it, else the word embeddings it is tied to.
    pub fn new(cfg: &blip_text::Config, tied: bool, vb: VarBuilder) -> Result<Self> {
        let h = cfg.hidden_size;
        let eps = cfg.layer_norm_eps;
        let e = vb.pp("bert.embeddings");
        let word_embeddings = candle_nn::embedding(cfg.vocab_size, h, e.pp("word_embeddings"))?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let l = vb.pp(format!("bert.encoder.layer.{i}"));
                Ok(DecoderLayer {
                    self_attn: AttentionBlock::new(cfg, h, l.pp("attention"))?,
                    cross_attn: AttentionBlock::new(
                        cfg,
                        cfg.encoder_hidden_size,
                        l.pp("crossattention"),
                    )?,
                    intermediate: FusedLinear::load(
                        h,
                        cfg.intermediate_size,
                        l.pp("intermediate.dense"),
                    )?,
                    output: FusedLinear::load(cfg.intermediate_size, h, l.pp("output.dense"))?,
                    output_norm: candle_nn::layer_norm(h, eps, l.pp("output.LayerNorm"))?,
                })
            })
            .collect::<Result<_>>()?;
        let p = vb.pp("cls.predictions");
        let output_weight = if tied {
            word_embeddings.embeddings().clone()
        } else {
            p.get((cfg.vocab_size, h), "decoder.weight")?
        };
        Ok(Self {
            position_embeddings: candle_nn::embedding(
                cfg.max_position_embeddings,
                h,
                e.pp("position_embeddings"),
            )?,
            embeddings_norm: candle_nn::layer_norm(h, eps, e.pp("LayerNorm"))?,
            word_embeddings,
            layers,
            transform: FusedLinear::load(h, h, p.pp("transform.dense"))?,
            transform_norm: candle_nn::layer_norm(h, eps, p.pp("transform.LayerNorm"))?,
            act: Act(cfg.hidden_act),
            output_weight,
            output_bias: p.get(cfg.vocab_size, "bias")?,
            heads: cfg.num_attention_heads,
        })
    }

    /// Projects the image features into every layer's cross-attention keys and values.
    pub fn start(&self, image: &Tensor) -> Result<DecodeState> {
        let cross_kv = self
            .layers
            .iter()
            .map(|l| {
                let k = split_heads(&l.cross_attn.key.forward(image)?, self.heads)?;
                let v = split_heads(&l.cross_attn.value.forward(image)?, self.heads)?;
                Ok((k, v))
            })
            .collect::<Result<_>>()?;
        Ok(DecodeState {
            self_kv: vec![None; self.layers.len()],
            cross_kv,
            position: 0,
        })
    }

    /// Feeds `ids` `(batch, len)` after the tokens already in `state`; returns the logits
    /// of the last position, `(batch, vocab)`.
    pub fn step(&self, ids: &Tensor, state: &mut DecodeState) -> Result<Tensor> {
        let (_, len) = ids.dims2()?;
        let device = ids.device();
        let past = state.position;
        let positions = Tensor::arange(past as u32, (past + len) as u32, device)?;
        let x = self
            .word_embeddings
            .forward(ids)?
            .broadcast_add(&self.position_embeddings.forward(&positions)?.unsqueeze(0)?)?;
        let mut x = self.embeddings_norm.forward(&x)?;
        let mask = causal_mask(len, past, device)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let a = &layer.self_attn;
            let q = split_heads(&a.query.forward(&x)?, self.heads)?;
            let mut k = split_heads(&a.key.forward(&x)?, self.heads)?;
            let mut v = split_heads(&a.value.forward(&x)?, self.heads)?;
            if let Some((pk, pv)) = &state.self_kv[i] {
                k = Tensor::cat(&[pk, &k], 2)?;
                v = Tensor::cat(&[pv, &v], 2)?;
            }
            let context = attend(&q, &k, &v, mask.as_ref())?;
            state.self_kv[i] = Some((k, v));
            x = a.finish(&x, &context)?;

            let c = &layer.cross_attn;
            let q = split_heads(&c.query.forward(&x)?, self.heads)?;
            let (k, v) = &state.cross_kv[i];
            x = c.finish(&x, &attend(&q, k, v, None)?)?;

            let ff = self.act.after(&layer.intermediate, &x)?;
            x = layer
                .output_norm
                .forward(&layer.output.forward_add(&ff, &x)?)?;
        }
        state.position += len;
        // Contiguous, because candle's MKL matmul refuses a strided left operand.
        let last = x.narrow(1, len - 1, 1)?.squeeze(1)?.contiguous()?;
        let h = self
            .transform_norm
            .forward(&self.act.after(&self.transform, &last)?)?;
        h.matmul(&self.output_weight.t()?)?
            .broadcast_add(&self.output_bias)
    }
}

/// The additive causal mask for `len` new tokens after `past` cached ones, or `None` for
/// a single token (it may see everything).
fn causal_mask(len: usize, past: usize, device: &Device) -> Result<Option<Tensor>> {
    if len == 1 {
        return Ok(None);
    }
    let mask: Vec<f32> = (0..len)
        .flat_map(|i| {
            (0..past + len).map(move |j| if j > past + i { f32::NEG_INFINITY } else { 0.0 })
        })
        .collect();
    Tensor::from_vec(mask, (len, past + len), device)?
        .to_dtype(DType::F32)
        .map(Some)
}
