//! Object tracks from per-frame boxes (pure): ByteTrack, with the semantics, parameters and
//! defaults of Roboflow's `ByteTrackTracker` (the `trackers` package, 2.x, fixed-rate mode),
//! so that a job gives the same track ids as that tracker on the same boxes
//! (`tests/parity/bytetrack.json` holds its ids on recorded sequences, which the `parity`
//! tests check).
//!
//! Each step (one frame's boxes):
//! 1. every track's box moves one frame along its constant-velocity Kalman filter
//!    (`kalman`);
//! 2. boxes scoring at least `high_conf_det_threshold` are matched to all tracks, by the
//!    assignment of greatest total IoU, pairs under `minimum_iou_threshold` left apart
//!    (`assign`);
//! 3. the low-scoring boxes are matched the same way to the tracks still unmatched (this is
//!    what keeps an object through a few frames of poor scores);
//! 4. high boxes left over that score at least `track_activation_threshold` start tracks;
//! 5. a track gets its id once matched on `minimum_consecutive_frames` frames in a row, and
//!    keeps it through up to `lost_track_buffer` missed frames (in frames at 30 FPS,
//!    scaled to the job's `frame_rate`); a track short of that many matches is dropped on
//!    its first miss.
//!
//! Boxes of unconfirmed tracks and low boxes that match nothing get no id (the reference's
//! -1). Ids count from 0 in the order tracks are confirmed, never reused within a tracker.
//! A box without a score counts as fully confident, as in the reference.
//!
//! The whole state ([`TrackerState`]) is plain data, saved with the job so that another
//! worker taking the job over keeps its ids.

mod assign;
mod kalman;
pub mod output;
#[cfg(test)]
mod parity;

use kalman::BoxFilter;
use serde::{Deserialize, Serialize};

/// The tracker's parameters, named and defaulted as in the reference.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TrackerSettings {
    /// How many frames at 30 FPS a lost track is kept for (0: dropped on its first miss).
    pub lost_track_buffer: u32,
    /// The stream's frames per second, which scales `lost_track_buffer`.
    pub frame_rate: f64,
    /// The least score of a box that may start a track.
    pub track_activation_threshold: f64,
    /// Frames in a row a track must be matched on before it gets its id.
    pub minimum_consecutive_frames: u32,
    /// The least IoU of a track's predicted box and a box for them to match.
    pub minimum_iou_threshold: f64,
    /// Boxes scoring at least this are matched first; the others only to the tracks left.
    pub high_conf_det_threshold: f64,
}

impl Default for TrackerSettings {
    fn default() -> Self {
        Self {
            lost_track_buffer: 30,
            frame_rate: 30.0,
            track_activation_threshold: 0.7,
            minimum_consecutive_frames: 2,
            minimum_iou_threshold: 0.1,
            high_conf_det_threshold: 0.6,
        }
    }
}

impl TrackerSettings {
    /// The defaults, at a stream's frame rate (a rate that is not a positive number keeps
    /// the default 30).
    pub fn at_fps(fps: f64) -> Self {
        let default = Self::default();
        Self {
            frame_rate: if fps.is_finite() && fps > 0.0 {
                fps
            } else {
                default.frame_rate
            },
            ..default
        }
    }

    /// The most frames in a row a confirmed track may go unmatched and live: the buffer
    /// scaled to the frame rate, rounded up, at least 1 unless the buffer is 0.
    pub fn max_missed_frames(&self) -> u32 {
        if self.lost_track_buffer == 0 {
            return 0;
        }
        let scaled = (self.frame_rate / 30.0 * f64::from(self.lost_track_buffer)).ceil();
        scaled.clamp(1.0, f64::from(u32::MAX)) as u32
    }
}

/// One detected box of a frame.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Detection {
    /// `[x1, y1, x2, y2]`, finite.
    pub corners: [f64; 4],
    /// The model's score; `None` counts as 1.
    pub score: Option<f64>,
}

impl Detection {
    fn score(&self) -> f64 {
        self.score.unwrap_or(1.0)
    }
}

/// One object being followed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Track {
    /// Given once the track is confirmed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    id: Option<u64>,
    #[serde(flatten)]
    filter: BoxFilter,
    /// Frames since it was last matched.
    misses: u32,
    /// Frames in a row it was matched on (0 after a miss).
    streak: u32,
}

