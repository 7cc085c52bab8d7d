//! Pictures of a job's moments: a frame with its boxes, labels, track ids, zones and lines
//! drawn, encoded as a JPEG small enough to keep one per event; and the per-job cap on how
//! many are kept.
//!
//! Pure: pixels in, bytes out. Drawing is `imageproc`'s, text in the bundled DejaVu Sans
//! Mono (assets/fonts, with its licence).

mod cap;
mod shots;

pub use cap::RateCap;
pub use shots::{Pictures, Shot};

use crate::frame::Frame;
use crate::tracker::output::{DETECTIONS_FIELD, TRACK_ID_FIELD};
use crate::zones::{Places, Point, Units};
use ab_glyph::{FontRef, PxScale};
use image::imageops;
use image::{Rgb, RgbImage};
use imageproc::drawing::{draw_filled_rect_mut, draw_line_segment_mut, draw_text_mut, text_size};
use imageproc::rect::Rect;
use serde_json::Value;
use std::sync::LazyLock;

/// The largest picture kept (720p): a larger frame is scaled down to fit.
pub const MAX_SIZE: (u32, u32) = (1280, 720);

/// The most bytes a picture takes (about 100 KB): a picture that does not fit at one
/// quality of [`QUALITIES`] is tried at the next, and at the last one it is scaled down.
pub const MAX_BYTES: usize = 100_000;

/// JPEG qualities tried in turn. A 720p camera picture with its drawing fits at the first
/// (65 to 92 KB on the benchmark pictures); a noisy one needs a lower one, or a smaller
/// picture.
pub const QUALITIES: [i32; 4] = [60, 50, 40, 30];

/// The smallest share of its sides a picture is scaled to in one step, so that a picture
/// whose size estimate misleads still shrinks quickly.
const MIN_SHRINK: f32 = 0.5;

/// The smallest side a picture is scaled down to: below it, what fits is not worth seeing.
const MIN_SIDE: u32 = 64;

/// The colour of zone outlines and names.
pub const ZONE_COLOUR: Rgb<u8> = Rgb([255, 200, 0]);
/// The colour of lines and their names.
pub const LINE_COLOUR: Rgb<u8> = Rgb([0, 160, 255]);
/// The colour of a box without a track id.
pub const UNTRACKED_COLOUR: Rgb<u8> = Rgb([255, 255, 255]);

/// Track colours, taken by track id in turn: bright, far from each other and from the
/// zone and line colours.
const TRACK_COLOURS: [Rgb<u8>; 6] = [
    Rgb([255, 0, 255]),
    Rgb([0, 255, 255]),
    Rgb([255, 96, 0]),
    Rgb([128, 255, 0]),
    Rgb([255, 255, 255]),
    Rgb([160, 96, 255]),
];

/// Width in pixels of every outline and line drawn.
pub const STROKE: i32 = 3;

static FONT: LazyLock<Option<FontRef<'static>>> = LazyLock::new(|| {
    FontRef::try_from_slice(include_bytes!("../../assets/fonts/DejaVuSansMono.ttf")).ok()
});

/// Why a snapshot could not be made.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("the frame's pixels do not match its size")]
    BadFrame,
    #[error("encoding the JPEG failed: {0}")]
    Encode(#[from] turbojpeg::Error),
}

/// The colour a box of track `track_id` is drawn in.
pub fn box_colour(track_id: Option<u64>) -> Rgb<u8> {
    match track_id {
        Some(id) => TRACK_COLOURS[(id % TRACK_COLOURS.len() as u64) as usize],
        None => UNTRACKED_COLOUR,
    }
}

/// `frame` (fitted to [`MAX_SIZE`]) with `places` and the boxes of `output` (a model
/// output whose `detections` boxes are in source pixels) drawn on it, as a JPEG.
pub fn snapshot_jpeg(
    frame: &Frame,
    output: Option<&Value>,
    places: &Places,
) -> Result<Vec<u8>, SnapshotError> {
    let picture = annotate(frame, output, places)?;
    encode_within(picture, MAX_BYTES)
}

/// `frame` (fitted to [`MAX_SIZE`]) with `places` and the boxes of `output` drawn on it.
pub fn annotate(
    frame: &Frame,
    output: Option<&Value>,
    places: &Places,
) -> Result<RgbImage, SnapshotError> {
    let mut picture = fitted(frame)?;
    // Source pixels to picture pixels.
    let scale = (
        picture.width() as f32 / frame.source_width.max(1) as f32,
        picture.height() as f32 / frame.source_height.max(1) as f32,
    );
    let place_scale = match places.units {
        Units::Pixels => scale,
        Units::Normalised => (picture.width() as f32, picture.height() as f32),
    };
    let text = text_scale(&picture);
    draw_places(&mut picture, places, place_scale, text);
    if let Some(output) = output {
        draw_boxes(&mut picture, output, scale, text);
    }
    Ok(picture)
}

