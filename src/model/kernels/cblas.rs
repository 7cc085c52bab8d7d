//! MKL's C interface for the modules that call it directly: the packed-matrix products and
//! the CBLAS enum values it takes as plain integers (`CBLAS_LAYOUT`, `CBLAS_TRANSPOSE`,
//! `CBLAS_IDENTIFIER`).

pub(crate) const ROW_MAJOR: i32 = 101;
pub(crate) const NO_TRANSPOSE: i32 = 111;
pub(crate) const TRANSPOSE: i32 = 112;
/// `CblasPacked`: a matrix already in the kernel's packed layout.
pub(crate) const PACKED: i32 = 151;
/// `CblasAMatrix`: the left-hand matrix of a packed product.
pub(crate) const A_MATRIX: i32 = 161;
/// `CblasBMatrix`: the right-hand matrix of a packed product.
pub(crate) const B_MATRIX: i32 = 162;

unsafe extern "C" {
    /// The threads MKL's calls from this thread use (0: back to the process-wide number);
    /// gives the previous setting. The lower-case symbol is the Fortran entry, which takes
    /// a pointer.
    #[link_name = "MKL_Set_Num_Threads_Local"]
    pub(crate) fn mkl_set_num_threads_local(threads: i32) -> i32;
    pub(crate) fn cblas_sgemm_pack_get_size(identifier: i32, m: i32, n: i32, k: i32) -> usize;
    pub(crate) fn cblas_sgemm_pack(
        layout: i32,
        identifier: i32,
        trans: i32,
        m: i32,
        n: i32,
        k: i32,
        alpha: f32,
        src: *const f32,
        ld: i32,
        dest: *mut f32,
    );
    pub(crate) fn cblas_sgemm_compute(
        layout: i32,
        transa: i32,
        transb: i32,
        m: i32,
        n: i32,
        k: i32,
        a: *const f32,
        lda: i32,
        b: *const f32,
        ldb: i32,
        beta: f32,
        c: *mut f32,
        ldc: i32,
    );
    pub(crate) fn cblas_gemm_bf16bf16f32_pack_get_size(
        identifier: i32,
        m: i32,
        n: i32,
        k: i32,
    ) -> usize;
    pub(crate) fn cblas_gemm_bf16bf16f32_pack(
        layout: i32,
        identifier: i32,
        trans: i32,
        m: i32,
        n: i32,
        k: i32,
        src: *const u16,
        ld: i32,
        dest: *mut u16,
    );
    pub(crate) fn cblas_gemm_bf16bf16f32_compute(
        layout: i32,
        transa: i32,
        transb: i32,
        m: i32,
        n: i32,
        k: i32,
        alpha: f32,
        a: *const u16,
        lda: i32,
        b: *const u16,
        ldb: i32,
        beta: f32,
        c: *mut f32,
        ldc: i32,
    );
}
