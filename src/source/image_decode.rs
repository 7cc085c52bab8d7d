//! Decodes the encoded images of frame streams: JPEG through libjpeg-turbo, PNG through the
//! image crate. Pure: bytes in, a frame or the reason out.
//!
//! JPEG goes through libjpeg-turbo (built from source and linked statically) because that
//! is the decoder PIL and OpenCV use, and so the decoder behind the reference pipelines the
//! models are compared with: other decoders upsample chroma and invert the DCT a little
//! differently, which moved CLIP's similarities by up to 2e-3 on colour photos. The default
//! settings are the ones PIL uses: the accurate integer DCT and "fancy" (smooth) chroma
//! upsampling.
//!
//! Every header is read before anything is decoded, so an image bomb is refused by its
//! declared size.

use crate::frame::Frame;
use bytes::Bytes;
use std::cell::RefCell;
use std::io::Cursor;

/// The encodings a `data` field may hold, recognised by their first bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageKind {
    Jpeg,
    Png,
}

impl ImageKind {
    /// Recognises an encoded image by its signature.
    pub fn sniff(data: &[u8]) -> Option<Self> {
        if data.starts_with(&[0xFF, 0xD8, 0xFF]) {
            Some(Self::Jpeg)
        } else if data.starts_with(b"\x89PNG\r\n\x1a\n") {
            Some(Self::Png)
        } else {
            None
        }
    }
}

/// Refuses an image whose declared size is over `max_pixels`, before it is decoded.
pub fn check_pixels(width: u32, height: u32, max_pixels: u64) -> Result<(), String> {
    let pixels = u64::from(width) * u64::from(height);
    if pixels > max_pixels {
        Err(format!(
            "image is {width}x{height} ({pixels} pixels), over MAX_FRAME_PIXELS={max_pixels}"
        ))
    } else {
        Ok(())
    }
}

/// Decodes a JPEG or PNG image into an RGB24 frame.
pub fn decode_image(data: &[u8], max_pixels: u64) -> Result<Frame, String> {
    match ImageKind::sniff(data) {
        Some(ImageKind::Jpeg) => decode_jpeg(data, max_pixels),
        Some(ImageKind::Png) => decode_png(data, max_pixels),
        None => {
            Err("data is not a JPEG or PNG image (raw pixels need `format` rgb24 or gray8)".into())
        }
    }
}

thread_local! {
    /// One libjpeg-turbo handle per decoding thread: creating one allocates its tables.
    static DECOMPRESSOR: RefCell<Option<turbojpeg::Decompressor>> = const { RefCell::new(None) };
}

fn decode_jpeg(data: &[u8], max_pixels: u64) -> Result<Frame, String> {
    DECOMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        let decompressor = match slot.as_mut() {
            Some(d) => d,
            None => slot.insert(
                turbojpeg::Decompressor::new()
                    .map_err(|e| format!("starting the JPEG decoder: {e}"))?,
            ),
        };
        let header = decompressor
            .read_header(data)
            .map_err(|e| format!("bad image header: {e}"))?;
        let (width, height) = (
            u32::try_from(header.width).map_err(|_| "bad image header: width".to_string())?,
            u32::try_from(header.height).map_err(|_| "bad image header: height".to_string())?,
        );
        if width == 0 || height == 0 {
            return Err("bad image header: zero width or height".into());
        }
        check_pixels(width, height, max_pixels)?;
        if matches!(
            header.colorspace,
            turbojpeg::Colorspace::CMYK | turbojpeg::Colorspace::YCCK
        ) {
            // libjpeg-turbo cannot turn CMYK into RGB; such files are rare on cameras.
            return decode_with_image_crate(data, width, height);
        }
        let pitch = header.width * 3;
        let mut rgb = vec![0u8; pitch * header.height];
        decompressor
            .decompress(
                data,
                turbojpeg::Image {
                    pixels: rgb.as_mut_slice(),
                    width: header.width,
                    pitch,
                    height: header.height,
                    format: turbojpeg::PixelFormat::RGB,
                },
            )
            .map_err(|e| format!("bad image data: {e}"))?;
        Frame::new(width, height, Bytes::from(rgb)).map_err(|e| e.to_string())
    })
}

fn decode_png(data: &[u8], max_pixels: u64) -> Result<Frame, String> {
    let reader = image::ImageReader::with_format(Cursor::new(data), image::ImageFormat::Png);
    let (width, height) = reader
        .into_dimensions()
        .map_err(|e| format!("bad image header: {e}"))?;
    check_pixels(width, height, max_pixels)?;
    decode_with_image_crate(data, width, height)
}

