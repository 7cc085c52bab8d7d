//! 2-D convolutions for the convolutional families (YOLO-World): one layer type holding a
//! convolution whose batch norm is already folded into its weight and bias, with its
//! activation fused, taking and giving NCHW tensors.
//!
//! On the CPU a convolution is a matrix product per image, `Y (out, pixels) = W (out, in·k²)
//! · columns (in·k², pixels)`, which keeps NCHW on both sides: a 1x1 convolution at stride 1
//! reads its input as the right-hand matrix as it stands, and a larger kernel gathers its
//! input into those columns first (im2col). The filter is packed once, at construction,
//! for the product that runs it: MKL's packed f32 or bf16 product (bf16 on AMX), the
//! project's own AVX512-BF16 product, or the `gemm` crate's f32 product in a build without
//! MKL. Each image's output pixels are cut into tiles that rayon's threads share; a tile
//! gathers its columns into a buffer that stays in the L2 cache, writes the bias into its
//! output, runs the product onto it on its own thread and applies the activation, so the
//! output is written once and read once more. With MKL, a stride-1 kernel larger than 1x1
//! gathers nothing: it runs one product per kernel position over the padded input, shifted
//! (`convolve_shifted`). candle's own `conv2d` (im2col into a full
//! buffer, a product into a zeroed output, then separate single-threaded bias and
//! activation passes) runs anything else: other devices and dtypes.

#[cfg(target_arch = "x86_64")]
use crate::model::kernels::bf16_gemm::PackedBf16Weight;
use crate::model::kernels::cpu_kernels;
use crate::model::kernels::fused_linear::{self, Bf16Product, MatmulPrecision};
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Module, Result, Shape, Tensor};
use rayon::prelude::*;
use std::cell::RefCell;
use std::sync::Arc;

/// The activation applied to a convolution's output inside the layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConvActivation {
    /// The raw convolution (the detection head's last 1x1 layers).
    Identity,
    /// `x * sigmoid(x)`, Ultralytics' `Conv` block.
    Silu,
}

/// A convolution with square kernel, equal stride and padding on both axes, no groups and no
/// dilation: every convolution YOLO-World has.
#[derive(Clone)]
pub struct Conv2d {
    product: Arc<Product>,
    geometry: Geometry,
    activation: ConvActivation,
}

/// The sizes that fix a layer's arithmetic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Geometry {
    out: usize,
    inp: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
}

impl Geometry {
    /// The inner dimension of the product: `in · k²`.
    fn depth(&self) -> usize {
        self.inp * self.kernel * self.kernel
    }

    /// A 1x1 kernel at stride 1 without padding: the input is the product's right-hand
    /// matrix as it stands.
    fn pointwise(&self) -> bool {
        self.kernel == 1 && self.stride == 1 && self.padding == 0
    }

    /// A stride-1 kernel larger than 1x1: one product per kernel position over the padded
    /// input shifted by that position, instead of gathered columns (MKL's products only).
    #[cfg(feature = "mkl")]
    fn shifted(&self) -> bool {
        self.kernel > 1 && self.stride == 1
    }

    /// The output's spatial size for an input of `(h, w)`.
    fn output_size(&self, h: usize, w: usize) -> Result<(usize, usize)> {
        let (padded_h, padded_w) = (h + 2 * self.padding, w + 2 * self.padding);
        if padded_h < self.kernel || padded_w < self.kernel || self.stride == 0 {
            candle_core::bail!(
                "convolution: a {h}x{w} input is smaller than the {k}x{k} kernel",
                k = self.kernel
            )
        }
        Ok((
            (padded_h - self.kernel) / self.stride + 1,
            (padded_w - self.kernel) / self.stride + 1,
        ))
    }
}

/// The product a layer runs on, with its filter in that product's form.
enum Product {
    /// candle's `conv2d`, for a filter that is not on the CPU or neither f32 nor bf16.
    Candle {
        weight: Tensor,
        bias: Option<Tensor>,
    },
    /// Rows of `(out, in·k²)` f32 values, for the `gemm` crate.
    Gemm { filter: Vec<f32>, bias: Vec<f32> },
    /// Packed for MKL, f32 or bf16.
    #[cfg(feature = "mkl")]
    Mkl {
        filter: mkl_filter::PackedFilter,
        bias: Vec<f32>,
    },
    /// A stride-1 kernel larger than 1x1 as one packed `(out, in)` filter per kernel
    /// position, for MKL (see [`convolve_shifted`]).
    #[cfg(feature = "mkl")]
    MklShifted {
        filters: Vec<mkl_filter::PackedFilter>,
        bias: Vec<f32>,
    },
    /// Rounded to bf16 and packed for the own AVX512-BF16 product.
    #[cfg(target_arch = "x86_64")]
    OwnBf16 {
        filter: PackedBf16Weight,
        bias: Vec<f32>,
    },
}

impl Product {
    fn name(&self) -> &'static str {
        match self {
            Self::Candle { .. } => "candle",
            Self::Gemm { .. } => "gemm-f32",
            #[cfg(feature = "mkl")]
            Self::Mkl { filter, .. } => match filter.precision() {
                MatmulPrecision::F32 => "mkl-f32",
                MatmulPrecision::Bf16 => "mkl-bf16",
            },
            #[cfg(feature = "mkl")]
            Self::MklShifted { filters, .. } => match filters[0].precision() {
                MatmulPrecision::F32 => "mkl-f32-shifted",
                MatmulPrecision::Bf16 => "mkl-bf16-shifted",
            },
            #[cfg(target_arch = "x86_64")]
            Self::OwnBf16 { .. } => "own-bf16",
        }
    }
}

