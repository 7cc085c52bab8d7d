//! A bf16 matrix product for x86-64 CPUs with AVX512-BF16 (`vdpbf16ps`): `C += A · Bᵀ` with
//! bf16 inputs and f32 accumulation, for the CPUs where MKL's own bf16 product does not use
//! those instructions (MKL runs its bf16 product at f32 speed on AMD's Zen 4).
//!
//! The weight is packed once, at load, into panels of [`PANEL`] output columns whose values
//! come in pairs along the inner dimension, the order `vdpbf16ps` multiplies them in. A
//! product takes the inner dimension a block at a time and the input rows a run at a time,
//! and passes each panel's slice over the run's blocks of [`ROWS`] rows, with the
//! accumulators in registers. Panels are shared out over rayon's threads.

use rayon::prelude::*;
use std::arch::x86_64::*;

/// Output columns per panel: two 16-lane registers.
const PANEL: usize = 32;
/// Input rows per register block: 2 × `ROWS` accumulators, 2 panel values and a broadcast
/// fit AVX-512's 32 registers.
const ROWS: usize = 12;
/// Pairs of the inner dimension per block: a panel's slice is 384 × 128 bytes (48 KiB),
/// which stays in the L2 cache while a run's row blocks pass over it. Longer blocks load
/// and store each output tile fewer times: with 64, 128, 192 and 384 pairs, a 2308 × 3072
/// × 768 product (OWL-ViT's first MLP layer at batch 4) ran at 285, 335, 376 and 405
/// GFLOP/s on 2 Zen 4 cores.
const PAIRS_PER_BLOCK: usize = 384;
/// Rows per run: a run's slice of a block of the input (240 × 768 bf16 values, 360 KiB)
/// stays in the L2 cache while every panel passes over it.
const ROWS_PER_RUN: usize = 20 * ROWS;

/// Rows of a [`Bf16LeftHand`] per group: a group's slice of a depth block (96 × 384 pairs,
/// 144 KiB) stays in the L2 cache beside the panels' slices while every panel passes over
/// it, where a wide layer's whole block (576 rows: 864 KiB) would not.
const ROWS_PER_GROUP: usize = 8 * ROWS;

/// One cache line of a packed panel: 16 columns × 2 bf16 values.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u16; PANEL]);

/// Whether this CPU runs [`PackedBf16Weight`]'s product.
pub fn supported() -> bool {
    is_x86_feature_detected!("avx512bf16") && is_x86_feature_detected!("avx512f")
}

/// A `(out, in)` weight, rounded to bf16 and packed as the right-hand `Wᵀ` of `x Wᵀ`.
pub struct PackedBf16Weight {
    lines: Vec<Line>,
    out_dim: usize,
    in_dim: usize,
}

impl PackedBf16Weight {
    /// Packs a row-major `(out_dim, in_dim)` weight already rounded to bf16; `None` where
    /// the CPU lacks AVX512-BF16.
    pub fn new(weight: &[u16], out_dim: usize, in_dim: usize) -> Option<Self> {
        assert_eq!(weight.len(), out_dim * in_dim);
        Self::pack(out_dim, in_dim, |column, k| weight[column * in_dim + k])
    }

    /// Packs a row-major `(in_dim, out_dim)` matrix `B` already rounded to bf16, for the
    /// product `x · B` (attention's `weights · v`); `None` where the CPU lacks AVX512-BF16.
    pub fn from_transposed(matrix: &[u16], in_dim: usize, out_dim: usize) -> Option<Self> {
        assert_eq!(matrix.len(), in_dim * out_dim);
        Self::pack(out_dim, in_dim, |column, k| matrix[k * out_dim + column])
    }

    /// Packs the weight whose value at output `column` and inner index `k` is `value(column,
    /// k)`.
    fn pack(out_dim: usize, in_dim: usize, value: impl Fn(usize, usize) -> u16) -> Option<Self> {
        if !supported() {
            return None;
        }
        let pairs = in_dim.div_ceil(2);
        let panels = out_dim.div_ceil(PANEL);
        let mut lines = vec![Line([0; PANEL]); panels * pairs * 2];
        for (panel, panel_lines) in lines.chunks_mut(pairs * 2).enumerate() {
            for (pair, half_lines) in panel_lines.chunks_mut(2).enumerate() {
                for (half, line) in half_lines.iter_mut().enumerate() {
                    for lane in 0..16 {
                        let column = panel * PANEL + half * 16 + lane;
                        if column >= out_dim {
                            break;
                        }
                        for step in 0..2 {
                            let k = 2 * pair + step;
                            if k < in_dim {
                                line.0[2 * lane + step] = value(column, k);
                            }
                        }
                    }
                }
            }
        }
        Some(Self {
            lines,
            out_dim,
            in_dim,
        })
    }

