//! A running job's pictures: the frames it holds for them until they are answered, which
//! events get one (the per-minute cap, whose window the job saves so that it holds across
//! deliveries), and when the latest annotated frame is due.
//!
//! The frames are the ones the job already has (their pixels are shared, not copied);
//! drawing and encoding happen later, off the job's loop, for the shots taken here.

use super::RateCap;
use crate::frame::Frame;
use crate::zones::Places;
use serde_json::Value;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Frames held at most: those with the model and those the scene gate is holding back.
/// Older ones are let go (an event on them gets no picture).
const HELD_FRAMES: usize = 4;

/// One picture to make: a frame, the output to draw on it, and where it goes.
#[derive(Clone, Debug)]
pub struct Shot {
    /// The snapshot names of the events it shows.
    pub names: Vec<String>,
    /// Whether it is also the job's latest frame.
    pub latest: bool,
    pub frame: Frame,
    pub output: Option<Value>,
    pub places: Arc<Places>,
}

/// A job's picture bookkeeping.
#[derive(Debug)]
pub struct Pictures {
    places: Arc<Places>,
    cap: RateCap,
    /// The cap counted a picture since its window was last taken to be saved.
    cap_changed: bool,
    /// `None` when the latest frame is off.
    interval: Option<Duration>,
    latest_at: Option<Instant>,
    frames: VecDeque<Frame>,
    shots: Vec<Shot>,
}

impl Pictures {
    /// `None` when both the event pictures (`per_minute` 0) and the latest frame
    /// (`interval` 0) are off. `taken` is the cap's window an earlier delivery saved
    /// ([`Self::take_cap`]), empty for a first one.
    pub fn new(
        per_minute: u32,
        interval: Duration,
        places: Places,
        taken: Vec<i64>,
    ) -> Option<Self> {
        (per_minute > 0 || !interval.is_zero()).then(|| Self {
            places: Arc::new(places),
            cap: RateCap::resume(per_minute, taken),
            cap_changed: false,
            interval: (!interval.is_zero()).then_some(interval),
            latest_at: None,
            frames: VecDeque::new(),
            shots: Vec::new(),
        })
    }

    /// The cap's window (when each picture of the last minute was taken, in wall-clock
    /// milliseconds) to save with the job, if it changed since the last call.
    pub fn take_cap(&mut self) -> Option<Vec<i64>> {
        std::mem::take(&mut self.cap_changed).then(|| self.cap.taken())
    }

    /// A write that was to save [`Self::take_cap`]'s window failed: it is saved again
    /// with the next.
    pub fn cap_unsaved(&mut self) {
        self.cap_changed = true;
    }

    /// Keeps a frame the job took until it is answered (a shared buffer, not a copy).
    pub fn hold(&mut self, frame: &Frame) {
        if self.frames.len() >= HELD_FRAMES {
            self.frames.pop_front();
        }
        self.frames.push_back(frame.clone());
    }

    /// Lets go of the frames up to `index` (it was answered or dropped).
    pub fn release(&mut self, index: u64) {
        self.frames.retain(|f| f.index > index);
    }

    /// Frame `index` was answered: a shot of it for the events named in `events` the cap
    /// allows, and as the latest frame when one is due (`answered` says whether the model
    /// answered it, rather than the scene gate reusing an output). `output` is called only
    /// when a shot is taken.
    pub fn answered(
        &mut self,
        index: u64,
        answered: bool,
        events: Vec<String>,
        output: impl FnOnce() -> Option<Value>,
    ) {
        let Some(at) = self.frames.iter().position(|f| f.index == index) else {
            self.release(index);
            return;
        };
        let now = Instant::now();
        let at_ms = wall_ms();
        let names: Vec<String> = events
            .into_iter()
            .filter(|_| self.cap.take(at_ms))
            .collect();
        self.cap_changed |= !names.is_empty();
        let latest = answered
            && self.interval.is_some_and(|every| {
                self.latest_at
                    .is_none_or(|at| now.duration_since(at) >= every)
            });
        if latest || !names.is_empty() {
            if latest {
                self.latest_at = Some(now);
            }
            self.shots.push(Shot {
                names,
                latest,
                frame: self.frames[at].clone(),
                output: output(),
                places: self.places.clone(),
            });
        }
        self.release(index);
    }

