//! `MODEL_TYPE=null`: a model that does no inference and answers `{}` for every frame, so the
//! queue and ingest paths can be run and measured without model cost.

use crate::frame::Frame;
use crate::model::{ModelError, ModelInfo, VisionLanguageModel};
use crate::prompt::PromptRef;

pub struct NullModel {
    info: ModelInfo,
}

impl NullModel {
    pub fn new(input_size: u32) -> Self {
        Self {
            info: ModelInfo {
                name: "null".into(),
                task: "none".into(),
                input_size,
                device: "cpu".into(),
                dtype: "none".into(),
            },
        }
    }
}

impl VisionLanguageModel for NullModel {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn infer(
        &mut self,
        frames: &[&Frame],
        _prompt: &PromptRef,
    ) -> Result<Vec<serde_json::Value>, ModelError> {
        Ok(frames.iter().map(|_| serde_json::json!({})).collect())
    }
}
