//! Parity of the YOLO-World backend with Ultralytics' `WorldModel` on the tiny random model:
//! the letterboxed input identical, the head's raw boxes and scores within 1e-4 of the
//! largest, both with the prompt folded in and in the reference's order, and the boxes
//! kept by non-maximum suppression within 0.5 px in the source frame's pixels
//! (tests/parity/yoloworld.json, written by scripts/parity/make_yoloworld_parity.py).
//!
//! In bf16 (where this build and CPU have a bf16 product) the head's boxes and scores move
//! from their f32 values no further than PyTorch's own bf16 (autocast) moves the
//! reference's on the same frames.
//!
//! The checkpoint is the tiny random one with the reference's calibration applied: batch
//! norm statistics taken on the parity frames and the contrastive heads' scale and bias set
//! so that scores spread out (with the random statistics the outputs hardly depend on the
//! frame, and nearly every anchor passes the confidence threshold).

use crate::model::Frame;
use crate::model::families::yoloworld::{YoloWorldModel, nms};
use crate::model::kind::ModelType;
use crate::model::loading::{DtypeChoice, ModelFiles, ModelSettings};
use crate::model::testing::parity::{TOLERANCE, device, matrix, max_abs_diff};
use crate::model::testing::util::{
    SEED, frame, max_abs_difference, parity_dir, scratch_dir, tiny_model,
};
use candle_core::{Device, Tensor};
use serde_json::Value;
use std::path::PathBuf;

/// The tiny checkpoint with the reference's calibrated tensors in place of the random ones.
fn calibrated(exp: &Value) -> PathBuf {
    let dir = scratch_dir("yoloworld-parity");
    let src = by_hand().map_or_else(
        || tiny_model(ModelType::YoloWorld).to_path_buf(),
        |d| d.join("yoloworld"),
    );
    for file in ["config.json", "tokenizer.json"] {
        std::fs::copy(src.join(file), dir.join(file)).unwrap();
    }
    let mut tensors =
        candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    for (name, values) in exp["calibrated"].as_object().unwrap() {
        let old = tensors
            .get(name)
            .unwrap_or_else(|| panic!("no tensor {name}"));
        let values: Vec<f32> = values
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        let new = Tensor::from_vec(values, old.shape(), &Device::Cpu).unwrap();
        tensors.insert(name.clone(), new);
    }
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
    dir
}

/// With `PARITY_YOLOWORLD=DIR` (a by-hand run at a published scale, see
/// scripts/parity/README.md), the checkpoint `DIR/yoloworld` and the file
/// `DIR/yoloworld.json`; else the tiny checkpoint and the committed file.
fn by_hand() -> Option<PathBuf> {
    std::env::var_os("PARITY_YOLOWORLD").map(PathBuf::from)
}

fn expected() -> Value {
    let path = match by_hand() {
        Some(dir) => dir.join("yoloworld.json"),
        None => parity_dir().join("yoloworld.json"),
    };
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (see scripts/parity/README.md)", path.display()));
    let value: Value = serde_json::from_str(&text).expect("parity JSON");
    assert_eq!(value["model"]["seed"].as_u64(), Some(SEED));
    if by_hand().is_none() {
        assert_eq!(value["model"]["scale"], "tiny");
    }
    value
}

fn images(exp: &Value) -> Vec<Frame> {
    exp["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            let size = |k: &str| i[k].as_u64().unwrap() as usize;
            frame(i["kind"].as_str().unwrap(), size("width"), size("height"))
        })
        .collect()
}

/// The letterboxed batch back as packed RGB bytes per frame, `(h, w, 3)` row-major.
fn input_bytes(pixels: &Tensor) -> Vec<Vec<u8>> {
    let (b, _, h, w) = pixels.dims4().unwrap();
    let hwc = pixels.permute((0, 2, 3, 1)).unwrap().contiguous().unwrap();
    (0..b)
        .map(|i| {
            hwc.get(i)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .into_iter()
                .map(|v| {
                    let byte = (v * 255.0).round();
                    assert!((byte - v * 255.0).abs() < 1e-3, "not a whole byte: {v}");
                    byte as u8
                })
                .collect::<Vec<u8>>()
        })
        .inspect(|bytes| assert_eq!(bytes.len(), h * w * 3))
        .collect()
}

