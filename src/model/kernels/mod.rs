//! The numeric kernels the towers run on: the fused linear layer and its bf16 product, the
//! batched attention products, the convolutions, and the vectorised row kernels (softmax,
//! rounding, activations).

pub mod batched_matmul;
#[cfg(target_arch = "x86_64")]
pub mod bf16_gemm;
#[cfg(feature = "mkl")]
mod cblas;
pub mod conv;
pub mod cpu_kernels;
pub mod fused_linear;
