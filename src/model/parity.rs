//! Parity of the candle backends with transformers: compares preprocessing, embeddings,
//! logits and greedy caption ids on the tiny random models against the expected outputs in
//! `tests/parity/*.json`, which `scripts/parity/make_parity.py` wrote from the very same
//! weights with transformers (PIL image backend). See scripts/parity/README.md.

use super::Frame;
use super::blip::BlipModel;
use super::clip::ClipModel;
use super::load::{DtypeChoice, ModelFiles, ModelSettings, ModelType};
use super::make::{ModelSize, write_random_model};
use super::testutil::{IMAGES, SEED, frames, tiny_model};
use candle_core::{Device, Tensor};
use serde_json::Value;
use std::path::PathBuf;

/// The bound the brief sets on embedding and logit differences.
pub(super) const TOLERANCE: f32 = 1e-4;

fn expected(name: &str) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/parity")
        .join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (see scripts/parity/README.md)", path.display()));
    let value: Value = serde_json::from_str(&text).expect("parity JSON");
    let model = &value["model"];
    assert_eq!(
        model["seed"].as_u64(),
        Some(SEED),
        "parity file made from another seed"
    );
    assert_eq!(model["size"], "tiny");
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
    let ours: Vec<(String, usize, usize)> = IMAGES
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
            "image {i} pixel sum"
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

fn settings(kind: ModelType) -> ModelSettings {
    ModelSettings {
        model_type: kind,
        model_path: Some(tiny_model(kind).to_path_buf()),
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
    let files = ModelFiles::from_dir(tiny_model(ModelType::Clip)).unwrap();
    let model = ClipModel::load(&files, Device::Cpu, &s).unwrap();

    let frames = frames();
    let refs: Vec<&Frame> = frames.iter().collect();
    let pixels = model.preprocessor().batch(&refs, &Device::Cpu).unwrap();
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

#[test]
fn blip_matches_transformers() {
    let exp = expected("blip.json");
    let mut s = settings(ModelType::Blip);
    s.max_new_tokens = exp["max_new_tokens"].as_u64().unwrap() as usize;
    let files = ModelFiles::from_dir(tiny_model(ModelType::Blip)).unwrap();
    let model = BlipModel::load(&files, Device::Cpu, &s).unwrap();

    let frames = frames();
    let refs: Vec<&Frame> = frames.iter().collect();
    let pixels = model.preprocessor().batch(&refs, &Device::Cpu).unwrap();
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

/// Writes the tiny models the Python side reads: run with
/// `PARITY_MODEL_DIR=/some/dir cargo test -p free-roam --lib -- --ignored write_parity_model`.
#[test]
#[ignore = "writes the parity models for scripts/parity; run by hand"]
fn write_parity_model() {
    let dir = std::env::var_os("PARITY_MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("free-roam-parity"));
    for kind in [ModelType::Clip, ModelType::Blip] {
        write_random_model(kind, ModelSize::Tiny, SEED, &dir.join(kind.as_str())).unwrap();
    }
    eprintln!("wrote {}", dir.display());
}
