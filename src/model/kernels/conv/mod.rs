//! 2-D convolutions for the convolutional families (YOLO-World): one layer type holding a
//! convolution whose batch norm is already folded into its weight and bias, with its
//! activation fused, taking and giving NCHW tensors.
//!
//! On the CPU a convolution is a matrix product per image, `Y (out, pixels) = W (out,
//! in·k²) · columns (in·k², pixels)`, which keeps NCHW on both sides: a 1x1 convolution at
//! stride 1 reads its input as the right-hand matrix as it stands, and a larger kernel
//! gathers its input into those columns first (im2col). The filter is packed once, at
//! construction, for the product that runs it: MKL's packed f32 or bf16 product (bf16 on
//! AMX), the project's own AVX512-BF16 product (the filter as its left-hand side, so its
//! output rows are the output's planes), or the `gemm` crate's f32 product (in a build
//! without MKL, and for f32 in the mkl build on a CPU that is not Intel's, where it runs
//! faster than MKL's, AVX-512 or not). Each image's output pixels are cut into tiles that
//! rayon's threads share; a tile gathers its columns into a buffer that stays in the L2
//! cache, writes the bias into its output, runs the product onto it on its own thread and
//! applies the activation, so the output is written once and read once more. On MKL's
//! products and the own bf16 one, a kernel larger than 1x1 gathers nothing: the padded
//! input is split once into the stride's phases, and each kernel position reads them
//! shifted (`shifted`): MKL runs one product per kernel position, the own product packs
//! its right-hand rows straight from the phases. A layer takes and gives f32 or bf16:
//! the bf16 products read a bf16 input as it is, and a bf16 output is rounded from the
//! product's f32 tile after the epilogue (activation, and a residual where
//! [`Conv2d::forward_add`] gives one), so a network can keep its activations in bf16
//! between layers ([`activation_dtype`]). A 1x1 layer can also read a concatenation's
//! parts where they lie ([`Conv2d::forward_cat`]). candle's own `conv2d` (im2col into a
//! full buffer, a product into a zeroed output, then separate single-threaded bias and
//! activation passes) runs anything else: other devices and dtypes.

use crate::model::kernels::fused_linear::MatmulPrecision;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Module, Result, Shape, Tensor};
use std::sync::Arc;

mod element;
mod geometry;
mod im2col;
#[cfg(feature = "mkl")]
mod mkl_filter;
mod own_products;
mod product;
mod shifted;
mod tiled;

use element::*;
pub use geometry::ConvActivation;
use geometry::*;
use product::*;
use shifted::*;
use tiled::*;

/// A convolution with square kernel, equal stride and padding on both axes, no groups and no
/// dilation: every convolution YOLO-World has.
#[derive(Clone)]
pub struct Conv2d {
    product: Arc<Product>,
    geometry: Geometry,
    activation: ConvActivation,
    /// The filter again in blocks of input channels, for [`Self::forward_cat`].
    #[cfg(feature = "mkl")]
    blocks: Option<Arc<InputBlocks>>,
}

