//! YOLO-World's architecture read from `config.json`: the scale (depth, width and channel
//! cap of Ultralytics' `yolov8{n,s,m,l,x}-worldv2.yaml`), the detector's channel plan that
//! follows from it exactly as Ultralytics' `parse_model` derives it, the CLIP text tower's
//! settings, and every tensor a checkpoint must hold.

use crate::model::ModelError;
use crate::model::loading::{TensorSpec, parse_config};
use crate::model::towers::clip_text::ClipSpec;
use crate::model::towers::specs::linear_specs;
use serde::Deserialize;
use serde_json::Value;

/// The `model_type` a YOLO-World `config.json` names.
pub const MODEL_TYPE: &str = "yoloworld";

/// The checkpoint prefix of the detector's layers (Ultralytics' `model.<index>`).
const NET: &str = "model";

/// The published scales: `(name, depth, width, max_channels)`, as in the YAML.
pub const SCALES: [(&str, f64, f64, usize); 5] = [
    ("n", 0.33, 0.25, 1024),
    ("s", 0.33, 0.50, 1024),
    ("m", 0.67, 0.75, 768),
    ("l", 1.00, 1.00, 512),
    ("x", 1.00, 1.25, 512),
];

/// `config.json` as written by `scripts/convert-yoloworld.py` and `free-roam model make`.
/// `scale` picks a row of [`SCALES`]; `depth_multiple`, `width_multiple` and `max_channels`
/// override it (the tiny test scale sets all three).
#[derive(Deserialize)]
#[serde(default)]
struct ConfigFile {
    scale: String,
    depth_multiple: Option<f64>,
    width_multiple: Option<f64>,
    max_channels: Option<usize>,
    /// The class count the head was built with: it sets the class branch's width.
    nc: usize,
    reg_max: usize,
    image_size: usize,
    batch_norm_eps: f64,
}

impl Default for ConfigFile {
    fn default() -> Self {
        Self {
            scale: "s".into(),
            depth_multiple: None,
            width_multiple: None,
            max_channels: None,
            nc: 80,
            reg_max: 16,
            image_size: 640,
            batch_norm_eps: 1e-3,
        }
    }
}

/// One text-guided CSP layer (`C2fAttn`): input and output channels, bottlenecks, heads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnLayer {
    pub index: usize,
    pub c1: usize,
    pub c2: usize,
    pub n: usize,
    pub heads: usize,
}

/// The YOLO-World v2 architecture of one checkpoint.
#[derive(Clone, Debug)]
pub struct YoloWorldSpec {
    pub scale: String,
    pub depth: f64,
    pub width: f64,
    pub max_channels: usize,
    pub nc: usize,
    pub reg_max: usize,
    /// The letterbox's long side (640).
    pub image_size: usize,
    pub batch_norm_eps: f64,
    /// The text tower; its `projection_dim` is the width of the text embeddings the neck and
    /// head read.
    pub clip: ClipSpec,
}

/// The strides of the three detection levels (P3, P4, P5).
pub const STRIDES: [usize; 3] = [8, 16, 32];
/// The letterbox is padded to a multiple of this.
pub const STRIDE: usize = 32;

fn make_divisible(x: f64, divisor: usize) -> usize {
    ((x / divisor as f64).ceil() as usize) * divisor
}

impl YoloWorldSpec {
    /// Reads `config.json`: the multiples it sets win over those of the scale it names, and
    /// the text tower's settings are CLIP's (`text_config`, `projection_dim`).
    pub fn from_config(config: &Value) -> Result<Self, ModelError> {
        let file: ConfigFile = parse_config(config, "YOLO-World")?;
        let row = SCALES.iter().find(|(name, ..)| *name == file.scale);
        let (depth, width, max_channels) = match (
            row,
            file.depth_multiple,
            file.width_multiple,
            file.max_channels,
        ) {
            (_, Some(d), Some(w), Some(m)) => (d, w, m),
            (Some(&(_, d, w, m)), d2, w2, m2) => {
                (d2.unwrap_or(d), w2.unwrap_or(w), m2.unwrap_or(m))
            }
            (None, ..) => {
                return Err(ModelError::Load(
                    format!(
                        "config.json: scale {:?} is none of n, s, m, l, x, and depth_multiple, \
                         width_multiple and max_channels are not all set",
                        file.scale
                    )
                    .into(),
                ));
            }
        };
        let clip = ClipSpec::from_config(config)?;
        let spec = Self {
            scale: file.scale,
            depth,
            width,
            max_channels,
            nc: file.nc,
            reg_max: file.reg_max,
            image_size: file.image_size,
            batch_norm_eps: file.batch_norm_eps,
            clip,
        };
        spec.check()?;
        Ok(spec)
    }

