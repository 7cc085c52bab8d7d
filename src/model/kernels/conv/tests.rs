//! The layer against candle's convolution (in f64) for every product this build and CPU
//! have, dtypes, residuals, concatenations and bad shapes.

use super::*;
use crate::model::kernels::cpu_kernels;
use crate::model::kernels::fused_linear::{self, Bf16Product};
use crate::model::testing::util::{lowest_row_cosine, max_abs_difference};
use candle_core::Device;

/// The CPU products this build has on this CPU.
fn products() -> Vec<CpuProduct> {
    let mut all = vec![CpuProduct::Gemm];
    #[cfg(feature = "mkl")]
    all.extend([
        CpuProduct::Mkl(MatmulPrecision::F32),
        CpuProduct::Mkl(MatmulPrecision::Bf16),
        CpuProduct::GemmFilters,
    ]);
    #[cfg(target_arch = "x86_64")]
    if crate::model::kernels::bf16_gemm::supported() {
        all.push(CpuProduct::OwnBf16);
    }
    all
}

fn rounds_to_bf16(product: CpuProduct) -> bool {
    match product {
        CpuProduct::Gemm => false,
        #[cfg(feature = "mkl")]
        CpuProduct::Mkl(precision) => precision == MatmulPrecision::Bf16,
        #[cfg(feature = "mkl")]
        CpuProduct::GemmFilters => false,
        #[cfg(target_arch = "x86_64")]
        CpuProduct::OwnBf16 => true,
    }
}

/// A random layer's weight `[out, in, k, k]` and bias, and an input `[batch, in, h, w]`.
fn case(
    (batch, inp, out, kernel): (usize, usize, usize, usize),
    (h, w): (usize, usize),
) -> (Tensor, Tensor, Tensor) {
    let dev = Device::Cpu;
    let scale = 1.0 / ((inp * kernel * kernel) as f64).sqrt();
    let weight = Tensor::randn(0f32, scale as f32, (out, inp, kernel, kernel), &dev).unwrap();
    let bias = Tensor::randn(0f32, 0.5, out, &dev).unwrap();
    let x = Tensor::randn(0f32, 1.0, (batch, inp, h, w), &dev).unwrap();
    (weight, bias, x)
}

/// candle's convolution, bias and activation, in f64.
fn reference(
    (weight, bias, x): &(Tensor, Tensor, Tensor),
    stride: usize,
    padding: usize,
    activation: ConvActivation,
) -> Tensor {
    let f64 = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
    let y = f64(x)
        .conv2d(&f64(weight), padding, stride, 1, 1)
        .unwrap()
        .broadcast_add(&f64(bias).reshape((1, (), 1, 1)).unwrap())
        .unwrap();
    let y = match activation {
        ConvActivation::Identity => y,
        ConvActivation::Silu => candle_nn::ops::silu(&y).unwrap(),
    };
    y.to_dtype(DType::F32).unwrap()
}

/// Every kernel, stride and padding YOLO-World has (and a strided 1x1 and unpadded 3x3),
/// on odd sizes, batches of 1 and 3, and a map wide enough for several tiles per image.
const SHAPES: [(usize, usize, usize); 5] = [(1, 1, 0), (3, 1, 1), (3, 2, 1), (1, 2, 0), (3, 1, 0)];
const SIZES: [(usize, usize); 3] = [(13, 7), (7, 13), (41, 33)];

#[test]
fn every_product_matches_candles_convolution() {
    for product in products() {
        for (kernel, stride, padding) in SHAPES {
            for (batch, inp, out) in [(1, 3, 16), (3, 16, 48), (1, 48, 3), (3, 48, 16)] {
                for size in SIZES {
                    let case = case((batch, inp, out, kernel), size);
                    for activation in [ConvActivation::Identity, ConvActivation::Silu] {
                        let layer = Conv2d::with_product(
                            case.0.clone(),
                            Some(case.1.clone()),
                            stride,
                            padding,
                            activation,
                            product,
                        )
                        .unwrap();
                        let got = layer.forward(&case.2).unwrap();
                        let expected = reference(&case, stride, padding, activation);
                        assert_eq!(got.dims(), expected.dims());
                        let what = format!(
                            "{product:?} k{kernel} s{stride} p{padding} {batch}x{inp}->{out} \
                             at {size:?}, {activation:?}"
                        );
                        check(&got, &expected, rounds_to_bf16(product), &what);
                    }
                }
            }
        }
    }
}

/// f32 products within 1e-4 of the largest value; bf16 ones at cosine 0.9999 or more
/// for every output channel of every image.
fn check(got: &Tensor, expected: &Tensor, bf16: bool, what: &str) {
    if bf16 {
        let rows = |t: &Tensor| {
            let (b, c, h, w) = t.dims4().unwrap();
            t.reshape((b * c, h * w)).unwrap()
        };
        let cosine = lowest_row_cosine(&rows(got), &rows(expected));
        assert!(cosine >= 0.9999, "{what}: cosine {cosine}");
    } else {
        let largest = expected
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let diff = max_abs_difference(got, expected);
        assert!(
            diff <= 1e-4 * largest as f64,
            "{what}: off by {diff} of {largest}"
        );
    }
}