/// A pointwise layer's filter cut into blocks of `width` input channels, each packed for
/// MKL: the product over a concatenation is the sum of each block's product over its part.
#[cfg(feature = "mkl")]
struct InputBlocks {
    width: usize,
    filters: Vec<mkl_filter::PackedFilter>,
    bias: Vec<f32>,
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
            #[cfg(feature = "mkl")]
            blocks: None,
        })
    }

    /// A pointwise layer (`weight` `[out, in, 1, 1]`) that [`Self::forward_cat`] runs over
    /// parts of `block` input channels each (or whole multiples of it) without
    /// concatenating them, where its product is MKL's.
    pub fn pointwise_in_blocks(
        weight: Tensor,
        bias: Option<Tensor>,
        activation: ConvActivation,
        precision: MatmulPrecision,
        block: usize,
    ) -> Result<Self> {
        #[cfg_attr(not(feature = "mkl"), allow(unused_mut))]
        let mut layer = Self::new_as(weight.clone(), bias, 1, 0, activation, precision)?;
        let (out, inp) = (layer.geometry.out, layer.geometry.inp);
        if layer.geometry.kernel != 1 || block == 0 || inp % block != 0 {
            candle_core::bail!("convolution: {inp} input channels in blocks of {block}")
        }
        // One block is the layer itself: a single part is read as `forward` reads it.
        #[cfg(feature = "mkl")]
        if let Product::Mkl { filter, bias } = &*layer.product
            && block < inp
        {
            let weight = weight.to_dtype(DType::F32)?.reshape((out, inp))?;
            let filters = (0..inp / block)
                .map(|j| {
                    let columns = weight.narrow(1, j * block, block)?.flatten_all()?;
                    filter.like(&columns.to_vec1()?, out, block).ok_or_else(|| {
                        candle_core::Error::Msg("convolution: MKL could not pack".into())
                    })
                })
                .collect::<Result<_>>()?;
            layer.blocks = Some(Arc::new(InputBlocks {
                width: block,
                filters,
                bias: bias.clone(),
            }));
        }
        let _ = out;
        Ok(layer)
    }

    /// `forward` of the concatenation of `parts` along the channels, without making it:
    /// each part's blocks run through their own block of the filter, onto the same output
    /// (a layer from [`Self::pointwise_in_blocks`], parts in the activations' dtype);
    /// anything else concatenates.
    pub fn forward_cat(&self, parts: &[Tensor]) -> Result<Tensor> {
        #[cfg(feature = "mkl")]
        if let Some(blocks) = &self.blocks
            && let Some(parts) = self.parts_in_place(blocks, parts)?
        {
            return parts[0].apply_op1_no_bwd(&CatOp {
                layer: self,
                blocks,
                rest: &parts[1..],
            });
        }
        self.forward(&Tensor::cat(parts, 1)?)
    }

    /// `parts` as [`CatOp`] reads them (each one's images contiguous), when it can: on the
    /// CPU, all of one dtype the blocks' product reads as it is, whole blocks, as many
    /// input channels as the layer has, one image size.
    #[cfg(feature = "mkl")]
    fn parts_in_place(
        &self,
        blocks: &InputBlocks,
        parts: &[Tensor],
    ) -> Result<Option<Vec<Tensor>>> {
        let Some(first) = parts.first() else {
            return Ok(None);
        };
        let (batch, _, h, w) = first.dims4()?;
        let dtype = match blocks.filters[0].precision() {
            MatmulPrecision::F32 => DType::F32,
            MatmulPrecision::Bf16 => DType::BF16,
        };
        let mut channels = 0;
        for part in parts {
            let (b, c, ph, pw) = part.dims4()?;
            if !part.device().is_cpu()
                || part.dtype() != dtype
                || (b, ph, pw) != (batch, h, w)
                || c % blocks.width != 0
            {
                return Ok(None);
            }
            channels += c;
        }
        if channels != self.geometry.inp {
            return Ok(None);
        }
        parts
            .iter()
            .map(in_place_or_contiguous)
            .collect::<Result<_>>()
            .map(Some)
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

impl Module for Conv2d {
    /// `x`: `[batch, in, h, w]`; gives `[batch, out, h', w']` in `x`'s dtype. A bf16 input
    /// is read as it is, without a rounding pass, by a layer whose product is MKL's bf16
    /// one, and every bf16 output is rounded from the f32 tile the product wrote, inside the
    /// layer (see [`activation_dtype`]).
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
        let x = in_place_or_contiguous(x)?;
        x.apply_op1_no_bwd(&ConvOp(self))
    }
}

