//! A layer's output cut into tiles that rayon's threads share: each tile's products onto a
//! buffer that stays in the cache, then the epilogue (activation, residual) and the store.

use super::element::*;
use super::geometry::*;
use super::im2col::*;
use super::own_products::*;
use super::product::*;
use crate::model::kernels::cpu_kernels;
#[cfg(feature = "mkl")]
use crate::model::kernels::fused_linear::MatmulPrecision;
use rayon::prelude::*;
use std::cell::RefCell;

/// The output `[batch, out, oh, ow]` of the layer over `input`. An f32 output is the
/// products' target itself; a bf16 one is rounded from a tile buffer of the thread, after
/// the activation, while the tile is in the cache.
pub(super) fn convolve<S: Source, O: Element>(
    product: &Product,
    geometry: Geometry,
    epilogue: Epilogue<'_, O>,
    input: &Input<'_, S>,
    batch: usize,
) -> Vec<O> {
    tiled(
        geometry,
        epilogue,
        input.pixels(),
        batch,
        |image, first, width, target| {
            let tile = Tile {
                image: input.image(image, geometry.inp),
                first,
                width,
            };
            S::run_tile(product, geometry, input, &tile, target)
        },
    )
}

/// The output `[batch, out, pixels]` of a layer whose tiles `run(image, first pixel, width,
/// target)` writes, bias included, then the epilogue. An f32 output is the products' target
/// itself; a bf16 one is rounded from a tile buffer of the thread, after the epilogue,
/// while the tile is in the cache.
pub(super) fn tiled<O: Element>(
    geometry: Geometry,
    epilogue: Epilogue<'_, O>,
    pixels: usize,
    batch: usize,
    run: impl Fn(usize, usize, usize, &Target) + Sync,
) -> Vec<O> {
    let total = batch * geometry.out * pixels;
    let mut out: Vec<O> = Vec::with_capacity(total);
    let width = tile_width(geometry.depth(), pixels, batch);
    let tiles_per_image = pixels.div_ceil(width);
    let out_ptr = SendPtr(out.as_mut_ptr());
    (0..batch * tiles_per_image)
        .into_par_iter()
        .for_each(|task| {
            let (image, tile) = (task / tiles_per_image, task % tiles_per_image);
            let first = tile * width;
            let width = (pixels - first).min(width);
            // SAFETY: the output has `total` values of capacity; this task writes only
            // image `image`'s pixels `first..first + width` of each output channel, which
            // no other task writes.
            let out = unsafe { out_ptr.at(image * geometry.out * pixels + first) };
            if O::IS_F32 {
                let target = Target {
                    out: out.cast(),
                    stride: pixels,
                };
                run(image, first, width, &target);
                for channel in 0..geometry.out {
                    // SAFETY: one row per output channel, the tile's width.
                    let row = unsafe { target.row(channel, width) };
                    epilogue.apply(row, image, channel * pixels + first);
                }
                return;
            }
            TILE.with_borrow_mut(|buffer| {
                let rows = tile_rows(buffer, geometry.out, width);
                let target = Target {
                    out: rows.as_mut_ptr(),
                    stride: width,
                };
                run(image, first, width, &target);
                for (channel, row) in rows.chunks_exact_mut(width).enumerate() {
                    // SAFETY: this channel's pixels of the tile, as above.
                    let out =
                        unsafe { std::slice::from_raw_parts_mut(out.add(channel * pixels), width) };
                    epilogue.store(row, out, image, channel * pixels + first);
                }
            })
        });
    // SAFETY: the tasks wrote every pixel of every output channel of every image.
    unsafe { out.set_len(total) };
    out
}

/// `channels` rows of `width` values in `buffer`, grown when too small (their values are
/// the caller's to write).
pub(super) fn tile_rows(buffer: &mut Vec<f32>, channels: usize, width: usize) -> &mut [f32] {
    if buffer.len() < channels * width {
        buffer.resize(channels * width, 0.0);
    }
    &mut buffer[..channels * width]
}

/// What a layer does to its products' output before it stores it, on a row of a tile
/// while the tile is in the cache: the activation, then the residual when there is one.
#[derive(Clone, Copy)]
pub(super) struct Epilogue<'a, O> {
    pub(super) activation: ConvActivation,
    pub(super) residual: Option<Planes<'a, O>>,
    /// Values per output image.
    pub(super) image_size: usize,
}

