//! Products over a batch of small matrices (attention's `q kᵀ` and `w v`, one pair per image
//! and head) in one call. With MKL that is `cblas_sgemm_batch_strided`, which spreads the
//! batch over the threads; candle's matmul makes one threaded call per matrix instead, and
//! at batch 8 the 96 calls per product of CLIP's tower cost more than their arithmetic.
//! Elsewhere, and for tensors that are not contiguous f32 on the CPU, candle's matmul.

use crate::model::kernels::fused_linear::MatmulPrecision;
use candle_core::{Result, Tensor};

/// `a · bᵀ` over the leading dimensions: `a` `(…, m, k)` and `b` `(…, n, k)` give
/// `(…, m, n)`.
pub fn matmul_t(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    matmul_t_as(a, b, MatmulPrecision::F32)
}

/// `a · b` over the leading dimensions: `a` `(…, m, k)` and `b` `(…, k, n)` give `(…, m, n)`.
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    matmul_as(a, b, MatmulPrecision::F32)
}

/// [`matmul_t`] in `precision`: bf16 runs on the own AVX512-BF16 product where the
/// bf16 layers do (as autocast runs attention's products in bf16), else f32.
pub fn matmul_t_as(a: &Tensor, b: &Tensor, precision: MatmulPrecision) -> Result<Tensor> {
    batched(a, b, true, precision)
}

/// `softmax(scores) · v` over the leading dimensions (attention's weighted values), in
/// `precision`: in bf16 on the own product each row's softmax goes straight to bf16, with
/// no f32 tensor of the weights.
pub fn softmax_matmul_as(
    scores: &Tensor,
    v: &Tensor,
    precision: MatmulPrecision,
) -> Result<Tensor> {
    #[cfg(target_arch = "x86_64")]
    if own_bf16::wanted(precision)
        && let Some(out) = own_bf16::softmax_product(scores, v)?
    {
        return Ok(out);
    }
    matmul_as(
        &crate::model::kernels::cpu_kernels::softmax_last_dim(scores)?,
        v,
        precision,
    )
}

/// [`matmul`] in `precision` (see [`matmul_t_as`]).
pub fn matmul_as(a: &Tensor, b: &Tensor, precision: MatmulPrecision) -> Result<Tensor> {
    batched(a, b, false, precision)
}

/// `a · bᵀ` or `a · b` over the leading dimensions: the own bf16 product, MKL's batched
/// one, or candle's matmul, the first that takes the operands.
fn batched(
    a: &Tensor,
    b: &Tensor,
    transpose_b: bool,
    precision: MatmulPrecision,
) -> Result<Tensor> {
    #[cfg(target_arch = "x86_64")]
    if own_bf16::wanted(precision)
        && let Some(out) = own_bf16::product(a, b, transpose_b)?
    {
        return Ok(out);
    }
    let _ = precision;
    #[cfg(feature = "mkl")]
    if let Some(out) = mkl::product(a, b, transpose_b)? {
        return Ok(out);
    }
    if transpose_b {
        a.matmul(&b.t()?)
    } else {
        a.matmul(b)
    }
}

#[cfg(any(feature = "mkl", target_arch = "x86_64"))]
/// `f` on the contiguous f32 CPU data of `a` and `b`; `None` when either is not such.
fn with_cpu_f32<T>(a: &Tensor, b: &Tensor, f: impl FnOnce(&[f32], &[f32]) -> T) -> Option<T> {
    use candle_core::{CpuStorage, Storage};
    let (a_storage, a_layout) = a.storage_and_layout();
    let (b_storage, b_layout) = b.storage_and_layout();
    let (Storage::Cpu(CpuStorage::F32(a_data)), Storage::Cpu(CpuStorage::F32(b_data))) =
        (&*a_storage, &*b_storage)
    else {
        return None;
    };
    let (a0, a1) = a_layout.contiguous_offsets()?;
    let (b0, b1) = b_layout.contiguous_offsets()?;
    Some(f(&a_data[a0..a1], &b_data[b0..b1]))
}

#[cfg(any(feature = "mkl", target_arch = "x86_64"))]
/// `(batch, m, k, n)` of a batched product of `a` and `b` (`b` transposed or not), or
/// `None` when their shapes do not make one.
fn batched_dims(a: &Tensor, b: &Tensor, transpose_b: bool) -> Option<(usize, usize, usize, usize)> {
    let (ad, bd) = (a.dims(), b.dims());
    let r = ad.len();
    if r < 3 || bd.len() != r || ad[..r - 2] != bd[..r - 2] {
        return None;
    }
    let batch: usize = ad[..r - 2].iter().product();
    let (m, k) = (ad[r - 2], ad[r - 1]);
    let (kb, n) = if transpose_b {
        (bd[r - 1], bd[r - 2])
    } else {
        (bd[r - 2], bd[r - 1])
    };
    (k == kb && k > 0).then_some((batch, m, k, n))
}

