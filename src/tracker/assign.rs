//! Matching tracks to detections: the IoU of every pair, then the assignment that maximises
//! the summed IoU over all pairs (the linear assignment problem), keeping the pairs at or
//! above a threshold.
//!
//! Pairs that do not overlap add nothing to the sum, so the problem splits into the
//! groups of tracks and detections that overlap each other, solved one by one: a crowd of
//! objects apart from each other is a hundred problems of one pair, not one of a hundred
//! by a hundred.

/// Intersection over union of two `[x1, y1, x2, y2]` boxes; 0 when the union is empty.
/// Computed in f64 and rounded to f32, as the reference's IoU matrix is.
pub fn iou(a: &[f64; 4], b: &[f64; 4]) -> f32 {
    let w = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let h = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = w * h;
    let union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter;
    if union > 0.0 {
        (inter / union) as f32
    } else {
        0.0
    }
}

/// The outcome of one association: matched `(row, column)` pairs in row order, and the
/// rows and columns left over, ascending.
#[derive(Debug, Default, PartialEq)]
pub struct Assignment {
    pub matched: Vec<(usize, usize)>,
    pub unmatched_rows: Vec<usize>,
    pub unmatched_cols: Vec<usize>,
}

/// Matches `rows` (predicted track boxes) with `cols` (detected boxes) by the greatest
/// total IoU, keeping pairs whose IoU is at least `min_iou`.
pub fn associate(rows: &[[f64; 4]], cols: &[[f64; 4]], min_iou: f64) -> Assignment {
    let (n, m) = (rows.len(), cols.len());
    let mut matrix = vec![0f32; n * m];
    for (i, r) in rows.iter().enumerate() {
        for (j, c) in cols.iter().enumerate() {
            matrix[i * m + j] = iou(r, c);
        }
    }
    // The reference compares the f32 IoU with the threshold in f32.
    let threshold = min_iou as f32;
    let mut row_taken = vec![false; n];
    let mut col_taken = vec![false; m];
    let mut matched = Vec::new();
    for (group_rows, group_cols) in groups(&matrix, n, m, threshold <= 0.0) {
        for (gi, gj) in solve(&matrix, m, &group_rows, &group_cols) {
            let (i, j) = (group_rows[gi], group_cols[gj]);
            if matrix[i * m + j] >= threshold {
                matched.push((i, j));
                row_taken[i] = true;
                col_taken[j] = true;
            }
        }
    }
    matched.sort_unstable();
    let free = |taken: &[bool]| (0..taken.len()).filter(|&k| !taken[k]).collect();
    Assignment {
        unmatched_rows: free(&row_taken),
        unmatched_cols: free(&col_taken),
        matched,
    }
}

/// The connected groups of rows and columns linked by overlapping pairs (every row and
/// column in one group when `all_pairs`, as a threshold of 0 lets any pair match). Rows
/// and columns that overlap nothing are in no group.
fn groups(matrix: &[f32], n: usize, m: usize, all_pairs: bool) -> Vec<(Vec<usize>, Vec<usize>)> {
    if all_pairs {
        return if n > 0 && m > 0 {
            vec![((0..n).collect(), (0..m).collect())]
        } else {
            Vec::new()
        };
    }
    // Union-find over rows (0..n) and columns (n..n + m).
    let mut parent: Vec<usize> = (0..n + m).collect();
    fn root(parent: &mut [usize], mut k: usize) -> usize {
        while parent[k] != k {
            parent[k] = parent[parent[k]];
            k = parent[k];
        }
        k
    }
    let mut linked = vec![false; n + m];
    for i in 0..n {
        for j in 0..m {
            if matrix[i * m + j] > 0.0 {
                let (a, b) = (root(&mut parent, i), root(&mut parent, n + j));
                parent[a] = b;
                linked[i] = true;
                linked[n + j] = true;
            }
        }
    }
    let mut by_root: Vec<Option<usize>> = vec![None; n + m];
    let mut out: Vec<(Vec<usize>, Vec<usize>)> = Vec::new();
    for k in (0..n + m).filter(|&k| linked[k]) {
        let r = root(&mut parent, k);
        let g = *by_root[r].get_or_insert_with(|| {
            out.push((Vec::new(), Vec::new()));
            out.len() - 1
        });
        if k < n {
            out[g].0.push(k);
        } else {
            out[g].1.push(k - n);
        }
    }
    out
}

/// The assignment of one group maximising its summed IoU, as `(row, column)` positions
/// within the group: every row matched when rows are fewer, else every column.
fn solve(matrix: &[f32], m: usize, rows: &[usize], cols: &[usize]) -> Vec<(usize, usize)> {
    if let ([_], [_]) = (rows, cols) {
        return vec![(0, 0)];
    }
    let value = |gi: usize, gj: usize| f64::from(matrix[rows[gi] * m + cols[gj]]);
    if rows.len() <= cols.len() {
        min_cost_assignment(rows.len(), cols.len(), |i, j| -value(i, j))
    } else {
        min_cost_assignment(cols.len(), rows.len(), |j, i| -value(i, j))
            .into_iter()
            .map(|(j, i)| (i, j))
            .collect()
    }
}

