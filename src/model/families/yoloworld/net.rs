//! The detector network of `yolov8-worldv2.yaml`: the YOLOv8 backbone (layers 0-9), the
//! text-guided PAN neck (10-21), and the head (22), wired as Ultralytics' `WorldModel.predict`
//! runs them. Every text-guided layer reads the prompt's embeddings as they are (v2 has no
//! image-pooling attention to update them), so all their guides are per prompt.

use super::blocks::{C2f, C2fAttn, ConvSettings, Sppf, conv_silu};
use super::config::{YoloWorldSpec, layer_prefix};
use super::head::{FoldedClasses, HeadOutput, WorldDetect};
use crate::model::kernels::conv::{self, Conv2d};
use crate::model::kernels::fused_linear::MatmulPrecision;
use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

/// What one prompt contributes, computed once per prompt: the four guides and the folded
/// class convolutions.
pub struct PromptWeights {
    pub guides: [Tensor; 4],
    pub classes: FoldedClasses,
}

pub struct Detector {
    /// Layers 0, 1, 3, 5, 7: the stride-2 convolutions.
    down: [Conv2d; 5],
    /// Layers 2, 4, 6, 8.
    csp: [C2f; 4],
    sppf: Sppf,
    /// Layers 12, 15, 18, 21.
    attn: [C2fAttn; 4],
    /// Layers 16 and 19: the stride-2 convolutions of the bottom-up path.
    down_neck: [Conv2d; 2],
    head: WorldDetect,
    /// The dtype the activations travel in between the convolutions (see
    /// [`conv::activation_dtype`]); the head gives f32 either way.
    activations: DType,
}

impl Detector {
    /// The detector at `vb`, its convolutions' products in `precision` (the head's last 1x1
    /// layers, which give its outputs, stay f32: see [`WorldDetect::new`]).
    pub fn new(vb: &VarBuilder, spec: &YoloWorldSpec, precision: MatmulPrecision) -> Result<Self> {
        let conv = ConvSettings {
            eps: spec.batch_norm_eps,
            precision,
        };
        let c = |y| spec.ch(y);
        let layer = |i: usize| vb.pp(layer_prefix(i));
        let down_conv = |i, c1, c2| conv_silu(&layer(i), c1, c2, 3, 2, conv);
        let csp = |i, ch, n| C2f::new(&layer(i), ch, ch, n, conv);
        let attn = spec
            .attn_layers()
            .map(|l| (l.index, (l.c1, l.c2, l.n, l.heads)));
        let guided = |(i, dims)| C2fAttn::new(&layer(i), dims, spec.embed(), conv);
        Ok(Self {
            down: [
                down_conv(0, 3, c(64))?,
                down_conv(1, c(64), c(128))?,
                down_conv(3, c(128), c(256))?,
                down_conv(5, c(256), c(512))?,
                down_conv(7, c(512), c(1024))?,
            ],
            csp: [
                csp(2, c(128), spec.n(3))?,
                csp(4, c(256), spec.n(6))?,
                csp(6, c(512), spec.n(6))?,
                csp(8, c(1024), spec.n(3))?,
            ],
            sppf: Sppf::new(&layer(9), c(1024), c(1024), conv)?,
            attn: [
                guided(attn[0])?,
                guided(attn[1])?,
                guided(attn[2])?,
                guided(attn[3])?,
            ],
            down_neck: [
                down_conv(16, c(256), c(256))?,
                down_conv(19, c(512), c(512))?,
            ],
            head: WorldDetect::new(&vb.pp(spec.head_prefix()), spec, conv)?,
            activations: conv::activation_dtype(precision, vb.device()),
        })
    }

    /// The per-prompt weights for the prompt's text embeddings `(phrases, embed)`, normalised
    /// as the reference's text model gives them.
    pub fn prompt_weights(&self, text: &Tensor) -> Result<PromptWeights> {
        let guides = [
            self.attn[0].guide(text)?,
            self.attn[1].guide(text)?,
            self.attn[2].guide(text)?,
            self.attn[3].guide(text)?,
        ];
        Ok(PromptWeights {
            guides,
            classes: self.head.fold(text)?,
        })
    }

    /// The three levels the head reads (layers 15, 18, 21) for `pixels`.
    pub fn neck(&self, pixels: &Tensor, guides: &[Tensor; 4]) -> Result<[Tensor; 3]> {
        let x = self.down[0].forward(&pixels.to_dtype(self.activations)?)?;
        let x = self.csp[0].forward(&self.down[1].forward(&x)?)?;
        let p3 = self.csp[1].forward(&self.down[2].forward(&x)?)?;
        let p4 = self.csp[2].forward(&self.down[3].forward(&p3)?)?;
        let p5 = self
            .sppf
            .forward(&self.csp[3].forward(&self.down[4].forward(&p4)?)?)?;
        let up = |t: &Tensor| {
            let (_, _, h, w) = t.dims4()?;
            t.upsample_nearest2d(2 * h, 2 * w)
        };
        // The concatenations go to the layers as their parts, which they read in place.
        let l12 = self.attn[0].forward(&[up(&p5)?, p4], &guides[0])?;
        let l15 = self.attn[1].forward(&[up(&l12)?, p3], &guides[1])?;
        let l16 = self.down_neck[0].forward(&l15)?;
        let l18 = self.attn[2].forward(&[l16, l12], &guides[2])?;
        let l19 = self.down_neck[1].forward(&l18)?;
        let l21 = self.attn[3].forward(&[l19, p5], &guides[3])?;
        Ok([l15, l18, l21])
    }

    /// The whole network with a prompt's weights folded in.
    pub fn forward(&self, pixels: &Tensor, prompt: &PromptWeights) -> Result<HeadOutput> {
        let feats = self.neck(pixels, &prompt.guides)?;
        self.head.forward(&feats, &prompt.classes)
    }

    /// The whole network as the reference computes it from the text embeddings, nothing
    /// folded ahead of the frame.
    pub fn forward_unfolded(&self, pixels: &Tensor, text: &Tensor) -> Result<HeadOutput> {
        let guides = [
            self.attn[0].guide(text)?,
            self.attn[1].guide(text)?,
            self.attn[2].guide(text)?,
            self.attn[3].guide(text)?,
        ];
        let feats = self.neck(pixels, &guides)?;
        self.head.forward_unfolded(&feats, text)
    }
}
