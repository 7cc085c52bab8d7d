//! Vectorisable `exp` and `erf`, the activations and a softmax built on them, and rounding
//! to bf16, for the per-frame path on CPU.
//!
//! candle computes `exp` and `erf` one value at a time through libm; BLIP's attention alone
//! takes 16 heads × 577² exponentials per layer and frame. These versions are branch-free
//! polynomials the compiler turns into SIMD code, and on x86-64 they are also compiled for
//! AVX2 with FMA and for AVX-512, chosen at run time. Accuracy: `exp` within 2 ulp; `erf` within
//! 6e-7 absolute: the Abramowitz and Stegun formula 7.1.26 (1.5e-7), which PyTorch's
//! vectorised `erf` uses as well, evaluated in f32. SiLU and the rounding to bf16 are also
//! written out with AVX-512 intrinsics, where the compiler's versions were slow.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// Below this `exp` gives 0 (where `e^x` nears the subnormals).
const EXP_LOWEST: f32 = -87.3;
/// From this up `exp` gives about `f32::MAX`.
const EXP_HIGHEST: f32 = 88.7;
const LOG2E: f32 = std::f32::consts::LOG2_E;
/// ln 2 split so that `n * LN2_HI` is exact for the n that occur.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// Round to nearest by the 1.5 × 2^23 trick: unlike `round`, it vectorises everywhere.
const ROUNDER: f32 = 12_582_912.0;
/// Taylor coefficients 1/k! for k = 7 down to 2 (Horner form): the first term left out is
/// below 1e-8 relative on the range.
const EXP_TAYLOR: [f32; 6] = [
    1.0 / 5040.0,
    1.0 / 720.0,
    1.0 / 120.0,
    1.0 / 24.0,
    1.0 / 6.0,
    0.5,
];

/// `e^x`: range reduction to `x = n ln2 + r`, `|r| ≤ ln2 / 2`, a degree-7 polynomial for
/// `e^r`, and `2^n` put in through the exponent bits. 0 below [`EXP_LOWEST`], about
/// `f32::MAX` from [`EXP_HIGHEST`] up.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let underflow = x < EXP_LOWEST;
    let x = x.clamp(EXP_LOWEST, EXP_HIGHEST);
    let shifted = x * LOG2E + ROUNDER;
    let n = shifted - ROUNDER;
    let r = x - n * LN2_HI - n * LN2_LO;
    let [c7, c6, c5, c4, c3, c2] = EXP_TAYLOR;
    let p = c7;
    let p = p * r + c6;
    let p = p * r + c5;
    let p = p * r + c4;
    let p = p * r + c3;
    let p = p * r + c2;
    let p = p * r * r + r + 1.0;
    // n as an integer, read from the low mantissa bits of `shifted` (ROUNDER + n, exact)
    // rather than by `n as i32`: that cast saturates, which the compiler turned into
    // scalar code, one value at a time, inside the AVX-512 loops (SiLU's profile).
    let n = (shifted.to_bits() as i32).wrapping_sub(ROUNDER.to_bits() as i32);
    // n is in [-126, 128] after the clamp; 2^128 does not fit, so scale in two steps.
    // Wrapping arithmetic: it cannot overflow here, and builds with overflow checks (the
    // dev profile) would otherwise branch on every value and stop the loop vectorising.
    let half = n >> 1;
    let scale_a = f32::from_bits((half.wrapping_add(127) as u32) << 23);
    let scale_b = f32::from_bits((n.wrapping_sub(half).wrapping_add(127) as u32) << 23);
    let value = p * scale_a * scale_b;
    if underflow { 0.0 } else { value }
}

/// `erf(x)` by Abramowitz and Stegun 7.1.26 (absolute error at most 1.5e-7, 6e-7 in f32).
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    const P: f32 = 0.327_591_1;
    const A1: f32 = 0.254_829_6;
    const A2: f32 = -0.284_496_74;
    const A3: f32 = 1.421_413_8;
    const A4: f32 = -1.453_152_1;
    const A5: f32 = 1.061_405_4;
    let a = x.abs();
    let t = 1.0 / (1.0 + P * a);
    let poly = ((((A5 * t + A4) * t + A3) * t + A2) * t + A1) * t;
    let y = 1.0 - poly * exp(-a * a);
    y.copysign(x)
}

/// Whether this CPU runs the AVX2 and FMA builds of the kernels.
#[cfg(target_arch = "x86_64")]
fn has_avx2_fma() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