impl<O: Element> Epilogue<'_, O> {
    /// Applies it to `row`, image `image`'s output values from `offset` on, in place.
    pub(super) fn apply(&self, row: &mut [f32], image: usize, offset: usize) {
        if self.activation == ConvActivation::Silu {
            cpu_kernels::silu_in_place(row);
        }
        if let Some(residual) = self.residual {
            let residual = &residual.image(image, self.image_size)[offset..offset + row.len()];
            O::add_into(residual, row);
        }
    }

    /// Applies it to `row`, then stores the row in `out`, in `out`'s type.
    pub(super) fn store(&self, row: &mut [f32], out: &mut [O], image: usize, offset: usize) {
        self.apply(row, image, offset);
        O::store(row, out);
    }
}

/// How a tile's product reads an input of this type: f32 through [`right_hand`]; bf16
/// through it too on the own AVX512-BF16 product, and as it stands on MKL's bf16 product of
/// a pointwise layer ([`Conv2d::reads_bf16`](super::Conv2d)).
pub(super) trait Source: Element {
    /// Bias, then the tile's product onto it, into `target`.
    fn run_tile(
        product: &Product,
        geometry: Geometry,
        input: &Input<'_, Self>,
        tile: &Tile<'_, Self>,
        target: &Target,
    );
}

impl Source for u16 {
    fn run_tile(
        product: &Product,
        geometry: Geometry,
        input: &Input<'_, Self>,
        tile: &Tile<'_, Self>,
        target: &Target,
    ) {
        #[cfg(target_arch = "x86_64")]
        if let Product::OwnBf16 { filter, bias } = product {
            return BF16_COLUMNS.with_borrow_mut(|columns| {
                let (rhs, ldb) = right_hand(geometry, input, tile, columns);
                own_bf16_tile(filter, bias, rhs, ldb, tile.width, target)
            });
        }
        #[cfg(feature = "mkl")]
        if let Product::Mkl { filter, bias } = product
            && geometry.pointwise()
        {
            let pixels = input.pixels();
            let end = (geometry.inp - 1) * pixels + tile.first + tile.width;
            target.fill_bias(bias, tile.width);
            return filter.accumulate_bf16(
                target,
                &tile.image[tile.first..end],
                pixels,
                tile.width,
            );
        }
        let _ = (product, geometry, input, tile, target);
        unreachable!("only the own bf16 product and MKL's bf16 pointwise layers read bf16 tiles")
    }
}

impl Source for f32 {
    fn run_tile(
        product: &Product,
        geometry: Geometry,
        input: &Input<'_, f32>,
        tile: &Tile<'_, f32>,
        target: &Target,
    ) {
        let width = tile.width;
        COLUMNS.with_borrow_mut(|columns| {
            let (rhs, ldb) = right_hand(geometry, input, tile, columns);
            match product {
                Product::Candle { .. } => unreachable!("candle's layers do not come here"),
                #[cfg(feature = "mkl")]
                Product::MklShifted { .. } => {
                    unreachable!("shifted layers go by convolve_shifted")
                }
                Product::Gemm { filter, bias } => {
                    target.fill_bias(bias, width);
                    let dims = (geometry.out, geometry.depth());
                    gemm_onto(filter, dims, rhs, ldb, width, target)
                }
                #[cfg(feature = "mkl")]
                Product::Mkl { filter, bias } => {
                    target.fill_bias(bias, width);
                    match filter.precision() {
                        MatmulPrecision::F32 => filter.accumulate_f32(target, rhs, ldb, width),
                        MatmulPrecision::Bf16 => ROUNDED.with_borrow_mut(|rounded| {
                            round_rows(rhs, ldb, geometry.depth(), width, rounded);
                            filter.accumulate_bf16(target, rounded, width, width)
                        }),
                    }
                }
                #[cfg(target_arch = "x86_64")]
                Product::OwnBf16 { filter, bias } => {
                    own_bf16_tile(filter, bias, rhs, ldb, width, target)
                }
            }
        })
    }
}

thread_local! {
    /// A tile's products' output, channels by pixels, when the layer's output is not the
    /// products' f32 target itself.
    pub(super) static TILE: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// A tile's gathered columns, f32.
    pub(super) static COLUMNS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// A tile's gathered columns, bf16.
    #[cfg(target_arch = "x86_64")]
    static BF16_COLUMNS: RefCell<Vec<u16>> = const { RefCell::new(Vec::new()) };
}
