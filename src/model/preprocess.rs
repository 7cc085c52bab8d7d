//! Frame preprocessing for the vision towers: resize, crop and normalise packed RGB24 frames
//! into the `(batch, 3, side, side)` f32 tensor the models read, exactly as the reference
//! (transformers' PIL image processors) does.
//!
//! The resampler reproduces Pillow's bicubic `Image.resize` bit for bit: the same filter
//! support widened by the scale factor when shrinking, the same 22-bit fixed-point
//! coefficients, horizontal pass first with the intermediate rounded to u8, then the
//! vertical pass. A generic float resampler differs by 1/255 on some pixels, which moves
//! CLIP logits by up to about 1e-4 and breaks parity.
//!
//! Work is done once per frame and only where it is needed: for CLIP's resize-then-crop only
//! the output pixels inside the crop window are computed, and the normalised values are
//! written straight into the batch buffer.

use crate::frame::Frame;
use crate::model::ModelError;
use candle_core::{Device, Tensor};

/// The CLIP image mean used by both CLIP and BLIP checkpoints.
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
/// The CLIP image standard deviation used by both CLIP and BLIP checkpoints.
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

/// SigLIP's image mean and standard deviation (the same value for both, per channel).
pub const SIGLIP_MEAN_STD: [f32; 3] = [0.5, 0.5, 0.5];

/// How a frame becomes a square model input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Geometry {
    /// Resize so the shortest side is `side` (keeping the aspect ratio), then centre-crop a
    /// `side` x `side` square (CLIP).
    ShortestSideThenCrop,
    /// Resize straight to `side` x `side`, ignoring the aspect ratio (BLIP).
    Squash,
}