/// The letterboxed bytes against the reference's: shape, sums and samples, exactly.
fn check_pixels(bytes: &[u8], shape: (usize, usize), exp: &Value) {
    let want: Vec<usize> = exp["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    assert_eq!([shape.1, shape.0, 3], want[..], "letterboxed shape");
    let sum: u64 = bytes.iter().map(|&b| b as u64).sum();
    let weighted: u64 = bytes
        .iter()
        .enumerate()
        .map(|(i, &b)| (i as u64 % 9973) * b as u64)
        .sum();
    assert_eq!(sum, exp["sum"].as_u64().unwrap(), "pixel sum");
    assert_eq!(
        weighted,
        exp["weighted_sum"].as_u64().unwrap(),
        "weighted pixel sum"
    );
    for (i, v) in exp["sample_index"]
        .as_array()
        .unwrap()
        .iter()
        .zip(exp["samples"].as_array().unwrap())
    {
        assert_eq!(
            bytes[i.as_u64().unwrap() as usize] as u64,
            v.as_u64().unwrap()
        );
    }
}

/// The sampled anchors' raw outputs against the reference's: boxes within 1e-4 of the
/// largest box value, scores within 1e-4 of the largest score. Returns both differences,
/// relative to those largest values.
fn check_raw(raw: &Tensor, exp: &Value) -> (f32, f32) {
    let rows = raw.get(0).unwrap().to_vec2::<f32>().unwrap();
    assert_eq!(
        rows[0].len() as u64,
        exp["anchors"].as_u64().unwrap(),
        "anchor count"
    );
    let want = matrix(&exp["raw"]);
    let largest = matrix(&Value::Array(vec![exp["raw_abs_max"].clone()]))[0].clone();
    let (mut boxes, mut scores) = (0f32, 0f32);
    for (a, want) in exp["anchor_index"].as_array().unwrap().iter().zip(&want) {
        let a = a.as_u64().unwrap() as usize;
        for (r, w) in want.iter().enumerate() {
            let d = (rows[r][a] - w).abs();
            if r < 4 {
                boxes = boxes.max(d / largest[0]);
            } else {
                scores = scores.max(d / largest[1]);
            }
        }
    }
    (boxes, scores)
}

/// Non-maximum suppression on our raw output against the reference's kept boxes, for each
/// of the file's settings: the same number of boxes, and each of the reference's matched by
/// one of ours with the same label, corners within 0.5 px and score within 1e-4. The order
/// is not compared: scores a few 1e-6 apart (several hundred boxes share [0.25, 1]) may
/// swap places. Returns the number of boxes and the largest corner difference.
fn check_kept(model: &YoloWorldModel, frame: &Frame, raw: &Tensor, exp: &Value) -> (usize, f32) {
    let (_, lbs) = model.preprocess(&[frame]).unwrap();
    let values = raw
        .get(0)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let (rows, anchors) = (raw.dim(1).unwrap(), raw.dim(2).unwrap());
    let (mut count, mut worst) = (0, 0f32);
    for case in exp["suppressions"].as_array().unwrap() {
        let setting = |k: &str| case[k].as_f64().unwrap() as f32;
        let (kept, _) = nms::suppress(&values, anchors, rows - 4, setting("conf"), setting("iou"));
        let want = matrix(&case["detections"]);
        assert_eq!(
            kept.len(),
            want.len(),
            "boxes kept at IoU {}",
            setting("iou")
        );
        let mut ours: Vec<Option<(usize, f32, [f32; 4])>> = kept
            .iter()
            .map(|k| Some((k.label, k.score, lbs[0].to_source(k.corners))))
            .collect();
        for w in &want {
            let distance = |b: &[f32; 4]| {
                b.iter()
                    .zip(&w[..4])
                    .map(|(x, y)| (x - y).abs())
                    .fold(0f32, f32::max)
            };
            let (at, d) = ours
                .iter()
                .enumerate()
                .filter_map(|(i, o)| {
                    o.filter(|o| o.0 == w[5] as usize && (o.1 - w[4]).abs() <= TOLERANCE)
                        .map(|o| (i, distance(&o.2)))
                })
                .min_by(|a, b| a.1.total_cmp(&b.1))
                .unwrap_or_else(|| panic!("no box of ours matches {w:?}"));
            assert!(d <= 0.5, "the box nearest {w:?} is {d} px off");
            worst = worst.max(d);
            ours[at] = None;
        }
        count += kept.len();
    }
    (count, worst)
}

#[test]
fn yoloworld_matches_ultralytics() {
    let exp = expected();
    let files = ModelFiles::from_dir(&calibrated(&exp)).unwrap();
    let settings = ModelSettings {
        model_type: ModelType::YoloWorld,
        dtype: DtypeChoice::F32,
        ..ModelSettings::default()
    };
    let model = YoloWorldModel::load(&files, device(), &settings).unwrap();
    let text = matrix(&exp["text"]);
    let (k, dim) = (text.len(), text[0].len());
    let text = Tensor::from_vec(text.concat(), (k, dim), &device()).unwrap();
    let frames = images(&exp);
    let mut kept_total = 0;
    for (frame, want) in frames.iter().zip(exp["frames"].as_array().unwrap()) {
        let (pixels, lbs) = model.preprocess(&[frame]).unwrap();
        check_pixels(&input_bytes(&pixels)[0], lbs[0].canvas, &want["pixels"]);
        for folded in [false, true] {
            let raw = model.head_output(&pixels, &text, folded).unwrap();
            let (boxes, scores) = check_raw(&raw, want);
            eprintln!(
                "yoloworld {}x{} (folded {folded}): boxes {boxes:e}, scores {scores:e} of the largest",
                frame.width, frame.height
            );
            assert!(
                boxes <= TOLERANCE && scores <= TOLERANCE,
                "raw outputs differ"
            );
            let (kept, worst) = check_kept(&model, frame, &raw, want);
            eprintln!("  {kept} boxes kept, corners within {worst} px");
            kept_total += kept;
        }
    }
    assert!(
        kept_total > 0,
        "no box kept: the suppression is not compared"
    );

    // Frames of different sizes in one batch: the square letterbox.
    let mixed: Vec<&Frame> = frames[1..].iter().collect();
    let (pixels, lbs) = model.preprocess(&mixed).unwrap();
    for ((bytes, lb), want) in input_bytes(&pixels)
        .iter()
        .zip(&lbs)
        .zip(exp["square_pixels"].as_array().unwrap())
    {
        check_pixels(bytes, lb.canvas, want);
    }
}

/// The cosine of two tensors' values taken as one vector each.
fn cosine(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let dot = |x: &[f32], y: &[f32]| {
        x.iter()
            .zip(y)
            .map(|(p, q)| *p as f64 * *q as f64)
            .sum::<f64>()
    };
    dot(&a, &b) / (dot(&a, &a) * dot(&b, &b)).sqrt()
}

/// In bf16, the head's boxes and scores against f32, as distances `1 - cosine` (each part
/// taken as one vector), summed over the parity frames: no larger than the distances of
/// PyTorch's autocast bf16 from its f32 on the same model and frames. This calibrated
/// random network is sensitive: both sides' score cosines fall to about 0.997 on the small
/// frames, where a trained one moves far less.
#[test]
fn yoloworld_in_bf16_moves_no_further_from_f32_than_autocast() {
    if crate::model::kernels::fused_linear::bf16_product().is_none() {
        eprintln!("skipped: no bf16 product in this build on this CPU");
        return;
    }
    let exp = expected();
    let files = ModelFiles::from_dir(&calibrated(&exp)).unwrap();
    let load = |dtype| {
        let settings = ModelSettings {
            model_type: ModelType::YoloWorld,
            dtype,
            ..ModelSettings::default()
        };
        YoloWorldModel::load(&files, Device::Cpu, &settings).unwrap()
    };
    let (f32_model, bf16_model) = (load(DtypeChoice::F32), load(DtypeChoice::Bf16));
    assert_eq!(
        crate::model::VisionLanguageModel::info(&bf16_model).dtype,
        "bf16"
    );
    let text = matrix(&exp["text"]);
    let (k, dim) = (text.len(), text[0].len());
    let text = Tensor::from_vec(text.concat(), (k, dim), &Device::Cpu).unwrap();
    let (mut ours, mut torch) = ([0f64; 2], [0f64; 2]);
    for (frame, want) in images(&exp).iter().zip(exp["frames"].as_array().unwrap()) {
        let (pixels, _) = f32_model.preprocess(&[frame]).unwrap();
        let f32_out = f32_model.head_output(&pixels, &text, true).unwrap();
        let bf16_out = bf16_model.head_output(&pixels, &text, true).unwrap();
        let rows = f32_out.dim(1).unwrap();
        for (part, (start, len)) in [(0, 4), (4, rows - 4)].into_iter().enumerate() {
            let narrow = |t: &Tensor| t.narrow(1, start, len).unwrap();
            let cos = cosine(&narrow(&f32_out), &narrow(&bf16_out));
            let reference = want["autocast_cosine"][part].as_f64().unwrap();
            eprintln!(
                "yoloworld bf16 {}x{} {}: cosine to f32 {cos:.7} (PyTorch autocast {reference:.7})",
                frame.width,
                frame.height,
                ["boxes", "scores"][part]
            );
            ours[part] += 1.0 - cos;
            torch[part] += 1.0 - reference;
        }
        let off = max_abs_difference(&f32_out, &bf16_out);
        assert!(off > 0.0, "bf16 gave exactly f32's outputs: it did not run");
    }
    for part in 0..2 {
        assert!(
            ours[part] <= torch[part],
            "{}: 1 - cosine summed {} against PyTorch's {}",
            ["boxes", "scores"][part],
            ours[part],
            torch[part]
        );
    }
}

/// The whole path on a JPEG file: the worker's decoder, the prompt's phrases through the
/// checkpoint's CLIP text tower, the folded network, the default suppression and the
/// output JSON, against the reference predictor's (OpenCV's decoder, transformers' text
/// tower) on the same file: the same boxes, labels identical, scores within 1e-4, corners
/// within 0.5 px.
#[test]
fn yoloworld_on_a_jpeg_matches_ultralytics_predict() {
    use crate::model::VisionLanguageModel;
    use crate::model::testing::util::prompt;
    use crate::source::image_decode::decode_image;
    let exp = expected();
    let want = &exp["jpeg"];
    let files = ModelFiles::from_dir(&calibrated(&exp)).unwrap();
    let settings = ModelSettings {
        model_type: ModelType::YoloWorld,
        dtype: DtypeChoice::F32,
        ..ModelSettings::default()
    };
    let mut model = YoloWorldModel::load(&files, device(), &settings).unwrap();
    let phrases: Vec<String> = want["phrases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect();
    let text = model.text_embeddings(&phrases).unwrap();
    let text_diff = max_abs_diff(&text.to_vec2::<f32>().unwrap(), &matrix(&want["text"]));
    assert!(
        text_diff <= TOLERANCE,
        "text embeddings differ by {text_diff}"
    );

    let path = parity_dir()
        .join("jpeg")
        .join(want["file"].as_str().unwrap());
    let frame = decode_image(&std::fs::read(path).unwrap(), u64::MAX).unwrap();
    let (pixels, _) = model.preprocess(&[&frame]).unwrap();
    let ours = &input_bytes(&pixels)[0];
    let samples = want["pixels"]["samples"].as_array().unwrap();
    let off = want["pixels"]["sample_index"]
        .as_array()
        .unwrap()
        .iter()
        .zip(samples)
        .map(|(i, v)| (ours[i.as_u64().unwrap() as usize] as i64 - v.as_i64().unwrap()).abs())
        .max()
        .unwrap();

    let out = model
        .infer(&[&frame], &prompt(&phrases.join(", ")))
        .unwrap()
        .remove(0);
    let dets = out["detections"].as_array().unwrap();
    let reference = matrix(&want["detections"]);
    assert_eq!(dets.len(), reference.len(), "boxes kept");
    let mut ours: Vec<Option<(String, f32, Vec<f32>)>> = dets
        .iter()
        .map(|d| {
            let b = d["box"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32);
            Some((
                d["label"].as_str().unwrap().to_string(),
                d["score"].as_f64().unwrap() as f32,
                b.collect(),
            ))
        })
        .collect();
    let mut worst = 0f32;
    for w in &reference {
        let label = &phrases[w[5] as usize];
        let distance = |b: &[f32]| {
            b.iter()
                .zip(&w[..4])
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max)
        };
        let (at, d) = ours
            .iter()
            .enumerate()
            .filter_map(|(i, o)| {
                o.as_ref()
                    .filter(|o| &o.0 == label && (o.1 - w[4]).abs() <= TOLERANCE)
                    .map(|o| (i, distance(&o.2)))
            })
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .unwrap_or_else(|| panic!("no box of ours matches {w:?}"));
        assert!(d <= 0.5, "the box nearest {w:?} is {d} px off");
        worst = worst.max(d);
        ours[at] = None;
    }
    eprintln!(
        "yoloworld on {}: text embeddings {text_diff:e}, decoded pixels within {off} levels at \
         the samples, {} boxes matched within {worst} px",
        want["file"],
        reference.len()
    );
}