impl Conv2d {
    /// `forward(x) + residual` with the addition in the layer's epilogue, on the tile its
    /// product just wrote (a bottleneck's shortcut), instead of a pass of its own.
    /// `residual` has the output's shape.
    pub fn forward_add(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        if matches!(&*self.product, Product::Candle { .. }) || !x.device().is_cpu() {
            return self.forward(x)? + residual;
        }
        let residual = in_place_or_contiguous(&residual.to_dtype(x.dtype())?)?;
        let x = in_place_or_contiguous(x)?;
        x.apply_op2_no_bwd(&residual, &ConvOp(self))
    }
}

/// `x` itself where its images can be read in place (see [`image_strided`]), else a
/// contiguous copy.
fn in_place_or_contiguous(x: &Tensor) -> Result<Tensor> {
    if image_strided(x.layout()).is_some() {
        Ok(x.clone())
    } else {
        x.contiguous()
    }
}

/// Where a `[batch, c, h, w]` tensor's images are, `(start, image stride)`, when each
/// image's `[c, h, w]` values are contiguous: so a channel slice of a larger tensor (C2f's
/// halves) is read in place, without a copy.
fn image_strided(layout: &Layout) -> Option<(usize, usize)> {
    let (batch, c, h, w) = layout.shape().dims4().ok()?;
    let stride = layout.stride();
    let fits = |dim: usize, size: usize, expected: usize| size <= 1 || stride[dim] == expected;
    if !(fits(1, c, h * w) && fits(2, h, w) && fits(3, w, 1)) {
        return None;
    }
    let image = if batch > 1 { stride[0] } else { c * h * w };
    (image >= c * h * w).then_some((layout.start_offset(), image))
}

/// The dtype a network of layers built for `precision` on `device` best keeps its
/// activations in: bf16 where the layers' product is a bf16 one that reads bf16 inputs as
/// they are (MKL's, and the own AVX512-BF16 product, which packs them into its pairs), so
/// a network in bf16 rounds each activation once, where it is written, and moves half the
/// bytes in its gathers and concatenations, as PyTorch's autocast does; f32 elsewhere
/// (candle's convolution on other devices takes its filter's dtype).
pub fn activation_dtype(precision: MatmulPrecision, device: &candle_core::Device) -> DType {
    let product = CpuProduct::for_precision(precision);
    #[cfg(feature = "mkl")]
    if device.is_cpu() && product == CpuProduct::Mkl(MatmulPrecision::Bf16) {
        return DType::BF16;
    }
    #[cfg(target_arch = "x86_64")]
    if device.is_cpu() && product == CpuProduct::OwnBf16 {
        return DType::BF16;
    }
    let _ = (product, device);
    DType::F32
}

/// Whether bf16 layers on the CPU run on the own AVX512-BF16 product (a CPU with
/// AVX512-BF16 that is not Intel's, or any such CPU in a build without MKL).
pub fn bf16_on_own_product() -> bool {
    #[cfg(target_arch = "x86_64")]
    return CpuProduct::for_precision(MatmulPrecision::Bf16) == CpuProduct::OwnBf16;
    #[cfg(not(target_arch = "x86_64"))]
    false
}

impl Conv2d {
    /// Whether the product reads a bf16 input directly: the own AVX512-BF16 product (it
    /// packs bf16 values as they are), MKL's bf16 product over the input itself (a
    /// pointwise layer) or its shifted phases.
    fn reads_bf16(&self) -> bool {
        match &*self.product {
            #[cfg(target_arch = "x86_64")]
            Product::OwnBf16 { .. } => true,
            #[cfg(feature = "mkl")]
            Product::Mkl { filter, .. } => {
                filter.precision() == MatmulPrecision::Bf16 && self.geometry.pointwise()
            }
            #[cfg(feature = "mkl")]
            Product::MklShifted { filters, .. } => filters[0].precision() == MatmulPrecision::Bf16,
            _ => false,
        }
    }