    /// `(out_dim, in_dim)` of the weight.
    pub fn dims(&self) -> (usize, usize) {
        (self.out_dim, self.in_dim)
    }

    /// The row stride, in bf16 values, that [`Self::accumulate_product`] wants its input in:
    /// `in_dim` rounded up to even.
    pub fn input_stride(&self) -> usize {
        self.in_dim.div_ceil(2) * 2
    }

    /// `out (rows, out_dim) += x (rows, in_dim) · Wᵀ`, with `x` already in bf16 at
    /// [`Self::input_stride`] values per row (an odd `in_dim`'s last value padded with 0).
    /// Panels are shared out over rayon's threads.
    pub fn accumulate_product(&self, out: &mut [f32], x: &[u16], rows: usize) {
        self.check_extents(out, x, rows);
        let panels = self.out_dim.div_ceil(PANEL);
        let out_ptr = SendPtr(out.as_mut_ptr());
        let threads = rayon::current_num_threads().max(1);
        // Contiguous runs of panels per task: enough tasks to balance, few enough to keep
        // rayon's overhead small on products of a few rows.
        let per_task = panels.div_ceil(threads * 2).max(1);
        (0..panels.div_ceil(per_task))
            .into_par_iter()
            .for_each(|task| {
                let first = task * per_task;
                // SAFETY: extents checked above; tasks take disjoint runs of panels, so
                // they write disjoint columns of `out`.
                unsafe { self.panels(&out_ptr, x, rows, first..(first + per_task).min(panels)) }
            });
    }

    /// [`Self::accumulate_product`] on the calling thread alone: for a product that is
    /// one of many run in parallel (attention's, one per image and head).
    pub fn accumulate_product_here(&self, out: &mut [f32], x: &[u16], rows: usize) {
        self.check_extents(out, x, rows);
        let panels = self.out_dim.div_ceil(PANEL);
        // SAFETY: extents checked above.
        unsafe { self.panels(&SendPtr(out.as_mut_ptr()), x, rows, 0..panels) }
    }

    fn check_extents(&self, out: &[f32], x: &[u16], rows: usize) {
        assert_eq!(x.len(), rows * self.input_stride());
        assert_eq!(out.len(), rows * self.out_dim);
    }

    /// The product for the output columns of `panels`.
    ///
    /// # Safety
    /// `out` points at `rows × out_dim` values and `x` holds `rows × input_stride` values;
    /// nothing else writes those columns of `out` meanwhile.
    unsafe fn panels(&self, out: &SendPtr, x: &[u16], rows: usize, panels: std::ops::Range<usize>) {
        let stride = self.input_stride();
        let pairs = stride / 2;
        // A block of the inner dimension, then a run of rows: that slice of `x` stays in the
        // L2 cache while every panel passes over it, and each panel's slice in the L1 cache
        // while the run's row blocks pass over it.
        for block in (0..pairs).step_by(PAIRS_PER_BLOCK) {
            let block_pairs = (pairs - block).min(PAIRS_PER_BLOCK);
            for run in (0..rows).step_by(ROWS_PER_RUN) {
                let run_end = (run + ROWS_PER_RUN).min(rows);
                for panel in panels.clone() {
                    let columns = (self.out_dim - panel * PANEL).min(PANEL);
                    let b = self.lines[(panel * pairs + block) * 2..].as_ptr() as *const u16;
                    for row in (run..run_end).step_by(ROWS) {
                        let block_rows = (run_end - row).min(ROWS);
                        // SAFETY: `a` has block_rows rows of `stride` values from `row`,
                        // block_pairs pairs from `block`; `b` has block_pairs × 2 lines of
                        // this panel; the output tile is rows row.., columns panel ×
                        // PANEL.. (masked to `columns`), which the caller leaves to this
                        // call.
                        unsafe {
                            let a = x.as_ptr().add(row * stride + block * 2);
                            let c = out.0.add(row * self.out_dim + panel * PANEL);
                            tile(
                                block_rows,
                                a,
                                stride,
                                b,
                                block_pairs,
                                c,
                                self.out_dim,
                                columns,
                            );
                        }
                    }
                }
            }
        }
    }
}

