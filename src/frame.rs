//! Decoded video frames: the one pixel type every source produces and every model reads.
//!
//! Pure data: no Redis, no candle, no I/O. Pixels are packed RGB24, row-major, no padding,
//! held in a reference-counted buffer so a frame moves from source to model without a copy.

use bytes::Bytes;
use std::time::Instant;

/// One decoded frame, always packed RGB24 (`width * height * 3` bytes).
#[derive(Clone, Debug)]
pub struct Frame {
    pub width: u32,
    pub height: u32,
    /// Packed RGB24 pixels, row-major.
    pub rgb: Bytes,
    /// The size of the picture the source produced, before ingest scaled it down to
    /// `MAX_FRAME_SIDE`: what a model that locates things reports positions in. Equal to
    /// `width` and `height` when the frame was not scaled (or its original size is unknown).
    pub source_width: u32,
    pub source_height: u32,
    /// Position in the job's source: the decoded frame number (HLS) or the entry's order
    /// (Redis frame stream), counting from 0 for the job.
    pub index: u64,
    /// Presentation time within the stream, in milliseconds, when the source knows it.
    pub pts_ms: Option<i64>,
    /// Capture (or arrival) wall-clock time, milliseconds since the Unix epoch.
    pub capture_ms: i64,
    /// Where the source resumes after this frame (a Redis entry id, an HLS position).
    pub cursor: Option<String>,
    /// When the worker received the frame; the engine measures frame age from it.
    pub received: Instant,
}

impl Frame {
    /// Builds a frame after checking that the buffer holds exactly `width * height * 3` bytes.
    pub fn new(width: u32, height: u32, rgb: Bytes) -> Result<Self, FrameError> {
        // In u128: a declared u32 x u32 x 3 overflows usize.
        let expected = u128::from(width) * u128::from(height) * 3;
        if width == 0 || height == 0 {
            return Err(FrameError::EmptyImage);
        }
        if rgb.len() as u128 != expected {
            return Err(FrameError::SizeMismatch {
                width,
                height,
                expected,
                actual: rgb.len(),
            });
        }
        Ok(Self {
            width,
            height,
            rgb,
            source_width: width,
            source_height: height,
            index: 0,
            pts_ms: None,
            capture_ms: 0,
            cursor: None,
            received: Instant::now(),
        })
    }
}

impl Frame {
    /// Records that the source's picture was `width` x `height` before it was scaled to this
    /// frame. A size smaller than the frame's own on either side cannot be (ingest never
    /// enlarges) and is ignored, so positions are never scaled by a misread size.
    pub fn with_source_size(mut self, width: u32, height: u32) -> Self {
        if width >= self.width && height >= self.height {
            self.source_width = width;
            self.source_height = height;
        }
        self
    }
}

/// Why bytes could not become a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("image has a zero width or height")]
    EmptyImage,
    #[error("{width}x{height} rgb24 needs {expected} bytes, got {actual}")]
    SizeMismatch {
        width: u32,
        height: u32,
        expected: u128,
        actual: usize,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_exact_size_and_rejects_others() {
        assert!(Frame::new(2, 2, Bytes::from(vec![0u8; 12])).is_ok());
        assert_eq!(
            Frame::new(2, 2, Bytes::from(vec![0u8; 11])).unwrap_err(),
            FrameError::SizeMismatch {
                width: 2,
                height: 2,
                expected: 12,
                actual: 11
            }
        );
        assert_eq!(
            Frame::new(0, 2, Bytes::new()).unwrap_err(),
            FrameError::EmptyImage
        );
    }

    #[test]
    fn a_size_whose_byte_count_overflows_is_a_mismatch_not_a_panic() {
        assert_eq!(
            Frame::new(u32::MAX, u32::MAX, Bytes::from(vec![0u8; 12])).unwrap_err(),
            FrameError::SizeMismatch {
                width: u32::MAX,
                height: u32::MAX,
                expected: 3 * u128::from(u32::MAX) * u128::from(u32::MAX),
                actual: 12
            }
        );
    }

    #[test]
    fn the_source_size_defaults_to_the_frame_and_is_never_smaller() {
        let f = Frame::new(4, 2, Bytes::from(vec![0u8; 24])).unwrap();
        assert_eq!((f.source_width, f.source_height), (4, 2));
        let scaled = f.clone().with_source_size(1280, 640);
        assert_eq!((scaled.source_width, scaled.source_height), (1280, 640));
        let misread = f.with_source_size(2, 2);
        assert_eq!((misread.source_width, misread.source_height), (4, 2));
    }
}
