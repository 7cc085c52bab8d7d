//! The one place that names every model family: loading the one `MODEL_TYPE` chooses, and
//! writing a family's synthetic weights (`free-roam model make`). Everything else reaches a
//! family through [`VisionLanguageModel`] and [`ModelType`].

use crate::model::families::blip::{self, BlipModel};
use crate::model::families::clip::{self, ClipModel};
use crate::model::families::owlvit::{self, OwlVitModel};
use crate::model::families::paligemma::{self, PaliGemmaModel};
use crate::model::families::siglip::{self, SiglipModel};
use crate::model::families::yoloworld::{self, YoloWorldModel};
use crate::model::kind::ModelType;
use crate::model::loading::config::{check_family, with_family_hint};
use crate::model::loading::{
    ModelFiles, ModelSettings, device_name, read_config, resolve_files, select_device,
};
use crate::model::remote::openai::OpenAiModel;
use crate::model::testing::colour::ColourTestModel;
use crate::model::testing::null::NullModel;
use crate::model::testing::synthetic::{self, ModelSize};
use crate::model::{ModelError, VisionLanguageModel};
use candle_core::Device;
use std::path::Path;

/// A family that computes in the worker, loaded from its weight files.
type LoadLocal =
    fn(&ModelFiles, Device, &ModelSettings) -> Result<Box<dyn VisionLanguageModel>, ModelError>;

/// Loads the model the settings describe. Blocking: reads (and maybe downloads) weights.
pub fn load_model(settings: &ModelSettings) -> Result<Box<dyn VisionLanguageModel>, ModelError> {
    let kind = settings.model_type;
    let load: LoadLocal = match kind {
        ModelType::OpenAi => {
            let model_id = settings.model_id.as_deref().unwrap_or_default();
            let model = OpenAiModel::connect(model_id, settings.openai.clone())?;
            return Ok(Box::new(model));
        }
        ModelType::Null => return Ok(Box::new(NullModel::new(kind.input_size()))),
        ModelType::TestColour => return Ok(Box::new(ColourTestModel::new(kind.input_size()))),
        ModelType::Clip => |f, d, s| Ok(Box::new(ClipModel::load(f, d, s)?)),
        ModelType::Siglip => |f, d, s| Ok(Box::new(SiglipModel::load(f, d, s)?)),
        ModelType::OwlVit => |f, d, s| Ok(Box::new(OwlVitModel::load(f, d, s)?)),
        ModelType::YoloWorld => |f, d, s| Ok(Box::new(YoloWorldModel::load(f, d, s)?)),
        ModelType::Blip => |f, d, s| Ok(Box::new(BlipModel::load(f, d, s)?)),
        ModelType::PaliGemma => |f, d, s| Ok(Box::new(PaliGemmaModel::load(f, d, s)?)),
    };
    let files = resolve_files(settings)?;
    let config = read_config(&files.config)?;
    check_family(&config, kind, &files.source)?;
    let device = select_device(settings.device)?;
    tracing::info!(
        model_type = %kind,
        source = %files.source,
        device = %device_name(&device),
        "loading model"
    );
    load(&files, device, settings).map_err(|e| with_family_hint(e, &config, kind))
}

/// Writes a random-weight checkpoint of `kind` into `dir` (`free-roam model make`): the
/// family says what its checkpoint holds, [`synthetic::write`] puts it on disk.
pub fn write_random_model(
    kind: ModelType,
    size: ModelSize,
    seed: u64,
    dir: &Path,
) -> Result<(), ModelError> {
    if let ModelSize::Scale(scale) = size
        && kind != ModelType::YoloWorld
    {
        return Err(ModelError::Load(
            format!(
                "MODEL_TYPE={kind} has no scale {}; its sizes are tiny and full",
                scale.as_str()
            )
            .into(),
        ));
    }
    let model = match kind {
        ModelType::Clip => clip::synthetic(size)?,
        ModelType::Siglip => siglip::synthetic(size)?,
        ModelType::OwlVit => owlvit::synthetic(size)?,
        ModelType::YoloWorld => yoloworld::synthetic(size)?,
        ModelType::Blip => blip::synthetic(size)?,
        ModelType::PaliGemma => paligemma::synthetic(size)?,
        ModelType::OpenAi | ModelType::Null | ModelType::TestColour => {
            return Err(ModelError::Load(
                format!("MODEL_TYPE={kind} has no weights to write").into(),
            ));
        }
    };
    synthetic::write(&model, seed, dir)
}
