//! 2-D convolutions for the convolutional families (YOLO-World): one layer type holding a
//! convolution whose batch norm is already folded into its weight and bias, with its
//! activation fused, taking and giving NCHW tensors.
//!
//! On the CPU a convolution is a matrix product per image, `Y (out, pixels) = W (out,
//! in·k²) · columns (in·k², pixels)`, which keeps NCHW on both sides: a 1x1 convolution at
//! stride 1 reads its input as the right-hand matrix as it stands, and a larger kernel
//! gathers its input into those columns first (im2col). The filter is packed once, at
//! construction, for the product that runs it: MKL's packed f32 or bf16 product (bf16 on
//! AMX), the project's own AVX512-BF16 product, or the `gemm` crate's f32 product (in a
//! build without MKL, and for f32 in the mkl build on a CPU neither Intel's nor with
//! AVX-512, where it runs faster than MKL's). Each image's output pixels are cut into tiles
//! that rayon's threads share; a tile gathers its columns into a buffer that stays in the
//! L2 cache, writes the bias into its output, runs the product onto it on its own thread
//! and applies the activation, so the output is written once and read once more. In the mkl
//! build, a kernel larger than 1x1 gathers nothing: it runs one product per kernel position
//! over the padded input (split into the stride's phases), shifted (`convolve_shifted`). A
//! layer takes and gives f32 or bf16: MKL's bf16 product reads a bf16 input as it is, and a
//! bf16 output is rounded from the product's f32 tile after the epilogue (activation, and a
//! residual where [`Conv2d::forward_add`] gives one), so a network can keep its activations
//! in bf16 between layers ([`activation_dtype`]). A 1x1 layer can also read a
//! concatenation's parts where they lie ([`Conv2d::forward_cat`]). candle's own `conv2d`
//! (im2col into a full buffer, a product into a zeroed output, then separate
//! single-threaded bias and activation passes) runs anything else: other devices and
//! dtypes.

