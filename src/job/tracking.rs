//! The fields about a job's tracks: the `track_*` fields (the box tracker's parameters,
//! each read with its range and defaulting to the reference tracker's value, see
//! `crate::tracker`) and `zones`, `lines` and `zone_units` (see `crate::zones`).
//!
//! | field | tracker parameter | accepted | default |
//! |---|---|---|---|
//! | `track_activation_threshold` | `track_activation_threshold` | 0 to 1 | 0.7 |
//! | `track_high_threshold` | `high_conf_det_threshold` | 0 to 1 | 0.6 |
//! | `track_min_iou` | `minimum_iou_threshold` | 0 to 1 | 0.1 |
//! | `track_min_frames` | `minimum_consecutive_frames` | 1 to [`MAX_TRACK_MIN_FRAMES`] | 2 |
//! | `track_lost_buffer` | `lost_track_buffer` | 0 to [`MAX_TRACK_LOST_BUFFER`] | 30 |
//! | `track_frame_rate` | `frame_rate` | above 0, at most [`MAX_TRACK_FRAME_RATE`] | the job's `fps` |

use super::fields::EntryFields;
use super::{JobField, SpecError};
use crate::tracker::TrackerSettings;
use crate::zones::{self, Places, Units};

/// Most frames in a row `track_min_frames` may ask for before a track gets its id.
pub const MAX_TRACK_MIN_FRAMES: u32 = 1000;
/// Longest `track_lost_buffer`, in frames at 30 FPS: 10 minutes.
pub const MAX_TRACK_LOST_BUFFER: u32 = 18_000;
/// Highest `track_frame_rate`: a camera's rate may exceed the job's sampled `fps`.
pub const MAX_TRACK_FRAME_RATE: f64 = 240.0;

/// The tracker's parameters from the `track_*` fields; `fps` is the job's own rate, the
/// default frame rate.
pub(super) fn tracker_settings(
    entry: &EntryFields,
    fps: f64,
) -> Result<TrackerSettings, SpecError> {
    let defaults = TrackerSettings::at_fps(fps);
    let share = |field| {
        entry.number(field, "must be a number from 0 to 1", |x: &f64| {
            (0.0..=1.0).contains(x)
        })
    };
    Ok(TrackerSettings {
        track_activation_threshold: share(JobField::TrackActivationThreshold)?
            .unwrap_or(defaults.track_activation_threshold),
        high_conf_det_threshold: share(JobField::TrackHighThreshold)?
            .unwrap_or(defaults.high_conf_det_threshold),
        minimum_iou_threshold: share(JobField::TrackMinIou)?
            .unwrap_or(defaults.minimum_iou_threshold),
        minimum_consecutive_frames: entry
            .number(
                JobField::TrackMinFrames,
                &format!("must be a whole number from 1 to {MAX_TRACK_MIN_FRAMES}"),
                |n: &u32| (1..=MAX_TRACK_MIN_FRAMES).contains(n),
            )?
            .unwrap_or(defaults.minimum_consecutive_frames),
        lost_track_buffer: entry
            .number(
                JobField::TrackLostBuffer,
                &format!("must be a whole number of frames from 0 to {MAX_TRACK_LOST_BUFFER}"),
                |n: &u32| *n <= MAX_TRACK_LOST_BUFFER,
            )?
            .unwrap_or(defaults.lost_track_buffer),
        frame_rate: entry
            .number(
                JobField::TrackFrameRate,
                &format!("must be a number above 0, at most {MAX_TRACK_FRAME_RATE}"),
                |r: &f64| r.is_finite() && *r > 0.0 && *r <= MAX_TRACK_FRAME_RATE,
            )?
            .unwrap_or(defaults.frame_rate),
    })
}

