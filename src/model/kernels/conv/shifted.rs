//! Kernels larger than 1x1 read from the padded input, split into the stride's phases and
//! shifted, instead of gathered columns: as one product per kernel position (MKL's), or as
//! one product whose right-hand rows are packed straight from the phases (the own
//! AVX512-BF16 product).

use super::element::*;
use super::geometry::*;
#[cfg(feature = "mkl")]
use super::mkl_filter;
use super::tiled::*;
#[cfg(target_arch = "x86_64")]
use crate::model::kernels::bf16_gemm::{Bf16LeftHand, Bf16Panels};
#[cfg(feature = "mkl")]
use crate::model::kernels::fused_linear::MatmulPrecision;
use rayon::prelude::*;

/// A convolution as `k²` products per tile, one per kernel position `(ky, kx)`, each of that
/// position's `(out, in)` filter with the input shifted by that position. The padded input
/// is split once into `stride²` phases (phase `(py, px)` holds the padded pixels whose row is
/// `py` and column `px` modulo the stride), so that position `(ky, kx)` reads phase
/// `(ky mod s, kx mod s)` shifted by `(ky / s, kx / s)`: with the output computed at the
/// phases' width (the last columns of each row are wasted), a shift is an offset, and the
/// input is copied (and rounded to bf16, unless it is bf16 already) once instead of
/// gathered `k²` times. Tiles are runs of output rows; each writes its bias into a tile
/// buffer of its thread, runs the products onto it and moves its rows, activated, into the
/// output.
#[cfg(feature = "mkl")]
pub(super) fn convolve_shifted<S: Element, O: Element>(
    filters: &[mkl_filter::PackedFilter],
    bias: &[f32],
    geometry: Geometry,
    epilogue: Epilogue<'_, O>,
    input: &Input<'_, S>,
    batch: usize,
) -> Vec<O> {
    let phases = Phases::new(geometry, input);
    let layer = Layer {
        bias,
        geometry,
        epilogue,
        tile_bytes: geometry.inp * 4,
    };
    // Each kernel position's product, `accumulate(filter, target, offset, width)`.
    let positions = |target: &Target, base: usize, width: usize, accumulate: &Accumulate| {
        for (position, filter) in filters.iter().enumerate() {
            accumulate(
                filter,
                target,
                base + phases.offset(geometry, position),
                width,
            );
        }
    };
    let planes = (batch, geometry.inp);
    if filters[0].precision() == MatmulPrecision::Bf16 {
        with_phased(&PHASED_BF16, &phases, input, planes, |phased| {
            shifted_products(layer, input, batch, &phases, |target, base, width| {
                positions(target, base, width, &|f, t, o, w| {
                    f.accumulate_bf16(t, &phased[o..], phases.channel_stride(), w)
                })
            })
        })
    } else {
        with_phased(&PHASED_F32, &phases, input, planes, |phased| {
            shifted_products(layer, input, batch, &phases, |target, base, width| {
                positions(target, base, width, &|f, t, o, w| {
                    f.accumulate_f32(t, &phased[o..], phases.channel_stride(), w)
                })
            })
        })
    }
}

/// `run` over the input's phases in `T`, filled into the calling thread's `buffer`, which
/// keeps it for the next layer and frame (see [`Phases::fill`]).
fn with_phased<S: Element, T: Element, R>(
    buffer: &'static std::thread::LocalKey<std::cell::Cell<Vec<T>>>,
    phases: &Phases,
    input: &Input<'_, S>,
    planes: (usize, usize),
    run: impl FnOnce(&[T]) -> R,
) -> R {
    buffer.with(|cell| {
        let mut kept = cell.take();
        let out = run(phases.fill(input, planes, &mut kept));
        cell.set(kept);
        out
    })
}

/// One kernel position's MKL product onto a tile, its right-hand side at an offset.
#[cfg(feature = "mkl")]
type Accumulate<'a> = dyn Fn(&mkl_filter::PackedFilter, &Target, usize, usize) + 'a;