/// A `(rows, depth)` matrix rounded to bf16 as the left-hand side of `C (rows × width) += A ·
/// B`, `B` packed per product ([`Bf16Panels`]): a convolution's filter, whose output rows
/// are the output channels' planes of pixels as they lie in memory (NCHW), so neither side
/// is transposed. Register blocks are [`ROWS`] rows of `A` by a panel of `B`, as in
/// [`PackedBf16Weight`]'s product with the roles of the two sides swapped.
pub struct Bf16LeftHand {
    /// Row-major, [`Self::stride`] values a row, an odd depth's last value padded with 0.
    values: Vec<u16>,
    rows: usize,
    depth: usize,
}

impl Bf16LeftHand {
    /// `A` from row-major f32 values, rounded to bf16; `None` where the CPU lacks
    /// AVX512-BF16.
    pub fn new(values: &[f32], rows: usize, depth: usize) -> Option<Self> {
        assert_eq!(values.len(), rows * depth);
        if !supported() || depth == 0 {
            return None;
        }
        let stride = depth.div_ceil(2) * 2;
        let mut rounded = vec![0u16; rows * stride];
        for (row, out) in values
            .chunks_exact(depth)
            .zip(rounded.chunks_exact_mut(stride))
        {
            crate::model::kernels::cpu_kernels::round_to_bf16(row, &mut out[..depth]);
        }
        Some(Self {
            values: rounded,
            rows,
            depth,
        })
    }

    /// `(rows, depth)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.rows, self.depth)
    }

    fn stride(&self) -> usize {
        self.depth.div_ceil(2) * 2
    }

    /// `C += A · B` for `B` in `panels` (packed at this depth): `C`'s row `r` is the
    /// `panels.width()` values from `c + r · ldc`.
    ///
    /// # Safety
    /// `c` points at `rows` rows of `panels.width()` values, `ldc` apart, that nothing else
    /// reads or writes meanwhile.
    pub unsafe fn accumulate(&self, panels: &Bf16Panels, c: *mut f32, ldc: usize) {
        assert_eq!(panels.depth, self.depth, "panels packed for another depth");
        let (stride, pairs, width) = (self.stride(), panels.pairs(), panels.width);
        // A block of the depth, then a group of rows: that slice of `A` and the block's
        // slice of every panel stay in the L2 cache while the panels pass, each panel's
        // slice in the L1 cache while the group's register blocks pass over it.
        for block in (0..pairs).step_by(PAIRS_PER_BLOCK) {
            let block_pairs = (pairs - block).min(PAIRS_PER_BLOCK);
            for group in (0..self.rows).step_by(ROWS_PER_GROUP) {
                let group_end = (group + ROWS_PER_GROUP).min(self.rows);
                for panel in 0..width.div_ceil(PANEL) {
                    let columns = (width - panel * PANEL).min(PANEL);
                    let b = panels.lines[(panel * pairs + block) * 2..].as_ptr() as *const u16;
                    for row in (group..group_end).step_by(ROWS) {
                        let block_rows = (group_end - row).min(ROWS);
                        // SAFETY: `a` holds block_rows rows of `stride` values from
                        // `row` and block_pairs pairs from `block`; `b` this panel's
                        // block_pairs × 2 lines from `block`; the output tile is inside
                        // `c`, as the caller promises, masked to `columns`.
                        unsafe {
                            let a = self.values.as_ptr().add(row * stride + block * 2);
                            let c = c.add(row * ldc + panel * PANEL);
                            tile(block_rows, a, stride, b, block_pairs, c, ldc, columns);
                        }
                    }
                }
            }
        }
    }
}

/// The right-hand side `B (depth × width)` of a [`Bf16LeftHand`]'s product, in panels of
/// [`PANEL`] columns whose values come in pairs along the depth (a zero pair past an odd
/// depth, zero columns past the width). A buffer reused from product to product.
#[derive(Default)]
pub struct Bf16Panels {
    lines: Vec<Line>,
    depth: usize,
    width: usize,
}

impl Bf16Panels {
    fn pairs(&self) -> usize {
        self.depth.div_ceil(2)
    }

    /// Room for `depth × width`, every line zeroed only where it is new (packing writes
    /// every line of a panel).
    fn resize(&mut self, depth: usize, width: usize) {
        self.depth = depth;
        self.width = width;
        let lines = width.div_ceil(PANEL) * depth.div_ceil(2) * 2;
        self.lines.resize(lines, Line([0; PANEL]));
    }

