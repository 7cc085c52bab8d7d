//! Parity of the candle backends with transformers: compares preprocessing, embeddings,
//! logits and greedy caption ids on the tiny random models against the expected outputs in
//! `tests/parity/*.json`, which `scripts/parity/make_parity.py` wrote from the very same
//! weights with transformers (PIL image backend). See scripts/parity/README.md.

use crate::model::Frame;
use crate::model::families::blip::BlipModel;
use crate::model::families::clip::ClipModel;
use crate::model::families::owlvit::{OwlVitModel, post_process};
use crate::model::families::paligemma::PaliGemmaModel;
use crate::model::families::paligemma::detect::parse_detections;
use crate::model::families::siglip::SiglipModel;
use crate::model::kind::ModelType;
use crate::model::loading::{DeviceChoice, DtypeChoice, ModelFiles, ModelSettings, select_device};
use crate::model::testing::util::{
    IMAGES, SEED, SIGLIP_IMAGES, frames, frames_of, parity_dir, tiny_model,
};
use crate::model::{ModelSize, write_random_model};
use candle_core::{Device, Tensor};
use serde_json::Value;
use std::path::PathBuf;

/// The bound the brief sets on embedding and logit differences.
pub(super) const TOLERANCE: f32 = 1e-4;

/// Where the expected outputs and the models come from: the committed files and the tiny
/// models, or, with `PARITY_FULL=DIR` (a by-hand run at full size, see
/// scripts/parity/README.md), `DIR/json/*.json` and the full-size models in `DIR/<kind>`.
fn full_size_root() -> Option<PathBuf> {
    std::env::var_os("PARITY_FULL").map(PathBuf::from)
}

fn model_dir(kind: ModelType) -> PathBuf {
    match full_size_root() {
        Some(root) => root.join(kind.as_str()),
        None => tiny_model(kind).to_path_buf(),
    }
}

fn expected(name: &str) -> Value {
    expected_with(name, IMAGES)
}

fn expected_with(name: &str, images_used: &[(&str, usize, usize)]) -> Value {
    let (dir, size) = match full_size_root() {
        Some(root) => (root.join("json"), "full"),
        None => (parity_dir(), "tiny"),
    };
    let path = dir.join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (see scripts/parity/README.md)", path.display()));
    let value: Value = serde_json::from_str(&text).expect("parity JSON");
    let model = &value["model"];
    assert_eq!(
        model["seed"].as_u64(),
        Some(SEED),
        "parity file made from another seed"
    );
    assert_eq!(model["size"], size);
    let images: Vec<(String, usize, usize)> = value["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["kind"].as_str().unwrap().to_string(),
                i["width"].as_u64().unwrap() as usize,
                i["height"].as_u64().unwrap() as usize,
            )
        })
        .collect();
    let ours: Vec<(String, usize, usize)> = images_used
        .iter()
        .map(|&(k, w, h)| (k.to_string(), w, h))
        .collect();
    assert_eq!(images, ours, "parity file made from other images");
    value
}

pub(super) fn matrix(v: &Value) -> Vec<Vec<f32>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|row| {
            row.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect()
        })
        .collect()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

pub(super) fn max_abs_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len(), "row count");
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| {
            assert_eq!(x.len(), y.len(), "column count");
            x.iter().zip(y).map(|(p, q)| (p - q).abs())
        })
        .fold(0.0, f32::max)
}

pub(super) fn to_rows(t: &Tensor) -> Vec<Vec<f32>> {
    t.to_vec2::<f32>().unwrap()
}