impl Track {
    fn new(corners: [f64; 4]) -> Self {
        Self {
            id: None,
            filter: BoxFilter::new(corners),
            misses: 0,
            // The box that starts a track counts as its first match.
            streak: 1,
        }
    }

    fn predict(&mut self) {
        self.filter.predict();
        if self.misses > 0 {
            self.streak = 0;
        }
        self.misses += 1;
    }
}

/// Everything a tracker carries from frame to frame, saved with the job.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TrackerState {
    /// The id the next confirmed track gets.
    next_id: u64,
    tracks: Vec<Track>,
}

impl TrackerState {
    /// Whether the numbers are ones a tracker can go on from (a saved state read back
    /// could hold anything).
    pub fn is_sound(&self) -> bool {
        self.tracks
            .iter()
            .all(|t| t.filter.is_finite() && t.id.is_none_or(|id| id < self.next_id))
    }
}

/// A ByteTrack tracker: its parameters and its state.
#[derive(Clone, Debug)]
pub struct ByteTrack {
    settings: TrackerSettings,
    max_missed: u32,
    state: TrackerState,
}

impl ByteTrack {
    /// A tracker going on from `state` (the default state for a new one).
    pub fn new(settings: TrackerSettings, state: TrackerState) -> Self {
        Self {
            max_missed: settings.max_missed_frames(),
            settings,
            state,
        }
    }

    pub fn state(&self) -> &TrackerState {
        &self.state
    }

    /// Takes one frame's boxes; returns each box's track id (`None`: no confirmed track).
    pub fn update(&mut self, detections: &[Detection]) -> Vec<Option<u64>> {
        let mut ids = vec![None; detections.len()];
        if self.state.tracks.is_empty() && detections.is_empty() {
            return ids;
        }
        for track in &mut self.state.tracks {
            track.predict();
        }
        let predicted: Vec<[f64; 4]> = self
            .state
            .tracks
            .iter()
            .map(|t| t.filter.corners())
            .collect();
        let s = self.settings;
        let (high, low): (Vec<usize>, Vec<usize>) = (0..detections.len())
            .partition(|&d| detections[d].score() >= s.high_conf_det_threshold);
        let boxes = |subset: &[usize]| -> Vec<[f64; 4]> {
            subset.iter().map(|&d| detections[d].corners).collect()
        };

        let first = assign::associate(&predicted, &boxes(&high), s.minimum_iou_threshold);
        for &(t, h) in &first.matched {
            ids[high[h]] = self.matched(t, detections[high[h]].corners);
        }
        let left: Vec<[f64; 4]> = first.unmatched_rows.iter().map(|&t| predicted[t]).collect();
        let second = assign::associate(&left, &boxes(&low), s.minimum_iou_threshold);
        for &(r, l) in &second.matched {
            ids[low[l]] = self.matched(first.unmatched_rows[r], detections[low[l]].corners);
        }
        for &h in &first.unmatched_cols {
            let d = &detections[high[h]];
            if d.score() >= s.track_activation_threshold {
                self.state.tracks.push(Track::new(d.corners));
            }
        }
        let (max_missed, min_streak) = (self.max_missed, s.minimum_consecutive_frames);
        self.state.tracks.retain(|t| {
            t.misses <= max_missed && (t.id.is_some() || t.streak >= min_streak || t.misses == 0)
        });
        ids
    }