    /// Packs `depth` rows of `width` values, `ldb` apart in `values`: f32 rounded to bf16
    /// (to nearest, ties to even, as [`round_to_bf16`](super::cpu_kernels::round_to_bf16)),
    /// bf16 bit patterns as they are.
    pub fn pack<T: PanelValue>(&mut self, values: &[T], ldb: usize, depth: usize, width: usize) {
        self.pack_rows_at(values, |row| row * ldb, depth, width)
    }

    /// As [`Self::pack`], row `k` of `B` being the `width` values from `values[start(k)]`:
    /// a shifted convolution's rows, each an input channel's plane at a kernel position's
    /// offset.
    pub fn pack_rows_at<T: PanelValue>(
        &mut self,
        values: &[T],
        start: impl Fn(usize) -> usize,
        depth: usize,
        width: usize,
    ) {
        assert!(supported() && depth > 0 && width > 0);
        assert!((0..depth).all(|row| start(row) + width <= values.len()));
        self.resize(depth, width);
        // SAFETY: the CPU was checked above, and every row's extent in `values`.
        unsafe { pack_rows(&mut self.lines, values.as_ptr(), start, depth, width) }
    }
}

/// A type [`Bf16Panels`] packs: f32, or bf16 as its bit pattern.
pub trait PanelValue: Copy {
    /// 16 values from `at` (`lanes` of them, the rest 0) as bf16 bit patterns in the low
    /// halves of 32-bit lanes.
    ///
    /// # Safety
    /// `at` holds the `lanes` values, and the CPU has AVX512-BF16 (the caller is compiled
    /// for it).
    unsafe fn load16(at: *const Self, lanes: u16) -> __m512i;
}

impl PanelValue for f32 {
    #[inline(always)]
    unsafe fn load16(at: *const Self, lanes: u16) -> __m512i {
        // SAFETY: as the caller promises; masked lanes are not read.
        unsafe {
            let loaded = _mm512_maskz_loadu_ps(lanes, at);
            let rounded: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(loaded));
            _mm512_cvtepu16_epi32(rounded)
        }
    }
}

impl PanelValue for u16 {
    #[inline(always)]
    unsafe fn load16(at: *const Self, lanes: u16) -> __m512i {
        // SAFETY: as the caller promises; masked lanes are not read.
        unsafe { _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(lanes, at as *const i16)) }
    }
}

/// Packs `depth` rows of `width` values into `lines` (see [`Bf16Panels`]), each 16-column
/// half of a panel line by line: row `2p`'s values in the low halves of the 32-bit lanes,
/// row `2p + 1`'s in the high ones.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn pack_rows<T: PanelValue>(
    lines: &mut [Line],
    values: *const T,
    start: impl Fn(usize) -> usize,
    depth: usize,
    width: usize,
) {
    let pairs = depth.div_ceil(2);
    for panel in 0..width.div_ceil(PANEL) {
        for half in 0..2 {
            let first = panel * PANEL + half * 16;
            let lanes = ((1u32 << width.saturating_sub(first).min(16)) - 1) as u16;
            for pair in 0..pairs {
                let line = &mut lines[(panel * pairs + pair) * 2 + half];
                // SAFETY: rows 2·pair and (when inside the depth) 2·pair + 1 hold the
                // `lanes` columns from `first`, as the caller's extents say.
                unsafe {
                    let low = T::load16(values.add(start(2 * pair) + first), lanes);
                    let high = if 2 * pair + 1 < depth {
                        T::load16(values.add(start(2 * pair + 1) + first), lanes)
                    } else {
                        _mm512_setzero_si512()
                    };
                    let packed = _mm512_or_si512(low, _mm512_slli_epi32::<16>(high));
                    _mm512_store_si512(line.0.as_mut_ptr() as *mut _, packed);
                }
            }
        }
    }
}

/// A raw output pointer shared by tasks that write disjoint tiles.
struct SendPtr(*mut f32);
// SAFETY: tasks write disjoint tiles of the buffer behind it.
unsafe impl Sync for SendPtr {}

