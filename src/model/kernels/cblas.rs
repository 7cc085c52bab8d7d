//! The CBLAS enum values that MKL's C interface takes as plain integers (`CBLAS_LAYOUT`,
//! `CBLAS_TRANSPOSE`, `CBLAS_IDENTIFIER`), for the modules that call it directly.

pub(crate) const ROW_MAJOR: i32 = 101;
pub(crate) const NO_TRANSPOSE: i32 = 111;
pub(crate) const TRANSPOSE: i32 = 112;
/// `CblasPacked`: a matrix already in the kernel's packed layout.
pub(crate) const PACKED: i32 = 151;