/// Which CPU product a layer is built for; tests build each one that this build and CPU
/// have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CpuProduct {
    /// The f32 product of a build without MKL (tests run it in every build).
    #[cfg_attr(feature = "mkl", allow(dead_code))]
    Gemm,
    #[cfg(feature = "mkl")]
    Mkl(MatmulPrecision),
    #[cfg(target_arch = "x86_64")]
    OwnBf16,
}

impl CpuProduct {
    /// The product [`FusedLinear`](super::fused_linear::FusedLinear) would run a layer of
    /// `precision` on: bf16 where [`fused_linear::bf16_product`] says, else f32.
    fn for_precision(precision: MatmulPrecision) -> Self {
        let f32_product = {
            #[cfg(feature = "mkl")]
            let product = Self::Mkl(MatmulPrecision::F32);
            #[cfg(not(feature = "mkl"))]
            let product = Self::Gemm;
            product
        };
        if precision == MatmulPrecision::F32 {
            return f32_product;
        }
        match fused_linear::bf16_product() {
            #[cfg(target_arch = "x86_64")]
            Some(Bf16Product::AvxDot) => Self::OwnBf16,
            #[cfg(feature = "mkl")]
            Some(Bf16Product::Mkl) => Self::Mkl(MatmulPrecision::Bf16),
            _ => f32_product,
        }
    }
}

impl Conv2d {
    /// A layer from its weight `[out, in, k, k]` and bias `[out]` (batch norm folded in by the
    /// caller). A bf16 weight makes a layer whose product runs in bf16 where the CPU has a
    /// bf16 product (see [`Self::new_as`]), an f32 one in f32.
    pub fn new(
        weight: Tensor,
        bias: Option<Tensor>,
        stride: usize,
        padding: usize,
        activation: ConvActivation,
    ) -> Result<Self> {
        let precision = match weight.dtype() {
            DType::BF16 => MatmulPrecision::Bf16,
            _ => MatmulPrecision::F32,
        };
        Self::new_as(weight, bias, stride, padding, activation, precision)
    }

    /// A layer whose product runs in `precision`, as a
    /// [`FusedLinear`](super::fused_linear::FusedLinear) of that precision would: bf16
    /// products (f32 accumulation) where [`fused_linear::bf16_product`] has one, f32
    /// elsewhere. Inputs and outputs keep their dtype either way.
    pub fn new_as(
        weight: Tensor,
        bias: Option<Tensor>,
        stride: usize,
        padding: usize,
        activation: ConvActivation,
        precision: MatmulPrecision,
    ) -> Result<Self> {
        let product = CpuProduct::for_precision(precision);
        Self::with_product(weight, bias, stride, padding, activation, product)
    }

    fn with_product(
        weight: Tensor,
        bias: Option<Tensor>,
        stride: usize,
        padding: usize,
        activation: ConvActivation,
        product: CpuProduct,
    ) -> Result<Self> {
        let (out, inp, kh, kw) = weight.dims4()?;
        if kh != kw {
            candle_core::bail!("convolution kernel {kh}x{kw} is not square");
        }
        if stride == 0 {
            candle_core::bail!("convolution stride 0");
        }
        if let Some(bias) = &bias
            && bias.dims() != [out]
        {
            candle_core::bail!("convolution bias {:?} for {out} outputs", bias.dims());
        }
        let geometry = Geometry {
            out,
            inp,
            kernel: kh,
            stride,
            padding,
        };
        let on_cpu = weight.device().is_cpu() && matches!(weight.dtype(), DType::F32 | DType::BF16);
        let product = if on_cpu {
            pack(&weight, bias.as_ref(), geometry, product)?
        } else {
            Product::Candle { weight, bias }
        };
        Ok(Self {
            product: Arc::new(product),
            geometry,
            activation,
        })
    }

    /// `(out_channels, in_channels, kernel)`.
    pub fn dims(&self) -> (usize, usize, usize) {
        (self.geometry.out, self.geometry.inp, self.geometry.kernel)
    }

    fn forward_candle(&self, x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let Geometry {
            stride, padding, ..
        } = self.geometry;
        let y = x.conv2d(weight, padding, stride, 1, 1)?;
        let y = match bias {
            Some(bias) => y.broadcast_add(&bias.reshape((1, (), 1, 1))?)?,
            None => y,
        };
        match self.activation {
            ConvActivation::Identity => Ok(y),
            ConvActivation::Silu => candle_nn::ops::silu(&y),
        }
    }
}

impl std::fmt::Debug for Conv2d {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conv2d")
            .field("geometry", &self.geometry)
            .field("activation", &self.activation)
            .field("product", &self.product.name())
            .finish()
    }
}