/// Dispatches a tile of `rows` (1 to [`ROWS`]) rows to its register block.
#[allow(clippy::too_many_arguments)]
unsafe fn tile(
    rows: usize,
    a: *const u16,
    lda: usize,
    b: *const u16,
    pairs: usize,
    c: *mut f32,
    ldc: usize,
    columns: usize,
) {
    // One bit per column of each 16-lane half that is inside the output.
    let lanes = |columns: usize| ((1u32 << columns.min(16)) - 1) as u16;
    let (low, high) = (lanes(columns), lanes(columns.saturating_sub(16)));
    // SAFETY: forwarded from the caller; the CPU was checked when the weight was packed.
    unsafe {
        match rows {
            1 => block::<1>(a, lda, b, pairs, c, ldc, low, high),
            2 => block::<2>(a, lda, b, pairs, c, ldc, low, high),
            3 => block::<3>(a, lda, b, pairs, c, ldc, low, high),
            4 => block::<4>(a, lda, b, pairs, c, ldc, low, high),
            5 => block::<5>(a, lda, b, pairs, c, ldc, low, high),
            6 => block::<6>(a, lda, b, pairs, c, ldc, low, high),
            7 => block::<7>(a, lda, b, pairs, c, ldc, low, high),
            8 => block::<8>(a, lda, b, pairs, c, ldc, low, high),
            9 => block::<9>(a, lda, b, pairs, c, ldc, low, high),
            10 => block::<10>(a, lda, b, pairs, c, ldc, low, high),
            11 => block::<11>(a, lda, b, pairs, c, ldc, low, high),
            12 => block::<12>(a, lda, b, pairs, c, ldc, low, high),
            _ => unreachable!("row blocks hold 1 to {ROWS} rows"),
        }
    }
}