/// Whether this CPU runs the AVX-512 builds of the kernels.
#[cfg(target_arch = "x86_64")]
fn has_avx512() -> bool {
    std::arch::is_x86_feature_detected!("avx512f") && has_avx2_fma()
}

/// A unit of the CPU that multiplies bf16 matrices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bf16Unit {
    /// Intel's tile engine (with the OS enabling its tile state): MKL's bf16 product uses it.
    AmxBf16,
    /// `vdpbf16ps` (Intel since Cooper Lake, AMD since Zen 4): the project's own product
    /// (`bf16_gemm`) uses it, since MKL's does not on AMD.
    Avx512Bf16,
}

impl std::fmt::Display for Bf16Unit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::AmxBf16 => "AMX-BF16",
            Self::Avx512Bf16 => "AVX512-BF16",
        })
    }
}

/// The best unit this CPU multiplies bf16 matrices on; `None` when it has neither.
pub fn bf16_matrix_unit() -> Option<Bf16Unit> {
    #[cfg(target_arch = "x86_64")]
    {
        if has_amx_bf16() {
            return Some(Bf16Unit::AmxBf16);
        }
        if std::arch::is_x86_feature_detected!("avx512bf16") {
            return Some(Bf16Unit::Avx512Bf16);
        }
    }
    None
}

/// Whether the CPU is Intel's (CPUID's vendor string): MKL runs its bf16 product on
/// AVX512-BF16 there, where on other CPUs it falls back to slower code.
pub fn intel_cpu() -> bool {
    #[cfg(target_arch = "x86_64")]
    let intel = {
        let leaf = std::arch::x86_64::__cpuid(0);
        // "GenuineIntel", in the order EBX, EDX, ECX.
        (leaf.ebx, leaf.edx, leaf.ecx) == (0x756e_6547, 0x4965_6e69, 0x6c65_746e)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let intel = false;
    intel
}

#[cfg(target_arch = "x86_64")]
fn has_amx_bf16() -> bool {
    use std::arch::x86_64::{__cpuid, __cpuid_count, _xgetbv};
    // Leaf 7 is read only when the CPU reports it.
    let max_leaf = __cpuid(0).eax;
    let os_xsave = __cpuid(1).ecx & (1 << 27) != 0;
    let amx_bf16 = max_leaf >= 7 && __cpuid_count(7, 0).edx & (1 << 22) != 0;
    if max_leaf < 7 || !os_xsave || !amx_bf16 {
        return false;
    }
    #[target_feature(enable = "xsave")]
    fn enabled_state() -> u64 {
        // SAFETY: OSXSAVE is set (checked by the caller), so XGETBV may run.
        unsafe { _xgetbv(0) }
    }
    // SAFETY: OSXSAVE implies the CPU has XSAVE.
    let xcr0 = unsafe { enabled_state() };
    // XTILECFG (bit 17) and XTILEDATA (bit 18): the OS saves the tile registers.
    xcr0 & (0b11 << 17) == 0b11 << 17
}

/// Defines `$name` to run `$body` (an `#[inline(always)]` function) compiled for AVX-512,
/// or AVX2 and FMA, when the CPU has them, else for the baseline target.
macro_rules! dispatched {
    ($(#[$doc:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),*) => $body:ident) => {
        $(#[$doc])*
        $vis fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                fn widest($($arg: $ty),*) {
                    $body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                fn wide($($arg: $ty),*) {
                    $body($($arg),*)
                }
                if has_avx512() {
                    // SAFETY: the features were detected on this CPU.
                    return unsafe { widest($($arg),*) };
                }
                if has_avx2_fma() {
                    // SAFETY: as above.
                    return unsafe { wide($($arg),*) };
                }
            }
            $body($($arg),*)
        }
    };
}

#[inline(always)]
fn quick_gelu_body(values: &mut [f32]) {
    for v in values.iter_mut() {
        *v /= 1.0 + exp(-1.702 * *v);
    }
}

#[inline(always)]
fn silu_body(values: &mut [f32]) {
    for v in values.iter_mut() {
        *v /= 1.0 + exp(-*v);
    }
}

#[inline(always)]
fn gelu_erf_body(values: &mut [f32]) {
    for v in values.iter_mut() {
        *v *= (erf(*v * std::f32::consts::FRAC_1_SQRT_2) + 1.0) * 0.5;
    }
}

/// GELU's tanh form, `x (1 + tanh(u)) / 2` with `u = √(2/π) (x + 0.044715 x³)`, written as
/// `x / (1 + e^(-2u))`: the same value, with one `exp` and no `tanh`.
#[inline(always)]
fn gelu_tanh_body(values: &mut [f32]) {
    const TWO_SQRT_2_OVER_PI: f32 = 2.0 * 0.797_884_6;
    for v in values.iter_mut() {
        let x = *v;
        *v = x / (1.0 + exp(-TWO_SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x)));
    }
}

#[inline(always)]
fn softmax_row_body(row: &[f32], out: &mut [MaybeUninit<f32>]) {
    assert_eq!(row.len(), out.len());
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for (o, &v) in out.iter_mut().zip(row) {
        o.write(exp(v - max));
    }
    // SAFETY: every value of `out` was written just above (the lengths are equal).
    let out = unsafe { &mut *(out as *mut [MaybeUninit<f32>] as *mut [f32]) };
    // Eight running sums, so the additions vectorise.
    let mut lanes = [0f32; 8];
    let mut chunks = out.chunks_exact(8);
    for chunk in &mut chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane += v;
        }
    }
    let sum = lanes.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>();
    let inverse = 1.0 / sum;
    for o in out.iter_mut() {
        *o *= inverse;
    }
}