/// Attention's products in bf16 on the own AVX512-BF16 product: each image and head's
/// right-hand matrix is packed on the spot, and the pairs run in parallel, each on one
/// thread.
#[cfg(target_arch = "x86_64")]
mod own_bf16 {
    use super::{MatmulPrecision, batched_dims, with_cpu_f32};
    use crate::model::kernels::bf16_gemm::PackedBf16Weight;
    use crate::model::kernels::cpu_kernels::{round_rows_to_bf16, softmax_rows_to_bf16};
    use crate::model::kernels::fused_linear::{Bf16Product, bf16_product};
    use candle_core::{Result, Tensor};
    use rayon::prelude::*;

    pub fn wanted(precision: MatmulPrecision) -> bool {
        precision == MatmulPrecision::Bf16 && bf16_product() == Some(Bf16Product::AvxDot)
    }

    /// The product, or `None` when the operands are not contiguous f32 CPU tensors of one
    /// batched shape.
    pub fn product(a: &Tensor, b: &Tensor, transpose_b: bool) -> Result<Option<Tensor>> {
        product_with(a, b, transpose_b, round_rows_to_bf16)
    }

    /// `softmax(scores) · v`, as [`product`] is `a · v`.
    pub fn softmax_product(scores: &Tensor, v: &Tensor) -> Result<Option<Tensor>> {
        product_with(scores, v, false, softmax_rows_to_bf16)
    }

    /// The product of `a`'s rows as `a_rows` makes them bf16 (`(x, in_dim, stride, out)`,
    /// as [`round_rows_to_bf16`]) and `b`.
    fn product_with(
        a: &Tensor,
        b: &Tensor,
        transpose_b: bool,
        a_rows: fn(&[f32], usize, usize, &mut Vec<u16>),
    ) -> Result<Option<Tensor>> {
        let Some((batch, m, k, n)) = batched_dims(a, b, transpose_b) else {
            return Ok(None);
        };
        if batch == 0 || m == 0 || n == 0 {
            return Ok(None);
        }
        let out = with_cpu_f32(a, b, |a_data, b_data| {
            // `a`'s rows padded to an even length, the pairs the product takes; `b` as it is.
            let stride = k.div_ceil(2) * 2;
            let b_row = if transpose_b { k } else { n };
            let (mut a_bf16, mut b_bf16) = (Vec::new(), Vec::new());
            a_rows(a_data, k, stride, &mut a_bf16);
            round_rows_to_bf16(b_data, b_row, b_row, &mut b_bf16);
            let mut out = vec![0f32; batch * m * n];
            out.par_chunks_mut(m * n)
                .zip(a_bf16.par_chunks(m * stride))
                .zip(b_bf16.par_chunks(k * n))
                .for_each(|((out, a), b)| {
                    let packed = if transpose_b {
                        PackedBf16Weight::new(b, n, k)
                    } else {
                        PackedBf16Weight::from_transposed(b, k, n)
                    }
                    .expect("wanted() checked the CPU");
                    packed.accumulate_product_here(out, a, m);
                });
            out
        });
        let Some(out) = out else {
            return Ok(None);
        };
        let mut shape = a.dims()[..a.rank() - 2].to_vec();
        shape.extend([m, n]);
        Ok(Some(Tensor::from_vec(out, shape, a.device())?))
    }
}

#[cfg(feature = "mkl")]
mod mkl {
    use super::{batched_dims, with_cpu_f32};
    use candle_core::{Result, Tensor};

    use crate::model::kernels::cblas::{NO_TRANSPOSE, ROW_MAJOR, TRANSPOSE};

    unsafe extern "C" {
        fn cblas_sgemm_batch_strided(
            layout: i32,
            transa: i32,
            transb: i32,
            m: i32,
            n: i32,
            k: i32,
            alpha: f32,
            a: *const f32,
            lda: i32,
            stridea: i32,
            b: *const f32,
            ldb: i32,
            strideb: i32,
            beta: f32,
            c: *mut f32,
            ldc: i32,
            stridec: i32,
            batch_size: i32,
        );
    }

