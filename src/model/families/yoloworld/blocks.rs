//! The detector's building blocks, as Ultralytics defines them: `Conv` (a convolution with
//! its batch norm folded in at load, and SiLU), `C2f`, `SPPF`, and the text-guided `C2fAttn`
//! with its max-sigmoid attention, whose guide (a linear map of the prompt's text
//! embeddings) is computed once per prompt by [`C2fAttn::guide`].

use crate::model::kernels::conv::{Conv2d, ConvActivation};
use crate::model::kernels::fused_linear::MatmulPrecision;
use candle_core::{D, Module, Result, Tensor};
use candle_nn::{Linear, VarBuilder};

/// What every `Conv` of one detector is built with: the batch norms' epsilon, and the
/// precision of the convolutions' products (`DTYPE`).
#[derive(Clone, Copy, Debug)]
pub struct ConvSettings {
    pub eps: f64,
    pub precision: MatmulPrecision,
}

/// A batch norm's per-channel `(scale, shift)`: `y = x * scale + shift`.
pub fn batch_norm_affine(vb: &VarBuilder, c: usize, eps: f64) -> Result<(Tensor, Tensor)> {
    let gamma = vb.get(c, "weight")?;
    let beta = vb.get(c, "bias")?;
    let mean = vb.get(c, "running_mean")?;
    let var = vb.get(c, "running_var")?;
    let scale = gamma.broadcast_div(&(var + eps)?.sqrt()?)?;
    let shift = (beta - mean.mul(&scale)?)?;
    Ok((scale, shift))
}

/// Ultralytics' `Conv` at `vb` (`conv.weight` and `bn.*`), its batch norm folded into the
/// convolution's weight and bias.
pub fn conv_bn(
    vb: &VarBuilder,
    (c1, c2, k, stride): (usize, usize, usize, usize),
    conv: ConvSettings,
    activation: ConvActivation,
) -> Result<Conv2d> {
    let (weight, shift) = folded(vb, (c1, c2, k), conv.eps)?;
    Conv2d::new_as(
        weight,
        Some(shift),
        stride,
        k / 2,
        activation,
        conv.precision,
    )
}

/// A `Conv`'s weight `[c2, c1, k, k]` and bias with its batch norm folded in.
fn folded(
    vb: &VarBuilder,
    (c1, c2, k): (usize, usize, usize),
    eps: f64,
) -> Result<(Tensor, Tensor)> {
    let weight = vb.get((c2, c1, k, k), "conv.weight")?;
    let (scale, shift) = batch_norm_affine(&vb.pp("bn"), c2, eps)?;
    Ok((weight.broadcast_mul(&scale.reshape((c2, 1, 1, 1))?)?, shift))
}

/// A 1x1 `Conv` with SiLU whose input is a concatenation of parts of `block` channels (or
/// multiples of it), run by [`Conv2d::forward_cat`] without concatenating them.
fn pointwise_silu_in_blocks(
    vb: &VarBuilder,
    (c1, c2): (usize, usize),
    block: usize,
    conv: ConvSettings,
) -> Result<Conv2d> {
    let (weight, shift) = folded(vb, (c1, c2, 1), conv.eps)?;
    Conv2d::pointwise_in_blocks(
        weight,
        Some(shift),
        ConvActivation::Silu,
        conv.precision,
        block,
    )
}

/// A `Conv` with SiLU (Ultralytics' default activation).
pub fn conv_silu(
    vb: &VarBuilder,
    c1: usize,
    c2: usize,
    k: usize,
    s: usize,
    conv: ConvSettings,
) -> Result<Conv2d> {
    conv_bn(vb, (c1, c2, k, s), conv, ConvActivation::Silu)
}

/// `Bottleneck` with two 3x3 convolutions, and a shortcut when the block has one.
struct Bottleneck {
    cv1: Conv2d,
    cv2: Conv2d,
    shortcut: bool,
}

