//! Times the CLIP backend at full size on random weights: the image tower alone (as the
//! reference PyTorch bench times it) and the whole `infer` path (preprocessing a 640x480
//! frame, image tower, scoring against a cached prompt), at batch 1 and 8.
//!
//! `cargo run --release --example bench_model -- [TAG] [ITERS] [MODEL_DIR]`, or
//! `scripts/bench-model.sh`, which alternates it with a PyTorch reference.
//!
//! Without MODEL_DIR a full-size random CLIP is written to a temporary folder first. Lines
//! look like `[candle TAG] image bs=8 median=... ms per-image=... ms`.
//!
//! With `BENCH_KIND=blip` it times full-size BLIP captioning instead (20 new tokens, batch
//! 1 and 2): far slower, so use few iterations. With `BENCH_KIND=siglip` or `owlvit` it
//! times the whole `infer` path of that model on a 640x480 frame at batch 1 and 4 (the
//! prompt's text embeddings cached, as in serving), the work
//! `scripts/bench-presence-pt.py` times for transformers. With `BENCH_KIND=paligemma` it
//! times full-size PaliGemma answering `caption en` (`MAX_NEW_TOKENS`, default 10) at batch
//! 1 and 2, the work `scripts/bench-paligemma-pt.py` times for transformers: seconds per
//! frame on a CPU, so use few iterations.
//!
//! With `BENCH_KIND=yoloworld` it times the letterbox of a 1280x720 frame to 640x384 and the
//! network up to the head's output at batch 1 and 4, the work
//! `scripts/bench-yoloworld-pt.py` times for Ultralytics; `BENCH_SIZE` (n, s, m, ...) picks
//! the random model's scale.
//!
//! `BENCH_BATCHES=1,8` replaces the batch sizes of any kind, and `DEVICE` picks the device as
//! the worker's setting does (scripts/gpu-check).

use bytes::Bytes;
use candle_core::{Device, Tensor};
use free_roam::frame::Frame;
use free_roam::model::families::blip::BlipModel;
use free_roam::model::families::clip::ClipModel;
use free_roam::model::families::paligemma::PaliGemmaModel;
use free_roam::model::families::yoloworld::YoloWorldModel;
use free_roam::model::load_model;
use free_roam::model::loading::{ModelFiles, select_device};
use free_roam::model::{
    DeviceChoice, DtypeChoice, ModelSettings, ModelSize, ModelType, PromptRef, VisionLanguageModel,
    write_random_model,
};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

fn median_ms(mut f: impl FnMut(), warm: usize, iters: usize) -> (f64, f64, f64) {
    for _ in 0..warm {
        f();
    }
    let mut times: Vec<f64> = (0..iters)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1000.0
        })
        .collect();
    times.sort_by(f64::total_cmp);
    (times[times.len() / 2], times[0], times[times.len() - 1])
}

fn frame_640x480() -> Result<Frame, Box<dyn std::error::Error>> {
    frame_of(640, 480)
}

/// A frame of patterned bytes (`scripts/bench-yoloworld-pt.py` makes the same).
fn frame_of(width: usize, height: usize) -> Result<Frame, Box<dyn std::error::Error>> {
    let rgb: Vec<u8> = (0..width * height * 3)
        .map(|i| (i * 31 % 251) as u8)
        .collect();
    Ok(Frame::new(width as u32, height as u32, Bytes::from(rgb))?)
}

/// The random model of `kind` at `BENCH_SIZE` (`full` when unset), written once.
fn random_full(kind: ModelType) -> Result<PathBuf, Box<dyn std::error::Error>> {
    let size: ModelSize = std::env::var("BENCH_SIZE")
        .unwrap_or_else(|_| "full".into())
        .parse()?;
    let dir = std::env::temp_dir().join(format!("free-roam-bench-{kind}-{size}"));
    if !dir.join("model.safetensors").is_file() {
        let t = Instant::now();
        write_random_model(kind, size, 0, &dir)?;
        eprintln!("wrote {} in {:?}", dir.display(), t.elapsed());
    }
    Ok(dir)
}

