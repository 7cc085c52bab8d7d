//! Linear layers for the per-frame path that fold bias, residual and activation into the
//! matrix product, instead of making separate passes over its output.
//!
//! candle's `Linear` runs the product into a zeroed buffer, then adds the bias in a second,
//! single-threaded broadcast pass, and a residual add is a third. On the CPU this layer
//! writes bias (plus residual) into the output in parallel first and lets the product
//! accumulate onto it (`C = C + X Wᵀ`, as PyTorch's `addmm` does), then applies the
//! activation in place. With the `mkl` feature the weight is also packed once, at load, into
//! MKL's own layout. Other devices and dtypes use candle's own operations, with the same
//! arithmetic.

#[cfg(target_arch = "x86_64")]
use crate::model::kernels::bf16_gemm;
use crate::model::kernels::cpu_kernels::{self, Bf16Unit};
#[cfg(any(feature = "mkl", target_arch = "x86_64"))]
use candle_core::CustomOp2;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Module, Result, Shape, Storage, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;

/// What is applied to each output value after bias and residual.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Activation {
    None,
    /// CLIP's `x * sigmoid(1.702 x)`.
    QuickGelu,
    /// The exact GELU, `x * (1 + erf(x / √2)) / 2` (candle's `gelu_erf`).
    GeluErf,
    /// GELU's tanh approximation (candle's `gelu`, transformers' `gelu_pytorch_tanh`).
    GeluTanh,
}

impl Activation {
    /// The fused form of a candle activation, where there is one.
    pub fn fused(act: candle_nn::Activation) -> Option<Self> {
        match act {
            candle_nn::Activation::Gelu => Some(Self::GeluErf),
            candle_nn::Activation::GeluPytorchTanh | candle_nn::Activation::NewGelu => {
                Some(Self::GeluTanh)
            }
            _ => None,
        }
    }

    fn apply_composite(self, x: Tensor) -> Result<Tensor> {
        match self {
            Self::None => Ok(x),
            Self::QuickGelu => quick_gelu_composite(&x),
            Self::GeluErf => x.gelu_erf(),
            Self::GeluTanh => x.gelu(),
        }
    }
}

/// quick-GELU from candle's own operations.
fn quick_gelu_composite(x: &Tensor) -> Result<Tensor> {
    x * candle_nn::ops::sigmoid(&(x * 1.702f64)?)?
}

/// The number format of a layer's matrix product.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum MatmulPrecision {
    /// f32 inputs, f32 accumulation.
    #[default]
    F32,
    /// bf16 weight and inputs, f32 accumulation and output. Bias, residual, activation and
    /// everything outside the product stay f32. The product runs where [`bf16_product`]
    /// says; a layer asked for bf16 where there is none stays f32 (`model::load` refuses
    /// `DTYPE=bf16` there, so this happens only in tests).
    Bf16,
}

impl std::fmt::Display for MatmulPrecision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
        })
    }
}

/// Which product a bf16 layer runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bf16Product {
    /// MKL's, on AMX where the CPU has it (and emulated where it has no bf16 unit).
    Mkl,
    /// The project's own AVX512-BF16 product (`bf16_gemm`): MKL's runs at f32 speed on
    /// AMD's Zen 4, and a build without MKL has no other.
    AvxDot,
}

/// Where bf16 products run in this build, on this CPU: MKL's on AMX, the own product on
/// AVX512-BF16 without AMX (or on any CPU with it, in a build without MKL), MKL's emulation
/// on a CPU with neither; `None` where the build has no bf16 product at all.
pub fn bf16_product() -> Option<Bf16Product> {
    let unit = cpu_kernels::bf16_matrix_unit();
    let own = own_bf16_supported();
    match unit {
        Some(Bf16Unit::AmxBf16) if cfg!(feature = "mkl") => Some(Bf16Product::Mkl),
        _ if own => Some(Bf16Product::AvxDot),
        _ if cfg!(feature = "mkl") => Some(Bf16Product::Mkl),
        _ => None,
    }
}

