//! 2-D convolutions for the convolutional families (YOLO-World): one layer type holding a
//! convolution whose batch norm is already folded into its weight and bias, with its
//! activation fused, taking and giving NCHW tensors.

use candle_core::{Module, Result, Tensor};

/// The activation applied to a convolution's output inside the layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConvActivation {
    /// The raw convolution (the detection head's last 1x1 layers).
    Identity,
    /// `x * sigmoid(x)`, Ultralytics' `Conv` block.
    Silu,
}

/// A convolution with square kernel, equal stride and padding on both axes, no groups and no
/// dilation: every convolution YOLO-World has.
#[derive(Clone, Debug)]
pub struct Conv2d {
    /// `[out, in, k, k]`.
    weight: Tensor,
    /// `[out]`.
    bias: Option<Tensor>,
    stride: usize,
    padding: usize,
    activation: ConvActivation,
}

impl Conv2d {
    /// A layer from its weight `[out, in, k, k]` and bias `[out]` (batch norm folded in by the
    /// caller), in the dtype the layer computes in.
    pub fn new(
        weight: Tensor,
        bias: Option<Tensor>,
        stride: usize,
        padding: usize,
        activation: ConvActivation,
    ) -> Result<Self> {
        let (_, _, kh, kw) = weight.dims4()?;
        if kh != kw {
            candle_core::bail!("convolution kernel {kh}x{kw} is not square");
        }
        Ok(Self {
            weight,
            bias,
            stride,
            padding,
            activation,
        })
    }

    /// `(out_channels, in_channels, kernel)`.
    pub fn dims(&self) -> (usize, usize, usize) {
        let (out, inp, k, _) = self.weight.dims4().unwrap_or((0, 0, 0, 0));
        (out, inp, k)
    }
}

impl Module for Conv2d {
    /// `x`: `[batch, in, h, w]` in the layer's dtype; gives `[batch, out, h', w']`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = x.conv2d(&self.weight, self.padding, self.stride, 1, 1)?;
        let y = match &self.bias {
            Some(bias) => y.broadcast_add(&bias.reshape((1, (), 1, 1))?)?,
            None => y,
        };
        match self.activation {
            ConvActivation::Identity => Ok(y),
            ConvActivation::Silu => candle_nn::ops::silu(&y),
        }
    }
}
