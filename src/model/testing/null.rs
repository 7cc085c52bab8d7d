//! `MODEL_TYPE=null`: a model that does no inference and answers `{}` for every frame, so the
//! queue and ingest paths can be run and measured without model cost. It is the stub model
//! with its default answer, named `null`.

use crate::frame::Frame;
use crate::model::testing::stub::StubModel;
use crate::model::{ModelError, ModelInfo, VisionLanguageModel};
use crate::prompt::PromptRef;

pub struct NullModel(StubModel);

impl NullModel {
    pub fn new(input_size: u32) -> Self {
        Self(
            StubModel::named("null")
                .with_task("none")
                .with_input_size(input_size),
        )
    }
}

impl VisionLanguageModel for NullModel {
    fn info(&self) -> &ModelInfo {
        self.0.info()
    }

    fn infer(
        &mut self,
        frames: &[&Frame],
        prompt: &PromptRef,
    ) -> Result<Vec<serde_json::Value>, ModelError> {
        self.0.infer(frames, prompt)
    }
}