    /// The output `[batch, out, oh, ow]` over an input of `[batch, in, h, w]` values, plus
    /// `residual` when given.
    fn run<S: Source, O: Element>(
        &self,
        input: &Input<'_, S>,
        batch: usize,
        residual: Option<Planes<'_, O>>,
    ) -> Vec<O> {
        let epilogue = Epilogue {
            activation: self.activation,
            residual,
            image_size: self.geometry.out * input.pixels(),
        };
        match &*self.product {
            #[cfg(feature = "mkl")]
            Product::MklShifted { filters, bias } => {
                convolve_shifted(filters, bias, self.geometry, epilogue, input, batch)
            }
            #[cfg(target_arch = "x86_64")]
            Product::OwnBf16 { filter, bias } if self.geometry.shifted() => {
                convolve_shifted_own(filter, bias, self.geometry, epilogue, input, batch)
            }
            product => convolve(product, self.geometry, epilogue, input, batch),
        }
    }
}

/// The CPU convolution of one layer, as a candle operation on an f32 or bf16 input whose
/// images are each contiguous ([`image_strided`]); with a second operand, the residual
/// added in the epilogue ([`Conv2d::forward_add`]).
struct ConvOp<'a>(&'a Conv2d);

impl CustomOp1 for ConvOp<'_> {
    fn name(&self) -> &'static str {
        "conv2d-fused"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        convolve_storage(self.0, (storage, layout), None)
    }
}

impl CustomOp2 for ConvOp<'_> {
    fn name(&self) -> &'static str {
        "conv2d-fused-add"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
        residual: &CpuStorage,
        residual_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        convolve_storage(self.0, (storage, layout), Some((residual, residual_layout)))
    }
}

/// [`Conv2d::forward_cat`] as a candle operation on its first part, the others read
/// inside it.
#[cfg(feature = "mkl")]
struct CatOp<'a> {
    layer: &'a Conv2d,
    blocks: &'a InputBlocks,
    rest: &'a [Tensor],
}

#[cfg(feature = "mkl")]
impl CustomOp1 for CatOp<'_> {
    fn name(&self) -> &'static str {
        "conv2d-fused-cat"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let guards: Vec<_> = self.rest.iter().map(|t| t.storage_and_layout()).collect();
        let mut parts = vec![(storage, layout)];
        for (guard, layout) in &guards {
            let candle_core::Storage::Cpu(storage) = &**guard else {
                candle_core::bail!("convolution: every part must be on the CPU")
            };
            parts.push((storage, *layout));
        }
        let (batch, _, h, w) = layout.shape().dims4()?;
        let shape = Shape::from((batch, self.layer.geometry.out, h, w));
        let out = match storage {
            CpuStorage::F32(_) => CpuStorage::F32(self.run(&parts, batch, h * w, |s| match s {
                CpuStorage::F32(data) => Some(&data[..]),
                _ => None,
            })?),
            CpuStorage::BF16(_) => {
                let out = self.run(&parts, batch, h * w, |s| match s {
                    CpuStorage::BF16(data) => Some(bf16_bits(data)),
                    _ => None,
                })?;
                bf16_storage(out)
            }
            _ => candle_core::bail!("convolution: parts must be f32 or bf16"),
        };
        Ok((out, shape))
    }
}