    /// Corrects track `t` with its matched box; returns its id, given now if the track has
    /// just been matched on enough frames in a row.
    fn matched(&mut self, t: usize, corners: [f64; 4]) -> Option<u64> {
        let track = &mut self.state.tracks[t];
        track.filter.update(corners);
        track.misses = 0;
        track.streak += 1;
        if track.id.is_none() && track.streak >= self.settings.minimum_consecutive_frames {
            track.id = Some(self.state.next_id);
            self.state.next_id += 1;
        }
        track.id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn det(x: f64, y: f64, score: f64) -> Detection {
        Detection {
            corners: [x, y, x + 40.0, y + 80.0],
            score: Some(score),
        }
    }

    #[test]
    fn the_lost_buffer_scales_with_the_frame_rate() {
        let at = |buffer, fps| TrackerSettings {
            lost_track_buffer: buffer,
            ..TrackerSettings::at_fps(fps)
        };
        assert_eq!(at(30, 30.0).max_missed_frames(), 30);
        assert_eq!(at(30, 60.0).max_missed_frames(), 60);
        assert_eq!(at(3, 15.0).max_missed_frames(), 2);
        assert_eq!(at(30, 2.0).max_missed_frames(), 2);
        assert_eq!(at(1, 0.5).max_missed_frames(), 1);
        assert_eq!(at(0, 30.0).max_missed_frames(), 0);
        assert_eq!(TrackerSettings::at_fps(f64::NAN).frame_rate, 30.0);
        assert_eq!(TrackerSettings::at_fps(0.0).frame_rate, 30.0);
    }

    #[test]
    fn an_object_gets_its_id_on_its_second_frame_and_keeps_it() {
        let mut t = ByteTrack::new(TrackerSettings::default(), TrackerState::default());
        assert_eq!(t.update(&[det(10.0, 10.0, 0.9)]), vec![None]);
        for step in 1..10 {
            let x = 10.0 + 5.0 * step as f64;
            assert_eq!(t.update(&[det(x, 10.0, 0.9)]), vec![Some(0)], "step {step}");
        }
        // A low score on a known track keeps the id; on a new object it starts nothing.
        assert_eq!(
            t.update(&[det(60.0, 10.0, 0.3), det(400.0, 300.0, 0.3)]),
            vec![Some(0), None]
        );
        assert_eq!(t.state().tracks.len(), 1);
    }

    #[test]
    fn a_track_outlives_a_short_gap_but_not_its_buffer() {
        let settings = TrackerSettings::at_fps(2.0); // a buffer of 2 frames
        let mut t = ByteTrack::new(settings, TrackerState::default());
        t.update(&[det(10.0, 10.0, 0.9)]);
        assert_eq!(t.update(&[det(12.0, 10.0, 0.9)]), vec![Some(0)]);
        t.update(&[]);
        t.update(&[]);
        assert_eq!(t.update(&[det(14.0, 10.0, 0.9)]), vec![Some(0)], "2 misses");
        for _ in 0..3 {
            t.update(&[]);
        }
        assert!(t.state().tracks.is_empty(), "3 misses end it");
        t.update(&[det(14.0, 10.0, 0.9)]);
        assert_eq!(t.update(&[det(14.0, 10.0, 0.9)]), vec![Some(1)], "a new id");
    }

    #[test]
    fn a_weak_new_box_starts_no_track_and_an_unconfirmed_one_dies_on_a_miss() {
        let mut t = ByteTrack::new(TrackerSettings::default(), TrackerState::default());
        // 0.65: high enough for the first stage, under the activation threshold.
        t.update(&[det(10.0, 10.0, 0.65)]);
        assert!(t.state().tracks.is_empty());
        t.update(&[det(10.0, 10.0, 0.9)]);
        assert_eq!(t.state().tracks.len(), 1);
        t.update(&[]);
        assert!(t.state().tracks.is_empty());
    }

    #[test]
    fn the_state_round_trips_through_json_and_the_ids_go_on() {
        let mut t = ByteTrack::new(TrackerSettings::default(), TrackerState::default());
        for step in 0..3 {
            let x = 5.0 * step as f64;
            t.update(&[det(x, 0.0, 0.9), det(300.0 - x, 200.0, 0.95)]);
        }
        let json = serde_json::to_string(t.state()).unwrap();
        let state: TrackerState = serde_json::from_str(&json).unwrap();
        // serde_json's float parsing may land one ulp off; nothing else may differ.
        assert_eq!(state.next_id, t.state().next_id);
        for (read, kept) in state.tracks.iter().zip(&t.state().tracks) {
            assert_eq!(
                (read.id, read.misses, read.streak),
                (kept.id, kept.misses, kept.streak)
            );
            let (a, b) = (read.filter.corners(), kept.filter.corners());
            assert!((0..4).all(|i| (a[i] - b[i]).abs() < 1e-9), "{a:?} {b:?}");
        }
        assert!(state.is_sound());
        let mut again = ByteTrack::new(TrackerSettings::default(), state);
        assert_eq!(
            again.update(&[det(285.0, 200.0, 0.95), det(15.0, 0.0, 0.9)]),
            t.update(&[det(285.0, 200.0, 0.95), det(15.0, 0.0, 0.9)])
        );
        let bad: TrackerState =
            serde_json::from_str(r#"{"next_id":0,"tracks":[{"id":3,"box":[0,0,1,1],"velocity":[0,0,0,0],"cov":[1,0,1],"misses":0,"streak":2}]}"#)
                .unwrap();
        assert!(!bad.is_sound(), "an id the counter has not reached");
    }
}
