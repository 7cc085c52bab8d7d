//! The ViT image tower of CLIP, OWL-ViT and SigLIP, written for the per-frame path: the same
//! arithmetic as transformers' `CLIPVisionTransformer` and `SiglipVisionTransformer` (and
//! the same tensor names), arranged to do less work per frame.
//!
//! - Patches are cut by a reshape and multiplied by the patch weights in one matrix product
//!   (the convolution's stride equals its kernel, so no im2col is needed).
//! - Query, key and value come from one fused projection, with the attention scale folded
//!   into the query weights once at load.
//! - Bias, residual and the GELU are folded into the linear layers' products
//!   ([`FusedLinear`]), the softmax is one vectorised pass ([`cpu_kernels`]) on the CPU,
//!   and attention's products over every image and head are one call ([`batched_matmul`]).
//! - For CLIP's pooled output ([`Module::forward`]), the last layer computes only the class
//!   token's row after attention: it is all the pooled output reads, so the other 49 rows
//!   of the last MLP would be thrown away. OWL-ViT and SigLIP's pooling head read every
//!   token ([`VisionTower::forward_tokens`]).

use crate::model::kernels::batched_matmul;
use crate::model::kernels::fused_linear::{Activation, FusedLinear, MatmulPrecision};
use candle_core::{Module, Result, Tensor};
use candle_nn::{LayerNorm, VarBuilder};
use candle_transformers::models::clip::vision_model::ClipVisionConfig;
use candle_transformers::models::siglip::VisionConfig as SiglipVisionConfig;

/// transformers' CLIP layer-norm epsilon (the backend refuses configs that change it).
const CLIP_LAYER_NORM_EPS: f64 = 1e-5;

/// The sizes and the activation of one tower's encoder layers.
#[derive(Clone, Copy, Debug)]
struct LayerShape {
    dim: usize,
    heads: usize,
    intermediate: usize,
    layer_norm_eps: f64,
    activation: Activation,
}

struct EncoderLayer {
    layer_norm1: LayerNorm,
    /// `[q * scale; k; v]` stacked: one matrix product for all three.
    qkv: FusedLinear,
    out_proj: FusedLinear,
    layer_norm2: LayerNorm,
    fc1: FusedLinear,
    fc2: FusedLinear,
    heads: usize,
    activation: Activation,
    /// Attention's products run in the layers' precision, as autocast runs them.
    precision: MatmulPrecision,
}

impl EncoderLayer {
    fn new(vb: VarBuilder, shape: LayerShape, precision: MatmulPrecision) -> Result<Self> {
        let d = shape.dim;
        let eps = shape.layer_norm_eps;
        let attn = vb.pp("self_attn");
        let scale = ((d / shape.heads) as f64).powf(-0.5);
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
            layer_norm1: candle_nn::layer_norm(d, eps, vb.pp("layer_norm1"))?,
            qkv,
            out_proj: linear(d, d, attn.pp("out_proj"))?,
            layer_norm2: candle_nn::layer_norm(d, eps, vb.pp("layer_norm2"))?,
            fc1: linear(d, shape.intermediate, vb.pp("mlp").pp("fc1"))?,
            fc2: linear(shape.intermediate, d, vb.pp("mlp").pp("fc2"))?,
            heads: shape.heads,
            activation: shape.activation,
            precision,
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
        let scores = batched_matmul::matmul_t_as(&q, &k, self.precision)?;
        let attended = batched_matmul::softmax_matmul_as(&scores, &v, self.precision)?
            .transpose(1, 2)?
            .reshape((b, rows, d))?;
        let x = self.out_proj.forward_add(&attended, &residual)?;
        let h = self
            .fc1
            .forward_with(&self.layer_norm2.forward(&x)?, None, self.activation)?;
        self.fc2.forward_add(&h, &x)
    }
}