/// Turns frames into normalised pixel tensors for one model.
#[derive(Clone, Debug)]
pub struct Preprocessor {
    pub side: usize,
    pub geometry: Geometry,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl Preprocessor {
    pub fn clip(side: usize) -> Self {
        Self {
            side,
            geometry: Geometry::ShortestSideThenCrop,
            mean: CLIP_MEAN,
            std: CLIP_STD,
        }
    }

    /// SigLIP: straight to `side` x `side` like BLIP, normalised to [-1, 1].
    pub fn siglip(side: usize) -> Self {
        Self {
            side,
            geometry: Geometry::Squash,
            mean: SIGLIP_MEAN_STD,
            std: SIGLIP_MEAN_STD,
        }
    }

    /// OWL-ViT: straight to `side` x `side` like BLIP, with the CLIP mean and std.
    pub fn owlvit(side: usize) -> Self {
        Self::blip(side)
    }

    pub fn blip(side: usize) -> Self {
        Self {
            side,
            geometry: Geometry::Squash,
            mean: CLIP_MEAN,
            std: CLIP_STD,
        }
    }

    /// Preprocesses every frame into one `(frames.len(), 3, side, side)` f32 tensor.
    pub fn batch(&self, frames: &[&Frame], device: &Device) -> Result<Tensor, ModelError> {
        let plane = self.side * self.side;
        let mut data = vec![0f32; frames.len() * 3 * plane];
        for (frame, out) in frames.iter().zip(data.chunks_exact_mut(3 * plane)) {
            self.frame_into(frame, out)?;
        }
        Tensor::from_vec(data, (frames.len(), 3, self.side, self.side), device)
            .map_err(|e| ModelError::inference("pixel tensor", e))
    }

    /// Preprocesses one frame into `out` (planar CHW, `3 * side * side` values).
    pub fn frame_into(&self, frame: &Frame, out: &mut [f32]) -> Result<(), ModelError> {
        let (w, h) = (frame.width as usize, frame.height as usize);
        if w == 0 || h == 0 || frame.rgb.len() != w * h * 3 {
            return Err(ModelError::Inference(
                format!("frame {} is not packed rgb24 {w}x{h}", frame.index).into(),
            ));
        }
        let resized = self.resize_and_crop(&frame.rgb, w, h);
        self.normalise(&resized, out);
        Ok(())
    }

    /// Resizes (and crops) packed RGB into a packed RGB `side` x `side` buffer.
    pub fn resize_and_crop(&self, rgb: &[u8], w: usize, h: usize) -> Vec<u8> {
        let side = self.side;
        let (out_w, out_h, left, top) = match self.geometry {
            Geometry::Squash => (side, side, 0, 0),
            Geometry::ShortestSideThenCrop => {
                let (out_w, out_h) = shortest_side_size(w, h, side);
                // Same rounding as transformers' centre crop: floor of half the excess.
                (
                    out_w,
                    out_h,
                    out_w.saturating_sub(side) / 2,
                    out_h.saturating_sub(side) / 2,
                )
            }
        };
        let horizontal = Coefficients::new(w, out_w, left, side.min(out_w));
        let vertical = Coefficients::new(h, out_h, top, side.min(out_h));
        let resized = resample(rgb, w, &horizontal, &vertical);
        if out_w >= side && out_h >= side {
            return resized;
        }
        // Only reachable for tiny sides where the resized image is smaller than the crop:
        // pad with zeros like transformers' centre crop does.
        let (rw, rh) = (horizontal.len(), vertical.len());
        let mut padded = vec![0u8; side * side * 3];
        let (pad_left, pad_top) = ((side - rw).div_ceil(2), (side - rh).div_ceil(2));
        for y in 0..rh {
            let dst = ((y + pad_top) * side + pad_left) * 3;
            padded[dst..dst + rw * 3].copy_from_slice(&resized[y * rw * 3..(y + 1) * rw * 3]);
        }
        padded
    }

    /// Scales packed RGB to [0, 1] and normalises it into planar CHW floats.
    fn normalise(&self, rgb: &[u8], out: &mut [f32]) {
        let plane = self.side * self.side;
        // One lookup table per channel: 256 entries beat a division per pixel, and compute
        // the value the way numpy does (f64 rescale, cast to f32, then f32 normalise).
        let mut lut = [[0f32; 256]; 3];
        for (c, table) in lut.iter_mut().enumerate() {
            for (v, slot) in table.iter_mut().enumerate() {
                let scaled = (v as f64 * (1.0 / 255.0)) as f32;
                *slot = (scaled - self.mean[c]) / self.std[c];
            }
        }
        let (r, rest) = out.split_at_mut(plane);
        let (g, b) = rest.split_at_mut(plane);
        for i in 0..plane {
            r[i] = lut[0][rgb[i * 3] as usize];
            g[i] = lut[1][rgb[i * 3 + 1] as usize];
            b[i] = lut[2][rgb[i * 3 + 2] as usize];
        }
    }
}

/// The size transformers resizes to for `shortest_edge`: the short side becomes `side`, the
/// long side is scaled and truncated. Returns `(width, height)`.
pub fn shortest_side_size(w: usize, h: usize, side: usize) -> (usize, usize) {
    if w <= h {
        (side, side * h / w)
    } else {
        (side * w / h, side)
    }
}

/// Fixed-point precision of Pillow's 8-bit resampler.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Pillow's bicubic kernel (a = -0.5), support 2.
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Resampling weights along one axis for the output positions `first..first + count` of an
/// `in_size` -> `out_size` resize.
struct Coefficients {
    /// Per output position: first input index used.
    start: Vec<usize>,
    /// Per output position: its fixed-point weights (the number of inputs used).
    weights: Vec<Vec<i32>>,
}

impl Coefficients {
    fn new(in_size: usize, out_size: usize, first: usize, count: usize) -> Self {
        let scale = in_size as f64 / out_size as f64;
        let filter_scale = scale.max(1.0);
        let support = 2.0 * filter_scale;
        let mut start = Vec::with_capacity(count);
        let mut weights = Vec::with_capacity(count);
        for xx in first..first + count {
            let center = (xx as f64 + 0.5) * scale;
            let ss = 1.0 / filter_scale;
            // C's `(int)` truncates toward zero; the casts below do the same.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let raw: Vec<f64> = (xmin..xmax)
                .map(|x| bicubic((x as f64 - center + 0.5) * ss))
                .collect();
            let total: f64 = raw.iter().sum();
            let fixed = raw
                .iter()
                .map(|w| {
                    let w = if total != 0.0 { w / total } else { *w };
                    let scaled = w * (1u32 << PRECISION_BITS) as f64;
                    if scaled < 0.0 {
                        (scaled - 0.5) as i32
                    } else {
                        (scaled + 0.5) as i32
                    }
                })
                .collect();
            start.push(xmin);
            weights.push(fixed);
        }
        Self { start, weights }
    }

    fn len(&self) -> usize {
        self.start.len()
    }

