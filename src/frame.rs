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
        let expected = (width as usize) * (height as usize) * 3;
        if width == 0 || height == 0 {
            return Err(FrameError::EmptyImage);
        }
        if rgb.len() != expected {
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
            index: 0,
            pts_ms: None,
            capture_ms: 0,
            cursor: None,
            received: Instant::now(),
        })
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
        expected: usize,
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
}