/// The patch convolution (`embeddings.patch_embedding.weight`) as a linear layer over
/// flattened patches, with a zero bias.
fn patch_embedding(
    emb: &VarBuilder,
    dim: usize,
    channels: usize,
    patch: usize,
    precision: MatmulPrecision,
) -> Result<FusedLinear> {
    let weight = emb
        .get((dim, channels, patch, patch), "patch_embedding.weight")?
        .reshape((dim, ()))?;
    let bias = Tensor::zeros(dim, weight.dtype(), weight.device())?;
    Ok(FusedLinear::new_as(weight, bias, precision))
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

/// The image tower: patches and positions, the encoder layers and the last layer norm.
/// CLIP's and OWL-ViT's put a class token first and layer-norm the embeddings; SigLIP's
/// patch embedding has a bias and no class token.
pub struct VisionTower {
    /// The patch convolution as a linear layer over flattened patches (no bias: SigLIP's is
    /// in `patch_positions`), in the tower's precision, as autocast runs the convolution.
    patch_embedding: FusedLinear,
    dim: usize,
    /// The patches' positions, `(1, patches, dim)`; SigLIP's patch bias is added in.
    patch_positions: Tensor,
    /// Class embedding plus its position, `(1, 1, dim)` (CLIP and OWL-ViT).
    class_token: Option<Tensor>,
    pre_layer_norm: Option<LayerNorm>,
    layers: Vec<EncoderLayer>,
    post_layer_norm: LayerNorm,
    patch: usize,
    grid: usize,
}

impl VisionTower {
    /// Reads CLIP's or OWL-ViT's tower from `vb` at `vision_model`'s level; its linear layers
    /// multiply in `precision`.
    pub fn new(
        vb: VarBuilder,
        c: &ClipVisionConfig,
        pre_norm: PreNormName,
        precision: MatmulPrecision,
    ) -> Result<Self> {
        let d = c.embed_dim;
        let grid = c.image_size / c.patch_size;
        let emb = vb.pp("embeddings");
        let patch_embedding = patch_embedding(&emb, d, c.num_channels, c.patch_size, precision)?;
        let positions = emb.get((grid * grid + 1, d), "position_embedding.weight")?;
        let class_token =
            (emb.get(d, "class_embedding")? + positions.get(0)?)?.reshape((1, 1, d))?;
        let patch_positions = positions.narrow(0, 1, grid * grid)?.unsqueeze(0)?;
        let shape = LayerShape {
            dim: d,
            heads: c.num_attention_heads,
            intermediate: c.intermediate_size,
            layer_norm_eps: CLIP_LAYER_NORM_EPS,
            activation: Activation::QuickGelu,
        };
        let eps = CLIP_LAYER_NORM_EPS;
        Ok(Self {
            patch_embedding,
            dim: d,
            patch_positions,
            class_token: Some(class_token),
            pre_layer_norm: Some(candle_nn::layer_norm(d, eps, vb.pp(pre_norm.as_str()))?),
            layers: Self::layers(&vb, c.num_hidden_layers, shape, precision)?,
            post_layer_norm: candle_nn::layer_norm(d, eps, vb.pp("post_layernorm"))?,
            patch: c.patch_size,
            grid,
        })
    }

    /// Reads SigLIP's tower (without its pooling head) from `vb` at `vision_model`'s level.
    pub fn siglip(
        vb: VarBuilder,
        c: &SiglipVisionConfig,
        precision: MatmulPrecision,
    ) -> Result<Self> {
        let d = c.hidden_size;
        let grid = c.image_size / c.patch_size;
        let activation = Activation::fused(c.hidden_act).ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "SigLIP's hidden_act {:?} has no fused form",
                c.hidden_act
            ))
        })?;
        let emb = vb.pp("embeddings");
        let patch_embedding = patch_embedding(&emb, d, c.num_channels, c.patch_size, precision)?;
        let patch_positions = emb
            .get((grid * grid, d), "position_embedding.weight")?
            .broadcast_add(&emb.get(d, "patch_embedding.bias")?)?
            .unsqueeze(0)?;
        let shape = LayerShape {
            dim: d,
            heads: c.num_attention_heads,
            intermediate: c.intermediate_size,
            layer_norm_eps: c.layer_norm_eps,
            activation,
        };
        Ok(Self {
            patch_embedding,
            dim: d,
            patch_positions,
            class_token: None,
            pre_layer_norm: None,
            layers: Self::layers(&vb, c.num_hidden_layers, shape, precision)?,
            post_layer_norm: candle_nn::layer_norm(d, c.layer_norm_eps, vb.pp("post_layernorm"))?,
            patch: c.patch_size,
            grid,
        })
    }

    fn layers(
        vb: &VarBuilder,
        count: usize,
        shape: LayerShape,
        precision: MatmulPrecision,
    ) -> Result<Vec<EncoderLayer>> {
        let encoder = vb.pp("encoder").pp("layers");
        (0..count)
            .map(|i| EncoderLayer::new(encoder.pp(i), shape, precision))
            .collect()
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

    /// The encoder's input: the class token (where the tower has one) and the patches with
    /// their positions, layer-normed where the tower does: `(batch, tokens, dim)`.
    fn embed(&self, pixels: &Tensor) -> Result<Tensor> {
        let b = pixels.dim(0)?;
        let d = self.dim;
        let patches = self
            .patch_embedding
            .forward(&self.patches(pixels)?)?
            .reshape((b, self.grid * self.grid, d))?
            .broadcast_add(&self.patch_positions)?;
        let tokens = match &self.class_token {
            Some(class) => Tensor::cat(&[&class.broadcast_as((b, 1, d))?, &patches], 1)?,
            None => patches,
        };
        match &self.pre_layer_norm {
            Some(norm) => norm.forward(&tokens),
            None => Ok(tokens),
        }
    }

    /// Every token of the last layer, post-layer-normed: `(batch, tokens, dim)`, the class
    /// token first (where the tower has one), then the patches row by row.
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

/// The pooled output, `(batch, embed_dim)`: the post-layer-normed class token. Only for a
/// tower with a class token (CLIP's); SigLIP pools with its own head.
impl Module for VisionTower {
    fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        if self.class_token.is_none() {
            candle_core::bail!("this image tower has no class token to pool")
        }
        let mut x = self.embed(pixels)?;
        let last = self.layers.len().saturating_sub(1);
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(&x, i == last)?;
        }
        self.post_layer_norm
            .forward(&x.narrow(1, 0, 1)?.squeeze(1)?)
    }
}