/// The Hungarian method with potentials (shortest augmenting paths), for `n <= m`: the
/// assignment of every row to a distinct column with the least total `cost`.
fn min_cost_assignment(
    n: usize,
    m: usize,
    cost: impl Fn(usize, usize) -> f64,
) -> Vec<(usize, usize)> {
    // 1-based with column 0 as the virtual start, as the textbook form has it.
    let mut u = vec![0.0; n + 1];
    let mut v = vec![0.0; m + 1];
    let mut row_of = vec![0usize; m + 1];
    let mut way = vec![0usize; m + 1];
    for i in 1..=n {
        row_of[0] = i;
        let mut j0 = 0;
        let mut min_to = vec![f64::INFINITY; m + 1];
        let mut used = vec![false; m + 1];
        loop {
            used[j0] = true;
            let i0 = row_of[j0];
            let mut delta = f64::INFINITY;
            let mut j1 = 0;
            for j in 1..=m {
                if used[j] {
                    continue;
                }
                let reduced = cost(i0 - 1, j - 1) - u[i0] - v[j];
                if reduced < min_to[j] {
                    min_to[j] = reduced;
                    way[j] = j0;
                }
                if min_to[j] < delta {
                    delta = min_to[j];
                    j1 = j;
                }
            }
            for j in 0..=m {
                if used[j] {
                    u[row_of[j]] += delta;
                    v[j] -= delta;
                } else {
                    min_to[j] -= delta;
                }
            }
            j0 = j1;
            if row_of[j0] == 0 {
                break;
            }
        }
        loop {
            let j1 = way[j0];
            row_of[j0] = row_of[j1];
            j0 = j1;
            if j0 == 0 {
                break;
            }
        }
    }
    (1..=m)
        .filter(|&j| row_of[j] != 0)
        .map(|j| (row_of[j] - 1, j - 1))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn square(x: f64, y: f64, side: f64) -> [f64; 4] {
        [x, y, x + side, y + side]
    }

    #[test]
    fn iou_of_known_pairs() {
        let a = [0.0, 0.0, 10.0, 10.0];
        assert_eq!(iou(&a, &a), 1.0);
        assert!((iou(&a, &[5.0, 5.0, 15.0, 15.0]) - 25.0 / 175.0).abs() < 1e-7);
        assert_eq!(iou(&a, &[20.0, 20.0, 30.0, 30.0]), 0.0);
        assert_eq!(iou(&[1.0, 1.0, 1.0, 1.0], &[1.0, 1.0, 1.0, 1.0]), 0.0);
    }

    /// Every assignment of rows to distinct columns, for checking the solver on small
    /// matrices.
    fn best_by_search(n: usize, m: usize, cost: &dyn Fn(usize, usize) -> f64) -> f64 {
        fn go(
            i: usize,
            n: usize,
            m: usize,
            used: &mut Vec<bool>,
            cost: &dyn Fn(usize, usize) -> f64,
        ) -> f64 {
            if i == n {
                return 0.0;
            }
            let mut best = f64::INFINITY;
            for j in 0..m {
                if !used[j] {
                    used[j] = true;
                    best = best.min(cost(i, j) + go(i + 1, n, m, used, cost));
                    used[j] = false;
                }
            }
            best
        }
        go(0, n, m, &mut vec![false; m], cost)
    }

    #[test]
    fn the_solver_finds_the_least_cost_on_small_matrices() {
        let mut seed = 12345u64;
        let mut next = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) as f64 / (1u64 << 31) as f64
        };
        for n in 1..5 {
            for m in n..6 {
                let c: Vec<f64> = (0..n * m).map(|_| next()).collect();
                let cost = |i: usize, j: usize| c[i * m + j];
                let got = min_cost_assignment(n, m, cost);
                assert_eq!(got.len(), n);
                let mut cols: Vec<usize> = got.iter().map(|p| p.1).collect();
                cols.sort_unstable();
                cols.dedup();
                assert_eq!(cols.len(), n, "distinct columns");
                let total: f64 = got.iter().map(|&(i, j)| cost(i, j)).sum();
                assert!((total - best_by_search(n, m, &cost)).abs() < 1e-12);
            }
        }
    }

    #[test]
    fn the_greatest_total_wins_over_the_greatest_pair() {
        // Track 0 overlaps both detections; track 1 only the first. Greedy would give
        // track 0 the first; the best total gives it the second.
        let tracks = [square(0.0, 0.0, 10.0), square(2.0, 0.0, 10.0)];
        let dets = [square(1.0, 0.0, 10.0), square(-4.0, 0.0, 10.0)];
        let a = associate(&tracks, &dets, 0.1);
        assert_eq!(a.matched, vec![(0, 1), (1, 0)]);
        assert!(a.unmatched_rows.is_empty() && a.unmatched_cols.is_empty());
    }

    #[test]
    fn pairs_under_the_threshold_and_lone_boxes_stay_unmatched() {
        let tracks = [
            square(0.0, 0.0, 10.0),
            square(100.0, 100.0, 10.0),
            square(300.0, 0.0, 10.0),
        ];
        let dets = [
            square(8.0, 8.0, 10.0),
            square(101.0, 100.0, 10.0),
            square(500.0, 0.0, 5.0),
        ];
        let a = associate(&tracks, &dets, 0.1);
        assert_eq!(a.matched, vec![(1, 1)]);
        assert_eq!(a.unmatched_rows, vec![0, 2]);
        assert_eq!(a.unmatched_cols, vec![0, 2]);
        let empty = associate(&[], &dets, 0.1);
        assert_eq!(empty.unmatched_cols, vec![0, 1, 2]);
    }
}
