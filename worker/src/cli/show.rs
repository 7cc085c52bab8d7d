//! The CLI's text for people: one line per result or alert, a job's two hashes, times as
//! UTC with their age. `--json` bypasses all of it.

use free_roam::client::{JobView, PromptMode, ShardCountChange, ShardQueue};
use free_roam::store::keys::snapshot_name;
use serde_json::Value;
use std::collections::BTreeMap;

/// Fields that hold a time (ms since the epoch), shown as UTC and an age.
const TIME_FIELDS: &[&str] = &[
    "created_ms",
    "started_ms",
    "updated_ms",
    "finished_ms",
    "capture_ms",
    "first_capture_ms",
    "last_capture_ms",
    "time_ms",
];
/// Longest value shown whole in `status` (an error or a note fits; the alert state may
/// not); `--json` shows every value whole.
const LONGEST_VALUE: usize = 400;
/// Longest caption, answer or other output shown whole in a result's line.
const LONGEST_SUMMARY: usize = 160;
/// Boxes listed by score in a detection summary.
const TOP_BOXES: usize = 3;

/// `2026-12-07 08:01:02 UTC (3m 5s ago)` for a time in ms since the epoch.
pub fn time(ms: i64, now_ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, day_secs) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    let (h, min, s) = (day_secs / 3600, day_secs % 3600 / 60, day_secs % 60);
    format!(
        "{y:04}-{m:02}-{d:02} {h:02}:{min:02}:{s:02} UTC ({})",
        age(now_ms - ms)
    )
}

/// `5s ago`, `3m 5s ago`, `2h 4m ago`, `3d 1h ago`; `in 2s` for a time ahead of the clock.
pub fn age(ms: i64) -> String {
    let s = ms.abs() / 1000;
    let text = match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m {}s", s / 60, s % 60),
        3600..86_400 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d {}h", s / 86_400, s % 86_400 / 3600),
    };
    if ms < 0 {
        format!("in {text}")
    } else {
        format!("{text} ago")
    }
}

/// The proleptic Gregorian date of a day count from 1970-01-01 (Howard Hinnant's
/// `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = (if mp < 10 { mp + 3 } else { mp - 9 }) as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// A field's value for people: times as UTC with their age, long values cut.
fn value(name: &str, raw: &str, now_ms: i64) -> String {
    if TIME_FIELDS.contains(&name)
        && let Ok(ms) = raw.parse::<i64>()
    {
        return time(ms, now_ms);
    }
    if raw.len() > LONGEST_VALUE {
        return format!(
            "{}... ({} bytes; --json shows it whole)",
            cut(raw, LONGEST_VALUE),
            raw.len()
        );
    }
    raw.to_string()
}

