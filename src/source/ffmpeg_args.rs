//! The ffmpeg command line for one stream: which inputs are allowed, which protocols ffmpeg
//! may open for them, and the exact argument list. Pure, so every choice is unit-tested.
//!
//! A `stream_ref` comes from anyone who can write to the job stream, so it is treated as
//! hostile: it never reaches a shell, it may not look like an option, and ffmpeg runs with a
//! `-protocol_whitelist` that covers only what that kind of input needs (an HTTP playlist
//! cannot pull `file:` segments, for instance).

use super::allowed_hosts::AllowedHosts;
pub use crate::job::RtspTransport;
use std::time::Duration;

/// Protocols an HTTP(S) input needs: the playlist, its segments, TLS, AES-128 segments.
pub const HTTP_PROTOCOLS: &str = "http,https,tcp,tls,crypto";
/// Protocols an RTSP input needs with media interleaved on the RTSP connection (TCP).
pub const RTSP_TCP_PROTOCOLS: &str = "rtsp,rtsps,tcp,tls";
/// Protocols an RTSP input needs with media as RTP over UDP.
pub const RTSP_UDP_PROTOCOLS: &str = "rtsp,rtsps,rtp,udp,tcp,tls";
/// Protocols an HTTP input confined to ALLOWED_STREAM_HOSTS needs: every request goes to the
/// stream proxy over plain `http` and `tcp`. Not `https`/`tls` (ffmpeg would tunnel them
/// with its `httpproxy` protocol, which a playlist could name itself to connect past the
/// proxy), so a confined playlist's `https://` URLs fail.
pub const CONFINED_HTTP_PROTOCOLS: &str = "http,tcp,crypto";
/// Protocols a local file (or playlist of local segments) needs.
pub const FILE_PROTOCOLS: &str = "file,crypto";

/// What kind of input a `stream_ref` is, once accepted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InputPlan {
    /// What ffmpeg gets after `-i`.
    pub url: String,
    /// The `-protocol_whitelist` value.
    pub protocols: String,
    /// A network input over HTTP (gets a read timeout).
    pub http: bool,
    /// The path ends in `.m3u8`/`.m3u`: HLS demuxer options apply.
    pub playlist: bool,
    /// An `rtsp://` or `rtsps://` input, and how its media travels.
    pub rtsp: Option<RtspTransport>,
    /// An HTTP input whose every request must pass the stream proxy (ALLOWED_STREAM_HOSTS).
    pub confined: Option<AllowedHosts>,
}

/// The only protocols ffmpeg may open for an RTSP input with `transport`.
pub fn rtsp_protocols(transport: RtspTransport) -> &'static str {
    match transport {
        RtspTransport::Tcp => RTSP_TCP_PROTOCOLS,
        RtspTransport::Udp => RTSP_UDP_PROTOCOLS,
    }
}

impl InputPlan {
    /// Sets the transport of an RTSP input (and so its protocol whitelist); other inputs
    /// are left as they are.
    pub fn with_rtsp_transport(mut self, transport: RtspTransport) -> Self {
        if self.rtsp.is_some() {
            self.rtsp = Some(transport);
            self.protocols = rtsp_protocols(transport).to_string();
        }
        self
    }
}

/// Why a `stream_ref` may not be handed to ffmpeg.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("stream_ref refused: {0}")]
pub struct Refused(pub String);

/// The longest `stream_ref` accepted (same bound as job specs).
pub const MAX_REF_BYTES: usize = crate::job::MAX_STREAM_REF_BYTES;

