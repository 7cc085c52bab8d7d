//! The v2 detection head (`WorldDetect` with `BNContrastiveHead`): per level a box branch
//! (distributions over `reg_max` distances, decoded by DFL against the anchor grid) and a
//! class branch whose embedding goes through a batch norm and is compared with each
//! phrase's normalised text embedding.
//!
//! For a prompt, the class branch's last 1x1 convolution, the batch norm, the comparison
//! with the phrases, the logit scale and the bias are all linear in the branch's features,
//! so [`WorldDetect::fold`] turns them into one 1x1 convolution with a row per phrase: a
//! frame then costs the same whatever the prompt's length. [`WorldDetect::class_logits_unfolded`]
//! keeps the reference's order of operations, to show the two agree.

use super::blocks::{ConvSettings, batch_norm_affine, conv_silu};
use super::config::{STRIDES, YoloWorldSpec};
use crate::model::kernels::conv::{Conv2d, ConvActivation};
use candle_core::{D, DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;

/// One level's class branch after its two 3x3 convolutions: the 1x1 embedding convolution,
/// the batch norm and the contrastive head's scale and bias.
struct ClassTail {
    /// `(embed, c3)`.
    weight: Tensor,
    /// `(embed)`.
    bias: Tensor,
    /// The batch norm as `(scale, shift)`, each `(embed)`.
    norm: (Tensor, Tensor),
    /// `exp(logit_scale)`.
    logit_scale: f64,
    head_bias: f64,
}

struct Level {
    box_branch: [Conv2d; 3],
    class_convs: [Conv2d; 2],
    class_tail: ClassTail,
}

/// `WorldDetect` for the three levels P3, P4 and P5.
pub struct WorldDetect {
    levels: Vec<Level>,
    reg_max: usize,
}

/// The class branch's last step folded for one prompt: one 1x1 convolution per level with a
/// row per phrase.
pub struct FoldedClasses(Vec<Conv2d>);

/// What the head gives for a batch, before non-maximum suppression, as the reference's
/// `WorldDetect` output: `(batch, 4 + phrases, anchors)`, each anchor's box as (cx, cy, w,
/// h) in letterboxed-input pixels, then its sigmoid score per phrase.
pub struct HeadOutput(pub Tensor);

fn scalar(vb: &VarBuilder, name: &str, shape: &[usize]) -> Result<f64> {
    vb.get(shape, name)?
        .flatten_all()?
        .get(0)?
        .to_scalar::<f32>()
        .map(f64::from)
}

impl WorldDetect {
    /// The head at `vb`: its 3x3 convolutions built with `conv`; the last 1x1 layers of
    /// both branches (the box distributions here, the folded class rows in [`Self::fold`])
    /// run in f32, as they give the outputs and cost little (64 and one row per phrase).
    pub fn new(vb: &VarBuilder, spec: &YoloWorldSpec, conv: ConvSettings) -> Result<Self> {
        let (c2, c3) = spec.head_widths();
        let (eps, embed, reg_max) = (conv.eps, spec.embed(), spec.reg_max);
        let levels = spec
            .level_channels()
            .into_iter()
            .enumerate()
            .map(|(i, ch)| {
                let boxes = vb.pp(format!("cv2.{i}"));
                let classes = vb.pp(format!("cv3.{i}"));
                let contrast = vb.pp(format!("cv4.{i}"));
                let out = boxes.pp("2");
                Ok(Level {
                    box_branch: [
                        conv_silu(&boxes.pp("0"), ch, c2, 3, 1, conv)?,
                        conv_silu(&boxes.pp("1"), c2, c2, 3, 1, conv)?,
                        Conv2d::new(
                            out.get((4 * reg_max, c2, 1, 1), "weight")?,
                            Some(out.get(4 * reg_max, "bias")?),
                            1,
                            0,
                            ConvActivation::Identity,
                        )?,
                    ],
                    class_convs: [
                        conv_silu(&classes.pp("0"), ch, c3, 3, 1, conv)?,
                        conv_silu(&classes.pp("1"), c3, c3, 3, 1, conv)?,
                    ],
                    class_tail: ClassTail {
                        weight: classes
                            .pp("2")
                            .get((embed, c3, 1, 1), "weight")?
                            .reshape((embed, c3))?,
                        bias: classes.pp("2").get(embed, "bias")?,
                        norm: batch_norm_affine(&contrast.pp("norm"), embed, eps)?,
                        logit_scale: scalar(&contrast, "logit_scale", &[])?.exp(),
                        head_bias: scalar(&contrast, "bias", &[1])?,
                    },
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self { levels, reg_max })
    }

    /// The class branch's tail folded for `text` (`(phrases, embed)`): per level, logits =
    /// `exp(s) * norm(t) . (a * (W x + b) + c) + bias` = `W' x + b'`.
    pub fn fold(&self, text: &Tensor) -> Result<FoldedClasses> {
        let unit = unit_rows(text)?;
        let convs = self
            .levels
            .iter()
            .map(|level| {
                let t = &level.class_tail;
                let (scale, shift) = &t.norm;
                let scaled = (unit.broadcast_mul(&scale.unsqueeze(0)?)? * t.logit_scale)?;
                let weight = scaled.matmul(&t.weight)?;
                let offset = (t.bias.mul(scale)? + shift)?;
                let bias = ((unit.matmul(&offset.unsqueeze(1)?)?.squeeze(1)? * t.logit_scale)?
                    + t.head_bias)?;
                let (k, c3) = weight.dims2()?;
                Conv2d::new(
                    weight.reshape((k, c3, 1, 1))?,
                    Some(bias),
                    1,
                    0,
                    ConvActivation::Identity,
                )
            })
            .collect::<Result<_>>()?;
        Ok(FoldedClasses(convs))
    }

    /// Raw box distributions `(batch, 4 * reg_max, anchors)` and class logits `(batch,
    /// phrases, anchors)` over the three levels; `classes` computes the logits of one level
    /// from its class features.
    fn raw(
        &self,
        feats: &[Tensor; 3],
        classes: impl Fn(usize, &Tensor) -> Result<Tensor>,
    ) -> Result<(Tensor, Tensor)> {
        let mut boxes = Vec::with_capacity(3);
        let mut logits = Vec::with_capacity(3);
        for (i, (level, x)) in self.levels.iter().zip(feats).enumerate() {
            // The last 1x1 layers read f32 whatever the activations' dtype: they give the
            // outputs (see `new`).
            let [b0, b1, b2] = &level.box_branch;
            let b = b1.forward(&b0.forward(x)?)?.to_dtype(DType::F32)?;
            boxes.push(b2.forward(&b)?.flatten_from(2)?);
            let c = level.class_convs[1].forward(&level.class_convs[0].forward(x)?)?;
            logits.push(classes(i, &c.to_dtype(DType::F32)?)?.flatten_from(2)?);
        }
        Ok((Tensor::cat(&boxes, 2)?, Tensor::cat(&logits, 2)?))
    }

    /// The head on the neck's three levels with the prompt folded in.
    pub fn forward(&self, feats: &[Tensor; 3], folded: &FoldedClasses) -> Result<HeadOutput> {
        let (boxes, logits) = self.raw(feats, |i, c| folded.0[i].forward(c))?;
        self.decode(feats, &boxes, &logits)
    }

    /// The head as the reference computes it, the prompt's embeddings `text` applied after
    /// the batch norm on every frame.
    pub fn forward_unfolded(&self, feats: &[Tensor; 3], text: &Tensor) -> Result<HeadOutput> {
        let unit = unit_rows(text)?;
        let (boxes, logits) = self.raw(feats, |i, c| self.class_logits_unfolded(i, c, &unit))?;
        self.decode(feats, &boxes, &logits)
    }

    fn class_logits_unfolded(&self, level: usize, x: &Tensor, unit: &Tensor) -> Result<Tensor> {
        let t = &self.levels[level].class_tail;
        let (b, c3, h, w) = x.dims4()?;
        let (embed, _) = t.weight.dims2()?;
        let flat = x.reshape((b, c3, h * w))?;
        let y = t
            .weight
            .unsqueeze(0)?
            .broadcast_matmul(&flat)?
            .broadcast_add(&t.bias.reshape((1, embed, 1))?)?;
        let (scale, shift) = &t.norm;
        let y = y
            .broadcast_mul(&scale.reshape((1, embed, 1))?)?
            .broadcast_add(&shift.reshape((1, embed, 1))?)?;
        let logits = unit.unsqueeze(0)?.broadcast_matmul(&y)?;
        let k = unit.dim(0)?;
        ((logits * t.logit_scale)? + t.head_bias)?.reshape((b, k, h, w))
    }

    /// DFL over each side's distribution, distances from the anchors to corners, then
    /// centre and size scaled by the level's stride; next to the scores' sigmoid.
    fn decode(&self, feats: &[Tensor; 3], boxes: &Tensor, logits: &Tensor) -> Result<HeadOutput> {
        let (b, _, a) = boxes.dims3()?;
        let device = boxes.device();
        let bins =
            Tensor::arange(0f32, self.reg_max as f32, device)?.reshape((1, 1, self.reg_max, 1))?;
        let probs = candle_nn::ops::softmax(&boxes.reshape((b, 4, self.reg_max, a))?, 2)?;
        let dist = probs.broadcast_mul(&bins)?.sum(2)?;
        let (points, strides) = anchors(feats, device)?;
        let lt = dist.narrow(1, 0, 2)?;
        let rb = dist.narrow(1, 2, 2)?;
        let p = points.unsqueeze(0)?;
        let x1y1 = p.broadcast_sub(&lt)?;
        let x2y2 = p.broadcast_add(&rb)?;
        let centre = ((&x1y1 + &x2y2)? / 2.0)?;
        let size = (x2y2 - x1y1)?;
        let xywh = Tensor::cat(&[centre, size], 1)?.broadcast_mul(&strides.unsqueeze(0)?)?;
        let scores = candle_nn::ops::sigmoid(logits)?;
        Ok(HeadOutput(Tensor::cat(&[xywh, scores], 1)?))
    }
}

/// Rows scaled to unit length (PyTorch's `F.normalize`, which divides by at least 1e-12).
fn unit_rows(x: &Tensor) -> Result<Tensor> {
    let norm = x
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .sqrt()?
        .clamp(1e-12, f64::INFINITY)?;
    x.broadcast_div(&norm)
}

/// The anchor points (cell centres, in grid units) `(2, anchors)` and each anchor's stride
/// `(1, anchors)`, level after level, row-major within a level.
fn anchors(feats: &[Tensor; 3], device: &Device) -> Result<(Tensor, Tensor)> {
    let mut xy = [Vec::new(), Vec::new()];
    let mut strides = Vec::new();
    for (x, stride) in feats.iter().zip(STRIDES) {
        let (_, _, h, w) = x.dims4()?;
        for row in 0..h {
            for col in 0..w {
                xy[0].push(col as f32 + 0.5);
                xy[1].push(row as f32 + 0.5);
                strides.push(stride as f32);
            }
        }
    }
    let n = strides.len();
    let [xs, ys] = xy;
    let points = Tensor::from_vec([xs, ys].concat(), (2, n), device)?;
    Ok((points, Tensor::from_vec(strides, (1, n), device)?))
}