    /// The batched product, or `None` when the operands are not both contiguous f32 CPU
    /// tensors of the same leading shape (the caller then uses candle's matmul).
    pub fn product(a: &Tensor, b: &Tensor, transpose_b: bool) -> Result<Option<Tensor>> {
        let Some((batch, m, k, n)) = batched_dims(a, b, transpose_b) else {
            return Ok(None);
        };
        let fits = |v: usize| i32::try_from(v).is_ok();
        if ![batch, m * k, k * n, m * n].into_iter().all(fits) {
            return Ok(None);
        }
        let out = with_cpu_f32(a, b, |a_data, b_data| {
            let mut out: Vec<f32> = Vec::with_capacity(batch * m * n);
            let (m, n, k, batch) = (m as i32, n as i32, k as i32, batch as i32);
            // SAFETY: `a_data` holds batch × m × k values and `b_data` batch × k × n, both
            // row-major and contiguous (`with_cpu_f32`, `batched_dims`); `out` has room for
            // batch × m × n, which the call writes in full (beta = 0: the output is not
            // read).
            unsafe {
                cblas_sgemm_batch_strided(
                    ROW_MAJOR,
                    NO_TRANSPOSE,
                    if transpose_b { TRANSPOSE } else { NO_TRANSPOSE },
                    m,
                    n,
                    k,
                    1.0,
                    a_data.as_ptr(),
                    k,
                    m * k,
                    b_data.as_ptr(),
                    if transpose_b { k } else { n },
                    k * n,
                    0.0,
                    out.as_mut_ptr(),
                    n,
                    m * n,
                    batch,
                );
                out.set_len(out.capacity());
            }
            out
        });
        let Some(out) = out else {
            return Ok(None);
        };
        let mut shape = a.dims()[..a.rank() - 2].to_vec();
        shape.extend([m, n]);
        Ok(Some(Tensor::from_vec(out, shape, a.device())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::testing::util::max_abs_difference;
    use candle_core::Device;

    /// Both forms equal candle's matmul on odd sizes, over two leading dimensions, and a
    /// view that is not contiguous still gives the right answer (through the fallback).
    #[test]
    fn batched_products_match_candles_matmul() {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (3, 5, 17, 24), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (3, 5, 19, 24), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (3, 5, 19, 7), &dev).unwrap();
        let scores = matmul_t(&q, &k).unwrap();
        assert_eq!(scores.dims(), &[3, 5, 17, 19]);
        let expected = q.matmul(&k.t().unwrap()).unwrap();
        assert!(max_abs_difference(&scores, &expected) < 1e-4);
        let mixed = matmul(&scores, &v).unwrap();
        assert_eq!(mixed.dims(), &[3, 5, 17, 7]);
        assert!(max_abs_difference(&mixed, &expected.matmul(&v).unwrap()) < 1e-3);
        let strided = k.transpose(2, 3).unwrap();
        let through = matmul(&q, &strided).unwrap();
        assert!(max_abs_difference(&through, &expected) < 1e-4);
    }

    /// In bf16 (where the own product runs), both forms equal f64 arithmetic on the
    /// bf16-rounded operands, including an odd inner dimension (the padded pair).
    #[test]
    fn bf16_batched_products_multiply_rounded_values() {
        use crate::model::kernels::fused_linear::{Bf16Product, bf16_product};
        if bf16_product() != Some(Bf16Product::AvxDot) {
            eprintln!("skipped: the own bf16 product does not run on this CPU");
            return;
        }
        let dev = Device::Cpu;
        let rounded = |t: &Tensor| {
            t.to_dtype(candle_core::DType::BF16)
                .and_then(|t| t.to_dtype(candle_core::DType::F64))
                .unwrap()
        };
        let bf16 = MatmulPrecision::Bf16;
        let q = Tensor::randn(0f32, 1.0, (2, 3, 29, 13), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (2, 3, 37, 13), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (2, 3, 37, 40), &dev).unwrap();
        let scores = matmul_t_as(&q, &k, bf16).unwrap();
        assert_eq!(scores.dims(), &[2, 3, 29, 37]);
        let expected = rounded(&q).matmul(&rounded(&k).t().unwrap()).unwrap();
        let diff = max_abs_difference(
            &scores.to_dtype(candle_core::DType::F64).unwrap(),
            &expected,
        );
        assert!(diff < 1e-4, "q kᵀ off by {diff}");
        let mixed = matmul_as(&scores, &v, bf16).unwrap();
        assert_eq!(mixed.dims(), &[2, 3, 29, 40]);
        let expected = rounded(&scores).matmul(&rounded(&v)).unwrap();
        let diff = max_abs_difference(&mixed.to_dtype(candle_core::DType::F64).unwrap(), &expected);
        assert!(diff < 1e-3, "w v off by {diff}");
        let softmax = crate::model::kernels::cpu_kernels::softmax_last_dim(&scores).unwrap();
        let attended = softmax_matmul_as(&scores, &v, bf16).unwrap();
        let expected = rounded(&softmax).matmul(&rounded(&v)).unwrap();
        let diff = max_abs_difference(
            &attended.to_dtype(candle_core::DType::F64).unwrap(),
            &expected,
        );
        assert!(diff < 1e-4, "softmax(s) v off by {diff}");
        let in_f32 = softmax_matmul_as(&scores, &v, MatmulPrecision::F32).unwrap();
        assert!(max_abs_difference(&in_f32, &softmax.matmul(&v).unwrap()) < 1e-5);
        // And it is bf16: f32 differs by about bf16's precision.
        let f32_diff = max_abs_difference(&mixed, &matmul(&scores, &v).unwrap());
        assert!(f32_diff > 1e-4, "f32 against bf16: {f32_diff}");
    }
}