/// At most `max` bytes of `s`, on a character boundary.
fn cut(s: &str, max: usize) -> &str {
    let mut end = max.min(s.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// How a job gets its prompt, in words.
pub fn prompt_mode(view: &JobView) -> String {
    match view.prompt_mode() {
        PromptMode::Own => "own prompt".to_string(),
        PromptMode::FollowsActive => match view.progress.get("prompt_version") {
            Some(v) => format!("follows the active prompt (v{v} in its last result)"),
            None => "follows the active prompt".to_string(),
        },
    }
}

/// `status`: the summary lines, then every field of the job hash and of the progress hash,
/// each under its own heading.
pub fn status(view: &JobView, now_ms: i64) -> String {
    let g = |k: &str| view.job.get(k).map(String::as_str).unwrap_or("-");
    let mut out = vec![
        format!("job          {}", view.job_id),
        format!("status       {}", g("status")),
        format!("prompt       {}", prompt_mode(view)),
        format!("results_key  {}", view.results_key),
        format!("queue shard  {}", view.shard),
    ];
    for (heading, fields) in [("job hash", &view.job), ("progress hash", &view.progress)] {
        if fields.is_empty() {
            continue;
        }
        out.push(format!("{heading}:"));
        let width = fields.keys().map(String::len).max().unwrap_or(0);
        for (k, v) in fields {
            out.push(format!("  {k:<width$}  {}", value(k, v, now_ms)));
        }
    }
    out.join("\n")
}

/// `queue shards`: the count, then one line per shard, those with jobs and no live worker
/// flagged.
pub fn shards(count: u32, queues: &[ShardQueue]) -> String {
    let width = queues
        .iter()
        .map(|q| q.stream.len())
        .chain([6])
        .max()
        .unwrap_or(6);
    let mut out = vec![
        format!("queue shards: {count}"),
        format!(
            "{:<5}  {:<width$}  {:>7}  {:>7}  {:>7}",
            "SHARD", "STREAM", "WAITING", "RUNNING", "WORKERS"
        ),
    ];
    for q in queues {
        let flag = if q.unserved() {
            "  jobs and no live worker"
        } else {
            ""
        };
        out.push(format!(
            "{:<5}  {:<width$}  {:>7}  {:>7}  {:>7}{flag}",
            q.shard, q.stream, q.waiting, q.running, q.live_workers
        ));
    }
    out.join("\n")
}

/// What `queue shards COUNT` did, and what the workers need to follow it.
pub fn shard_count_change(change: ShardCountChange) -> String {
    if change.previous == change.now {
        return format!("queue shards: {} (unchanged)", change.now);
    }
    format!(
        "queue shards: {} (was {}); workers serving all shards follow within about 30 s, restart those with QUEUE_SHARDS_SERVED set",
        change.now, change.previous
    )
}

/// The header of `jobs`.
pub fn jobs_header(id_width: usize) -> String {
    format!(
        "{:<id_width$}  {:<9}  {:<6}  {:>7}  {:<10}  STREAM",
        "JOB", "STATUS", "PROMPT", "RESULTS", "CREATED"
    )
}

/// One line of `jobs`: id, status, prompt mode (`own` or `active`), results, age, stream.
pub fn job_line(view: &BTreeMap<String, String>, id_width: usize, now_ms: i64) -> String {
    let g = |k: &str| view.get(k).map(String::as_str).unwrap_or("-");
    let mode = match view.get("prompt_mode").map(String::as_str) {
        Some("fixed") => "own",
        Some("live") => "active",
        _ if view.contains_key("prompt") => "own",
        _ => "active",
    };
    let created = g("created_ms")
        .parse::<i64>()
        .map(|ms| age(now_ms - ms))
        .unwrap_or_else(|_| "-".into());
    format!(
        "{:<id_width$}  {:<9}  {mode:<6}  {:>7}  {created:<10}  {}",
        g("job_id"),
        g("status"),
        g("results"),
        g("stream_ref")
    )
}

/// One line per result entry: `frame`, the prompt version (`v2`), the model's time for the
/// batch, and a summary of the output (`full`: the output whole).
pub fn result(f: &BTreeMap<String, String>, full: bool) -> String {
    let g = |k: &str| f.get(k).map(String::as_str).unwrap_or("-");
    match g("kind") {
        "end" => {
            let err = f.get("error").map(|e| format!(": {e}")).unwrap_or_default();
            format!("end  status={} results={}{err}", g("status"), g("results"))
        }
        "error" => format!("frame {:>5}  error: {}", g("frame"), g("error")),
        _ => {
            let output = if full {
                g("output").to_string()
            } else {
                serde_json::from_str(g("output"))
                    .map(|v| summary(&v))
                    .unwrap_or_else(|_| g("output").to_string())
            };
            let reused = f
                .get("reused_from")
                .map(|r| format!("  (reused from frame {r})"))
                .unwrap_or_default();
            format!(
                "frame {:>5}  v{:<3} {:>7} ms  {output}{reused}",
                g("frame"),
                g("prompt_version"),
                g("latency_ms")
            )
        }
    }
}

/// What a model's output says, in a line: boxes by label, detected phrases with their
/// scores, a caption or answer; any other output as compact JSON, cut.
pub fn summary(output: &Value) -> String {
    if let Some(boxes) = output.get("detections").and_then(Value::as_array) {
        return boxes_summary(boxes);
    }
    if output.get("detected").is_some() || output.get("phrases").is_some() {
        return detected_summary(output);
    }
    for key in ["caption", "text"] {
        if let Some(text) = output.get(key).and_then(Value::as_str) {
            return format!("{key}: {:?}", cut(text, LONGEST_SUMMARY));
        }
    }
    let json = output.to_string();
    if json.len() > LONGEST_SUMMARY {
        format!("{}... (--full shows it whole)", cut(&json, LONGEST_SUMMARY))
    } else {
        json
    }
}

fn score(v: Option<&Value>) -> String {
    v.and_then(Value::as_f64)
        .map_or_else(|| "-".to_string(), |s| format!("{s:.2}"))
}

/// `3 boxes: people x2 (best 0.41), car x1 (best 0.17); top: people 0.41 [102,48,188,302], ...`
fn boxes_summary(boxes: &[Value]) -> String {
    let mut labels: Vec<(String, usize, Option<f64>)> = Vec::new();
    for b in boxes {
        let label = b.get("label").and_then(Value::as_str).unwrap_or("?");
        let s = b.get("score").and_then(Value::as_f64);
        match labels.iter_mut().find(|(l, _, _)| l == label) {
            Some((_, n, best)) => {
                *n += 1;
                if let Some(s) = s
                    && best.is_none_or(|b| s > b)
                {
                    *best = Some(s);
                }
            }
            None => labels.push((label.to_string(), 1, s)),
        }
    }
    let counts: Vec<String> = labels
        .iter()
        .map(|(l, n, best)| match best {
            Some(b) => format!("{l} x{n} (best {b:.2})"),
            None => format!("{l} x{n}"),
        })
        .collect();
    let mut by_score: Vec<&Value> = boxes.iter().collect();
    by_score.sort_by(|a, b| {
        let s = |v: &Value| v.get("score").and_then(Value::as_f64).unwrap_or(0.0);
        s(b).total_cmp(&s(a))
    });
    let top: Vec<String> = by_score
        .iter()
        .take(TOP_BOXES)
        .map(|b| {
            let corners: Vec<String> = b
                .get("box")
                .and_then(Value::as_array)
                .map(|c| {
                    c.iter()
                        .filter_map(Value::as_f64)
                        .map(|x| format!("{x:.0}"))
                        .collect()
                })
                .unwrap_or_default();
            let label = b.get("label").and_then(Value::as_str).unwrap_or("?");
            format!("{label} {} [{}]", score(b.get("score")), corners.join(","))
        })
        .collect();
    let noun = if boxes.len() == 1 { "box" } else { "boxes" };
    if boxes.is_empty() {
        return "0 boxes".into();
    }
    format!(
        "{} {noun}: {}; top: {}",
        boxes.len(),
        counts.join(", "),
        top.join(", ")
    )
}

/// A phrase's score as its model states it: presence (CLIP), probability (SigLIP), the
/// best box score, or a test model's score.
fn phrase_score(output: &Value, label: &str) -> Option<f64> {
    let phrase = output
        .get("phrases")?
        .as_array()?
        .iter()
        .find(|p| p.get("phrase").and_then(Value::as_str) == Some(label))?;
    ["presence", "probability", "max_score", "score", "coverage"]
        .iter()
        .find_map(|k| phrase.get(*k).and_then(Value::as_f64))
}

/// `detected: people 0.83, car 0.61`, or `detected: none (top: people 0.31)`.
fn detected_summary(output: &Value) -> String {
    let detected: Vec<String> = output
        .get("detected")
        .and_then(Value::as_array)
        .map(|d| {
            d.iter()
                .map(|item| match item {
                    Value::String(label) => match phrase_score(output, label) {
                        Some(s) => format!("{label} {s:.2}"),
                        None => label.clone(),
                    },
                    other => {
                        let label = other.get("label").and_then(Value::as_str).unwrap_or("?");
                        format!("{label} {}", score(other.get("score")))
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    if !detected.is_empty() {
        return format!("detected: {}", detected.join(", "));
    }
    let best = output
        .get("phrases")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|p| {
            let label = p.get("phrase").and_then(Value::as_str)?;
            Some((label, phrase_score(output, label)?))
        })
        .max_by(|a, b| a.1.total_cmp(&b.1));
    match best {
        Some((label, s)) => format!("detected: none (top: {label} {s:.2})"),
        None => "detected: none".into(),
    }
}

/// The file an event's picture is saved as: its snapshot name (kind and `alert_id`), every
/// character other than a letter, a digit, `.`, `-` and `_` written `_`, then `.jpg`.
pub fn picture_file_name(kind: &str, alert_id: &str) -> String {
    let name: String = snapshot_name(kind, alert_id)
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{name}.jpg")
}

/// One line per alert event: a label's `start` or `end`, or a track's zone or line event.
pub fn alert(f: &BTreeMap<String, String>) -> String {
    let g = |k: &str| f.get(k).map(String::as_str).unwrap_or("-");
    match g("kind") {
        "enter" | "leave" | "loiter" | "cross" => return zone_event(f),
        _ => {}
    }
    let reason = f
        .get("reason")
        .map(|r| format!(" ({r})"))
        .unwrap_or_default();
    let peak_box = f
        .get("peak_box")
        .map(|b| format!(" box={b}"))
        .unwrap_or_default();
    format!(
        "{:<6}  job={}  {}  frames {}..{}  peak={}{peak_box}{reason}",
        g("kind"),
        g("job_id"),
        g("label"),
        g("first_frame"),
        g("last_frame"),
        g("peak_score"),
    )
}

/// A zone or line event: who (label and track), where, and what it did there, e.g.
/// `leave   job=yard  person #4  zone dock  frame 40  after 12.5s (left)` or
/// `cross   job=yard  car #9  line gate  west -> east  frame 52`.
fn zone_event(f: &BTreeMap<String, String>) -> String {
    let g = |k: &str| f.get(k).map(String::as_str).unwrap_or("-");
    let kind = g("kind");
    let place = match kind {
        "cross" => format!("line {}", g("line")),
        _ => format!("zone {}", g("zone")),
    };
    let what = match kind {
        "cross" => format!("  {} -> {}", g("from"), g("direction")),
        _ => String::new(),
    };
    let dwell = f
        .get("dwell_ms")
        .and_then(|ms| ms.parse::<f64>().ok())
        .map(|ms| format!("  after {:.1}s", ms / 1000.0))
        .unwrap_or_default();
    let reason = f
        .get("reason")
        .map(|r| format!(" ({r})"))
        .unwrap_or_default();
    format!(
        "{kind:<6}  job={}  {} #{}  {place}{what}  frame {}{dwell}{reason}",
        g("job_id"),
        g("label"),
        g("track_id"),
        g("frame"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_picture_is_saved_under_a_file_name_safe_name() {
        assert_eq!(
            picture_file_name("enter", "cam/1:zone:door 2:4:12"),
            "enter_cam_1_zone_door_2_4_12.jpg"
        );
    }

    fn fields(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn zone_and_line_events_read_as_who_did_what_where() {
        let common = [("job_id", "yard"), ("label", "person"), ("track_id", "4")];
        let event = |more: &[(&str, &str)]| {
            let mut f = fields(&common);
            f.extend(fields(more));
            alert(&f)
        };
        assert_eq!(
            event(&[("kind", "enter"), ("zone", "dock"), ("frame", "12")]),
            "enter   job=yard  person #4  zone dock  frame 12"
        );
        assert_eq!(
            event(&[("kind", "loiter"), ("zone", "dock"), ("frame", "30")]),
            "loiter  job=yard  person #4  zone dock  frame 30"
        );
        assert_eq!(
            event(&[
                ("kind", "leave"),
                ("zone", "dock"),
                ("frame", "40"),
                ("dwell_ms", "12500"),
                ("reason", "left")
            ]),
            "leave   job=yard  person #4  zone dock  frame 40  after 12.5s (left)"
        );
        assert_eq!(
            event(&[
                ("kind", "cross"),
                ("line", "gate"),
                ("frame", "52"),
                ("direction", "east"),
                ("from", "west")
            ]),
            "cross   job=yard  person #4  line gate  west -> east  frame 52"
        );
        // A label's alert keeps its own line.
        let start = fields(&[
            ("kind", "start"),
            ("job_id", "yard"),
            ("label", "red"),
            ("first_frame", "3"),
            ("last_frame", "4"),
            ("peak_score", "0.9"),
        ]);
        assert_eq!(
            alert(&start),
            "start   job=yard  red  frames 3..4  peak=0.9"
        );
    }

    #[test]
    fn times_read_as_utc_with_their_age() {
        assert_eq!(
            time(1_765_094_462_000, 1_765_094_462_000 + 185_000),
            "2025-12-07 08:01:02 UTC (3m 5s ago)"
        );
        assert_eq!(time(0, 0), "1970-01-01 00:00:00 UTC (0s ago)");
        assert_eq!(
            time(951_782_400_000, 951_782_400_000),
            "2000-02-29 00:00:00 UTC (0s ago)"
        );
        assert_eq!(age(-2_000), "in 2s");
        assert_eq!(age(3 * 86_400_000 + 3_600_000), "3d 1h ago");
    }

    #[test]
    fn summaries_say_what_each_kind_of_output_holds() {
        let owl = json!({"detections": [
            {"label": "people", "score": 0.41, "box": [102.5, 48.0, 188.25, 301.75]},
            {"label": "vehicles", "score": 0.17, "box": [390.0, 210.5, 630.0, 352.0]},
            {"label": "people", "score": 0.12, "box": [1.0, 2.0, 3.0, 4.0]},
            {"label": "people", "score": 0.11, "box": [1.0, 2.0, 3.0, 4.0]}],
            "detected": ["people", "vehicles"]});
        assert_eq!(
            summary(&owl),
            "4 boxes: people x3 (best 0.41), vehicles x1 (best 0.17); top: people 0.41 [102,48,188,302], vehicles 0.17 [390,210,630,352], people 0.12 [1,2,3,4]"
        );
        let clip = json!({"phrases": [
            {"phrase": "people", "probability": 0.71, "presence": 0.83},
            {"phrase": "vehicles", "probability": 0.29, "presence": 0.12}],
            "detected": ["people"]});
        assert_eq!(summary(&clip), "detected: people 0.83");
        let none = json!({"phrases": [{"phrase": "cars", "probability": 0.2}], "detected": []});
        assert_eq!(summary(&none), "detected: none (top: cars 0.20)");
        let colour = json!({"detected": [{"label": "red", "score": 0.028}]});
        assert_eq!(summary(&colour), "detected: red 0.03");
        assert_eq!(
            summary(&json!({"caption": "a street"})),
            "caption: \"a street\""
        );
        assert_eq!(summary(&json!({})), "{}");
        let long = json!({"x": "y".repeat(400)});
        assert!(summary(&long).ends_with("(--full shows it whole)"));
    }
}
