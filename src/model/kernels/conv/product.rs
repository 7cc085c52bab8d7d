//! Which product a layer runs on, and its filter packed for that product at construction.

use super::geometry::*;
#[cfg(feature = "mkl")]
use super::mkl_filter;
#[cfg(target_arch = "x86_64")]
use crate::model::kernels::bf16_gemm::Bf16LeftHand;
use crate::model::kernels::cpu_kernels;
use crate::model::kernels::fused_linear::{self, Bf16Product, MatmulPrecision};
use candle_core::{DType, Result, Tensor};

/// The product a layer runs on, with its filter in that product's form.
pub(super) enum Product {
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
    /// Rounded to bf16 as the left-hand side of the own AVX512-BF16 product.
    #[cfg(target_arch = "x86_64")]
    OwnBf16 {
        filter: Bf16LeftHand,
        bias: Vec<f32>,
    },
}

impl Product {
    pub(super) fn name(&self) -> &'static str {
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
pub(super) enum CpuProduct {
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
    /// layers take the own product: YOLO-World s ran 1.5x to 2.2x faster in bf16 on MKL's
    /// than on the own there, when the own product still read its input transposed; in its
    /// form since, which reads the input's planes as they lie, the two ran at about the
    /// same speed on an Intel core (BENCHMARKS.md, YOLO-World). Neither beats f32 there,
    /// which is why `DTYPE=auto` keeps YOLO-World's convolutions in f32 on such a CPU.
    pub(super) fn for_precision(precision: MatmulPrecision) -> Self {
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
/// on Intel's, taken as yes; on other x86 CPUs, no, AVX-512 or not. On an AMD EPYC with
/// AVX2 and no AVX-512, MKL's ran 0.7x to 0.95x the `gemm` crate's speed at the tiles'
/// shapes; on one with AVX-512 (Zen 5), YOLO-World's f32 network took 1.01x to 1.17x as
/// long on MKL's as on the `gemm` crate's AVX2 kernels in 17 comparisons of 18, 0.97x in
/// the other, and its AVX-512 kernels (built since) took 0.6x to 0.75x the AVX2 ones' time
/// (BENCHMARKS.md, YOLO-World).
#[cfg(feature = "mkl")]
pub(super) fn mkl_f32_fastest() -> bool {
    #[cfg(target_arch = "x86_64")]
    return cpu_kernels::intel_cpu();
    #[cfg(not(target_arch = "x86_64"))]
    true
}

/// The filter and bias in the form `product` runs them in.
pub(super) fn pack(
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
        CpuProduct::OwnBf16 => match Bf16LeftHand::new(&filter, out, depth) {
            Some(filter) => Ok(Product::OwnBf16 { filter, bias }),
            None => candle_core::bail!("convolution: this CPU has no AVX512-BF16"),
        },
    }
}
