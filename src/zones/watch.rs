//! The zone watch: each tracked frame's anchors against a job's zones and lines, giving
//! events and running counts. Its state is plain data, saved with the job so that a worker
//! taking the job over neither loses nor repeats an event.
//!
//! - **enter / leave**: a track's anchor goes inside / outside a zone (of a label the zone
//!   counts). A track the tracker has let go (unseen for more frames than it keeps a lost
//!   track) leaves every zone it was in, with `reason` `lost`; otherwise `reason` is `left`.
//!   `leave` carries `dwell_ms`, capture time from the enter to the last frame inside. When
//!   the job ends, every track still inside a zone leaves it, with the job's end as
//!   `reason`.
//! - **loiter**: once per stay, when a track has been inside a zone with `loiter_s` that
//!   long (frames the scene gate reused count: a still object is still there).
//! - **cross**: a track's anchor passes from one side of a line to the other along a path
//!   that meets the segment. An anchor counts as on a side only when it is more than
//!   [`LINE_MARGIN`] of its box's height away from the line (hysteresis: a box jittering on
//!   the line flips nothing), and each track is counted at most once per direction.

use super::geometry::{Point, contains, cross, segments_meet};
use super::{Line, Places, Zone};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// How far past a line an anchor must be to be on a side, as a share of its box's height.
pub const LINE_MARGIN: f64 = 0.1;

/// One tracked box of a frame, in the coordinates of the job's zones.
#[derive(Clone, Debug, PartialEq)]
pub struct Sighting {
    pub track_id: u64,
    pub label: String,
    /// The bottom centre of the box.
    pub anchor: Point,
    /// The box's height.
    pub height: f64,
}

/// What happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    Enter,
    Leave,
    Cross,
    Loiter,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Enter => "enter",
            EventKind::Leave => "leave",
            EventKind::Cross => "cross",
            EventKind::Loiter => "loiter",
        }
    }
}

/// One zone or line event.
#[derive(Clone, Debug, PartialEq)]
pub struct ZoneEvent {
    pub kind: EventKind,
    /// Unique within the job for its kind: `zone:<zone>:<track>:<first frame inside>` (the
    /// same in a stay's enter, loiter and leave) or `line:<line>:<track>:<side reached>`.
    pub event_id: String,
    /// The zone's name (enter, leave, loiter) or the line's (cross).
    pub place: String,
    pub track_id: u64,
    pub label: String,
    pub frame: u64,
    pub capture_ms: i64,
    /// leave: capture time from the enter to the last frame inside.
    pub dwell_ms: Option<i64>,
    /// cross: the side reached, and the side left.
    pub direction: Option<(String, String)>,
    /// leave: `left`, `lost`, or why the job ended ([`WatchState::close_all`]).
    pub reason: Option<&'static str>,
}

impl ZoneEvent {
    /// The fields written to `{fr}:alerts` after `job_id`, `alert_id` and `kind`.
    pub fn fields(&self) -> Vec<(&'static str, String)> {
        let place = if self.kind == EventKind::Cross {
            "line"
        } else {
            "zone"
        };
        let mut f = vec![
            (place, self.place.clone()),
            ("track_id", self.track_id.to_string()),
            ("label", self.label.clone()),
            ("frame", self.frame.to_string()),
            ("capture_ms", self.capture_ms.to_string()),
        ];
        if let Some(d) = self.dwell_ms {
            f.push(("dwell_ms", d.to_string()));
        }
        if let Some((to, from)) = &self.direction {
            f.push(("direction", to.clone()));
            f.push(("from", from.clone()));
        }
        if let Some(r) = self.reason {
            f.push(("reason", r.to_string()));
        }
        f
    }
}

/// A zone's running counts.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ZoneCount {
    /// Tracks inside now.
    pub inside: u64,
    /// Enters so far.
    pub entered: u64,
}

/// A track's stay in a zone.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Stay {
    since_frame: u64,
    since_ms: i64,
    last_ms: i64,
    loitered: bool,
}

/// Where a track last was, for one line.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct LineSide {
    /// -1 left, 1 right, 0 not yet on a side.
    side: i8,
    /// The anchor when it was last on that side.
    at: Point,
    /// Whether it has been counted reaching the left and the right side.
    counted: [bool; 2],
}

/// What the watch knows of one track.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct TrackPlace {
    label: String,
    last_step: u64,
    last_frame: u64,
    last_ms: i64,
    stays: BTreeMap<String, Stay>,
    lines: BTreeMap<String, LineSide>,
}