/// Decides whether `stream_ref` may be read by ffmpeg and with which protocols. Local paths
/// and every protocol other than HTTP(S) and RTSP need `allow_files`.
pub fn plan_input(stream_ref: &str, allow_files: bool) -> Result<InputPlan, Refused> {
    if stream_ref.trim().is_empty() {
        return Err(Refused("it is empty".into()));
    }
    if stream_ref.len() > MAX_REF_BYTES {
        return Err(Refused(format!("it is longer than {MAX_REF_BYTES} bytes")));
    }
    if stream_ref.starts_with('-') {
        return Err(Refused(
            "it starts with '-' (ffmpeg would read an option)".into(),
        ));
    }
    if stream_ref.chars().any(char::is_control) {
        return Err(Refused("it holds control characters".into()));
    }
    let playlist = is_playlist(stream_ref);
    let plan = |protocols: &str, http: bool| InputPlan {
        url: stream_ref.to_string(),
        protocols: protocols.to_string(),
        http,
        playlist,
        rtsp: None,
        confined: None,
    };
    match scheme(stream_ref) {
        Some(s) if s == "http" || s == "https" => Ok(plan(HTTP_PROTOCOLS, true)),
        Some(s) if s == "rtsp" || s == "rtsps" => Ok(InputPlan {
            rtsp: Some(RtspTransport::Tcp),
            ..plan(RTSP_TCP_PROTOCOLS, false)
        }),
        _ if !allow_files => Err(Refused(format!(
            "`{}` is a local file or a protocol other than http(s) and rtsp; set \
             ALLOW_FILE_SOURCES=true on the worker to allow it",
            shorten(stream_ref)
        ))),
        None => Ok(plan(FILE_PROTOCOLS, false)),
        Some(s) if s == "file" => Ok(plan(FILE_PROTOCOLS, false)),
        Some(s) => Ok(plan(&format!("{s},{FILE_PROTOCOLS}"), false)),
    }
}

/// Applies ALLOWED_STREAM_HOSTS to an accepted input. The input's own host is checked here,
/// before anything runs; an HTTP input is then confined (every request ffmpeg makes goes
/// through the stream proxy, which checks the hosts a playlist points to). An RTSP
/// server's media comes from that server, so its host is the one check. https is refused
/// under a list: see [`CONFINED_HTTP_PROTOCOLS`]. Local files and the other protocols
/// allowed by ALLOW_FILE_SOURCES are not network hosts this setting speaks of.
pub fn confine(plan: InputPlan, allowed: &AllowedHosts) -> Result<InputPlan, Refused> {
    if allowed.is_empty() || !(plan.http || plan.rtsp.is_some()) {
        return Ok(plan);
    }
    allowed
        .check_url(&plan.url)
        .map_err(|e| Refused(e.to_string()))?;
    if plan.rtsp.is_some() {
        return Ok(plan);
    }
    if scheme(&plan.url).as_deref() != Some("http") {
        return Err(Refused(format!(
            "https:// cannot be confined to {} (ffmpeg's TLS through a proxy would let a \
             playlist reach other hosts directly); serve the stream over http:// or leave {} empty",
            super::allowed_hosts::SETTING,
            super::allowed_hosts::SETTING
        )));
    }
    Ok(InputPlan {
        protocols: CONFINED_HTTP_PROTOCOLS.to_string(),
        confined: Some(allowed.clone()),
        ..plan
    })
}

/// The URL scheme (lowercase) when `s` starts with one: letters first, then letters, digits,
/// `+ - .`, then `:`. A one-letter scheme is a drive letter, not a protocol.
fn scheme(s: &str) -> Option<String> {
    let end = s.find(':')?;
    let head = &s[..end];
    let mut chars = head.chars();
    let first = chars.next()?;
    if head.len() < 2
        || !first.is_ascii_alphabetic()
        || !chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
    {
        return None;
    }
    Some(head.to_ascii_lowercase())
}

fn is_playlist(s: &str) -> bool {
    let path = s.split(['?', '#']).next().unwrap_or(s).to_ascii_lowercase();
    path.ends_with(".m3u8") || path.ends_with(".m3u")
}

fn shorten(s: &str) -> String {
    if s.chars().count() > 80 {
        let head: String = s.chars().take(77).collect();
        format!("{head}...")
    } else {
        s.to_string()
    }
}

