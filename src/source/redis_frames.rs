//! The Redis frame-stream source: reads frames a producer `XADD`s to a stream (JPEG or PNG
//! bytes, raw RGB24/GRAY8 pixels, or a MessagePack envelope), samples them by capture time
//! and decodes only the frames that are kept. See docs/redis-contract.md for the shape.
//!
//! A bad entry (an unknown encoding, raw data of the wrong length, an image larger than
//! MAX_FRAME_PIXELS) becomes an error entry for that frame and the stream goes on.

use super::image_decode::{check_pixels, decode_image};
use super::{BadFrame, Slot, SourceEvent};
use crate::frame::Frame;
use crate::sampler::Sampler;
use crate::store::{Backoff, MAX_BLOCK_MS, Store, StoreError};
use bytes::Bytes;
use redis::Value;
use redis::streams::{StreamId, StreamRangeReply, StreamReadReply};
use serde::Deserialize;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Entries read per `XREAD`. An entry may be megabytes (a raw 1080p frame is 6 MB) and a
/// read decodes only its newest kept entry, so reads are kept to a few entries: one read
/// brings at most this many plus the newest (see [`Reader::catch_up`]), whatever the
/// backlog.
const READ_COUNT: usize = 4;

/// A frame-stream key named by a `stream_ref`: `redis://KEY` or the bare key. The
/// deployment's own keys are refused: a job may not read the queue, alerts or another
/// job's results as its frames.
pub fn stream_key(
    stream_ref: &str,
    keys: &crate::store::keys::Keys,
) -> Result<String, super::ffmpeg_args::Refused> {
    use super::ffmpeg_args::Refused;
    let key = match stream_ref.get(..8) {
        Some(p) if p.eq_ignore_ascii_case("redis://") => &stream_ref[8..],
        _ => stream_ref,
    };
    if key.trim().is_empty() {
        return Err(Refused("the frame stream key is empty".into()));
    }
    if key.len() > crate::job::MAX_STREAM_REF_BYTES {
        return Err(Refused("the frame stream key is too long".into()));
    }
    if key.starts_with('-') || key.chars().any(char::is_control) {
        return Err(Refused(
            "the frame stream key may not start with '-' or hold control characters".into(),
        ));
    }
    if keys.owns(key) {
        return Err(Refused(format!(
            "`{key}` is one of this deployment's own keys (KEY_PREFIX), not a frame stream"
        )));
    }
    Ok(key.to_string())
}

/// What one frame-stream job needs.
pub struct FrameStreamJob {
    pub key: String,
    pub fps: f64,
    /// The id of the last entry an earlier delivery finished.
    pub resume_cursor: Option<String>,
    /// Index of the first entry read (entries already read by earlier deliveries).
    pub first_index: u64,
    pub max_pixels: u64,
    /// Reads that bring nothing for this long (Redis answering) fail the job.
    pub stall_timeout: Duration,
    pub store: Store,
}

/// Pixel layouts a raw entry may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RawFormat {
    Rgb24,
    Gray8,
}

/// The image an entry carries, before decoding.
#[derive(Clone, Debug, PartialEq)]
pub enum Payload {
    /// JPEG or PNG bytes.
    Encoded(Bytes),
    Raw {
        width: u32,
        height: u32,
        format: RawFormat,
        data: Bytes,
    },
}

/// An entry's capture time (when it says) and its image, or why it has none.
#[derive(Debug)]
pub struct ParsedEntry {
    pub ts: Option<i64>,
    pub payload: Result<Payload, String>,
}

/// The MessagePack envelope of the `frame` field; `data` borrows from the field's bytes.
#[derive(Deserialize)]
struct Envelope<'a> {
    ts: Option<i64>,
    width: Option<u32>,
    height: Option<u32>,
    format: Option<String>,
    #[serde(borrow, deserialize_with = "borrowed_bytes")]
    data: &'a [u8],
}