/// Everything the watch carries from frame to frame, saved with the job.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct WatchState {
    /// Tracked frames seen.
    steps: u64,
    tracks: BTreeMap<u64, TrackPlace>,
    pub zones: BTreeMap<String, ZoneCount>,
    /// Per line, crossings by the side reached.
    pub lines: BTreeMap<String, BTreeMap<String, u64>>,
}

impl WatchState {
    /// The running counts as progress hash fields: `zone:<zone>:in` (tracks inside now),
    /// `zone:<zone>:entered`, and `line:<line>:<side>` (crossings reaching that side).
    pub fn counts(&self) -> Vec<(String, u64)> {
        let zones = self.zones.iter().flat_map(|(name, c)| {
            [
                (format!("zone:{name}:in"), c.inside),
                (format!("zone:{name}:entered"), c.entered),
            ]
        });
        let lines = self.lines.iter().flat_map(|(name, sides)| {
            sides
                .iter()
                .map(move |(side, n)| (format!("line:{name}:{side}"), *n))
        });
        zones.chain(lines).collect()
    }

    /// The job ends (`reason` says how): every track still inside a zone leaves it, as of
    /// the last frame it was seen, and all tracks are forgotten. Closing again finds none.
    pub fn close_all(&mut self, reason: &'static str) -> Vec<ZoneEvent> {
        let ids: Vec<u64> = self.tracks.keys().copied().collect();
        ids.into_iter()
            .flat_map(|id| self.forget(id, reason))
            .collect()
    }

    /// Track `id` leaves every zone it is in, with `reason`, and is forgotten.
    fn forget(&mut self, id: u64, reason: &'static str) -> Vec<ZoneEvent> {
        let Some(place) = self.tracks.remove(&id) else {
            return Vec::new();
        };
        let mut events = Vec::with_capacity(place.stays.len());
        for (zone, stay) in place.stays {
            if let Some(count) = self.zones.get_mut(&zone) {
                count.inside = count.inside.saturating_sub(1);
            }
            events.push(leave(
                &zone,
                id,
                &place.label,
                &stay,
                place.last_frame,
                reason,
            ));
        }
        events
    }
}

/// A job's zones and lines with their state.
#[derive(Clone, Debug)]
pub struct ZoneWatch {
    places: Places,
    /// Tracked frames a track may go unseen and still be followed (the tracker's own).
    keep_unseen: u64,
    state: WatchState,
}

impl ZoneWatch {
    /// A watch going on from `state`; `keep_unseen` is the most frames in a row the
    /// tracker keeps a lost track.
    pub fn new(places: Places, keep_unseen: u32, mut state: WatchState) -> Self {
        for z in &places.zones {
            state.zones.entry(z.name.clone()).or_default();
        }
        for l in &places.lines {
            let counts = state.lines.entry(l.name.clone()).or_default();
            for side in &l.sides {
                counts.entry(side.clone()).or_default();
            }
        }
        Self {
            places,
            keep_unseen: u64::from(keep_unseen),
            state,
        }
    }

    pub fn state(&self) -> &WatchState {
        &self.state
    }

    pub fn places(&self) -> &Places {
        &self.places
    }

    /// Takes one tracked frame's sightings; returns its events in order.
    pub fn observe(&mut self, frame: u64, capture_ms: i64, seen: &[Sighting]) -> Vec<ZoneEvent> {
        let mut events = Vec::new();
        self.state.steps += 1;
        let step = self.state.steps;
        for s in seen {
            let place = self
                .state
                .tracks
                .entry(s.track_id)
                .or_insert_with(|| TrackPlace {
                    label: s.label.clone(),
                    last_step: step,
                    last_frame: frame,
                    last_ms: capture_ms,
                    stays: BTreeMap::new(),
                    lines: BTreeMap::new(),
                });
            (place.last_step, place.last_frame, place.last_ms) = (step, frame, capture_ms);
            if place.label != s.label {
                place.label.clone_from(&s.label);
            }
            // Every zone and line has its count from `new`: looked up, not made, per box.
            for zone in &self.places.zones {
                if let Some(count) = self.state.zones.get_mut(&zone.name) {
                    events.extend(zone_step(zone, count, place, s, frame, capture_ms));
                }
            }
            for line in &self.places.lines {
                if let Some(counts) = self.state.lines.get_mut(&line.name) {
                    events.extend(line_step(line, counts, place, s, frame, capture_ms));
                }
            }
        }
        events.extend(self.loiters(frame, capture_ms));
        events.extend(self.forget_lost());
        events
    }

