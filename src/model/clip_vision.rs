//! CLIP's image tower, written for the per-frame path: the same arithmetic as transformers'
//! `CLIPVisionTransformer` (and the same tensor names), arranged to do less work per frame.
//!
//! - Patches are cut by a reshape and multiplied by the patch weights in one matrix product
//!   (the convolution's stride equals its kernel, so no im2col is needed).
//! - Query, key and value come from one fused projection, with the attention scale folded
//!   into the query weights once at load.
//! - Bias, residual and quick-GELU are folded into the linear layers' products
//!   ([`FusedLinear`]), and the softmax is one vectorised pass ([`cpu_kernels`]) on the CPU.
//! - For the pooled output ([`Module::forward`]), the last layer computes only the class
//!   token's row after attention: it is all the pooled output reads, so the other 49 rows
//!   of the last MLP would be thrown away. OWL-ViT reads every token
//!   ([`VisionTower::forward_tokens`]).

use super::cpu_kernels;
use super::fused_linear::{Activation, FusedLinear, MatmulPrecision};
use candle_core::{Module, Result, Tensor};
use candle_nn::{LayerNorm, VarBuilder};
use candle_transformers::models::clip::vision_model::ClipVisionConfig;

/// transformers' CLIP layer-norm epsilon (the backend refuses configs that change it).
const LAYER_NORM_EPS: f64 = 1e-5;

struct EncoderLayer {
    layer_norm1: LayerNorm,
    /// `[q * scale; k; v]` stacked: one matrix product for all three.
    qkv: FusedLinear,
    out_proj: FusedLinear,
    layer_norm2: LayerNorm,
    fc1: FusedLinear,
    fc2: FusedLinear,
    heads: usize,
}

impl EncoderLayer {
    fn new(vb: VarBuilder, c: &ClipVisionConfig, precision: MatmulPrecision) -> Result<Self> {
        let d = c.embed_dim;
        let attn = vb.pp("self_attn");
        let scale = ((d / c.num_attention_heads) as f64).powf(-0.5);
        let part = |name: &str| -> Result<(Tensor, Tensor)> {
            let vb = attn.pp(name);
            Ok((vb.get((d, d), "weight")?, vb.get(d, "bias")?))
        };
        let (qw, qb) = part("q_proj")?;
        let (kw, kb) = part("k_proj")?;
        let (vw, vb_) = part("v_proj")?;
        let qkv = FusedLinear::new_as(
            Tensor::cat(&[(qw * scale)?, kw, vw], 0)?,
            Tensor::cat(&[(qb * scale)?, kb, vb_], 0)?,
            precision,
        );
        let linear = |i, o, vb| FusedLinear::load_as(i, o, vb, precision);
        Ok(Self {
            layer_norm1: candle_nn::layer_norm(d, LAYER_NORM_EPS, vb.pp("layer_norm1"))?,
            qkv,
            out_proj: linear(d, d, attn.pp("out_proj"))?,
            layer_norm2: candle_nn::layer_norm(d, LAYER_NORM_EPS, vb.pp("layer_norm2"))?,
            fc1: linear(d, c.intermediate_size, vb.pp("mlp").pp("fc1"))?,
            fc2: linear(c.intermediate_size, d, vb.pp("mlp").pp("fc2"))?,
            heads: c.num_attention_heads,
        })
    }

    /// `x`: `(batch, tokens, dim)`. With `class_only`, returns `(batch, 1, dim)`: the class
    /// token's row, which attends to every token as usual.
    fn forward(&self, x: &Tensor, class_only: bool) -> Result<Tensor> {
        let (b, n, d) = x.dims3()?;
        let hd = d / self.heads;
        let qkv = self
            .qkv
            .forward(&self.layer_norm1.forward(x)?)?
            .reshape((b, n, 3, self.heads, hd))?
            .permute((2, 0, 3, 1, 4))?
            .contiguous()?;
        let (mut q, k, v) = (qkv.get(0)?, qkv.get(1)?, qkv.get(2)?);
        let (residual, rows) = if class_only {
            q = q.narrow(2, 0, 1)?.contiguous()?;
            (x.narrow(1, 0, 1)?, 1)
        } else {
            (x.clone(), n)
        };
        let weights = cpu_kernels::softmax_last_dim(&q.matmul(&k.t()?)?)?;
        let attended = weights.matmul(&v)?.transpose(1, 2)?.reshape((b, rows, d))?;
        let x = self.out_proj.forward_add(&attended, &residual)?;
        let h =
            self.fc1
                .forward_with(&self.layer_norm2.forward(&x)?, None, Activation::QuickGelu)?;
        self.fc2.forward_add(&h, &x)
    }
}

