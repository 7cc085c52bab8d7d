//! PaliGemma's detection syntax: which prompts ask for boxes, and the parser that turns a
//! generated `<locY1><locX1><locY2><locX2> label ; ...` text into boxes in frame pixels.
//!
//! Pure code: text in, boxes out. Each `<locNNNN>` (0 to 1023) is a position on a 1024-step
//! grid over the square the model saw; y comes before x, and the square maps back onto the
//! frame's own width and height (the model saw the frame squashed to a square).

use crate::model::text::tokenizer::LOC_STEPS;

/// The task word that asks for boxes: `detect person ; car`.
const DETECT_PREFIX: &str = "detect";
/// What separates labels in the prompt and objects in the answer.
const SEPARATOR: char = ';';

/// What a prompt asks PaliGemma for, as far as the output's shape depends on it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PaliTask {
    /// `detect a ; b`: boxes for the listed labels.
    Detect { labels: Vec<String> },
    /// Any other task (`caption en`, `answer en ...`, `ocr`, ...): text only.
    Text,
}

impl PaliTask {
    /// Reads the task from a prompt: `detect` followed by labels separated by `;`.
    pub fn of_prompt(prompt: &str) -> Self {
        let trimmed = prompt.trim();
        match trimmed.strip_prefix(DETECT_PREFIX) {
            Some(rest) if rest.starts_with(char::is_whitespace) => {
                let labels = rest
                    .split(SEPARATOR)
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(str::to_string)
                    .collect();
                PaliTask::Detect { labels }
            }
            _ => PaliTask::Text,
        }
    }
}

/// One parsed box: `label` and `[x1, y1, x2, y2]` in frame pixels.
#[derive(Clone, Debug, PartialEq)]
pub struct LocBox {
    pub label: String,
    pub corners: [f32; 4],
}

/// Reads `<locNNNN>` at the start of `s`: the grid step and the rest of the text.
fn take_loc(s: &str) -> Option<(u32, &str)> {
    let rest = s.strip_prefix("<loc")?;
    let digits = rest.get(..4)?;
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let rest = rest[4..].strip_prefix('>')?;
    let step: u32 = digits.parse().ok()?;
    (step < LOC_STEPS).then_some((step, rest))
}

/// Parses a generated detection text into boxes on a `width` x `height` frame.
///
/// Objects are separated by ` ; `; each is four `<loc>` tokens (y1, x1, y2, x2) and a label.
/// An object with fewer than four valid `<loc>` tokens, a step outside the grid, no label,
/// or corners in the wrong order gives no box; the other objects still do.
pub fn parse_detections(text: &str, width: u32, height: u32) -> Vec<LocBox> {
    let (w, h) = (width as f32, height as f32);
    let scale = |step: u32, side: f32| step as f32 / LOC_STEPS as f32 * side;
    text.split(SEPARATOR)
        .filter_map(|object| {
            let mut rest = object.trim_start();
            let mut steps = [0u32; 4];
            for step in &mut steps {
                let (value, tail) = take_loc(rest)?;
                *step = value;
                rest = tail;
            }
            let label = rest.trim();
            // Another `<loc` in the label means the object's tokens are not four.
            if label.is_empty() || label.contains("<loc") {
                return None;
            }
            let [y1, x1, y2, x2] = steps;
            if y2 < y1 || x2 < x1 {
                return None;
            }
            Some(LocBox {
                label: label.to_string(),
                corners: [scale(x1, w), scale(y1, h), scale(x2, w), scale(y2, h)],
            })
        })
        .collect()
}

/// The distinct labels of `boxes`, in order of first appearance.
pub fn detected_labels(boxes: &[LocBox]) -> Vec<&str> {
    let mut labels: Vec<&str> = Vec::new();
    for b in boxes {
        if !labels.contains(&b.label.as_str()) {
            labels.push(&b.label);
        }
    }
    labels
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_task_from_the_prompt() {
        assert_eq!(
            PaliTask::of_prompt(" detect person ; car ;"),
            PaliTask::Detect {
                labels: vec!["person".into(), "car".into()]
            }
        );
        assert_eq!(PaliTask::of_prompt("caption en"), PaliTask::Text);
        assert_eq!(
            PaliTask::of_prompt("answer en is anyone detected?"),
            PaliTask::Text
        );
        assert_eq!(PaliTask::of_prompt("detector"), PaliTask::Text);
        assert_eq!(PaliTask::of_prompt("ocr"), PaliTask::Text);
    }

    #[test]
    fn parses_boxes_y_before_x_into_frame_pixels() {
        let text = "<loc0256><loc0128><loc0768><loc0512> person ; <loc0000><loc0000><loc1023><loc1023> a red car";
        let boxes = parse_detections(text, 640, 480);
        assert_eq!(boxes.len(), 2);
        assert_eq!(boxes[0].label, "person");
        assert_eq!(boxes[0].corners, [80.0, 120.0, 320.0, 360.0]);
        assert_eq!(boxes[1].label, "a red car");
        assert_eq!(boxes[1].corners[2], 1023.0 / 1024.0 * 640.0);
        assert_eq!(detected_labels(&boxes), vec!["person", "a red car"]);
    }

    #[test]
    fn repeated_labels_are_detected_once() {
        let text =
            "<loc0001><loc0002><loc0003><loc0004> car ; <loc0005><loc0006><loc0007><loc0008> car";
        let boxes = parse_detections(text, 100, 100);
        assert_eq!(boxes.len(), 2);
        assert_eq!(detected_labels(&boxes), vec!["car"]);
    }

    #[test]
    fn malformed_objects_give_no_box_and_no_panic() {
        for text in [
            "",
            ";;;",
            "a cat on a mat",
            "<loc0001><loc0002><loc0003> car",
            "<loc0001><loc0002><loc0003><loc0004>",
            "<loc0001><loc0002><loc0003><loc0004>   ",
            "<loc1024><loc0002><loc0003><loc0004> car",
            "<loc001><loc0002><loc0003><loc0004> car",
            "<loc00a1><loc0002><loc0003><loc0004> car",
            "<loc0001<loc0002><loc0003><loc0004> car",
            "<loc0001><loc0002><loc0003><loc0004><loc0005> car",
            "<loc0500><loc0002><loc0003><loc0004> car",
            "<loc0001><loc0002><loc0003><loc0004 car",
            "<loc",
            "<locé123><loc0002><loc0003><loc0004> car",
            "<loc0001><loc0002><loc0003><loc0004> car <loc0005>",
        ] {
            assert!(parse_detections(text, 640, 480).is_empty(), "{text:?}");
        }
        // A malformed object does not spoil the good one after it.
        let boxes = parse_detections(
            "<loc0001> dog ; <loc0000><loc0000><loc0512><loc0512> cat",
            2,
            2,
        );
        assert_eq!(
            boxes,
            vec![LocBox {
                label: "cat".into(),
                corners: [0.0, 0.0, 1.0, 1.0]
            }]
        );
    }
}
