//! Tokenizers: loading a model's `tokenizer.json`, and writing small deterministic ones (a
//! CLIP byte-level BPE, SentencePiece-style Unigrams for SigLIP and PaliGemma, and a BERT
//! WordPiece) for the random test models.
//!
//! The small tokenizers are written out from a fixed vocabulary and merge list rather than
//! trained, because the `tokenizers` trainers break ties in hash order and so give a
//! different vocabulary from run to run.

use crate::model::{Cause, ModelError};
use serde_json::{Value, json};
use std::path::Path;
use tokenizers::Tokenizer;

/// CLIP's start-of-text special token.
pub const CLIP_BOS: &str = "<|startoftext|>";
/// CLIP's end-of-text special token; also used for padding and as the unknown token.
pub const CLIP_EOS: &str = "<|endoftext|>";
pub const BERT_PAD: &str = "[PAD]";
pub const BERT_UNK: &str = "[UNK]";
pub const BERT_CLS: &str = "[CLS]";
pub const BERT_SEP: &str = "[SEP]";
pub const BERT_MASK: &str = "[MASK]";
/// BLIP's decoder start token.
pub const BLIP_DEC: &str = "[DEC]";
pub const BLIP_ENC: &str = "[ENC]";

/// SigLIP's padding token (id 0 in its SentencePiece vocabulary).
pub const SIGLIP_PAD: &str = "<pad>";
/// SigLIP's end-of-sequence token, appended to every text; its checkpoints also pad with it.
pub const SIGLIP_EOS: &str = "</s>";
pub const SIGLIP_UNK: &str = "<unk>";

/// Words the small vocabularies spell as whole tokens, so typical prompts tokenise into
/// short, realistic sequences. Anything else still tokenises (bytes or letters).
const WORDS: &[&str] = &[
    "a",
    "an",
    "the",
    "photo",
    "picture",
    "image",
    "of",
    "and",
    "with",
    "on",
    "in",
    "at",
    "is",
    "there",
    "two",
    "three",
    "person",
    "people",
    "man",
    "woman",
    "child",
    "car",
    "cars",
    "vehicle",
    "vehicles",
    "truck",
    "bus",
    "bicycle",
    "dog",
    "cat",
    "bird",
    "boat",
    "tree",
    "house",
    "street",
    "road",
    "sky",
    "water",
    "light",
    "red",
    "blue",
    "green",
    "white",
    "black",
    "sitting",
    "standing",
    "walking",
    "detect",
    "all",
    "find",
    "photography",
];

/// Loads `tokenizer.json`, naming the file in the error.
pub fn load(path: &Path) -> Result<Tokenizer, ModelError> {
    Tokenizer::from_file(path).map_err(|e| {
        ModelError::load(
            format!("cannot read tokenizer {}", path.display()),
            Cause::Tokenizer(e),
        )
    })
}

/// The id of a token that must exist in the vocabulary.
pub fn required_id(tokenizer: &Tokenizer, token: &str) -> Result<u32, ModelError> {
    tokenizer
        .token_to_id(token)
        .ok_or_else(|| ModelError::Load(format!("tokenizer has no {token} token").into()))
}

/// The token ids of `text`, with the tokenizer's special tokens when `special`; a text the
/// tokenizer refuses is a prompt error.
pub fn encode_ids(
    tokenizer: &Tokenizer,
    text: &str,
    special: bool,
) -> Result<Vec<u32>, ModelError> {
    tokenizer
        .encode(text, special)
        .map(|encoding| encoding.get_ids().to_vec())
        .map_err(|e| ModelError::prompt(format!("cannot tokenise {text:?}"), Cause::Tokenizer(e)))
}

/// The text of generated `ids`, without special tokens.
pub fn decode(tokenizer: &Tokenizer, ids: &[u32]) -> Result<String, ModelError> {
    tokenizer.decode(ids, true).map_err(|e| {
        ModelError::inference("cannot decode the generated tokens", Cause::Tokenizer(e))
    })
}

/// GPT-2/CLIP byte-to-character table, in CLIP's vocabulary order: printable bytes first
/// (mapped to themselves), then the rest mapped past U+0100.
fn byte_chars() -> Vec<char> {
    let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut chars: Vec<char> = printable
        .iter()
        .map(|&b| char::from_u32(b).unwrap())
        .collect();
    let mut next = 256u32;
    for b in 0u32..256 {
        if !printable.contains(&b) {
            printable.push(b);
            chars.push(char::from_u32(next).unwrap());
            next += 1;
        }
    }
    chars
}