/// MessagePack `bin` (what msgpack libraries write for bytes) as a borrowed slice.
fn borrowed_bytes<'de, D: serde::Deserializer<'de>>(d: D) -> Result<&'de [u8], D::Error> {
    struct V;
    impl<'de> serde::de::Visitor<'de> for V {
        type Value = &'de [u8];
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("bytes (msgpack bin)")
        }
        fn visit_borrowed_bytes<E: serde::de::Error>(self, v: &'de [u8]) -> Result<Self::Value, E> {
            Ok(v)
        }
        fn visit_borrowed_str<E: serde::de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
            Ok(v.as_bytes())
        }
    }
    d.deserialize_bytes(V)
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

fn into_bytes(v: Value) -> Option<Bytes> {
    match v {
        Value::BulkString(b) => Some(Bytes::from(b)),
        Value::SimpleString(s) => Some(Bytes::from(s.into_bytes())),
        _ => None,
    }
}

fn raw_payload(
    width: Option<u32>,
    height: Option<u32>,
    format: Option<&str>,
    data: Bytes,
) -> Result<Payload, String> {
    match format.map(str::to_ascii_lowercase).as_deref() {
        None | Some("jpeg") | Some("jpg") | Some("png") => Ok(Payload::Encoded(data)),
        Some(f @ ("rgb24" | "gray8")) => {
            let (Some(width), Some(height)) = (width, height) else {
                return Err(format!("raw {f} data needs `width` and `height`"));
            };
            let format = if f == "rgb24" {
                RawFormat::Rgb24
            } else {
                RawFormat::Gray8
            };
            Ok(Payload::Raw {
                width,
                height,
                format,
                data,
            })
        }
        Some(other) => Err(format!(
            "unknown format `{other}`: use jpeg, png, rgb24 or gray8"
        )),
    }
}

/// Reads an entry's fields (taking the pixel bytes without copying them).
pub fn parse_entry(map: &mut HashMap<String, Value>) -> ParsedEntry {
    if let Some(frame) = map.remove("frame") {
        let Some(bytes) = into_bytes(frame) else {
            return ParsedEntry {
                ts: None,
                payload: Err("`frame` is not a byte string".into()),
            };
        };
        return match rmp_serde::from_slice::<Envelope<'_>>(&bytes) {
            Ok(env) => ParsedEntry {
                ts: env.ts,
                payload: raw_payload(
                    env.width,
                    env.height,
                    env.format.as_deref(),
                    bytes.slice_ref(env.data),
                ),
            },
            Err(e) => ParsedEntry {
                ts: None,
                payload: Err(format!("`frame` is not a valid MessagePack envelope: {e}")),
            },
        };
    }
    let ts = map
        .get("ts")
        .and_then(text)
        .and_then(|t| t.trim().parse::<i64>().ok());
    let number = |name: &str| {
        map.get(name)
            .and_then(text)
            .and_then(|t| t.trim().parse::<u32>().ok())
    };
    let (width, height) = (number("width"), number("height"));
    let format = map.get("format").and_then(text);
    let payload = match map.remove("data").and_then(into_bytes) {
        Some(data) => raw_payload(width, height, format.as_deref(), data),
        None => Err("entry has neither a `data` nor a `frame` field".into()),
    };
    ParsedEntry { ts, payload }
}

/// Decodes a payload into a frame. Image headers are read before anything is decoded, so an
/// image bomb is refused by its declared size.
pub fn decode_payload(payload: Payload, max_pixels: u64) -> Result<Frame, String> {
    match payload {
        Payload::Raw {
            width,
            height,
            format,
            data,
        } => {
            check_pixels(width, height, max_pixels)?;
            // In u128: under a MAX_FRAME_PIXELS near u64::MAX, width x height x 3
            // overflows usize and could wrap round to the length of a small buffer.
            let pixels = u128::from(width) * u128::from(height);
            let (expected, name) = match format {
                RawFormat::Rgb24 => (pixels * 3, "rgb24"),
                RawFormat::Gray8 => (pixels, "gray8"),
            };
            if data.len() as u128 != expected || pixels == 0 {
                return Err(format!(
                    "raw {name} {width}x{height} needs {expected} bytes, got {}",
                    data.len()
                ));
            }
            let rgb = match format {
                RawFormat::Rgb24 => data,
                RawFormat::Gray8 => {
                    let mut out = Vec::with_capacity(data.len() * 3);
                    for &v in data.iter() {
                        out.extend_from_slice(&[v, v, v]);
                    }
                    Bytes::from(out)
                }
            };
            Frame::new(width, height, rgb).map_err(|e| e.to_string())
        }
        Payload::Encoded(data) => decode_image(&data, max_pixels),
    }
}

