//! The model families by name (`MODEL_TYPE`) and the facts the rest of the worker needs
//! about each before loading one: input size, default hub id, task, default threshold.
//! Naming a family here imports none of its code: the registry does that.

use std::fmt;
use std::str::FromStr;

/// Default long side frames are scaled down to before encoding (`OPENAI_IMAGE_MAX_SIDE`).
pub const DEFAULT_IMAGE_MAX_SIDE: u32 = 768;

/// The accepted `MODEL_TYPE` words, as error messages list them.
pub const MODEL_TYPES: &str =
    "clip, siglip, owlvit, yoloworld, blip, openai, paligemma, null, test-colour";

/// Which backend to run (`MODEL_TYPE`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum ModelType {
    /// Zero-shot phrase scoring with CLIP (the openai/clip-vit-base-patch32 layout).
    #[default]
    Clip,
    /// A presence probability per phrase with SigLIP (the google/siglip-base-patch16-224
    /// layout).
    Siglip,
    /// Open-vocabulary detection with boxes with OWL-ViT (the google/owlvit-base-patch32
    /// layout).
    OwlVit,
    /// Open-vocabulary detection with boxes fast enough for live cameras with YOLO-World v2
    /// (Ultralytics' `yolov8{n,s,m,l,x}-worldv2` layout, converted by
    /// `scripts/convert-yoloworld.py`).
    YoloWorld,
    /// Prompt-conditioned captioning with BLIP (the Salesforce/blip-image-captioning-large
    /// layout).
    Blip,
    /// Any VLM behind an OpenAI-compatible chat-completions server; no weights in the worker.
    OpenAi,
    /// Answers to PaliGemma task prompts (captions, questions, boxes, text reading) with
    /// PaliGemma (the google/paligemma-3b-mix-224 layout).
    PaliGemma,
    /// No inference: one empty output per frame, for pipeline tests and benchmarks.
    Null,
    /// The test model that finds the colours the prompt names by counting pixels.
    TestColour,
}

impl ModelType {
    /// Every family, in the order of [`MODEL_TYPES`].
    pub const ALL: [ModelType; 9] = [
        ModelType::Clip,
        ModelType::Siglip,
        ModelType::OwlVit,
        ModelType::YoloWorld,
        ModelType::Blip,
        ModelType::OpenAi,
        ModelType::PaliGemma,
        ModelType::Null,
        ModelType::TestColour,
    ];

    /// The `model_type` a checkpoint of this family names in its `config.json`
    /// (transformers' name for the architecture); `None` for the families without weights.
    pub fn config_model_type(self) -> Option<&'static str> {
        match self {
            ModelType::Clip => Some("clip"),
            ModelType::Siglip => Some("siglip"),
            ModelType::OwlVit => Some("owlvit"),
            ModelType::YoloWorld => Some("yoloworld"),
            ModelType::Blip => Some("blip"),
            ModelType::PaliGemma => Some("paligemma"),
            ModelType::OpenAi | ModelType::Null | ModelType::TestColour => None,
        }
    }

    /// The family whose checkpoints name `model_type` in their `config.json`, if the worker
    /// has it.
    pub fn from_config_model_type(model_type: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|kind| kind.config_model_type() == Some(model_type))
    }

    /// The square side the model's preprocessing produces for the reference checkpoints:
    /// ingest can use it to pick a default maximum frame side.
    pub fn input_size(self) -> u32 {
        match self {
            ModelType::Clip | ModelType::Siglip | ModelType::PaliGemma => 224,
            ModelType::Null | ModelType::TestColour => 224,
            ModelType::Blip => 384,
            ModelType::OwlVit => 768,
            ModelType::YoloWorld => 640,
            ModelType::OpenAi => DEFAULT_IMAGE_MAX_SIDE,
        }
    }

    /// The hub model used when neither `MODEL_PATH` nor `MODEL_ID` is set (none for
    /// `openai`, whose MODEL_ID names the served model and is required, nor for `yoloworld`,
    /// whose checkpoints are converted from Ultralytics' files into a `MODEL_PATH` folder).
    pub fn default_model_id(self) -> &'static str {
        match self {
            ModelType::Clip => "openai/clip-vit-base-patch32",
            ModelType::Siglip => "google/siglip-base-patch16-224",
            ModelType::OwlVit => "google/owlvit-base-patch32",
            ModelType::Blip => "Salesforce/blip-image-captioning-large",
            ModelType::OpenAi | ModelType::Null | ModelType::TestColour => "",
            ModelType::YoloWorld => "",
            ModelType::PaliGemma => "google/paligemma-3b-mix-224",
        }
    }

    /// The score over which a phrase is listed in `detected` when `DETECT_THRESHOLD` is
    /// unset: CLIP's presence against its neutral captions (0.5: the phrase fits better
    /// than every neutral caption), SigLIP's sigmoid probability, and OWL-ViT's box score
    /// (0.1, as transformers' examples use), and YOLO-World's box score (0.25, the
    /// confidence threshold of Ultralytics' `predict`). BLIP lists nothing as detected, and
    /// PaliGemma lists the label of every box it generates (it gives no score).
    pub fn default_detect_threshold(self) -> f32 {
        match self {
            ModelType::Clip | ModelType::Blip | ModelType::OpenAi | ModelType::PaliGemma => 0.5,
            ModelType::Null | ModelType::TestColour => 0.5,
            ModelType::Siglip | ModelType::OwlVit => 0.1,
            ModelType::YoloWorld => 0.25,
        }
    }

    /// What the outputs mean, as reported in [`crate::model::ModelInfo::task`].
    pub fn task(self) -> &'static str {
        match self {
            ModelType::Clip => "zero-shot-scoring",
            ModelType::Siglip => "presence",
            ModelType::OwlVit | ModelType::YoloWorld => "detection",
            ModelType::Blip => "captioning",
            ModelType::OpenAi => "chat",
            ModelType::PaliGemma => "generation",
            ModelType::Null => "none",
            ModelType::TestColour => "test",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ModelType::Clip => "clip",
            ModelType::Siglip => "siglip",
            ModelType::OwlVit => "owlvit",
            ModelType::YoloWorld => "yoloworld",
            ModelType::Blip => "blip",
            ModelType::OpenAi => "openai",
            ModelType::PaliGemma => "paligemma",
            ModelType::Null => "null",
            ModelType::TestColour => "test-colour",
        }
    }
}