impl Bottleneck {
    fn new(vb: &VarBuilder, c: usize, shortcut: bool, conv: ConvSettings) -> Result<Self> {
        Ok(Self {
            cv1: conv_silu(&vb.pp("cv1"), c, c, 3, 1, conv)?,
            cv2: conv_silu(&vb.pp("cv2"), c, c, 3, 1, conv)?,
            shortcut,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.cv1.forward(x)?;
        if self.shortcut {
            // The shortcut added in the convolution's epilogue, not in a pass of its own.
            self.cv2.forward_add(&y, x)
        } else {
            self.cv2.forward(&y)
        }
    }
}

/// The CSP part `C2f` and `C2fAttn` share: split, bottlenecks, and the parts to concatenate
/// (which `cv2` reads in place, in blocks of the hidden width).
struct Csp {
    cv1: Conv2d,
    cv2: Conv2d,
    m: Vec<Bottleneck>,
    hidden: usize,
}

impl Csp {
    /// `cv1` reads parts of `block` channels (see [`pointwise_silu_in_blocks`]).
    fn new(
        vb: &VarBuilder,
        (c1, c2, n): (usize, usize, usize),
        (parts, block): (usize, usize),
        shortcut: bool,
        conv: ConvSettings,
    ) -> Result<Self> {
        let c = c2 / 2;
        let m = (0..n)
            .map(|j| Bottleneck::new(&vb.pp(format!("m.{j}")), c, shortcut, conv))
            .collect::<Result<_>>()?;
        Ok(Self {
            cv1: pointwise_silu_in_blocks(&vb.pp("cv1"), (c1, 2 * c), block, conv)?,
            cv2: pointwise_silu_in_blocks(&vb.pp("cv2"), ((parts + n) * c, c2), c, conv)?,
            m,
            hidden: c,
        })
    }

    /// The parts before the last convolution: `cv1`'s output (both halves), then each
    /// bottleneck's output; and the last of those halves and outputs, which the attention
    /// reads. `x` as the parts of a concatenation.
    fn parts(&self, x: &[Tensor]) -> Result<(Vec<Tensor>, Tensor)> {
        let y = self.cv1.forward_cat(x)?;
        // Read in place by the bottleneck: each image's half is contiguous.
        let mut last = y.narrow(1, self.hidden, self.hidden)?;
        let mut parts = vec![y];
        for m in &self.m {
            last = m.forward(&last)?;
            parts.push(last.clone());
        }
        Ok((parts, last))
    }
}

/// `C2f` (the backbone's, with shortcuts).
pub struct C2f(Csp);

impl C2f {
    pub fn new(
        vb: &VarBuilder,
        c1: usize,
        c2: usize,
        n: usize,
        conv: ConvSettings,
    ) -> Result<Self> {
        Ok(Self(Csp::new(vb, (c1, c2, n), (2, c1), true, conv)?))
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (parts, _) = self.0.parts(std::slice::from_ref(x))?;
        self.0.cv2.forward_cat(&parts)
    }
}

/// `SPPF`: three chained 5x5 max pools (stride 1, padded), their outputs concatenated.
pub struct Sppf {
    cv1: Conv2d,
    cv2: Conv2d,
}

impl Sppf {
    pub fn new(vb: &VarBuilder, c1: usize, c2: usize, conv: ConvSettings) -> Result<Self> {
        let hidden = c1 / 2;
        Ok(Self {
            cv1: conv_silu(&vb.pp("cv1"), c1, hidden, 1, 1, conv)?,
            cv2: pointwise_silu_in_blocks(&vb.pp("cv2"), (hidden * 4, c2), hidden, conv)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut parts = vec![self.cv1.forward(x)?];
        for _ in 0..3 {
            let next = max_pool_5(&parts[parts.len() - 1])?;
            parts.push(next);
        }
        self.cv2.forward_cat(&parts)
    }
}

/// The greatest common divisor.
fn gcd(a: usize, b: usize) -> usize {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// A 5x5 max pool with stride 1 and 2 of padding, as two 1-D passes. PyTorch pads with
/// minus infinity; repeating the edge value instead gives the same maxima, since the edge is
/// inside every window that reaches past it.
fn max_pool_5(x: &Tensor) -> Result<Tensor> {
    let pass = |x: &Tensor, dim: usize| -> Result<Tensor> {
        let len = x.dim(dim)?;
        let padded = x.pad_with_same(dim, 2, 2)?;
        let mut best = padded.narrow(dim, 0, len)?;
        for offset in 1..5 {
            best = best.maximum(&padded.narrow(dim, offset, len)?)?;
        }
        Ok(best)
    };
    pass(&pass(x, 3)?, 2)
}

/// `C2fAttn`: `C2f` without shortcuts whose last bottleneck output also goes through the
/// max-sigmoid attention guided by the prompt's text embeddings. Its input is the neck's
/// concatenation of two levels, one of `c2` channels and one of `c1 - c2`, which it reads
/// as they are, in blocks of their common divisor.
pub struct C2fAttn {
    csp: Csp,
    /// The guide's linear map of the text embeddings (`attn.gl`).
    gl: Linear,
    /// `attn.bias`, per head.
    bias: Tensor,
    proj_conv: Conv2d,
    heads: usize,
}

impl C2fAttn {
    pub fn new(
        vb: &VarBuilder,
        (c1, c2, n, heads): (usize, usize, usize, usize),
        embed: usize,
        conv: ConvSettings,
    ) -> Result<Self> {
        let c = c2 / 2;
        let attn = vb.pp("attn");
        Ok(Self {
            csp: Csp::new(vb, (c1, c2, n), (3, gcd(c1, c2)), false, conv)?,
            gl: candle_nn::linear(embed, c, attn.pp("gl"))?,
            bias: attn.get(heads, "bias")?,
            proj_conv: conv_bn(
                &attn.pp("proj_conv"),
                (c, c, 3, 1),
                conv,
                ConvActivation::Identity,
            )?,
            heads,
        })
    }

    /// The guide for `text` (`(phrases, embed)`, as the reference feeds it): per head, the
    /// `(head channels, phrases)` matrix the attention multiplies with, already divided by
    /// the square root of the head width. `(heads, head channels, phrases)`.
    pub fn guide(&self, text: &Tensor) -> Result<Tensor> {
        let g = self.gl.forward(text)?;
        let (k, ec) = g.dims2()?;
        let hc = ec / self.heads;
        let g = (g / (hc as f64).sqrt())?;
        g.reshape((k, self.heads, hc))?
            .permute((1, 2, 0))?
            .contiguous()
    }

    /// `x`: the parts of the `(batch, c1, h, w)` input, concatenated along the channels;
    /// `guide` from [`Self::guide`].
    pub fn forward(&self, x: &[Tensor], guide: &Tensor) -> Result<Tensor> {
        let (mut parts, last) = self.csp.parts(x)?;
        parts.push(self.attention(&last, guide)?);
        self.csp.cv2.forward_cat(&parts)
    }

    /// `MaxSigmoidAttnBlock`: per head, the best match of each pixel with any phrase, through
    /// a sigmoid, scales that head's channels of a 3x3 projection of the input.
    fn attention(&self, x: &Tensor, guide: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let hc = c / self.heads;
        // The scores in the guide's f32 whatever the activations' dtype.
        let embed = x
            .to_dtype(guide.dtype())?
            .reshape((b, self.heads, hc, h * w))?
            .transpose(2, 3)?
            .contiguous()?;
        let scores = embed
            .broadcast_matmul(&guide.unsqueeze(0)?)?
            .max(D::Minus1)?;
        let weights = candle_nn::ops::sigmoid(
            &scores.broadcast_add(&self.bias.reshape((1, self.heads, 1))?)?,
        )?;
        let projected = self
            .proj_conv
            .forward(x)?
            .reshape((b, self.heads, hc, h * w))?;
        projected
            .broadcast_mul(&weights.unsqueeze(2)?.to_dtype(projected.dtype())?)?
            .reshape((b, c, h, w))
    }
}