#[cfg(target_arch = "x86_64")]
use crate::model::kernels::bf16_gemm::PackedBf16Weight;
use crate::model::kernels::cpu_kernels;
use crate::model::kernels::fused_linear::{self, Bf16Product, MatmulPrecision};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Module, Result, Shape, Tensor};
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

    /// A kernel larger than 1x1: one product per kernel position over the padded input
    /// shifted by that position, instead of gathered columns (MKL's products only); at a
    /// larger stride only from 16 input channels on: the first layer's 3 channels make
    /// products too thin to pay for their 9 passes over the output.
    #[cfg(feature = "mkl")]
    fn shifted(&self) -> bool {
        self.kernel > 1 && (self.stride == 1 || self.inp >= 16)
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
    /// A kernel larger than 1x1 as one packed `(out, in)` filter per kernel position, for
    /// MKL (see [`convolve_shifted`]).
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
            Self::Mkl { filter, .. } => match (filter.on_mkl(), filter.precision()) {
                (false, _) => "gemm-f32",
                (true, MatmulPrecision::F32) => "mkl-f32",
                (true, MatmulPrecision::Bf16) => "mkl-bf16",
            },
            #[cfg(feature = "mkl")]
            Self::MklShifted { filters, .. } => match (filters[0].on_mkl(), filters[0].precision())
            {
                (false, _) => "gemm-f32-shifted",
                (true, MatmulPrecision::F32) => "mkl-f32-shifted",
                (true, MatmulPrecision::Bf16) => "mkl-bf16-shifted",
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
    /// The `gemm` crate's f32 product through the MKL build's layers (shifted kernels,
    /// parts read in place), where it beats MKL's ([`mkl_f32_fastest`]).
    #[cfg(feature = "mkl")]
    GemmFilters,
    #[cfg(target_arch = "x86_64")]
    OwnBf16,
}

impl CpuProduct {
    /// The product [`FusedLinear`](super::fused_linear::FusedLinear) would run a layer of
    /// `precision` on: bf16 where [`fused_linear::bf16_product`] says, else f32; but MKL's
    /// bf16 product on an Intel CPU with AVX512-BF16 and no AMX as well, where the linear
    /// layers take the own product: a convolution reads its bf16 input as it is there
    /// (the own product reads it transposed), and YOLO-World s ran 1.5x to 2.2x faster
    /// in bf16 on MKL's than on the own (BENCHMARKS.md, YOLO-World).
    fn for_precision(precision: MatmulPrecision) -> Self {
        let f32_product = {
            #[cfg(feature = "mkl")]
            let product = if mkl_f32_fastest() {
                Self::Mkl(MatmulPrecision::F32)
            } else {
                Self::GemmFilters
            };
            #[cfg(not(feature = "mkl"))]
            let product = Self::Gemm;
            product
        };
        if precision == MatmulPrecision::F32 {
            return f32_product;
        }
        match fused_linear::bf16_product() {
            #[cfg(feature = "mkl")]
            Some(Bf16Product::AvxDot) if cpu_kernels::intel_cpu() => {
                Self::Mkl(MatmulPrecision::Bf16)
            }
            #[cfg(target_arch = "x86_64")]
            Some(Bf16Product::AvxDot) => Self::OwnBf16,
            #[cfg(feature = "mkl")]
            Some(Bf16Product::Mkl) => Self::Mkl(MatmulPrecision::Bf16),
            _ => f32_product,
        }
    }
}

/// Whether MKL's f32 product runs a layer's tiles faster than the `gemm` crate's on this CPU:
/// on Intel's (and on CPUs with AVX-512, where the two were not compared), taken as yes; on
/// an AMD EPYC with AVX2 and no AVX-512, MKL's ran 0.7x to 0.95x the `gemm` crate's speed
/// at the tiles' shapes (BENCHMARKS.md, YOLO-World).
#[cfg(feature = "mkl")]
fn mkl_f32_fastest() -> bool {
    #[cfg(target_arch = "x86_64")]
    return cpu_kernels::intel_cpu() || std::arch::is_x86_feature_detected!("avx512f");
    #[cfg(not(target_arch = "x86_64"))]
    true
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
        CpuProduct::Mkl(_) | CpuProduct::GemmFilters => {
            let packed = |filter: &[f32], depth| {
                let packed = match product {
                    CpuProduct::Mkl(precision) => {
                        mkl_filter::PackedFilter::new(filter, out, depth, precision)
                    }
                    _ => mkl_filter::PackedFilter::gemm(filter, out, depth),
                };
                packed.ok_or_else(|| {
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
/// activations in: bf16 where the layers' product is MKL's bf16 one, which reads bf16
/// inputs as they are (so a network in bf16 skips each layer's rounding of its input, and
/// moves half the bytes in its concatenations, as PyTorch's autocast does), f32 elsewhere
/// (the own AVX512-BF16 product reads its input transposed, so bf16 there would only add
/// passes; candle's convolution on other devices takes its filter's dtype).
pub fn activation_dtype(precision: MatmulPrecision, device: &candle_core::Device) -> DType {
    #[cfg(feature = "mkl")]
    if device.is_cpu()
        && CpuProduct::for_precision(precision) == CpuProduct::Mkl(MatmulPrecision::Bf16)
    {
        return DType::BF16;
    }
    let _ = (precision, device);
    DType::F32
}

impl Conv2d {
    /// Whether the product reads a bf16 input directly: MKL's bf16 product over the input
    /// itself (a pointwise layer) or its shifted phases.
    fn reads_bf16(&self) -> bool {
        #[cfg(feature = "mkl")]
        return match &*self.product {
            Product::Mkl { filter, .. } => {
                filter.precision() == MatmulPrecision::Bf16 && self.geometry.pointwise()
            }
            Product::MklShifted { filters, .. } => filters[0].precision() == MatmulPrecision::Bf16,
            _ => false,
        };
        #[cfg(not(feature = "mkl"))]
        false
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

/// bf16 bit patterns as a storage.
fn bf16_storage(out: Vec<u16>) -> CpuStorage {
    let mut out = std::mem::ManuallyDrop::new(out);
    // SAFETY: `bf16` is a transparent wrapper of its `u16` bit pattern; the vector's buffer
    // moves over whole, with its length and capacity, and is freed as a `Vec<bf16>` of the
    // same layout.
    CpuStorage::BF16(unsafe {
        Vec::from_raw_parts(out.as_mut_ptr().cast(), out.len(), out.capacity())
    })
}

/// A bf16 storage's values as their bit patterns.
fn bf16_bits<T>(data: &[T]) -> &[u16] {
    assert_eq!(std::mem::size_of::<T>(), 2, "bf16 values are 16 bits");
    // SAFETY: `bf16` is a transparent wrapper of its `u16` bit pattern (checked in size).
    unsafe { std::slice::from_raw_parts(data.as_ptr().cast(), data.len()) }
}

/// A type activations travel in: f32, or bf16 as its bit pattern.
trait Element: Copy + Default + Send + Sync + 'static {
    /// Whether this is f32 (so a tile's f32 output can be written in place).
    const IS_F32: bool;
    /// f32 values into this type: a copy, or rounding to bf16.
    fn store(values: &[f32], out: &mut [Self]);
    /// bf16 values into this type: widened to f32, or a copy.
    fn from_bf16(values: &[u16], out: &mut [Self]);
    /// This type's values into `T`.
    #[cfg(feature = "mkl")]
    fn copy_into<T: Element>(values: &[Self], out: &mut [T]);
    /// `row += values`, in f32.
    fn add_into(values: &[Self], row: &mut [f32]);
    /// `target += filter · rhs` by MKL's product of this type (`rhs` `ldb` apart).
    #[cfg(feature = "mkl")]
    fn accumulate(
        filter: &mkl_filter::PackedFilter,
        target: &Target,
        rhs: &[Self],
        ldb: usize,
        width: usize,
    );
}

impl Element for f32 {
    const IS_F32: bool = true;
    fn store(values: &[f32], out: &mut [Self]) {
        out.copy_from_slice(values)
    }
    fn from_bf16(values: &[u16], out: &mut [Self]) {
        for (o, &v) in out.iter_mut().zip(values) {
            *o = f32::from_bits(u32::from(v) << 16);
        }
    }
    #[cfg(feature = "mkl")]
    fn copy_into<T: Element>(values: &[Self], out: &mut [T]) {
        T::store(values, out)
    }
    fn add_into(values: &[Self], row: &mut [f32]) {
        for (r, &v) in row.iter_mut().zip(values) {
            *r += v;
        }
    }
    #[cfg(feature = "mkl")]
    fn accumulate(
        filter: &mkl_filter::PackedFilter,
        target: &Target,
        rhs: &[Self],
        ldb: usize,
        width: usize,
    ) {
        filter.accumulate_f32(target, rhs, ldb, width)
    }
}

impl Element for u16 {
    const IS_F32: bool = false;
    fn store(values: &[f32], out: &mut [Self]) {
        cpu_kernels::round_to_bf16(values, out)
    }
    fn from_bf16(values: &[u16], out: &mut [Self]) {
        out.copy_from_slice(values)
    }
    #[cfg(feature = "mkl")]
    fn copy_into<T: Element>(values: &[Self], out: &mut [T]) {
        T::from_bf16(values, out)
    }
    fn add_into(values: &[Self], row: &mut [f32]) {
        for (r, &v) in row.iter_mut().zip(values) {
            *r += f32::from_bits(u32::from(v) << 16);
        }
    }
    #[cfg(feature = "mkl")]
    fn accumulate(
        filter: &mkl_filter::PackedFilter,
        target: &Target,
        rhs: &[Self],
        ldb: usize,
        width: usize,
    ) {
        filter.accumulate_bf16(target, rhs, ldb, width)
    }
}

/// NCHW values whose images are each contiguous, `image_stride` values apart.
#[derive(Clone, Copy)]
struct Planes<'a, T> {
    /// From the first image's first value on.
    data: &'a [T],
    image_stride: usize,
}

impl<'a, T> Planes<'a, T> {
    fn new(data: &'a [T], start: usize, image_stride: usize) -> Self {
        Self {
            data: &data[start..],
            image_stride,
        }
    }

    /// Image `index`'s first `size` values.
    fn image(&self, index: usize, size: usize) -> &'a [T] {
        let start = index * self.image_stride;
        &self.data[start..start + size]
    }
}

/// An NCHW input with its output's spatial size.
struct Input<'a, S> {
    planes: Planes<'a, S>,
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
}

impl<'a, S> Input<'a, S> {
    /// `planes` with the input's `(h, w)` and the output's `(oh, ow)`.
    fn new(planes: Planes<'a, S>, (h, w, oh, ow): (usize, usize, usize, usize)) -> Self {
        Self {
            planes,
            h,
            w,
            oh,
            ow,
        }
    }

    fn image(&self, index: usize, channels: usize) -> &'a [S] {
        self.planes.image(index, channels * self.h * self.w)
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
struct SendPtr<T>(*mut T);
// SAFETY: tasks write disjoint tiles of the buffer behind it.
unsafe impl<T> Sync for SendPtr<T> {}

impl<T> SendPtr<T> {
    /// The pointer `offset` values on (a method, so that closures take the whole `SendPtr`).
    ///
    /// # Safety
    /// `offset` stays inside the buffer.
    unsafe fn at(&self, offset: usize) -> *mut T {
        // SAFETY: as the caller promises.
        unsafe { self.0.add(offset) }
    }
}

/// The output `[batch, out, oh, ow]` of the layer over `input`. An f32 output is the
/// products' target itself; a bf16 one is rounded from a tile buffer of the thread, after
/// the activation, while the tile is in the cache.
fn convolve<S: Source, O: Element>(
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
fn tiled<O: Element>(
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
fn tile_rows(buffer: &mut Vec<f32>, channels: usize, width: usize) -> &mut [f32] {
    if buffer.len() < channels * width {
        buffer.resize(channels * width, 0.0);
    }
    &mut buffer[..channels * width]
}

/// What a layer does to its products' output before it stores it, on a row of a tile
/// while the tile is in the cache: the activation, then the residual when there is one.
#[derive(Clone, Copy)]
struct Epilogue<'a, O> {
    activation: ConvActivation,
    residual: Option<Planes<'a, O>>,
    /// Values per output image.
    image_size: usize,
}

impl<O: Element> Epilogue<'_, O> {
    /// Applies it to `row`, image `image`'s output values from `offset` on, in place.
    fn apply(&self, row: &mut [f32], image: usize, offset: usize) {
        if self.activation == ConvActivation::Silu {
            cpu_kernels::silu_in_place(row);
        }
        if let Some(residual) = self.residual {
            let residual = &residual.image(image, self.image_size)[offset..offset + row.len()];
            O::add_into(residual, row);
        }
    }

    /// Applies it to `row`, then stores the row in `out`, in `out`'s type.
    fn store(&self, row: &mut [f32], out: &mut [O], image: usize, offset: usize) {
        self.apply(row, image, offset);
        O::store(row, out);
    }
}

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
fn convolve_shifted<S: Element, O: Element>(
    filters: &[mkl_filter::PackedFilter],
    bias: &[f32],
    geometry: Geometry,
    epilogue: Epilogue<'_, O>,
    input: &Input<'_, S>,
    batch: usize,
) -> Vec<O> {
    let phases = Phases::new(geometry, input);
    let layer = (filters, bias, geometry, epilogue);
    if filters[0].precision() == MatmulPrecision::Bf16 {
        PHASED_BF16.with(|cell| {
            let mut buffer = cell.take();
            let phased = phases.fill(input, (batch, geometry.inp), &mut buffer);
            let out = shifted_products(layer, input, batch, &phases, |f, t, o, w| {
                f.accumulate_bf16(t, &phased[o..], phases.channel_stride(), w)
            });
            cell.set(buffer);
            out
        })
    } else {
        PHASED_F32.with(|cell| {
            let mut buffer = cell.take();
            let phased = phases.fill(input, (batch, geometry.inp), &mut buffer);
            let out = shifted_products(layer, input, batch, &phases, |f, t, o, w| {
                f.accumulate_f32(t, &phased[o..], phases.channel_stride(), w)
            });
            cell.set(buffer);
            out
        })
    }
}

/// A shifted layer's parts: its filters, bias, geometry and epilogue.
#[cfg(feature = "mkl")]
type ShiftedLayer<'a, O> = (
    &'a [mkl_filter::PackedFilter],
    &'a [f32],
    Geometry,
    Epilogue<'a, O>,
);

/// The tiles of [`convolve_shifted`] over its phased input: `accumulate(filter, target,
/// offset, width)` adds one position's product, its right-hand side at `offset` in the
/// phased input.
#[cfg(feature = "mkl")]
fn shifted_products<S, O: Element>(
    (filters, bias, geometry, epilogue): ShiftedLayer<'_, O>,
    input: &Input<'_, S>,
    batch: usize,
    phases: &Phases,
    accumulate: impl Fn(&mkl_filter::PackedFilter, &Target, usize, usize) + Sync,
) -> Vec<O> {
    let Geometry {
        out: channels,
        inp,
        kernel,
        stride,
        ..
    } = geometry;
    let (oh, ow, wq) = (input.oh, input.ow, phases.wq);
    let mut out: Vec<O> = Vec::with_capacity(batch * channels * oh * ow);
    let rows = shifted_tile_rows(inp, wq, oh, batch);
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
                let base = image * phases.image_size(inp) + first * wq;
                for (position, filter) in filters.iter().enumerate() {
                    let (ky, kx) = (position / kernel, position % kernel);
                    let phase = (ky % stride) * stride + kx % stride;
                    let offset = base + phase * phases.plane() + (ky / stride) * wq + kx / stride;
                    accumulate(filter, &target, offset, width);
                }
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
#[cfg(feature = "mkl")]
struct Phases {
    stride: usize,
    padding: usize,
    hq: usize,
    wq: usize,
    /// Values to spare past the last plane: the last rows' wasted columns read up to
    /// `(k - 1) / stride` values past it.
    spare: usize,
}

#[cfg(feature = "mkl")]
impl Phases {
    fn new<S>(geometry: Geometry, input: &Input<'_, S>) -> Self {
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

    fn plane(&self) -> usize {
        self.hq * self.wq
    }

    /// Values between two input channels' phases: the products' row stride.
    fn channel_stride(&self) -> usize {
        self.stride * self.stride * self.plane()
    }

    fn image_size(&self, channels: usize) -> usize {
        channels * self.channel_stride()
    }

    /// The phases of the input's `batch` images of `channels` in `buffer` (grown when too small, never shrunk: its values are
    /// all rewritten, so a buffer kept between calls costs no clearing), converted to `T`;
    /// the part of `buffer` that holds them.
    fn fill<'a, S: Element, T: Element>(
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
    fn gather_row<S: Element>(&self, source: &[S], px: usize, row: &mut [S]) {
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

/// Output rows per tile of a shifted convolution: the tile's input rows (`in` channels of
/// about as many phase rows) fit [`COLUMN_BYTES`], and every thread gets about two tiles.
#[cfg(feature = "mkl")]
fn shifted_tile_rows(inp: usize, wq: usize, oh: usize, batch: usize) -> usize {
    let fits = COLUMN_BYTES / (inp * wq * 4);
    let wanted_tiles = 2 * rayon::current_num_threads().max(1);
    let per_image = wanted_tiles.div_ceil(batch).max(1);
    fits.min(oh.div_ceil(per_image)).clamp(1, oh.max(1))
}

/// A run of one image's output pixels, in row-major pixel order.
struct Tile<'a, S> {
    /// The image's `[in, h, w]` input.
    image: &'a [S],
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
}

thread_local! {
    /// A shifted convolution's phased input, f32 or bf16, kept by the calling thread between
    /// layers and frames (see [`Phases::fill`]).
    #[cfg(feature = "mkl")]
    static PHASED_F32: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
    #[cfg(feature = "mkl")]
    static PHASED_BF16: std::cell::Cell<Vec<u16>> = const { std::cell::Cell::new(Vec::new()) };
    /// A tile's products' output, channels by pixels, when the layer's output is not the
    /// products' f32 target itself.
    static TILE: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
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

/// How a tile's product reads an input of this type: f32 through [`right_hand`], bf16 as
/// it stands (MKL's bf16 product of a pointwise layer only: [`Conv2d::reads_bf16`]).
trait Source: Element {
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
        unreachable!("only MKL's bf16 pointwise layers read bf16 tiles")
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

/// `target += filter · rhs` by the `gemm` crate, on this thread: `filter` `(out, depth)`
/// row-major, `rhs` `depth` rows of `width` values `ldb` apart.
fn gemm_onto(
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
fn im2col(geometry: Geometry, input: &Input<'_, f32>, tile: &Tile<'_, f32>, columns: &mut [f32]) {
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

/// A filter packed as the left-hand matrix of MKL's packed products, f32 or bf16, or kept
/// as rows for the `gemm` crate's f32 product, where that one is the faster
/// ([`mkl_f32_fastest`](super::mkl_f32_fastest)).
#[cfg(feature = "mkl")]
mod mkl_filter {
    use super::{Target, gemm_onto};
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
        kernel: Kernel,
        precision: MatmulPrecision,
        out: i32,
        depth: i32,
    }

    /// Where a filter's products run.
    enum Kernel {
        /// MKL's packed product, the filter in MKL's buffer.
        Mkl { data: *mut u8, layout: Layout },
        /// The `gemm` crate's f32 product, the filter `(out, depth)` row-major.
        Gemm(Vec<f32>),
    }

    // SAFETY: the buffer is written once, in `new`, and only read afterwards.
    unsafe impl Send for PackedFilter {}
    unsafe impl Sync for PackedFilter {}

    impl PackedFilter {
        /// A row-major `(out, depth)` filter for the `gemm` crate's f32 product; `None` when a
        /// size does not fit 32 bits (as for MKL's).
        pub fn gemm(filter: &[f32], out: usize, depth: usize) -> Option<Self> {
            assert_eq!(filter.len(), out * depth);
            Some(Self {
                kernel: Kernel::Gemm(filter.to_vec()),
                precision: MatmulPrecision::F32,
                out: i32::try_from(out).ok()?,
                depth: i32::try_from(depth).ok()?,
            })
        }

        /// A row-major `(out, depth)` filter for the same product as this one.
        pub fn like(&self, filter: &[f32], out: usize, depth: usize) -> Option<Self> {
            match self.kernel {
                Kernel::Mkl { .. } => Self::new(filter, out, depth, self.precision),
                Kernel::Gemm(_) => Self::gemm(filter, out, depth),
            }
        }

        /// Whether the products run on MKL (else on the `gemm` crate).
        pub fn on_mkl(&self) -> bool {
            matches!(self.kernel, Kernel::Mkl { .. })
        }

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
                kernel: Kernel::Mkl { data, layout },
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
            let data = match &self.kernel {
                Kernel::Mkl { data, .. } => *data,
                Kernel::Gemm(filter) => {
                    let dims = (self.out as usize, self.depth as usize);
                    return gemm_onto(filter, dims, rhs, ldb, width, target);
                }
            };
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
                        data as *const f32,
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
            let Kernel::Mkl { data, .. } = self.kernel else {
                unreachable!("bf16 filters are MKL's")
            };
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
                        data as *const u16,
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
            if let Kernel::Mkl { data, layout } = self.kernel {
                // SAFETY: allocated in `new` with this layout.
                unsafe { std::alloc::dealloc(data, layout) }
            }
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
            CpuProduct::GemmFilters,
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
            #[cfg(feature = "mkl")]
            CpuProduct::GemmFilters => false,
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

    /// bf16 inputs, read as they are by MKL's bf16 layers and widened for the others, give
    /// bf16 outputs at cosine 0.9999 or more to the f64 reference on the same (rounded)
    /// input, at every kernel, stride and padding.
    #[test]
    fn bf16_inputs_match_candles_convolution() {
        let bf16 = |t: &Tensor| t.to_dtype(DType::BF16).unwrap();
        for product in products() {
            for (kernel, stride, padding) in SHAPES {
                for (batch, inp, out) in [(1, 3, 16), (3, 16, 48), (3, 48, 16)] {
                    let (weight, bias, x) = case((batch, inp, out, kernel), (13, 7));
                    let x = bf16(&x).to_dtype(DType::F32).unwrap();
                    let layer = Conv2d::with_product(
                        weight.clone(),
                        Some(bias.clone()),
                        stride,
                        padding,
                        ConvActivation::Silu,
                        product,
                    )
                    .unwrap();
                    let got = layer.forward(&bf16(&x)).unwrap();
                    assert_eq!(got.dtype(), DType::BF16);
                    let case = (weight, bias, x);
                    let expected = reference(&case, stride, padding, ConvActivation::Silu);
                    let what =
                        format!("{product:?} k{kernel} s{stride} p{padding} {batch}x{inp}->{out}");
                    check(&got.to_dtype(DType::F32).unwrap(), &expected, true, &what);
                }
            }
        }
    }

    /// A residual added in the epilogue equals the layer's output plus the residual, in f32
    /// and bf16, and a channel slice of a larger tensor (its images strided) is read in
    /// place as its contiguous copy would be.
    #[test]
    fn residuals_and_channel_slices_match_their_separate_passes() {
        for product in products() {
            for (kernel, stride, padding) in [(3, 1, 1), (1, 1, 0), (3, 2, 1)] {
                let (weight, bias, wide) = case((3, 32, 16, kernel), (13, 7));
                let x = wide.narrow(1, 16, 16).unwrap();
                let weight = weight.narrow(1, 0, 16).unwrap();
                let layer = Conv2d::with_product(
                    weight,
                    Some(bias),
                    stride,
                    padding,
                    ConvActivation::Silu,
                    product,
                )
                .unwrap();
                let what = format!("{product:?} k{kernel} s{stride}");
                let alone = layer.forward(&x.contiguous().unwrap()).unwrap();
                check(&layer.forward(&x).unwrap(), &alone, false, &what);
                let residual = Tensor::randn(0f32, 1.0, alone.dims(), &Device::Cpu).unwrap();
                let expected = (&alone + &residual).unwrap();
                let got = layer.forward_add(&x, &residual).unwrap();
                check(&got, &expected, false, &what);
                let bf16 = |t: &Tensor| t.to_dtype(DType::BF16).unwrap();
                let got = layer.forward_add(&bf16(&x), &bf16(&residual)).unwrap();
                assert_eq!(got.dtype(), DType::BF16);
                check(&got.to_dtype(DType::F32).unwrap(), &expected, true, &what);
            }
        }
    }

    /// A 1x1 layer over a concatenation's parts, read where they lie (a channel slice of a
    /// batch among them), gives what it gives over the concatenated tensor, in f32 and
    /// bf16; parts that do not fall on its blocks are concatenated instead.
    #[test]
    fn a_concatenation_read_in_place_matches_the_concatenated_input() {
        let dev = Device::Cpu;
        let (weight, bias, wide) = case((3, 64, 24, 1), (13, 7));
        let parts = [
            wide.narrow(1, 16, 32).unwrap(),
            Tensor::randn(0f32, 1.0, (3, 16, 13, 7), &dev).unwrap(),
            Tensor::randn(0f32, 1.0, (3, 16, 13, 7), &dev).unwrap(),
        ];
        let uneven = [
            parts[0].narrow(1, 0, 8).unwrap(),
            parts[0].narrow(1, 8, 24).unwrap(),
        ];
        for precision in [MatmulPrecision::F32, MatmulPrecision::Bf16] {
            let layer = Conv2d::pointwise_in_blocks(
                weight.clone(),
                Some(bias.clone()),
                ConvActivation::Silu,
                precision,
                16,
            )
            .unwrap();
            let dtype = activation_dtype(precision, &dev);
            let parts: Vec<Tensor> = parts.iter().map(|p| p.to_dtype(dtype).unwrap()).collect();
            let whole = layer.forward(&Tensor::cat(&parts, 1).unwrap()).unwrap();
            let whole = whole.to_dtype(DType::F32).unwrap();
            let got = layer.forward_cat(&parts).unwrap();
            assert_eq!(got.dtype(), dtype);
            let bf16 = dtype == DType::BF16;
            check(&got.to_dtype(DType::F32).unwrap(), &whole, bf16, "parts");
            let mut mixed: Vec<Tensor> =
                uneven.iter().map(|p| p.to_dtype(dtype).unwrap()).collect();
            mixed.extend_from_slice(&parts[1..]);
            let got = layer.forward_cat(&mixed).unwrap();
            check(
                &got.to_dtype(DType::F32).unwrap(),
                &whole,
                bf16,
                "uneven parts",
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
        #[cfg(feature = "mkl")]
        let expected_f32 = if mkl_f32_fastest() {
            "mkl-f32"
        } else {
            "gemm-f32"
        };
        #[cfg(not(feature = "mkl"))]
        let expected_f32 = "gemm-f32";
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
            Some(Bf16Product::AvxDot) if cfg!(feature = "mkl") && cpu_kernels::intel_cpu() => {
                "mkl-bf16"
            }
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
