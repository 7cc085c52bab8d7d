//! The per-job cap on snapshots: at most `SNAPSHOTS_PER_MIN` in any minute, across the
//! job's deliveries (its window is saved with the job, so a job taken over goes on
//! counting where it was).

use std::collections::VecDeque;

/// The window the cap counts over.
const WINDOW_MS: i64 = 60_000;

/// At most `per_minute` snapshots in any 60 s window; an event beyond it gets none.
#[derive(Clone, Debug)]
pub struct RateCap {
    per_minute: usize,
    /// When each snapshot of the last minute was taken, oldest first.
    taken: VecDeque<i64>,
}

impl RateCap {
    pub fn new(per_minute: u32) -> Self {
        Self {
            per_minute: per_minute as usize,
            taken: VecDeque::new(),
        }
    }

    /// Goes on from `taken`, the times of the snapshots taken (a saved [`Self::taken`]).
    pub fn resume(per_minute: u32, mut taken: Vec<i64>) -> Self {
        taken.sort_unstable();
        Self {
            per_minute: per_minute as usize,
            taken: taken.into(),
        }
    }

    /// When each snapshot of the window was taken, oldest first: what a delivery taking
    /// the job over goes on from.
    pub fn taken(&self) -> Vec<i64> {
        self.taken.iter().copied().collect()
    }

    /// Whether a snapshot may be taken at `now_ms` (wall-clock milliseconds, which every
    /// worker shares); counts it if so.
    pub fn take(&mut self, now_ms: i64) -> bool {
        while self.taken.front().is_some_and(|t| now_ms - t >= WINDOW_MS) {
            self.taken.pop_front();
        }
        if self.taken.len() >= self.per_minute {
            return false;
        }
        self.taken.push_back(now_ms);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_most_the_cap_in_any_minute() {
        let mut cap = RateCap::new(3);
        let taken: Vec<bool> = [0, 10, 20, 30, 59_999].map(|t| cap.take(t)).into();
        assert_eq!(taken, [true, true, true, false, false]);
        // The first one leaves the window at 60 s, the next two at 60.01 and 60.02 s.
        assert!(cap.take(60_000));
        assert!(!cap.take(60_005));
        assert!(cap.take(60_010));
        assert!(cap.take(60_020));
        assert!(!cap.take(60_030));
    }

    #[test]
    fn a_resumed_cap_goes_on_counting_the_saved_window() {
        let mut cap = RateCap::new(2);
        assert!(cap.take(1_000) && cap.take(2_000));
        let mut next = RateCap::resume(2, cap.taken());
        assert!(!next.take(30_000), "the window saved is still full");
        assert!(next.take(61_000));
        assert_eq!(next.taken(), [2_000, 61_000]);
        assert!(RateCap::resume(1, vec![]).take(0));
    }

    #[test]
    fn a_cap_of_zero_takes_none() {
        assert!(!RateCap::new(0).take(0));
    }
}
