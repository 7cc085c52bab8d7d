//! Compares the worker's JPEG decoder (libjpeg-turbo) with the image crate's, side by side
//! in one run: how far each lands from PIL's decode of the parity frames
//! (tests/parity/jpeg), and the time each takes per frame at 720p and 1080p.
//!
//! `cargo run --release --example bench_decode -- [ITERS]`, or `scripts/bench decode`.

use free_roam::source::image_decode::decode_image;
use std::path::PathBuf;
use std::time::Instant;

fn image_crate_decode(data: &[u8]) -> Vec<u8> {
    image::load_from_memory_with_format(data, image::ImageFormat::Jpeg)
        .expect("image crate decode")
        .into_rgb8()
        .into_raw()
}

/// Largest difference and share of values that differ, against PIL's pixels.
fn distance(ours: &[u8], pil: &[u8]) -> (u8, f64) {
    assert_eq!(ours.len(), pil.len());
    let (mut worst, mut off) = (0u8, 0usize);
    for (a, b) in ours.iter().zip(pil) {
        let d = a.abs_diff(*b);
        worst = worst.max(d);
        off += usize::from(d > 0);
    }
    (worst, off as f64 / ours.len() as f64)
}

/// A camera-like colour frame: gradients, hard-edged shapes and a little noise.
fn camera_jpeg(w: u32, h: u32) -> Vec<u8> {
    let mut state = 0x2545_f491_u32;
    let pixels: Vec<u8> = (0..w * h)
        .flat_map(|i| {
            let (x, y) = (i % w, i / w);
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            let n = (state % 9) as u8;
            let inside = (x / 97 + y / 61) % 3 == 0;
            let (r, g, b) = if inside {
                (200, 40, 30)
            } else {
                ((x * 255 / w) as u8, (y * 255 / h) as u8, 120)
            };
            [r.saturating_add(n), g.saturating_add(n), b]
        })
        .collect();
    let image = turbojpeg::Image {
        pixels: pixels.as_slice(),
        width: w as usize,
        pitch: w as usize * 3,
        height: h as usize,
        format: turbojpeg::PixelFormat::RGB,
    };
    turbojpeg::compress(image, 85, turbojpeg::Subsamp::Sub2x2)
        .expect("encode")
        .to_vec()
}

fn median_ms(iters: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut times: Vec<f64> = (0..iters)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

fn main() {
    let iters: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(50);
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/parity/jpeg");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("tests/parity/jpeg")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "jpg"))
        .collect();
    files.sort();
    println!("| frame | libjpeg-turbo against PIL | image crate against PIL |");
    println!("| --- | --- | --- |");
    for jpg in &files {
        let data = std::fs::read(jpg).unwrap();
        let pil = decode_image(
            &std::fs::read(jpg.with_extension("pil.png")).unwrap(),
            u64::MAX,
        )
        .unwrap();
        let ours = decode_image(&data, u64::MAX).unwrap();
        let (tw, ts) = distance(&ours.rgb, &pil.rgb);
        let (iw, is) = distance(&image_crate_decode(&data), &pil.rgb);
        println!(
            "| {} | max {tw}, {:.1}% differ | max {iw}, {:.1}% differ |",
            jpg.file_name().unwrap().to_string_lossy(),
            ts * 100.0,
            is * 100.0
        );
    }
    println!();
    println!("| frame | libjpeg-turbo ms | image crate ms | ratio |");
    println!("| --- | --- | --- | --- |");
    for (w, h) in [(1280, 720), (1920, 1080)] {
        let data = camera_jpeg(w, h);
        let turbo = median_ms(iters, || {
            std::hint::black_box(decode_image(&data, u64::MAX).unwrap());
        });
        let crate_ms = median_ms(iters, || {
            std::hint::black_box(image_crate_decode(&data));
        });
        println!(
            "| {w}x{h} 4:2:0 q85 ({} KiB) | {turbo:.2} | {crate_ms:.2} | {:.2}x |",
            data.len() / 1024,
            turbo / crate_ms
        );
    }
}
