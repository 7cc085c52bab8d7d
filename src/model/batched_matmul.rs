//! Products over a batch of small matrices (attention's `q kᵀ` and `w v`, one pair per image
//! and head) in one call. With MKL that is `cblas_sgemm_batch_strided`, which spreads the
//! batch over the threads; candle's matmul makes one threaded call per matrix instead, and
//! at batch 8 the 96 calls per product of CLIP's tower cost more than their arithmetic.
//! Elsewhere, and for tensors that are not contiguous f32 on the CPU, candle's matmul.

use candle_core::{Result, Tensor};

/// `a · bᵀ` over the leading dimensions: `a` `(…, m, k)` and `b` `(…, n, k)` give
/// `(…, m, n)`.
pub fn matmul_t(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "mkl")]
    if let Some(out) = mkl::product(a, b, true)? {
        return Ok(out);
    }
    a.matmul(&b.t()?)
}

/// `a · b` over the leading dimensions: `a` `(…, m, k)` and `b` `(…, k, n)` give `(…, m, n)`.
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "mkl")]
    if let Some(out) = mkl::product(a, b, false)? {
        return Ok(out);
    }
    a.matmul(b)
}

#[cfg(feature = "mkl")]
mod mkl {
    use candle_core::{CpuStorage, DType, Result, Storage, Tensor};

    use crate::model::cblas::{NO_TRANSPOSE, ROW_MAJOR, TRANSPOSE};

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
        let (ad, bd) = (a.dims(), b.dims());
        let r = ad.len();
        if a.dtype() != DType::F32
            || b.dtype() != DType::F32
            || !a.device().is_cpu()
            || r < 3
            || bd.len() != r
            || ad[..r - 2] != bd[..r - 2]
        {
            return Ok(None);
        }
        let batch: usize = ad[..r - 2].iter().product();
        let (m, k) = (ad[r - 2], ad[r - 1]);
        let (kb, n) = if transpose_b {
            (bd[r - 1], bd[r - 2])
        } else {
            (bd[r - 2], bd[r - 1])
        };
        let fits = |v: usize| i32::try_from(v).is_ok();
        if k != kb || ![batch, m * k, k * n, m * n].into_iter().all(fits) {
            return Ok(None);
        }
        let (a_storage, a_layout) = a.storage_and_layout();
        let (b_storage, b_layout) = b.storage_and_layout();
        let (Storage::Cpu(CpuStorage::F32(a_data)), Storage::Cpu(CpuStorage::F32(b_data))) =
            (&*a_storage, &*b_storage)
        else {
            return Ok(None);
        };
        let (Some((a0, a1)), Some((b0, b1))) =
            (a_layout.contiguous_offsets(), b_layout.contiguous_offsets())
        else {
            return Ok(None);
        };
        let (a_data, b_data) = (&a_data[a0..a1], &b_data[b0..b1]);
        let mut out: Vec<f32> = Vec::with_capacity(batch * m * n);
        let (m, n, k, batch) = (m as i32, n as i32, k as i32, batch as i32);
        // SAFETY: `a_data` holds batch × m × k values and `b_data` batch × k × n, both
        // row-major and contiguous (checked above); `out` has room for batch × m × n, which
        // the call writes in full (beta = 0: the output is not read).
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
        let mut shape = ad[..r - 2].to_vec();
        shape.extend([m as usize, n as usize]);
        Ok(Some(Tensor::from_vec(out, shape, a.device())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::testutil::max_abs_difference;
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
}
