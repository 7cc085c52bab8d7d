//! From a prompt to the phrases a scoring or detection model looks for (pure):
//!
//! 1. split on `,` `;` `:` `|` and line breaks, and on the standalone words `and`, `or`, `&`;
//! 2. in each piece, lower-case it, collapse white space and trim surrounding punctuation;
//! 3. drop leading instruction words ([`FILLER_WORDS`]: verbs such as "detect", "find",
//!    "look" and their "-ing" forms, "only" and "just", quantifiers and articles such as
//!    "all", "any", "the", "a", and the words of a question or a request: "is there",
//!    "can you", "tell me if"); a piece made only of them ("Detect:") is dropped;
//! 4. drop trailing [`TRAILING_WORDS`] ("people only" is `people`);
//! 5. drop empty pieces and repeats, keeping the first order.
//!
//! CLIP, SigLIP and OWL-ViT put each phrase to their text tower through
//! [`PHRASE_TEMPLATE`] ("a photo of {phrase}."). What real prompts give (a unit test
//! checks this table):
//!
//! | prompt | phrases |
//! | --- | --- |
//! | Detect all people and vehicles | `people`, `vehicles` |
//! | Detect only vehicles | `vehicles` |
//! | Is there a person at the door? | `person at the door` |
//! | Count the cars | `cars` |
//! | Look for people wearing helmets | `people wearing helmets` |
//! | Find any dog or cat | `dog`, `cat` |
//! | Counting trucks, looking for bikes; searching for a red car | `trucks`, `bikes`, `red car` |
//! | Are there any people? | `people` |
//! | Tell me if there is a fire | `fire` |
//! | Just the dogs please | `dogs` |
//! | person, car, dog | `person`, `car`, `dog` |
//! | fire in the kitchen | `fire in the kitchen` |
//!
//! Only the front and the end of a phrase are trimmed: words inside it stay ("a person at
//! the door" keeps "the"), and so does a verb that is not an instruction ("people wearing
//! helmets").

/// How each phrase is put to the text tower.
pub const PHRASE_TEMPLATE: &str = "a photo of {phrase}.";
/// Words dropped from the front of a phrase (see the module docs).
pub const FILLER_WORDS: &[&str] = &[
    // instructions, and their -ing forms ("counting cars")
    "detect",
    "detecting",
    "find",
    "finding",
    "identify",
    "identifying",
    "locate",
    "locating",
    "spot",
    "spotting",
    "show",
    "showing",
    "count",
    "counting",
    "search",
    "searching",
    "look",
    "looking",
    "track",
    "tracking",
    "highlight",
    "highlighting",
    "recognize",
    "recognizing",
    "recognise",
    "recognising",
    "see",
    "seeing",
    "check",
    "checking",
    "list",
    "listing",
    "label",
    "labelling",
    "labeling",
    "classify",
    "classifying",
    "tell",
    "notify",
    "alert",
    "warn",
    // requests and questions ("can you see", "tell me if there is", "are there any")
    "please",
    "can",
    "could",
    "you",
    "me",
    "us",
    "if",
    "whether",
    "when",
    "whenever",
    "for",
    "out",
    "there",
    "is",
    "are",
    // restrictions, quantifiers and articles
    "only",
    "just",
    "all",
    "any",
    "every",
    "each",
    "the",
    "a",
    "an",
    "some",
];
/// Words dropped from the end of a phrase ("people only", "dogs please").
pub const TRAILING_WORDS: &[&str] = &["only", "please"];
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
            let last = words
                .iter()
                .rposition(|w| !TRAILING_WORDS.contains(w))
                .map_or(first, |i| (i + 1).max(first));
            let phrase = words[first..last].join(" ");
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

    /// The table in the module docs, row by row.
    #[test]
    fn real_world_prompts_give_the_documented_phrases() {
        let table: &[(&str, &[&str])] = &[
            ("Detect all people and vehicles", &["people", "vehicles"]),
            ("Detect only vehicles", &["vehicles"]),
            ("Is there a person at the door?", &["person at the door"]),
            ("Count the cars", &["cars"]),
            (
                "Look for people wearing helmets",
                &["people wearing helmets"],
            ),
            ("Find any dog or cat", &["dog", "cat"]),
            (
                "Counting trucks, looking for bikes; searching for a red car",
                &["trucks", "bikes", "red car"],
            ),
            ("Are there any people?", &["people"]),
            ("Tell me if there is a fire", &["fire"]),
            ("Just the dogs please", &["dogs"]),
            ("person, car, dog", &["person", "car", "dog"]),
            ("fire in the kitchen", &["fire in the kitchen"]),
        ];
        let docs = include_str!("phrases.rs");
        for (prompt, phrases) in table {
            assert_eq!(prompt_phrases(prompt), *phrases, "{prompt}");
            let cells: Vec<String> = phrases.iter().map(|p| format!("`{p}`")).collect();
            let row = format!("//! | {prompt} | {} |", cells.join(", "));
            assert!(docs.contains(&row), "the module docs lack the row {row}");
        }
    }

    #[test]
    fn instruction_words_alone_and_trailing_words_leave_nothing_behind() {
        assert!(prompt_phrases("Detect only").is_empty());
        assert_eq!(prompt_phrases("people only"), ["people"]);
        assert_eq!(prompt_phrases("only"), Vec::<String>::new());
    }
}