/// Checks our preprocessing against transformers' PIL backend; returns the largest
/// difference of the sampled values.
fn check_pixels(pixels: &Tensor, expected: &Value) -> f32 {
    let mut worst = 0f32;
    for (i, exp) in expected.as_array().unwrap().iter().enumerate() {
        let ours: Vec<f32> = pixels
            .get(i)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let sum: f64 = ours.iter().map(|&v| v as f64).sum();
        let abs_sum: f64 = ours.iter().map(|&v| v.abs() as f64).sum();
        // A single pixel off by 1/255 moves the sum by about 0.015.
        assert!(
            (sum - exp["sum"].as_f64().unwrap()).abs() < 1e-2,
            "image {i} pixel sum {sum} against {}",
            exp["sum"]
        );
        assert!(
            (abs_sum - exp["abs_sum"].as_f64().unwrap()).abs() < 1e-2,
            "image {i} |sum|"
        );
        for (idx, want) in exp["sample_index"]
            .as_array()
            .unwrap()
            .iter()
            .zip(exp["samples"].as_array().unwrap())
        {
            let d = (ours[idx.as_u64().unwrap() as usize] - want.as_f64().unwrap() as f32).abs();
            worst = worst.max(d);
        }
    }
    assert!(worst < 1e-5, "pixel samples differ by {worst}");
    worst
}

/// Where the parity tests run: the CPU, or with `DEVICE=cuda` the GPU (scripts/gpu-check).
/// One device for the process: tensors of two CUDA device handles do not mix.
pub(super) fn device() -> Device {
    static DEVICE: std::sync::OnceLock<Device> = std::sync::OnceLock::new();
    DEVICE
        .get_or_init(|| match std::env::var("DEVICE").as_deref() {
            Ok("cuda") => select_device(DeviceChoice::Cuda).expect("DEVICE=cuda: no usable GPU"),
            _ => Device::Cpu,
        })
        .clone()
}

fn settings(kind: ModelType) -> ModelSettings {
    ModelSettings {
        model_type: kind,
        model_path: Some(model_dir(kind)),
        // Parity is shown for the f32 path; bf16 is compared with f32 (fused_linear).
        dtype: DtypeChoice::F32,
        ..ModelSettings::default()
    }
}

/// CLIP's logits per image, as transformers computes them: scaled cosine similarities.
pub(super) fn clip_logits(model: &ClipModel, image: &Tensor, text: &Tensor) -> Tensor {
    let norm = |t: &Tensor| t.broadcast_div(&t.sqr()?.sum_keepdim(1)?.sqrt()?);
    (norm(image)
        .unwrap()
        .matmul(&norm(text).unwrap().t().unwrap())
        .unwrap()
        * model.logit_scale() as f64)
        .unwrap()
}