dispatched! {
    /// `x * sigmoid(1.702 x)` in place.
    pub fn quick_gelu_in_place(values: &mut [f32]) => quick_gelu_body
}

/// SiLU, `x * sigmoid(x)`, in place: `x / (1 + e^-x)`. On AVX-512 by [`silu_avx512`],
/// elsewhere by the compiler's vectorising of [`exp`].
pub fn silu_in_place(values: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: the features were detected on this CPU.
        return unsafe { silu_avx512(values) };
    }
    silu_dispatched(values)
}

dispatched! {
    fn silu_dispatched(values: &mut [f32]) => silu_body
}

/// 2^120: the largest denominator [`silu_avx512`] divides by.
#[cfg(target_arch = "x86_64")]
const SILU_DENOMINATOR_MAX: f32 = 1.329_228e36;

/// SiLU on AVX-512, 16 values a step, written out: [`exp`]'s steps with fused
/// multiply-adds (the compiler keeps `a * b + c` as two roundings, so it cannot fuse them),
/// `2^n` by `vscalefps` instead of the exponent bits' integer steps, and the division as
/// `vrcp14ps` refined by one Newton step (within 2e-7 relative of the quotient): 28
/// instructions a step where the compiler's version took about 40 and a division, when
/// SiLU was 13% of YOLO-World's bf16 network on AMX.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn silu_avx512(values: &mut [f32]) {
    use std::arch::x86_64::*;
    let [c7, c6, c5, c4, c3, c2] = EXP_TAYLOR;
    let (c7, c6, c5) = (_mm512_set1_ps(c7), _mm512_set1_ps(c6), _mm512_set1_ps(c5));
    let (c4, c3, c2) = (_mm512_set1_ps(c4), _mm512_set1_ps(c3), _mm512_set1_ps(c2));
    let (lowest, highest) = (_mm512_set1_ps(EXP_LOWEST), _mm512_set1_ps(EXP_HIGHEST));
    let (log2e, rounder) = (_mm512_set1_ps(LOG2E), _mm512_set1_ps(ROUNDER));
    let (ln2_hi, ln2_lo) = (_mm512_set1_ps(LN2_HI), _mm512_set1_ps(LN2_LO));
    let (one, most) = (_mm512_set1_ps(1.0), _mm512_set1_ps(SILU_DENOMINATOR_MAX));
    for chunk in values.chunks_mut(16) {
        let lanes = first_lanes(chunk.len()) as u16;
        // SAFETY: the masks keep the load and the store inside `chunk`.
        let x = unsafe { _mm512_maskz_loadu_ps(lanes, chunk.as_ptr()) };
        let v = _mm512_sub_ps(_mm512_setzero_ps(), x);
        let underflow = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(v, lowest);
        let v = _mm512_min_ps(_mm512_max_ps(v, lowest), highest);
        let n = _mm512_sub_ps(_mm512_fmadd_ps(v, log2e, rounder), rounder);
        let r = _mm512_fnmadd_ps(n, ln2_hi, v);
        let r = _mm512_fnmadd_ps(n, ln2_lo, r);
        let p = _mm512_fmadd_ps(c7, r, c6);
        let p = _mm512_fmadd_ps(p, r, c5);
        let p = _mm512_fmadd_ps(p, r, c4);
        let p = _mm512_fmadd_ps(p, r, c3);
        let p = _mm512_fmadd_ps(p, r, c2);
        let p = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), one);
        let e = _mm512_maskz_scalef_ps(!underflow, p, n);
        // Capped so that the reciprocal estimate stays a normal number: -inf then gives
        // -inf, as the division does. A NaN input gives NaN through `x` below.
        let d = _mm512_min_ps(_mm512_add_ps(one, e), most);
        let reciprocal = _mm512_rcp14_ps(d);
        let reciprocal =
            _mm512_fmadd_ps(reciprocal, _mm512_fnmadd_ps(d, reciprocal, one), reciprocal);
        let y = _mm512_mul_ps(x, reciprocal);
        // SAFETY: as above.
        unsafe { _mm512_mask_storeu_ps(chunk.as_mut_ptr(), lanes, y) };
    }
}

