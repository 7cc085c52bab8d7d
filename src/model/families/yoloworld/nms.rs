//! The reference's `non_max_suppression` for one frame (pure): each anchor takes its best
//! phrase, anchors over the confidence threshold are kept, sorted by score, and a box is
//! dropped when it overlaps a better box of the same phrase by more than the IoU threshold;
//! at most [`MAX_DETECTIONS`] remain.

/// The reference's `max_det`.
pub const MAX_DETECTIONS: usize = 300;
/// The reference's `max_nms`: at most this many candidates enter the suppression.
pub const MAX_CANDIDATES: usize = 30_000;

/// One box that survived, in input pixels.
#[derive(Clone, Debug, PartialEq)]
pub struct Kept {
    pub label: usize,
    pub score: f32,
    pub corners: [f32; 4],
}

/// One frame's head output: `values` is `(4 + phrases, anchors)` row-major (see
/// [`super::head::HeadOutput`]). Returns the kept boxes (best first) and, per phrase, the
/// best score any anchor gave it.
pub fn suppress(
    values: &[f32],
    anchors: usize,
    phrases: usize,
    confidence: f32,
    max_iou: f32,
) -> (Vec<Kept>, Vec<f32>) {
    let row = |r: usize| &values[r * anchors..(r + 1) * anchors];
    let mut best_per_phrase = vec![0f32; phrases];
    for (k, best) in best_per_phrase.iter_mut().enumerate() {
        *best = row(4 + k).iter().copied().fold(0.0, f32::max);
    }
    let (cx, cy, w, h) = (row(0), row(1), row(2), row(3));
    let mut candidates: Vec<Kept> = (0..anchors)
        .filter_map(|a| {
            // The first phrase with the highest score, as torch's max returns it.
            let (label, score) = (0..phrases).fold((0, f32::NEG_INFINITY), |(bl, bs), k| {
                let s = row(4 + k)[a];
                if s > bs { (k, s) } else { (bl, bs) }
            });
            (score > confidence).then(|| Kept {
                label,
                score,
                corners: [
                    cx[a] - w[a] / 2.0,
                    cy[a] - h[a] / 2.0,
                    cx[a] + w[a] / 2.0,
                    cy[a] + h[a] / 2.0,
                ],
            })
        })
        .collect();
    candidates.sort_by(|a, b| b.score.total_cmp(&a.score));
    candidates.truncate(MAX_CANDIDATES);
    let mut kept: Vec<Kept> = Vec::new();
    for c in candidates {
        if kept.len() == MAX_DETECTIONS {
            break;
        }
        if !kept
            .iter()
            .any(|k| k.label == c.label && iou(&k.corners, &c.corners) > max_iou)
        {
            kept.push(c);
        }
    }
    (kept, best_per_phrase)
}

fn iou(a: &[f32; 4], b: &[f32; 4]) -> f32 {
    let area = |r: &[f32; 4]| (r[2] - r[0]) * (r[3] - r[1]);
    let iw = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let ih = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = iw * ih;
    let union = area(a) + area(b) - inter;
    if union > 0.0 { inter / union } else { 0.0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Columns are anchors: `(cx, cy, w, h, score per phrase...)`.
    fn head(anchors: &[[f32; 6]]) -> Vec<f32> {
        (0..6)
            .flat_map(|r| anchors.iter().map(move |a| a[r]))
            .collect()
    }

    #[test]
    fn overlapping_boxes_of_one_phrase_keep_the_best_and_other_phrases_stay() {
        let values = head(&[
            [50.0, 50.0, 20.0, 20.0, 0.9, 0.1],
            [51.0, 50.0, 20.0, 20.0, 0.8, 0.1],
            [51.0, 51.0, 20.0, 20.0, 0.1, 0.7],
            [150.0, 50.0, 20.0, 20.0, 0.3, 0.2],
            [10.0, 10.0, 4.0, 4.0, 0.2, 0.24],
        ]);
        let (kept, best) = suppress(&values, 5, 2, 0.25, 0.7);
        let got: Vec<(usize, f32)> = kept.iter().map(|k| (k.label, k.score)).collect();
        assert_eq!(got, [(0, 0.9), (1, 0.7), (0, 0.3)]);
        assert_eq!(kept[0].corners, [40.0, 40.0, 60.0, 60.0]);
        assert_eq!(best, [0.9, 0.7]);
        // A looser IoU bound keeps the second box of phrase 0 too.
        let (kept, _) = suppress(&values, 5, 2, 0.25, 0.95);
        assert_eq!(kept.len(), 4);
    }
}
