//! Gathering a tile's input into the columns of its product (im2col), or reading a pointwise
//! layer's input in place.

use super::geometry::*;
#[cfg(target_arch = "x86_64")]
use crate::model::kernels::cpu_kernels::first_lanes;

/// The tile's right-hand matrix `(in·k², width)`: a slice of the image itself for a
/// pointwise layer (with its row stride), else the columns gathered into `columns`.
pub(super) fn right_hand<'a, T: Gathered>(
    geometry: Geometry,
    input: &Input<'_, T>,
    tile: &Tile<'a, T>,
    columns: &'a mut Vec<T>,
) -> (&'a [T], usize) {
    if geometry.pointwise() {
        let pixels = input.pixels();
        let end = (geometry.inp - 1) * pixels + tile.first + tile.width;
        return (&tile.image[tile.first..end], pixels);
    }
    // Grown, never cleared: im2col writes every value.
    let size = geometry.depth() * tile.width;
    if columns.len() < size {
        columns.resize(size, T::default());
    }
    im2col(geometry, input, tile, &mut columns[..size]);
    (&columns[..size], tile.width)
}

/// Gathers the tile's columns: row `(c, ky, kx)` of `columns` holds, for each of the tile's
/// output pixels, the input value under kernel position `(ky, kx)` of channel `c` (0 in the
/// padding). `T::default()` is 0 for f32 and for bf16 bit patterns alike.
pub(super) fn im2col<T: Gathered>(
    geometry: Geometry,
    input: &Input<'_, T>,
    tile: &Tile<'_, T>,
    columns: &mut [T],
) {
    let Geometry {
        kernel,
        stride,
        padding,
        ..
    } = geometry;
    let (h, w, ow) = (input.h, input.w, input.ow);
    let width = tile.width;
    for (row, column) in columns.chunks_exact_mut(width).enumerate() {
        let (channel, ky, kx) = (row / (kernel * kernel), row / kernel % kernel, row % kernel);
        let plane = &tile.image[channel * h * w..(channel + 1) * h * w];
        // The output x whose input x (`ox · stride + kx - padding`) is inside the image.
        let ox_start = padding.saturating_sub(kx).div_ceil(stride);
        let ox_end = if w + padding > kx {
            ((w + padding - kx - 1) / stride + 1).min(ow)
        } else {
            0
        };
        let mut done = 0;
        while done < width {
            let pixel = tile.first + done;
            let (oy, ox0) = (pixel / ow, pixel % ow);
            let run = (ow - ox0).min(width - done);
            let out = &mut column[done..done + run];
            done += run;
            let iy = (oy * stride + ky).wrapping_sub(padding);
            if iy >= h {
                out.fill(T::default());
                continue;
            }
            let source = &plane[iy * w..(iy + 1) * w];
            gather_run(source, out, ox0, (ox_start, ox_end), stride, kx, padding);
        }
    }
}

/// One output row's run from output x `ox0` on: the input values at `ox · stride + kx -
/// padding`, 0 outside `inside` (the output x whose input is in the row).
pub(super) fn gather_run<T: Gathered>(
    source: &[T],
    out: &mut [T],
    ox0: usize,
    (inside_start, inside_end): (usize, usize),
    stride: usize,
    kx: usize,
    padding: usize,
) {
    let end = ox0 + out.len();
    let (start, stop) = (inside_start.clamp(ox0, end), inside_end.clamp(ox0, end));
    if start >= stop {
        out.fill(T::default());
        return;
    }
    out[..start - ox0].fill(T::default());
    out[stop - ox0..].fill(T::default());
    let first = start * stride + kx - padding;
    let inside = &mut out[start - ox0..stop - ox0];
    if stride == 1 {
        inside.copy_from_slice(&source[first..first + inside.len()]);
    } else if stride == 2 {
        every_other(&source[first..first + 2 * inside.len() - 1], inside);
    } else {
        for (i, value) in inside.iter_mut().enumerate() {
            *value = source[first + i * stride];
        }
    }
}