/// `picture` as a JPEG of at most `max_bytes`: at the first of [`QUALITIES`] it fits at,
/// else at the last one, scaled down until it fits (to no less than [`MIN_SIDE`], where
/// it is kept as it comes).
pub fn encode_within(picture: RgbImage, max_bytes: usize) -> Result<Vec<u8>, SnapshotError> {
    let mut jpeg = Vec::new();
    for quality in QUALITIES {
        jpeg = encode_jpeg(&picture, quality)?;
        if jpeg.len() <= max_bytes {
            return Ok(jpeg);
        }
    }
    let lowest = QUALITIES[QUALITIES.len() - 1];
    let mut picture = picture;
    while jpeg.len() > max_bytes && picture.width().min(picture.height()) > MIN_SIDE {
        // A JPEG's size follows its pixel count; aim a little under the cap.
        let short = picture.width().min(picture.height()) as f32;
        let shrink = (0.9 * max_bytes as f32 / jpeg.len() as f32)
            .sqrt()
            .clamp(MIN_SHRINK, 1.0)
            .max(MIN_SIDE as f32 / short);
        let side = |s: u32| ((s as f32 * shrink).round() as u32).max(1);
        picture = imageops::thumbnail(&picture, side(picture.width()), side(picture.height()));
        jpeg = encode_jpeg(&picture, lowest)?;
    }
    Ok(jpeg)
}

/// Encodes `picture` as a JPEG at `quality` (libjpeg-turbo, as the OpenAI model's frames
/// are).
pub fn encode_jpeg(picture: &RgbImage, quality: i32) -> Result<Vec<u8>, SnapshotError> {
    let mut compressor = turbojpeg::Compressor::new()?;
    compressor.set_quality(quality)?;
    compressor.set_subsamp(turbojpeg::Subsamp::Sub2x2)?;
    let image = turbojpeg::Image {
        pixels: picture.as_raw().as_slice(),
        width: picture.width() as usize,
        pitch: picture.width() as usize * 3,
        height: picture.height() as usize,
        format: turbojpeg::PixelFormat::RGB,
    };
    Ok(compressor.compress_to_vec(image)?)
}

/// The frame's pixels, scaled down to fit [`MAX_SIZE`] when larger.
fn fitted(frame: &Frame) -> Result<RgbImage, SnapshotError> {
    let picture = RgbImage::from_raw(frame.width, frame.height, frame.rgb.to_vec())
        .ok_or(SnapshotError::BadFrame)?;
    let (w, h) = (frame.width as f32, frame.height as f32);
    let fit = (MAX_SIZE.0 as f32 / w).min(MAX_SIZE.1 as f32 / h);
    if fit >= 1.0 {
        return Ok(picture);
    }
    let size = |side: f32| ((side * fit).round() as u32).max(1);
    // Averages each output pixel's area: several times quicker than a filtered resize.
    Ok(imageops::thumbnail(&picture, size(w), size(h)))
}

/// Label text height: readable on a small frame, not too large on a big one.
fn text_scale(picture: &RgbImage) -> PxScale {
    PxScale::from((picture.height() as f32 / 40.0).clamp(10.0, 24.0))
}

fn draw_places(picture: &mut RgbImage, places: &Places, scale: (f32, f32), text: PxScale) {
    let at = |p: &Point| (p[0] as f32 * scale.0, p[1] as f32 * scale.1);
    for zone in &places.zones {
        let points: Vec<(f32, f32)> = zone.polygon.iter().map(at).collect();
        for (i, from) in points.iter().enumerate() {
            let to = points[(i + 1) % points.len()];
            thick_line(picture, *from, to, ZONE_COLOUR);
        }
        if let Some(first) = points.first() {
            caption(picture, *first, &zone.name, ZONE_COLOUR, text);
        }
    }
    for line in &places.lines {
        let (from, to) = (at(&line.from), at(&line.to));
        thick_line(picture, from, to, LINE_COLOUR);
        caption(picture, from, &line.name, LINE_COLOUR, text);
    }
}