/// A shifted convolution on the own AVX512-BF16 product: the phases in bf16, and per tile
/// one product whose right-hand row `(c, ky, kx)` is input channel `c`'s phases at kernel
/// position `(ky, kx)`'s offset, packed into the product's pairs as it is read.
#[cfg(target_arch = "x86_64")]
pub(super) fn convolve_shifted_own<S: Element, O: Element>(
    filter: &Bf16LeftHand,
    bias: &[f32],
    geometry: Geometry,
    epilogue: Epilogue<'_, O>,
    input: &Input<'_, S>,
    batch: usize,
) -> Vec<O> {
    let phases = Phases::new(geometry, input);
    let positions = geometry.kernel * geometry.kernel;
    // Where each row of the product starts in an image's phases.
    let starts: Vec<usize> = (0..geometry.depth())
        .map(|row| {
            let (channel, position) = (row / positions, row % positions);
            channel * phases.channel_stride() + phases.offset(geometry, position)
        })
        .collect();
    let layer = Layer {
        bias,
        geometry,
        epilogue,
        // The packed rows of a pixel: bf16 values over the whole depth.
        tile_bytes: geometry.depth() * 2,
    };
    with_phased(
        &PHASED_BF16,
        &phases,
        input,
        (batch, geometry.inp),
        |phased| {
            shifted_products(layer, input, batch, &phases, |target, base, width| {
                SHIFTED_PANELS.with_borrow_mut(|panels| {
                    panels.pack_rows_at(phased, |row| base + starts[row], starts.len(), width);
                    // SAFETY: the target holds one row of `width` values per output channel,
                    // the filter's rows, and is this task's alone.
                    unsafe { filter.accumulate(panels, target.out, target.stride) }
                })
            })
        },
    )
}

/// A shifted layer's parts beside its products: bias, geometry, epilogue, and the bytes a
/// tile's products hold per wide pixel (which sizes the tiles).
pub(super) struct Layer<'a, O> {
    bias: &'a [f32],
    geometry: Geometry,
    epilogue: Epilogue<'a, O>,
    tile_bytes: usize,
}

/// The tiles of a shifted convolution over its phased input: each writes its bias into a
/// tile buffer of its thread, `products(target, base, width)` adds the products of the
/// tile whose first wide pixel is at `base` in the phased input, and its rows, activated,
/// move into the output.
pub(super) fn shifted_products<S, O: Element>(
    layer: Layer<'_, O>,
    input: &Input<'_, S>,
    batch: usize,
    phases: &Phases,
    products: impl Fn(&Target, usize, usize) + Sync,
) -> Vec<O> {
    let Layer {
        bias,
        geometry,
        epilogue,
        tile_bytes,
    } = layer;
    let (channels, inp) = (geometry.out, geometry.inp);
    let (oh, ow, wq) = (input.oh, input.ow, phases.wq);
    let mut out: Vec<O> = Vec::with_capacity(batch * channels * oh * ow);
    let rows = shifted_tile_rows(tile_bytes, wq, oh, batch);
    let tiles_per_image = oh.div_ceil(rows);
    let out_ptr = SendPtr(out.as_mut_ptr());
    (0..batch * tiles_per_image)
        .into_par_iter()
        .for_each(|task| {
            let (image, tile) = (task / tiles_per_image, task % tiles_per_image);
            let (first, last) = (tile * rows, ((tile + 1) * rows).min(oh));
            let width = (last - first) * wq;
            TILE.with_borrow_mut(|buffer| {
                let wide = tile_rows(buffer, channels, width);
                let target = Target {
                    out: wide.as_mut_ptr(),
                    stride: width,
                };
                target.fill_bias(bias, width);
                products(&target, image * phases.image_size(inp) + first * wq, width);
                for (channel, wide_rows) in wide.chunks_exact_mut(width).enumerate() {
                    for (y, wide_row) in wide_rows.chunks_exact_mut(wq).enumerate() {
                        let offset = ((image * channels + channel) * oh + first + y) * ow;
                        // SAFETY: output row `first + y` of this channel and image: this
                        // task's alone, inside the output's capacity.
                        let row = unsafe { std::slice::from_raw_parts_mut(out_ptr.at(offset), ow) };
                        let at = (channel * oh + first + y) * ow;
                        epilogue.store(&mut wide_row[..ow], row, image, at);
                    }
                }
            })
        });
    // SAFETY: the tasks wrote every row of every output channel of every image.
    unsafe { out.set_len(batch * channels * oh * ow) };
    out
}

/// The phases of a shifted convolution's padded input: `stride²` planes of `hq × wq` per
/// input channel, laid out `[image][channel][phase][hq][wq]`, zero where they fall in the
/// padding or past the padded input.
pub(super) struct Phases {
    pub(super) stride: usize,
    pub(super) padding: usize,
    pub(super) hq: usize,
    pub(super) wq: usize,
    /// Values to spare past the last plane: the last rows' wasted columns read up to
    /// `(k - 1) / stride` values past it.
    pub(super) spare: usize,
}

impl Phases {
    pub(super) fn new<S>(geometry: Geometry, input: &Input<'_, S>) -> Self {
        let (hp, wp) = (
            input.h + 2 * geometry.padding,
            input.w + 2 * geometry.padding,
        );
        Self {
            stride: geometry.stride,
            padding: geometry.padding,
            hq: hp.div_ceil(geometry.stride),
            wq: wp.div_ceil(geometry.stride),
            spare: geometry.kernel,
        }
    }

