//! YOLO-World's preprocessing, as Ultralytics' `predict` does it: `LetterBox` scales the
//! frame to fit the input side keeping its aspect ratio, centres it and pads with 114; when
//! every frame of a batch has the same size (the `rect` case) the padding only reaches the
//! next multiple of the stride, so a 1280 x 720 frame becomes 640 x 384, not a square. Then
//! RGB, divided by 255.
//!
//! The resize is OpenCV's `cv2.resize` with `INTER_LINEAR` on 8-bit pixels, reproduced bit
//! for bit: 11-bit fixed-point coefficients from single-precision positions, indices clamped
//! at the edges without resetting the fraction, a horizontal pass into integers and a
//! vertical pass that drops 4 bits before each product's high half, as its vector code
//! does; and an exact halving in both directions takes OpenCV's area-averaging shortcut.
//! [`Letterbox::to_source`] maps boxes back as the reference's `scale_boxes` does.

use crate::frame::Frame;
use crate::model::ModelError;
use candle_core::{Device, Tensor};

/// The padding value.
pub const PAD: u8 = 114;

/// Where a frame lands in the model's input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Letterbox {
    /// The frame's size.
    pub src: (usize, usize),
    /// The scaled frame's size.
    pub scaled: (usize, usize),
    /// The input's size, padding included.
    pub canvas: (usize, usize),
    /// Padding on the left and at the top.
    pub offset: (usize, usize),
}

/// Python's `round` (ties to even), as the reference uses.
fn py_round(x: f64) -> f64 {
    x.round_ties_even()
}

impl Letterbox {
    /// The letterbox of a `w` x `h` frame into `side`; `rect` pads only to the next multiple
    /// of `stride` (every frame of the batch has this size), else to a `side` square.
    pub fn plan(w: usize, h: usize, side: usize, stride: usize, rect: bool) -> Self {
        let r = (side as f64 / h as f64).min(side as f64 / w as f64);
        let nw = (py_round(w as f64 * r) as usize).max(1);
        let nh = (py_round(h as f64 * r) as usize).max(1);
        let (mut dw, mut dh) = (side - nw.min(side), side - nh.min(side));
        if rect {
            dw %= stride;
            dh %= stride;
        }
        let (dw, dh) = (dw as f64 / 2.0, dh as f64 / 2.0);
        let pads = |d: f64| (py_round(d - 0.1) as usize, py_round(d + 0.1) as usize);
        let (left, right) = pads(dw);
        let (top, bottom) = pads(dh);
        Self {
            src: (w, h),
            scaled: (nw, nh),
            canvas: (nw + left + right, nh + top + bottom),
            offset: (left, top),
        }
    }

    /// A box `[x1, y1, x2, y2]` in input pixels mapped back to the frame's pixels and clipped
    /// to it, as `scale_boxes` computes it from the input and frame sizes.
    pub fn to_source(&self, b: [f32; 4]) -> [f32; 4] {
        let (w0, h0) = (self.src.0 as f64, self.src.1 as f64);
        let (cw, ch) = (self.canvas.0 as f64, self.canvas.1 as f64);
        let gain = (ch / h0).min(cw / w0);
        let (nw, nh) = (py_round(w0 * gain).max(1.0), py_round(h0 * gain).max(1.0));
        let (gx, gy) = (nw / w0, nh / h0);
        let pad_x = py_round((cw - nw) / 2.0 - 0.1) as f32;
        let pad_y = py_round((ch - nh) / 2.0 - 0.1) as f32;
        let x = |v: f32| ((v - pad_x) / gx as f32).clamp(0.0, w0 as f32);
        let y = |v: f32| ((v - pad_y) / gy as f32).clamp(0.0, h0 as f32);
        [x(b[0]), y(b[1]), x(b[2]), y(b[3])]
    }

    /// The frame's packed RGB letterboxed: `canvas` pixels, packed RGB.
    pub fn apply(&self, rgb: &[u8]) -> Vec<u8> {
        let (w, h) = self.src;
        let (nw, nh) = self.scaled;
        let scaled;
        let pixels = if (nw, nh) == (w, h) {
            rgb
        } else {
            scaled = resize_linear(rgb, w, h, nw, nh);
            &scaled[..]
        };
        let (cw, ch) = self.canvas;
        let (left, top) = self.offset;
        let mut out = vec![PAD; cw * ch * 3];
        for row in 0..nh {
            let dst = ((top + row) * cw + left) * 3;
            out[dst..dst + nw * 3].copy_from_slice(&pixels[row * nw * 3..(row + 1) * nw * 3]);
        }
        out
    }
}

/// One axis of OpenCV's linear resize: per output index, the two source indices and their
/// 11-bit weights.
fn taps(src: usize, dst: usize) -> Vec<(usize, usize, i32, i32)> {
    let scale = 1.0 / (dst as f64 / src as f64);
    let last = src as i64 - 1;
    (0..dst)
        .map(|d| {
            let f = ((d as f64 + 0.5) * scale - 0.5) as f32;
            let s = f.floor();
            let frac = f - s;
            let s = s as i64;
            let w0 = ((1.0f32 - frac) * 2048.0).round_ties_even() as i32;
            let w1 = (frac * 2048.0).round_ties_even() as i32;
            (
                s.clamp(0, last) as usize,
                (s + 1).clamp(0, last) as usize,
                w0,
                w1,
            )
        })
        .collect()
}