impl fmt::Display for ModelType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A setting value that is not one of the accepted words.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{setting} must be one of {expected}, not {value:?}")]
pub struct ParseSettingError {
    pub setting: &'static str,
    pub expected: &'static str,
    pub value: String,
}

impl FromStr for ModelType {
    type Err = ParseSettingError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "clip" => Ok(ModelType::Clip),
            "siglip" => Ok(ModelType::Siglip),
            "owlvit" => Ok(ModelType::OwlVit),
            "yoloworld" | "yolo-world" => Ok(ModelType::YoloWorld),
            "blip" => Ok(ModelType::Blip),
            "openai" => Ok(ModelType::OpenAi),
            "paligemma" => Ok(ModelType::PaliGemma),
            "null" => Ok(ModelType::Null),
            "test-colour" => Ok(ModelType::TestColour),
            _ => Err(ParseSettingError {
                setting: "MODEL_TYPE",
                expected: MODEL_TYPES,
                value: s.to_string(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_setting_words() {
        assert_eq!("CLIP".parse::<ModelType>().unwrap(), ModelType::Clip);
        assert_eq!(" blip ".parse::<ModelType>().unwrap(), ModelType::Blip);
        assert_eq!("OpenAI".parse::<ModelType>().unwrap(), ModelType::OpenAi);
        let err = "llava".parse::<ModelType>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "MODEL_TYPE must be one of clip, siglip, owlvit, yoloworld, blip, openai, paligemma, null, test-colour, not \"llava\""
        );
        assert_eq!(
            "test-colour".parse::<ModelType>().unwrap(),
            ModelType::TestColour
        );

        assert_eq!(ModelType::Clip.input_size(), 224);
        assert_eq!(ModelType::Blip.input_size(), 384);
    }

    #[test]
    fn every_family_is_listed_once_and_checkpoints_name_their_own() {
        let words: Vec<&str> = MODEL_TYPES.split(", ").collect();
        let listed: Vec<&str> = ModelType::ALL.iter().map(|k| k.as_str()).collect();
        assert_eq!(listed, words);
        for kind in ModelType::ALL {
            assert_eq!(kind.as_str().parse::<ModelType>().unwrap(), kind);
            if let Some(name) = kind.config_model_type() {
                assert_eq!(ModelType::from_config_model_type(name), Some(kind));
            }
        }
        assert_eq!(
            ModelType::from_config_model_type("owlvit"),
            Some(ModelType::OwlVit)
        );
        assert_eq!(ModelType::from_config_model_type("clip_text_model"), None);
    }
}