/// A small CLIP-style tokenizer: the full 512-entry byte alphabet (with and without `</w>`),
/// merges that spell [`WORDS`], then `<|startoftext|>` and `<|endoftext|>` as the two
/// highest ids, as in the real vocabulary. Returns the JSON and the vocabulary size.
pub fn clip_tiny_tokenizer() -> (Value, usize) {
    let mut vocab: Vec<String> = byte_chars().iter().map(|c| c.to_string()).collect();
    let with_suffix: Vec<String> = vocab.iter().map(|c| format!("{c}</w>")).collect();
    vocab.extend(with_suffix);
    let mut merges: Vec<String> = Vec::new();
    for word in WORDS {
        let mut symbols: Vec<String> = word.chars().map(|c| c.to_string()).collect();
        if let Some(last) = symbols.last_mut() {
            last.push_str("</w>");
        }
        // Merge left to right; every intermediate becomes a token.
        let mut acc = symbols[0].clone();
        for next in &symbols[1..] {
            let merge = format!("{acc} {next}");
            acc.push_str(next);
            if !merges.contains(&merge) {
                merges.push(merge);
            }
            if !vocab.contains(&acc) {
                vocab.push(acc.clone());
            }
        }
    }
    let bos = vocab.len();
    vocab.push(CLIP_BOS.to_string());
    vocab.push(CLIP_EOS.to_string());
    let eos = bos + 1;
    let vocab_map = vocab_ids(&vocab);
    let special = |id: usize, content: &str| added_token(id, content, true);
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [special(bos, CLIP_BOS), special(eos, CLIP_EOS)],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "NFC"},
            {"type": "Replace", "pattern": {"Regex": "\\s+"}, "content": " "},
            {"type": "Lowercase"}
        ]},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split",
             "pattern": {"Regex": "'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+"},
             "behavior": "Removed", "invert": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}
        ]},
        "post_processor": {"type": "RobertaProcessing", "sep": [CLIP_EOS, eos],
                           "cls": [CLIP_BOS, bos], "trim_offsets": false,
                           "add_prefix_space": false},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true,
                    "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": CLIP_EOS,
                  "continuing_subword_prefix": "", "end_of_word_suffix": "</w>",
                  "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab_map, "merges": merges}
    });
    (tokenizer, vocab.len())
}

/// A small SigLIP-style SentencePiece (Unigram) tokenizer: `<pad>`, `</s>`, `<unk>` as ids
/// 0, 1, 2 as in the real vocabulary, the word-start marker, letters, digits and
/// punctuation, and [`WORDS`] as whole pieces; lower-cased, with `</s>` appended. Returns
/// the JSON and the vocabulary size.
pub fn siglip_tiny_tokenizer() -> (Value, usize) {
    let mut vocab: Vec<(String, f64)> = [SIGLIP_PAD, SIGLIP_EOS, SIGLIP_UNK]
        .iter()
        .map(|t| (t.to_string(), 0.0))
        .collect();
    vocab.push(("\u{2581}".to_string(), -3.0));
    for c in ".,;:!?'\"-()/&".chars().chain('0'..='9').chain('a'..='z') {
        vocab.push((c.to_string(), -5.0));
    }
    for w in WORDS {
        vocab.push((format!("\u{2581}{w}"), -2.0));
    }
    let special = |id: usize, content: &str| added_token(id, content, false);
    let metaspace = json!({"type": "Metaspace", "replacement": "\u{2581}",
                           "prepend_scheme": "always", "split": true});
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [special(0, SIGLIP_PAD), special(1, SIGLIP_EOS), special(2, SIGLIP_UNK)],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Replace", "pattern": {"Regex": "\\s+"}, "content": " "},
            {"type": "Lowercase"}
        ]},
        "pre_tokenizer": metaspace,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": SIGLIP_EOS, "type_id": 0}}
            ],
            "pair": [
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": SIGLIP_EOS, "type_id": 0}},
                {"Sequence": {"id": "B", "type_id": 1}},
                {"SpecialToken": {"id": SIGLIP_EOS, "type_id": 1}}
            ],
            "special_tokens": {
                SIGLIP_EOS: {"id": SIGLIP_EOS, "ids": [1], "tokens": [SIGLIP_EOS]}
            }
        },
        "decoder": metaspace,
        "model": {"type": "Unigram", "unk_id": 2, "vocab": vocab, "byte_fallback": false}
    });
    (tokenizer, vocab.len())
}