/// `cv2.resize(..., INTER_LINEAR)` of packed RGB (see the module docs).
pub fn resize_linear(rgb: &[u8], w: usize, h: usize, nw: usize, nh: usize) -> Vec<u8> {
    if w == 2 * nw && h == 2 * nh {
        return halve(rgb, w, nw, nh);
    }
    let xs = taps(w, nw);
    let ys = taps(h, nh);
    // Rows of the horizontal pass, computed once each as the vertical pass needs them.
    let mut rows: Vec<Option<Vec<i32>>> = vec![None; h];
    let horizontal = |y: usize| -> Vec<i32> {
        let src = &rgb[y * w * 3..(y + 1) * w * 3];
        let mut out = Vec::with_capacity(nw * 3);
        for &(s0, s1, a0, a1) in &xs {
            for c in 0..3 {
                out.push(src[s0 * 3 + c] as i32 * a0 + src[s1 * 3 + c] as i32 * a1);
            }
        }
        out
    };
    let mut out = Vec::with_capacity(nw * nh * 3);
    for &(s0, s1, b0, b1) in &ys {
        for s in [s0, s1] {
            if rows[s].is_none() {
                rows[s] = Some(horizontal(s));
            }
        }
        let (r0, r1) = (rows[s0].as_ref().unwrap(), rows[s1].as_ref().unwrap());
        for (&v0, &v1) in r0.iter().zip(r1) {
            let v = (((b0 * (v0 >> 4)) >> 16) + ((b1 * (v1 >> 4)) >> 16) + 2) >> 2;
            out.push(v.clamp(0, 255) as u8);
        }
    }
    out
}

/// OpenCV's shortcut for an exact halving: the rounded mean of each 2 x 2 block.
fn halve(rgb: &[u8], w: usize, nw: usize, nh: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(nw * nh * 3);
    for y in 0..nh {
        let (r0, r1) = (2 * y * w * 3, (2 * y + 1) * w * 3);
        for x in 0..nw {
            for c in 0..3 {
                let at = |row: usize, col: usize| rgb[row + col * 3 + c] as u32;
                let sum = at(r0, 2 * x) + at(r0, 2 * x + 1) + at(r1, 2 * x) + at(r1, 2 * x + 1);
                out.push(((sum + 2) >> 2) as u8);
            }
        }
    }
    out
}

/// The batch's input `(batch, 3, h, w)` in [0, 1] and each frame's letterbox. Frames of one
/// size get the stride-aligned rectangle; a batch of mixed sizes gets the square, as the
/// reference's `predict` does.
pub fn batch(
    frames: &[&Frame],
    side: usize,
    stride: usize,
    device: &Device,
) -> Result<(Tensor, Vec<Letterbox>), ModelError> {
    let first = frames.first().map(|f| (f.width, f.height));
    let rect = frames.iter().all(|f| Some((f.width, f.height)) == first);
    let boxes: Vec<Letterbox> = frames
        .iter()
        .map(|f| Letterbox::plan(f.width as usize, f.height as usize, side, stride, rect))
        .collect();
    let (cw, ch) = boxes.first().map(|b| b.canvas).unwrap_or((side, side));
    let plane = cw * ch;
    let mut data = vec![0f32; frames.len() * 3 * plane];
    for (i, (frame, lb)) in frames.iter().zip(&boxes).enumerate() {
        let pixels = lb.apply(&frame.rgb);
        let out = &mut data[i * 3 * plane..(i + 1) * 3 * plane];
        for (p, px) in pixels.chunks_exact(3).enumerate() {
            for c in 0..3 {
                out[c * plane + p] = px[c] as f32 / 255.0;
            }
        }
    }
    let tensor = Tensor::from_vec(data, (frames.len(), 3, ch, cw), device)?;
    Ok((tensor, boxes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_720p_frame_becomes_640_by_384_and_maps_back() {
        let lb = Letterbox::plan(1280, 720, 640, 32, true);
        assert_eq!(lb.scaled, (640, 360));
        assert_eq!(lb.canvas, (640, 384));
        assert_eq!(lb.offset, (0, 12));
        assert_eq!(
            lb.to_source([0.0, 12.0, 640.0, 372.0]),
            [0.0, 0.0, 1280.0, 720.0]
        );
        // Outside the picture is clipped to it.
        assert_eq!(
            lb.to_source([-5.0, 0.0, 700.0, 384.0]),
            [0.0, 0.0, 1280.0, 720.0]
        );
        let square = Letterbox::plan(1280, 720, 640, 32, false);
        assert_eq!((square.canvas, square.offset), ((640, 640), (0, 140)));
        // Small frames are scaled up, as the reference's `scaleup` does.
        let small = Letterbox::plan(97, 61, 640, 32, true);
        assert_eq!((small.scaled, small.canvas), ((640, 402), (640, 416)));
        assert_eq!(small.offset, (0, 7));
    }

    #[test]
    fn halving_and_copying_keep_values() {
        let rgb: Vec<u8> = (0..4 * 2 * 3).map(|i| (i * 10) as u8).collect();
        let half = resize_linear(&rgb, 4, 2, 2, 1);
        // First pixel, red: mean of 0, 30, 120, 150 = 75.
        assert_eq!(half[0], 75);
        let same = resize_linear(&rgb, 4, 2, 4, 2);
        assert_eq!(same, rgb);
    }
}
