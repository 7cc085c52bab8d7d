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
    // The reference compares the f32 IoU with the threshold in f32.
    let threshold = min_iou as f32;
    let mut row_taken = vec![false; rows.len()];
    let mut col_taken = vec![false; cols.len()];
    let mut matched = Vec::new();
    for problem in problems(rows, cols, threshold <= 0.0) {
        for (gi, gj) in solve(&problem) {
            if problem.iou(gi, gj) >= threshold {
                let (i, j) = (problem.rows[gi], problem.cols[gj]);
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

/// One group of rows and columns to match among themselves (ascending), with the IoU of
/// each of their pairs.
struct Problem {
    rows: Vec<usize>,
    cols: Vec<usize>,
    /// `rows.len()` x `cols.len()`, row-major; 0 for the pairs that do not overlap.
    ious: Vec<f32>,
}

impl Problem {
    fn iou(&self, gi: usize, gj: usize) -> f32 {
        self.ious[gi * self.cols.len() + gj]
    }
}

/// The pairs of `rows` and `cols` that overlap (IoU above 0), with their IoU: the columns
/// sorted by left edge, each row tries only those that start within its reach, rather
/// than every pair.
fn overlapping(rows: &[[f64; 4]], cols: &[[f64; 4]]) -> Vec<(usize, usize, f32)> {
    let mut by_left: Vec<usize> = (0..cols.len()).collect();
    by_left.sort_unstable_by(|&a, &b| cols[a][0].total_cmp(&cols[b][0]));
    let widest = cols.iter().map(|c| c[2] - c[0]).fold(0.0, f64::max);
    let mut pairs = Vec::new();
    for (i, r) in rows.iter().enumerate() {
        // A column overlapping `r` ends right of r's left edge, so it starts right of
        // that edge less the widest column; and it starts left of r's right edge.
        let from = by_left.partition_point(|&j| cols[j][0] <= r[0] - widest);
        for &j in &by_left[from..] {
            if cols[j][0] >= r[2] {
                break;
            }
            let v = iou(r, &cols[j]);
            if v > 0.0 {
                pairs.push((i, j, v));
            }
        }
    }
    pairs
}

/// The connected groups of rows and columns linked by overlapping pairs (every row and
/// column in one group when `all_pairs`, as a threshold of 0 lets any pair match). Rows
/// and columns that overlap nothing are in no group. Groups come in the order of their
/// first row (or column), their rows and columns ascending.
fn problems(rows: &[[f64; 4]], cols: &[[f64; 4]], all_pairs: bool) -> Vec<Problem> {
    let (n, m) = (rows.len(), cols.len());
    if all_pairs {
        if n == 0 || m == 0 {
            return Vec::new();
        }
        let ious = rows
            .iter()
            .flat_map(|r| cols.iter().map(move |c| iou(r, c)))
            .collect();
        return vec![Problem {
            rows: (0..n).collect(),
            cols: (0..m).collect(),
            ious,
        }];
    }
    let pairs = overlapping(rows, cols);
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
    for &(i, j, _) in &pairs {
        let (a, b) = (root(&mut parent, i), root(&mut parent, n + j));
        parent[a] = b;
        linked[i] = true;
        linked[n + j] = true;
    }
    let mut by_root: Vec<Option<usize>> = vec![None; n + m];
    // Each row's and column's group and place in it.
    let mut place = vec![(0usize, 0usize); n + m];
    let mut out: Vec<Problem> = Vec::new();
    for k in (0..n + m).filter(|&k| linked[k]) {
        let r = root(&mut parent, k);
        let g = *by_root[r].get_or_insert_with(|| {
            out.push(Problem {
                rows: Vec::new(),
                cols: Vec::new(),
                ious: Vec::new(),
            });
            out.len() - 1
        });
        let members = if k < n {
            &mut out[g].rows
        } else {
            &mut out[g].cols
        };
        place[k] = (g, members.len());
        members.push(if k < n { k } else { k - n });
    }
    for p in &mut out {
        p.ious = vec![0.0; p.rows.len() * p.cols.len()];
    }
    for (i, j, v) in pairs {
        let ((g, gi), (_, gj)) = (place[i], place[n + j]);
        let p = &mut out[g];
        let width = p.cols.len();
        p.ious[gi * width + gj] = v;
    }
    out
}

/// The assignment of one group maximising its summed IoU, as `(row, column)` positions
/// within the group: every row matched when rows are fewer, else every column.
fn solve(p: &Problem) -> Vec<(usize, usize)> {
    if let ([_], [_]) = (p.rows.as_slice(), p.cols.as_slice()) {
        return vec![(0, 0)];
    }
    let value = |gi: usize, gj: usize| f64::from(p.iou(gi, gj));
    if p.rows.len() <= p.cols.len() {
        min_cost_assignment(p.rows.len(), p.cols.len(), |i, j| -value(i, j))
    } else {
        min_cost_assignment(p.cols.len(), p.rows.len(), |j, i| -value(i, j))
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
    fn the_overlapping_pairs_are_exactly_those_of_every_pair_with_an_iou() {
        let mut seed = 99u64;
        let mut next = |scale: f64| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 11) as f64 / (1u64 << 53) as f64 * scale
        };
        let mut boxes = |k: usize| -> Vec<[f64; 4]> {
            (0..k)
                .map(|_| {
                    let (x, y) = (next(500.0), next(300.0));
                    [x, y, x + next(80.0), y + next(120.0)]
                })
                .collect()
        };
        let (rows, cols) = (boxes(60), boxes(70));
        let mut every = Vec::new();
        for (i, r) in rows.iter().enumerate() {
            for (j, c) in cols.iter().enumerate() {
                let v = iou(r, c);
                if v > 0.0 {
                    every.push((i, j, v));
                }
            }
        }
        let mut found = overlapping(&rows, &cols);
        found.sort_by_key(|a| (a.0, a.1));
        assert!(every.len() > 20, "a crowded scene: {}", every.len());
        assert_eq!(found, every);
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