/// The millisecond part of a stream entry id.
fn id_ms(id: &str) -> Option<i64> {
    id.split('-').next()?.parse().ok()
}

fn valid_id(id: &str) -> bool {
    let mut parts = id.split('-');
    let ok =
        |p: Option<&str>| p.is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    ok(parts.next()) && ok(parts.next()) && parts.next().is_none()
}

/// What the reader loop keeps between reads.
struct Reader {
    job: FrameStreamJob,
    sampler: Sampler,
    next_index: u64,
    last_id: String,
}

impl Reader {
    /// Samples one read's entries and hands over the newest kept one (older kept ones of the
    /// same read would only be overwritten: they are dropped without being decoded).
    async fn handle(&mut self, entries: Vec<StreamId>, slot: &Slot) {
        let mut newest: Option<(u64, i64, String, Result<Payload, String>)> = None;
        for mut entry in entries {
            let index = self.next_index;
            self.next_index += 1;
            slot.counters.decoded.fetch_add(1, Ordering::Relaxed);
            let parsed = parse_entry(&mut entry.map);
            let ts = parsed.ts.or_else(|| id_ms(&entry.id)).unwrap_or(0);
            self.last_id = entry.id.clone();
            if !self.sampler.offer(ts) {
                continue;
            }
            slot.counters.sampled.fetch_add(1, Ordering::Relaxed);
            if newest
                .replace((index, ts, entry.id, parsed.payload))
                .is_some()
            {
                slot.counters.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        let Some((index, ts, id, payload)) = newest else {
            return;
        };
        let received = Instant::now();
        let max_pixels = self.job.max_pixels;
        // Decoding a large JPEG takes milliseconds: keep it off the async workers.
        let decoded = match payload {
            Err(e) => Err(e),
            Ok(p) => tokio::task::spawn_blocking(move || decode_payload(p, max_pixels))
                .await
                .unwrap_or_else(|e| Err(format!("decoder crashed: {e}"))),
        };
        match decoded {
            Ok(mut frame) => {
                frame.index = index;
                frame.capture_ms = ts;
                frame.cursor = Some(id);
                frame.received = received;
                slot.put_latest(frame);
            }
            Err(error) => slot.bad(BadFrame {
                index,
                capture_ms: ts,
                cursor: Some(id),
                error,
            }),
        }
    }
}

/// Where a new job starts: at the newest entry already in the stream (a live feed is read
/// from now on, not from its history), or at the stream's start when it is empty or missing.
async fn start_position(store: &Store, key: &str) -> Result<(Option<StreamId>, bool), StoreError> {
    let reply: StreamRangeReply = store
        .query(
            redis::cmd("XREVRANGE")
                .arg(key)
                .arg("+")
                .arg("-")
                .arg("COUNT")
                .arg(1),
        )
        .await?;
    if let Some(entry) = reply.ids.into_iter().next() {
        return Ok((Some(entry), true));
    }
    let exists: bool = store.query(redis::cmd("EXISTS").arg(key)).await?;
    Ok((None, exists))
}

/// The source task.
pub(crate) async fn run(job: FrameStreamJob, slot: Arc<Slot>, cancel: CancellationToken) {
    let mut reader = Reader {
        sampler: Sampler::new(job.fps),
        next_index: job.first_index,
        last_id: "0-0".into(),
        job,
    };
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    // The stall watchdog: since when reads have brought nothing while Redis answered.
    let quiet_since = Instant::now();
    let waiting = match reader.job.resume_cursor.clone().filter(|c| valid_id(c)) {
        Some(cursor) => {
            reader.last_id = cursor;
            false
        }
        None => match reader.start(&slot, &cancel, &mut backoff).await {
            Some(waiting) => waiting,
            None => return,
        },
    };
    reader
        .follow(waiting, quiet_since, &slot, &cancel, &mut backoff)
        .await;
}

impl Reader {
    /// Finds where a new job starts (see [`start_position`]) and hands over the newest
    /// entry already there. `Some(waiting)`: read on, `waiting` when the stream does not
    /// exist yet; `None`: the job stopped, or failed for good.
    async fn start(
        &mut self,
        slot: &Slot,
        cancel: &CancellationToken,
        backoff: &mut Backoff,
    ) -> Option<bool> {
        let key = self.job.key.clone();
        loop {
            let res = tokio::select! {
                r = start_position(&self.job.store, &key) => r,
                _ = cancel.cancelled() => return None,
            };
            match res {
                Ok((Some(entry), _)) => {
                    self.handle(vec![entry], slot).await;
                    return Some(false);
                }
                Ok((None, exists)) => {
                    if !exists {
                        slot.note(format!("waiting for frame stream {key}"));
                    }
                    return Some(!exists);
                }
                Err(e) => {
                    if let Some(msg) = permanent(&e, &key) {
                        slot.finish(SourceEvent::Failed(msg));
                        return None;
                    }
                    if !sleep_unless_cancelled(backoff.next_delay(), cancel).await {
                        return None;
                    }
                }
            }
        }
    }

    /// Reads the stream from `last_id` on until the job stops, the stream stalls past
    /// `stall_timeout`, or Redis fails for good; Redis not answering is retried with backoff.
    async fn follow(
        &mut self,
        mut waiting: bool,
        mut quiet_since: Instant,
        slot: &Slot,
        cancel: &CancellationToken,
        backoff: &mut Backoff,
    ) {
        let key = self.job.key.clone();
        loop {
            let Some(res) = self.read(cancel).await else {
                return;
            };
            match res {
                Ok(reply) => {
                    if reply.is_some() {
                        backoff.reset();
                    }
                    let entries: Vec<StreamId> = reply
                        .into_iter()
                        .flat_map(|r| r.keys)
                        .flat_map(|k| k.ids)
                        .collect();
                    if entries.is_empty() {
                        let stall = stalled(&self.job.store, &key, quiet_since, &self.job).await;
                        if let Some(msg) = stall {
                            slot.finish(SourceEvent::Failed(msg));
                            return;
                        }
                        continue;
                    }
                    quiet_since = Instant::now();
                    if waiting {
                        waiting = false;
                        slot.note(format!("reading frame stream {key}"));
                    }
                    let entries = self.catch_up(entries).await;
                    self.handle(entries, slot).await;
                }
                Err(e) => {
                    if let Some(msg) = permanent(&e, &key) {
                        slot.finish(SourceEvent::Failed(msg));
                        return;
                    }
                    // Redis not answering is not the stream's stall: the clock starts again.
                    quiet_since = Instant::now();
                    let delay = backoff.next_delay();
                    tracing::warn!(stream = %key, error = %e, ?delay, "reading frame stream failed; retrying");
                    if !sleep_unless_cancelled(delay, cancel).await {
                        return;
                    }
                }
            }
        }
    }

    /// A full read means the job is behind its producer (a resume after a hand-back, a
    /// slow Redis, a burst): the entries between the read and the stream's newest one would
    /// be dropped unseen anyway (a read hands over only its newest kept entry), so they are
    /// skipped and the newest is read instead, on its own. The entries skipped are not
    /// counted in the frame counters, which count the entries read.
    async fn catch_up(&self, mut entries: Vec<StreamId>) -> Vec<StreamId> {
        if entries.len() < READ_COUNT {
            return entries;
        }
        let Some(last) = entries.last().map(|e| e.id.clone()) else {
            return entries;
        };
        let newest: Result<StreamRangeReply, StoreError> = self
            .job
            .store
            .query(
                redis::cmd("XREVRANGE")
                    .arg(&self.job.key)
                    .arg("+")
                    .arg(format!("({last}"))
                    .arg("COUNT")
                    .arg(1),
            )
            .await;
        match newest {
            Ok(reply) => entries.extend(reply.ids),
            // The read's own entries go on; the next read skips ahead instead.
            Err(e) => {
                tracing::debug!(stream = %self.job.key, error = %e, "reading the newest frame failed")
            }
        }
        entries
    }

    /// One blocking `XREAD` of the entries after `last_id`; `None` when the job stopped
    /// meanwhile.
    async fn read(
        &self,
        cancel: &CancellationToken,
    ) -> Option<Result<Option<StreamReadReply>, StoreError>> {
        let conn = tokio::select! {
            c = self.job.store.conn() => c,
            _ = cancel.cancelled() => return None,
        };
        let mut conn = match conn {
            Ok(conn) => conn,
            Err(e) => return Some(Err(e)),
        };
        let mut cmd = redis::cmd("XREAD");
        cmd.arg("COUNT")
            .arg(READ_COUNT)
            .arg("BLOCK")
            .arg(MAX_BLOCK_MS)
            .arg("STREAMS")
            .arg(&self.job.key)
            .arg(&self.last_id);
        tokio::select! {
            r = cmd.query_async::<Option<StreamReadReply>>(&mut conn) => {
                Some(r.map_err(StoreError::from))
            }
            _ = cancel.cancelled() => {
                // The blocked read is still pending on that connection: close it rather
                // than hand it back to the pool.
                conn.discard();
                None
            }
        }
    }
}

/// Waits `delay`; false when the job stopped first.
async fn sleep_unless_cancelled(delay: Duration, cancel: &CancellationToken) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(delay) => true,
        _ = cancel.cancelled() => false,
    }
}

