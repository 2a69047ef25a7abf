//! `kiln predict`: class probabilities for images in PNG or IDX files.

use std::path::{Path, PathBuf};

use kiln_core::{Error, Result};
use kiln_cpu::CpuBackend;
use kiln_nn::Sequential;
use kiln_train::Trainer;

/// The arguments of `kiln predict`.
#[derive(clap::Args)]
pub struct PredictArgs {
    /// The model: a model file written by `kiln train` (or its folder), a
    /// checkpoint, or a folder of checkpoints (its newest).
    #[arg(long)]
    pub model: PathBuf,
    /// Images: PNG files (28×28 grayscale; other sizes and colour are
    /// converted, with a warning) or IDX image files (`[n, 28, 28]` u8,
    /// gzip or raw), one or more.
    #[arg(long, required = true, num_args = 1..)]
    pub input: Vec<PathBuf>,
    /// How many of the most probable classes to show.
    #[arg(long, default_value_t = 3)]
    pub top: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Backend: cpu, or cpu:KERNELS.
    #[arg(long, default_value = "cpu")]
    pub backend: String,
}

/// One image to classify: where it came from and its pixels in [0, 1].
struct Image {
    source: String,
    pixels: Vec<f32>,
}

/// The most pixels a PNG may have (4096 × 4096).
const MAX_PNG_PIXELS: u64 = 1 << 24;
/// The most bytes decoding a PNG may take (RGBA at 8 bits for 4096 × 4096).
const MAX_PNG_BYTES: usize = 64 << 20;

/// Reads a PNG as `h × w` gray pixels in [0, 1]: colour averaged by
/// luminance (Rec. 601), alpha composited onto black, 16-bit scaled.
fn read_png(path: &Path, want: [usize; 2]) -> Result<Image> {
    let file = std::fs::File::open(path)
        .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
    let mut decoder = png::Decoder::new(std::io::BufReader::new(file));
    decoder.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    let bad = |e: png::DecodingError| {
        Error::invalid(format!("{}: not a readable PNG ({e})", path.display()))
    };
    // Bounded before anything is decoded: the header's size is checked
    // first (a tiny file can claim 100000 × 100000 pixels), then the
    // decoder's own allocations are capped.
    decoder.set_limits(png::Limits {
        bytes: MAX_PNG_BYTES,
    });
    let mut reader = decoder.read_info().map_err(bad)?;
    let (w, h) = (reader.info().width as u64, reader.info().height as u64);
    if w * h > MAX_PNG_PIXELS {
        return Err(Error::invalid(format!(
            "{}: {w}×{h} pixels; images of at most {MAX_PNG_PIXELS} pixels (4096×4096) are read",
            path.display()
        )));
    }
    let size = reader.output_buffer_size();
    if size > MAX_PNG_BYTES {
        return Err(Error::invalid(format!(
            "{}: decoding it takes {size} bytes, more than the {MAX_PNG_BYTES}-byte limit",
            path.display()
        )));
    }
    let mut buf = vec![0; size];
    let info = reader.next_frame(&mut buf).map_err(bad)?;
    let (w, h) = (info.width as usize, info.height as usize);
    let channels = info.color_type.samples();
    let gray: Vec<f32> = buf[..info.buffer_size()]
        .chunks_exact(channels)
        .map(|p| {
            let (v, alpha) = match p {
                [g] => (f32::from(*g), 255.0),
                [g, a] => (f32::from(*g), f32::from(*a)),
                [r, g, b] => (
                    0.299 * f32::from(*r) + 0.587 * f32::from(*g) + 0.114 * f32::from(*b),
                    255.0,
                ),
                [r, g, b, a, ..] => (
                    0.299 * f32::from(*r) + 0.587 * f32::from(*g) + 0.114 * f32::from(*b),
                    f32::from(*a),
                ),
                [] => (0.0, 255.0),
            };
            v * alpha / (255.0 * 255.0)
        })
        .collect();
    if channels > 2 {
        eprintln!(
            "warning: {}: colour image, converted to gray",
            path.display()
        );
    }
    let pixels = if [h, w] == want {
        gray
    } else {
        eprintln!(
            "warning: {}: {w}×{h} pixels, resized to {}×{} (bilinear)",
            path.display(),
            want[1],
            want[0]
        );
        resize(&gray, [h, w], want)
    };
    Ok(Image {
        source: path.display().to_string(),
        pixels,
    })
}

/// Bilinear resize of a row-major gray image, sampling pixel centres.
fn resize(src: &[f32], [h, w]: [usize; 2], [oh, ow]: [usize; 2]) -> Vec<f32> {
    let mut out = Vec::with_capacity(oh * ow);
    for r in 0..oh {
        for c in 0..ow {
            let sr = ((r as f32 + 0.5) * h as f32 / oh as f32 - 0.5).clamp(0.0, (h - 1) as f32);
            let sc = ((c as f32 + 0.5) * w as f32 / ow as f32 - 0.5).clamp(0.0, (w - 1) as f32);
            let (r0, c0) = (sr.floor() as usize, sc.floor() as usize);
            let (r1, c1) = ((r0 + 1).min(h - 1), (c0 + 1).min(w - 1));
            let (fr, fc) = (sr - r0 as f32, sc - c0 as f32);
            let at = |y: usize, x: usize| src[y * w + x];
            let top = at(r0, c0) * (1.0 - fc) + at(r0, c1) * fc;
            let bottom = at(r1, c0) * (1.0 - fc) + at(r1, c1) * fc;
            out.push(top * (1.0 - fr) + bottom * fr);
        }
    }
    out
}

