//! The per-tile products that are not MKL's: the `gemm` crate's f32 product and the own
//! AVX512-BF16 product, with the packing it needs.

use super::geometry::*;
#[cfg(target_arch = "x86_64")]
use crate::model::kernels::bf16_gemm::{Bf16LeftHand, Bf16Panels, PanelValue};
#[cfg(feature = "mkl")]
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

/// `target = bias + filter · rhs` on the own AVX512-BF16 product, `rhs` `depth` rows of
/// `width` values `ldb` apart, f32 or bf16: the rows are packed into the product's pairs
/// (an f32 value rounded to bf16 on the way), and the product runs onto the target's rows
/// as they lie, output channel by output channel.
#[cfg(target_arch = "x86_64")]
pub(super) fn own_bf16_tile<T: PanelValue>(
    filter: &Bf16LeftHand,
    bias: &[f32],
    rhs: &[T],
    ldb: usize,
    width: usize,
    target: &Target,
) {
    target.fill_bias(bias, width);
    PANELS.with_borrow_mut(|panels| {
        panels.pack(rhs, ldb, filter.dims().1, width);
        // SAFETY: the target holds one row of the tile's width per output channel, the
        // filter's rows, and is this task's alone.
        unsafe { filter.accumulate(panels, target.out, target.stride) }
    })
}

thread_local! {
    /// A tile's right-hand matrix rounded to bf16.
    #[cfg(feature = "mkl")]
    pub(super) static ROUNDED: RefCell<Vec<u16>> = const { RefCell::new(Vec::new()) };
    /// A tile's right-hand matrix packed for the own bf16 product.
    #[cfg(target_arch = "x86_64")]
    static PANELS: RefCell<Bf16Panels> = RefCell::new(Bf16Panels::default());
}