    /// The input range these coefficients read.
    fn input_span(&self) -> (usize, usize) {
        let lo = self.start.iter().copied().min().unwrap_or(0);
        let hi = self
            .start
            .iter()
            .zip(&self.weights)
            .map(|(s, w)| s + w.len())
            .max()
            .unwrap_or(0);
        (lo, hi)
    }
}

/// Pillow's `clip8`: drop the fraction and clamp to a byte.
fn clip8(acc: i32) -> u8 {
    if acc >= 1 << PRECISION_BITS << 8 {
        255
    } else if acc <= 0 {
        0
    } else {
        (acc >> PRECISION_BITS) as u8
    }
}

/// Two-pass separable resample of packed RGB, horizontal first (rounded to u8), then
/// vertical, as Pillow does. Only the input rows the vertical pass reads are resampled.
fn resample(
    rgb: &[u8],
    in_w: usize,
    horizontal: &Coefficients,
    vertical: &Coefficients,
) -> Vec<u8> {
    let out_w = horizontal.len();
    let out_h = vertical.len();
    let (row_lo, row_hi) = vertical.input_span();
    let rounding = 1i32 << (PRECISION_BITS - 1);

    // Plain index loops: they are also what keeps unoptimised test builds fast enough.
    let mut temp = vec![0u8; (row_hi - row_lo) * out_w * 3];
    let stride = out_w * 3;
    for y in row_lo..row_hi {
        let src = &rgb[y * in_w * 3..(y + 1) * in_w * 3];
        let dst = &mut temp[(y - row_lo) * stride..(y - row_lo + 1) * stride];
        for x in 0..out_w {
            let weights = horizontal.weights[x].as_slice();
            let base = horizontal.start[x] * 3;
            let (mut r, mut g, mut b) = (rounding, rounding, rounding);
            let mut p = base;
            for &w in weights {
                r += src[p] as i32 * w;
                g += src[p + 1] as i32 * w;
                b += src[p + 2] as i32 * w;
                p += 3;
            }
            dst[x * 3] = clip8(r);
            dst[x * 3 + 1] = clip8(g);
            dst[x * 3 + 2] = clip8(b);
        }
    }

    let mut out = vec![0u8; out_h * stride];
    let mut acc = vec![0i32; stride];
    for y in 0..out_h {
        acc.fill(rounding);
        let first = vertical.start[y] - row_lo;
        for (k, &w) in vertical.weights[y].iter().enumerate() {
            let src = &temp[(first + k) * stride..(first + k + 1) * stride];
            for i in 0..stride {
                acc[i] += src[i] as i32 * w;
            }
        }
        let dst = &mut out[y * stride..(y + 1) * stride];
        for i in 0..stride {
            dst[i] = clip8(acc[i]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn gradient(w: usize, h: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(w * h * 3);
        for y in 0..h {
            for x in 0..w {
                v.push((x * 255 / w.max(1)) as u8);
                v.push((y * 255 / h.max(1)) as u8);
                v.push(((x + y) % 256) as u8);
            }
        }
        v
    }

    #[test]
    fn shortest_side_matches_transformers_rounding() {
        assert_eq!(shortest_side_size(320, 240, 224), (298, 224));
        assert_eq!(shortest_side_size(240, 320, 224), (224, 298));
        assert_eq!(shortest_side_size(1920, 1080, 224), (398, 224));
        assert_eq!(shortest_side_size(224, 224, 224), (224, 224));
    }

    #[test]
    fn same_size_resize_is_identity() {
        let img = gradient(40, 40);
        let p = Preprocessor::blip(40);
        assert_eq!(p.resize_and_crop(&img, 40, 40), img);
    }

    #[test]
    fn flat_image_stays_flat_through_any_resize() {
        let img: Vec<u8> = [17u8, 200, 90].repeat(123 * 77);
        for p in [Preprocessor::clip(32), Preprocessor::blip(50)] {
            let out = p.resize_and_crop(&img, 123, 77);
            assert_eq!(out.len(), p.side * p.side * 3);
            assert!(out.chunks_exact(3).all(|px| px == [17, 200, 90]));
        }
    }

    #[test]
    fn crop_window_equals_full_resize_then_crop() {
        // Computing only the crop window must give the pixels of the full resize.
        let img = gradient(90, 50);
        let side = 20;
        let (rw, rh) = shortest_side_size(90, 50, side);
        let full = resample(
            &img,
            90,
            &Coefficients::new(90, rw, 0, rw),
            &Coefficients::new(50, rh, 0, rh),
        );
        let cropped = Preprocessor::clip(side).resize_and_crop(&img, 90, 50);
        let (left, top) = ((rw - side) / 2, (rh - side) / 2);
        for y in 0..side {
            let a = &full[((y + top) * rw + left) * 3..((y + top) * rw + left + side) * 3];
            let b = &cropped[y * side * 3..(y + 1) * side * 3];
            assert_eq!(a, b, "row {y}");
        }
    }

    #[test]
    fn normalises_into_planar_channels() {
        let frame = Frame::new(2, 2, Bytes::from([0u8, 128, 255].repeat(4))).unwrap();
        let p = Preprocessor::blip(2);
        let t = p.batch(&[&frame, &frame], &Device::Cpu).unwrap();
        assert_eq!(t.dims(), &[2, 3, 2, 2]);
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let expect = |c: usize, x: f32| (x / 255.0 - CLIP_MEAN[c]) / CLIP_STD[c];
        assert!((v[0] - expect(0, 0.0)).abs() < 1e-6);
        assert!((v[4] - expect(1, 128.0)).abs() < 1e-6);
        assert!((v[8] - expect(2, 255.0)).abs() < 1e-6);
        assert_eq!(&v[..12], &v[12..]);
    }

    #[test]
    fn rejects_a_frame_whose_buffer_does_not_match() {
        let mut frame = Frame::new(2, 2, Bytes::from(vec![0u8; 12])).unwrap();
        frame.rgb = Bytes::from(vec![0u8; 5]);
        let mut out = vec![0f32; 3 * 4];
        assert!(Preprocessor::blip(2).frame_into(&frame, &mut out).is_err());
    }
}
