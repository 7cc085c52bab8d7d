//! A tracked model output's boxes as the zone watch's sightings: each `detections` entry
//! with a `track_id`, a `label` and a box, its anchor (bottom centre) and height in the
//! coordinates of the job's zones.

use super::Units;
use super::watch::Sighting;
use crate::tracker::output::{DETECTIONS_FIELD, TRACK_ID_FIELD};
use serde_json::Value;

/// The sightings of `output`, whose boxes are in source pixels of a `source_size` picture.
pub fn sightings(output: &Value, units: Units, source_size: (u32, u32)) -> Vec<Sighting> {
    let (sx, sy) = match units {
        Units::Pixels => (1.0, 1.0),
        Units::Normalised => (
            1.0 / f64::from(source_size.0.max(1)),
            1.0 / f64::from(source_size.1.max(1)),
        ),
    };
    let Some(entries) = output.get(DETECTIONS_FIELD).and_then(Value::as_array) else {
        return Vec::new();
    };
    entries
        .iter()
        .filter_map(|d| {
            let track_id = d.get(TRACK_ID_FIELD)?.as_u64()?;
            let label = d.get("label").and_then(Value::as_str).unwrap_or_default();
            let b = d.get("box")?.as_array()?;
            let [x1, y1, x2, y2] = [0, 1, 2, 3].map(|i| b.get(i).and_then(Value::as_f64));
            let (x1, y1, x2, y2) = (x1?, y1?, x2?, y2?);
            Some(Sighting {
                track_id,
                label: label.to_string(),
                anchor: [(x1 + x2) / 2.0 * sx, y2 * sy],
                height: (y2 - y1).abs() * sy,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn tracked_boxes_become_anchors_in_the_zones_units() {
        let out = json!({"detections": [
            {"label": "red", "score": 0.9, "box": [10.0, 20.0, 30.0, 60.0], "track_id": 4},
            {"label": "red", "score": 0.9, "box": [0.0, 0.0, 5.0, 5.0], "track_id": null},
        ]});
        let px = sightings(&out, Units::Pixels, (200, 100));
        assert_eq!(
            px,
            vec![Sighting {
                track_id: 4,
                label: "red".into(),
                anchor: [20.0, 60.0],
                height: 40.0
            }]
        );
        let norm = sightings(&out, Units::Normalised, (200, 100));
        assert_eq!((norm[0].anchor, norm[0].height), ([0.1, 0.6], 0.4));
        assert!(sightings(&json!({"detected": []}), Units::Pixels, (1, 1)).is_empty());
    }
}