dispatched! {
    /// `x * (1 + erf(x / √2)) / 2` in place.
    pub fn gelu_erf_in_place(values: &mut [f32]) => gelu_erf_body
}

dispatched! {
    /// GELU's tanh approximation (PyTorch's `gelu(approximate="tanh")`) in place.
    pub fn gelu_tanh_in_place(values: &mut [f32]) => gelu_tanh_body
}

dispatched! {
    /// Softmax of one row into `out`, which it fills.
    fn softmax_row(row: &[f32], out: &mut [MaybeUninit<f32>]) => softmax_row_body
}

#[inline(always)]
fn round_to_bf16_body(values: &[f32], out: &mut [u16]) {
    assert_eq!(values.len(), out.len());
    for (o, &v) in out.iter_mut().zip(values) {
        let bits = v.to_bits();
        let rounded = (bits.wrapping_add(0x7FFF + ((bits >> 16) & 1)) >> 16) as u16;
        // A NaN keeps its sign and stays a (quiet) NaN instead of rounding into infinity.
        *o = if v.is_nan() {
            ((bits >> 16) as u16) | 0x40
        } else {
            rounded
        };
    }
}

/// Rounds f32 values to bf16 bit patterns: to nearest, ties to even, as PyTorch's
/// conversion does. On a CPU with AVX512-BF16, by its conversion instruction, 16 values
/// an instruction, where the integer arithmetic took 5% of YOLO-World's bf16 network.
pub fn round_to_bf16(values: &[f32], out: &mut [u16]) {
    assert_eq!(values.len(), out.len());
    #[cfg(target_arch = "x86_64")]
    if has_avx512_bf16() {
        // SAFETY: the features were detected on this CPU.
        return unsafe { round_to_bf16_avx512bf16(values, out) };
    }
    round_to_bf16_exact(values, out)
}

dispatched! {
    /// [`round_to_bf16`] by integer arithmetic, subnormal values included.
    fn round_to_bf16_exact(values: &[f32], out: &mut [u16]) => round_to_bf16_body
}

/// A mask of the first `n` (at most 32) lanes of a vector.
#[cfg(target_arch = "x86_64")]
pub(crate) fn first_lanes(n: usize) -> u32 {
    ((1u64 << n.min(32)) - 1) as u32
}

/// Whether this CPU has the AVX-512 conversion to bf16 (and the masked 16-bit stores).
#[cfg(target_arch = "x86_64")]
fn has_avx512_bf16() -> bool {
    std::arch::is_x86_feature_detected!("avx512bf16")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512vl")
}

/// [`round_to_bf16`] by `vcvtneps2bf16`, which rounds as [`round_to_bf16_body`] does (NaN
/// included) except that it takes a subnormal input for 0: a step holding one rounds by
/// the integer arithmetic instead.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn round_to_bf16_avx512bf16(values: &[f32], out: &mut [u16]) {
    use std::arch::x86_64::*;
    let exponent = _mm512_set1_epi32(0x7F80_0000);
    let magnitude = _mm512_set1_epi32(0x7FFF_FFFF);
    for (from, to) in values.chunks(16).zip(out.chunks_mut(16)) {
        let lanes = first_lanes(from.len()) as u16;
        // SAFETY: the masks keep the load inside `from` and the store inside `to`.
        unsafe {
            let x = _mm512_maskz_loadu_ps(lanes, from.as_ptr());
            let bits = _mm512_castps_si512(x);
            let subnormal =
                _mm512_testn_epi32_mask(bits, exponent) & _mm512_test_epi32_mask(bits, magnitude);
            if subnormal != 0 {
                round_to_bf16_exact(from, to);
                continue;
            }
            let rounded: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(x));
            _mm256_mask_storeu_epi16(to.as_mut_ptr() as *mut i16, lanes, rounded);
        }
    }
}

