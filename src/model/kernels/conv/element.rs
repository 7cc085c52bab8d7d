//! The types activations travel in between layers (f32, or bf16 as its bit pattern) and how
//! each one is stored, widened and multiplied.

#[cfg(feature = "mkl")]
use super::geometry::*;
#[cfg(feature = "mkl")]
use super::mkl_filter;
use crate::model::kernels::cpu_kernels;
use candle_core::CpuStorage;

/// bf16 bit patterns as a storage.
pub(super) fn bf16_storage(out: Vec<u16>) -> CpuStorage {
    let mut out = std::mem::ManuallyDrop::new(out);
    // SAFETY: `bf16` is a transparent wrapper of its `u16` bit pattern; the vector's buffer
    // moves over whole, with its length and capacity, and is freed as a `Vec<bf16>` of the
    // same layout.
    CpuStorage::BF16(unsafe {
        Vec::from_raw_parts(out.as_mut_ptr().cast(), out.len(), out.capacity())
    })
}

/// A bf16 storage's values as their bit patterns.
pub(super) fn bf16_bits<T>(data: &[T]) -> &[u16] {
    assert_eq!(std::mem::size_of::<T>(), 2, "bf16 values are 16 bits");
    // SAFETY: `bf16` is a transparent wrapper of its `u16` bit pattern (checked in size).
    unsafe { std::slice::from_raw_parts(data.as_ptr().cast(), data.len()) }
}

/// A type activations travel in: f32, or bf16 as its bit pattern.
pub(super) trait Element: Copy + Default + Send + Sync + 'static {
    /// Whether this is f32 (so a tile's f32 output can be written in place).
    const IS_F32: bool;
    /// f32 values into this type: a copy, or rounding to bf16.
    fn store(values: &[f32], out: &mut [Self]);
    /// bf16 values into this type: widened to f32, or a copy.
    fn from_bf16(values: &[u16], out: &mut [Self]);
    /// This type's values into `T`.
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