    /// Takes a frame that reused the last output: the same tracks in the same places, so
    /// only time moves on.
    pub fn reused(&mut self, frame: u64, capture_ms: i64) -> Vec<ZoneEvent> {
        for place in self.state.tracks.values_mut() {
            if place.last_step == self.state.steps {
                place.last_ms = capture_ms;
                place.last_frame = frame;
                for stay in place.stays.values_mut() {
                    stay.last_ms = capture_ms;
                }
            }
        }
        self.loiters(frame, capture_ms)
    }

    fn loiters(&mut self, frame: u64, capture_ms: i64) -> Vec<ZoneEvent> {
        let mut events = Vec::new();
        for zone in &self.places.zones {
            let Some(after) = zone.loiter_ms else {
                continue;
            };
            for (&track_id, place) in &mut self.state.tracks {
                let Some(stay) = place.stays.get_mut(&zone.name) else {
                    continue;
                };
                if !stay.loitered && capture_ms.saturating_sub(stay.since_ms) >= after {
                    stay.loitered = true;
                    events.push(ZoneEvent {
                        kind: EventKind::Loiter,
                        event_id: stay_id(&zone.name, track_id, stay),
                        place: zone.name.clone(),
                        track_id,
                        label: place.label.clone(),
                        frame,
                        capture_ms,
                        dwell_ms: None,
                        direction: None,
                        reason: None,
                    });
                }
            }
        }
        events
    }

    /// Tracks the tracker has let go leave their zones and are forgotten.
    fn forget_lost(&mut self) -> Vec<ZoneEvent> {
        let step = self.state.steps;
        let lost: Vec<u64> = self
            .state
            .tracks
            .iter()
            .filter(|(_, p)| step - p.last_step > self.keep_unseen)
            .map(|(&id, _)| id)
            .collect();
        lost.into_iter()
            .flat_map(|id| self.state.forget(id, "lost"))
            .collect()
    }

    /// The job ends: see [`WatchState::close_all`].
    pub fn close_all(&mut self, reason: &'static str) -> Vec<ZoneEvent> {
        self.state.close_all(reason)
    }
}

fn stay_id(zone: &str, track_id: u64, stay: &Stay) -> String {
    format!("zone:{zone}:{track_id}:{}", stay.since_frame)
}

fn leave(
    zone: &str,
    track_id: u64,
    label: &str,
    stay: &Stay,
    frame: u64,
    reason: &'static str,
) -> ZoneEvent {
    ZoneEvent {
        kind: EventKind::Leave,
        event_id: stay_id(zone, track_id, stay),
        place: zone.to_string(),
        track_id,
        label: label.to_string(),
        frame,
        capture_ms: stay.last_ms,
        dwell_ms: Some(stay.last_ms.saturating_sub(stay.since_ms)),
        direction: None,
        reason: Some(reason),
    }
}

/// One sighting against one zone.
fn zone_step(
    zone: &Zone,
    count: &mut ZoneCount,
    place: &mut TrackPlace,
    s: &Sighting,
    frame: u64,
    capture_ms: i64,
) -> Option<ZoneEvent> {
    let counted = zone.labels.as_ref().is_none_or(|l| l.contains(&s.label));
    let inside = counted && contains(&zone.polygon, s.anchor);
    match (inside, place.stays.get_mut(&zone.name)) {
        (true, Some(stay)) => {
            stay.last_ms = capture_ms;
            None
        }
        (true, None) => {
            let stay = Stay {
                since_frame: frame,
                since_ms: capture_ms,
                last_ms: capture_ms,
                loitered: false,
            };
            count.inside += 1;
            count.entered += 1;
            let event = ZoneEvent {
                kind: EventKind::Enter,
                event_id: stay_id(&zone.name, s.track_id, &stay),
                place: zone.name.clone(),
                track_id: s.track_id,
                label: s.label.clone(),
                frame,
                capture_ms,
                dwell_ms: None,
                direction: None,
                reason: None,
            };
            place.stays.insert(zone.name.clone(), stay);
            Some(event)
        }
        (false, Some(_)) => {
            let stay = place.stays.remove(&zone.name)?;
            count.inside = count.inside.saturating_sub(1);
            let mut event = leave(&zone.name, s.track_id, &s.label, &stay, frame, "left");
            event.capture_ms = capture_ms;
            Some(event)
        }
        (false, None) => None,
    }
}