/// Special token ids of the small BERT vocabulary.
#[derive(Clone, Copy, Debug)]
pub struct BertSpecialIds {
    pub pad: usize,
    pub unk: usize,
    pub cls: usize,
    pub sep: usize,
    pub mask: usize,
    pub dec: usize,
    pub enc: usize,
}

/// A small BERT-style WordPiece tokenizer (uncased): specials, punctuation, digits, letters,
/// `##` continuations of letters and digits, [`WORDS`], then BLIP's `[DEC]` and `[ENC]` as
/// the two highest ids, as in the real BLIP vocabulary. Returns the JSON, the vocabulary
/// size and the special ids.
pub fn bert_tiny_tokenizer() -> (Value, usize, BertSpecialIds) {
    let mut vocab: Vec<String> = [BERT_PAD, BERT_UNK, BERT_CLS, BERT_SEP, BERT_MASK]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let singles: Vec<char> = ".,;:!?'\"-()/&"
        .chars()
        .chain('0'..='9')
        .chain('a'..='z')
        .collect();
    vocab.extend(singles.iter().map(|c| c.to_string()));
    vocab.extend(('a'..='z').chain('0'..='9').map(|c| format!("##{c}")));
    for w in WORDS {
        if !vocab.iter().any(|v| v == w) {
            vocab.push(w.to_string());
        }
    }
    let dec = vocab.len();
    vocab.push(BLIP_DEC.to_string());
    vocab.push(BLIP_ENC.to_string());
    let ids = BertSpecialIds {
        pad: 0,
        unk: 1,
        cls: 2,
        sep: 3,
        mask: 4,
        dec,
        enc: dec + 1,
    };
    let vocab_map = vocab_ids(&vocab);
    let special = |id: usize, content: &str| added_token(id, content, false);
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [
            special(ids.pad, BERT_PAD), special(ids.unk, BERT_UNK), special(ids.cls, BERT_CLS),
            special(ids.sep, BERT_SEP), special(ids.mask, BERT_MASK), special(ids.dec, BLIP_DEC),
            special(ids.enc, BLIP_ENC)
        ],
        "normalizer": {"type": "BertNormalizer", "clean_text": true,
                       "handle_chinese_chars": true, "strip_accents": null, "lowercase": true},
        "pre_tokenizer": {"type": "BertPreTokenizer"},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [
                {"SpecialToken": {"id": BERT_CLS, "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": BERT_SEP, "type_id": 0}}
            ],
            "pair": [
                {"SpecialToken": {"id": BERT_CLS, "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": BERT_SEP, "type_id": 0}},
                {"Sequence": {"id": "B", "type_id": 1}},
                {"SpecialToken": {"id": BERT_SEP, "type_id": 1}}
            ],
            "special_tokens": {
                BERT_CLS: {"id": BERT_CLS, "ids": [ids.cls], "tokens": [BERT_CLS]},
                BERT_SEP: {"id": BERT_SEP, "ids": [ids.sep], "tokens": [BERT_SEP]}
            }
        },
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": true},
        "model": {"type": "WordPiece", "unk_token": BERT_UNK, "continuing_subword_prefix": "##",
                  "max_input_chars_per_word": 100, "vocab": vocab_map}
    });
    (tokenizer, vocab.len(), ids)
}

/// PaliGemma's (Gemma's) padding token, id 0.
pub const GEMMA_PAD: &str = "<pad>";
/// Gemma's end-of-sequence token, id 1: generation stops on it.
pub const GEMMA_EOS: &str = "<eos>";
/// Gemma's start-of-sequence token, id 2: PaliGemma's prompt follows it.
pub const GEMMA_BOS: &str = "<bos>";
pub const GEMMA_UNK: &str = "<unk>";
/// The placeholder token of one image patch in PaliGemma's input.
pub const PALIGEMMA_IMAGE: &str = "<image>";

/// PaliGemma's task words, which the small vocabulary spells as whole pieces.
const PALIGEMMA_WORDS: &[&str] = &[
    "caption", "answer", "en", "ocr", "segment", "describe", "anyone", "wearing", "helmet", "yes",
    "no", "how", "many", "what", "are", "open", "gate",
];

/// The number of steps of PaliGemma's location grid (`<loc0000>` to `<loc1023>`).
pub const LOC_STEPS: u32 = 1024;