    fn check(&self) -> Result<(), ModelError> {
        let bad = |what: String| Err(ModelError::Load(format!("config.json: {what}").into()));
        if !(self.width > 0.0 && self.depth > 0.0) || self.max_channels < 64 {
            return bad(format!(
                "depth_multiple {}, width_multiple {} and max_channels {} do not make a network",
                self.depth, self.width, self.max_channels
            ));
        }
        if self.reg_max < 2 || self.nc == 0 {
            return bad(format!(
                "reg_max {} and nc {} must be at least 2 and 1",
                self.reg_max, self.nc
            ));
        }
        if self.image_size == 0 || !self.image_size.is_multiple_of(STRIDE) {
            return bad(format!(
                "image_size {} is not a multiple of {STRIDE}",
                self.image_size
            ));
        }
        if let Some(layer) = self
            .attn_layers()
            .into_iter()
            .find(|l| !(l.c2 / 2).is_multiple_of(l.heads))
        {
            return bad(format!(
                "layer {} has {} hidden channels, not a multiple of its {} heads",
                layer.index,
                layer.c2 / 2,
                layer.heads
            ));
        }
        Ok(())
    }

    /// A layer's output channels from the YAML's (`parse_model`'s width rule).
    pub fn ch(&self, yaml: usize) -> usize {
        make_divisible(yaml.min(self.max_channels) as f64 * self.width, 8)
    }

    /// A block's repeat count from the YAML's (`parse_model`'s depth rule; Python's `round`
    /// never meets a tie with the published multiples).
    pub fn n(&self, yaml: usize) -> usize {
        if yaml > 1 {
            ((yaml as f64 * self.depth).round_ties_even() as usize).max(1)
        } else {
            yaml
        }
    }

    /// A `C2fAttn`'s head count from the YAML's (`parse_model`'s rule).
    fn heads(&self, yaml: usize) -> usize {
        if yaml > 1 {
            let capped = yaml.min(self.max_channels / 2 / 32) as f64;
            (capped * self.width).max(1.0) as usize
        } else {
            yaml
        }
    }

    /// The text embedding width (CLIP's projection).
    pub fn embed(&self) -> usize {
        self.clip.projection_dim
    }

    /// The four text-guided layers of the neck, in order (12, 15, 18, 21).
    pub fn attn_layers(&self) -> [AttnLayer; 4] {
        let (p3, p4, p5) = (self.ch(256), self.ch(512), self.ch(1024));
        let layer = |index, c1, c2, heads| AttnLayer {
            index,
            c1,
            c2,
            n: self.n(3),
            heads: self.heads(heads),
        };
        [
            layer(12, p5 + p4, p4, 8),
            layer(15, p4 + p3, p3, 4),
            layer(18, p3 + p4, p4, 8),
            layer(21, p4 + p5, p5, 16),
        ]
    }

    /// The channels of the three levels the head reads (layers 15, 18, 21).
    pub fn level_channels(&self) -> [usize; 3] {
        [self.ch(256), self.ch(512), self.ch(1024)]
    }

    /// The box branch's and the class branch's widths (Ultralytics' `c2` and `c3`).
    pub fn head_widths(&self) -> (usize, usize) {
        let c0 = self.level_channels()[0];
        let box_width = 16.max(c0 / 4).max(self.reg_max * 4);
        (box_width, c0.max(self.nc.min(100)))
    }

    /// Every tensor the detector and the text tower read, with its shape.
    pub fn tensor_specs(&self) -> Vec<TensorSpec> {
        let mut specs: Vec<TensorSpec> = self
            .clip
            .tensor_specs()
            .into_iter()
            .filter(|s| s.name.starts_with("text_"))
            .collect();
        let s = &mut specs;
        let c = |y| self.ch(y);
        conv_specs(s, &format!("{NET}.0"), 3, c(64), 3);
        conv_specs(s, &format!("{NET}.1"), c(64), c(128), 3);
        c2f_specs(s, &format!("{NET}.2"), c(128), c(128), self.n(3), 2);
        conv_specs(s, &format!("{NET}.3"), c(128), c(256), 3);
        c2f_specs(s, &format!("{NET}.4"), c(256), c(256), self.n(6), 2);
        conv_specs(s, &format!("{NET}.5"), c(256), c(512), 3);
        c2f_specs(s, &format!("{NET}.6"), c(512), c(512), self.n(6), 2);
        conv_specs(s, &format!("{NET}.7"), c(512), c(1024), 3);
        c2f_specs(s, &format!("{NET}.8"), c(1024), c(1024), self.n(3), 2);
        let hidden = c(1024) / 2;
        conv_specs(s, &format!("{NET}.9.cv1"), c(1024), hidden, 1);
        conv_specs(s, &format!("{NET}.9.cv2"), hidden * 4, c(1024), 1);
        for layer in self.attn_layers() {
            let p = format!("{NET}.{}", layer.index);
            c2f_specs(s, &p, layer.c1, layer.c2, layer.n, 3);
            let h = layer.c2 / 2;
            linear_specs(s, &format!("{p}.attn.gl"), h, self.embed());
            s.push(TensorSpec::new(format!("{p}.attn.bias"), &[layer.heads]));
            conv_specs(s, &format!("{p}.attn.proj_conv"), h, h, 3);
        }
        conv_specs(s, &format!("{NET}.16"), c(256), c(256), 3);
        conv_specs(s, &format!("{NET}.19"), c(512), c(512), 3);
        self.head_specs(s);
        specs
    }