/// One sighting against one line.
fn line_step(
    line: &Line,
    counts: &mut BTreeMap<String, u64>,
    place: &mut TrackPlace,
    s: &Sighting,
    frame: u64,
    capture_ms: i64,
) -> Option<ZoneEvent> {
    let length = (line.to[0] - line.from[0]).hypot(line.to[1] - line.from[1]);
    let distance = cross(line.from, line.to, s.anchor) / length;
    let margin = LINE_MARGIN * s.height.abs();
    let side: i8 = if distance > margin {
        1
    } else if distance < -margin {
        -1
    } else {
        return None;
    };
    if !place.lines.contains_key(&line.name) {
        place.lines.insert(line.name.clone(), LineSide::default());
    }
    let last = place.lines.get_mut(&line.name)?;
    let crossed =
        last.side != 0 && last.side != side && segments_meet(last.at, s.anchor, line.from, line.to);
    let from = last.side;
    (last.side, last.at) = (side, s.anchor);
    let reached = usize::from(side > 0);
    if !crossed || last.counted[reached] {
        return None;
    }
    last.counted[reached] = true;
    let to_name = line.sides[reached].clone();
    let from_name = line.sides[usize::from(from > 0)].clone();
    *counts.entry(to_name.clone()).or_default() += 1;
    Some(ZoneEvent {
        kind: EventKind::Cross,
        event_id: format!("line:{}:{}:{to_name}", line.name, s.track_id),
        place: line.name.clone(),
        track_id: s.track_id,
        label: s.label.clone(),
        frame,
        capture_ms,
        dwell_ms: None,
        direction: Some((to_name, from_name)),
        reason: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::zones::{Units, parse_lines, parse_zones};

    fn watch(keep_unseen: u32) -> ZoneWatch {
        let places = Places {
            units: Units::Pixels,
            zones: parse_zones(
                r#"{"dock": {"points": [[100,0],[200,0],[200,100],[100,100]], "loiter_s": 1}}"#,
                Units::Pixels,
            )
            .unwrap(),
            lines: parse_lines(
                r#"{"gate": {"points": [[300,0],[300,100]], "sides": ["east", "west"]}}"#,
                Units::Pixels,
            )
            .unwrap(),
        };
        ZoneWatch::new(places, keep_unseen, WatchState::default())
    }

    /// Track 7, a 20 px tall box whose anchor is at (x, 50).
    fn at(x: f64) -> Vec<Sighting> {
        vec![Sighting {
            track_id: 7,
            label: "red".into(),
            anchor: [x, 50.0],
            height: 20.0,
        }]
    }

    fn kinds(events: &[ZoneEvent]) -> Vec<(&'static str, &str)> {
        events
            .iter()
            .map(|e| (e.kind.as_str(), e.place.as_str()))
            .collect()
    }

    #[test]
    fn a_track_enters_loiters_once_and_leaves_with_its_dwell() {
        let mut w = watch(30);
        assert!(w.observe(0, 0, &at(50.0)).is_empty());
        let e = w.observe(1, 500, &at(150.0));
        assert_eq!(kinds(&e), [("enter", "dock")]);
        assert_eq!(e[0].event_id, "zone:dock:7:1");
        assert_eq!(
            w.state().zones["dock"],
            ZoneCount {
                inside: 1,
                entered: 1
            }
        );
        assert!(w.observe(2, 1000, &at(160.0)).is_empty());
        // Still (the scene gate reused the output): time moves, loiter fires once.
        let e = w.reused(3, 1500);
        assert_eq!(kinds(&e), [("loiter", "dock")]);
        assert_eq!(e[0].event_id, "zone:dock:7:1");
        assert!(w.reused(4, 2000).is_empty());
        assert!(w.observe(5, 2500, &at(170.0)).is_empty());
        let e = w.observe(6, 3000, &at(250.0));
        assert_eq!(kinds(&e), [("leave", "dock")]);
        assert_eq!(
            e[0].dwell_ms,
            Some(2000),
            "enter at 500 to the last frame inside"
        );
        assert_eq!(e[0].reason, Some("left"));
        assert_eq!(
            w.state().zones["dock"],
            ZoneCount {
                inside: 0,
                entered: 1
            }
        );
    }

    #[test]
    fn a_line_is_crossed_once_each_way_and_jitter_on_it_counts_nothing() {
        let mut w = watch(30);
        let mut all = Vec::new();
        // The margin is 2 px (10% of 20): 299 and 301 are on the line, not on a side.
        for (i, x) in [280.0, 295.0, 299.0, 301.0, 299.0, 301.0, 310.0]
            .iter()
            .enumerate()
        {
            all.extend(w.observe(i as u64, i as i64 * 100, &at(*x)));
        }
        // Going down the screen from (300,0) to (300,100), x > 300 is on the left: "east".
        assert_eq!(kinds(&all), [("cross", "gate")]);
        assert_eq!(
            all[0].direction,
            Some(("east".to_string(), "west".to_string()))
        );
        assert_eq!(all[0].frame, 6);
        // Back west, then east again: west counts once, east never again.
        let mut back = Vec::new();
        for (i, x) in [290.0, 310.0, 290.0].iter().enumerate() {
            back.extend(w.observe(10 + i as u64, 0, &at(*x)));
        }
        assert_eq!(kinds(&back), [("cross", "gate")]);
        assert_eq!(back[0].direction.as_ref().unwrap().0, "west");
        assert_eq!(
            w.state().counts(),
            [
                ("zone:dock:in".to_string(), 0),
                ("zone:dock:entered".to_string(), 0),
                ("line:gate:east".to_string(), 1),
                ("line:gate:west".to_string(), 1),
            ]
        );
    }

    #[test]
    fn passing_beside_a_line_crosses_nothing() {
        let mut w = watch(30);
        let beyond = |x: f64| {
            vec![Sighting {
                anchor: [x, 150.0],
                ..at(0.0)[0].clone()
            }]
        };
        assert!(w.observe(0, 0, &beyond(280.0)).is_empty());
        assert!(w.observe(1, 0, &beyond(320.0)).is_empty());
        assert_eq!(w.state().lines["gate"]["east"], 0);
    }

    #[test]
    fn a_track_the_tracker_let_go_leaves_as_lost_and_the_state_carries_on() {
        let mut w = watch(2);
        w.observe(0, 0, &at(150.0));
        w.observe(1, 100, &at(150.0));
        let saved = serde_json::to_string(w.state()).unwrap();
        let state: WatchState = serde_json::from_str(&saved).unwrap();
        let mut w = ZoneWatch::new(w.places().clone(), 2, state);
        assert!(w.observe(2, 200, &[]).is_empty());
        assert!(w.observe(3, 300, &[]).is_empty());
        let e = w.observe(4, 400, &[]);
        assert_eq!(kinds(&e), [("leave", "dock")]);
        assert_eq!(
            (e[0].dwell_ms, e[0].reason, e[0].frame),
            (Some(100), Some("lost"), 1)
        );
        assert_eq!(w.state().zones["dock"].inside, 0);
    }

    #[test]
    fn tracks_inside_zones_leave_when_the_job_ends_and_only_once() {
        let mut w = watch(30);
        w.observe(0, 0, &at(150.0));
        w.observe(1, 100, &at(160.0));
        // Track 8 is seen outside every zone: it leaves nothing.
        let outside = Sighting {
            track_id: 8,
            anchor: [20.0, 50.0],
            ..at(0.0)[0].clone()
        };
        w.observe(2, 200, std::slice::from_ref(&outside));
        let e = w.close_all("job_completed");
        assert_eq!(kinds(&e), [("leave", "dock")]);
        assert_eq!(
            (e[0].track_id, e[0].frame, e[0].capture_ms, e[0].dwell_ms),
            (7, 1, 100, Some(100)),
            "as of the last frame the track was seen"
        );
        assert_eq!(e[0].reason, Some("job_completed"));
        assert_eq!(
            e[0].event_id, "zone:dock:7:0",
            "the stay's enter names it alike"
        );
        assert_eq!(w.state().zones["dock"].inside, 0);
        assert_eq!(w.state().zones["dock"].entered, 1);
        assert!(w.close_all("job_completed").is_empty());
        // As a saved state, read back by whoever ends a job no worker runs.
        let mut again = watch(30);
        again.observe(0, 0, &at(150.0));
        let mut saved: WatchState =
            serde_json::from_str(&serde_json::to_string(again.state()).unwrap()).unwrap();
        assert_eq!(
            kinds(&saved.close_all("job_cancelled")),
            [("leave", "dock")]
        );
        assert_eq!(saved.counts()[0], ("zone:dock:in".to_string(), 0));
    }

    #[test]
    fn a_zone_with_labels_ignores_the_others() {
        let places = Places {
            units: Units::Pixels,
            zones: parse_zones(
                r#"{"dock": {"points": [[100,0],[200,0],[200,100],[100,100]], "labels": ["blue"]}}"#,
                Units::Pixels,
            )
            .unwrap(),
            lines: Vec::new(),
        };
        let mut w = ZoneWatch::new(places, 30, WatchState::default());
        assert!(w.observe(0, 0, &at(150.0)).is_empty());
    }
}
