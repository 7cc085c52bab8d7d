//! Frames the camera-like tests push: coloured squares on a textured grey yard (texture, so
//! the scene gate sees a real picture), as raw RGB entries of a Redis frame stream.

/// A coloured square on the yard: its top-left corner, its side and its colour.
pub type Square = (u32, u32, u32, [u8; 3]);

/// A `w` x `h` yard whose grey runs from `base` over `spread` levels, with `squares`
/// painted on it (the first one listed wins where they overlap).
pub fn yard(w: u32, h: u32, base: u32, spread: u32, squares: &[Square]) -> Vec<u8> {
    let mut rgb = Vec::with_capacity((w * h * 3) as usize);
    for y in 0..h {
        for x in 0..w {
            let square = squares.iter().find(|(sx, sy, side, _)| {
                (*sx..sx + side).contains(&x) && (*sy..sy + side).contains(&y)
            });
            let grey = (base + (x * 2 + y) % spread) as u8;
            rgb.extend_from_slice(&square.map_or([grey; 3], |s| s.3));
        }
    }
    rgb
}

/// The XADD of one raw `w` x `h` RGB frame, captured now, to frame stream `key`.
pub fn rgb_frame_xadd(key: &str, w: u32, h: u32, data: &[u8]) -> redis::Cmd {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(key)
        .arg("*")
        .arg("format")
        .arg("rgb24")
        .arg("width")
        .arg(w)
        .arg("height")
        .arg(h)
        .arg("ts")
        .arg(free_roam::store::now_ms())
        .arg("data")
        .arg(data);
    cmd
}

/// The tests' camera: from a thread of its own, pushes the frame `next` makes to frame
/// stream `key` every `every`, until `stop` fires.
pub fn stream_frames(
    client: redis::Client,
    (key, w, h): (&'static str, u32, u32),
    every: std::time::Duration,
    stop: tokio_util::sync::CancellationToken,
    mut next: impl FnMut() -> Vec<u8> + Send + 'static,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut con = client.get_connection().unwrap();
        while !stop.is_cancelled() {
            let _: String = rgb_frame_xadd(key, w, h, &next()).query(&mut con).unwrap();
            std::thread::sleep(every);
        }
    })
}