/// Everything that shapes one ffmpeg run.
#[derive(Clone, Debug, PartialEq)]
pub struct FfmpegRun<'a> {
    pub input: &'a InputPlan,
    /// Frames per second written to stdout.
    pub fps: f64,
    /// Longest side of the frames written, in pixels; smaller frames are not enlarged.
    pub max_side: u32,
    /// Where to start in a finished stream (resuming), in milliseconds.
    pub start_ms: Option<i64>,
    /// Read timeout of network inputs.
    pub io_timeout: Duration,
    /// The stream proxy's URL, for a confined input.
    pub http_proxy: Option<&'a str>,
}

/// The argument list (without the program name).
///
/// Frames leave ffmpeg as PPM (`P6`), which is raw RGB24 behind a few header bytes: each
/// frame names its own size, so a variant switch that changes the resolution mid-stream can
/// never misalign the reader, and no stderr parsing is needed to learn the size. (The size
/// before scaling does come from stderr, see `showinfo` below; only positions use it.)
pub fn ffmpeg_args(run: &FfmpegRun<'_>) -> Vec<String> {
    let mut a: Vec<String> = Vec::with_capacity(40);
    let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
    // `level+` tags each line with its severity so failures can be told from chatter.
    push(&[
        "-hide_banner",
        "-nostdin",
        "-nostats",
        "-loglevel",
        "level+info",
    ]);
    push(&["-protocol_whitelist", &run.input.protocols]);
    if run.input.http {
        // Microseconds; a dead connection must not hang the job forever.
        let us = run.io_timeout.as_micros().max(1).to_string();
        push(&["-rw_timeout", &us]);
    }
    if let Some(proxy) = run.http_proxy {
        // The hls demuxer passes it on to every playlist, segment and key it opens.
        push(&["-http_proxy", proxy]);
    }
    if let Some(transport) = run.input.rtsp {
        // The RTSP demuxer's socket timeout, in microseconds: a camera that goes quiet is
        // noticed and reconnected like any broken stream.
        let us = run.io_timeout.as_micros().max(1).to_string();
        push(&["-rtsp_transport", transport.as_str(), "-timeout", &us]);
    }
    if run.input.playlist {
        // A live playlist starts at its newest segment, not at the oldest one listed. Only
        // for playlists: other demuxers reject the option.
        push(&["-live_start_index", "-1"]);
    }
    if let Some(ms) = run.start_ms.filter(|ms| *ms > 0) {
        push(&["-ss", &format!("{:.3}", ms as f64 / 1000.0)]);
    }
    push(&["-i", &run.input.url]);
    push(&["-map", "0:v:0", "-an", "-sn", "-dn"]);
    // fps first, so the scaler and colour conversion only see the frames that are kept.
    // `showinfo` between them prints each kept frame's size before scaling (on stderr, one
    // line per frame, without its default checksums), so positions a model finds in the
    // scaled frame can be given in the source's pixels.
    let side = run.max_side.max(2);
    let filter = format!(
        "fps={},showinfo=checksum=0,scale=w='if(gt(iw,ih),min(iw,{side}),-2)':h='if(gt(iw,ih),-2,min(ih,{side}))':flags=area",
        fps_text(run.fps)
    );
    push(&["-vf", &filter]);
    push(&[
        "-f",
        "image2pipe",
        "-c:v",
        "ppm",
        "-pix_fmt",
        "rgb24",
        "pipe:1",
    ]);
    a
}