/// The filter and bias in the form `product` runs them in.
fn pack(
    weight: &Tensor,
    bias: Option<&Tensor>,
    geometry: Geometry,
    product: CpuProduct,
) -> Result<Product> {
    let filter = weight
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let bias = match bias {
        Some(bias) => bias.to_dtype(DType::F32)?.to_vec1::<f32>()?,
        None => vec![0.0; geometry.out],
    };
    let (out, depth) = (geometry.out, geometry.depth());
    match product {
        CpuProduct::Gemm => Ok(Product::Gemm { filter, bias }),
        #[cfg(feature = "mkl")]
        CpuProduct::Mkl(precision) => {
            let packed = |filter: &[f32], depth| {
                mkl_filter::PackedFilter::new(filter, out, depth, precision).ok_or_else(|| {
                    candle_core::Error::Msg("convolution: MKL could not pack".into())
                })
            };
            if geometry.shifted() {
                let positions = geometry.kernel * geometry.kernel;
                let filters = (0..positions)
                    .map(|position| {
                        let slice: Vec<f32> = filter
                            .iter()
                            .skip(position)
                            .step_by(positions)
                            .copied()
                            .collect();
                        packed(&slice, geometry.inp)
                    })
                    .collect::<Result<_>>()?;
                return Ok(Product::MklShifted { filters, bias });
            }
            Ok(Product::Mkl {
                filter: packed(&filter, depth)?,
                bias,
            })
        }
        #[cfg(target_arch = "x86_64")]
        CpuProduct::OwnBf16 => {
            let mut rounded = vec![0u16; filter.len()];
            cpu_kernels::round_to_bf16(&filter, &mut rounded);
            match PackedBf16Weight::new(&rounded, out, depth) {
                Some(filter) => Ok(Product::OwnBf16 { filter, bias }),
                None => candle_core::bail!("convolution: this CPU has no AVX512-BF16"),
            }
        }
    }
}

impl Module for Conv2d {
    /// `x`: `[batch, in, h, w]`; gives `[batch, out, h', w']` in `x`'s dtype.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Product::Candle { weight, bias } = &*self.product {
            return self.forward_candle(x, weight, bias.as_ref());
        }
        let dtype = x.dtype();
        if !x.device().is_cpu() || !matches!(dtype, DType::F32 | DType::BF16) {
            candle_core::bail!(
                "convolution: a CPU layer takes CPU f32 or bf16 input, not {dtype:?} on {:?}",
                x.device().location()
            )
        }
        let y = x
            .to_dtype(DType::F32)?
            .contiguous()?
            .apply_op1_no_bwd(&ConvOp(self))?;
        y.to_dtype(dtype)
    }
}

/// The CPU convolution of one layer, as a candle operation on a contiguous f32 input.
struct ConvOp<'a>(&'a Conv2d);

impl CustomOp1 for ConvOp<'_> {
    fn name(&self) -> &'static str {
        "conv2d-fused"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("convolution: input must be f32")
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("convolution: input must be contiguous")
        };
        let geometry = self.0.geometry;
        let (batch, inp, h, w) = layout.shape().dims4()?;
        if inp != geometry.inp {
            candle_core::bail!(
                "convolution: input has {inp} channels, the layer takes {}",
                geometry.inp
            )
        }
        let (oh, ow) = geometry.output_size(h, w)?;
        let input = Input {
            data: &data[start..end],
            h,
            w,
            oh,
            ow,
        };
        let out = match &*self.0.product {
            #[cfg(feature = "mkl")]
            Product::MklShifted { filters, bias } => {
                convolve_shifted(filters, bias, geometry, self.0.activation, &input, batch)
            }
            product => convolve(product, geometry, self.0.activation, &input, batch),
        };
        Ok((
            CpuStorage::F32(out),
            Shape::from((batch, geometry.out, oh, ow)),
        ))
    }
}

/// An NCHW f32 input with its output's spatial size.
struct Input<'a> {
    data: &'a [f32],
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
}

impl Input<'_> {
    fn image(&self, index: usize, channels: usize) -> &[f32] {
        let size = channels * self.h * self.w;
        &self.data[index * size..(index + 1) * size]
    }

    fn pixels(&self) -> usize {
        self.oh * self.ow
    }
}

/// Bytes of gathered columns per tile: a tile's columns stay in the L2 cache (2 MiB per
/// core on the Xeons and 1 MiB on the EPYCs the workers run on) while the product passes
/// over them, next to the filter's current block.
const COLUMN_BYTES: usize = 384 * 1024;
/// Tiles are a whole number of these pixels wide, so the products' column blocks are full.
const TILE_ALIGN: usize = 16;

/// Output pixels per tile for `batch` images of `pixels` output pixels and a product of
/// depth `depth`: as many as fit [`COLUMN_BYTES`], and few enough that every thread gets
/// about two tiles.
fn tile_width(depth: usize, pixels: usize, batch: usize) -> usize {
    let fits = (COLUMN_BYTES / (depth * 4)).max(TILE_ALIGN) / TILE_ALIGN * TILE_ALIGN;
    let wanted_tiles = 2 * rayon::current_num_threads().max(1);
    let per_image = wanted_tiles.div_ceil(batch).max(1);
    let balanced = pixels.div_ceil(per_image).div_ceil(TILE_ALIGN) * TILE_ALIGN;
    fits.min(balanced).max(TILE_ALIGN).min(pixels.max(1))
}

/// A raw output pointer shared by tasks that write disjoint tiles.
struct SendPtr(*mut f32);
// SAFETY: tasks write disjoint tiles of the buffer behind it.
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// The pointer `offset` values on (a method, so that closures take the whole `SendPtr`).
    ///
    /// # Safety
    /// `offset` stays inside the buffer.
    unsafe fn at(&self, offset: usize) -> *mut f32 {
        // SAFETY: as the caller promises.
        unsafe { self.0.add(offset) }
    }
}

