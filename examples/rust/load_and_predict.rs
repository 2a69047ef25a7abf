//! A saved model loaded back and used to classify: `cargo run --release
//! -p kiln-examples --example load_and_predict [-- MODEL]`, where MODEL is
//! a model file, its folder (`runs/mlp-mnist-sample` after the README's
//! first command) or a checkpoint. Without one, a model is trained for two
//! epochs and saved first.

use std::collections::HashMap;
use std::path::PathBuf;

use kiln_core::{HostData, Result, Tensor};
use kiln_cpu::CpuBackend;
use kiln_data::{Dataset, Split};
use kiln_nn::{Adam, Loss, ModelSpec};
use kiln_train::{model_file, FitConfig, Trainer, Verbosity};

fn main() -> Result<()> {
    let backend = CpuBackend::new()?;
    let test = Dataset::bundled_sample(Split::Test)?;
    let dir = tempfile::tempdir().map_err(|e| kiln_core::Error::io("a temporary folder", e))?;
    let path = match std::env::args().nth(1) {
        Some(p) => PathBuf::from(p),
        None => {
            let path = dir.path().join("mlp.safetensors");
            let model = ModelSpec::mlp().build(1, &backend)?;
            let mut t = Trainer::new(
                model,
                Box::new(Adam::new(1e-3)?),
                Loss::CategoricalCrossEntropy,
                backend.clone(),
            );
            let cfg = FitConfig {
                epochs: 2,
                verbosity: Verbosity::Silent,
                ..FitConfig::default()
            };
            t.fit(&Dataset::bundled_sample(Split::Train)?, None, &cfg)?;
            model_file::save(&path, t.model(), &HashMap::new())?;
            path
        }
    };

    // Model files and checkpoints alike; a corrupt or truncated file is an
    // error that says so.
    let (loaded, file) = model_file::load_for_inference(&path, &backend)?;
    let model = loaded.model;
    println!(
        "loaded `{}` from {} ({} parameters)",
        model.name(),
        file.display(),
        model.num_params()
    );

    // The first 16 test images as the model takes them: pixels scaled to
    // [0, 1] (bytes / 255), [n, channels, height, width].
    let n = 16;
    let pixels: Vec<f32> = (0..n)
        .flat_map(|i| test.image(i).iter().map(|&b| f32::from(b) / 255.0))
        .collect();
    let mut dims = vec![n];
    dims.extend_from_slice(model.input_shape());
    let x = Tensor::from_host(HostData::F32(pixels), &dims, &backend)?;
    let probs = model.predict(&x)?.to_vec_f32()?;

    let classes = probs.len() / n;
    let mut right = 0;
    for (i, row) in probs.chunks(classes).enumerate() {
        let (best, p) =
            row.iter().enumerate().fold(
                (0, f32::MIN),
                |acc, (c, &p)| if p > acc.1 { (c, p) } else { acc },
            );
        let label = test.labels()[i] as usize;
        right += usize::from(best == label);
        println!("image {i:2}: predicted {best} (p = {p:.3}), label {label}");
    }
    println!("{right} of {n} right");
    assert!(
        right >= n * 3 / 4,
        "a trained model gets most of these right"
    );
    Ok(())
}
