//! From a prompt to the phrases a scoring or detection model looks for (pure):
//!
//! 1. split on `,` `;` `:` `|` and line breaks, and on the standalone words `and`, `or`, `&`;
//! 2. in each piece, lower-case it, collapse white space and trim surrounding punctuation;
//! 3. drop leading instruction words ([`FILLER_WORDS`]: verbs such as "detect", "find",
//!    "look", quantifiers and articles such as "all", "any", "the", "a"); a piece made only
//!    of them ("Detect:") is dropped;
//! 4. drop empty pieces and repeats, keeping the first order.
//!
//! "Detect all people and vehicles" gives `people`, `vehicles`; "person, car, dog" gives
//! three phrases. CLIP, SigLIP and OWL-ViT put each phrase to their text tower through
//! [`PHRASE_TEMPLATE`] ("a photo of {phrase}.").

/// How each phrase is put to the text tower.
pub const PHRASE_TEMPLATE: &str = "a photo of {phrase}.";
/// Words dropped from the front of a phrase (see the module docs).
pub const FILLER_WORDS: &[&str] = &[
    "detect",
    "detecting",
    "find",
    "finding",
    "identify",
    "locate",
    "spot",
    "show",
    "count",
    "search",
    "look",
    "track",
    "highlight",
    "recognize",
    "recognise",
    "see",
    "check",
    "list",
    "label",
    "classify",
    "please",
    "me",
    "for",
    "out",
    "all",
    "any",
    "every",
    "each",
    "the",
    "a",
    "an",
    "some",
    "there",
    "is",
    "are",
];
/// The most phrases one prompt may produce (each is a text-tower pass when the prompt
/// changes, and a column of every frame's output).
pub const MAX_PHRASES: usize = 64;
/// The phrases of a prompt by [`prompt_phrases`], or a prompt error when there are none or
/// too many.
pub fn checked_phrases(prompt: &str) -> Result<Vec<String>, String> {
    let phrases = prompt_phrases(prompt);
    if phrases.is_empty() {
        return Err(
            "the prompt names nothing to look for; give phrases such as \"person, car, dog\""
                .into(),
        );
    }
    if phrases.len() > MAX_PHRASES {
        return Err(format!(
            "the prompt gives {} phrases; at most {MAX_PHRASES} are scored",
            phrases.len()
        ));
    }
    Ok(phrases)
}

/// Splits a prompt into candidate phrases by the rule in the module docs.
pub fn prompt_phrases(prompt: &str) -> Vec<String> {
    let mut phrases: Vec<String> = Vec::new();
    let lower = prompt.to_lowercase();
    for piece in lower.split([',', ';', ':', '|', '\n', '\r']) {
        let mut current: Vec<&str> = Vec::new();
        let mut pieces: Vec<Vec<&str>> = Vec::new();
        for word in piece.split_whitespace() {
            if matches!(word, "and" | "or" | "&") {
                pieces.push(std::mem::take(&mut current));
            } else {
                current.push(word);
            }
        }
        pieces.push(current);
        for words in pieces {
            let joined = words.join(" ");
            let trimmed = joined.trim_matches(|c: char| {
                c.is_whitespace()
                    || matches!(c, '.' | '!' | '?' | '"' | '\'' | '(' | ')' | '[' | ']')
            });
            let words: Vec<&str> = trimmed.split_whitespace().collect();
            // Skipped by index: removing them one by one from the front was quadratic in
            // the number of leading filler words.
            let first = words
                .iter()
                .position(|w| !FILLER_WORDS.contains(w))
                .unwrap_or(words.len());
            let phrase = words[first..].join(" ");
            if !phrase.is_empty() && !phrases.contains(&phrase) {
                phrases.push(phrase);
            }
        }
    }
    phrases
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phrases_drop_instructions_and_split_on_lists() {
        assert_eq!(
            prompt_phrases("Detect all people and vehicles"),
            ["people", "vehicles"]
        );
        assert_eq!(prompt_phrases("person, car, dog"), ["person", "car", "dog"]);
        assert_eq!(
            prompt_phrases("Find: a red car; the dogs & cats."),
            ["red car", "dogs", "cats"]
        );
        assert_eq!(
            prompt_phrases("look for any people or bicycles\nwatch"),
            ["people", "bicycles", "watch"]
        );
        assert_eq!(prompt_phrases("Person,  PERSON , person"), ["person"]);
        assert_eq!(
            prompt_phrases("fire in the kitchen"),
            ["fire in the kitchen"]
        );
        assert!(prompt_phrases(" , ; and ").is_empty());
    }
}