/// bf16 inputs, read as they are by MKL's bf16 layers and widened for the others, give
/// bf16 outputs at cosine 0.9999 or more to the f64 reference on the same (rounded)
/// input, at every kernel, stride and padding.
#[test]
fn bf16_inputs_match_candles_convolution() {
    let bf16 = |t: &Tensor| t.to_dtype(DType::BF16).unwrap();
    for product in products() {
        for (kernel, stride, padding) in SHAPES {
            for (batch, inp, out) in [(1, 3, 16), (3, 16, 48), (3, 48, 16)] {
                let (weight, bias, x) = case((batch, inp, out, kernel), (13, 7));
                let x = bf16(&x).to_dtype(DType::F32).unwrap();
                let layer = Conv2d::with_product(
                    weight.clone(),
                    Some(bias.clone()),
                    stride,
                    padding,
                    ConvActivation::Silu,
                    product,
                )
                .unwrap();
                let got = layer.forward(&bf16(&x)).unwrap();
                assert_eq!(got.dtype(), DType::BF16);
                let case = (weight, bias, x);
                let expected = reference(&case, stride, padding, ConvActivation::Silu);
                let what =
                    format!("{product:?} k{kernel} s{stride} p{padding} {batch}x{inp}->{out}");
                check(&got.to_dtype(DType::F32).unwrap(), &expected, true, &what);
            }
        }
    }
}

/// A residual added in the epilogue equals the layer's output plus the residual, in f32
/// and bf16, and a channel slice of a larger tensor (its images strided) is read in
/// place as its contiguous copy would be.
#[test]
fn residuals_and_channel_slices_match_their_separate_passes() {
    for product in products() {
        for (kernel, stride, padding) in [(3, 1, 1), (1, 1, 0), (3, 2, 1)] {
            let (weight, bias, wide) = case((3, 32, 16, kernel), (13, 7));
            let x = wide.narrow(1, 16, 16).unwrap();
            let weight = weight.narrow(1, 0, 16).unwrap();
            let layer = Conv2d::with_product(
                weight,
                Some(bias),
                stride,
                padding,
                ConvActivation::Silu,
                product,
            )
            .unwrap();
            let what = format!("{product:?} k{kernel} s{stride}");
            let alone = layer.forward(&x.contiguous().unwrap()).unwrap();
            check(&layer.forward(&x).unwrap(), &alone, false, &what);
            let residual = Tensor::randn(0f32, 1.0, alone.dims(), &Device::Cpu).unwrap();
            let expected = (&alone + &residual).unwrap();
            let got = layer.forward_add(&x, &residual).unwrap();
            check(&got, &expected, false, &what);
            let bf16 = |t: &Tensor| t.to_dtype(DType::BF16).unwrap();
            let got = layer.forward_add(&bf16(&x), &bf16(&residual)).unwrap();
            assert_eq!(got.dtype(), DType::BF16);
            check(&got.to_dtype(DType::F32).unwrap(), &expected, true, &what);
        }
    }
}

/// A 1x1 layer over a concatenation's parts, read where they lie (a channel slice of a
/// batch among them), gives what it gives over the concatenated tensor, in f32 and
/// bf16; parts that do not fall on its blocks are concatenated instead.
#[test]
fn a_concatenation_read_in_place_matches_the_concatenated_input() {
    let dev = Device::Cpu;
    let (weight, bias, wide) = case((3, 64, 24, 1), (13, 7));
    let parts = [
        wide.narrow(1, 16, 32).unwrap(),
        Tensor::randn(0f32, 1.0, (3, 16, 13, 7), &dev).unwrap(),
        Tensor::randn(0f32, 1.0, (3, 16, 13, 7), &dev).unwrap(),
    ];
    let uneven = [
        parts[0].narrow(1, 0, 8).unwrap(),
        parts[0].narrow(1, 8, 24).unwrap(),
    ];
    for precision in [MatmulPrecision::F32, MatmulPrecision::Bf16] {
        let layer = Conv2d::pointwise_in_blocks(
            weight.clone(),
            Some(bias.clone()),
            ConvActivation::Silu,
            precision,
            16,
        )
        .unwrap();
        let dtype = activation_dtype(precision, &dev);
        let parts: Vec<Tensor> = parts.iter().map(|p| p.to_dtype(dtype).unwrap()).collect();
        let whole = layer.forward(&Tensor::cat(&parts, 1).unwrap()).unwrap();
        let whole = whole.to_dtype(DType::F32).unwrap();
        let got = layer.forward_cat(&parts).unwrap();
        assert_eq!(got.dtype(), dtype);
        let bf16 = dtype == DType::BF16;
        check(&got.to_dtype(DType::F32).unwrap(), &whole, bf16, "parts");
        let mut mixed: Vec<Tensor> = uneven.iter().map(|p| p.to_dtype(dtype).unwrap()).collect();
        mixed.extend_from_slice(&parts[1..]);
        let got = layer.forward_cat(&mixed).unwrap();
        check(
            &got.to_dtype(DType::F32).unwrap(),
            &whole,
            bf16,
            "uneven parts",
        );
    }
}

