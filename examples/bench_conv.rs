//! Times the convolutions of a YOLOv8s-shaped network (backbone, neck and detection head at
//! 640x384) through three implementations: candle's
//! `conv2d` followed by its bias and SiLU (what the layer did before it had its own
//! kernel), the project's layer in f32, and the project's layer in bf16 where the CPU has a
//! bf16 product. Each layer runs on an input of its own shape, so the figures are the
//! convolutions' alone.
//!
//! `bench_conv [TAG] [ITERS]` prints lines like
//! `[candle TAG] conv-stack impl=f32 bs=1 median=... ms 1x1=... 3x3s1=... 3x3s2=... best=...`
//! (the median pass over the stack, its groups, and the sum of each layer's fastest pass);
//! `bench_conv shapes` prints the layers as JSON, which `scripts/bench-conv-pt.py` reads so
//! that PyTorch times the same ones. `scripts/bench conv` runs both, alternately.
//!
//! `BENCH_BATCHES=1,4` sets the batch sizes (default 1 and 4); `BENCH_LAYERS=1` adds a line
//! per layer (`[in, out, kernel, stride, h, w, silu]` and its time in the median pass);
//! `BENCH_SKIP_CANDLE=1` leaves candle's `conv2d` out.

use candle_core::{Device, Module, Tensor};
use free_roam::model::kernels::conv::{Conv2d, ConvActivation};
use free_roam::model::kernels::fused_linear::{MatmulPrecision, bf16_product};
use std::time::Instant;

/// One convolution of the stack: `(in, out, kernel, stride, input height, input width,
/// SiLU)`; padding is `kernel / 2`, as in Ultralytics' `Conv`.
type Layer = (usize, usize, usize, usize, usize, usize, bool);

/// A C2f block's convolutions at `(h, w)`: `cv1` (1x1 to `2c`), `n` bottlenecks of two 3x3
/// convolutions at `c`, and `cv2` (1x1 from `(2 + n) c`).
fn c2f(inp: usize, out: usize, n: usize, (h, w): (usize, usize)) -> Vec<Layer> {
    let c = out / 2;
    let mut layers = vec![(inp, 2 * c, 1, 1, h, w, true)];
    for _ in 0..2 * n {
        layers.push((c, c, 3, 1, h, w, true));
    }
    layers.push(((2 + n) * c, out, 1, 1, h, w, true));
    layers
}

/// YOLOv8s (width 0.5, depth 0.33) with a 512-dimensional embedding head, at 640x384.
fn yolov8s_stack() -> Vec<Layer> {
    let (p1, p2, p3, p4, p5) = ((192, 320), (96, 160), (48, 80), (24, 40), (12, 20));
    let down = |inp, out, (h, w): (usize, usize)| (inp, out, 3, 2, h, w, true);
    let mut layers = vec![down(3, 32, (384, 640)), down(32, 64, p1)];
    layers.extend(c2f(64, 64, 1, p2));
    layers.push(down(64, 128, p2));
    layers.extend(c2f(128, 128, 2, p3));
    layers.push(down(128, 256, p3));
    layers.extend(c2f(256, 256, 2, p4));
    layers.push(down(256, 512, p4));
    layers.extend(c2f(512, 512, 1, p5));
    // SPPF: 1x1 down to half, three max pools, 1x1 from the four concatenated.
    layers.push((512, 256, 1, 1, p5.0, p5.1, true));
    layers.push((1024, 512, 1, 1, p5.0, p5.1, true));
    // Neck: top-down, then bottom-up.
    layers.extend(c2f(768, 256, 1, p4));
    layers.extend(c2f(384, 128, 1, p3));
    layers.push(down(128, 128, p3));
    layers.extend(c2f(384, 256, 1, p4));
    layers.push(down(256, 256, p4));
    layers.extend(c2f(768, 512, 1, p5));
    // Head per level: boxes (3x3, 3x3, 1x1 to 4 × 16 bins), embeddings (3x3, 3x3, 1x1 to 512).
    for (channels, (h, w)) in [(128, p3), (256, p4), (512, p5)] {
        layers.extend([
            (channels, 64, 3, 1, h, w, true),
            (64, 64, 3, 1, h, w, true),
            (64, 64, 1, 1, h, w, false),
            (channels, 128, 3, 1, h, w, true),
            (128, 128, 3, 1, h, w, true),
            (128, 512, 1, 1, h, w, false),
        ]);
    }
    layers
}

/// The group a layer's time is reported under.
fn group(&(_, _, kernel, stride, ..): &Layer) -> usize {
    match (kernel, stride) {
        (1, _) => 0,
        (_, 1) => 1,
        _ => 2,
    }
}

fn gflop(layers: &[Layer]) -> f64 {
    layers
        .iter()
        .map(|&(inp, out, k, s, h, w, _)| {
            let (oh, ow) = ((h + 2 * (k / 2) - k) / s + 1, (w + 2 * (k / 2) - k) / s + 1);
            2.0 * (inp * k * k * out * oh * ow) as f64
        })
        .sum::<f64>()
        / 1e9
}

/// How a layer is run.
#[derive(Clone, Copy)]
enum Implementation {
    /// candle's `conv2d`, then the bias and the activation as separate operations.
    Candle,
    Own(MatmulPrecision),
}

impl Implementation {
    fn name(self) -> String {
        match self {
            Self::Candle => "candle".into(),
            Self::Own(precision) => precision.to_string(),
        }
    }
}

struct Prepared {
    layer: Box<dyn Module>,
    input: Tensor,
    group: usize,
}

/// candle's convolution with its bias and SiLU as separate operations.
struct CandleConv {
    weight: Tensor,
    bias: Tensor,
    stride: usize,
    padding: usize,
    silu: bool,
}