#[cfg(feature = "mkl")]
impl CatOp<'_> {
    /// The output over `parts`, their values read by `values`.
    fn run<'s, T: Element + Sync>(
        &self,
        parts: &[Stored<'s>],
        batch: usize,
        pixels: usize,
        values: impl Fn(&'s CpuStorage) -> Option<&'s [T]>,
    ) -> Result<Vec<T>> {
        let width = self.blocks.width;
        // Each block of the filter with its part's images and the block's first channel.
        let mut sources = Vec::new();
        for &(storage, layout) in parts {
            let (Some(data), Some((start, image_stride))) =
                (values(storage), image_strided(layout))
            else {
                candle_core::bail!("convolution: parts of one dtype with contiguous images")
            };
            let channels = layout.shape().dims4()?.1;
            for first in (0..channels).step_by(width) {
                sources.push((Planes::new(data, start, image_stride), first, channels));
            }
        }
        let geometry = self.layer.geometry;
        let epilogue = Epilogue {
            activation: self.layer.activation,
            residual: None,
            image_size: geometry.out * pixels,
        };
        let blocks = self.blocks;
        Ok(tiled(
            geometry,
            epilogue,
            pixels,
            batch,
            |image, first, tile, target| {
                target.fill_bias(&blocks.bias, tile);
                for (filter, (planes, channel, channels)) in blocks.filters.iter().zip(&sources) {
                    let image = planes.image(image, channels * pixels);
                    let rhs = &image[channel * pixels + first..];
                    T::accumulate(filter, target, rhs, pixels, tile);
                }
            },
        ))
    }
}

/// A tensor's CPU values and layout.
type Stored<'a> = (&'a CpuStorage, &'a Layout);

/// The layer over `input`, plus `residual` when given.
fn convolve_storage(
    layer: &Conv2d,
    (storage, layout): Stored<'_>,
    residual: Option<Stored<'_>>,
) -> Result<(CpuStorage, Shape)> {
    let geometry = layer.geometry;
    let (batch, inp, h, w) = layout.shape().dims4()?;
    if inp != geometry.inp {
        candle_core::bail!(
            "convolution: input has {inp} channels, the layer takes {}",
            geometry.inp
        )
    }
    let (oh, ow) = geometry.output_size(h, w)?;
    let shape = Shape::from((batch, geometry.out, oh, ow));
    let Some((start, image_stride)) = image_strided(layout) else {
        candle_core::bail!("convolution: the input's images must be contiguous")
    };
    let residual_planes = match residual {
        Some((_, residual_layout)) => {
            if residual_layout.shape() != &shape {
                candle_core::bail!(
                    "convolution: residual {:?} for an output {shape:?}",
                    residual_layout.shape()
                )
            }
            let Some(planes) = image_strided(residual_layout) else {
                candle_core::bail!("convolution: the residual's images must be contiguous")
            };
            Some(planes)
        }
        None => None,
    };
    let dims = (h, w, oh, ow);
    let out = match (storage, residual.map(|(r, _)| r)) {
        (CpuStorage::F32(data), residual) => {
            let residual = match residual {
                Some(CpuStorage::F32(r)) => Some(&r[..]),
                None => None,
                Some(_) => candle_core::bail!("convolution: the residual must be f32"),
            };
            let residual = planes(residual, residual_planes);
            let input = Input::new(Planes::new(data, start, image_stride), dims);
            CpuStorage::F32(layer.run(&input, batch, residual))
        }
        (CpuStorage::BF16(data), residual) => {
            let residual = match residual {
                Some(CpuStorage::BF16(r)) => Some(bf16_bits(r)),
                None => None,
                Some(_) => candle_core::bail!("convolution: the residual must be bf16"),
            };
            let residual = planes(residual, residual_planes);
            let bits = Planes::new(bf16_bits(data), start, image_stride);
            let out: Vec<u16> = if layer.reads_bf16() {
                layer.run(&Input::new(bits, dims), batch, residual)
            } else {
                let mut widened = vec![0f32; bits.data.len()];
                f32::from_bf16(bits.data, &mut widened);
                let widened = Planes::new(&widened, 0, image_stride);
                layer.run(&Input::new(widened, dims), batch, residual)
            };
            bf16_storage(out)
        }
        _ => candle_core::bail!("convolution: input must be f32 or bf16"),
    };
    Ok((out, shape))
}

/// The residual's images, when there is one.
fn planes<T>(data: Option<&[T]>, at: Option<(usize, usize)>) -> Option<Planes<'_, T>> {
    Some(Planes::new(data?, at?.0, at?.1))
}

#[cfg(test)]
mod tests;
