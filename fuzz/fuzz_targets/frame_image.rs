//! Fuzzes the JPEG and PNG decoding of frame-stream entries (`decode_image`) under the
//! default MAX_FRAME_PIXELS: corrupt, truncated and bomb images are refused, never a crash.
#![no_main]
use free_roam::config::Config;
use free_roam::source::image_decode::decode_image;
use libfuzzer_sys::fuzz_target;
use std::sync::LazyLock;

static MAX_PIXELS: LazyLock<u64> = LazyLock::new(|| Config::defaults().max_frame_pixels);

fuzz_target!(|data: &[u8]| {
    if let Ok(frame) = decode_image(data, *MAX_PIXELS) {
        let pixels = u64::from(frame.width) * u64::from(frame.height);
        assert!(pixels > 0 && pixels <= *MAX_PIXELS);
        assert_eq!(frame.rgb.len() as u64, pixels * 3);
    }
});