/// Reads every image of an IDX image file.
fn read_idx_images(path: &Path, want: [usize; 2]) -> Result<Vec<Image>> {
    let a = kiln_data::read_idx(path)?;
    let (&[n, h, w], true) = (&a.dims[..], true) else {
        return Err(Error::invalid(format!(
            "{}: an IDX image file holds [n, height, width] bytes, this one {:?}",
            path.display(),
            a.dims
        )));
    };
    if [h, w] != want {
        return Err(Error::invalid(format!(
            "{}: images are {h}×{w}, the model takes {}×{}",
            path.display(),
            want[0],
            want[1]
        )));
    }
    Ok((0..n)
        .map(|i| Image {
            source: format!("{}[{i}]", path.display()),
            pixels: a.data[i * h * w..(i + 1) * h * w]
                .iter()
                .map(|&b| f32::from(b) / 255.0)
                .collect(),
        })
        .collect())
}

/// Runs `kiln predict`.
pub fn predict(a: PredictArgs, backend: CpuBackend) -> Result<()> {
    if a.top == 0 {
        return Err(Error::invalid(
            "--top 0: show at least the most probable class",
        ));
    }
    // Model files and checkpoints alike (a checkpoint's optimiser state is ignored).
    let (loaded, path) = crate::load_model(&a.model, &backend)?;
    crate::lm::refuse_language_model(&loaded.model, &path, "kiln predict")?;
    let model: Sequential<CpuBackend> = loaded.model;
    let input = model.input_shape().to_vec();
    let &[1, h, w] = &input[..] else {
        return Err(Error::invalid(format!(
            "model `{}` takes {input:?} examples; kiln predict reads 1-channel images",
            model.name()
        )));
    };
    let dataset = loaded
        .metadata
        .get("kiln.dataset")
        .cloned()
        .unwrap_or_default();
    let mut images = Vec::new();
    for file in &a.input {
        let is_png = file
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("png"));
        if is_png {
            images.push(read_png(file, [h, w])?);
        } else {
            images.extend(read_idx_images(file, [h, w])?);
        }
    }
    if images.is_empty() {
        return Err(Error::invalid(format!(
            "{}: no images to classify",
            a.input
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    let trainer = Trainer::for_inference(model, backend)?;
    let flat: Vec<f32> = images
        .iter()
        .flat_map(|i| i.pixels.iter().copied())
        .collect();
    let probs = trainer.predict(&flat, images.len())?.to_vec_f32()?;
    let classes = probs.len() / images.len().max(1);
    // As `kiln serve` answers 422: a table of NaN probabilities is no answer.
    if let Some(bad) = probs
        .chunks_exact(classes.max(1))
        .position(|p| p.iter().any(|v| !v.is_finite()))
    {
        return Err(Error::invalid(format!(
            "{}: the model's output is not finite for {} (its weights overflow: a damaged file or a run that diverged)",
            path.display(),
            images[bad].source
        )));
    }
    let names = kiln_data::dataset::class_names(&dataset, classes);
    let mut results = Vec::new();
    for (img, p) in images.iter().zip(probs.chunks_exact(classes.max(1))) {
        let mut order: Vec<usize> = (0..classes).collect();
        order.sort_by(|&x, &y| p[y].total_cmp(&p[x]));
        results.push((img, order, p));
    }
    let mut text;
    if a.json {
        let out: Vec<_> = results
            .iter()
            .map(|(img, order, p)| {
                serde_json::json!({
                    "input": img.source,
                    "class": order[0],
                    "label": names[order[0]],
                    "probability": p[order[0]],
                    "probabilities": p,
                })
            })
            .collect();
        text = serde_json::to_string_pretty(&out).expect("serialisable") + "\n";
    } else {
        let width = results
            .iter()
            .map(|(i, ..)| i.source.len())
            .max()
            .unwrap_or(5)
            .max(5);
        text = format!("{:<width$}  prediction\n", "input");
        for (img, order, p) in &results {
            let top: Vec<String> = order
                .iter()
                .take(a.top)
                .map(|&c| format!("{} {:.1}%", names[c], 100.0 * p[c]))
                .collect();
            text += &format!("{:<width$}  {}\n", img.source, top.join(", "));
        }
    }
    // A reader that stops early (`| head`) is not an error.
    match std::io::Write::write_all(&mut std::io::stdout().lock(), text.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(Error::io("writing the predictions".to_string(), e))
        }
        _ => Ok(()),
    }
}
