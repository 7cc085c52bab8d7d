//! Frame-rate sampling by timestamp: decides which frames of a stream to keep so a job sees
//! at most its `fps`, whatever rate, jitter, bursts or gaps the producer has.
//!
//! Pure: no Redis, no async, no I/O. Slots lie on a fixed grid (`first + k / fps`), so the
//! kept rate does not drift below `fps` when frames arrive slightly after a slot opens, and
//! a burst can fill each slot at most once.

/// Keeps at most one frame per `1 / fps` slot of capture time.
#[derive(Clone, Debug)]
pub struct Sampler {
    interval_ms: f64,
    /// The start of the next open slot, once a frame was kept.
    next_due: Option<f64>,
    /// Capture time of the last kept frame.
    last_kept: Option<f64>,
}

/// A backwards jump of the clock larger than this (and than two intervals) restarts the grid:
/// a producer that restarted with an older clock must not be starved until it catches up.
const CLOCK_RESET_MS: f64 = 10_000.0;

impl Sampler {
    /// A sampler for `fps` frames per second. `fps` must be finite and above zero (job
    /// specs are validated before they get here).
    pub fn new(fps: f64) -> Self {
        assert!(fps.is_finite() && fps > 0.0, "fps must be above zero");
        Self {
            interval_ms: 1000.0 / fps,
            next_due: None,
            last_kept: None,
        }
    }

    /// The slot length in milliseconds.
    pub fn interval_ms(&self) -> f64 {
        self.interval_ms
    }

    /// Offers a frame captured at `ts_ms`; true when it should be kept.
    pub fn offer(&mut self, ts_ms: i64) -> bool {
        let ts = ts_ms as f64;
        let Some(due) = self.next_due else {
            return self.keep(ts, ts + self.interval_ms);
        };
        if ts >= due {
            // Stay on the grid unless the stream had a gap of more than one slot; then the
            // grid restarts at this frame (no catch-up burst after a gap).
            let next = if ts < due + self.interval_ms {
                due + self.interval_ms
            } else {
                ts + self.interval_ms
            };
            return self.keep(ts, next);
        }
        let last = self.last_kept.unwrap_or(ts);
        if ts < last - CLOCK_RESET_MS.max(2.0 * self.interval_ms) {
            return self.keep(ts, ts + self.interval_ms);
        }
        false
    }

    fn keep(&mut self, ts: f64, next_due: f64) -> bool {
        self.last_kept = Some(ts);
        self.next_due = Some(next_due);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kept(fps: f64, ts: &[i64]) -> Vec<i64> {
        let mut s = Sampler::new(fps);
        ts.iter().copied().filter(|t| s.offer(*t)).collect()
    }

    /// Kept frames spanning `w` ms number at most `ceil(w * fps / 1000) + 1`: one per slot,
    /// and the first and last may sit at opposite ends of their slots.
    fn assert_never_more_than_asked(fps: f64, kept: &[i64]) {
        let interval = 1000.0 / fps;
        for (i, a) in kept.iter().enumerate() {
            for (j, b) in kept.iter().enumerate().skip(i) {
                let span = (b - a) as f64;
                let allowed = (span / interval).ceil() as usize + 1;
                assert!(
                    j - i < allowed,
                    "{} frames kept within {span} ms at {fps} fps",
                    j - i + 1
                );
            }
        }
    }

    #[test]
    fn constant_rate_is_thinned_to_the_asked_rate_without_drift() {
        // 30 fps for 10 s at 2 fps: 20 frames, one per half second.
        let ts: Vec<i64> = (0..300)
            .map(|i| (i as f64 * 1000.0 / 30.0).round() as i64)
            .collect();
        let k = kept(2.0, &ts);
        assert_eq!(k.len(), 20);
        for (n, t) in k.iter().enumerate() {
            let slot = n as i64 * 500;
            assert!(
                *t >= slot && *t < slot + 34,
                "frame {n} at {t} is late for slot {slot}"
            );
        }
        assert_never_more_than_asked(2.0, &k);
    }

    #[test]
    fn a_slower_stream_than_asked_keeps_every_frame() {
        let ts: Vec<i64> = (0..50).map(|i| i * 1000).collect();
        assert_eq!(kept(5.0, &ts), ts);
    }

    #[test]
    fn irregular_timestamps_keep_one_per_slot_and_never_starve() {
        // Jitter of up to 40% of the source interval around 25 fps.
        let mut t = 0.0f64;
        let mut ts = Vec::new();
        let mut x: u64 = 7;
        for _ in 0..1000 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let jitter = ((x >> 33) % 33) as f64 - 16.0;
            t += 40.0 + jitter;
            ts.push(t as i64);
        }
        let k = kept(4.0, &ts);
        let span_s = (ts[ts.len() - 1] - ts[0]) as f64 / 1000.0;
        let expected = span_s * 4.0;
        assert!(
            (k.len() as f64 - expected).abs() <= 2.0,
            "{} kept, expected ~{expected}",
            k.len()
        );
        assert_never_more_than_asked(4.0, &k);
        // Never starving: no gap between kept frames much longer than one interval plus the
        // largest source gap.
        for w in k.windows(2) {
            assert!(w[1] - w[0] <= 250 + 56, "gap {} ms", w[1] - w[0]);
        }
    }

    #[test]
    fn bursts_do_not_exceed_the_rate() {
        // Ten frames with the same timestamp, then ten 1 ms apart, every second.
        let mut ts = Vec::new();
        for s in 0..10 {
            let base = s * 1000;
            ts.extend(std::iter::repeat_n(base, 10));
            ts.extend((0..10).map(|i| base + 500 + i));
        }
        let k = kept(2.0, &ts);
        assert_eq!(k.len(), 20, "{k:?}");
        assert_never_more_than_asked(2.0, &k);
        let mut dedup = k.clone();
        dedup.dedup();
        assert_eq!(dedup.len(), k.len(), "two frames of one burst were kept");
    }

    #[test]
    fn a_gap_restarts_the_grid_without_a_catch_up_burst() {
        // 10 fps for 1 s, nothing for 5 s, then 10 fps again.
        let mut ts: Vec<i64> = (0..10).map(|i| i * 100).collect();
        ts.extend((0..10).map(|i| 6000 + 37 + i * 100));
        let k = kept(2.0, &ts);
        assert_eq!(k, vec![0, 500, 6037, 6537]);
    }

    #[test]
    fn a_clock_that_jumps_back_is_followed_not_starved() {
        let mut ts: Vec<i64> = (0..20).map(|i| 100_000 + i * 100).collect();
        ts.extend((0..20).map(|i| 1_000 + i * 100));
        let k = kept(1.0, &ts);
        assert_eq!(k, vec![100_000, 101_000, 1_000, 2_000]);
        // A small step back (reordering) is simply skipped.
        assert_eq!(kept(1.0, &[0, 1000, 900, 2000]), vec![0, 1000, 2000]);
    }
}