#[test]
fn clip_matches_transformers() {
    let exp = expected("clip.json");
    let s = settings(ModelType::Clip);
    let files = ModelFiles::from_dir(&model_dir(ModelType::Clip)).unwrap();
    let model = ClipModel::load(&files, device(), &s).unwrap();

    let frames = frames();
    let refs: Vec<&Frame> = frames.iter().collect();
    let pixels = model.preprocessor().batch(&refs, &device()).unwrap();
    let pixel_diff = check_pixels(&pixels, &exp["pixels"]);

    let texts: Vec<String> = exp["texts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().to_string())
        .collect();
    for (text, want) in texts.iter().zip(exp["input_ids"].as_array().unwrap()) {
        assert_eq!(model.token_ids(text).unwrap(), ids(want), "ids of {text:?}");
    }

    let image = model.image_embeddings_from_pixels(&pixels).unwrap();
    let text = model.text_embeddings(&texts).unwrap();
    let image_diff = max_abs_diff(&to_rows(&image), &matrix(&exp["image_embeds"]));
    let text_diff = max_abs_diff(&to_rows(&text), &matrix(&exp["text_embeds"]));

    let logits = clip_logits(&model, &image, &text);
    let logit_diff = max_abs_diff(&to_rows(&logits), &matrix(&exp["logits_per_image"]));
    eprintln!(
        "clip parity: pixels {pixel_diff:e}, image embeds {image_diff:e}, \
         text embeds {text_diff:e}, logits {logit_diff:e}"
    );
    assert!(
        image_diff <= TOLERANCE,
        "image embeddings differ by {image_diff}"
    );
    assert!(
        text_diff <= TOLERANCE,
        "text embeddings differ by {text_diff}"
    );
    assert!(logit_diff <= TOLERANCE, "logits differ by {logit_diff}");
}

fn texts(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn siglip_matches_transformers() {
    let exp = expected_with("siglip.json", SIGLIP_IMAGES);
    let s = settings(ModelType::Siglip);
    let files = ModelFiles::from_dir(&model_dir(ModelType::Siglip)).unwrap();
    let model = SiglipModel::load(&files, device(), &s).unwrap();

    let frames = frames_of(SIGLIP_IMAGES);
    let refs: Vec<&Frame> = frames.iter().collect();
    let pixels = model.preprocessor().batch(&refs, &device()).unwrap();
    let pixel_diff = check_pixels(&pixels, &exp["pixels"]);

    let texts = texts(&exp["texts"]);
    for (text, want) in texts.iter().zip(exp["input_ids"].as_array().unwrap()) {
        assert_eq!(model.token_ids(text).unwrap(), ids(want), "ids of {text:?}");
    }
    let image = model.image_embeddings_from_pixels(&pixels).unwrap();
    let text = model.text_embeddings(&texts).unwrap();
    let image_diff = max_abs_diff(&to_rows(&image), &matrix(&exp["image_embeds"]));
    let text_diff = max_abs_diff(&to_rows(&text), &matrix(&exp["text_embeds"]));

    let norm = |t: &Tensor| t.broadcast_div(&t.sqr()?.sum_keepdim(1)?.sqrt()?);
    let (scale, bias) = model.logit_scale_and_bias();
    let logits = (norm(&image)
        .unwrap()
        .matmul(&norm(&text).unwrap().t().unwrap())
        .unwrap()
        .affine(scale as f64, bias as f64))
    .unwrap();
    let logit_diff = max_abs_diff(&to_rows(&logits), &matrix(&exp["logits_per_image"]));
    eprintln!(
        "siglip parity: pixels {pixel_diff:e}, image embeds {image_diff:e}, \
         text embeds {text_diff:e}, logits {logit_diff:e}"
    );
    assert!(
        image_diff <= TOLERANCE,
        "image embeddings differ by {image_diff}"
    );
    assert!(
        text_diff <= TOLERANCE,
        "text embeddings differ by {text_diff}"
    );
    assert!(logit_diff <= TOLERANCE, "logits differ by {logit_diff}");
}

/// The bound on box corners after mapping back to the frame, in pixels.
const BOX_TOLERANCE_PX: f32 = 0.5;

#[test]
fn owlvit_matches_transformers() {
    let exp = expected("owlvit.json");
    let s = settings(ModelType::OwlVit);
    let files = ModelFiles::from_dir(&model_dir(ModelType::OwlVit)).unwrap();
    let model = OwlVitModel::load(&files, device(), &s).unwrap();
    let threshold = exp["threshold"].as_f64().unwrap() as f32;

    let frames = frames();
    let refs: Vec<&Frame> = frames.iter().collect();
    let pixels = model.preprocessor().batch(&refs, &device()).unwrap();
    let pixel_diff = check_pixels(&pixels, &exp["pixels"]);

    let texts = texts(&exp["texts"]);
    for (text, want) in texts.iter().zip(exp["input_ids"].as_array().unwrap()) {
        assert_eq!(model.token_ids(text).unwrap(), ids(want), "ids of {text:?}");
    }
    let queries = model.query_embeddings(&texts).unwrap();
    let out = model
        .heads(&pixels, &model.normalised_queries_t(&texts).unwrap())
        .unwrap();
    let (mut text_diff, mut logit_diff, mut box_diff, mut kept_total) = (0f32, 0f32, 0f32, 0);
    for (i, (want, f)) in exp["per_image"]
        .as_array()
        .unwrap()
        .iter()
        .zip(&frames)
        .enumerate()
    {
        text_diff = text_diff.max(max_abs_diff(
            &to_rows(&queries),
            &matrix(&want["text_embeds"]),
        ));
        let logits = to_rows(&out.logits.get(i).unwrap());
        let boxes = to_rows(&out.boxes.get(i).unwrap());
        logit_diff = logit_diff.max(max_abs_diff(&logits, &matrix(&want["logits"])));
        // Every token's box, kept or not, mapped to the frame.
        let corners = |b: &[f32]| {
            let (w, h) = (f.width as f32, f.height as f32);
            [
                (b[0] - 0.5 * b[2]) * w,
                (b[1] - 0.5 * b[3]) * h,
                (b[0] + 0.5 * b[2]) * w,
                (b[1] + 0.5 * b[3]) * h,
            ]
        };
        let theirs_all = matrix(&want["pred_boxes"]);
        assert_eq!(theirs_all.len(), boxes.len(), "tokens of image {i}");
        for (a, b) in boxes.iter().zip(&theirs_all) {
            for (x, y) in corners(a).iter().zip(corners(b)) {
                box_diff = box_diff.max((x - y).abs());
            }
        }
        let (ours, _) = post_process(&logits, &boxes, f.width, f.height, threshold, texts.len());
        let mut theirs: Vec<(usize, f32, Vec<f32>)> = want["kept"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| {
                (
                    k["label"].as_u64().unwrap() as usize,
                    k["score"].as_f64().unwrap() as f32,
                    k["box"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|v| v.as_f64().unwrap() as f32)
                        .collect(),
                )
            })
            .collect();
        theirs.sort_by(|a, b| b.1.total_cmp(&a.1));
        assert_eq!(ours.len(), theirs.len(), "boxes kept for image {i}");
        kept_total += ours.len();
        for (o, t) in ours.iter().zip(&theirs) {
            assert_eq!(o.label, t.0, "label of a box of image {i}");
            assert!(
                (o.score - t.1).abs() <= TOLERANCE,
                "score {} vs {}",
                o.score,
                t.1
            );
            for (a, b) in o.corners.iter().zip(&t.2) {
                box_diff = box_diff.max((a - b).abs());
            }
        }
    }
    eprintln!(
        "owlvit parity: pixels {pixel_diff:e}, query embeds {text_diff:e}, logits \
         {logit_diff:e}, box corners {box_diff:e} px, {kept_total} boxes kept at {threshold}"
    );
    assert!(
        kept_total > 0,
        "the parity file keeps no box: nothing is compared"
    );
    assert!(
        text_diff <= TOLERANCE,
        "query embeddings differ by {text_diff}"
    );
    assert!(logit_diff <= TOLERANCE, "logits differ by {logit_diff}");
    assert!(
        box_diff <= BOX_TOLERANCE_PX,
        "box corners differ by {box_diff} px"
    );
}

#[test]
fn blip_matches_transformers() {
    let exp = expected("blip.json");
    let mut s = settings(ModelType::Blip);
    s.max_new_tokens = exp["max_new_tokens"].as_u64().unwrap() as usize;
    let files = ModelFiles::from_dir(&model_dir(ModelType::Blip)).unwrap();
    let model = BlipModel::load(&files, device(), &s).unwrap();

    let frames = frames();
    let refs: Vec<&Frame> = frames.iter().collect();
    let pixels = model.preprocessor().batch(&refs, &device()).unwrap();
    let pixel_diff = check_pixels(&pixels, &exp["pixels"]);

    let vision = model.image_features(&pixels).unwrap();
    let cls = vision.narrow(1, 0, 1).unwrap().squeeze(1).unwrap();
    let vision_diff = max_abs_diff(&to_rows(&cls), &matrix(&exp["vision_cls"]));
    assert!(
        vision_diff <= TOLERANCE,
        "vision features differ by {vision_diff}"
    );

    let mut logit_diff = 0f32;
    let mut tokens = 0;
    for case in exp["cases"].as_array().unwrap() {
        let prompt = case["prompt"].as_str().unwrap();
        let prefix = model.prefix_ids(prompt).unwrap();
        assert_eq!(prefix, ids(&case["prefix_ids"]), "prefix of {prompt:?}");
        let logits = model.first_step_logits(&pixels, &prefix).unwrap();
        logit_diff = logit_diff.max(max_abs_diff(
            &to_rows(&logits),
            &matrix(&case["first_step_logits"]),
        ));
        // All images decode together, as in serving; transformers decoded them one by one.
        let sequences = model.generate_ids(&pixels, &prefix).unwrap();
        for (i, (seq, want)) in sequences
            .iter()
            .zip(case["sequences"].as_array().unwrap())
            .enumerate()
        {
            assert_eq!(
                seq,
                &ids(want),
                "caption ids of image {i} with prompt {prompt:?}"
            );
            tokens += seq.len() - prefix.len();
            let caption = model.decode(seq).unwrap();
            assert_eq!(caption, case["captions"][i].as_str().unwrap());
        }
    }
    eprintln!(
        "blip parity: pixels {pixel_diff:e}, vision {vision_diff:e}, first-step logits \
         {logit_diff:e}, {tokens} generated tokens identical"
    );
    assert!(
        logit_diff <= TOLERANCE,
        "first-step logits differ by {logit_diff}"
    );
}

/// PaliGemma's parity images: the first three of [`SIGLIP_IMAGES`] (the same
/// preprocessing), to keep the file small.
const PALIGEMMA_IMAGES: &[(&str, usize, usize)] = SIGLIP_IMAGES.split_at(3).0;

/// Boxes as the parity file writes them: label and corners.
fn expected_boxes(v: &Value) -> Vec<(String, Vec<f32>)> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|b| {
            let corners = b["box"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect();
            (b["label"].as_str().unwrap().to_string(), corners)
        })
        .collect()
}

/// Checks our parse of `text` against the boxes transformers' side parsed; returns how
/// many boxes were compared.
fn check_boxes(text: &str, width: usize, height: usize, want: &Value) -> usize {
    let ours = parse_detections(text, width as u32, height as u32);
    let theirs = expected_boxes(want);
    assert_eq!(ours.len(), theirs.len(), "boxes parsed from {text:?}");
    for (o, (label, corners)) in ours.iter().zip(&theirs) {
        assert_eq!(&o.label, label, "label parsed from {text:?}");
        for (a, b) in o.corners.iter().zip(corners) {
            assert!((a - b).abs() < 1e-3, "corner {a} vs {b} from {text:?}");
        }
    }
    ours.len()
}

/// PaliGemma against `PaliGemmaForConditionalGeneration`: input ids, prefix logits, greedy
/// tokens, decoded text and parsed boxes. Random tiny weights generate no `<loc>` tokens,
/// so the parsed boxes of the generated texts are empty on both sides; the box path is
/// also checked on fixed token sequences (`box_cases`) that transformers' tokenizer
/// decoded and an independent parser in the script parsed, which must give the same text
/// and the same boxes here.
#[test]
fn paligemma_matches_transformers() {
    let exp = expected_with("paligemma.json", PALIGEMMA_IMAGES);
    let mut s = settings(ModelType::PaliGemma);
    s.max_new_tokens = exp["max_new_tokens"].as_u64().unwrap() as usize;
    let files = ModelFiles::from_dir(&model_dir(ModelType::PaliGemma)).unwrap();
    let mut model = PaliGemmaModel::load(&files, device(), &s).unwrap();
    assert_eq!(model.stop_ids(), ids(&exp["stop_ids"]).as_slice());

    let frames = frames_of(PALIGEMMA_IMAGES);
    let refs: Vec<&Frame> = frames.iter().collect();
    let pixels = model.preprocessor().batch(&refs, &device()).unwrap();
    let cases = exp["cases"].as_array().unwrap();
    let summaries: Vec<Value> = cases[0]["per_image"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["pixels"].clone())
        .collect();
    let pixel_diff = check_pixels(&pixels, &Value::Array(summaries));

    let sample_index: Vec<usize> = ids(&exp["logit_sample_index"])
        .into_iter()
        .map(|i| i as usize)
        .collect();
    let (mut logit_diff, mut tokens, mut boxes) = (0f32, 0, 0);
    for case in cases {
        let prompt = case["prompt"].as_str().unwrap();
        assert_eq!(
            model.input_ids(prompt).unwrap(),
            ids(&case["input_ids"]),
            "input ids of {prompt:?}"
        );
        let text_ids = model.text_ids(prompt).unwrap();
        let logits = to_rows(&model.prefix_logits(&pixels, &text_ids).unwrap());
        let generated = model.generate_ids(&pixels, &text_ids).unwrap();
        for (i, want) in case["per_image"].as_array().unwrap().iter().enumerate() {
            let row = &logits[i];
            let samples: Vec<f32> = sample_index.iter().map(|&k| row[k]).collect();
            logit_diff = logit_diff.max(max_abs_diff(
                &[samples],
                &matrix(&Value::Array(vec![want["logit_samples"].clone()])),
            ));
            let top_ids = ids(&want["top_ids"]);
            let top: Vec<f32> = top_ids.iter().map(|&k| row[k as usize]).collect();
            logit_diff = logit_diff.max(max_abs_diff(
                &[top],
                &matrix(&Value::Array(vec![want["top_logits"].clone()])),
            ));
            let sum: f64 = row.iter().map(|&v| v as f64).sum();
            let want_sum = want["logit_sum"].as_f64().unwrap();
            assert!(
                (sum - want_sum).abs() <= TOLERANCE as f64 * row.len() as f64,
                "logit sum {sum} vs {want_sum} for {prompt:?}"
            );
            // All images decode together, as in serving; transformers decoded them one by one.
            assert_eq!(
                generated[i],
                ids(&want["generated"]),
                "tokens of image {i} with {prompt:?}"
            );
            tokens += generated[i].len();
            let text = model.decode(&generated[i]).unwrap();
            assert_eq!(text, want["text"].as_str().unwrap(), "text of image {i}");
            let (_, w, h) = PALIGEMMA_IMAGES[i];
            boxes += check_boxes(&text, w, h, &want["boxes"]);
        }
    }
    let [w, h] = [0, 1].map(|k| exp["box_frame"][k].as_u64().unwrap() as usize);
    for case in exp["box_cases"].as_array().unwrap() {
        let text = model.decode(&ids(&case["generated"])).unwrap();
        assert_eq!(text, case["text"].as_str().unwrap());
        boxes += check_boxes(&text, w, h, &case["boxes"]);
    }
    eprintln!(
        "paligemma parity: pixels {pixel_diff:e}, prefix logits {logit_diff:e}, {tokens} \
         generated tokens identical, {boxes} boxes identical"
    );
    assert!(boxes > 0, "the parity file has no box: nothing is compared");
    assert!(
        logit_diff <= TOLERANCE,
        "prefix logits differ by {logit_diff}"
    );
}

/// Writes the tiny models the Python side reads: run with
/// `PARITY_MODEL_DIR=/some/dir cargo test -p free-roam --lib -- --ignored write_parity_model`.
#[test]
#[ignore = "writes the parity models for scripts/parity; run by hand"]
fn write_parity_model() {
    let dir = std::env::var_os("PARITY_MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("free-roam-parity"));
    for kind in [
        ModelType::Clip,
        ModelType::Siglip,
        ModelType::OwlVit,
        ModelType::Blip,
        ModelType::PaliGemma,
        ModelType::YoloWorld,
    ] {
        write_random_model(kind, ModelSize::Tiny, SEED, &dir.join(kind.as_str())).unwrap();
    }
    eprintln!("wrote {}", dir.display());
}
