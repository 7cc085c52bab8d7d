//! Zones and lines over a job's tracks (pure): the job fields `zones` and `lines` parsed
//! and checked, and the watch that turns each frame's tracked boxes into `enter`, `leave`,
//! `cross` and `loiter` events and running counts (`watch`).
//!
//! - `zones`: a JSON object of name to polygon, `{"dock": [[x, y], [x, y], [x, y], ...]}`,
//!   or to `{"points": [[x, y], ...], "labels": ["person"], "loiter_s": 30}` (both keys
//!   optional: a zone without `labels` counts every label; without `loiter_s`, no `loiter`).
//! - `lines`: a JSON object of name to two points, `{"gate": [[x, y], [x, y]]}`, or to
//!   `{"points": [[x, y], [x, y]], "sides": ["south", "north"]}`: the names of the side on
//!   the left and the side on the right as seen going from the first point to the second
//!   (on screen, y down); `left` and `right` by default.
//! - `zone_units`: `pixels` (default: source pixels, 0 to [`MAX_PIXEL_COORD`]) or
//!   `normalised` (0 to 1 of the source's width and height), for both fields.
//!
//! A track's place is its anchor: the bottom centre of its box.

mod geometry;
pub mod output;
pub mod watch;

pub use geometry::Point;
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};

/// Most zones, and most lines, a job may have.
pub const MAX_PLACES: usize = 32;
/// Longest zone, line or side name, in bytes.
pub const MAX_NAME_BYTES: usize = 64;
/// Most points of a zone's polygon.
pub const MAX_POLYGON_POINTS: usize = 64;
/// Largest coordinate in source pixels.
pub const MAX_PIXEL_COORD: f64 = 65_535.0;
/// Longest `loiter_s`: a day.
pub const MAX_LOITER_S: f64 = 86_400.0;

/// What the coordinates of `zones` and `lines` are in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Units {
    #[default]
    Pixels,
    Normalised,
}

impl Units {
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "pixels" | "px" => Some(Units::Pixels),
            "normalised" | "normalized" => Some(Units::Normalised),
            _ => None,
        }
    }

    fn max(self) -> f64 {
        match self {
            Units::Pixels => MAX_PIXEL_COORD,
            Units::Normalised => 1.0,
        }
    }
}

/// A named polygon tracks enter and leave.
#[derive(Clone, Debug, PartialEq)]
pub struct Zone {
    pub name: String,
    pub polygon: Vec<Point>,
    /// The labels it counts; `None`: all.
    pub labels: Option<BTreeSet<String>>,
    /// After how long inside a track's `loiter` fires.
    pub loiter_ms: Option<i64>,
}

/// A named segment tracks cross.
#[derive(Clone, Debug, PartialEq)]
pub struct Line {
    pub name: String,
    pub from: Point,
    pub to: Point,
    /// The names of the left and the right side, going from `from` to `to`.
    pub sides: [String; 2],
}

/// A job's zones and lines, in the coordinates of their `units`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Places {
    pub units: Units,
    pub zones: Vec<Zone>,
    pub lines: Vec<Line>,
}

