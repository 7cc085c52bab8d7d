//! Plane geometry for zones and lines: containment, segment crossings, sides.

/// A point `[x, y]`, y growing downwards as in an image.
pub type Point = [f64; 2];

/// The cross product of `b - a` and `p - a`: above 0 when `p` is on the right of the way from
/// `a` to `b` as seen on screen (y down), below 0 on the left, 0 on the line.
pub fn cross(a: Point, b: Point, p: Point) -> f64 {
    (b[0] - a[0]) * (p[1] - a[1]) - (b[1] - a[1]) * (p[0] - a[0])
}

/// Whether `p` is inside `polygon` (even-odd rule; a point on an edge may fall either way).
pub fn contains(polygon: &[Point], p: Point) -> bool {
    let mut inside = false;
    let mut j = polygon.len() - 1;
    for (i, &a) in polygon.iter().enumerate() {
        let b = polygon[j];
        if (a[1] > p[1]) != (b[1] > p[1]) {
            let x = a[0] + (p[1] - a[1]) / (b[1] - a[1]) * (b[0] - a[0]);
            if p[0] < x {
                inside = !inside;
            }
        }
        j = i;
    }
    inside
}

/// Whether the closed segments `p1 p2` and `q1 q2` share a point.
pub fn segments_meet(p1: Point, p2: Point, q1: Point, q2: Point) -> bool {
    let d1 = cross(q1, q2, p1);
    let d2 = cross(q1, q2, p2);
    let d3 = cross(p1, p2, q1);
    let d4 = cross(p1, p2, q2);
    let opposite = |a: f64, b: f64| (a > 0.0 && b < 0.0) || (a < 0.0 && b > 0.0);
    if opposite(d1, d2) && opposite(d3, d4) {
        return true;
    }
    let on = |a: Point, b: Point, p: Point, d: f64| {
        d == 0.0
            && p[0] >= a[0].min(b[0])
            && p[0] <= a[0].max(b[0])
            && p[1] >= a[1].min(b[1])
            && p[1] <= a[1].max(b[1])
    };
    on(q1, q2, p1, d1) || on(q1, q2, p2, d2) || on(p1, p2, q1, d3) || on(p1, p2, q2, d4)
}

/// Whether two edges of `polygon` that are not neighbours meet, or neighbours fold back on
/// each other.
pub fn self_crossing(polygon: &[Point]) -> bool {
    let n = polygon.len();
    let edge = |i: usize| (polygon[i], polygon[(i + 1) % n]);
    for i in 0..n {
        for j in i + 1..n {
            let neighbours = j == i + 1 || (i == 0 && j == n - 1);
            let ((a1, a2), (b1, b2)) = (edge(i), edge(j));
            if !neighbours && segments_meet(a1, a2, b1, b2) {
                return true;
            }
        }
    }
    false
}

/// Twice the polygon's signed area (the shoelace sum).
pub fn doubled_area(polygon: &[Point]) -> f64 {
    let n = polygon.len();
    (0..n)
        .map(|i| {
            let (a, b) = (polygon[i], polygon[(i + 1) % n]);
            a[0] * b[1] - b[0] * a[1]
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn containment_crossings_and_sides() {
        let square = [[0.0, 0.0], [10.0, 0.0], [10.0, 10.0], [0.0, 10.0]];
        assert!(contains(&square, [5.0, 5.0]));
        assert!(!contains(&square, [15.0, 5.0]));
        assert!(!self_crossing(&square));
        let bow_tie = [[0.0, 0.0], [10.0, 10.0], [10.0, 0.0], [0.0, 10.0]];
        assert!(self_crossing(&bow_tie));
        assert_eq!(doubled_area(&square), 200.0);
        // Going right along y = 0, a point below (y > 0) is on the right.
        assert!(cross([0.0, 0.0], [1.0, 0.0], [0.0, 1.0]) > 0.0);
        assert!(segments_meet(
            [0.0, -1.0],
            [0.0, 1.0],
            [-1.0, 0.0],
            [1.0, 0.0]
        ));
        assert!(!segments_meet(
            [5.0, -1.0],
            [5.0, 1.0],
            [-1.0, 0.0],
            [1.0, 0.0]
        ));
    }
}