/// The batch sizes to time: `BENCH_BATCHES` (`1,8`) when set, else `default`.
fn batches(default: &[usize]) -> Result<Vec<usize>, Box<dyn std::error::Error>> {
    match std::env::var("BENCH_BATCHES") {
        Ok(list) => Ok(list
            .split(',')
            .map(|b| b.trim().parse())
            .collect::<Result<_, _>>()?),
        Err(_) => Ok(default.to_vec()),
    }
}

fn bench_paligemma(
    tag: &str,
    iters: usize,
    dir: PathBuf,
) -> Result<(), Box<dyn std::error::Error>> {
    let p = |msg: String| println!("[candle-paligemma {tag}] {msg}");
    let t = Instant::now();
    let max_new_tokens = std::env::var("MAX_NEW_TOKENS")
        .ok()
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(10);
    let settings = ModelSettings {
        model_type: ModelType::PaliGemma,
        model_path: Some(dir.clone()),
        max_new_tokens,
        ..ModelSettings::default()
    };
    let device = select_device(device_from_env()?)?;
    let mut model = PaliGemmaModel::load(&ModelFiles::from_dir(&dir)?, device.clone(), &settings)?;
    p(format!(
        "loaded in {:.0} ms on {}",
        t.elapsed().as_secs_f64() * 1000.0,
        model.info().device
    ));
    let frame = frame_640x480()?;
    let prompt = PromptRef {
        text: Arc::from("caption en"),
        version: None,
    };
    // The PyTorch bench prints the same figure: both sides must decode as many tokens.
    let text_ids = model.text_ids(&prompt.text)?;
    let ids = model.generate_ids(&model.preprocessor().batch(&[&frame], &device)?, &text_ids)?;
    p(format!("new_tokens={} ids={:?}", ids[0].len(), ids[0]));
    for bs in batches(&[1, 2])? {
        let frames: Vec<&Frame> = std::iter::repeat_n(&frame, bs).collect();
        let (med, min, max) = median_ms(
            || {
                model.infer(&frames, &prompt).expect("infer");
            },
            1,
            iters,
        );
        p(format!(
            "caption 640x480 bs={bs} median={med:.0} ms (min {min:.0} max {max:.0}) per-frame={:.0} ms",
            med / bs as f64
        ));
    }
    Ok(())
}

fn bench_blip(tag: &str, iters: usize, dir: PathBuf) -> Result<(), Box<dyn std::error::Error>> {
    let p = |msg: String| println!("[candle-blip {tag}] {msg}");
    let t = Instant::now();
    let settings = ModelSettings {
        model_type: ModelType::Blip,
        model_path: Some(dir.clone()),
        ..ModelSettings::default()
    };
    let device = select_device(device_from_env()?)?;
    let mut model = BlipModel::load(&ModelFiles::from_dir(&dir)?, device.clone(), &settings)?;
    p(format!(
        "loaded in {:.0} ms",
        t.elapsed().as_secs_f64() * 1000.0
    ));
    let frame = frame_640x480()?;
    let prompt = PromptRef {
        text: Arc::from("a picture of"),
        version: None,
    };
    // The PyTorch bench prints the same two figures: both sides must decode as many tokens.
    let prefix = model.prefix_ids(&prompt.text)?;
    let ids = model.generate_ids(&model.preprocessor().batch(&[&frame], &device)?, &prefix)?;
    p(format!(
        "new_tokens={} caption={}",
        ids[0].len() - prefix.len(),
        model.infer(&[&frame], &prompt)?[0]["caption"]
    ));
    for bs in [1usize, 2] {
        let frames: Vec<&Frame> = std::iter::repeat_n(&frame, bs).collect();
        let (med, min, max) = median_ms(
            || {
                model.infer(&frames, &prompt).expect("infer");
            },
            1,
            iters,
        );
        p(format!(
            "caption 640x480 bs={bs} median={med:.0} ms (min {min:.0} max {max:.0}) per-frame={:.0} ms",
            med / bs as f64
        ));
    }
    Ok(())
}

/// `DTYPE` from the environment, as the worker reads it; `auto` when unset.
/// `DEVICE` as the worker reads it (`auto` when unset).
fn device_from_env() -> Result<DeviceChoice, Box<dyn std::error::Error>> {
    Ok(std::env::var("DEVICE")
        .ok()
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or_default())
}

fn dtype_from_env() -> Result<DtypeChoice, Box<dyn std::error::Error>> {
    Ok(std::env::var("DTYPE")
        .ok()
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or_default())
}