impl Places {
    pub fn is_empty(&self) -> bool {
        self.zones.is_empty() && self.lines.is_empty()
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum ZoneInput {
    Points(Vec<Point>),
    Full(ZoneFull),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ZoneFull {
    points: Vec<Point>,
    #[serde(default)]
    labels: Option<BTreeSet<String>>,
    #[serde(default)]
    loiter_s: Option<f64>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum LineInput {
    Points(Vec<Point>),
    Full(LineFull),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LineFull {
    points: Vec<Point>,
    #[serde(default)]
    sides: Option<[String; 2]>,
}

/// Parses the `zones` field; the error is the reason, for the caller to file under it.
pub fn parse_zones(json: &str, units: Units) -> Result<Vec<Zone>, String> {
    let input: BTreeMap<String, ZoneInput> = parse_object(
        json,
        "a JSON object of zone name to [[x, y], ...] or to {\"points\", \"labels\", \"loiter_s\"}",
    )?;
    input
        .into_iter()
        .map(|(name, zone)| {
            let (polygon, labels, loiter_s) = match zone {
                ZoneInput::Points(p) => (p, None, None),
                ZoneInput::Full(f) => (f.points, f.labels, f.loiter_s),
            };
            checked_zone(name, polygon, labels, loiter_s, units)
        })
        .collect()
}

/// Parses the `lines` field; the error is the reason, for the caller to file under it.
pub fn parse_lines(json: &str, units: Units) -> Result<Vec<Line>, String> {
    let input: BTreeMap<String, LineInput> = parse_object(
        json,
        "a JSON object of line name to [[x, y], [x, y]] or to {\"points\", \"sides\"}",
    )?;
    input
        .into_iter()
        .map(|(name, line)| {
            let (points, sides) = match line {
                LineInput::Points(p) => (p, None),
                LineInput::Full(f) => (f.points, f.sides),
            };
            checked_line(name, points, sides, units)
        })
        .collect()
}

fn parse_object<T: serde::de::DeserializeOwned>(
    json: &str,
    expected: &str,
) -> Result<BTreeMap<String, T>, String> {
    let value: serde_json::Value =
        serde_json::from_str(json).map_err(|e| format!("is not valid JSON: {e}"))?;
    let map: BTreeMap<String, T> =
        serde_json::from_value(value).map_err(|_| format!("must be {expected}"))?;
    if map.len() > MAX_PLACES {
        return Err(format!(
            "has {} entries; at most {MAX_PLACES} are allowed",
            map.len()
        ));
    }
    for name in map.keys() {
        checked_name(name, "name")?;
    }
    Ok(map)
}

fn checked_name(name: &str, what: &str) -> Result<(), String> {
    if name.trim().is_empty() || name.len() > MAX_NAME_BYTES {
        return Err(format!(
            "{what} `{}` must be 1 to {MAX_NAME_BYTES} bytes",
            name.chars().take(MAX_NAME_BYTES).collect::<String>()
        ));
    }
    Ok(())
}

fn checked_points(name: &str, points: &[Point], units: Units) -> Result<(), String> {
    let max = units.max();
    let bad = points
        .iter()
        .flatten()
        .find(|v| !v.is_finite() || **v < 0.0 || **v > max);
    match bad {
        Some(v) => Err(format!(
            "`{name}`: coordinate {v} is out of range ({} from 0 to {max})",
            match units {
                Units::Pixels => "source pixels",
                Units::Normalised => "normalised",
            }
        )),
        None => Ok(()),
    }
}

fn checked_zone(
    name: String,
    polygon: Vec<Point>,
    labels: Option<BTreeSet<String>>,
    loiter_s: Option<f64>,
    units: Units,
) -> Result<Zone, String> {
    if polygon.len() < 3 || polygon.len() > MAX_POLYGON_POINTS {
        return Err(format!(
            "`{name}` has {} points; a zone needs 3 to {MAX_POLYGON_POINTS}",
            polygon.len()
        ));
    }
    checked_points(&name, &polygon, units)?;
    if geometry::self_crossing(&polygon) {
        return Err(format!("`{name}` is a self-crossing polygon"));
    }
    if geometry::doubled_area(&polygon) == 0.0 {
        return Err(format!("`{name}` has no area"));
    }
    let loiter_ms = match loiter_s {
        Some(s) if !(s.is_finite() && s > 0.0 && s <= MAX_LOITER_S) => {
            return Err(format!(
                "`{name}`: loiter_s must be above 0, at most {MAX_LOITER_S}"
            ));
        }
        Some(s) => Some((s * 1000.0).round() as i64),
        None => None,
    };
    Ok(Zone {
        name,
        polygon,
        labels,
        loiter_ms,
    })
}

fn checked_line(
    name: String,
    points: Vec<Point>,
    sides: Option<[String; 2]>,
    units: Units,
) -> Result<Line, String> {
    let [from, to] = points[..] else {
        return Err(format!(
            "`{name}` has {} points; a line needs 2",
            points.len()
        ));
    };
    checked_points(&name, &points, units)?;
    if from == to {
        return Err(format!("`{name}`: its two points are equal"));
    }
    let sides = sides.unwrap_or_else(|| ["left".into(), "right".into()]);
    for side in &sides {
        checked_name(side, "side")?;
    }
    if sides[0] == sides[1] {
        return Err(format!("`{name}`: its two sides have the same name"));
    }
    Ok(Line {
        name,
        from,
        to,
        sides,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zones_and_lines_parse_in_both_forms() {
        let zones = parse_zones(
            r#"{"dock": [[0,0],[10,0],[10,10]], "door": {"points": [[0,0],[5,0],[5,5],[0,5]],
                "labels": ["person"], "loiter_s": 2.5}}"#,
            Units::Pixels,
        )
        .unwrap();
        assert_eq!(zones[0].name, "dock");
        assert_eq!(zones[0].labels, None);
        assert_eq!(zones[1].loiter_ms, Some(2500));
        assert_eq!(
            zones[1].labels,
            Some(BTreeSet::from(["person".to_string()]))
        );
        let lines = parse_lines(
            r#"{"gate": {"points": [[0,0.5],[1,0.5]], "sides": ["north", "south"]}, "g2": [[0,0],[0,1]]}"#,
            Units::Normalised,
        )
        .unwrap();
        assert_eq!(lines[1].sides, ["north".to_string(), "south".to_string()]);
        assert_eq!(lines[0].sides, ["left".to_string(), "right".to_string()]);
    }

    #[test]
    fn bad_zones_and_lines_say_why() {
        let many: Vec<String> = (0..33)
            .map(|i| format!("\"z{i}\": [[0,0],[1,0],[1,1]]"))
            .collect();
        let many = format!("{{{}}}", many.join(","));
        let long = format!("{{\"{}\": [[0,0],[1,0],[1,1]]}}", "n".repeat(65));
        let zone_cases = [
            (
                r#"{"a": [[0,0],[1,1]]}"#,
                "`a` has 2 points; a zone needs 3 to 64",
            ),
            (
                r#"{"a": [[0,0],[10,10],[10,0],[0,10]]}"#,
                "`a` is a self-crossing polygon",
            ),
            (r#"{"a": [[0,0],[1,1],[2,2]]}"#, "`a` has no area"),
            (
                r#"{"a": [[0,0],[-1,0],[1,1]]}"#,
                "`a`: coordinate -1 is out of range (source pixels from 0 to 65535)",
            ),
            (
                &long,
                "name `nnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnn` must be 1 to 64 bytes",
            ),
            (&many, "has 33 entries; at most 32 are allowed"),
            (
                r#"{"a": [[0,0],[1,0],[1,1]]"#,
                "is not valid JSON: EOF while parsing an object at line 1 column 25",
            ),
            (
                r#"{"a": {"points": [[0,0],[1,0],[1,1]], "loiter_s": 0}}"#,
                "`a`: loiter_s must be above 0, at most 86400",
            ),
        ];
        for (json, want) in zone_cases {
            assert_eq!(
                parse_zones(json, Units::Pixels).unwrap_err(),
                want,
                "{json}"
            );
        }
        assert!(
            parse_zones(r#"[[0,0],[1,0],[1,1]]"#, Units::Pixels)
                .unwrap_err()
                .starts_with("must be a JSON object of zone name")
        );
        let line_cases = [
            (
                r#"{"l": [[0.3,0.4],[0.3,0.4]]}"#,
                "`l`: its two points are equal",
            ),
            (
                r#"{"l": [[0,0],[1,1],[2,2]]}"#,
                "`l` has 3 points; a line needs 2",
            ),
            (
                r#"{"l": [[0,0],[1.5,1]]}"#,
                "`l`: coordinate 1.5 is out of range (normalised from 0 to 1)",
            ),
        ];
        for (json, want) in line_cases {
            assert_eq!(
                parse_lines(json, Units::Normalised).unwrap_err(),
                want,
                "{json}"
            );
        }
    }
}