fn own_bf16_supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    return bf16_gemm::supported();
    #[cfg(not(target_arch = "x86_64"))]
    return false;
}

enum Weight {
    /// `(out, in)`, as stored.
    Tensor(Tensor),
    /// Rounded to bf16 and packed for the own AVX512-BF16 product.
    #[cfg(target_arch = "x86_64")]
    Bf16Packed(bf16_gemm::PackedBf16Weight),
    /// Packed for MKL: what a CPU f32 weight becomes in an mkl build.
    #[cfg(feature = "mkl")]
    Packed(mkl_packed::PackedWeight),
}

/// A `(out, in)` weight and an `out` bias: `y = x Wᵀ + b`, over the last dimension of `x`.
pub struct FusedLinear {
    weight: Weight,
    bias: Tensor,
}

impl FusedLinear {
    /// An f32 layer.
    pub fn new(weight: Tensor, bias: Tensor) -> Self {
        Self::new_as(weight, bias, MatmulPrecision::F32)
    }

    /// A layer whose product runs in `precision` (see [`MatmulPrecision`]).
    pub fn new_as(weight: Tensor, bias: Tensor, precision: MatmulPrecision) -> Self {
        #[cfg(target_arch = "x86_64")]
        if precision == MatmulPrecision::Bf16
            && bf16_product() == Some(Bf16Product::AvxDot)
            && let Some(packed) = pack_for_own_bf16(&weight)
        {
            return Self {
                weight: Weight::Bf16Packed(packed),
                bias,
            };
        }
        #[cfg(feature = "mkl")]
        if let Some(packed) = mkl_packed::PackedWeight::new(&weight, precision) {
            // The packed copy replaces the weight (MKL's layout is somewhat larger).
            return Self {
                weight: Weight::Packed(packed),
                bias,
            };
        }
        #[cfg(not(feature = "mkl"))]
        let _ = precision;
        Self {
            weight: Weight::Tensor(weight),
            bias,
        }
    }

    /// Reads `weight` and `bias` from `vb`, as `candle_nn::linear` does: an f32 layer.
    pub fn load(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Self> {
        Self::load_as(in_dim, out_dim, vb, MatmulPrecision::F32)
    }

    /// Reads `weight` and `bias` from `vb`, for a product in `precision`.
    pub fn load_as(
        in_dim: usize,
        out_dim: usize,
        vb: VarBuilder,
        precision: MatmulPrecision,
    ) -> Result<Self> {
        Ok(Self::new_as(
            vb.get((out_dim, in_dim), "weight")?,
            vb.get(out_dim, "bias")?,
            precision,
        ))
    }

    /// `x Wᵀ + b + residual`, where `residual` has the output's shape.
    pub fn forward_add(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        self.forward_with(x, Some(residual), Activation::None)
    }

    /// `activation(x Wᵀ + b + residual)`; `residual`, when given, has the output's shape.
    pub fn forward_with(
        &self,
        x: &Tensor,
        residual: Option<&Tensor>,
        activation: Activation,
    ) -> Result<Tensor> {
        let cpu_f32 = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
        let fused = cpu_f32(x) && residual.is_none_or(cpu_f32);
        let residual = match residual {
            Some(r) if fused => Some(r.contiguous()?),
            Some(r) => Some(r.clone()),
            None => None,
        };
        let op = FusedLinearOp {
            residual: residual.as_ref(),
            activation,
        };
        match &self.weight {
            #[cfg(feature = "mkl")]
            Weight::Packed(packed) => packed_forward(x, &self.bias, op, fused, packed),
            #[cfg(target_arch = "x86_64")]
            Weight::Bf16Packed(packed) => packed_forward(x, &self.bias, op, fused, packed),
            Weight::Tensor(weight) if fused && cpu_f32(weight) => {
                x.contiguous()?.apply_op3_no_bwd(weight, &self.bias, &op)
            }
            Weight::Tensor(weight) => {
                let linear = candle_nn::Linear::new(weight.clone(), Some(self.bias.clone()));
                let mut y = linear.forward(x)?;
                if let Some(residual) = &residual {
                    y = (y + residual)?;
                }
                activation.apply_composite(y)
            }
        }
    }
}

impl Module for FusedLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with(x, None, Activation::None)
    }
}