    pub(super) fn plane(&self) -> usize {
        self.hq * self.wq
    }

    /// Where kernel position `position` (`ky · k + kx`) reads, from a channel's phases:
    /// phase `(ky mod s, kx mod s)`, shifted by `(ky / s, kx / s)`.
    pub(super) fn offset(&self, geometry: Geometry, position: usize) -> usize {
        let (ky, kx) = (position / geometry.kernel, position % geometry.kernel);
        let phase = (ky % self.stride) * self.stride + kx % self.stride;
        phase * self.plane() + (ky / self.stride) * self.wq + kx / self.stride
    }

    /// Values between two input channels' phases: the products' row stride.
    pub(super) fn channel_stride(&self) -> usize {
        self.stride * self.stride * self.plane()
    }

    pub(super) fn image_size(&self, channels: usize) -> usize {
        channels * self.channel_stride()
    }

    /// The phases of the input's `batch` images of `channels` in `buffer` (grown when too small, never shrunk: its values are
    /// all rewritten, so a buffer kept between calls costs no clearing), converted to `T`;
    /// the part of `buffer` that holds them.
    pub(super) fn fill<'a, S: Element, T: Element>(
        &self,
        input: &Input<'_, S>,
        (batch, channels): (usize, usize),
        buffer: &'a mut Vec<T>,
    ) -> &'a [T] {
        let planes = batch * channels;
        let per_channel = self.channel_stride();
        let size = planes * per_channel + self.spare;
        if buffer.len() < size {
            buffer.resize(size, T::default());
        }
        let (phased, spare) = buffer[..size].split_at_mut(planes * per_channel);
        spare.fill(T::default());
        let plane_size = input.h * input.w;
        phased
            .par_chunks_mut(per_channel)
            .enumerate()
            .for_each(|(index, phases)| {
                let (image, channel) = (index / channels, index % channels);
                let image = input.image(image, channels);
                let plane = &image[channel * plane_size..(channel + 1) * plane_size];
                let mut row = vec![S::default(); self.wq];
                for (phase, out) in phases.chunks_exact_mut(self.plane()).enumerate() {
                    let (py, px) = (phase / self.stride, phase % self.stride);
                    for (i, out_row) in out.chunks_exact_mut(self.wq).enumerate() {
                        let y = (i * self.stride + py).wrapping_sub(self.padding);
                        if y >= input.h {
                            out_row.fill(T::default());
                            continue;
                        }
                        self.gather_row(&plane[y * input.w..(y + 1) * input.w], px, &mut row);
                        S::copy_into(&row, out_row);
                    }
                }
            });
        &buffer[..size]
    }

    /// Phase column `px`'s values of one input row, padded: value `j` is the input's column
    /// `j · stride + px - padding`, 0 outside the row.
    pub(super) fn gather_row<S: Element>(&self, source: &[S], px: usize, row: &mut [S]) {
        let w = source.len();
        if self.stride == 1 {
            let (left, right) = row.split_at_mut(self.padding);
            left.fill(S::default());
            right[..w].copy_from_slice(source);
            right[w..].fill(S::default());
            return;
        }
        for (j, value) in row.iter_mut().enumerate() {
            let x = (j * self.stride + px).wrapping_sub(self.padding);
            *value = if x < w { source[x] } else { S::default() };
        }
    }
}

/// Output rows per tile of a shifted convolution: what its products hold for the tile
/// (`bytes` per wide pixel, over `wq` of them a row) fits [`COLUMN_BYTES`], and every
/// thread gets about two tiles.
pub(super) fn shifted_tile_rows(bytes: usize, wq: usize, oh: usize, batch: usize) -> usize {
    let fits = COLUMN_BYTES / (bytes * wq);
    let wanted_tiles = 2 * rayon::current_num_threads().max(1);
    let per_image = wanted_tiles.div_ceil(batch).max(1);
    fits.min(oh.div_ceil(per_image)).clamp(1, oh.max(1))
}

thread_local! {
    /// A shifted convolution's phased input, f32 or bf16, kept by the calling thread between
    /// layers and frames (see [`Phases::fill`]).
    #[cfg(feature = "mkl")]
    pub(super) static PHASED_F32: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
    pub(super) static PHASED_BF16: std::cell::Cell<Vec<u16>> = const { std::cell::Cell::new(Vec::new()) };
    /// A tile's right-hand rows packed for the own bf16 product.
    #[cfg(target_arch = "x86_64")]
    static SHIFTED_PANELS: std::cell::RefCell<Bf16Panels> = std::cell::RefCell::new(Bf16Panels::default());
}