/// The output `[batch, out, oh, ow]` of the layer over `input`.
fn convolve(
    product: &Product,
    geometry: Geometry,
    activation: ConvActivation,
    input: &Input<'_>,
    batch: usize,
) -> Vec<f32> {
    let pixels = input.pixels();
    let total = batch * geometry.out * pixels;
    let mut out: Vec<f32> = Vec::with_capacity(total);
    let width = tile_width(geometry.depth(), pixels, batch);
    let tiles_per_image = pixels.div_ceil(width);
    let out_ptr = SendPtr(out.as_mut_ptr());
    (0..batch * tiles_per_image)
        .into_par_iter()
        .for_each(|task| {
            let (image, tile) = (task / tiles_per_image, task % tiles_per_image);
            let first = tile * width;
            let tile = Tile {
                image: input.image(image, geometry.inp),
                first,
                width: (pixels - first).min(width),
            };
            // SAFETY: the output has `total` values of capacity; this task writes only
            // rows `image`'s pixels `first..first + width` of each output channel, which no
            // other task writes.
            let out = unsafe { out_ptr.at(image * geometry.out * pixels + first) };
            let target = Target {
                out,
                stride: pixels,
            };
            run_tile(product, geometry, input, &tile, &target);
            target.finish(activation, geometry.out, tile.width);
        });
    // SAFETY: the tasks wrote every pixel of every output channel of every image.
    unsafe { out.set_len(total) };
    out
}

/// A stride-1 convolution as `k²` products per tile, one per kernel position `(ky, kx)`,
/// each of that position's `(out, in)` filter with the padded input shifted by `ky` rows
/// and `kx` columns: with the output computed at the padded width (`k - 1` columns of each
/// row are wasted), a shift is an offset into the padded planes, so the input is copied
/// (and rounded to bf16) once instead of gathered `k²` times. Tiles are runs of output
/// rows; each writes its bias, runs the products onto it and moves its rows, activated,
/// into the output.
#[cfg(feature = "mkl")]
fn convolve_shifted(
    filters: &[mkl_filter::PackedFilter],
    bias: &[f32],
    geometry: Geometry,
    activation: ConvActivation,
    input: &Input<'_>,
    batch: usize,
) -> Vec<f32> {
    let Geometry {
        out: channels,
        inp,
        kernel,
        padding,
        ..
    } = geometry;
    let (hp, wp) = (input.h + 2 * padding, input.w + 2 * padding);
    let (oh, ow) = (input.oh, input.ow);
    let plane = hp * wp;
    let bf16 = filters[0].precision() == MatmulPrecision::Bf16;
    let (padded, rounded) = padded_input(input, geometry, batch, bf16);
    let wide_size = oh * wp;
    let mut wide = vec![0f32; batch * channels * wide_size];
    let mut out: Vec<f32> = Vec::with_capacity(batch * channels * oh * ow);
    let rows = shifted_tile_rows(inp, wp, oh, batch);
    let tiles_per_image = oh.div_ceil(rows);
    let (wide_ptr, out_ptr) = (SendPtr(wide.as_mut_ptr()), SendPtr(out.as_mut_ptr()));
    (0..batch * tiles_per_image)
        .into_par_iter()
        .for_each(|task| {
            let (image, tile) = (task / tiles_per_image, task % tiles_per_image);
            let (first, last) = (tile * rows, ((tile + 1) * rows).min(oh));
            let width = (last - first) * wp;
            // SAFETY: this task alone writes rows first..last of this image's wide output.
            let target = Target {
                out: unsafe { wide_ptr.at(image * channels * wide_size + first * wp) },
                stride: wide_size,
            };
            target.fill_bias(bias, width);
            let base = image * inp * plane + first * wp;
            for (position, filter) in filters.iter().enumerate() {
                let offset = base + (position / kernel) * wp + position % kernel;
                if bf16 {
                    filter.accumulate_bf16(&target, &rounded[offset..], plane, width);
                } else {
                    filter.accumulate_f32(&target, &padded[offset..], plane, width);
                }
            }
            for channel in 0..channels {
                // SAFETY: one wide row per output channel, this tile's width.
                let wide_rows = unsafe { target.row(channel, width) };
                for (y, wide_row) in wide_rows.chunks_exact(wp).enumerate() {
                    let offset = ((image * channels + channel) * oh + first + y) * ow;
                    // SAFETY: output row `first + y` of this channel and image: this
                    // task's alone, inside the output's capacity.
                    let row = unsafe { std::slice::from_raw_parts_mut(out_ptr.at(offset), ow) };
                    row.copy_from_slice(&wide_row[..ow]);
                    if activation == ConvActivation::Silu {
                        cpu_kernels::silu_in_place(row);
                    }
                }
            }
        });
    // SAFETY: the tasks wrote every row of every output channel of every image.
    unsafe { out.set_len(batch * channels * oh * ow) };
    out
}

