//! A filter packed as the left-hand matrix of MKL's packed products, f32 or bf16, or kept
//! as rows for the `gemm` crate's f32 product, where that one is the faster
//! ([`mkl_f32_fastest`](super::product::mkl_f32_fastest)).

use super::geometry::Target;
use super::own_products::gemm_onto;

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