fn draw_boxes(picture: &mut RgbImage, output: &Value, scale: (f32, f32), text: PxScale) {
    let Some(detections) = output.get(DETECTIONS_FIELD).and_then(Value::as_array) else {
        return;
    };
    for d in detections {
        let Some(b) = d.get("box").and_then(Value::as_array) else {
            continue;
        };
        let [x1, y1, x2, y2] = [0, 1, 2, 3].map(|i| b.get(i).and_then(Value::as_f64));
        let (Some(x1), Some(y1), Some(x2), Some(y2)) = (x1, y1, x2, y2) else {
            continue;
        };
        let track_id = d.get(TRACK_ID_FIELD).and_then(Value::as_u64);
        let colour = box_colour(track_id);
        let corner = |x: f64, y: f64| (x as f32 * scale.0, y as f32 * scale.1);
        let (a, b) = (corner(x1, y1), corner(x2, y2));
        outline(picture, a, b, colour);
        let label = d.get("label").and_then(Value::as_str).unwrap_or_default();
        let name = match track_id {
            Some(id) => format!("{label} #{id}"),
            None => label.to_string(),
        };
        caption(picture, a, &name, colour, text);
    }
}

/// A box outline [`STROKE`] pixels wide, drawn inward from the corners `a` and `b`.
fn outline(picture: &mut RgbImage, a: (f32, f32), b: (f32, f32), colour: Rgb<u8>) {
    let (x1, y1) = (a.0.min(b.0).round() as i32, a.1.min(b.1).round() as i32);
    let (x2, y2) = (a.0.max(b.0).round() as i32, a.1.max(b.1).round() as i32);
    let (w, h) = ((x2 - x1).max(1) as u32, (y2 - y1).max(1) as u32);
    let stroke = STROKE as u32;
    for edge in [
        Rect::at(x1, y1).of_size(w, stroke.min(h)),
        Rect::at(x1, y2 - STROKE).of_size(w, stroke.min(h)),
        Rect::at(x1, y1).of_size(stroke.min(w), h),
        Rect::at(x2 - STROKE, y1).of_size(stroke.min(w), h),
    ] {
        draw_filled_rect_mut(picture, edge, colour);
    }
}

/// A segment [`STROKE`] pixels wide.
fn thick_line(picture: &mut RgbImage, from: (f32, f32), to: (f32, f32), colour: Rgb<u8>) {
    let half = (STROKE / 2) as f32;
    let steep = (to.1 - from.1).abs() > (to.0 - from.0).abs();
    for i in 0..STROKE {
        let d = i as f32 - half;
        let (dx, dy) = if steep { (d, 0.0) } else { (0.0, d) };
        draw_line_segment_mut(
            picture,
            (from.0 + dx, from.1 + dy),
            (to.0 + dx, to.1 + dy),
            colour,
        );
    }
}