/// The input's planes with `padding` zeros around them, and `k` values to spare at the end
/// (the last image's last rows read up to `k - 1` values past its planes, into wasted
/// columns only); with `bf16`, rounded to bf16 as well (the f32 copy is then the caller's
/// to drop).
#[cfg(feature = "mkl")]
fn padded_input(
    input: &Input<'_>,
    geometry: Geometry,
    batch: usize,
    bf16: bool,
) -> (Vec<f32>, Vec<u16>) {
    let padding = geometry.padding;
    let (hp, wp) = (input.h + 2 * padding, input.w + 2 * padding);
    let plane = hp * wp;
    let planes = batch * geometry.inp;
    let mut padded = vec![0f32; planes * plane + geometry.kernel];
    padded[..planes * plane]
        .par_chunks_mut(plane)
        .zip(input.data.par_chunks(input.h * input.w))
        .for_each(|(padded, plane_in)| {
            for (y, row) in plane_in.chunks_exact(input.w).enumerate() {
                let start = (y + padding) * wp + padding;
                padded[start..start + input.w].copy_from_slice(row);
            }
        });
    let mut rounded = Vec::new();
    if bf16 {
        rounded = vec![0u16; padded.len()];
        rounded
            .par_chunks_mut(plane)
            .zip(padded.par_chunks(plane))
            .for_each(|(out, values)| cpu_kernels::round_to_bf16(values, out));
    }
    (padded, rounded)
}

/// Output rows per tile of a shifted convolution: the tile's input rows (`in` channels of
/// about as many padded rows) fit [`COLUMN_BYTES`], and every thread gets about two tiles.
#[cfg(feature = "mkl")]
fn shifted_tile_rows(inp: usize, wp: usize, oh: usize, batch: usize) -> usize {
    let fits = COLUMN_BYTES / (inp * wp * 4);
    let wanted_tiles = 2 * rayon::current_num_threads().max(1);
    let per_image = wanted_tiles.div_ceil(batch).max(1);
    fits.min(oh.div_ceil(per_image)).clamp(1, oh.max(1))
}

/// A run of one image's output pixels, in row-major pixel order.
struct Tile<'a> {
    /// The image's `[in, h, w]` input.
    image: &'a [f32],
    first: usize,
    width: usize,
}

/// Where a tile's output goes: `out` at its first pixel, `stride` values between two output
/// channels.
struct Target {
    out: *mut f32,
    stride: usize,
}

impl Target {
    /// Output channel `channel`'s values in this tile.
    ///
    /// # Safety
    /// `channel` is below the layer's output channels and `width` the tile's width, and no
    /// other reference to that row is alive.
    #[allow(clippy::mut_from_ref)] // The rows are the task's own, behind a raw pointer.
    unsafe fn row(&self, channel: usize, width: usize) -> &mut [f32] {
        // SAFETY: as the caller promises, inside the output and this tile's own.
        unsafe { std::slice::from_raw_parts_mut(self.out.add(channel * self.stride), width) }
    }

    /// Writes `bias` into every output channel's values in the tile.
    fn fill_bias(&self, bias: &[f32], width: usize) {
        for (channel, &b) in bias.iter().enumerate() {
            // SAFETY: one row per output channel, the tile's width.
            unsafe { self.row(channel, width) }.fill(b);
        }
    }

    fn finish(&self, activation: ConvActivation, channels: usize, width: usize) {
        if activation == ConvActivation::Silu {
            for channel in 0..channels {
                // SAFETY: as in fill_bias.
                cpu_kernels::silu_in_place(unsafe { self.row(channel, width) });
            }
        }
    }
}

thread_local! {
    /// A tile's gathered columns, f32.
    static COLUMNS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// A tile's right-hand matrix rounded to bf16.
    static ROUNDED: RefCell<Vec<u16>> = const { RefCell::new(Vec::new()) };
    /// The own bf16 product's output tile, pixels by channels.
    static PIXEL_ROWS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// The tile's right-hand matrix `(in·k², width)`: a slice of the image itself for a
/// pointwise layer (with its row stride), else the columns gathered into `columns`.
fn right_hand<'a>(
    geometry: Geometry,
    input: &Input<'_>,
    tile: &Tile<'a>,
    columns: &'a mut Vec<f32>,
) -> (&'a [f32], usize) {
    if geometry.pointwise() {
        let pixels = input.pixels();
        let end = (geometry.inp - 1) * pixels + tile.first + tile.width;
        return (&tile.image[tile.first..end], pixels);
    }
    columns.clear();
    columns.resize(geometry.depth() * tile.width, 0.0);
    im2col(geometry, input, tile, columns);
    (columns, tile.width)
}