struct FusedLinearOp<'a> {
    residual: Option<&'a Tensor>,
    activation: Activation,
}

/// Output values per parallel task when applying the activation.
const CHUNK: usize = 16 * 1024;

fn f32_slice<'a>(storage: &'a CpuStorage, layout: &Layout, what: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("fused linear: {what} must be f32")
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("fused linear: {what} must be contiguous")
    };
    Ok(&data[start..end])
}

impl FusedLinearOp<'_> {
    /// Bias and residual into a new output, `product` onto it, then the activation.
    /// `product(out, x, rows)` must add `x Wᵀ` into `out`.
    fn run(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        bias: &CpuStorage,
        bias_layout: &Layout,
        (out_dim, in_dim): (usize, usize),
        product: impl FnOnce(&mut [f32], &[f32], usize),
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(x, x_layout, "input")?;
        let bias = f32_slice(bias, bias_layout, "bias")?;
        let dims = x_layout.shape().dims();
        if in_dim == 0 || dims.last() != Some(&in_dim) || bias.len() != out_dim {
            candle_core::bail!(
                "fused linear: input {:?}, weight ({out_dim}, {in_dim}), bias {}",
                dims,
                bias.len()
            )
        }
        let rows = x.len() / in_dim;
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().expect("checked above") = out_dim;
        let out_shape = Shape::from(out_dims);

        // Not zeroed first: bias (plus residual) is written over every value.
        let mut out: Vec<f32> = Vec::with_capacity(rows * out_dim);
        let spare = &mut out.spare_capacity_mut()[..rows * out_dim];
        match self.residual {
            None => spare.par_chunks_mut(out_dim).for_each(|row| {
                for (o, &b) in row.iter_mut().zip(bias) {
                    o.write(b);
                }
            }),
            Some(residual) => {
                if residual.shape() != &out_shape {
                    candle_core::bail!(
                        "fused linear: residual {:?}, output {:?}",
                        residual.shape(),
                        out_shape
                    )
                }
                let (storage, layout) = residual.storage_and_layout();
                let Storage::Cpu(storage) = &*storage else {
                    candle_core::bail!("fused linear: residual must be on the CPU")
                };
                let residual = f32_slice(storage, layout, "residual")?;
                spare
                    .par_chunks_mut(out_dim)
                    .zip(residual.par_chunks(out_dim))
                    .for_each(|(row, residual)| {
                        for ((o, &r), &b) in row.iter_mut().zip(residual).zip(bias) {
                            o.write(r + b);
                        }
                    });
            }
        }
        // SAFETY: both arms wrote all rows × out_dim values (bias has out_dim values, and
        // the residual has the output's shape, checked above).
        unsafe { out.set_len(rows * out_dim) };
        product(&mut out, x, rows);
        match self.activation {
            Activation::None => {}
            Activation::QuickGelu => out
                .par_chunks_mut(CHUNK)
                .for_each(cpu_kernels::quick_gelu_in_place),
            Activation::GeluErf => out
                .par_chunks_mut(CHUNK)
                .for_each(cpu_kernels::gelu_erf_in_place),
            Activation::GeluTanh => out
                .par_chunks_mut(CHUNK)
                .for_each(cpu_kernels::gelu_tanh_in_place),
        }
        Ok((CpuStorage::F32(out), out_shape))
    }
}

impl CustomOp3 for FusedLinearOp<'_> {
    fn name(&self) -> &'static str {
        "fused-linear"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        weight: &CpuStorage,
        weight_layout: &Layout,
        bias: &CpuStorage,
        bias_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let weight = f32_slice(weight, weight_layout, "weight")?;
        let (out_dim, in_dim) = weight_layout.shape().dims2()?;
        self.run(
            x,
            x_layout,
            bias,
            bias_layout,
            (out_dim, in_dim),
            |out, x, rows| accumulate_product(out, x, weight, rows, in_dim, out_dim),
        )
    }
}

