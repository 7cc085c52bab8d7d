//! Reading a model's `config.json`: the file parsed as JSON, then read into a family's serde
//! structs (whose absent keys take transformers' defaults), and the shape checks several
//! families make of what they read.

use crate::model::ModelError;
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
    fn patches_and_heads_must_divide() {
        assert!(check_patches(224, 32).is_ok());
        assert!(check_patches(224, 0).is_err());
        assert!(check_patches(224, 30).is_err());
        assert!(check_heads(&[(512, 8), (768, 12)]).is_ok());
        assert!(check_heads(&[(512, 8), (768, 7)]).is_err());
    }
}