    /// The shots taken since the last call.
    pub fn take(&mut self) -> Vec<Shot> {
        std::mem::take(&mut self.shots)
    }
}

/// Milliseconds since the Unix epoch: the cap's clock, shared by every worker a job may
/// move to (a monotonic clock is not).
fn wall_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::zones::Units;
    use bytes::Bytes;

    fn frame(index: u64) -> Frame {
        let mut f = Frame::new(2, 2, Bytes::from(vec![0u8; 12])).unwrap();
        f.index = index;
        f
    }

    fn pictures(per_minute: u32, interval_ms: u64) -> Pictures {
        let places = Places {
            units: Units::Pixels,
            zones: Vec::new(),
            lines: Vec::new(),
        };
        Pictures::new(
            per_minute,
            Duration::from_millis(interval_ms),
            places,
            Vec::new(),
        )
        .unwrap()
    }

    #[test]
    fn events_beyond_the_cap_get_no_picture_and_frames_are_let_go() {
        let mut p = pictures(2, 0);
        for i in 0..3 {
            p.hold(&frame(i));
        }
        p.answered(0, true, vec![], || panic!("no shot, no output"));
        assert!(p.take().is_empty());
        p.answered(1, true, vec!["a".into(), "b".into(), "c".into()], || None);
        let shots = p.take();
        assert_eq!(shots.len(), 1);
        assert_eq!(shots[0].names, ["a", "b"]);
        assert_eq!(shots[0].frame.index, 1);
        assert!(!shots[0].latest);
        p.answered(2, true, vec!["d".into()], || None);
        assert!(p.take().is_empty(), "the cap is spent for this minute");
        assert!(p.frames.is_empty());
    }

    #[test]
    fn the_cap_window_is_saved_when_it_counts_and_a_taken_over_job_goes_on_from_it() {
        let mut p = pictures(2, 0);
        assert_eq!(p.take_cap(), None);
        for i in 0..3 {
            p.hold(&frame(i));
        }
        p.answered(0, true, vec![], || None);
        assert_eq!(p.take_cap(), None, "no picture counted");
        p.answered(1, true, vec!["a".into(), "b".into()], || None);
        let window = p.take_cap().expect("two pictures counted");
        assert_eq!(window.len(), 2);
        assert_eq!(p.take_cap(), None, "saved once");
        p.cap_unsaved();
        assert_eq!(p.take_cap().as_deref(), Some(&window[..]));
        // The next delivery, within the minute: the cap is spent.
        let places = p.places.as_ref().clone();
        let mut next = Pictures::new(2, Duration::ZERO, places, window).unwrap();
        next.hold(&frame(5));
        next.answered(5, true, vec!["c".into()], || None);
        assert!(next.take().is_empty());
        assert_eq!(next.take_cap(), None);
    }

    #[test]
    fn the_latest_frame_comes_at_most_once_per_interval_and_only_when_answered() {
        let mut p = pictures(0, 60_000);
        for i in 0..3 {
            p.hold(&frame(i));
        }
        p.answered(0, false, vec![], || None);
        p.answered(1, true, vec![], || None);
        p.answered(2, true, vec![], || None);
        let shots = p.take();
        assert_eq!(shots.len(), 1);
        assert!(shots[0].latest && shots[0].frame.index == 1);
    }

    #[test]
    fn held_frames_are_bounded_and_everything_off_holds_nothing() {
        let mut p = pictures(1, 0);
        for i in 0..20 {
            p.hold(&frame(i));
        }
        assert_eq!(p.frames.len(), HELD_FRAMES);
        let places = pictures(1, 0).places.as_ref().clone();
        assert!(Pictures::new(0, Duration::ZERO, places, Vec::new()).is_none());
    }
}
