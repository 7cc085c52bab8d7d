//! A model output's boxes through a job's tracker: the output's `detections` (the list the
//! box models give, each `{"label", "score"?, "box": [x1, y1, x2, y2]}`) become one tracker
//! step, and each entry gets its `track_id` (a number, or `null` while its object has no
//! confirmed track). Outputs without `detections` (scores, captions, text) are left as
//! they are and do not step the tracker.

use super::{ByteTrack, Detection};
use serde_json::Value;

/// The output field the box models list their boxes in.
pub const DETECTIONS_FIELD: &str = "detections";
/// The field each detection gets.
pub const TRACK_ID_FIELD: &str = "track_id";

/// Runs `output`'s boxes through `tracker` and writes each one's `track_id`; returns
/// whether the output had boxes to track (and so whether the tracker stepped). An entry
/// without a usable box (four finite numbers) is not tracked and gets `null`.
pub fn track_output(tracker: &mut ByteTrack, output: &mut Value) -> bool {
    let Some(entries) = detections_mut(output) else {
        return false;
    };
    let read: Vec<Option<Detection>> = entries.iter().map(detection).collect();
    let boxes: Vec<Detection> = read.iter().flatten().copied().collect();
    let mut ids = tracker.update(&boxes).into_iter();
    for (entry, read) in entries.iter_mut().zip(&read) {
        set_track_id(entry, read.and_then(|_| ids.next().flatten()));
    }
    true
}

/// Gives every box of `output` a `null` `track_id` without stepping any tracker: for an
/// output that cannot be tracked in order.
pub fn leave_untracked(output: &mut Value) {
    for entry in detections_mut(output).into_iter().flatten() {
        set_track_id(entry, None);
    }
}

fn detections_mut(output: &mut Value) -> Option<&mut Vec<Value>> {
    output
        .get_mut(DETECTIONS_FIELD)
        .and_then(Value::as_array_mut)
}

fn set_track_id(entry: &mut Value, id: Option<u64>) {
    if let Some(fields) = entry.as_object_mut() {
        fields.insert(TRACK_ID_FIELD.into(), id.into());
    }
}

/// One entry's box and score, when it has a usable box.
fn detection(entry: &Value) -> Option<Detection> {
    let corners = entry.get("box")?.as_array()?;
    let mut out = [0.0; 4];
    if corners.len() != 4 {
        return None;
    }
    for (slot, v) in out.iter_mut().zip(corners) {
        *slot = v.as_f64().filter(|x| x.is_finite())?;
    }
    Some(Detection {
        corners: out,
        score: entry.get("score").and_then(Value::as_f64),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tracker::{TrackerSettings, TrackerState};
    use serde_json::json;

    fn tracker() -> ByteTrack {
        ByteTrack::new(TrackerSettings::default(), TrackerState::default())
    }

    #[test]
    fn each_detection_gets_its_track_id_and_other_outputs_are_left_alone() {
        let mut t = tracker();
        let frame = |x: f64| {
            json!({
                "detections": [
                    {"label": "cat", "score": 0.9, "box": [x, 10.0, x + 40.0, 90.0]},
                    {"label": "dog", "score": 0.8, "box": "not a box"},
                    {"label": "cat", "box": [300.0, 300.0, 340.0, 380.0]},
                ],
                "detected": ["cat", "dog"],
            })
        };
        let mut first = frame(10.0);
        assert!(track_output(&mut t, &mut first));
        let ids = |o: &Value| -> Vec<Value> {
            o["detections"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d["track_id"].clone())
                .collect()
        };
        assert_eq!(ids(&first), vec![Value::Null; 3], "not confirmed yet");
        let mut second = frame(14.0);
        track_output(&mut t, &mut second);
        // The box without a score counts as confident, as PaliGemma's do.
        assert_eq!(ids(&second), vec![json!(0), Value::Null, json!(1)]);
        assert_eq!(second["detected"], json!(["cat", "dog"]));

        let mut late = frame(12.0);
        leave_untracked(&mut late);
        assert_eq!(ids(&late), vec![Value::Null; 3]);
        assert_eq!(t.state().next_id, 2, "no step");

        let mut scores = json!({"detected": ["cat"], "phrases": []});
        let before = scores.clone();
        assert!(!track_output(&mut t, &mut scores));
        assert_eq!(scores, before);
    }

    #[test]
    fn an_empty_list_is_a_frame_without_objects() {
        let mut t = tracker();
        let mut o = json!({"detections": [{"score": 0.9, "box": [0, 0, 10, 10]}]});
        track_output(&mut t, &mut o);
        assert_eq!(t.state().tracks.len(), 1);
        assert!(track_output(&mut t, &mut json!({"detections": []})));
        assert!(
            t.state().tracks.is_empty(),
            "an unconfirmed track ends on a miss"
        );
    }
}
