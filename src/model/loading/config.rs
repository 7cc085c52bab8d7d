//! Reading a model's `config.json`: the file parsed as JSON, the family it names checked
//! against `MODEL_TYPE`, then read into a family's serde structs (whose absent keys take
//! transformers' defaults), and the shape checks several families make of what they read.

use crate::model::ModelError;
use crate::model::kind::ModelType;
use serde::de::DeserializeOwned;
use serde_json::Value;
use std::path::Path;

/// Reads and parses `config.json`.
pub fn read_config(path: &Path) -> Result<Value, ModelError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ModelError::load(format!("cannot read {}", path.display()), e))?;
    serde_json::from_str(&text)
        .map_err(|e| ModelError::load(format!("{} is not valid JSON", path.display()), e))
}

/// Reads a parsed `config.json` as `T`, the `family`'s serde view of it. A key set to `null`
/// counts as absent, so it takes its default too.
pub fn parse_config<T: DeserializeOwned>(config: &Value, family: &str) -> Result<T, ModelError> {
    let mut config = config.clone();
    drop_nulls(&mut config);
    serde_json::from_value(config)
        .map_err(|e| ModelError::load(format!("config.json is not a {family} config"), e))
}

/// The `model_type` a parsed `config.json` names, if any.
fn named_model_type(config: &Value) -> Option<&str> {
    config.get("model_type")?.as_str()
}

/// Refuses a checkpoint (`source`: its folder or hub id) whose `config.json` names another
/// family the worker has than the `chosen` one: it would otherwise fail on the first of
/// many missing tensors, which hides the one-word fix. A config naming no family, or one
/// the worker does not know, passes (see [`with_family_hint`]).
pub fn check_family(config: &Value, chosen: ModelType, source: &str) -> Result<(), ModelError> {
    let Some(named) = named_model_type(config) else {
        return Ok(());
    };
    match ModelType::from_config_model_type(named) {
        Some(other) if other != chosen => Err(ModelError::Load(
            format!(
                "MODEL_TYPE={chosen} cannot load {source}: its config.json names model_type \
                 {named:?}, a MODEL_TYPE={other} checkpoint; set MODEL_TYPE={other}, or point \
                 MODEL_PATH (or MODEL_ID) at a {chosen} checkpoint"
            )
            .into(),
        )),
        _ => Ok(()),
    }
}

/// A failed load of a checkpoint whose `config.json` names a `model_type` other than the
/// `chosen` family's: the error says so first, as the likely reason. Other failures are
/// returned as they are.
pub fn with_family_hint(err: ModelError, config: &Value, chosen: ModelType) -> ModelError {
    let (Some(named), Some(expected)) = (named_model_type(config), chosen.config_model_type())
    else {
        return err;
    };
    if named == expected {
        return err;
    }
    let hint = format!("config.json names model_type {named:?}, not {expected:?}");
    match err {
        ModelError::Load(detail) => ModelError::Load(detail.within(hint)),
        ModelError::Prompt(detail) => ModelError::Prompt(detail.within(hint)),
        ModelError::Inference(detail) => ModelError::Inference(detail.within(hint)),
    }
}

/// Removes every `null` member of every object in `value`.
fn drop_nulls(value: &mut Value) {
    match value {
        Value::Object(map) => {
            map.retain(|_, v| !v.is_null());
            map.values_mut().for_each(drop_nulls);
        }
        Value::Array(items) => items.iter_mut().for_each(drop_nulls),
        _ => {}
    }
}

/// Refuses an image side that the patches do not tile.
pub fn check_patches(image_size: usize, patch_size: usize) -> Result<(), ModelError> {
    if patch_size == 0 || !image_size.is_multiple_of(patch_size) {
        return Err(ModelError::Load(
            format!(
                "config.json: image_size {image_size} is not a multiple of patch_size {patch_size}"
            )
            .into(),
        ));
    }
    Ok(())
}

