//! Fuzzes MessagePack frame entries (the `frame` field's envelope): `parse_entry` then
//! `decode_payload`, deeply nested and truncated envelopes included.
#![no_main]
use free_roam::config::Config;
use free_roam::source::redis_frames::{decode_payload, parse_entry};
use libfuzzer_sys::fuzz_target;
use redis::Value;
use std::collections::HashMap;
use std::sync::LazyLock;

static MAX_PIXELS: LazyLock<u64> = LazyLock::new(|| Config::defaults().max_frame_pixels);

fuzz_target!(|data: &[u8]| {
    let mut map = HashMap::from([("frame".to_string(), Value::BulkString(data.to_vec()))]);
    let entry = parse_entry(&mut map);
    if let Ok(payload) = entry.payload
        && let Ok(frame) = decode_payload(payload, *MAX_PIXELS)
    {
        let pixels = u64::from(frame.width) * u64::from(frame.height);
        assert!(pixels > 0 && pixels <= *MAX_PIXELS);
        assert_eq!(frame.rgb.len() as u64, pixels * 3);
    }
});