/// Rounds `x`'s rows of `in_dim` values to bf16 into `out`, `stride` (at least `in_dim`)
/// values apart, the values past `in_dim` 0; rows in parallel.
pub fn round_rows_to_bf16(x: &[f32], in_dim: usize, stride: usize, out: &mut Vec<u16>) {
    rows_to_bf16(x, in_dim, stride, out, |row, out, _| {
        round_to_bf16(row, out)
    });
}

/// As [`round_rows_to_bf16`], of each row's softmax. The f32 softmax of a row lives only
/// in a row-sized scratch buffer.
pub fn softmax_rows_to_bf16(x: &[f32], in_dim: usize, stride: usize, out: &mut Vec<u16>) {
    rows_to_bf16(x, in_dim, stride, out, |row, out, scratch| {
        softmax_row(row, scratch);
        // SAFETY: softmax_row wrote every value of `scratch`.
        let weights = unsafe { &*(scratch as *const [MaybeUninit<f32>] as *const [f32]) };
        round_to_bf16(weights, out);
    });
}

/// `convert(row, out, scratch)` over `x`'s rows of `in_dim` values into `out`'s rows of
/// `stride` values (the values past `in_dim` 0), with a row-sized scratch buffer per task.
fn rows_to_bf16(
    x: &[f32],
    in_dim: usize,
    stride: usize,
    out: &mut Vec<u16>,
    convert: impl Fn(&[f32], &mut [u16], &mut [MaybeUninit<f32>]) + Sync,
) {
    assert!(in_dim > 0 && stride >= in_dim && x.len().is_multiple_of(in_dim));
    out.clear();
    out.resize(x.len() / in_dim * stride, 0);
    out.par_chunks_mut(stride * ROWS_PER_TASK)
        .zip(x.par_chunks(in_dim * ROWS_PER_TASK))
        .for_each(|(out, x)| {
            let mut scratch = Vec::with_capacity(in_dim);
            let scratch = &mut scratch.spare_capacity_mut()[..in_dim];
            for (out, row) in out.chunks_mut(stride).zip(x.chunks(in_dim)) {
                convert(row, &mut out[..in_dim], scratch);
            }
        });
}

/// Softmax over the last dimension; CPU f32 through [`exp`], rows in parallel, anything else
/// through candle's own.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        x.contiguous()?.apply_op1_no_bwd(&SoftmaxLastDim)
    } else {
        candle_nn::ops::softmax_last_dim(x)
    }
}

struct SoftmaxLastDim;

/// Rows per parallel task of the row-wise passes: attention rows are short (50 to 577
/// values).
const ROWS_PER_TASK: usize = 32;