/// Bias, then the tile's product onto it, into `target`.
fn run_tile(
    product: &Product,
    geometry: Geometry,
    input: &Input<'_>,
    tile: &Tile<'_>,
    target: &Target,
) {
    let width = tile.width;
    COLUMNS.with_borrow_mut(|columns| {
        let (rhs, ldb) = right_hand(geometry, input, tile, columns);
        match product {
            Product::Candle { .. } => unreachable!("candle's layers do not come here"),
            #[cfg(feature = "mkl")]
            Product::MklShifted { .. } => unreachable!("shifted layers go by convolve_shifted"),
            Product::Gemm { filter, bias } => {
                target.fill_bias(bias, width);
                gemm_onto(filter, rhs, ldb, geometry, width, target)
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

/// `target += filter · rhs` by the `gemm` crate, on this thread.
fn gemm_onto(
    filter: &[f32],
    rhs: &[f32],
    ldb: usize,
    geometry: Geometry,
    width: usize,
    target: &Target,
) {
    let depth = geometry.depth();
    // SAFETY: `filter` is out × depth row-major, `rhs` depth rows of `width` values `ldb`
    // apart, the target out rows of `width` values `stride` apart, all inside their
    // buffers; gemm computes dst = alpha·dst + beta·lhs·rhs, so alpha 1 keeps the bias.
    unsafe {
        gemm::gemm(
            geometry.out,
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
fn round_rows(values: &[f32], stride: usize, rows: usize, width: usize, rounded: &mut Vec<u16>) {
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
fn own_bf16_tile(
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
const TRANSPOSE_BLOCK: usize = 16;

/// `values` (`depth` rows of `width` values, `ldb` apart) transposed into `out` (`width`
/// rows of `stride` values) and rounded to bf16.
#[cfg(target_arch = "x86_64")]
fn transpose_to_bf16(
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

/// Gathers the tile's columns: row `(c, ky, kx)` of `columns` holds, for each of the tile's
/// output pixels, the input value under kernel position `(ky, kx)` of channel `c` (0 in the
/// padding).
fn im2col(geometry: Geometry, input: &Input<'_>, tile: &Tile<'_>, columns: &mut [f32]) {
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
fn gather_run(
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

/// A filter packed as the left-hand matrix of MKL's packed products, f32 or bf16.
#[cfg(feature = "mkl")]
mod mkl_filter {
    use super::Target;
    use crate::model::kernels::cblas::{
        A_MATRIX, NO_TRANSPOSE, PACKED, ROW_MAJOR, cblas_gemm_bf16bf16f32_compute,
        cblas_gemm_bf16bf16f32_pack, cblas_gemm_bf16bf16f32_pack_get_size, cblas_sgemm_compute,
        cblas_sgemm_pack, cblas_sgemm_pack_get_size, mkl_set_num_threads_local,
    };
    use crate::model::kernels::cpu_kernels;
    use crate::model::kernels::fused_linear::MatmulPrecision;
    use std::alloc::Layout;

    /// The right-hand column count MKL is told to expect when packing: about a tile.
    const COLUMNS_HINT: i32 = 256;

    pub struct PackedFilter {
        data: *mut u8,
        layout: Layout,
        precision: MatmulPrecision,
        out: i32,
        depth: i32,
    }

    // SAFETY: the buffer is written once, in `new`, and only read afterwards.
    unsafe impl Send for PackedFilter {}
    unsafe impl Sync for PackedFilter {}

    impl PackedFilter {
        /// Packs a row-major `(out, depth)` filter for products in `precision`; `None` when
        /// a size does not fit MKL's 32-bit ones or the allocation fails.
        pub fn new(
            filter: &[f32],
            out: usize,
            depth: usize,
            precision: MatmulPrecision,
        ) -> Option<Self> {
            assert_eq!(filter.len(), out * depth);
            let (out, depth) = (i32::try_from(out).ok()?, i32::try_from(depth).ok()?);
            // SAFETY: pure size queries.
            let bytes = unsafe {
                match precision {
                    MatmulPrecision::F32 => {
                        cblas_sgemm_pack_get_size(A_MATRIX, out, COLUMNS_HINT, depth)
                    }
                    MatmulPrecision::Bf16 => {
                        cblas_gemm_bf16bf16f32_pack_get_size(A_MATRIX, out, COLUMNS_HINT, depth)
                    }
                }
            };
            let layout = Layout::from_size_align(bytes.max(4), 64).ok()?;
            // SAFETY: non-zero size; freed in Drop with the same layout, never moved.
            let data = unsafe { std::alloc::alloc(layout) };
            if data.is_null() {
                return None;
            }
            // SAFETY: `filter` holds out × depth values, row-major (ld = depth), and `data`
            // has the size MKL asked for. On this thread: a threaded pack would leave MKL's
            // OpenMP threads spinning on the cores the layers load next to it need.
            on_this_thread(|| unsafe {
                match precision {
                    MatmulPrecision::F32 => cblas_sgemm_pack(
                        ROW_MAJOR,
                        A_MATRIX,
                        NO_TRANSPOSE,
                        out,
                        COLUMNS_HINT,
                        depth,
                        1.0,
                        filter.as_ptr(),
                        depth,
                        data as *mut f32,
                    ),
                    MatmulPrecision::Bf16 => {
                        let mut rounded = vec![0u16; filter.len()];
                        cpu_kernels::round_to_bf16(filter, &mut rounded);
                        cblas_gemm_bf16bf16f32_pack(
                            ROW_MAJOR,
                            A_MATRIX,
                            NO_TRANSPOSE,
                            out,
                            COLUMNS_HINT,
                            depth,
                            rounded.as_ptr(),
                            depth,
                            data as *mut u16,
                        )
                    }
                }
            });
            Some(Self {
                data,
                layout,
                precision,
                out,
                depth,
            })
        }

        pub fn precision(&self) -> MatmulPrecision {
            self.precision
        }

        /// `target += filter · rhs`, `rhs` f32 `depth` rows of `width` values `ldb` apart,
        /// on this thread.
        pub fn accumulate_f32(&self, target: &Target, rhs: &[f32], ldb: usize, width: usize) {
            assert_eq!(self.precision, MatmulPrecision::F32);
            assert!(rhs.len() >= (self.depth as usize - 1) * ldb + width);
            let (n, ldb, ldc) = (width as i32, ldb as i32, target.stride as i32);
            on_this_thread(|| {
                // SAFETY: sizes checked above; the target's rows are inside the output.
                unsafe {
                    cblas_sgemm_compute(
                        ROW_MAJOR,
                        PACKED,
                        NO_TRANSPOSE,
                        self.out,
                        n,
                        self.depth,
                        self.data as *const f32,
                        self.depth,
                        rhs.as_ptr(),
                        ldb,
                        1.0,
                        target.out,
                        ldc,
                    )
                }
            })
        }

        /// `target += filter · rhs`, `rhs` bf16 `depth` rows of `width` values `ldb` apart,
        /// on this thread.
        pub fn accumulate_bf16(&self, target: &Target, rhs: &[u16], ldb: usize, width: usize) {
            assert_eq!(self.precision, MatmulPrecision::Bf16);
            assert!(rhs.len() >= (self.depth as usize - 1) * ldb + width);
            let (n, ldb, ldc) = (width as i32, ldb as i32, target.stride as i32);
            on_this_thread(|| {
                // SAFETY: as in accumulate_f32.
                unsafe {
                    cblas_gemm_bf16bf16f32_compute(
                        ROW_MAJOR,
                        PACKED,
                        NO_TRANSPOSE,
                        self.out,
                        n,
                        self.depth,
                        1.0,
                        self.data as *const u16,
                        self.depth,
                        rhs.as_ptr(),
                        ldb,
                        1.0,
                        target.out,
                        ldc,
                    )
                }
            })
        }
    }

    /// Runs an MKL call on the calling thread alone: the tiles already keep every core
    /// busy, and MKL's own threads would only contend with rayon's for them.
    fn on_this_thread(call: impl FnOnce()) {
        // SAFETY: thread-local settings; no pointers.
        let previous = unsafe { mkl_set_num_threads_local(1) };
        call();
        // SAFETY: as above.
        unsafe { mkl_set_num_threads_local(previous) };
    }

    impl Drop for PackedFilter {
        fn drop(&mut self) {
            // SAFETY: allocated in `new` with this layout.
            unsafe { std::alloc::dealloc(self.data, self.layout) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::testing::util::{lowest_row_cosine, max_abs_difference};
    use candle_core::Device;

    /// The CPU products this build has on this CPU.
    fn products() -> Vec<CpuProduct> {
        let mut all = vec![CpuProduct::Gemm];
        #[cfg(feature = "mkl")]
        all.extend([
            CpuProduct::Mkl(MatmulPrecision::F32),
            CpuProduct::Mkl(MatmulPrecision::Bf16),
        ]);
        #[cfg(target_arch = "x86_64")]
        if crate::model::kernels::bf16_gemm::supported() {
            all.push(CpuProduct::OwnBf16);
        }
        all
    }

    fn rounds_to_bf16(product: CpuProduct) -> bool {
        match product {
            CpuProduct::Gemm => false,
            #[cfg(feature = "mkl")]
            CpuProduct::Mkl(precision) => precision == MatmulPrecision::Bf16,
            #[cfg(target_arch = "x86_64")]
            CpuProduct::OwnBf16 => true,
        }
    }

    /// A random layer's weight `[out, in, k, k]` and bias, and an input `[batch, in, h, w]`.
    fn case(
        (batch, inp, out, kernel): (usize, usize, usize, usize),
        (h, w): (usize, usize),
    ) -> (Tensor, Tensor, Tensor) {
        let dev = Device::Cpu;
        let scale = 1.0 / ((inp * kernel * kernel) as f64).sqrt();
        let weight = Tensor::randn(0f32, scale as f32, (out, inp, kernel, kernel), &dev).unwrap();
        let bias = Tensor::randn(0f32, 0.5, out, &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (batch, inp, h, w), &dev).unwrap();
        (weight, bias, x)
    }

    /// candle's convolution, bias and activation, in f64.
    fn reference(
        (weight, bias, x): &(Tensor, Tensor, Tensor),
        stride: usize,
        padding: usize,
        activation: ConvActivation,
    ) -> Tensor {
        let f64 = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
        let y = f64(x)
            .conv2d(&f64(weight), padding, stride, 1, 1)
            .unwrap()
            .broadcast_add(&f64(bias).reshape((1, (), 1, 1)).unwrap())
            .unwrap();
        let y = match activation {
            ConvActivation::Identity => y,
            ConvActivation::Silu => candle_nn::ops::silu(&y).unwrap(),
        };
        y.to_dtype(DType::F32).unwrap()
    }

    /// Every kernel, stride and padding YOLO-World has (and a strided 1x1 and unpadded 3x3),
    /// on odd sizes, batches of 1 and 3, and a map wide enough for several tiles per image.
    const SHAPES: [(usize, usize, usize); 5] =
        [(1, 1, 0), (3, 1, 1), (3, 2, 1), (1, 2, 0), (3, 1, 0)];
    const SIZES: [(usize, usize); 3] = [(13, 7), (7, 13), (41, 33)];

    #[test]
    fn every_product_matches_candles_convolution() {
        for product in products() {
            for (kernel, stride, padding) in SHAPES {
                for (batch, inp, out) in [(1, 3, 16), (3, 16, 48), (1, 48, 3), (3, 48, 16)] {
                    for size in SIZES {
                        let case = case((batch, inp, out, kernel), size);
                        for activation in [ConvActivation::Identity, ConvActivation::Silu] {
                            let layer = Conv2d::with_product(
                                case.0.clone(),
                                Some(case.1.clone()),
                                stride,
                                padding,
                                activation,
                                product,
                            )
                            .unwrap();
                            let got = layer.forward(&case.2).unwrap();
                            let expected = reference(&case, stride, padding, activation);
                            assert_eq!(got.dims(), expected.dims());
                            let what = format!(
                                "{product:?} k{kernel} s{stride} p{padding} {batch}x{inp}->{out} \
                                 at {size:?}, {activation:?}"
                            );
                            check(&got, &expected, rounds_to_bf16(product), &what);
                        }
                    }
                }
            }
        }
    }

    /// f32 products within 1e-4 of the largest value; bf16 ones at cosine 0.9999 or more
    /// for every output channel of every image.
    fn check(got: &Tensor, expected: &Tensor, bf16: bool, what: &str) {
        if bf16 {
            let rows = |t: &Tensor| {
                let (b, c, h, w) = t.dims4().unwrap();
                t.reshape((b * c, h * w)).unwrap()
            };
            let cosine = lowest_row_cosine(&rows(got), &rows(expected));
            assert!(cosine >= 0.9999, "{what}: cosine {cosine}");
        } else {
            let largest = expected
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let diff = max_abs_difference(got, expected);
            assert!(
                diff <= 1e-4 * largest as f64,
                "{what}: off by {diff} of {largest}"
            );
        }
    }

    #[test]
    fn a_bf16_product_really_rounds() {
        for product in products().into_iter().filter(|&p| rounds_to_bf16(p)) {
            let case = case((1, 48, 16, 3), (13, 7));
            let layer = |product| {
                Conv2d::with_product(
                    case.0.clone(),
                    Some(case.1.clone()),
                    1,
                    1,
                    ConvActivation::Identity,
                    product,
                )
                .unwrap()
            };
            let rounded = layer(product).forward(&case.2).unwrap();
            let exact = layer(CpuProduct::Gemm).forward(&case.2).unwrap();
            let diff = max_abs_difference(&rounded, &exact);
            assert!(diff > 1e-4 && diff < 0.1, "{product:?} against f32: {diff}");
        }
    }

    #[test]
    fn bf16_tensors_come_back_bf16() {
        let case = case((3, 16, 48, 3), (13, 7));
        let bf16 = |t: &Tensor| t.to_dtype(DType::BF16).unwrap();
        let layer = Conv2d::new(
            bf16(&case.0),
            Some(bf16(&case.1)),
            2,
            1,
            ConvActivation::Silu,
        )
        .unwrap();
        let got = layer.forward(&bf16(&case.2)).unwrap();
        assert_eq!(got.dtype(), DType::BF16);
        let expected = reference(&case, 2, 1, ConvActivation::Silu);
        check(
            &got.to_dtype(DType::F32).unwrap(),
            &expected,
            true,
            "bf16 in, bf16 out",
        );
    }

    #[test]
    fn the_public_constructors_pick_the_dtypes_product() {
        let case = case((1, 16, 48, 1), (13, 7));
        let f32_layer = Conv2d::new(case.0.clone(), None, 1, 0, ConvActivation::Identity).unwrap();
        let expected_f32 = if cfg!(feature = "mkl") {
            "mkl-f32"
        } else {
            "gemm-f32"
        };
        assert_eq!(f32_layer.product.name(), expected_f32);
        assert_eq!(f32_layer.dims(), (48, 16, 1));
        let bf16_layer = Conv2d::new_as(
            case.0.clone(),
            None,
            1,
            0,
            ConvActivation::Identity,
            MatmulPrecision::Bf16,
        )
        .unwrap();
        let expected_bf16 = match fused_linear::bf16_product() {
            Some(Bf16Product::AvxDot) => "own-bf16",
            Some(Bf16Product::Mkl) => "mkl-bf16",
            None => expected_f32,
        };
        assert_eq!(bf16_layer.product.name(), expected_bf16);
        // No bias is a zero bias.
        let zero = Tensor::zeros(48, DType::F32, &Device::Cpu).unwrap();
        let expected = reference(
            &(case.0, zero, case.2.clone()),
            1,
            0,
            ConvActivation::Identity,
        );
        check(
            &f32_layer.forward(&case.2).unwrap(),
            &expected,
            false,
            "no bias",
        );
    }

    #[test]
    fn other_dtypes_take_candles_own_convolution() {
        let (weight, bias, x) = case((3, 16, 48, 3), (13, 7));
        let f64 = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
        let layer =
            Conv2d::new(f64(&weight), Some(f64(&bias)), 2, 1, ConvActivation::Silu).unwrap();
        assert_eq!(layer.product.name(), "candle");
        let got = layer.forward(&f64(&x)).unwrap();
        assert_eq!(got.dtype(), DType::F64);
        let expected = reference(&(weight, bias, x), 2, 1, ConvActivation::Silu);
        check(&got.to_dtype(DType::F32).unwrap(), &expected, false, "f64");
    }

    #[test]
    fn bad_shapes_are_errors() {
        let dev = Device::Cpu;
        let non_square = Tensor::zeros((4, 3, 3, 1), DType::F32, &dev).unwrap();
        assert!(Conv2d::new(non_square, None, 1, 0, ConvActivation::Identity).is_err());
        let weight = Tensor::zeros((4, 3, 3, 3), DType::F32, &dev).unwrap();
        let short_bias = Tensor::zeros(3, DType::F32, &dev).unwrap();
        assert!(Conv2d::new(weight.clone(), Some(short_bias), 1, 0, ConvActivation::Silu).is_err());
        let layer = Conv2d::new(weight, None, 1, 0, ConvActivation::Silu).unwrap();
        let wrong_channels = Tensor::zeros((1, 5, 8, 8), DType::F32, &dev).unwrap();
        assert!(layer.forward(&wrong_channels).is_err());
        let too_small = Tensor::zeros((1, 3, 2, 8), DType::F32, &dev).unwrap();
        assert!(layer.forward(&too_small).is_err());
    }
}