fn bench_infer(
    kind: ModelType,
    tag: &str,
    iters: usize,
    dir: PathBuf,
) -> Result<(), Box<dyn std::error::Error>> {
    let p = |msg: String| println!("[candle-{kind} {tag}] {msg}");
    let t = Instant::now();
    let settings = ModelSettings {
        model_type: kind,
        model_path: Some(dir),
        dtype: dtype_from_env()?,
        device: device_from_env()?,
        ..ModelSettings::default()
    };
    let mut model = load_model(&settings)?;
    p(format!(
        "loaded in {:.0} ms on {} dtype={}",
        t.elapsed().as_secs_f64() * 1000.0,
        model.info().device,
        model.info().dtype
    ));
    let frame = frame_640x480()?;
    let prompt = PromptRef {
        text: Arc::from("Detect all people and vehicles"),
        version: None,
    };
    for bs in batches(&[1, 4])? {
        let frames: Vec<&Frame> = std::iter::repeat_n(&frame, bs).collect();
        let (med, min, max) = median_ms(
            || {
                model.infer(&frames, &prompt).expect("infer");
            },
            1,
            iters,
        );
        p(format!(
            "infer 640x480 bs={bs} median={med:.1} ms (min {min:.1} max {max:.1}) per-frame={:.1} ms",
            med / bs as f64
        ));
    }
    Ok(())
}