/// Refuses towers whose hidden size their attention heads do not divide: `(hidden, heads)`
/// per tower.
pub fn check_heads(towers: &[(usize, usize)]) -> Result<(), ModelError> {
    if towers
        .iter()
        .any(|&(hidden, heads)| !hidden.is_multiple_of(heads))
    {
        return Err(ModelError::Load(
            "config.json: hidden_size is not a multiple of num_attention_heads".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use serde_json::json;

    #[derive(Debug, Deserialize)]
    #[serde(default)]
    struct Sizes {
        hidden_size: usize,
        image_size: usize,
    }

    impl Default for Sizes {
        fn default() -> Self {
            Self {
                hidden_size: 768,
                image_size: 224,
            }
        }
    }

    #[test]
    fn absent_and_null_keys_take_their_defaults() {
        let sizes: Sizes = parse_config(&json!({"hidden_size": null}), "test").unwrap();
        assert_eq!((sizes.hidden_size, sizes.image_size), (768, 224));
        let sizes: Sizes = parse_config(&json!({"image_size": 384}), "test").unwrap();
        assert_eq!((sizes.hidden_size, sizes.image_size), (768, 384));
    }

    #[test]
    fn a_value_of_the_wrong_kind_is_refused_with_its_cause() {
        let err = parse_config::<Sizes>(&json!({"hidden_size": "big"}), "test").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("model weights: config.json is not a test config: invalid type"),
            "{err}"
        );
        assert!(matches!(
            err.detail().cause(),
            Some(crate::model::Cause::Json(_))
        ));
    }

    #[test]
    fn a_config_of_another_family_is_refused_by_name() {
        let owlvit =
            json!({"model_type": "owlvit", "text_config": {"model_type": "owlvit_text_model"}});
        let err = check_family(&owlvit, ModelType::Clip, "models/owl").unwrap_err();
        assert!(matches!(err, ModelError::Load(_)));
        assert_eq!(
            err.to_string(),
            "model weights: MODEL_TYPE=clip cannot load models/owl: its config.json names \
             model_type \"owlvit\", a MODEL_TYPE=owlvit checkpoint; set MODEL_TYPE=owlvit, or \
             point MODEL_PATH (or MODEL_ID) at a clip checkpoint"
        );
        assert!(check_family(&owlvit, ModelType::OwlVit, "models/owl").is_ok());
        // No name, or a name the worker does not know: the load itself decides.
        assert!(check_family(&json!({}), ModelType::Clip, "m").is_ok());
        assert!(check_family(&json!({"model_type": "llava"}), ModelType::Clip, "m").is_ok());
    }

    #[test]
    fn a_failed_load_names_an_unknown_model_type_first() {
        let failed = || ModelError::Load("weights lack 3 tensor(s)".into());
        let llava = json!({"model_type": "llava"});
        let err = with_family_hint(failed(), &llava, ModelType::Clip);
        assert!(matches!(err, ModelError::Load(_)));
        assert_eq!(
            err.to_string(),
            "model weights: config.json names model_type \"llava\", not \"clip\": weights lack 3 tensor(s)"
        );
        let clip = json!({"model_type": "clip"});
        let err = with_family_hint(failed(), &clip, ModelType::Clip);
        assert_eq!(err.to_string(), "model weights: weights lack 3 tensor(s)");
        let err = with_family_hint(failed(), &json!({}), ModelType::Clip);
        assert_eq!(err.to_string(), "model weights: weights lack 3 tensor(s)");
    }

    #[test]
    fn patches_and_heads_must_divide() {
        assert!(check_patches(224, 32).is_ok());
        assert!(check_patches(224, 0).is_err());
        assert!(check_patches(224, 30).is_err());
        assert!(check_heads(&[(512, 8), (768, 12)]).is_ok());
        assert!(check_heads(&[(512, 8), (768, 7)]).is_err());
    }
}
