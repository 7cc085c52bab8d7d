//! The tracker against Roboflow's `ByteTrackTracker` on recorded detection sequences
//! (tests/parity/bytetrack.json, written by scripts/parity/make_bytetrack_parity.py):
//! every box must get the same track as the reference gave it, up to renaming the ids, and
//! in fact the very same ids, since both count them from 0 in the order tracks are
//! confirmed; and after every frame the same confirmed tracks must be alive, their filtered
//! boxes within 1e-3 px of the reference's (which checks the Kalman filter itself, not only
//! the ids it leads to).

use super::{ByteTrack, Detection, TrackerSettings, TrackerState};
use serde::Deserialize;
use std::collections::HashMap;
use std::path::PathBuf;

#[derive(Deserialize)]
struct Fixture {
    sequences: Vec<Sequence>,
}

#[derive(Deserialize)]
struct Sequence {
    name: String,
    params: Params,
    frames: Vec<RecordedFrame>,
}

#[derive(Deserialize)]
struct Params {
    lost_track_buffer: u32,
    frame_rate: f64,
    track_activation_threshold: f64,
    minimum_consecutive_frames: u32,
    minimum_iou_threshold: f64,
    high_conf_det_threshold: f64,
}

#[derive(Deserialize)]
struct RecordedFrame {
    boxes: Vec<[f64; 4]>,
    scores: Option<Vec<f64>>,
    track_ids: Vec<Option<u64>>,
    /// The confirmed tracks alive after the frame: `[id, x1, y1, x2, y2]`.
    tracks: Vec<[f64; 5]>,
}

fn fixture() -> Fixture {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/parity/bytetrack.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    serde_json::from_str(&text).expect("the fixture parses")
}

fn settings(p: &Params) -> TrackerSettings {
    TrackerSettings {
        lost_track_buffer: p.lost_track_buffer,
        frame_rate: p.frame_rate,
        track_activation_threshold: p.track_activation_threshold,
        minimum_consecutive_frames: p.minimum_consecutive_frames,
        minimum_iou_threshold: p.minimum_iou_threshold,
        high_conf_det_threshold: p.high_conf_det_threshold,
    }
}

/// The ids the project's tracker gives each frame's boxes; checks the confirmed tracks
/// after each frame against the reference's on the way.
fn run(seq: &Sequence) -> Vec<Vec<Option<u64>>> {
    let mut tracker = ByteTrack::new(settings(&seq.params), TrackerState::default());
    seq.frames
        .iter()
        .enumerate()
        .map(|(n, f)| {
            let dets: Vec<Detection> = f
                .boxes
                .iter()
                .enumerate()
                .map(|(i, b)| Detection {
                    corners: *b,
                    score: f.scores.as_ref().map(|s| s[i]),
                })
                .collect();
            let ids = tracker.update(&dets);
            check_tracks(&format!("{} frame {n}", seq.name), &tracker, &f.tracks);
            ids
        })
        .collect()
}

/// The tracker's confirmed tracks, in its order, against the reference's.
fn check_tracks(at: &str, tracker: &ByteTrack, want: &[[f64; 5]]) {
    let ours: Vec<(u64, [f64; 4])> = tracker
        .state
        .tracks
        .iter()
        .filter_map(|t| Some((t.id?, t.filter.corners())))
        .collect();
    assert_eq!(ours.len(), want.len(), "{at}: confirmed tracks {ours:?}");
    for ((id, corners), reference) in ours.iter().zip(want) {
        assert_eq!(*id as f64, reference[0], "{at}");
        let close = corners
            .iter()
            .zip(&reference[1..])
            .all(|(got, want)| (got - want).abs() < 1e-3);
        assert!(
            close,
            "{at}: track {id} at {corners:?}, reference {reference:?}"
        );
    }
}

#[test]
fn the_fixture_covers_the_cases_it_names() {
    let fixture = fixture();
    let names: Vec<&str> = fixture.sequences.iter().map(|s| s.name.as_str()).collect();
    for wanted in [
        "crossing",
        "stop_and_go",
        "vanish",
        "two_fps",
        "no_scores",
        "params",
    ] {
        assert!(names.contains(&wanted), "{wanted} in {names:?}");
    }
    for seq in &fixture.sequences {
        let tracked = seq
            .frames
            .iter()
            .flat_map(|f| &f.track_ids)
            .flatten()
            .count();
        assert!(
            tracked > 20,
            "{}: the reference tracked something",
            seq.name
        );
    }
}

#[test]
fn every_box_gets_the_reference_track() {
    for seq in &fixture().sequences {
        let ours = run(seq);
        // Up to renaming: one of our ids for each of theirs, and the other way round.
        let mut theirs_to_ours: HashMap<u64, u64> = HashMap::new();
        let mut ours_to_theirs: HashMap<u64, u64> = HashMap::new();
        for (n, (frame, got)) in seq.frames.iter().zip(&ours).enumerate() {
            for (d, (want, got)) in frame.track_ids.iter().zip(got).enumerate() {
                let at = format!("{} frame {n} box {d}", seq.name);
                match (want, got) {
                    (None, None) => {}
                    (Some(w), Some(g)) => {
                        assert_eq!(*theirs_to_ours.entry(*w).or_insert(*g), *g, "{at}");
                        assert_eq!(*ours_to_theirs.entry(*g).or_insert(*w), *w, "{at}");
                    }
                    _ => panic!("{at}: reference {want:?}, ours {got:?}"),
                }
            }
        }
        let renamed = theirs_to_ours.iter().filter(|(w, g)| w != g).count();
        assert_eq!(renamed, 0, "{}: the very same ids", seq.name);
    }
}