/// PaliGemma's location tokens, `<loc0000>` to `<loc1023>`, in vocabulary order.
pub fn loc_tokens() -> impl Iterator<Item = String> {
    (0..LOC_STEPS).map(|i| format!("<loc{i:04}>"))
}

/// PaliGemma's segmentation tokens, `<seg000>` to `<seg127>`, in vocabulary order.
pub fn seg_tokens() -> impl Iterator<Item = String> {
    (0..128).map(|i| format!("<seg{i:03}>"))
}

/// A small Gemma-style SentencePiece (Unigram) tokenizer for PaliGemma: `<pad>`, `<eos>`,
/// `<bos>`, `<unk>` as ids 0 to 3 as in the real vocabulary, the word-start marker `▁`
/// (spaces become it; nothing is prepended), the newline that ends PaliGemma's prompt,
/// punctuation, digits, letters of both cases, [`WORDS`] and PaliGemma's task words as
/// whole pieces with and without the marker; then, in the real vocabulary's order, the 1024
/// `<locNNNN>` tokens, the 128 `<segNNN>` tokens and `<image>`. Case is kept and no token
/// is added around a text, as PaliGemma's processor asks of the tokenizer. Returns the
/// JSON and the vocabulary size.
pub fn paligemma_tiny_tokenizer() -> (Value, usize) {
    let mut vocab: Vec<(String, f64)> = [GEMMA_PAD, GEMMA_EOS, GEMMA_BOS, GEMMA_UNK]
        .iter()
        .map(|t| (t.to_string(), 0.0))
        .collect();
    vocab.push(("\u{2581}".to_string(), -3.0));
    vocab.push(("\n".to_string(), -3.0));
    for c in ".,;:!?'\"-()/&"
        .chars()
        .chain('0'..='9')
        .chain('a'..='z')
        .chain('A'..='Z')
    {
        vocab.push((c.to_string(), -5.0));
    }
    for w in WORDS.iter().chain(PALIGEMMA_WORDS) {
        vocab.push((format!("\u{2581}{w}"), -2.0));
        if w.len() > 1 {
            vocab.push((w.to_string(), -2.5));
        }
    }
    let first_added = vocab.len();
    for t in loc_tokens().chain(seg_tokens()) {
        vocab.push((t, 0.0));
    }
    vocab.push((PALIGEMMA_IMAGE.to_string(), 0.0));
    let added = |id: usize, content: &str, special: bool| {
        json!({"id": id, "content": content, "single_word": false, "lstrip": false,
               "rstrip": false, "normalized": false, "special": special})
    };
    let mut added_tokens: Vec<Value> = [GEMMA_PAD, GEMMA_EOS, GEMMA_BOS, GEMMA_UNK]
        .iter()
        .enumerate()
        .map(|(id, t)| added(id, t, true))
        .collect();
    for (id, (content, _)) in vocab.iter().enumerate().skip(first_added) {
        added_tokens.push(added(id, content, content == PALIGEMMA_IMAGE));
    }
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens,
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"},
        "pre_tokenizer": null,
        "post_processor": null,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
            {"type": "Fuse"}
        ]},
        "model": {"type": "Unigram", "unk_id": 3, "vocab": vocab, "byte_fallback": false}
    });
    (tokenizer, vocab.len())
}

/// A word-level vocabulary as `tokenizer.json` lists it: each token with its id (its place).
fn vocab_ids(vocab: &[String]) -> serde_json::Map<String, Value> {
    vocab
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect()
}