#[test]
fn a_bf16_product_really_rounds() {
    for product in products().into_iter().filter(|&p| rounds_to_bf16(p)) {
        let case = case((1, 48, 16, 3), (13, 7));
        let layer = |product| {
            Conv2d::with_product(
                case.0.clone(),
                Some(case.1.clone()),
                1,
                1,
                ConvActivation::Identity,
                product,
            )
            .unwrap()
        };
        let rounded = layer(product).forward(&case.2).unwrap();
        let exact = layer(CpuProduct::Gemm).forward(&case.2).unwrap();
        let diff = max_abs_difference(&rounded, &exact);
        assert!(diff > 1e-4 && diff < 0.1, "{product:?} against f32: {diff}");
    }
}

#[test]
fn bf16_tensors_come_back_bf16() {
    let case = case((3, 16, 48, 3), (13, 7));
    let bf16 = |t: &Tensor| t.to_dtype(DType::BF16).unwrap();
    let layer = Conv2d::new(
        bf16(&case.0),
        Some(bf16(&case.1)),
        2,
        1,
        ConvActivation::Silu,
    )
    .unwrap();
    let got = layer.forward(&bf16(&case.2)).unwrap();
    assert_eq!(got.dtype(), DType::BF16);
    let expected = reference(&case, 2, 1, ConvActivation::Silu);
    check(
        &got.to_dtype(DType::F32).unwrap(),
        &expected,
        true,
        "bf16 in, bf16 out",
    );
}

#[test]
fn the_public_constructors_pick_the_dtypes_product() {
    let case = case((1, 16, 48, 1), (13, 7));
    let f32_layer = Conv2d::new(case.0.clone(), None, 1, 0, ConvActivation::Identity).unwrap();
    #[cfg(feature = "mkl")]
    let expected_f32 = if mkl_f32_fastest() {
        "mkl-f32"
    } else {
        "gemm-f32"
    };
    #[cfg(not(feature = "mkl"))]
    let expected_f32 = "gemm-f32";
    assert_eq!(f32_layer.product.name(), expected_f32);
    assert_eq!(f32_layer.dims(), (48, 16, 1));
    let bf16_layer = Conv2d::new_as(
        case.0.clone(),
        None,
        1,
        0,
        ConvActivation::Identity,
        MatmulPrecision::Bf16,
    )
    .unwrap();
    let expected_bf16 = match fused_linear::bf16_product() {
        Some(Bf16Product::AvxDot) if cfg!(feature = "mkl") && cpu_kernels::intel_cpu() => {
            "mkl-bf16"
        }
        Some(Bf16Product::AvxDot) => "own-bf16",
        Some(Bf16Product::Mkl) => "mkl-bf16",
        None => expected_f32,
    };
    assert_eq!(bf16_layer.product.name(), expected_bf16);
    // No bias is a zero bias.
    let zero = Tensor::zeros(48, DType::F32, &Device::Cpu).unwrap();
    let expected = reference(
        &(case.0, zero, case.2.clone()),
        1,
        0,
        ConvActivation::Identity,
    );
    check(
        &f32_layer.forward(&case.2).unwrap(),
        &expected,
        false,
        "no bias",
    );
}

#[test]
fn other_dtypes_take_candles_own_convolution() {
    let (weight, bias, x) = case((3, 16, 48, 3), (13, 7));
    let f64 = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
    let layer = Conv2d::new(f64(&weight), Some(f64(&bias)), 2, 1, ConvActivation::Silu).unwrap();
    assert_eq!(layer.product.name(), "candle");
    let got = layer.forward(&f64(&x)).unwrap();
    assert_eq!(got.dtype(), DType::F64);
    let expected = reference(&(weight, bias, x), 2, 1, ConvActivation::Silu);
    check(&got.to_dtype(DType::F32).unwrap(), &expected, false, "f64");
}

#[test]
fn bad_shapes_are_errors() {
    let dev = Device::Cpu;
    let non_square = Tensor::zeros((4, 3, 3, 1), DType::F32, &dev).unwrap();
    assert!(Conv2d::new(non_square, None, 1, 0, ConvActivation::Identity).is_err());
    let weight = Tensor::zeros((4, 3, 3, 3), DType::F32, &dev).unwrap();
    let short_bias = Tensor::zeros(3, DType::F32, &dev).unwrap();
    assert!(Conv2d::new(weight.clone(), Some(short_bias), 1, 0, ConvActivation::Silu).is_err());
    let layer = Conv2d::new(weight, None, 1, 0, ConvActivation::Silu).unwrap();
    let wrong_channels = Tensor::zeros((1, 5, 8, 8), DType::F32, &dev).unwrap();
    assert!(layer.forward(&wrong_channels).is_err());
    let too_small = Tensor::zeros((1, 3, 2, 8), DType::F32, &dev).unwrap();
    assert!(layer.forward(&too_small).is_err());
}