/// A type columns are gathered in (f32, or bf16 as its bit pattern), with the stride-2
/// gather of the stride-2 layers, which takes most of the gathering's time when done a
/// value at a time.
pub(super) trait Gathered: Copy + Default {
    /// [`every_other`] on this CPU's vector unit, where it has one for this type.
    fn every_other_wide() -> Option<Wide<Self>>;
}

/// A stride-2 gather on a vector unit; the caller checks the extents.
pub(super) type Wide<T> = unsafe fn(&[T], &mut [T]);

/// `out[i] = source[2 i]`, `source` holding `2 · out.len() - 1` values.
pub(super) fn every_other<T: Gathered>(source: &[T], out: &mut [T]) {
    assert_eq!(source.len() + 1, 2 * out.len());
    if let Some(wide) = T::every_other_wide() {
        // SAFETY: the extents are checked above, and the unit was detected on this CPU.
        return unsafe { wide(source, out) };
    }
    for (i, value) in out.iter_mut().enumerate() {
        *value = source[2 * i];
    }
}

impl Gathered for f32 {
    fn every_other_wide() -> Option<Wide<Self>> {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            return Some(every_other_f32_avx512);
        }
        None
    }
}

impl Gathered for u16 {
    fn every_other_wide() -> Option<Wide<Self>> {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512bw") {
            return Some(every_other_u16_avx512);
        }
        None
    }
}

/// [`every_other`] of f32, 16 values a step: two loads, the even lanes of both.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn every_other_f32_avx512(source: &[f32], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let evens = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    for (step, chunk) in out.chunks_mut(16).enumerate() {
        let from = 32 * step;
        let left = source.len() - from;
        let (low, high) = (
            first_lanes(left) as u16,
            first_lanes(left.saturating_sub(16)) as u16,
        );
        // SAFETY: the masks keep both loads inside `source` and the store inside `chunk`.
        unsafe {
            let a = _mm512_maskz_loadu_ps(low, source.as_ptr().add(from));
            let b = _mm512_maskz_loadu_ps(high, source.as_ptr().add(from + 16));
            let picked = _mm512_permutex2var_ps(a, evens, b);
            _mm512_mask_storeu_ps(chunk.as_mut_ptr(), first_lanes(chunk.len()) as u16, picked);
        }
    }
}

/// [`every_other`] of bf16 bit patterns, 16 values a step: 32 loaded, each
/// 32-bit lane narrowed to its low (even) half.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn every_other_u16_avx512(source: &[u16], out: &mut [u16]) {
    use std::arch::x86_64::*;
    for (step, chunk) in out.chunks_mut(16).enumerate() {
        let from = 32 * step;
        let lanes = first_lanes(source.len() - from);
        // SAFETY: the masks keep the load inside `source` and the store inside `chunk`.
        unsafe {
            let pairs = _mm512_maskz_loadu_epi16(lanes, source.as_ptr().add(from) as *const i16);
            let evens = _mm512_cvtepi32_epi16(pairs);
            let store = first_lanes(chunk.len()) as u16;
            _mm256_mask_storeu_epi16(chunk.as_mut_ptr() as *mut i16, store, evens);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every length around the 16-value steps, f32 and bf16 bit patterns.
    #[test]
    fn every_other_takes_the_even_values() {
        for len in 1..50 {
            let source: Vec<u16> = (0..2 * len - 1).map(|i| i as u16 * 3 + 1).collect();
            let mut out = vec![0u16; len];
            every_other(&source, &mut out);
            let expected: Vec<u16> = source.iter().step_by(2).copied().collect();
            assert_eq!(out, expected, "u16, {len}");
            let source: Vec<f32> = source.iter().map(|&v| f32::from(v) * 0.5).collect();
            let mut out = vec![0f32; len];
            every_other(&source, &mut out);
            let expected: Vec<f32> = source.iter().step_by(2).copied().collect();
            assert_eq!(out, expected, "f32, {len}");
        }
    }
}