/// YOLO-World on a 720p frame: the letterbox to 640x384 and the network with the prompt's
/// two phrases folded in, up to the head's raw output. Suppression is left out (here and in
/// `scripts/bench-yoloworld-pt.py`): with random weights nearly every anchor passes the
/// confidence threshold, which makes it cost what it never costs with trained weights.
/// A bf16 run also prints the head's cosine to f32 on that frame.
fn bench_yoloworld(
    tag: &str,
    iters: usize,
    dir: PathBuf,
) -> Result<(), Box<dyn std::error::Error>> {
    let p = |msg: String| println!("[candle-yoloworld {tag}] {msg}");
    let dtype = dtype_from_env()?;
    let files = ModelFiles::from_dir(&dir)?;
    let load = |dtype| {
        let settings = ModelSettings {
            model_type: ModelType::YoloWorld,
            dtype,
            ..ModelSettings::default()
        };
        YoloWorldModel::load(&files, Device::Cpu, &settings)
    };
    let model = load(dtype)?;
    let precision = model.info().dtype.clone();
    let frame = frame_of(1280, 720)?;
    let text = model.text_embeddings(&["people".to_string(), "vehicles".to_string()])?;
    if precision != "f32" {
        let reference = load(DtypeChoice::F32)?;
        let (pixels, _) = model.preprocess(&[&frame])?;
        let a = model.head_output(&pixels, &text, true)?;
        let b = reference.head_output(&pixels, &text, true)?;
        let cosine = |start, len| -> Result<f32, candle_core::Error> {
            let (a, b) = (a.narrow(1, start, len)?, b.narrow(1, start, len)?);
            ((&a * &b)?.sum_all()? / ((a.sqr()?.sum_all()? * b.sqr()?.sum_all()?)?.sqrt()?))?
                .to_scalar::<f32>()
        };
        let rows = a.dim(1)?;
        p(format!(
            "head cosine against f32 on that frame: boxes {:.6}, scores {:.6}",
            cosine(0, 4)?,
            cosine(4, rows - 4)?
        ));
    }
    for bs in batches(&[1, 4])? {
        let frames: Vec<&Frame> = std::iter::repeat_n(&frame, bs).collect();
        let (med, min, max) = median_ms(
            || {
                let (pixels, _) = model.preprocess(&frames).expect("letterbox");
                model.head_output(&pixels, &text, true).expect("network");
            },
            1,
            iters,
        );
        p(format!(
            "{precision} network 1280x720 (640x384) bs={bs} median={med:.1} ms (min {min:.1} max {max:.1}) per-frame={:.1} ms",
            med / bs as f64
        ));
    }
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    keep_freed_memory();
    free_roam::model::prepare_cpu_threads();
    let mut args = std::env::args().skip(1);
    let tag = args.next().unwrap_or_else(|| "run".into());
    let iters: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(10);
    let kind: ModelType = std::env::var("BENCH_KIND")
        .unwrap_or_else(|_| "clip".into())
        .parse()?;
    let dir = match args.next() {
        Some(d) => PathBuf::from(d),
        None => random_full(kind)?,
    };
    match kind {
        ModelType::Blip => return bench_blip(&tag, iters, dir),
        ModelType::PaliGemma => return bench_paligemma(&tag, iters, dir),
        ModelType::YoloWorld => return bench_yoloworld(&tag, iters, dir),
        ModelType::Siglip | ModelType::OwlVit => return bench_infer(kind, &tag, iters, dir),
        ModelType::Clip => {}
        ModelType::OpenAi | ModelType::Null | ModelType::TestColour => {
            return Err(format!("BENCH_KIND={kind} has no weights to time").into());
        }
    }
    let p = |msg: String| println!("[candle {tag}] {msg}");
    let device = select_device(device_from_env()?)?;
    let t = Instant::now();
    let settings = ModelSettings {
        model_path: Some(dir.clone()),
        dtype: dtype_from_env()?,
        ..ModelSettings::default()
    };
    let mut model = ClipModel::load(&ModelFiles::from_dir(&dir)?, device.clone(), &settings)?;
    p(format!(
        "loaded in {:.0} ms on {} dtype={}",
        t.elapsed().as_secs_f64() * 1000.0,
        model.info().device,
        model.info().dtype
    ));
    if model.info().dtype != "f32" {
        let reference = ClipModel::load(
            &ModelFiles::from_dir(&dir)?,
            device.clone(),
            &ModelSettings {
                dtype: DtypeChoice::F32,
                ..settings.clone()
            },
        )?;
        let pixels =
            Tensor::randn(0f32, 1f32, (8, 3, 224, 224), &Device::Cpu)?.to_device(&device)?;
        let a = model.image_embeddings_from_pixels(&pixels)?;
        let b = reference.image_embeddings_from_pixels(&pixels)?;
        let cosine = ((&a * &b)?.sum(1)? / ((a.sqr()?.sum(1)? * b.sqr()?.sum(1)?)?.sqrt()?))?
            .to_vec1::<f32>()?;
        p(format!(
            "cosine against f32 over 8 random images: min {:.6}",
            cosine.iter().copied().fold(1f32, f32::min)
        ));
    }

    let sizes = batches(&[1, 8])?;
    for &bs in &sizes {
        let pixels =
            Tensor::randn(0f32, 1f32, (bs, 3, 224, 224), &Device::Cpu)?.to_device(&device)?;
        let (med, min, max) = median_ms(
            || {
                model
                    .image_embeddings_from_pixels(&pixels)
                    .expect("image tower");
                // A GPU queues the work and returns: the time is the work's once it is done.
                device.synchronize().expect("device");
            },
            3,
            iters,
        );
        p(format!(
            "image bs={bs} median={med:.2} ms (min {min:.2} max {max:.2}) per-image={:.2} ms",
            med / bs as f64
        ));
    }

    let frame = frame_640x480()?;
    let prompt = PromptRef {
        text: Arc::from("Detect all people and vehicles"),
        version: None,
    };
    for &bs in &sizes {
        let frames: Vec<&Frame> = std::iter::repeat_n(&frame, bs).collect();
        let (med, min, max) = median_ms(
            || {
                model.infer(&frames, &prompt).expect("infer");
            },
            3,
            iters,
        );
        p(format!(
            "infer 640x480 bs={bs} median={med:.2} ms (min {min:.2} max {max:.2}) per-frame={:.2} ms",
            med / bs as f64
        ));
    }
    let (med, _, _) = median_ms(
        || {
            model
                .preprocessor()
                .batch(&[&frame], &device)
                .expect("preprocess");
        },
        3,
        iters,
    );
    p(format!("preprocess 640x480 median={med:.2} ms"));
    Ok(())
}

// The worker binary's allocator, so the figures are the worker's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

unsafe extern "C" {
    fn mi_option_set(option: std::ffi::c_int, value: std::ffi::c_long);
}

/// The worker's allocator setting (`keep_freed_memory` in worker/src/main.rs, which says
/// why), so the figures are the worker's.
fn keep_freed_memory() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets mimalloc's `purge_delay` option (15), before any other thread runs.
        unsafe { mi_option_set(15, 10_000) }
    }
}
