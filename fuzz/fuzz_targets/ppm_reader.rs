//! Fuzzes the reader of ffmpeg's `P6` (PPM) frames: headers with huge, zero or malformed
//! sizes, and streams that end inside a frame, are refused with an error.
#![no_main]
use free_roam::fuzzing::ppm_frames;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (frames, _end) = ppm_frames(data);
    let mut used = 0usize;
    for (w, h, len) in frames {
        assert!(w > 0 && h > 0);
        assert_eq!(len as u64, u64::from(w) * u64::from(h) * 3);
        used += len;
    }
    assert!(used <= data.len());
});