/// The stall watchdog: when reads have brought nothing for `STALL_TIMEOUT_MS`, the job's
/// error, saying whether the stream is gone (deleted mid-job, or never written) or silent.
async fn stalled(
    store: &Store,
    key: &str,
    quiet_since: Instant,
    job: &FrameStreamJob,
) -> Option<String> {
    if quiet_since.elapsed() < job.stall_timeout {
        return None;
    }
    let secs = job.stall_timeout.as_secs_f64();
    // A failed EXISTS (Redis going away right now) leaves the job to the next read.
    let exists: bool = store.query(redis::cmd("EXISTS").arg(key)).await.ok()?;
    Some(if exists {
        format!(
            "no frame from frame stream `{key}` for {secs} s (STALL_TIMEOUT_MS): its producer stopped"
        )
    } else {
        format!(
            "frame stream `{key}` does not exist (deleted, or never written) and sent no frame for {secs} s (STALL_TIMEOUT_MS)"
        )
    })
}

/// A failure that waiting will not fix, as the job's error message.
fn permanent(e: &StoreError, key: &str) -> Option<String> {
    if e.is_transient() {
        return None;
    }
    if e.code() == Some("WRONGTYPE") {
        Some(format!(
            "frame stream `{key}` exists but is not a stream (it holds another Redis type)"
        ))
    } else {
        Some(format!("reading frame stream `{key}`: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn entry(fields: Vec<(&str, Vec<u8>)>) -> HashMap<String, Value> {
        fields
            .into_iter()
            .map(|(k, v)| (k.to_string(), Value::BulkString(v)))
            .collect()
    }

    fn png(w: u32, h: u32) -> Vec<u8> {
        let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, 7]));
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png).unwrap();
        out.into_inner()
    }

    #[test]
    fn stream_keys_accept_bare_and_redis_urls() {
        let keys = crate::store::keys::Keys::new("fr");
        let stream_key = |r: &str| stream_key(r, &keys);
        assert_eq!(stream_key("frames:cam1").unwrap(), "frames:cam1");
        assert_eq!(stream_key("redis://frames:cam1").unwrap(), "frames:cam1");
        assert_eq!(stream_key("REDIS://{cam}:f").unwrap(), "{cam}:f");
        assert!(stream_key("redis://").is_err());
        assert!(stream_key("a\u{0}b").is_err());
        for own in ["{fr}:alerts", "redis://{fr}:jobs", "{fr:other-job}:results"] {
            let e = stream_key(own).unwrap_err().to_string();
            assert!(e.contains("KEY_PREFIX"), "{own}: {e}");
        }
    }

    #[test]
    fn encoded_and_raw_entries_decode_to_rgb() {
        let mut e = entry(vec![("data", png(4, 3)), ("ts", b"1700000000123".to_vec())]);
        let p = parse_entry(&mut e);
        assert_eq!(p.ts, Some(1_700_000_000_123));
        let f = decode_payload(p.payload.unwrap(), 1000).unwrap();
        assert_eq!((f.width, f.height, f.rgb.len()), (4, 3, 36));
        assert_eq!(&f.rgb[3..6], &[1, 0, 7]);

        let mut e = entry(vec![
            ("data", vec![9u8; 6]),
            ("width", b"3".to_vec()),
            ("height", b"2".to_vec()),
            ("format", b"gray8".to_vec()),
        ]);
        let f = decode_payload(parse_entry(&mut e).payload.unwrap(), 1000).unwrap();
        assert_eq!(f.rgb.len(), 18);
        assert!(f.rgb.iter().all(|v| *v == 9));
    }

    #[test]
    fn bad_entries_say_what_is_wrong() {
        let err = |fields| {
            let mut e = entry(fields);
            match parse_entry(&mut e).payload {
                Err(e) => e,
                Ok(p) => decode_payload(p, 100).unwrap_err(),
            }
        };
        assert!(err(vec![("ts", b"1".to_vec())]).contains("neither"));
        assert!(err(vec![("data", b"not an image".to_vec())]).contains("not a JPEG or PNG"));
        assert!(
            err(vec![
                ("data", vec![0; 5]),
                ("width", b"2".to_vec()),
                ("height", b"1".to_vec()),
                ("format", b"rgb24".to_vec())
            ])
            .contains("needs 6 bytes, got 5")
        );
        assert!(err(vec![("data", vec![0; 5]), ("format", b"rgb24".to_vec())]).contains("width"));
        assert!(
            err(vec![("data", vec![0; 5]), ("format", b"yuv".to_vec())]).contains("unknown format")
        );
        // 11x10 = 110 pixels is over the limit of 100: refused from the header alone.
        assert!(err(vec![("data", png(11, 10))]).contains("over MAX_FRAME_PIXELS"));
        let mut truncated = png(8, 8);
        truncated.truncate(truncated.len() / 2);
        assert!(err(vec![("data", truncated)]).contains("bad image"));
        assert!(err(vec![("frame", b"\xc1".to_vec())]).contains("MessagePack"));
    }

    /// Found by `scripts/fuzz` (frame_plain): under a MAX_FRAME_PIXELS near u64::MAX, the
    /// byte count of a raw 4294967295x4294967295 entry overflowed.
    #[test]
    fn raw_sizes_whose_byte_count_overflows_are_refused() {
        for (format, expected) in [
            ("rgb24", "55340232195358851075"),
            ("gray8", "18446744065119617025"),
        ] {
            let mut e = entry(vec![
                ("data", vec![0; 12]),
                ("width", b"4294967295".to_vec()),
                ("height", b"4294967295".to_vec()),
                ("format", format.as_bytes().to_vec()),
            ]);
            let err = decode_payload(parse_entry(&mut e).payload.unwrap(), u64::MAX).unwrap_err();
            assert!(
                err.contains(&format!("needs {expected} bytes, got 12")),
                "{err}"
            );
        }
    }

    #[test]
    fn msgpack_envelopes_borrow_their_pixels() {
        #[derive(serde::Serialize)]
        struct Env<'a> {
            ts: i64,
            width: u32,
            height: u32,
            format: &'a str,
            #[serde(with = "serde_bytes_compat")]
            data: Vec<u8>,
        }
        mod serde_bytes_compat {
            pub fn serialize<S: serde::Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
                s.serialize_bytes(v)
            }
        }
        let packed = rmp_serde::to_vec_named(&Env {
            ts: 42,
            width: 2,
            height: 1,
            format: "rgb24",
            data: vec![1, 2, 3, 4, 5, 6],
        })
        .unwrap();
        let mut e = entry(vec![("frame", packed)]);
        let p = parse_entry(&mut e);
        assert_eq!(p.ts, Some(42));
        let f = decode_payload(p.payload.unwrap(), 100).unwrap();
        assert_eq!(&f.rgb[..], &[1, 2, 3, 4, 5, 6]);
    }

    #[test]
    fn entry_ids_are_validated() {
        assert!(valid_id("1700000000000-0"));
        assert!(!valid_id("$"));
        assert!(!valid_id("1-2-3"));
        assert!(!valid_id("pts_ms:5"));
        assert_eq!(id_ms("1700000000000-3"), Some(1_700_000_000_000));
    }
}