/// `text` in black on a `colour` tag whose bottom left is at `at` (kept inside the picture).
fn caption(picture: &mut RgbImage, at: (f32, f32), text: &str, colour: Rgb<u8>, scale: PxScale) {
    let Some(font) = FONT.as_ref() else {
        return;
    };
    if text.is_empty() {
        return;
    }
    let (w, h) = text_size(scale, font, text);
    let pad = 2;
    let (tag_w, tag_h) = (w + 2 * pad, h + 2 * pad);
    let max_x = picture.width().saturating_sub(tag_w) as i32;
    let x = (at.0.round() as i32).clamp(0, max_x.max(0));
    let y = (at.1.round() as i32 - tag_h as i32).max(0);
    draw_filled_rect_mut(picture, Rect::at(x, y).of_size(tag_w, tag_h), colour);
    let black = Rgb([0, 0, 0]);
    draw_text_mut(
        picture,
        black,
        x + pad as i32,
        y + pad as i32,
        scale,
        font,
        text,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use serde_json::json;

    fn grey_frame(width: u32, height: u32) -> Frame {
        let rgb = vec![90u8; (width * height * 3) as usize];
        Frame::new(width, height, Bytes::from(rgb)).unwrap()
    }

    fn close(a: Rgb<u8>, b: Rgb<u8>) -> bool {
        a.0.iter().zip(b.0).all(|(x, y)| x.abs_diff(y) <= 40)
    }

    fn no_places() -> Places {
        Places {
            units: Units::Pixels,
            zones: Vec::new(),
            lines: Vec::new(),
        }
    }

    #[test]
    fn a_drawn_box_edge_reads_back_in_its_colour_from_the_jpeg() {
        let frame = grey_frame(320, 240);
        let output = json!({"detections": [
            {"label": "red", "score": 0.9, "box": [40.0, 50.0, 200.0, 180.0], "track_id": 7}
        ]});
        let jpeg = snapshot_jpeg(&frame, Some(&output), &no_places()).unwrap();
        let picture = image::load_from_memory(&jpeg).unwrap().to_rgb8();
        assert_eq!(picture.dimensions(), (320, 240));
        let colour = box_colour(Some(7));
        // The middle of the left, right and bottom edges, one pixel in.
        for (x, y) in [(41, 115), (198, 115), (120, 178)] {
            let got = *picture.get_pixel(x, y);
            assert!(close(got, colour), "({x}, {y}) is {got:?}, not {colour:?}");
        }
        // Inside the box the frame is untouched.
        assert!(close(*picture.get_pixel(120, 115), Rgb([90, 90, 90])));
    }

    #[test]
    fn boxes_in_source_pixels_land_on_a_scaled_down_frame_and_zones_are_drawn() {
        // A 640x360 frame of a 1280x720 source: a box at x 400 in the source is at 200.
        let frame = grey_frame(640, 360).with_source_size(1280, 720);
        let output = json!({"detections": [
            {"label": "car", "box": [400.0, 100.0, 800.0, 600.0], "track_id": 1}
        ]});
        let places = Places {
            units: Units::Normalised,
            zones: crate::zones::parse_zones(
                r#"{"z": [[0.1,0.1],[0.9,0.1],[0.9,0.9]]}"#,
                Units::Normalised,
            )
            .unwrap(),
            lines: Vec::new(),
        };
        let picture = annotate(&frame, Some(&output), &places).unwrap();
        assert_eq!(*picture.get_pixel(201, 200), box_colour(Some(1)));
        // The zone's top edge runs along y = 36 from x = 64 to 576.
        assert_eq!(*picture.get_pixel(400, 36), ZONE_COLOUR);
    }

    /// A 1080p frame: a smooth gradient, with noise of up to `noise` levels per channel.
    fn frame_1080p(noise: u32) -> Frame {
        let (w, h) = (1920u32, 1080u32);
        let mut seed = 0x9e37_79b9_u32;
        let mut rgb = Vec::with_capacity((w * h * 3) as usize);
        for y in 0..h {
            for x in 0..w {
                for c in 0..3 {
                    seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                    let grain = if noise == 0 {
                        0
                    } else {
                        (seed >> 8) % (2 * noise + 1)
                    };
                    let base = (x * 200 / w + y * 40 / h + c * 10) as i64;
                    rgb.push((base + grain as i64 - noise as i64).clamp(0, 255) as u8);
                }
            }
        }
        Frame::new(w, h, Bytes::from(rgb)).unwrap()
    }

    #[test]
    fn a_camera_like_1080p_frame_is_fitted_to_720p_at_the_first_quality() {
        let frame = frame_1080p(0);
        let jpeg = snapshot_jpeg(&frame, None, &no_places()).unwrap();
        let picture = image::load_from_memory(&jpeg).unwrap();
        assert_eq!((picture.width(), picture.height()), MAX_SIZE);
        let fitted = annotate(&frame, None, &no_places()).unwrap();
        assert_eq!(jpeg, encode_jpeg(&fitted, QUALITIES[0]).unwrap());
    }

    #[test]
    fn a_noisy_1080p_frame_stays_under_the_cap() {
        let frame = frame_1080p(60);
        let output = json!({"detections": [
            {"label": "car", "box": [400.0, 300.0, 900.0, 700.0], "track_id": 2}
        ]});
        let fitted = annotate(&frame, Some(&output), &no_places()).unwrap();
        let first = encode_jpeg(&fitted, QUALITIES[0]).unwrap();
        assert!(
            first.len() > MAX_BYTES,
            "the frame is noisy enough: {}",
            first.len()
        );
        let jpeg = snapshot_jpeg(&frame, Some(&output), &no_places()).unwrap();
        assert!(jpeg.len() <= MAX_BYTES, "{} bytes", jpeg.len());
        let picture = image::load_from_memory(&jpeg).unwrap();
        // Scaled down, if at all, keeping its shape.
        let (w, h) = (picture.width(), picture.height());
        assert!(w <= MAX_SIZE.0 && w >= MIN_SIDE, "{w}x{h}");
        assert!((w as f32 / h as f32 - 16.0 / 9.0).abs() < 0.05, "{w}x{h}");
    }

    #[test]
    fn a_picture_that_cannot_shrink_further_is_kept_as_it_comes() {
        // Halved, then down to the smallest side, keeping its shape.
        let picture = annotate(&grey_frame(200, 150), None, &no_places()).unwrap();
        let jpeg = encode_within(picture, 10).unwrap();
        let back = image::load_from_memory(&jpeg).unwrap();
        assert_eq!((back.width(), back.height()), (85, MIN_SIDE));
    }

    #[test]
    fn the_bundled_font_loads() {
        assert!(FONT.is_some());
    }
}
