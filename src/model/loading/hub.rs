//! Model files from the Hugging Face hub: the client configured as the Python tools are
//! (`HF_HUB_CACHE`, `HF_HOME`, `HF_ENDPOINT`, `HF_TOKEN`, `HF_HUB_OFFLINE`), downloads logged
//! through `tracing`, and an error that says what to set when the hub cannot be reached.

use super::{ModelFiles, shard_files};
use crate::model::{ErrorDetail, ModelError};
use std::path::PathBuf;

/// The hub client and its cache, configured by the variables the Python tools read:
/// `HF_HUB_CACHE` (else `HF_HOME`/hub), `HF_ENDPOINT` and `HF_TOKEN` (else the token file).
pub(super) fn client() -> Result<(hf_hub::api::sync::Api, hf_hub::Cache), ErrorDetail> {
    let cache = match std::env::var_os("HF_HUB_CACHE") {
        Some(dir) => hf_hub::Cache::new(dir.into()),
        None => hf_hub::Cache::from_env(),
    };
    let mut builder = hf_hub::api::sync::ApiBuilder::from_cache(cache.clone()).with_progress(false);
    if let Ok(endpoint) = std::env::var("HF_ENDPOINT") {
        builder = builder.with_endpoint(endpoint);
    }
    if let Some(token) = std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty()) {
        builder = builder.with_token(Some(token));
    }
    let api = builder
        .build()
        .map_err(|e| ErrorDetail::new("the hub client", e))?;
    Ok((api, cache))
}

/// The error when the hub cannot supply a model: says exactly what to set instead, then
/// what the hub said.
pub(super) fn error(id: &str, cause: ErrorDetail) -> ModelError {
    ModelError::Load(cause.within(format!(
        "no MODEL_PATH set and {id} could not be fetched from the Hugging Face hub. \
         Set MODEL_PATH to a folder holding config.json, tokenizer.json and \
         model.safetensors (`free-roam model make` writes a random one for tests), or make \
         the hub reachable and set MODEL_ID. The hub said"
    )))
}

/// Logs a file's download progress through `tracing`, one line every 10%.
#[derive(Default)]
struct LogProgress {
    file: String,
    total: usize,
    done: usize,
    reported: Option<usize>,
}

impl hf_hub::api::Progress for LogProgress {
    fn init(&mut self, size: usize, filename: &str) {
        self.file = filename.to_string();
        self.total = size;
        tracing::info!(file = %self.file, bytes = size, "hub download started");
    }

    fn update(&mut self, size: usize) {
        self.done += size;
        let tenth = (self.done * 10).checked_div(self.total).unwrap_or(10);
        if self.reported != Some(tenth) {
            self.reported = Some(tenth);
            tracing::info!(
                file = %self.file,
                bytes = self.done,
                total = self.total,
                "hub download {}%",
                tenth * 10
            );
        }
    }

    fn finish(&mut self) {
        tracing::info!(file = %self.file, "hub download complete");
    }
}

/// Finds the files of a hub model in the hub cache (`HF_HOME`), downloading those missing.
pub(super) fn files(
    api: &hf_hub::api::sync::Api,
    cache: &hf_hub::Cache,
    id: &str,
) -> Result<ModelFiles, ErrorDetail> {
    let name = id.rsplit('/').next().unwrap_or(id);
    let cached = cache.model(id.to_string());
    let repo = api.model(id.to_string());
    // HF_HUB_OFFLINE=1 means the cache only, as in the Python tools.
    let offline = std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1" || v == "true");
    // Each failure names its file.
    let get = |file: &str| -> Result<PathBuf, ErrorDetail> {
        match cached.get(file) {
            Some(path) => Ok(path),
            None if offline => {
                Err(format!("{file} is not in the hub cache (HF_HUB_OFFLINE)").into())
            }
            None => repo
                .download_with_progress(file, LogProgress::default())
                .map_err(|e| ErrorDetail::new(file, e)),
        }
    };
    let config = get("config.json")?;
    let tokenizer = get("tokenizer.json")?;
    let weights = match get("model.safetensors") {
        Ok(path) => vec![path],
        Err(single) => {
            // A model without the index has one file: say why that one did not come.
            let index = get("model.safetensors.index.json").map_err(|_| single)?;
            shard_files(&index)?
                .iter()
                .map(|f| get(f))
                .collect::<Result<Vec<_>, _>>()?
        }
    };
    Ok(ModelFiles {
        source: format!("hub:{id}"),
        name: name.to_string(),
        config,
        tokenizer,
        weights,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::kind::ModelType;

    #[test]
    fn an_unreachable_hub_says_what_to_set() {
        // A closed local port stands in for a hub the network does not reach.
        let cache = std::env::temp_dir().join(format!("fr-hub-cache-{}", std::process::id()));
        let api = hf_hub::api::sync::ApiBuilder::from_cache(hf_hub::Cache::new(cache.clone()))
            .with_endpoint("http://127.0.0.1:9".to_string())
            .with_progress(false)
            .build()
            .unwrap();
        let id = ModelType::Clip.default_model_id();
        let cause = files(&api, &hf_hub::Cache::new(cache.clone()), id).unwrap_err();
        let err = error(id, cause).to_string();
        assert!(
            err.contains("Set MODEL_PATH to a folder holding config.json"),
            "{err}"
        );
        assert!(err.contains("openai/clip-vit-base-patch32"), "{err}");
        let _ = std::fs::remove_dir_all(&cache);
    }
}
