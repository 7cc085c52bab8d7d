//! Fuzzes the `stream_ref` rules: what ffmpeg may read (`plan_input`) and which Redis key a
//! frame-stream job may read (`stream_key`). Nothing accepted may become an ffmpeg option.
#![no_main]
use free_roam::store::keys::Keys;
use free_roam::source::ffmpeg_args::{HTTP_PROTOCOLS, RTSP_TCP_PROTOCOLS, plan_input};
use free_roam::source::redis_frames::stream_key;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first byte may stretch the rest to about 1 MiB, past every length bound.
    let (stretch, rest) = data.split_first().unwrap_or((&0, &[]));
    let owned: Vec<u8>;
    let bytes = if *stretch == 0xff && !rest.is_empty() {
        owned = rest.iter().copied().cycle().take((1 << 20) + 7).collect();
        &owned[..]
    } else {
        rest
    };
    let Ok(s) = std::str::from_utf8(bytes) else {
        return;
    };
    for allow_files in [false, true] {
        if let Ok(plan) = plan_input(s, allow_files) {
            assert!(!plan.url.starts_with('-'));
            assert!(!plan.url.chars().any(char::is_control));
            if !allow_files {
                assert!(
                    plan.protocols == HTTP_PROTOCOLS || plan.protocols == RTSP_TCP_PROTOCOLS,
                    "{s:?} may read {}",
                    plan.protocols
                );
            }
        }
    }
    let keys = Keys::new("fr");
    if let Ok(key) = stream_key(s, &keys) {
        assert!(!key.starts_with('-') && !key.trim().is_empty());
        assert!(!keys.owns(&key));
    }
});
