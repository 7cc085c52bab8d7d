//! Text on the model side: tokenizers, the phrase rules that turn a prompt into phrases,
//! and the per-prompt cache of text work.

pub mod phrases;
pub mod prompt_cache;
pub mod tokenizer;