/// A weight packed at load for the product that runs it.
#[cfg(any(feature = "mkl", target_arch = "x86_64"))]
trait PackedWeight: Sync {
    /// `(out_dim, in_dim)`.
    fn dims(&self) -> (usize, usize);
    /// `out (rows, out_dim) += x (rows, in_dim) · Wᵀ`.
    fn accumulate(&self, out: &mut [f32], x: &[f32], rows: usize);
}

#[cfg(feature = "mkl")]
impl PackedWeight for mkl_packed::PackedWeight {
    fn dims(&self) -> (usize, usize) {
        self.dims()
    }

    fn accumulate(&self, out: &mut [f32], x: &[f32], rows: usize) {
        self.accumulate_product(out, x, rows)
    }
}

#[cfg(target_arch = "x86_64")]
impl PackedWeight for bf16_gemm::PackedBf16Weight {
    fn dims(&self) -> (usize, usize) {
        self.dims()
    }

    fn accumulate(&self, out: &mut [f32], x: &[f32], rows: usize) {
        #[cfg(feature = "mkl")]
        let_mkl_threads_sleep();
        with_bf16_rows(x, self.dims().1, self.input_stride(), |rounded| {
            self.accumulate_product(out, rounded, rows)
        })
    }
}

/// The fused layer over a packed weight: `x` (CPU f32 only) through `op`.
#[cfg(any(feature = "mkl", target_arch = "x86_64"))]
fn packed_forward<W: PackedWeight>(
    x: &Tensor,
    bias: &Tensor,
    op: FusedLinearOp<'_>,
    fused: bool,
    packed: &W,
) -> Result<Tensor> {
    if !fused {
        candle_core::bail!("fused linear: a packed weight takes CPU f32 inputs only")
    }
    x.contiguous()?
        .apply_op2_no_bwd(bias, &PackedProduct { op, packed })
}

/// The fused layer over a packed weight; the bias is the second operand.
#[cfg(any(feature = "mkl", target_arch = "x86_64"))]
struct PackedProduct<'a, W> {
    op: FusedLinearOp<'a>,
    packed: &'a W,
}

#[cfg(any(feature = "mkl", target_arch = "x86_64"))]
impl<W: PackedWeight> CustomOp2 for PackedProduct<'_, W> {
    fn name(&self) -> &'static str {
        "fused-linear-packed"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        bias: &CpuStorage,
        bias_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.op.run(
            x,
            x_layout,
            bias,
            bias_layout,
            self.packed.dims(),
            |out, x, rows| self.packed.accumulate(out, x, rows),
        )
    }
}

/// A contiguous CPU f32 `(out, in)` weight rounded to bf16 and packed for the own product;
/// `None` for anything else.
#[cfg(target_arch = "x86_64")]
fn pack_for_own_bf16(weight: &Tensor) -> Option<bf16_gemm::PackedBf16Weight> {
    let (out_dim, in_dim) = weight.dims2().ok()?;
    let (storage, layout) = weight.storage_and_layout();
    let Storage::Cpu(CpuStorage::F32(data)) = &*storage else {
        return None;
    };
    let (start, end) = layout.contiguous_offsets()?;
    let mut rounded = vec![0u16; end - start];
    cpu_kernels::round_to_bf16(&data[start..end], &mut rounded);
    bf16_gemm::PackedBf16Weight::new(&rounded, out_dim, in_dim)
}