impl Module for CandleConv {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = x.conv2d(&self.weight, self.padding, self.stride, 1, 1)?;
        let y = y.broadcast_add(&self.bias.reshape((1, (), 1, 1))?)?;
        if self.silu {
            candle_nn::ops::silu(&y)
        } else {
            Ok(y)
        }
    }
}

fn prepare(
    layers: &[Layer],
    batch: usize,
    implementation: Implementation,
) -> candle_core::Result<Vec<Prepared>> {
    let dev = Device::Cpu;
    layers
        .iter()
        .map(|layer| {
            let &(inp, out, k, stride, h, w, silu) = layer;
            let scale = (1.0 / (inp * k * k) as f64).sqrt() as f32;
            let weight = Tensor::randn(0f32, scale, (out, inp, k, k), &dev)?;
            let bias = Tensor::randn(0f32, 0.1, out, &dev)?;
            let input = Tensor::randn(0f32, 1.0, (batch, inp, h, w), &dev)?;
            let activation = if silu {
                ConvActivation::Silu
            } else {
                ConvActivation::Identity
            };
            let module: Box<dyn Module> = match implementation {
                Implementation::Candle => Box::new(CandleConv {
                    weight,
                    bias,
                    stride,
                    padding: k / 2,
                    silu,
                }),
                Implementation::Own(precision) => Box::new(Conv2d::new_as(
                    weight,
                    Some(bias),
                    stride,
                    k / 2,
                    activation,
                    precision,
                )?),
            };
            Ok(Prepared {
                layer: module,
                input,
                group: group(layer),
            })
        })
        .collect()
}

/// The median pass over the stack: its total, each group's time within it, and each
/// layer's, in ms.
fn time_stack(
    prepared: &[Prepared],
    iters: usize,
) -> candle_core::Result<(f64, [f64; 3], Vec<f64>)> {
    let mut passes = Vec::with_capacity(iters);
    for pass in 0..iters + 1 {
        let mut groups = [0f64; 3];
        let mut layers = Vec::with_capacity(prepared.len());
        for p in prepared {
            let start = Instant::now();
            drop(p.layer.forward(&p.input)?);
            let ms = start.elapsed().as_secs_f64() * 1000.0;
            groups[p.group] += ms;
            layers.push(ms);
        }
        // The first pass warms the caches and the allocator.
        if pass > 0 {
            passes.push((groups.iter().sum::<f64>(), groups, layers));
        }
    }
    passes.sort_by(|a, b| a.0.total_cmp(&b.0));
    Ok(passes.swap_remove(passes.len() / 2))
}

/// The sum over layers of each layer's fastest pass, in ms: the figure least moved by other
/// work on a shared machine.
fn best_sum(prepared: &[Prepared], iters: usize) -> candle_core::Result<f64> {
    let mut best = vec![f64::INFINITY; prepared.len()];
    for _ in 0..iters {
        for (p, best) in prepared.iter().zip(best.iter_mut()) {
            let start = Instant::now();
            drop(p.layer.forward(&p.input)?);
            *best = best.min(start.elapsed().as_secs_f64() * 1000.0);
        }
    }
    Ok(best.iter().sum())
}

fn batches() -> Result<Vec<usize>, Box<dyn std::error::Error>> {
    match std::env::var("BENCH_BATCHES") {
        Ok(list) => Ok(list
            .split(',')
            .map(|b| b.trim().parse())
            .collect::<Result<_, _>>()?),
        Err(_) => Ok(vec![1, 4]),
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let layers = yolov8s_stack();
    if args.first().map(String::as_str) == Some("shapes") {
        let rows: Vec<String> = layers
            .iter()
            .map(|&(i, o, k, s, h, w, silu)| format!("[{i},{o},{k},{s},{h},{w},{silu}]"))
            .collect();
        println!("[{}]", rows.join(","));
        return Ok(());
    }
    let tag = args.first().cloned().unwrap_or_else(|| "run".into());
    let iters: usize = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(5);
    let mut implementations = vec![
        Implementation::Candle,
        Implementation::Own(MatmulPrecision::F32),
    ];
    match bf16_product() {
        Some(product) => {
            eprintln!("bf16 product: {product:?}");
            implementations.push(Implementation::Own(MatmulPrecision::Bf16));
        }
        None => eprintln!("no bf16 product in this build on this CPU"),
    }
    eprintln!(
        "{} convolutions, {:.1} GFLOP a frame, {} rayon threads",
        layers.len(),
        gflop(&layers),
        rayon::current_num_threads()
    );
    let layer_lines = std::env::var_os("BENCH_LAYERS").is_some();
    let skip_candle = std::env::var_os("BENCH_SKIP_CANDLE").is_some();
    if skip_candle {
        implementations.remove(0);
    }
    for batch in batches()? {
        for &implementation in &implementations {
            let prepared = prepare(&layers, batch, implementation)?;
            let (total, groups, times) = time_stack(&prepared, iters)?;
            let best = best_sum(&prepared, iters)?;
            if layer_lines {
                for (layer, ms) in layers.iter().zip(times) {
                    println!(
                        "[candle {tag}] layer impl={} bs={batch} {layer:?} {ms:.2} ms",
                        implementation.name()
                    );
                }
            }
            println!(
                "[candle {tag}] conv-stack impl={} bs={batch} median={total:.1} ms \
                 per-image={:.1} ms 1x1={:.1} 3x3s1={:.1} 3x3s2={:.1} best={best:.1} ms",
                implementation.name(),
                total / batch as f64,
                groups[0],
                groups[1],
                groups[2],
            );
        }
    }
    Ok(())
}
