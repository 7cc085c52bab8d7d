//! Gathering a tile's input into the columns of its product (im2col), or reading a pointwise
//! layer's input in place.

use super::geometry::*;

/// The tile's right-hand matrix `(in·k², width)`: a slice of the image itself for a
/// pointwise layer (with its row stride), else the columns gathered into `columns`.
pub(super) fn right_hand<'a>(
    geometry: Geometry,
    input: &Input<'_, f32>,
    tile: &Tile<'a, f32>,
    columns: &'a mut Vec<f32>,
) -> (&'a [f32], usize) {
    if geometry.pointwise() {
        let pixels = input.pixels();
        let end = (geometry.inp - 1) * pixels + tile.first + tile.width;
        return (&tile.image[tile.first..end], pixels);
    }
    // Grown, never cleared: im2col writes every value.
    let size = geometry.depth() * tile.width;
    if columns.len() < size {
        columns.resize(size, 0.0);
    }
    im2col(geometry, input, tile, &mut columns[..size]);
    (&columns[..size], tile.width)
}

/// Gathers the tile's columns: row `(c, ky, kx)` of `columns` holds, for each of the tile's
/// output pixels, the input value under kernel position `(ky, kx)` of channel `c` (0 in the
/// padding).
pub(super) fn im2col(
    geometry: Geometry,
    input: &Input<'_, f32>,
    tile: &Tile<'_, f32>,
    columns: &mut [f32],
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
                out.fill(0.0);
                continue;
            }
            let source = &plane[iy * w..(iy + 1) * w];
            gather_run(source, out, ox0, (ox_start, ox_end), stride, kx, padding);
        }
    }
}

/// One output row's run from output x `ox0` on: the input values at `ox · stride + kx -
/// padding`, 0 outside `inside` (the output x whose input is in the row).
pub(super) fn gather_run(
    source: &[f32],
    out: &mut [f32],
    ox0: usize,
    (inside_start, inside_end): (usize, usize),
    stride: usize,
    kx: usize,
    padding: usize,
) {
    let end = ox0 + out.len();
    let (start, stop) = (inside_start.clamp(ox0, end), inside_end.clamp(ox0, end));
    if start >= stop {
        out.fill(0.0);
        return;
    }
    out[..start - ox0].fill(0.0);
    out[stop - ox0..].fill(0.0);
    let first = start * stride + kx - padding;
    let inside = &mut out[start - ox0..stop - ox0];
    if stride == 1 {
        inside.copy_from_slice(&source[first..first + inside.len()]);
    } else {
        for (i, value) in inside.iter_mut().enumerate() {
            *value = source[first + i * stride];
        }
    }
}
