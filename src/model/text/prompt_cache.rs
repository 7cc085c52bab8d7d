//! Per-prompt work (text embeddings, tokenised prefixes) kept while prompts repeat, so the
//! text side runs once per prompt version instead of once per batch.

use crate::model::ModelError;
use std::collections::VecDeque;
use std::sync::Arc;

/// How many prompts' text embeddings are kept.
pub const PROMPT_CACHE: usize = 16;

/// Per-prompt work (text embeddings) kept while prompts repeat: the last [`PROMPT_CACHE`]
/// prompt texts, oldest dropped first.
pub struct PromptCache<T> {
    entries: VecDeque<(Arc<str>, Arc<T>)>,
}

impl<T> Default for PromptCache<T> {
    fn default() -> Self {
        Self {
            entries: VecDeque::new(),
        }
    }
}

impl<T> PromptCache<T> {
    /// The entry for `text`, made by `make` when it is not kept.
    pub fn get_or_try_insert(
        &mut self,
        text: &Arc<str>,
        make: impl FnOnce() -> Result<T, ModelError>,
    ) -> Result<Arc<T>, ModelError> {
        if let Some((_, hit)) = self.entries.iter().find(|(k, _)| k == text) {
            return Ok(hit.clone());
        }
        let entry = Arc::new(make()?);
        if self.entries.len() >= PROMPT_CACHE {
            self.entries.pop_front();
        }
        self.entries.push_back((text.clone(), entry.clone()));
        Ok(entry)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}
