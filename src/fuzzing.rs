//! Entry points for the fuzz targets in `fuzz/`: each runs one parser of untrusted input on
//! raw bytes or a raw Redis reply, the way the worker runs it. Not part of the API.

use crate::source::hls::read_frame;
use crate::store::StoreResult;
use crate::store::functions::{self, CancelOutcome, ClaimVerdict, EndRecord, Lease, Ownership};
use redis::Value;
use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

/// Reads ffmpeg `P6` frames from `data` until it ends or a frame is refused: each frame's
/// size and pixel byte count, then how the stream ended.
pub fn ppm_frames(data: &[u8]) -> (Vec<(u32, u32, usize)>, std::io::Result<()>) {
    let mut reader = tokio::io::BufReader::with_capacity(64, data);
    let mut frames = Vec::new();
    loop {
        // An in-memory reader never waits, so one poll always finishes the read.
        match ready(read_frame(&mut reader)) {
            Ok(Some((w, h, pixels))) => frames.push((w, h, pixels.len())),
            Ok(None) => return (frames, Ok(())),
            Err(e) => return (frames, Err(e)),
        }
    }
}

fn ready<F: Future>(future: F) -> F::Output {
    let mut future = pin!(future);
    match future
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
    {
        Poll::Ready(out) => out,
        Poll::Pending => unreachable!("a read from memory never waits"),
    }
}

/// What each reader of the `freeroam` functions' replies made of one reply.
pub struct FunctionReplies {
    pub claim: ClaimVerdict,
    pub ownership: StoreResult<Ownership>,
    pub leases: StoreResult<Vec<Lease>>,
    pub cancel: StoreResult<CancelOutcome>,
    pub end: StoreResult<EndRecord>,
}

/// Runs every reader of the `freeroam` functions' replies on `reply`, as each function's
/// caller would (`jobs` is how many leases a heartbeat asked about).
pub fn function_replies(reply: &Value, jobs: usize) -> FunctionReplies {
    FunctionReplies {
        claim: ClaimVerdict::from_reply(reply.clone()),
        ownership: functions::ownership("fuzz", reply.clone()),
        leases: functions::leases(reply.clone(), jobs),
        cancel: functions::cancel_reply(reply.clone()),
        end: functions::end_record(reply.clone()),
    }
}