/// The `zones`, `lines` and `zone_units` fields.
pub(super) fn places(entry: &EntryFields) -> Result<Places, SpecError> {
    let units = entry
        .parsed(
            JobField::ZoneUnits,
            "must be `pixels` or `normalised`",
            Units::parse,
        )?
        .unwrap_or_default();
    Ok(Places {
        units,
        zones: entry
            .checked(JobField::Zones, |raw| zones::parse_zones(raw, units))?
            .unwrap_or_default(),
        lines: entry
            .checked(JobField::Lines, |raw| zones::parse_lines(raw, units))?
            .unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use crate::job::JobSpec;
    use crate::tracker::TrackerSettings;

    fn parse(pairs: &[(&str, &str)]) -> Result<JobSpec, String> {
        let mut fields = vec![(b"stream_ref".to_vec(), b"frames:cam".to_vec())];
        fields.extend(
            pairs
                .iter()
                .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec())),
        );
        JobSpec::parse("1-0", &fields, 2.0, || "j".into()).map_err(|(e, _)| e.to_string())
    }

    #[test]
    fn without_track_fields_the_reference_defaults_at_the_jobs_fps() {
        let spec = parse(&[("fps", "5")]).unwrap();
        assert_eq!(spec.tracker, TrackerSettings::at_fps(5.0));
        assert_eq!(spec.tracker.track_activation_threshold, 0.7);
    }

    #[test]
    fn every_track_field_is_read() {
        let spec = parse(&[
            ("track_activation_threshold", "0.25"),
            ("track_high_threshold", " 0.2 "),
            ("track_min_iou", "0.05"),
            ("track_min_frames", "1"),
            ("track_lost_buffer", "0"),
            ("track_frame_rate", "25"),
        ])
        .unwrap();
        assert_eq!(
            spec.tracker,
            TrackerSettings {
                lost_track_buffer: 0,
                frame_rate: 25.0,
                track_activation_threshold: 0.25,
                minimum_consecutive_frames: 1,
                minimum_iou_threshold: 0.05,
                high_conf_det_threshold: 0.2,
            }
        );
        assert!(spec.warnings.is_empty(), "{:?}", spec.warnings);
    }

    #[test]
    fn a_track_field_out_of_range_is_refused_by_name() {
        let cases = [
            (
                ("track_activation_threshold", "1.5"),
                "field `track_activation_threshold`: must be a number from 0 to 1, got `1.5`",
            ),
            (
                ("track_high_threshold", "NaN"),
                "field `track_high_threshold`: must be a number from 0 to 1, got `NaN`",
            ),
            (
                ("track_min_iou", "-0.1"),
                "field `track_min_iou`: must be a number from 0 to 1, got `-0.1`",
            ),
            (
                ("track_min_frames", "0"),
                "field `track_min_frames`: must be a whole number from 1 to 1000, got `0`",
            ),
            (
                ("track_lost_buffer", "18001"),
                "field `track_lost_buffer`: must be a whole number of frames from 0 to 18000, \
                 got `18001`",
            ),
            (
                ("track_frame_rate", "0"),
                "field `track_frame_rate`: must be a number above 0, at most 240, got `0`",
            ),
        ];
        for (pair, want) in cases {
            assert_eq!(parse(&[pair]).unwrap_err(), want, "{pair:?}");
        }
    }

    #[test]
    fn zones_and_lines_are_read_in_their_units_and_refused_by_field() {
        let spec = parse(&[
            ("zones", r#"{"dock": [[0.1, 0.1], [0.5, 0.1], [0.5, 0.9]]}"#),
            ("lines", r#"{"gate": [[0.7, 0], [0.7, 1]]}"#),
            ("zone_units", "normalised"),
        ])
        .unwrap();
        assert_eq!(spec.places.units, crate::zones::Units::Normalised);
        assert_eq!(spec.places.zones[0].name, "dock");
        assert_eq!(spec.places.lines[0].to, [0.7, 1.0]);
        assert!(parse(&[]).unwrap().places.is_empty());
        let cases = [
            (
                ("zones", r#"{"a": [[0,0],[1,1]]}"#),
                "field `zones`: `a` has 2 points; a zone needs 3 to 64",
            ),
            (
                ("zones", "{"),
                "field `zones`: is not valid JSON: EOF while parsing an object at line 1 \
                 column 1",
            ),
            (
                ("lines", r#"{"l": [[3,4],[3,4]]}"#),
                "field `lines`: `l`: its two points are equal",
            ),
            (
                ("zone_units", "inches"),
                "field `zone_units`: must be `pixels` or `normalised`, got `inches`",
            ),
        ];
        for (pair, want) in cases {
            assert_eq!(parse(&[pair]).unwrap_err(), want, "{pair:?}");
        }
    }
}
