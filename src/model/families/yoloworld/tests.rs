//! The YOLO-World backend through the model trait on the tiny random checkpoint: outputs,
//! source pixels, the folded prompt against the reference order, the prompt cache and the
//! prompt rule, and what a broken checkpoint or another family gives at load.

use super::*;
use crate::model::loading::config::check_family;
use crate::model::registry::load_model;
use crate::model::testing::util::{
    frame, frames, max_abs_difference, prompt, scratch_dir, tiny_model,
};
use std::collections::HashMap;

fn settings(threshold: Option<f32>) -> ModelSettings {
    ModelSettings {
        model_type: ModelType::YoloWorld,
        model_path: Some(tiny_model(ModelType::YoloWorld).to_path_buf()),
        detect_threshold: threshold,
        ..ModelSettings::default()
    }
}

fn tiny() -> YoloWorldModel {
    let files = ModelFiles::from_dir(tiny_model(ModelType::YoloWorld)).unwrap();
    YoloWorldModel::load(&files, Device::Cpu, &settings(None)).unwrap()
}

#[test]
fn boxes_are_in_frame_pixels_sorted_clipped_and_summarised() {
    let mut model = load_model(&settings(None)).unwrap();
    assert_eq!(model.info().task, "detection");
    assert_eq!(model.info().input_size, 640);
    assert_eq!(model.prompt_rule(), PromptRule::Phrases);
    let frames = frames();
    let refs: Vec<&Frame> = frames.iter().collect();
    let out = model
        .infer(&refs, &prompt("Detect all people and vehicles"))
        .unwrap();
    assert_eq!(out.len(), frames.len());
    let mut any = 0;
    for (o, f) in out.iter().zip(&frames) {
        let dets = o["detections"].as_array().unwrap();
        any += dets.len();
        assert!(dets.len() <= nms::MAX_DETECTIONS);
        let scores: Vec<f64> = dets.iter().map(|d| d["score"].as_f64().unwrap()).collect();
        assert!(scores.windows(2).all(|w| w[0] >= w[1]), "{scores:?}");
        assert!(scores.iter().all(|s| *s > 0.25));
        for d in dets {
            let b: Vec<f64> = d["box"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect();
            assert!(b[0] <= b[2] && b[1] <= b[3], "{b:?}");
            assert!(
                b[0] >= 0.0 && b[2] <= f.width as f64 && b[1] >= 0.0 && b[3] <= f.height as f64
            );
        }
        let phrases = o["phrases"].as_array().unwrap();
        assert_eq!(phrases[0]["phrase"], "people");
        assert_eq!(phrases[1]["phrase"], "vehicles");
        let mut detected = Vec::new();
        for p in phrases {
            let count = p["count"].as_u64().unwrap() as usize;
            let label = p["phrase"].as_str().unwrap();
            assert_eq!(count, dets.iter().filter(|d| d["label"] == label).count());
            if count > 0 {
                detected.push(label);
            }
        }
        assert_eq!(o["detected"], json!(detected));
        assert_eq!(o["frame_size"], json!([f.width, f.height]));
    }
    assert!(any > 0, "the tiny model should keep some boxes");
}

#[test]
fn a_frame_scaled_at_ingest_gets_boxes_in_its_source_pixels() {
    let mut model = load_model(&settings(None)).unwrap();
    let f = frame("checker", 160, 90);
    let scaled = f.clone().with_source_size(640, 360);
    let out = model
        .infer(&[&f, &scaled], &prompt("people, cars"))
        .unwrap();
    assert_eq!(out[1]["frame_size"], json!([640, 360]));
    let (own, source) = (
        out[0]["detections"].as_array().unwrap(),
        out[1]["detections"].as_array().unwrap(),
    );
    assert!(!own.is_empty());
    assert_eq!(own.len(), source.len());
    for (a, b) in own.iter().zip(source) {
        assert_eq!((&a["label"], &a["score"]), (&b["label"], &b["score"]));
        for (x, y) in a["box"]
            .as_array()
            .unwrap()
            .iter()
            .zip(b["box"].as_array().unwrap())
        {
            let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            assert!((x * 4.0 - y).abs() <= 0.03, "{x} x 4 vs {y}");
        }
    }
}

#[test]
fn the_folded_prompt_gives_what_the_reference_order_gives() {
    let model = tiny();
    let frames = frames();
    let refs: Vec<&Frame> = frames[..2].iter().collect();
    let (pixels, _) = model.preprocess(&refs).unwrap();
    let text = model
        .text_embeddings(&[
            "person".to_string(),
            "red car".to_string(),
            "dog".to_string(),
        ])
        .unwrap();
    let folded = model.head_output(&pixels, &text, true).unwrap();
    let unfolded = model.head_output(&pixels, &text, false).unwrap();
    assert_eq!(folded.dims3().unwrap().1, 4 + 3);
    let largest = unfolded
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let diff = max_abs_difference(&folded, &unfolded);
    eprintln!("folded against unfolded: {diff:e} (largest {largest})");
    assert!(diff <= 1e-5 * largest as f64, "differ by {diff}");
}

#[test]
fn prompts_are_folded_once_per_text_and_bad_prompts_fail_as_prompt_errors() {
    let mut model = tiny();
    let f = frame("rings", 64, 48);
    model.infer(&[&f], &prompt("person, car")).unwrap();
    model.infer(&[&f], &prompt("person, car")).unwrap();
    assert_eq!(model.cache.len(), 1);
    model.infer(&[&f], &prompt("dog")).unwrap();
    assert_eq!(model.cache.len(), 2);

    assert!(PromptRule::Phrases.check(" , detect all ").is_err());
    let err = model.infer(&[&f], &prompt("detect all")).unwrap_err();
    assert!(matches!(err, ModelError::Prompt(_)), "{err}");
    let many: Vec<String> = (0..=crate::model::text::phrases::MAX_PHRASES)
        .map(|i| format!("thing{i}"))
        .collect();
    let many = many.join(", ");
    let why = PromptRule::Phrases.check(&many).unwrap_err();
    assert!(why.contains("phrases"), "{why}");
    assert!(matches!(
        model.infer(&[&f], &prompt(&many)),
        Err(ModelError::Prompt(_))
    ));
}

/// Copies the tiny checkpoint with `change` applied to its tensors.
fn altered(name: &str, change: impl FnOnce(&mut HashMap<String, Tensor>)) -> std::path::PathBuf {
    let dir = scratch_dir(name);
    let src = tiny_model(ModelType::YoloWorld);
    for file in ["config.json", "tokenizer.json"] {
        std::fs::copy(src.join(file), dir.join(file)).unwrap();
    }
    let mut tensors =
        candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    change(&mut tensors);
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
    dir
}

fn load_error(dir: &std::path::Path, kind: ModelType) -> String {
    let settings = ModelSettings {
        model_type: kind,
        model_path: Some(dir.to_path_buf()),
        ..ModelSettings::default()
    };
    match load_model(&settings) {
        Ok(_) => panic!("loaded {}", dir.display()),
        Err(e) => {
            assert!(matches!(e, ModelError::Load(_)), "{e}");
            e.to_string()
        }
    }
}

#[test]
fn missing_or_misshapen_tensors_and_other_families_are_refused_by_name() {
    let dir = altered("yw-missing", |t| {
        t.remove("model.21.attn.gl.weight");
    });
    let err = load_error(&dir, ModelType::YoloWorld);
    assert!(
        err.contains("lacks 1 tensor(s) the model needs: model.21.attn.gl.weight"),
        "{err}"
    );

    let dir = altered("yw-misshapen", |t| {
        t.insert(
            "model.22.cv4.1.bias".into(),
            Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap(),
        );
    });
    let err = load_error(&dir, ModelType::YoloWorld);
    assert!(
        err.contains("model.22.cv4.1.bias is [2], expected [1]"),
        "{err}"
    );

    let config = read_config(&tiny_model(ModelType::YoloWorld).join("config.json")).unwrap();
    let err = check_family(&config, ModelType::OwlVit, "models/yolo")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("model_type \"yoloworld\", a MODEL_TYPE=yoloworld checkpoint"),
        "{err}"
    );
    let err = load_error(tiny_model(ModelType::OwlVit), ModelType::YoloWorld);
    assert!(
        err.contains("model_type \"owlvit\", a MODEL_TYPE=owlvit checkpoint"),
        "{err}"
    );
}

#[test]
fn a_high_threshold_keeps_nothing_but_reports_scores() {
    let mut model = load_model(&settings(Some(1.0))).unwrap();
    let f = frame("checker", 120, 90);
    let out = model.infer(&[&f], &prompt("people, cars")).unwrap();
    assert_eq!(out[0]["detections"], json!([]));
    assert_eq!(out[0]["detected"], json!([]));
    assert!(out[0]["phrases"][0]["max_score"].as_f64().unwrap() > 0.0);
}

#[test]
fn synthetic_scales_parse_and_others_are_refused() {
    for scale in ["n", "s", "m", "l", "x"] {
        let size: ModelSize = scale.parse().unwrap();
        let model = synthetic(size).unwrap();
        assert_eq!(model.config["scale"], scale);
    }
    let err = crate::model::write_random_model(
        ModelType::Clip,
        ModelSize::Scale(Scale::S),
        1,
        &scratch_dir("clip-scale"),
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("MODEL_TYPE=clip has no scale s"),
        "{err}"
    );
}