/// `C (R × 32) += A (R × 2·pairs) · B`, where B is `pairs` pairs of panel lines. The
/// columns past the masks are neither read nor written.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn block<const R: usize>(
    a: *const u16,
    lda: usize,
    b: *const u16,
    pairs: usize,
    c: *mut f32,
    ldc: usize,
    low: u16,
    high: u16,
) {
    // SAFETY: the caller guarantees the extents (see `accumulate_product`).
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        for (i, row) in acc.iter_mut().enumerate() {
            row[0] = _mm512_maskz_loadu_ps(low, c.add(i * ldc));
            row[1] = _mm512_maskz_loadu_ps(high, c.add(i * ldc + 16));
        }
        for pair in 0..pairs {
            let b0: __m512bh = std::mem::transmute(_mm512_load_si512(b.add(pair * 64) as *const _));
            let b1: __m512bh =
                std::mem::transmute(_mm512_load_si512(b.add(pair * 64 + 32) as *const _));
            for (i, row) in acc.iter_mut().enumerate() {
                let two = (a.add(i * lda + pair * 2) as *const i32).read_unaligned();
                let a_pair: __m512bh = std::mem::transmute(_mm512_set1_epi32(two));
                row[0] = _mm512_dpbf16_ps(row[0], a_pair, b0);
                row[1] = _mm512_dpbf16_ps(row[1], a_pair, b1);
            }
        }
        for (i, row) in acc.iter().enumerate() {
            _mm512_mask_storeu_ps(c.add(i * ldc), low, row[0]);
            _mm512_mask_storeu_ps(c.add(i * ldc + 16), high, row[1]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn widen(bits: u16) -> f64 {
        f32::from_bits(u32::from(bits) << 16) as f64
    }

    /// Small pseudo-random bf16 values (exact in f32 products), deterministic.
    fn values(count: usize, seed: &mut u64) -> Vec<u16> {
        (0..count)
            .map(|_| {
                *seed = seed
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                let v = ((*seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5;
                (v.to_bits() >> 16) as u16
            })
            .collect()
    }

    /// Every tiling edge: rows past a register block and short of one, columns short of a
    /// panel and of its first half, an odd inner dimension, and more pairs than one block.
    #[test]
    fn the_product_matches_f64_arithmetic_on_the_same_bf16_values() {
        if !supported() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        let mut seed = 7;
        for (rows, out_dim, in_dim) in [
            (1, 1, 1),
            (1, 5, 3),
            (13, 45, 70),
            (25, 33, 17),
            (12, 16, 2),
            (30, 70, 301),
        ] {
            let weight = values(out_dim * in_dim, &mut seed);
            let packed = PackedBf16Weight::new(&weight, out_dim, in_dim).expect("supported");
            let stride = packed.input_stride();
            let mut x = values(rows * stride, &mut seed);
            for row in x.chunks_mut(stride) {
                row[in_dim..].fill(0);
            }
            let start: Vec<f32> = values(rows * out_dim, &mut seed)
                .into_iter()
                .map(|b| widen(b) as f32)
                .collect();
            let mut out = start.clone();
            packed.accumulate_product(&mut out, &x, rows);
            for r in 0..rows {
                for c in 0..out_dim {
                    let expected = start[r * out_dim + c] as f64
                        + (0..in_dim)
                            .map(|k| widen(x[r * stride + k]) * widen(weight[c * in_dim + k]))
                            .sum::<f64>();
                    let got = out[r * out_dim + c] as f64;
                    assert!(
                        (got - expected).abs() < 1e-5 * (1.0 + in_dim as f64).sqrt(),
                        "{rows}x{out_dim}x{in_dim} at ({r}, {c}): {got} against {expected}"
                    );
                }
            }
        }
    }

    /// The left-hand form over every edge: rows past a register block and short of one,
    /// widths short of a panel, of its first half and past several panels, an odd depth,
    /// more pairs than one block, rows of `B` further apart than its width, and `C`'s rows
    /// further apart than the width (whose values in between stay untouched); `B` packed
    /// from f32 (rounded there) and from bf16.
    #[test]
    fn the_left_hand_product_matches_f64_arithmetic_on_the_same_bf16_values() {
        if !supported() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        let mut seed = 11;
        let mut panels = Bf16Panels::default();
        for (rows, depth, width) in [
            (1, 1, 1),
            (5, 3, 7),
            (13, 27, 45),
            (25, 17, 16),
            (12, 2, 33),
            (30, 801, 70),
        ] {
            let weight: Vec<f32> = values(rows * depth, &mut seed)
                .into_iter()
                .map(|b| widen(b) as f32)
                .collect();
            let left = Bf16LeftHand::new(&weight, rows, depth).expect("supported");
            let ldb = width + 3;
            let b = values(depth * ldb, &mut seed);
            let b_f32: Vec<f32> = b.iter().map(|&v| widen(v) as f32).collect();
            let ldc = width + 5;
            let start: Vec<f32> = values(rows * ldc, &mut seed)
                .into_iter()
                .map(|v| widen(v) as f32)
                .collect();
            for from_f32 in [false, true] {
                if from_f32 {
                    panels.pack(&b_f32, ldb, depth, width);
                } else {
                    panels.pack(&b, ldb, depth, width);
                }
                let mut out = start.clone();
                // SAFETY: `out` holds `rows` rows of `ldc` ≥ width values.
                unsafe { left.accumulate(&panels, out.as_mut_ptr(), ldc) };
                for r in 0..rows {
                    for c in 0..ldc {
                        let got = out[r * ldc + c] as f64;
                        let expected = if c < width {
                            start[r * ldc + c] as f64
                                + (0..depth)
                                    .map(|k| weight[r * depth + k] as f64 * widen(b[k * ldb + c]))
                                    .sum::<f64>()
                        } else {
                            start[r * ldc + c] as f64
                        };
                        assert!(
                            (got - expected).abs() < 1e-5 * (1.0 + depth as f64).sqrt(),
                            "{rows}x{depth}x{width} at ({r}, {c}): {got} against {expected}"
                        );
                    }
                }
            }
        }
    }

    /// f32 values are rounded to nearest, ties to even, as the project's rounding does.
    #[test]
    fn packing_f32_rounds_as_the_cpu_kernels_do() {
        if !supported() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        // Among them ties of bf16's 8-bit mantissa: 1 + 2⁻⁹ and 1 + 3·2⁻⁹.
        let ties = [1.0 + 1.0 / 512.0, 1.0 + 3.0 / 512.0];
        let values: Vec<f32> = [1.0f32, ties[0], ties[1], -3.3, 1e-3, 65504.7]
            .into_iter()
            .cycle()
            .take(2 * 40)
            .enumerate()
            .map(|(i, v)| v * (1.0 + (i / 6) as f32 * 1e-3))
            .collect();
        let mut rounded = vec![0u16; values.len()];
        crate::model::kernels::cpu_kernels::round_to_bf16(&values, &mut rounded);
        let (mut from_f32, mut from_bf16) = (Bf16Panels::default(), Bf16Panels::default());
        from_f32.pack(&values, 40, 2, 40);
        from_bf16.pack(&rounded, 40, 2, 40);
        let bits = |p: &Bf16Panels| p.lines.iter().flat_map(|l| l.0).collect::<Vec<_>>();
        assert_eq!(bits(&from_f32), bits(&from_bf16));
    }

    #[test]
    fn nothing_is_packed_where_the_cpu_lacks_the_unit() {
        assert_eq!(PackedBf16Weight::new(&[0; 6], 2, 3).is_some(), supported());
    }
}
