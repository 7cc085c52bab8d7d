//! Parity through the model for JPEG frames: the tiny CLIP run on the worker's decode of
//! tests/parity/jpeg against transformers run on PIL's decode of the same files
//! (tests/parity/clip_jpeg.json, written by scripts/parity/make_jpeg_parity.py).

use crate::model::Frame;
use crate::model::families::clip::ClipModel;
use crate::model::kind::ModelType;
use crate::model::loading::{DtypeChoice, ModelFiles, ModelSettings};
use crate::model::testing::parity::{
    TOLERANCE, clip_logits, device, matrix, max_abs_diff, to_rows,
};
use crate::model::testing::util::{SEED, parity_dir, tiny_model};
use crate::source::image_decode::decode_image;
use serde_json::Value;

#[test]
fn clip_on_jpeg_frames_matches_transformers_on_pil() {
    let root = parity_dir();
    let exp: Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("clip_jpeg.json")).unwrap())
            .unwrap();
    assert_eq!(exp["model"]["seed"].as_u64(), Some(SEED));
    let frames: Vec<Frame> = exp["jpegs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| {
            let name = j["name"].as_str().unwrap();
            let data = std::fs::read(root.join("jpeg").join(format!("{name}.jpg"))).unwrap();
            decode_image(&data, u64::MAX).unwrap()
        })
        .collect();
    let settings = ModelSettings {
        model_type: ModelType::Clip,
        model_path: Some(tiny_model(ModelType::Clip).to_path_buf()),
        // Parity is shown for the f32 path; bf16 is compared with f32 (fused_linear).
        dtype: DtypeChoice::F32,
        ..ModelSettings::default()
    };
    let files = ModelFiles::from_dir(tiny_model(ModelType::Clip)).unwrap();
    let model = ClipModel::load(&files, device(), &settings).unwrap();
    let refs: Vec<&Frame> = frames.iter().collect();
    let pixels = model.preprocessor().batch(&refs, &device()).unwrap();
    let image = model.image_embeddings_from_pixels(&pixels).unwrap();
    let texts: Vec<String> = exp["texts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().to_string())
        .collect();
    let text = model.text_embeddings(&texts).unwrap();
    let logits = clip_logits(&model, &image, &text);
    let image_diff = max_abs_diff(&to_rows(&image), &matrix(&exp["image_embeds"]));
    let logit_diff = max_abs_diff(&to_rows(&logits), &matrix(&exp["logits_per_image"]));
    eprintln!("clip on JPEG frames: image embeds {image_diff:e}, logits {logit_diff:e}");
    assert!(
        image_diff <= TOLERANCE,
        "image embeddings differ by {image_diff}"
    );
    assert!(logit_diff <= TOLERANCE, "logits differ by {logit_diff}");
}
