//! The shapes and views a convolution's tiles work on: the layer's geometry and activation,
//! an input's images, a tile of output pixels and where its products go.

use candle_core::Result;

/// The activation applied to a convolution's output inside the layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConvActivation {
    /// The raw convolution (the detection head's last 1x1 layers).
    Identity,
    /// `x * sigmoid(x)`, Ultralytics' `Conv` block.
    Silu,
}

/// The sizes that fix a layer's arithmetic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Geometry {
    pub(super) out: usize,
    pub(super) inp: usize,
    pub(super) kernel: usize,
    pub(super) stride: usize,
    pub(super) padding: usize,
}

impl Geometry {
    /// The inner dimension of the product: `in · k²`.
    pub(super) fn depth(&self) -> usize {
        self.inp * self.kernel * self.kernel
    }

    /// A 1x1 kernel at stride 1 without padding: the input is the product's right-hand
    /// matrix as it stands.
    pub(super) fn pointwise(&self) -> bool {
        self.kernel == 1 && self.stride == 1 && self.padding == 0
    }

    /// A kernel larger than 1x1 read from the padded input shifted by each kernel position,
    /// instead of gathered columns (MKL's products and the own bf16 one); at a larger
    /// stride only from 16 input channels on: the first layer's 3 channels make products
    /// too thin to pay for MKL's 9 passes over the output.
    pub(super) fn shifted(&self) -> bool {
        self.kernel > 1 && (self.stride == 1 || self.inp >= 16)
    }

    /// The output's spatial size for an input of `(h, w)`.
    pub(super) fn output_size(&self, h: usize, w: usize) -> Result<(usize, usize)> {
        let (padded_h, padded_w) = (h + 2 * self.padding, w + 2 * self.padding);
        if padded_h < self.kernel || padded_w < self.kernel || self.stride == 0 {
            candle_core::bail!(
                "convolution: a {h}x{w} input is smaller than the {k}x{k} kernel",
                k = self.kernel
            )
        }
        Ok((
            (padded_h - self.kernel) / self.stride + 1,
            (padded_w - self.kernel) / self.stride + 1,
        ))
    }
}

/// NCHW values whose images are each contiguous, `image_stride` values apart.
#[derive(Clone, Copy)]
pub(super) struct Planes<'a, T> {
    /// From the first image's first value on.
    pub(super) data: &'a [T],
    pub(super) image_stride: usize,
}

impl<'a, T> Planes<'a, T> {
    pub(super) fn new(data: &'a [T], start: usize, image_stride: usize) -> Self {
        Self {
            data: &data[start..],
            image_stride,
        }
    }

    /// Image `index`'s first `size` values.
    pub(super) fn image(&self, index: usize, size: usize) -> &'a [T] {
        let start = index * self.image_stride;
        &self.data[start..start + size]
    }
}

/// An NCHW input with its output's spatial size.
pub(super) struct Input<'a, S> {
    pub(super) planes: Planes<'a, S>,
    pub(super) h: usize,
    pub(super) w: usize,
    pub(super) oh: usize,
    pub(super) ow: usize,
}

impl<'a, S> Input<'a, S> {
    /// `planes` with the input's `(h, w)` and the output's `(oh, ow)`.
    pub(super) fn new(planes: Planes<'a, S>, (h, w, oh, ow): (usize, usize, usize, usize)) -> Self {
        Self {
            planes,
            h,
            w,
            oh,
            ow,
        }
    }

    pub(super) fn image(&self, index: usize, channels: usize) -> &'a [S] {
        self.planes.image(index, channels * self.h * self.w)
    }

    pub(super) fn pixels(&self) -> usize {
        self.oh * self.ow
    }
}

/// Bytes of gathered columns per tile: a tile's columns stay in the L2 cache (2 MiB per
/// core on the Xeons and 1 MiB on the EPYCs the workers run on) while the product passes
/// over them, next to the filter's current block.
pub(super) const COLUMN_BYTES: usize = 384 * 1024;
/// Tiles are a whole number of these pixels wide, so the products' column blocks are full.
pub(super) const TILE_ALIGN: usize = 16;

/// Output pixels per tile for `batch` images of `pixels` output pixels and a product of
/// depth `depth`: as many as fit [`COLUMN_BYTES`], and few enough that every thread gets
/// about two tiles.
pub(super) fn tile_width(depth: usize, pixels: usize, batch: usize) -> usize {
    let fits = (COLUMN_BYTES / (depth * 4)).max(TILE_ALIGN) / TILE_ALIGN * TILE_ALIGN;
    let wanted_tiles = 2 * rayon::current_num_threads().max(1);
    let per_image = wanted_tiles.div_ceil(batch).max(1);
    let balanced = pixels.div_ceil(per_image).div_ceil(TILE_ALIGN) * TILE_ALIGN;
    fits.min(balanced).max(TILE_ALIGN).min(pixels.max(1))
}

/// A raw output pointer shared by tasks that write disjoint tiles.
pub(super) struct SendPtr<T>(pub(super) *mut T);
// SAFETY: tasks write disjoint tiles of the buffer behind it.
unsafe impl<T> Sync for SendPtr<T> {}

impl<T> SendPtr<T> {
    /// The pointer `offset` values on (a method, so that closures take the whole `SendPtr`).
    ///
    /// # Safety
    /// `offset` stays inside the buffer.
    pub(super) unsafe fn at(&self, offset: usize) -> *mut T {
        // SAFETY: as the caller promises.
        unsafe { self.0.add(offset) }
    }
}

/// A run of one image's output pixels, in row-major pixel order.
pub(super) struct Tile<'a, S> {
    /// The image's `[in, h, w]` input.
    pub(super) image: &'a [S],
    pub(super) first: usize,
    pub(super) width: usize,
}

/// Where a tile's output goes: `out` at its first pixel, `stride` values between two output
/// channels.
pub(super) struct Target {
    pub(super) out: *mut f32,
    pub(super) stride: usize,
}

impl Target {
    /// Output channel `channel`'s values in this tile.
    ///
    /// # Safety
    /// `channel` is below the layer's output channels and `width` the tile's width, and no
    /// other reference to that row is alive.
    #[allow(clippy::mut_from_ref)] // The rows are the task's own, behind a raw pointer.
    pub(super) unsafe fn row(&self, channel: usize, width: usize) -> &mut [f32] {
        // SAFETY: as the caller promises, inside the output and this tile's own.
        unsafe { std::slice::from_raw_parts_mut(self.out.add(channel * self.stride), width) }
    }

    /// Writes `bias` into every output channel's values in the tile.
    pub(super) fn fill_bias(&self, bias: &[f32], width: usize) {
        for (channel, &b) in bias.iter().enumerate() {
            // SAFETY: one row per output channel, the tile's width.
            unsafe { self.row(channel, width) }.fill(b);
        }
    }
}