/// The name of the layer norm before the encoder: CLIP checkpoints spell it `pre_layrnorm`,
/// OWL-ViT checkpoints `pre_layernorm`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PreNormName {
    Clip,
    OwlVit,
}

impl PreNormName {
    pub fn as_str(self) -> &'static str {
        match self {
            PreNormName::Clip => "pre_layrnorm",
            PreNormName::OwlVit => "pre_layernorm",
        }
    }
}

/// The image tower up to the pooled, post-layer-normed class token: `(batch, embed_dim)`.
pub struct VisionTower {
    /// Patch weights as a `(embed_dim, channels * patch * patch)` matrix.
    patch_weight: Tensor,
    /// Class embedding plus its position, `(1, 1, dim)`; and the patches' positions,
    /// `(1, patches, dim)`.
    class_token: Tensor,
    patch_positions: Tensor,
    pre_layer_norm: LayerNorm,
    layers: Vec<EncoderLayer>,
    post_layer_norm: LayerNorm,
    patch: usize,
    grid: usize,
}

impl VisionTower {
    /// Reads the tower from `vb` at `vision_model`'s level; its linear layers multiply in
    /// `precision`.
    pub fn new(
        vb: VarBuilder,
        c: &ClipVisionConfig,
        pre_norm: PreNormName,
        precision: MatmulPrecision,
    ) -> Result<Self> {
        let d = c.embed_dim;
        let grid = c.image_size / c.patch_size;
        let emb = vb.pp("embeddings");
        let patch_weight = emb
            .get(
                (d, c.num_channels, c.patch_size, c.patch_size),
                "patch_embedding.weight",
            )?
            .reshape((d, ()))?;
        let positions = emb.get((grid * grid + 1, d), "position_embedding.weight")?;
        let class_token =
            (emb.get(d, "class_embedding")? + positions.get(0)?)?.reshape((1, 1, d))?;
        let patch_positions = positions.narrow(0, 1, grid * grid)?.unsqueeze(0)?;
        let encoder = vb.pp("encoder").pp("layers");
        let layers = (0..c.num_hidden_layers)
            .map(|i| EncoderLayer::new(encoder.pp(i), c, precision))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            patch_weight,
            class_token,
            patch_positions,
            pre_layer_norm: candle_nn::layer_norm(d, LAYER_NORM_EPS, vb.pp(pre_norm.as_str()))?,
            layers,
            post_layer_norm: candle_nn::layer_norm(d, LAYER_NORM_EPS, vb.pp("post_layernorm"))?,
            patch: c.patch_size,
            grid,
        })
    }

    /// Cuts `(batch, channels, side, side)` pixels into rows of flattened patches,
    /// `(batch * patches, channels * patch * patch)`, in the convolution's weight order.
    fn patches(&self, pixels: &Tensor) -> Result<Tensor> {
        let (b, c, _, _) = pixels.dims4()?;
        let (g, p) = (self.grid, self.patch);
        pixels
            .reshape((b, c, g, p, g, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((b * g * g, c * p * p))
    }
}

impl VisionTower {
    /// The encoder's input: class token and patches with their positions, layer-normed,
    /// `(batch, 1 + patches, dim)`.
    fn embed(&self, pixels: &Tensor) -> Result<Tensor> {
        let b = pixels.dim(0)?;
        let d = self.patch_weight.dim(0)?;
        let patches = self
            .patches(pixels)?
            .matmul(&self.patch_weight.t()?)?
            .reshape((b, self.grid * self.grid, d))?
            .broadcast_add(&self.patch_positions)?;
        let class = self.class_token.broadcast_as((b, 1, d))?;
        self.pre_layer_norm
            .forward(&Tensor::cat(&[&class, &patches], 1)?)
    }

    /// Every token of the last layer, post-layer-normed: `(batch, 1 + patches, dim)`, the
    /// class token first, then the patches row by row.
    pub fn forward_tokens(&self, pixels: &Tensor) -> Result<Tensor> {
        let mut x = self.embed(pixels)?;
        for layer in &self.layers {
            x = layer.forward(&x, false)?;
        }
        self.post_layer_norm.forward(&x)
    }

    /// Patches per side.
    pub fn grid(&self) -> usize {
        self.grid
    }
}

impl Module for VisionTower {
    fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let mut x = self.embed(pixels)?;
        let last = self.layers.len().saturating_sub(1);
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(&x, i == last)?;
        }
        self.post_layer_norm
            .forward(&x.narrow(1, 0, 1)?.squeeze(1)?)
    }
}
