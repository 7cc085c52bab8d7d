//! The per-tile products that are not MKL's: the `gemm` crate's f32 product and the own
//! AVX512-BF16 product, with the rounding and transposing they need.

use super::geometry::*;
#[cfg(target_arch = "x86_64")]
use crate::model::kernels::bf16_gemm::PackedBf16Weight;
use crate::model::kernels::cpu_kernels;
use std::cell::RefCell;

/// `target += filter · rhs` by the `gemm` crate, on this thread: `filter` `(out, depth)`
/// row-major, `rhs` `depth` rows of `width` values `ldb` apart.
pub(super) fn gemm_onto(
    filter: &[f32],
    (out, depth): (usize, usize),
    rhs: &[f32],
    ldb: usize,
    width: usize,
    target: &Target,
) {
    assert_eq!(filter.len(), out * depth);
    assert!(rhs.len() >= (depth - 1) * ldb + width);
    // SAFETY: `filter` is out × depth row-major, `rhs` depth rows of `width` values `ldb`
    // apart, the target out rows of `width` values `stride` apart, all inside their
    // buffers; gemm computes dst = alpha·dst + beta·lhs·rhs, so alpha 1 keeps the bias.
    unsafe {
        gemm::gemm(
            out,
            width,
            depth,
            target.out,
            1,
            target.stride as isize,
            true,
            filter.as_ptr(),
            1,
            depth as isize,
            rhs.as_ptr(),
            1,
            ldb as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// `rows` rows of `width` values, `stride` apart in `values`, rounded to bf16 into
/// `rounded` (`rows × width`).
#[cfg(feature = "mkl")]
pub(super) fn round_rows(
    values: &[f32],
    stride: usize,
    rows: usize,
    width: usize,
    rounded: &mut Vec<u16>,
) {
    rounded.clear();
    rounded.resize(rows * width, 0);
    for (row, out) in rounded.chunks_exact_mut(width).enumerate() {
        cpu_kernels::round_to_bf16(&values[row * stride..row * stride + width], out);
    }
}

/// The own bf16 product takes pixels as rows: the tile's columns transposed and rounded,
/// the product into a pixels-by-channels buffer that starts as the bias, then transposed
/// into the target.
#[cfg(target_arch = "x86_64")]
pub(super) fn own_bf16_tile(
    filter: &PackedBf16Weight,
    bias: &[f32],
    rhs: &[f32],
    ldb: usize,
    width: usize,
    target: &Target,
) {
    let (out, depth) = filter.dims();
    let stride = filter.input_stride();
    ROUNDED.with_borrow_mut(|rounded| {
        rounded.clear();
        rounded.resize(width * stride, 0);
        transpose_to_bf16(rhs, ldb, depth, width, rounded, stride);
        PIXEL_ROWS.with_borrow_mut(|rows| {
            rows.clear();
            rows.reserve(width * out);
            for _ in 0..width {
                rows.extend_from_slice(bias);
            }
            filter.accumulate_product_here(rows, rounded, width);
            for channel in 0..out {
                // SAFETY: one row per output channel, the tile's width.
                let row = unsafe { target.row(channel, width) };
                for (pixel, value) in row.iter_mut().enumerate() {
                    *value = rows[pixel * out + channel];
                }
            }
        })
    })
}

/// Square blocks a transpose goes by, so both sides are read and written a cache line at a
/// time.
#[cfg(target_arch = "x86_64")]
pub(super) const TRANSPOSE_BLOCK: usize = 16;

/// `values` (`depth` rows of `width` values, `ldb` apart) transposed into `out` (`width`
/// rows of `stride` values) and rounded to bf16.
#[cfg(target_arch = "x86_64")]
pub(super) fn transpose_to_bf16(
    values: &[f32],
    ldb: usize,
    depth: usize,
    width: usize,
    out: &mut [u16],
    stride: usize,
) {
    let mut block = [0f32; TRANSPOSE_BLOCK];
    let mut rounded = [0u16; TRANSPOSE_BLOCK];
    for k0 in (0..depth).step_by(TRANSPOSE_BLOCK) {
        let ks = (depth - k0).min(TRANSPOSE_BLOCK);
        for pixel in 0..width {
            for (i, v) in block[..ks].iter_mut().enumerate() {
                *v = values[(k0 + i) * ldb + pixel];
            }
            cpu_kernels::round_to_bf16(&block[..ks], &mut rounded[..ks]);
            out[pixel * stride + k0..pixel * stride + k0 + ks].copy_from_slice(&rounded[..ks]);
        }
    }
}

thread_local! {
    /// A tile's right-hand matrix rounded to bf16.
    pub(super) static ROUNDED: RefCell<Vec<u16>> = const { RefCell::new(Vec::new()) };
    /// The own bf16 product's output tile, pixels by channels.
    pub(super) static PIXEL_ROWS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}