#[cfg(any(feature = "mkl", target_arch = "x86_64"))]
thread_local! {
    /// Each bf16 product's input rows, rounded: reused across calls.
    static BF16_ROWS: std::cell::RefCell<Vec<u16>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `product` on `x`'s rows of `in_dim` values rounded to bf16, `stride` values apart
/// (a row's values past `in_dim` are 0), in a buffer this thread keeps between calls.
#[cfg(any(feature = "mkl", target_arch = "x86_64"))]
fn with_bf16_rows<T>(
    x: &[f32],
    in_dim: usize,
    stride: usize,
    product: impl FnOnce(&[u16]) -> T,
) -> T {
    BF16_ROWS.with(|cell| {
        let mut rounded = cell.borrow_mut();
        cpu_kernels::round_rows_to_bf16(x, in_dim, stride, &mut rounded);
        product(&rounded)
    })
}

/// MKL's OpenMP threads spin for 200 ms after each call by default, holding the cores that
/// rayon's threads need for the own bf16 product right after (the attention products
/// between two layers are MKL's). A thread that runs the own product has the OpenMP teams
/// it forks sleep at once instead: CLIP's image tower at batch 1 ran 39 ms with the spin
/// and 32.5 ms without it.
#[cfg(all(feature = "mkl", target_arch = "x86_64"))]
fn let_mkl_threads_sleep() {
    unsafe extern "C" {
        // Intel's OpenMP runtime, which MKL's threading layer runs on.
        fn kmp_set_blocktime(milliseconds: i32);
    }
    thread_local! {
        static DONE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }
    DONE.with(|done| {
        if !done.replace(true) {
            // SAFETY: sets a setting of this thread's OpenMP state; no pointers.
            unsafe { kmp_set_blocktime(0) }
        }
    });
}

/// `out (rows, out_dim) += x (rows, in_dim) · weight (out_dim, in_dim)ᵀ`, all row-major.
#[cfg(not(feature = "mkl"))]
fn accumulate_product(
    out: &mut [f32],
    x: &[f32],
    weight: &[f32],
    rows: usize,
    in_dim: usize,
    out_dim: usize,
) {
    let threads = rayon::current_num_threads();
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the strides describe `out`, `x` and `weight` exactly as sized by the caller
    // (`out` is rows × out_dim, `x` rows × in_dim, `weight` out_dim × in_dim), and the
    // buffers do not overlap. gemm computes dst = alpha·dst + beta·lhs·rhs, so alpha 1 keeps
    // what is there.
    unsafe {
        gemm::gemm(
            rows,
            out_dim,
            in_dim,
            out.as_mut_ptr(),
            1,
            out_dim as isize,
            true,
            x.as_ptr(),
            1,
            in_dim as isize,
            weight.as_ptr(),
            in_dim as isize,
            1,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        )
    }
}

#[cfg(feature = "mkl")]
unsafe extern "C" {
    // Fortran BLAS, from the MKL that candle-core links with its `mkl` feature.
    fn sgemm_(
        transa: *const std::ffi::c_char,
        transb: *const std::ffi::c_char,
        m: *const i32,
        n: *const i32,
        k: *const i32,
        alpha: *const f32,
        a: *const f32,
        lda: *const i32,
        b: *const f32,
        ldb: *const i32,
        beta: *const f32,
        c: *mut f32,
        ldc: *const i32,
    );
}

/// `out (rows, out_dim) += x (rows, in_dim) · weight (out_dim, in_dim)ᵀ`, all row-major:
/// for weights MKL could not pack.
#[cfg(feature = "mkl")]
fn accumulate_product(
    out: &mut [f32],
    x: &[f32],
    weight: &[f32],
    rows: usize,
    in_dim: usize,
    out_dim: usize,
) {
    // Column-major BLAS sees the row-major output as its transpose: outᵀ = W · xᵀ, with W
    // read transposed from its row-major (out_dim, in_dim) storage.
    let (m, n, k) = (out_dim as i32, rows as i32, in_dim as i32);
    let (alpha, beta) = (1f32, 1f32);
    // SAFETY: dimensions and leading dimensions match the slices' sizes checked by the
    // caller; MKL only reads `weight` and `x` and writes within `out`.
    unsafe {
        sgemm_(
            c"T".as_ptr(),
            c"N".as_ptr(),
            &m,
            &n,
            &k,
            &alpha,
            weight.as_ptr(),
            &k,
            x.as_ptr(),
            &k,
            &beta,
            out.as_mut_ptr(),
            &m,
        )
    }
}

/// Weights kept in MKL's packed format, so that a product does not re-pack the weight into
/// its kernel's layout every call (that copy took about a tenth of CLIP's image tower).
/// A bf16 weight is rounded to bf16 once, here, and each product rounds its input rows.
#[cfg(feature = "mkl")]
mod mkl_packed {
    use super::MatmulPrecision;
    use candle_core::{DType, Storage, Tensor};
    use std::alloc::Layout;

    use crate::model::kernels::cblas::{
        B_MATRIX, NO_TRANSPOSE, PACKED, ROW_MAJOR, TRANSPOSE, cblas_gemm_bf16bf16f32_compute,
        cblas_gemm_bf16bf16f32_pack, cblas_gemm_bf16bf16f32_pack_get_size, cblas_sgemm_compute,
        cblas_sgemm_pack, cblas_sgemm_pack_get_size,
    };
    /// The row count MKL is told to expect when packing. Packed for few rows, large products
    /// ran a third slower; packed for 400, products of 17 to 577 rows all ran faster than an
    /// unpacked call (CLIP's batch of 8 frames has 400 rows, BLIP's one frame 577).
    const ROWS_HINT: i32 = 512;

    /// A `(out, in)` weight packed as the right-hand `Wᵀ` of `x Wᵀ`.
    pub struct PackedWeight {
        data: *mut u8,
        layout: Layout,
        precision: MatmulPrecision,
        out_dim: i32,
        in_dim: i32,
    }

    // SAFETY: the buffer is written once, in `new`, and only read afterwards.
    unsafe impl Send for PackedWeight {}
    unsafe impl Sync for PackedWeight {}

    impl PackedWeight {
        /// Packs a contiguous CPU f32 weight for a product in `precision`; `None` for
        /// anything else (the caller then keeps it unpacked).
        pub fn new(weight: &Tensor, precision: MatmulPrecision) -> Option<Self> {
            if weight.dtype() != DType::F32 {
                return None;
            }
            let (out_dim, in_dim) = weight.dims2().ok()?;
            let (out_dim, in_dim) = (i32::try_from(out_dim).ok()?, i32::try_from(in_dim).ok()?);
            let (storage, layout) = weight.storage_and_layout();
            let Storage::Cpu(candle_core::CpuStorage::F32(data)) = &*storage else {
                return None;
            };
            let (start, end) = layout.contiguous_offsets()?;
            let src = &data[start..end];
            // SAFETY: pure size queries.
            let bytes = unsafe {
                match precision {
                    MatmulPrecision::F32 => {
                        cblas_sgemm_pack_get_size(B_MATRIX, ROWS_HINT, out_dim, in_dim)
                    }
                    MatmulPrecision::Bf16 => {
                        cblas_gemm_bf16bf16f32_pack_get_size(B_MATRIX, ROWS_HINT, out_dim, in_dim)
                    }
                }
            };
            let buffer = Layout::from_size_align(bytes.max(4), 64).ok()?;
            // SAFETY: non-zero size; freed in Drop with the same layout. MKL asks that the
            // packed buffer never moves, and it does not: it lives until Drop.
            let packed = unsafe { std::alloc::alloc(buffer) };
            if packed.is_null() {
                return None;
            }
            // SAFETY: `src` holds out_dim × in_dim values, row-major (ld = in_dim), and
            // `packed` has the size MKL asked for.
            unsafe {
                match precision {
                    MatmulPrecision::F32 => cblas_sgemm_pack(
                        ROW_MAJOR,
                        B_MATRIX,
                        TRANSPOSE,
                        ROWS_HINT,
                        out_dim,
                        in_dim,
                        1.0,
                        src.as_ptr(),
                        in_dim,
                        packed as *mut f32,
                    ),
                    MatmulPrecision::Bf16 => {
                        let mut rounded = vec![0u16; src.len()];
                        super::cpu_kernels::round_to_bf16(src, &mut rounded);
                        cblas_gemm_bf16bf16f32_pack(
                            ROW_MAJOR,
                            B_MATRIX,
                            TRANSPOSE,
                            ROWS_HINT,
                            out_dim,
                            in_dim,
                            rounded.as_ptr(),
                            in_dim,
                            packed as *mut u16,
                        )
                    }
                }
            };
            Some(Self {
                data: packed,
                layout: buffer,
                precision,
                out_dim,
                in_dim,
            })
        }

        /// `(out_dim, in_dim)` of the weight.
        pub fn dims(&self) -> (usize, usize) {
            (self.out_dim as usize, self.in_dim as usize)
        }

        /// `out (rows, out) += x (rows, in) · Wᵀ`.
        pub fn accumulate_product(&self, out: &mut [f32], x: &[f32], rows: usize) {
            let rows = i32::try_from(rows).expect("rows fit MKL's 32-bit sizes");
            assert_eq!(x.len(), rows as usize * self.in_dim as usize);
            assert_eq!(out.len(), rows as usize * self.out_dim as usize);
            match self.precision {
                // SAFETY: sizes checked above; the packed weight matches out_dim × in_dim.
                MatmulPrecision::F32 => unsafe {
                    cblas_sgemm_compute(
                        ROW_MAJOR,
                        NO_TRANSPOSE,
                        PACKED,
                        rows,
                        self.out_dim,
                        self.in_dim,
                        x.as_ptr(),
                        self.in_dim,
                        self.data as *const f32,
                        self.in_dim,
                        1.0,
                        out.as_mut_ptr(),
                        self.out_dim,
                    )
                },
                MatmulPrecision::Bf16 => {
                    super::with_bf16_rows(
                        x,
                        self.in_dim as usize,
                        self.in_dim as usize,
                        |rounded| {
                            // SAFETY: as above; `rounded` holds the rows × in_dim input.
                            unsafe {
                                cblas_gemm_bf16bf16f32_compute(
                                    ROW_MAJOR,
                                    NO_TRANSPOSE,
                                    PACKED,
                                    rows,
                                    self.out_dim,
                                    self.in_dim,
                                    1.0,
                                    rounded.as_ptr(),
                                    self.in_dim,
                                    self.data as *const u16,
                                    self.in_dim,
                                    1.0,
                                    out.as_mut_ptr(),
                                    self.out_dim,
                                )
                            }
                        },
                    )
                }
            }
        }
    }

    impl Drop for PackedWeight {
        fn drop(&mut self) {
            // SAFETY: allocated in `new` with this layout.
            unsafe { std::alloc::dealloc(self.data, self.layout) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use candle_nn::Linear;

    use crate::model::testing::util::max_abs_difference as max_difference;

    #[test]
    fn fused_forms_match_candles_composite_layer() {
        let dev = Device::Cpu;
        // Odd sizes, so no dimension lines up with a kernel's block size.
        let (batch, tokens, in_dim, out_dim) = (3, 17, 45, 70);
        let weight = Tensor::randn(0f32, 0.2, (out_dim, in_dim), &dev).unwrap();
        let bias = Tensor::randn(0f32, 1.0, out_dim, &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (batch, tokens, in_dim), &dev).unwrap();
        let residual = Tensor::randn(0f32, 1.0, (batch, tokens, out_dim), &dev).unwrap();
        let layer = FusedLinear::new(weight.clone(), bias.clone());
        let plain = Linear::new(weight, Some(bias)).forward(&x).unwrap();

        let fused = layer.forward(&x).unwrap();
        assert_eq!(fused.dims(), plain.dims());
        assert!(max_difference(&fused, &plain) < 1e-5);

        let with_residual = layer.forward_add(&x, &residual).unwrap();
        assert!(max_difference(&with_residual, &(&plain + &residual).unwrap()) < 1e-5);

        let activated = layer
            .forward_with(&x, Some(&residual), Activation::QuickGelu)
            .unwrap();
        let expected = quick_gelu_composite(&(&plain + &residual).unwrap()).unwrap();
        assert!(max_difference(&activated, &expected) < 1e-5);

        let gelu = layer.forward_with(&x, None, Activation::GeluErf).unwrap();
        assert!(max_difference(&gelu, &plain.gelu_erf().unwrap()) < 1e-5);

        let gelu_tanh = layer.forward_with(&x, None, Activation::GeluTanh).unwrap();
        assert!(max_difference(&gelu_tanh, &plain.gelu().unwrap()) < 1e-5);
    }

    /// The bf16 product equals f32 arithmetic on bf16-rounded weight and input, up to the
    /// order of the f32 accumulation.
    #[test]
    fn a_bf16_product_multiplies_rounded_values_and_accumulates_in_f32() {
        if crate::model::kernels::fused_linear::bf16_product().is_none() {
            eprintln!("skipped: no bf16 product in this build on this CPU");
            return;
        }
        let dev = Device::Cpu;
        let (rows, in_dim, out_dim) = (37, 96, 130);
        let weight = Tensor::randn(0f32, 0.2, (out_dim, in_dim), &dev).unwrap();
        let bias = Tensor::randn(0f32, 1.0, out_dim, &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (rows, in_dim), &dev).unwrap();
        let residual = Tensor::randn(0f32, 1.0, (rows, out_dim), &dev).unwrap();
        let layer = FusedLinear::new_as(weight.clone(), bias.clone(), MatmulPrecision::Bf16);
        let got = layer.forward_add(&x, &residual).unwrap();

        let rounded = |t: &Tensor| {
            t.to_dtype(DType::BF16)
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
        };
        let expected = rounded(&x)
            .matmul(&rounded(&weight).t().unwrap())
            .unwrap()
            .broadcast_add(&bias.to_dtype(DType::F64).unwrap())
            .unwrap()
            .add(&residual.to_dtype(DType::F64).unwrap())
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let diff = max_difference(&got, &expected);
        assert!(diff < 1e-4, "bf16 product off its definition by {diff}");
        // And it really rounds: plain f32 differs by about bf16's precision.
        let f32_diff = max_difference(
            &got,
            &FusedLinear::new(weight, bias)
                .forward_add(&x, &residual)
                .unwrap(),
        );
        assert!(
            f32_diff > 1e-4 && f32_diff < 0.1,
            "f32 against bf16: {f32_diff}"
        );
    }

    #[test]
    fn other_dtypes_take_candles_own_operations() {
        let dev = Device::Cpu;
        let weight = Tensor::randn(0f64, 0.2, (7, 5), &dev).unwrap();
        let bias = Tensor::randn(0f64, 1.0, 7, &dev).unwrap();
        let x = Tensor::randn(0f64, 1.0, (2, 3, 5), &dev).unwrap();
        let residual = Tensor::randn(0f64, 1.0, (2, 3, 7), &dev).unwrap();
        let layer = FusedLinear::new(weight.clone(), bias.clone());
        let got = layer
            .forward_with(&x, Some(&residual), Activation::GeluErf)
            .unwrap();
        let expected = (Linear::new(weight, Some(bias)).forward(&x).unwrap() + &residual)
            .unwrap()
            .gelu_erf()
            .unwrap();
        assert_eq!(got.dtype(), DType::F64);
        let diff = max_difference(&got, &expected);
        assert!(diff < 1e-12, "max difference {diff}");
    }

    #[test]
    fn a_strided_input_is_made_contiguous_first() {
        let dev = Device::Cpu;
        let weight = Tensor::randn(0f32, 0.2, (8, 6), &dev).unwrap();
        let bias = Tensor::randn(0f32, 1.0, 8, &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (6, 5), &dev).unwrap().t().unwrap();
        let layer = FusedLinear::new(weight.clone(), bias.clone());
        let expected = Linear::new(weight, Some(bias)).forward(&x).unwrap();
        assert!(max_difference(&layer.forward(&x).unwrap(), &expected) < 1e-5);
    }

    #[test]
    fn a_mismatched_residual_is_an_error() {
        let dev = Device::Cpu;
        let layer = FusedLinear::new(
            Tensor::zeros((4, 3), DType::F32, &dev).unwrap(),
            Tensor::zeros(4, DType::F32, &dev).unwrap(),
        );
        let x = Tensor::zeros((2, 3), DType::F32, &dev).unwrap();
        let residual = Tensor::zeros((2, 5), DType::F32, &dev).unwrap();
        assert!(
            layer
                .forward_with(&x, Some(&residual), Activation::None)
                .is_err()
        );
    }
}