/// A special token's entry in `tokenizer.json`'s `added_tokens`.
fn added_token(id: usize, content: &str, normalized: bool) -> Value {
    json!({"id": id, "content": content, "single_word": false, "lstrip": false,
           "rstrip": false, "normalized": normalized, "special": true})
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    fn build(v: &Value) -> Tokenizer {
        Tokenizer::from_str(&v.to_string()).unwrap()
    }

    #[test]
    fn clip_tiny_tokenizer_is_deterministic_and_works() {
        let (a, n) = clip_tiny_tokenizer();
        let (b, _) = clip_tiny_tokenizer();
        assert_eq!(a.to_string(), b.to_string());
        let tok = build(&a);
        assert_eq!(tok.get_vocab_size(true), n);
        let eos = required_id(&tok, CLIP_EOS).unwrap() as usize;
        let bos = required_id(&tok, CLIP_BOS).unwrap() as usize;
        assert_eq!((bos, eos), (n - 2, n - 1));
        let enc = tok.encode("A photo of  PEOPLE.", true).unwrap();
        assert_eq!(
            enc.get_tokens(),
            &[
                "<|startoftext|>",
                "a</w>",
                "photo</w>",
                "of</w>",
                "people</w>",
                ".</w>",
                "<|endoftext|>"
            ]
        );
        // Unknown words still tokenise, down to bytes if need be.
        let enc = tok.encode("zebra ü", true).unwrap();
        assert!(enc.get_ids().iter().all(|&i| (i as usize) < n));
        assert_eq!(*enc.get_ids().last().unwrap() as usize, eos);
    }

    #[test]
    fn siglip_tiny_tokenizer_is_deterministic_and_works() {
        let (a, n) = siglip_tiny_tokenizer();
        assert_eq!(a.to_string(), siglip_tiny_tokenizer().0.to_string());
        let tok = build(&a);
        assert_eq!(tok.get_vocab_size(true), n);
        assert_eq!(required_id(&tok, SIGLIP_EOS).unwrap(), 1);
        let enc = tok.encode("A photo of  PEOPLE.", true).unwrap();
        assert_eq!(
            enc.get_tokens(),
            &[
                "\u{2581}a",
                "\u{2581}photo",
                "\u{2581}of",
                "\u{2581}people",
                ".",
                "</s>"
            ]
        );
        let enc = tok.encode("zebra ü", true).unwrap();
        assert!(enc.get_ids().iter().all(|&i| (i as usize) < n));
        assert!(enc.get_ids().contains(&2), "ü is unknown");
        assert_eq!(*enc.get_ids().last().unwrap(), 1);
    }

    #[test]
    fn bert_tiny_tokenizer_is_deterministic_and_works() {
        let (a, n, ids) = bert_tiny_tokenizer();
        assert_eq!(a.to_string(), bert_tiny_tokenizer().0.to_string());
        let tok = build(&a);
        assert_eq!(tok.get_vocab_size(true), n);
        assert_eq!(ids.dec, n - 2);
        let enc = tok.encode("A picture of Zebras!", true).unwrap();
        assert_eq!(
            enc.get_tokens(),
            &[
                "[CLS]", "a", "picture", "of", "z", "##e", "##b", "##r", "##a", "##s", "!", "[SEP]"
            ]
        );
        let a = tok.token_to_id("a").unwrap();
        let text = tok
            .decode(&[ids.dec as u32, a, ids.sep as u32], true)
            .unwrap();
        assert_eq!(text, "a");
    }

    #[test]
    fn paligemma_tiny_tokenizer_is_deterministic_and_works() {
        let (a, n) = paligemma_tiny_tokenizer();
        assert_eq!(a.to_string(), paligemma_tiny_tokenizer().0.to_string());
        let tok = build(&a);
        assert_eq!(tok.get_vocab_size(true), n);
        assert_eq!(required_id(&tok, GEMMA_EOS).unwrap(), 1);
        assert_eq!(required_id(&tok, GEMMA_BOS).unwrap(), 2);
        let image = required_id(&tok, PALIGEMMA_IMAGE).unwrap() as usize;
        assert_eq!(image, n - 1);
        let loc0 = required_id(&tok, "<loc0000>").unwrap() as usize;
        assert_eq!(required_id(&tok, "<seg127>").unwrap() as usize, image - 1);
        assert_eq!(
            required_id(&tok, "<loc1023>").unwrap() as usize,
            loc0 + 1023
        );
        let enc = tok
            .encode("answer en Is anyone wearing a helmet?\n", false)
            .unwrap();
        assert_eq!(
            enc.get_tokens(),
            &[
                "answer",
                "\u{2581}en",
                "\u{2581}",
                "I",
                "s",
                "\u{2581}anyone",
                "\u{2581}wearing",
                "\u{2581}a",
                "\u{2581}helmet",
                "?",
                "\n"
            ]
        );
        let enc = tok.encode("detect <loc0012> zebra ü", false).unwrap();
        assert!(enc.get_ids().contains(&(loc0 as u32 + 12)));
        assert!(enc.get_ids().contains(&3), "ü is unknown");
        let ids: Vec<u32> = [loc0 + 1, loc0 + 1023]
            .iter()
            .map(|&i| i as u32)
            .chain(
                tok.encode(" person", false)
                    .unwrap()
                    .get_ids()
                    .iter()
                    .copied(),
            )
            .chain([1])
            .collect();
        assert_eq!(tok.decode(&ids, true).unwrap(), "<loc0001><loc1023> person");
    }
}