/// Decodes with the image crate, its limits set to the size the header declared.
fn decode_with_image_crate(data: &[u8], width: u32, height: u32) -> Result<Frame, String> {
    let mut reader = image::ImageReader::new(Cursor::new(data))
        .with_guessed_format()
        .map_err(|e| format!("reading image: {e}"))?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(width);
    limits.max_image_height = Some(height);
    reader.limits(limits);
    let rgb = reader
        .decode()
        .map_err(|e| format!("bad image data: {e}"))?
        .into_rgb8();
    let (w, h) = rgb.dimensions();
    Frame::new(w, h, Bytes::from(rgb.into_raw())).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jpeg(w: u32, h: u32, sampling: turbojpeg::Subsamp) -> Vec<u8> {
        let pixels: Vec<u8> = (0..w * h)
            .flat_map(|i| {
                let (x, y) = (i % w, i / w);
                [(x * 7) as u8, (y * 5) as u8, ((x ^ y) * 3) as u8]
            })
            .collect();
        let image = turbojpeg::Image {
            pixels: pixels.as_slice(),
            width: w as usize,
            pitch: w as usize * 3,
            height: h as usize,
            format: turbojpeg::PixelFormat::RGB,
        };
        turbojpeg::compress(image, 90, sampling).unwrap().to_vec()
    }

    #[test]
    fn decodes_colour_and_grey_jpeg_to_rgb() {
        for sampling in [
            turbojpeg::Subsamp::Sub2x2,
            turbojpeg::Subsamp::None,
            turbojpeg::Subsamp::Gray,
        ] {
            let f = decode_image(&jpeg(33, 17, sampling), 10_000).unwrap();
            assert_eq!((f.width, f.height, f.rgb.len()), (33, 17, 33 * 17 * 3));
        }
        let grey = decode_image(&jpeg(8, 8, turbojpeg::Subsamp::Gray), 100).unwrap();
        assert!(grey.rgb.chunks(3).all(|p| p[0] == p[1] && p[1] == p[2]));
    }

    #[test]
    fn refuses_bombs_and_broken_jpeg_with_a_reason() {
        let data = jpeg(40, 30, turbojpeg::Subsamp::Sub2x2);
        assert!(
            decode_image(&data, 1199)
                .unwrap_err()
                .contains("over MAX_FRAME_PIXELS")
        );
        let mut truncated = data.clone();
        truncated.truncate(data.len() / 3);
        let err = decode_image(&truncated, 10_000).unwrap_err();
        assert!(err.starts_with("bad image"), "{err}");
        let err = decode_image(&data[..3], 10_000).unwrap_err();
        assert!(err.starts_with("bad image"), "{err}");
        assert!(
            decode_image(b"GIF89a", 100)
                .unwrap_err()
                .contains("not a JPEG or PNG")
        );
    }
}

/// The JPEG frames of tests/parity/jpeg against PIL's decode of the same files (written by
/// scripts/parity/make_jpeg_parity.py): colour 4:2:0, 4:2:2 and 4:4:4, odd sizes, one
/// progressive.
#[cfg(test)]
mod parity {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn jpeg_frames_decode_to_pils_pixels() {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/parity/jpeg");
        let mut names: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "jpg"))
            .collect();
        names.sort();
        assert!(names.len() >= 6, "parity JPEG frames missing");
        for jpg in names {
            let ours = decode_image(&std::fs::read(&jpg).unwrap(), u64::MAX).unwrap();
            let png = jpg.with_extension("pil.png");
            let pil = decode_image(&std::fs::read(&png).unwrap(), u64::MAX).unwrap();
            assert_eq!((ours.width, ours.height), (pil.width, pil.height));
            let (mut worst, mut off) = (0u8, 0usize);
            for (a, b) in ours.rgb.iter().zip(pil.rgb.iter()) {
                let d = a.abs_diff(*b);
                worst = worst.max(d);
                off += usize::from(d > 0);
            }
            eprintln!(
                "{}: max difference {worst}, {off} of {} values differ",
                jpg.file_name().unwrap().to_string_lossy(),
                ours.rgb.len()
            );
            assert!(worst <= 1, "{} differs from PIL by {worst}", jpg.display());
        }
    }
}