impl CustomOp1 for SoftmaxLastDim {
    fn name(&self) -> &'static str {
        "softmax-last-dim"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("softmax: f32 only")
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("softmax: contiguous input only")
        };
        let input = &data[start..end];
        let width = layout.shape().dims().last().copied().unwrap_or(1).max(1);
        // Not zeroed first: every row writes all of its values.
        let mut out = Vec::with_capacity(input.len());
        out.spare_capacity_mut()[..input.len()]
            .par_chunks_mut(width * ROWS_PER_TASK)
            .zip(input.par_chunks(width * ROWS_PER_TASK))
            .for_each(|(out, input)| {
                for (out, row) in out.chunks_mut(width).zip(input.chunks(width)) {
                    softmax_row(row, out);
                }
            });
        // SAFETY: the rows above cover all `input.len()` values and write each one.
        unsafe { out.set_len(input.len()) };
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn bf16_rounding_matches_the_half_crate() {
        let mut values: Vec<f32> = (0..20_000)
            .map(|i| ((i as f32) * 0.7315).sin() * 10f32.powi(i % 13 - 6))
            .collect();
        values.extend([
            0.0,
            -0.0,
            1.0 + f32::EPSILON,
            f32::MAX,
            f32::MIN_POSITIVE / 3.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            // Exactly half way between two bf16 values: ties go to the even one.
            f32::from_bits(0x3F80_8000),
            f32::from_bits(0x3F81_8000),
        ]);
        let mut ours = vec![0u16; values.len()];
        super::round_to_bf16(&values, &mut ours);
        for (v, o) in values.iter().zip(&ours) {
            assert_eq!(*o, half::bf16::from_f32(*v).to_bits(), "{v:e}");
        }
        let mut nan = [0u16];
        super::round_to_bf16(&[f32::NAN], &mut nan);
        assert!(half::bf16::from_bits(nan[0]).is_nan());
    }

    #[test]
    fn bf16_rounding_agrees_with_the_integer_arithmetic_at_every_length() {
        // A subnormal value at each place of a 16-value step sends that step to the
        // integer arithmetic; NaNs must come out as the same quiet NaNs.
        for len in 0usize..40 {
            for subnormal_at in [None, Some(0), Some(len / 2), Some(len.saturating_sub(1))] {
                let mut values: Vec<f32> = (0..len)
                    .map(|i| (i as f32 * 1.37).sin() * 3.0 + 1e-3)
                    .collect();
                if let Some(at) = subnormal_at.filter(|&at| at < len) {
                    values[at] = -f32::MIN_POSITIVE / 5.0;
                }
                if len > 3 {
                    values[3] = f32::from_bits(0x7FC0_1234);
                }
                let (mut fast, mut exact) = (vec![0u16; len], vec![0u16; len]);
                super::round_to_bf16(&values, &mut fast);
                round_to_bf16_body(&values, &mut exact);
                assert_eq!(fast, exact, "length {len}, subnormal at {subnormal_at:?}");
            }
        }
    }

    use super::*;
    use crate::model::testing::util::max_abs_difference;
    use candle_core::Device;

    fn ulps(a: f32, b: f32) -> u32 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    #[test]
    fn exp_is_within_two_ulp_of_libm_across_its_range() {
        let mut worst = 0;
        let mut x = -87.0f32;
        while x < 88.0 {
            worst = worst.max(ulps(exp(x), x.exp()));
            x += 0.001_37;
        }
        assert!(worst <= 2, "worst {worst} ulp");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-200.0), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert!(exp(100.0).is_finite());
    }

    #[test]
    fn erf_is_within_the_formulas_bound() {
        let mut worst = 0f64;
        let mut x = -6.0f32;
        while x < 6.0 {
            let reference = candle_core::cpu::erf::erf_f64(x as f64);
            worst = worst.max((erf(x) as f64 - reference).abs());
            x += 0.000_93;
        }
        // The formula's 1.5e-7 plus f32 rounding.
        assert!(worst < 6e-7, "worst {worst}");
        assert!(erf(0.0).abs() < 1e-7);
        assert_eq!(erf(-10.0), -1.0);
    }

    #[test]
    fn activations_in_place_match_their_definitions() {
        let xs: Vec<f32> = (-4000..4000).map(|i| i as f32 * 2e-3).collect();
        let mut quick = xs.clone();
        quick_gelu_in_place(&mut quick);
        let mut gelu = xs.clone();
        gelu_erf_in_place(&mut gelu);
        let mut tanh_form = xs.clone();
        gelu_tanh_in_place(&mut tanh_form);
        let mut silu = xs.clone();
        silu_in_place(&mut silu);
        for ((((&x, &q), &g), &t), &s) in
            xs.iter().zip(&quick).zip(&gelu).zip(&tanh_form).zip(&silu)
        {
            let x64 = x as f64;
            let s_ref = x64 / (1.0 + (-x64).exp());
            assert!((s as f64 - s_ref).abs() < 1e-6, "silu({x})");
            let q_ref = x64 / (1.0 + (-1.702 * x64).exp());
            let g_ref =
                x64 * (candle_core::cpu::erf::erf_f64(x64 / std::f64::consts::SQRT_2) + 1.0) / 2.0;
            assert!((q as f64 - q_ref).abs() < 1e-6, "quick-gelu({x})");
            assert!((g as f64 - g_ref).abs() < 1e-6, "gelu({x})");
            let u = (2.0 / std::f64::consts::PI).sqrt() * (x64 + 0.044715 * x64.powi(3));
            let t_ref = 0.5 * x64 * (1.0 + u.tanh());
            assert!((t as f64 - t_ref).abs() < 1e-6, "gelu-tanh({x})");
        }
    }

    #[test]
    fn silu_on_avx512_agrees_with_the_division_at_every_length_and_extreme() {
        #[cfg(target_arch = "x86_64")]
        if has_avx512() {
            let close = |a: f32, b: f32| (a - b).abs() <= 1e-6 * b.abs().max(1.0);
            let mut extremes = vec![-200.0, -88.0, -87.0, -20.0, -0.0, 0.0, 1e-30, 20.0, 100.0];
            extremes.extend([f32::MAX, f32::INFINITY, f32::NEG_INFINITY, f32::NAN, 88.0]);
            extremes.extend(extremes.clone());
            let lengths = (0..40).chain(250..270).chain([512, 530]);
            let cases = lengths
                .map(|len| {
                    (0..len)
                        .map(|i| (i as f32 * 0.37).sin() * 9.0)
                        .collect::<Vec<f32>>()
                })
                .chain([extremes]);
            for xs in cases {
                let (mut fast, mut base) = (xs.clone(), xs.clone());
                // SAFETY: detected above.
                unsafe { silu_avx512(&mut fast) };
                silu_body(&mut base);
                for ((&x, &a), &b) in xs.iter().zip(&fast).zip(&base) {
                    let same = (a.is_nan() && b.is_nan()) || a == b || close(a, b);
                    assert!(same, "silu({x}) at length {}: {a} against {b}", xs.len());
                }
            }
            return;
        }
        eprintln!("skipped: this CPU has no AVX-512");
    }

    #[test]
    fn the_baseline_build_agrees_with_the_one_this_cpu_runs() {
        // The dispatched kernels run the widest build this CPU has; the bodies called
        // directly here are compiled for the baseline target.
        let xs: Vec<f32> = (-3000..3000).map(|i| i as f32 * 3e-3).collect();
        let (mut fast, mut base) = (xs.clone(), xs.clone());
        quick_gelu_in_place(&mut fast);
        quick_gelu_body(&mut base);
        assert!(fast.iter().zip(&base).all(|(a, b)| (a - b).abs() < 1e-6));
        let (mut fast, mut base) = (xs.clone(), xs.clone());
        gelu_erf_in_place(&mut fast);
        gelu_erf_body(&mut base);
        assert!(fast.iter().zip(&base).all(|(a, b)| (a - b).abs() < 1e-6));
        let mut fast = vec![MaybeUninit::new(0f32); xs.len()];
        let mut base = fast.clone();
        softmax_row(&xs, &mut fast);
        softmax_row_body(&xs, &mut base);
        for (a, b) in fast.iter().zip(&base) {
            // SAFETY: initialised when made.
            let (a, b) = unsafe { (a.assume_init(), b.assume_init()) };
            assert!((a - b).abs() < 1e-9);
        }
    }

    #[test]
    fn softmax_matches_candles_on_rows_of_many_widths() {
        let dev = Device::Cpu;
        for width in [1, 7, 8, 50, 577] {
            let x = Tensor::randn(0f32, 3.0, (3, 70, width), &dev).unwrap();
            let ours = softmax_last_dim(&x).unwrap();
            let theirs = candle_nn::ops::softmax_last_dim(&x).unwrap();
            let diff = max_abs_difference(&ours, &theirs);
            assert!(diff < 1e-6, "width {width}: max difference {diff}");
        }
    }

    #[test]
    fn softmax_handles_masked_and_strided_rows() {
        let dev = Device::Cpu;
        let x = Tensor::new(&[[0f32, f32::NEG_INFINITY, 1.0], [2.0, 2.0, 2.0]], &dev).unwrap();
        let rows = softmax_last_dim(&x).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(rows[0][1], 0.0);
        assert!((rows[0][0] + rows[0][2] - 1.0).abs() < 1e-6);
        assert!(rows[1].iter().all(|&p| (p - 1.0 / 3.0).abs() < 1e-6));
        let strided = Tensor::randn(0f32, 1.0, (6, 4), &dev).unwrap().t().unwrap();
        let theirs = candle_nn::ops::softmax_last_dim(&strided.contiguous().unwrap()).unwrap();
        let diff = max_abs_difference(&softmax_last_dim(&strided).unwrap(), &theirs);
        assert!(diff < 1e-6);
    }
}
