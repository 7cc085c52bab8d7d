//! Fuzzes the prompt phrase rule (`checked_phrases`): phrases are non-empty, distinct and
//! hold no list separator, whatever the prompt (control characters, 1 MiB, any script).
#![no_main]
use free_roam::model::clip::checked_phrases;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (stretch, rest) = data.split_first().unwrap_or((&0, &[]));
    let owned: Vec<u8>;
    let bytes = if *stretch == 0xff && !rest.is_empty() {
        owned = rest.iter().copied().cycle().take(1 << 20).collect();
        &owned[..]
    } else {
        rest
    };
    // Prompts reach the rule as strings (the job parser refuses bytes that are not UTF-8).
    let prompt = String::from_utf8_lossy(bytes);
    if let Ok(phrases) = checked_phrases(&prompt) {
        assert!(!phrases.is_empty());
        for (i, p) in phrases.iter().enumerate() {
            assert!(!p.is_empty() && p.trim() == p, "{p:?}");
            assert!(!p.contains([',', ';', ':', '|', '\n', '\r']), "{p:?}");
            assert!(!phrases[..i].contains(p));
        }
    }
});