/// `fps` as ffmpeg reads it: integers plainly, fractions with enough digits.
fn fps_text(fps: f64) -> String {
    if fps.fract() == 0.0 {
        format!("{}", fps as u64)
    } else {
        format!("{fps:.6}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(s: &str) -> String {
        plan_input(s, false).unwrap_err().0
    }

    #[test]
    fn http_and_rtsp_are_accepted_with_narrow_whitelists() {
        let p = plan_input("https://cdn.example/live/index.m3u8?token=a", false).unwrap();
        assert_eq!(p.protocols, HTTP_PROTOCOLS);
        assert!(p.http && p.playlist);
        let p = plan_input("HTTP://cam/video.mp4", false).unwrap();
        assert!(p.http && !p.playlist);
        let p = plan_input("rtsp://10.0.0.7/stream1", false).unwrap();
        assert_eq!(p.protocols, "rtsp,rtsps,tcp,tls", "TCP: no RTP or UDP");
        assert_eq!(p.rtsp, Some(RtspTransport::Tcp));
        assert!(!p.http);
        let udp = p.with_rtsp_transport(RtspTransport::Udp);
        assert_eq!(udp.protocols, "rtsp,rtsps,rtp,udp,tcp,tls");
        let http = plan_input("https://cam/live.m3u8", false)
            .unwrap()
            .with_rtsp_transport(RtspTransport::Udp);
        assert_eq!((http.protocols.as_str(), http.rtsp), (HTTP_PROTOCOLS, None));
    }

    #[test]
    fn args_for_rtsp_name_the_transport_and_a_socket_timeout() {
        for (transport, name) in [(RtspTransport::Tcp, "tcp"), (RtspTransport::Udp, "udp")] {
            let input = plan_input("rtsps://cam.local:322/live", false)
                .unwrap()
                .with_rtsp_transport(transport);
            let args = ffmpeg_args(&FfmpegRun {
                input: &input,
                fps: 2.0,
                max_side: 448,
                start_ms: None,
                io_timeout: Duration::from_secs(10),
                http_proxy: None,
            });
            let joined = args.join(" ");
            assert!(
                joined.contains(&format!(
                    "-rtsp_transport {name} -timeout 10000000 -i rtsps://"
                )),
                "{joined}"
            );
            assert!(!joined.contains("-rw_timeout") && !joined.contains("-live_start_index"));
        }
    }

    #[test]
    fn files_and_other_protocols_need_the_flag() {
        for s in [
            "/var/media/a.m3u8",
            "relative/a.mp4",
            "file:/etc/passwd",
            "concat:/a.ts|/b.ts",
            "subfile,,start,0,end,10,,:/x",
            "data:video/mp4;base64,AAAA",
            "pipe:0",
            "ftp://host/x.ts",
        ] {
            let msg = refused(s);
            assert!(msg.contains("ALLOW_FILE_SOURCES"), "{s}: {msg}");
        }
        let p = plan_input("/var/media/a.m3u8", true).unwrap();
        assert_eq!(p.protocols, FILE_PROTOCOLS);
        assert!(p.playlist);
        assert_eq!(
            plan_input("file:/x.ts", true).unwrap().protocols,
            FILE_PROTOCOLS
        );
        assert_eq!(
            plan_input("concat:/a.ts|/b.ts", true).unwrap().protocols,
            "concat,file,crypto"
        );
    }

    #[test]
    fn option_like_control_and_oversized_refs_are_refused_even_with_the_flag() {
        for s in ["-i /etc/passwd", "http://a/b\n-y", "http://a/\u{7f}", ""] {
            assert!(plan_input(s, true).is_err(), "{s:?}");
        }
        let long = format!("http://a/{}", "x".repeat(MAX_REF_BYTES));
        assert!(refused(&long).contains("longer"));
        assert!(refused("-re").contains("'-'"));
    }

    #[test]
    fn allowed_hosts_check_the_ref_and_confine_http_to_the_proxy() {
        let list = AllowedHosts::parse("cam.example, 127.0.0.1:8000").unwrap();
        let confined = |s: &str| confine(plan_input(s, true).unwrap(), &list);
        let p = confined("http://127.0.0.1:8000/live.m3u8").unwrap();
        assert_eq!(p.protocols, CONFINED_HTTP_PROTOCOLS);
        assert_eq!(p.confined.as_ref(), Some(&list));
        let p = confined("rtsp://user:pw@cam.example/s").unwrap();
        assert_eq!(
            (p.protocols.as_str(), p.confined),
            (RTSP_TCP_PROTOCOLS, None)
        );
        for s in ["http://127.0.0.1:8001/a.m3u8", "rtsp://other.example/s"] {
            let e = confined(s).unwrap_err().to_string();
            assert!(e.contains("is not in ALLOWED_STREAM_HOSTS"), "{s}: {e}");
        }
        let e = confined("https://cam.example/a.m3u8")
            .unwrap_err()
            .to_string();
        assert!(e.contains("https:// cannot be confined"), "{e}");
        // Files are not hosts; an empty list changes nothing.
        assert_eq!(confined("/m/a.mp4").unwrap().protocols, FILE_PROTOCOLS);
        let open = confine(
            plan_input("https://any.example/a.m3u8", false).unwrap(),
            &AllowedHosts::default(),
        )
        .unwrap();
        assert_eq!(
            (open.protocols.as_str(), open.confined),
            (HTTP_PROTOCOLS, None)
        );
        let args = ffmpeg_args(&FfmpegRun {
            input: &confined("http://cam.example/a.m3u8").unwrap(),
            fps: 2.0,
            max_side: 448,
            start_ms: None,
            io_timeout: Duration::from_secs(10),
            http_proxy: Some("http://127.0.0.1:4000"),
        });
        let joined = args.join(" ");
        assert!(
            joined.contains("-protocol_whitelist http,tcp,crypto -rw_timeout 10000000 -http_proxy http://127.0.0.1:4000 "),
            "{joined}"
        );
    }

    #[test]
    fn args_for_a_live_http_playlist() {
        let input = plan_input("http://127.0.0.1:8000/live.m3u8", false).unwrap();
        let args = ffmpeg_args(&FfmpegRun {
            input: &input,
            fps: 2.0,
            max_side: 448,
            start_ms: None,
            io_timeout: Duration::from_secs(10),
            http_proxy: None,
        });
        let joined = args.join(" ");
        assert!(joined.starts_with("-hide_banner -nostdin -nostats -loglevel level+info"));
        assert!(joined.contains("-protocol_whitelist http,https,tcp,tls,crypto"));
        assert!(joined.contains("-rw_timeout 10000000"));
        assert!(joined.contains("-live_start_index -1 -i http://127.0.0.1:8000/live.m3u8"));
        assert!(!joined.contains("-ss"));
        let vf = &args[args.iter().position(|a| a == "-vf").unwrap() + 1];
        assert_eq!(
            vf,
            "fps=2,showinfo=checksum=0,scale=w='if(gt(iw,ih),min(iw,448),-2)':h='if(gt(iw,ih),-2,min(ih,448))':flags=area"
        );
        assert_eq!(
            &args[args.len() - 7..],
            [
                "-f",
                "image2pipe",
                "-c:v",
                "ppm",
                "-pix_fmt",
                "rgb24",
                "pipe:1"
            ]
        );
        // The reference is one argument, right after -i, whatever it holds.
        let i = args.iter().position(|a| a == "-i").unwrap();
        assert_eq!(args[i + 1], "http://127.0.0.1:8000/live.m3u8");
    }

    #[test]
    fn args_for_a_resumed_file_without_playlist_options() {
        let input = plan_input("/m/a b.mp4", true).unwrap();
        let args = ffmpeg_args(&FfmpegRun {
            input: &input,
            fps: 0.5,
            max_side: 224,
            start_ms: Some(12_500),
            io_timeout: Duration::from_secs(10),
            http_proxy: None,
        });
        let joined = args.join(" ");
        assert!(!joined.contains("-rw_timeout"));
        assert!(!joined.contains("-live_start_index"));
        assert!(joined.contains("-ss 12.500 -i"));
        assert!(args.contains(&"/m/a b.mp4".to_string()));
        assert!(joined.contains("fps=0.500000,showinfo=checksum=0,scale="));
        assert!(joined.contains("-protocol_whitelist file,crypto"));
    }
}