    fn head_specs(&self, s: &mut Vec<TensorSpec>) {
        let (c2, c3) = self.head_widths();
        let p = self.head_prefix();
        for (i, ch) in self.level_channels().into_iter().enumerate() {
            for (branch, width, out) in [("cv2", c2, 4 * self.reg_max), ("cv3", c3, self.embed())] {
                conv_specs(s, &format!("{p}.{branch}.{i}.0"), ch, width, 3);
                conv_specs(s, &format!("{p}.{branch}.{i}.1"), width, width, 3);
                s.push(TensorSpec::new(
                    format!("{p}.{branch}.{i}.2.weight"),
                    &[out, width, 1, 1],
                ));
                s.push(TensorSpec::new(format!("{p}.{branch}.{i}.2.bias"), &[out]));
            }
            batch_norm_specs(s, &format!("{p}.cv4.{i}.norm"), self.embed());
            s.push(TensorSpec::new(format!("{p}.cv4.{i}.bias"), &[1]));
            s.push(TensorSpec::new(format!("{p}.cv4.{i}.logit_scale"), &[]));
        }
    }

    /// The checkpoint prefix of the detection head (layer 22).
    pub fn head_prefix(&self) -> String {
        format!("{NET}.22")
    }
}

/// The checkpoint prefix of detector layer `index`.
pub fn layer_prefix(index: usize) -> String {
    format!("{NET}.{index}")
}

fn batch_norm_specs(s: &mut Vec<TensorSpec>, p: &str, c: usize) {
    for field in ["weight", "bias", "running_mean", "running_var"] {
        s.push(TensorSpec::new(format!("{p}.{field}"), &[c]));
    }
}

/// Ultralytics' `Conv`: a convolution without bias and its batch norm.
fn conv_specs(s: &mut Vec<TensorSpec>, p: &str, c1: usize, c2: usize, k: usize) {
    s.push(TensorSpec::new(format!("{p}.conv.weight"), &[c2, c1, k, k]));
    batch_norm_specs(s, &format!("{p}.bn"), c2);
}

/// `C2f` (`parts` 2) and the convolutions of `C2fAttn` (`parts` 3: the attention's output is
/// one more part of the final 1x1 convolution's input).
fn c2f_specs(s: &mut Vec<TensorSpec>, p: &str, c1: usize, c2: usize, n: usize, parts: usize) {
    let c = c2 / 2;
    conv_specs(s, &format!("{p}.cv1"), c1, 2 * c, 1);
    conv_specs(s, &format!("{p}.cv2"), (parts + n) * c, c2, 1);
    for j in 0..n {
        conv_specs(s, &format!("{p}.m.{j}.cv1"), c, c, 3);
        conv_specs(s, &format!("{p}.m.{j}.cv2"), c, c, 3);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn params(spec: &YoloWorldSpec) -> usize {
        spec.tensor_specs()
            .iter()
            .filter(|s| !s.name.starts_with("text_") && !s.name.contains("running_"))
            .map(|s| s.shape.iter().product::<usize>())
            .sum()
    }

    /// Ultralytics' own parameter counts of the published scales (its YAML's comments) less
    /// the DFL layer's 16 fixed weights, which the model does not read.
    #[test]
    fn the_published_scales_have_the_reference_parameter_counts() {
        for (scale, count) in [
            ("n", 3_695_183),
            ("s", 12_759_880),
            ("m", 28_376_158),
            ("l", 46_832_050),
            ("x", 72_886_377),
        ] {
            let spec = YoloWorldSpec::from_config(&json!({"scale": scale})).unwrap();
            assert_eq!(params(&spec), count - 16, "scale {scale}");
        }
    }

    #[test]
    fn an_unknown_scale_without_multiples_is_refused() {
        let err = YoloWorldSpec::from_config(&json!({"scale": "q"})).unwrap_err();
        assert!(err.to_string().contains("scale \"q\" is none of"), "{err}");
        let tiny = json!({"scale": "tiny", "depth_multiple": 0.33, "width_multiple": 0.125,
                          "max_channels": 1024});
        let spec = YoloWorldSpec::from_config(&tiny).unwrap();
        assert_eq!(spec.level_channels(), [32, 64, 128]);
    }
}
