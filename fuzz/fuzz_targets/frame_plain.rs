//! Fuzzes plain frame-stream entries (`data`, `format`, `width`, `height`, `ts` fields):
//! `parse_entry` then `decode_payload`, as the frame-stream reader runs them.
//!
//! Input: a 12-byte header, then the `data` field. Header: flags (which fields are present
//! and how they are typed), the format, width and height (u32 LE), the MAX_FRAME_PIXELS
//! choice, the `ts` byte.
#![no_main]
use free_roam::config::Config;
use free_roam::source::redis_frames::{Payload, decode_payload, parse_entry};
use libfuzzer_sys::fuzz_target;
use redis::Value;
use std::collections::HashMap;
use std::sync::LazyLock;

static MAX_PIXELS: LazyLock<u64> = LazyLock::new(|| Config::defaults().max_frame_pixels);

const FORMATS: [&str; 8] = [
    "jpeg", "PNG", "rgb24", "gray8", "Rgb24", "gif", "", "gray8\0",
];

fn text(s: String, simple: bool) -> Value {
    if simple {
        Value::SimpleString(s)
    } else {
        Value::BulkString(s.into_bytes())
    }
}

fuzz_target!(|input: &[u8]| {
    if input.len() < 12 {
        return;
    }
    let (head, data) = input.split_at(12);
    let flags = head[0];
    let width = u32::from_le_bytes(head[2..6].try_into().unwrap());
    let height = u32::from_le_bytes(head[6..10].try_into().unwrap());
    let simple = flags & 0x40 != 0;
    let mut map: HashMap<String, Value> = HashMap::new();
    if flags & 1 != 0 {
        map.insert(
            "format".into(),
            text(FORMATS[usize::from(head[1] % 8)].into(), simple),
        );
    }
    if flags & 2 != 0 {
        map.insert("width".into(), text(width.to_string(), simple));
    }
    if flags & 4 != 0 {
        map.insert("height".into(), text(height.to_string(), simple));
    }
    if flags & 8 != 0 {
        // A time that is a number, or bytes that are not even UTF-8.
        let ts = if head[11] & 1 == 0 {
            Value::Int(i64::from(head[11]) << 40)
        } else {
            Value::BulkString(vec![0xff, head[11], b'\n'])
        };
        map.insert("ts".into(), ts);
    }
    if flags & 0x10 != 0 {
        let data = if flags & 0x20 != 0 {
            // A `data` field that is not a byte string.
            Value::Array(vec![Value::BulkString(data.to_vec())])
        } else {
            Value::BulkString(data.to_vec())
        };
        map.insert("data".into(), data);
    }
    let entry = parse_entry(&mut map);
    let Ok(payload) = entry.payload else {
        return;
    };
    // Raw pixels are checked against any limit, even none at all; encoded images only
    // against limits that keep a decode within the fuzzer's memory.
    let raw = matches!(payload, Payload::Raw { .. });
    let max_pixels = match head[10] % 4 {
        0 => *MAX_PIXELS,
        1 => 1,
        2 => 64 * 64,
        _ if raw => u64::MAX,
        _ => *MAX_PIXELS,
    };
    if let Ok(frame) = decode_payload(payload, max_pixels) {
        let pixels = u64::from(frame.width) * u64::from(frame.height);
        assert!(pixels > 0 && pixels <= max_pixels);
        assert_eq!(frame.rgb.len() as u64, pixels * 3);
    }
});
