//! `kiln train --model gpt` and `kiln generate`: the language-model side
//! of the command line.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kiln_core::{Backend, Error, Result};
use kiln_data::text::TextCorpus;
use kiln_nn::{Adam, GptConfig, LrSchedule, ModelSpec, Precision, Sequential};
use kiln_train::lm::{self as trainer_lm, LmCheckpointPolicy, LmFitConfig, LmTrainer};
use kiln_train::{generate, model_file, SampleConfig};

use crate::{precision_description, TrainArgs};

/// Whether `kiln train` was asked for a language model: `--model gpt` or
/// a GPT spec, a text dataset, or a checkpoint of an LM run.
pub(crate) fn is_lm_run(a: &TrainArgs) -> Result<bool> {
    if let Some(m) = &a.model {
        if m == "gpt" {
            return Ok(true);
        }
        if m.ends_with(".toml") {
            if let Ok(text) =
                kiln_core::files::read_to_string(std::path::Path::new(m), "model spec")
            {
                if GptConfig::is_gpt_toml(&text) {
                    return Ok(true);
                }
            }
        }
    }
    // A built-in image model's name, or any name that is not a spec file,
    // cannot be a GPT: a text dataset or an LM checkpoint says so instead
    // of looking for a spec file by that name.
    let image_model = match a.model.as_deref() {
        Some(m) if m.ends_with(".toml") || m.ends_with(".json") || m == "gpt" => None,
        Some(m @ ("mlp" | "cnn")) => Some(m),
        // Neither a built-in name nor a spec file: the unknown-model error.
        Some(m) => return kiln_nn::ModelSpec::builtin(m).map(|_| false),
        None => None,
    };
    if let Some(d) = &a.dataset {
        if d == "shakespeare" || d.starts_with("text:") {
            if let Some(m) = image_model {
                return Err(Error::invalid(format!(
                    "--model {m} is not a language model and --dataset {d} is text: train a GPT on it \
                     (--model gpt, or a spec with a [gpt] table), or {m} on mnist-sample, mnist or fashion-mnist"
                )));
            }
            return Ok(true);
        }
    }
    match &a.resume {
        Some(p) => {
            let lm = trainer_lm::is_lm_checkpoint(p)?;
            if let (true, Some(m)) = (lm, image_model) {
                return Err(Error::invalid(format!(
                    "{} holds a GPT's run, not --model {m} (leave --model out to resume it)",
                    p.display()
                )));
            }
            Ok(lm)
        }
        None => Ok(false),
    }
}

/// The GPT `--model` names: `gpt` (nanoGPT's small character model) or a
/// spec file with a `[gpt]` table.
fn gpt_config(model: Option<&str>) -> Result<GptConfig> {
    match model {
        None | Some("gpt") => Ok(GptConfig::char_small()),
        Some(path) => {
            let text = kiln_core::files::read_to_string(std::path::Path::new(path), "model spec")?;
            if !GptConfig::is_gpt_toml(&text) {
                return Err(Error::invalid(format!(
                    "{path} is not a GPT spec (no [gpt] table, as in models/gpt-char.toml); a text dataset trains a GPT"
                )));
            }
            GptConfig::from_toml(&text).map_err(|e| Error::invalid(format!("{path}: {e}")))
        }
    }
}

pub(crate) fn run_train_lm<B: Backend>(
    a: TrainArgs,
    backend: B,
    world: Arc<dyn kiln_dist::Collective>,
) -> Result<()> {
    let json = a.log_format == "json";
    // Rank 0 speaks and writes for a distributed run.
    let lead = world.rank() == 0;
    let speak = crate::say(json);
    let say = move |s: String| {
        if lead {
            speak(s)
        }
    };
    for (flag, given) in [
        ("--epochs", a.epochs.is_some()),
        ("--augment", a.augment),
        ("--early-stopping", a.early_stopping.is_some()),
        ("--limit", a.limit.is_some()),
        ("--no-validation", a.no_validation),
        ("--data", a.data.is_some()),
    ] {
        if given {
            return Err(Error::invalid(format!(
                "{flag} is for image models; a GPT trains for --iters steps on --dataset shakespeare or text:FILE and evaluates every --eval-every"
            )));
        }
    }
    if !matches!(a.optimizer, crate::OptimizerName::Adam) {
        return Err(Error::invalid(
            "a GPT trains with AdamW (PyTorch's form); leave --optimizer out",
        ));
    }
    if a.keep == 0 {
        return Err(Error::invalid(
            "--keep 0: keep at least the newest checkpoint",
        ));
    }
    if a.momentum != 0.0 {
        return Err(Error::invalid(
            "--momentum is for --optimizer sgd; a GPT trains with AdamW (set --beta2 instead)",
        ));
    }
    // A resumed run defaults to its checkpoint's corpus, length and batch
    // (as to its model, rate and precision), so `--resume PATH` alone
    // continues it; flags given are checked against them.
    let resumed = a
        .resume
        .as_deref()
        .map(trainer_lm::checkpoint_progress)
        .transpose()?;
    let dataset = a
        .dataset
        .clone()
        .or_else(|| resumed.as_ref().map(|p| p.dataset.clone()))
        .unwrap_or_else(|| "shakespeare".into());
    let corpus = TextCorpus::load(&dataset)?;
    let iters = a
        .iters
        .or(resumed.as_ref().map(|p| p.iters))
        .unwrap_or(2000);
    let batch_size = a
        .batch_size
        .or(resumed.as_ref().map(|p| p.batch_size))
        .unwrap_or(12);
    // The update's settings a checkpoint recorded (none in older ones).
    let was = resumed.as_ref().and_then(|p| p.update);
    let (was_lr, was_min, was_warmup) = match was.map(|u| u.schedule) {
        Some(LrSchedule::WarmupCosine {
            peak, min, warmup, ..
        }) => (Some(peak), Some(min), Some(warmup)),
        _ => (None, None, None),
    };
    let lr = a.lr.or(was_lr).unwrap_or(1e-3);
    let weight_decay = a
        .weight_decay
        .or(was.map(|u| u.adam.weight_decay))
        .unwrap_or(0.1);
    let beta2 = a.beta2.or(was.map(|u| u.adam.beta2)).unwrap_or(0.99);
    let grad_clip = match (a.grad_clip, was) {
        (Some(c), _) => c,
        (None, Some(u)) => u.grad_clip.unwrap_or(0.0),
        (None, None) => 1.0,
    };
    let min_lr = a.min_lr.or(was_min);
    kiln_nn::optim::check_lr(lr)?;
    kiln_nn::optim::check_weight_decay(lr, weight_decay)
        .map_err(|e| Error::invalid(format!("{e} (--weight-decay)")))?;
    // The schedule's and AdamW's own checks do not know the flags' names.
    if let Some(min) = min_lr.filter(|m| !(m.is_finite() && (0.0..=lr).contains(m))) {
        return Err(Error::invalid(format!(
            "--min-lr {}: expected 0 to the peak learning rate (--lr {})",
            kiln_core::Number(min),
            kiln_core::Number(lr)
        )));
    }
    if !(0.0..1.0).contains(&beta2) {
        return Err(Error::invalid(format!(
            "--beta2 {}: expected 0 ≤ β₂ < 1 (default 0.99)",
            kiln_core::Number(beta2)
        )));
    }
    let warmup = match a.warmup.or(was_warmup) {
        Some(w) if w > iters => {
            return Err(Error::invalid(format!(
                "--warmup {w} is longer than the run (--iters {iters}): the rate would never reach --lr"
            )))
        }
        Some(w) => w,
        None => 100.min(iters),
    };
    // A tenth of --lr as written: the f32 1e-3 is a little above 1e-3, and
    // its tenth rounds to 1.00000005e-4, not the 1e-4 nanoGPT's lr/10 is
    // (Python divides the decimal 1e-3). The shortest decimal that reads
    // back as the f32 is what was written.
    let min_lr = min_lr.unwrap_or_else(|| {
        let written: f64 = lr.to_string().parse().unwrap_or(f64::from(lr));
        (written / 10.0) as f32
    });
    let schedule = LrSchedule::WarmupCosine {
        peak: lr,
        min: min_lr,
        warmup,
        decay: iters,
    };
    let optimizer = || -> Result<Adam<B>> {
        Adam::pytorch_adamw(lr, weight_decay)?.with_betas(0.9, beta2, 1e-8)
    };
    let seed = a.seed.or(resumed.as_ref().map(|p| p.seed)).unwrap_or(42);
    if let (Some(path), Some(_), None) = (&a.resume, &resumed, was) {
        if lead {
            eprintln!(
                "note: {} records no update settings (written before kiln kept them): the run goes on with \
                 --lr {}, --min-lr {}, --warmup {warmup}, --beta2 {}, --weight-decay {}, \
                 --grad-clip {} as given or defaulted — pass the run's own if they differed",
                path.display(),
                kiln_core::Number(lr),
                kiln_core::Number(min_lr),
                kiln_core::Number(beta2),
                kiln_core::Number(weight_decay),
                kiln_core::Number(grad_clip)
            );
        }
    }
    let accumulate = a
        .accumulate
        .or(resumed.as_ref().map(|p| p.accumulate))
        .unwrap_or(1);
    let cfg = LmFitConfig {
        iters,
        batch_size,
        accumulate,
        seed,
        eval_every: a.eval_every.unwrap_or(250),
        eval_iters: a.eval_iters.unwrap_or(20),
        schedule,
        grad_clip: (grad_clip != 0.0).then_some(grad_clip),
        verbosity: a.verbosity(),
        history_path: None,
        checkpoint: None,
        stop: Some(crate::training_stop_flag(world.as_ref())?),
        distributed: None,
    };
    cfg.check()?;
    let mut trainer = match &a.resume {
        Some(path) => {
            let t = LmTrainer::resume(path, optimizer()?, backend.clone())?;
            if let Some(m) = &a.model {
                let asked = gpt_config(Some(m))?.spec(t.vocab().len())?;
                if asked != t.model().spec() {
                    return Err(Error::invalid(format!(
                        "{} holds model `{}`, not the --model `{m}` asked for (leave --model out to resume it)",
                        path.display(),
                        t.model().name()
                    )));
                }
            }
            let p = t.progress().expect("a resumed trainer has progress");
            say(format!(
                "resuming from {} (step {} of {})",
                path.display(),
                p.iter,
                p.iters
            ));
            t
        }
        None => {
            let gpt = gpt_config(a.model.as_deref())?;
            let spec = gpt.spec(corpus.vocab().len())?;
            let model = Sequential::from_spec(&spec, seed, &backend)?;
            LmTrainer::new(model, optimizer()?, corpus.vocab().clone(), backend.clone())?
        }
    };
    let precision: Precision = match (&a.precision, trainer.progress()) {
        (Some(p), _) => p.parse()?,
        (None, Some(p)) => p.precision.parse()?,
        (None, None) => Precision::F32,
    };
    trainer.set_precision(precision);
    let spec: ModelSpec = trainer.model().spec();
    let plan = spec.memory(batch_size)?;
    plan.check(&spec.name, batch_size, kiln_nn::memory_limit()?)?;
    let out = a.out_folder(&spec.name, &dataset);
    std::fs::create_dir_all(&out)
        .map_err(|e| Error::io(format!("creating {}", out.display()), e))?;
    for dir in [out.clone(), out.join("checkpoints")]
        .into_iter()
        .filter(|_| lead)
    {
        model_file::remove_stale_temporaries(&dir)?;
    }
    // Written afresh by the trainer once its checks pass.
    let history_path = out.join("history.jsonl");
    say(trainer.model().summary().trim_end().to_string());
    say(format!(
        "Estimated memory at batch {batch_size}: {} (parameters and optimiser {}, activations {})",
        kiln_nn::spec::gib(plan.total()),
        kiln_nn::spec::gib(plan.params),
        kiln_nn::spec::gib(plan.activations),
    ));
    let train_tokens = corpus.tokens(kiln_data::TextSplit::Train).len();
    let val_tokens = corpus.tokens(kiln_data::TextSplit::Val).len();
    say(format!(
        "training on {dataset} ({train_tokens} train / {val_tokens} validation tokens, {} characters) with {}, adamw_torch(lr={}, β₂={}, wd={}) warm-up {} + cosine to {}, batch {batch_size}×{}×{}, clip {}, seed {}, precision {}",
        corpus.vocab().len(),
        backend.name(),
        kiln_core::Number(lr),
        kiln_core::Number(beta2),
        kiln_core::Number(weight_decay),
        warmup,
        kiln_core::Number(min_lr),
        spec.input[0],
        accumulate,
        cfg.grad_clip
            .map_or("off".to_string(), |c| kiln_core::Number(c).to_string()),
        seed,
        precision_description(precision)
    ));
    let distributed = crate::data_parallel(&a, &world, batch_size, "sequences", &say);
    let cfg = LmFitConfig {
        distributed,
        history_path: Some(history_path.clone()),
        checkpoint: Some(LmCheckpointPolicy {
            dir: out.join("checkpoints"),
            every: a.checkpoint_every as u64,
            keep: a.keep,
        }),
        ..cfg
    };
    let counted = backend.clone();
    let history = trainer.fit(&corpus, &cfg)?;
    if !lead {
        // Every replica holds the same model: rank 0 reports and saves it.
        return Ok(());
    }
    let last = history.last().expect("a run evaluates after its last step");
    let seconds: f64 = history.iter().map(|r| r.seconds).sum();
    let steps = trainer.progress().map_or(0, |p| p.iter);
    say(format!(
        "validation loss {:.4} (training {:.4}) after {steps} steps; training {seconds:.1}s, {:.2} it/s, {:.0} tok/s",
        last.val_loss,
        last.train_loss,
        last.iters_per_sec,
        last.tokens_per_sec
    ));
    let mut meta = trainer.metadata();
    for (k, v) in [
        ("kiln.dataset", dataset.clone()),
        ("kiln.dataset.fingerprint", corpus.fingerprint()),
        ("kiln.iters", iters.to_string()),
        ("kiln.seed", seed.to_string()),
        ("kiln.precision", precision.name().to_string()),
        ("kiln.val_loss", format!("{:.6}", last.val_loss)),
    ] {
        meta.insert(k.to_string(), v);
    }
    let model_path = out.join("model.safetensors");
    model_file::save(&model_path, trainer.model(), &meta)?;
    say(format!(
        "saved {} and {}",
        model_path.display(),
        history_path.display()
    ));
    let plots = kiln_train::plots::lm_curves(&history, &out.join("curves"))?;
    for f in &plots.files {
        say(format!("wrote {}", f.display()));
    }
    if let Some(why) = &plots.skipped {
        eprintln!("note: {why}");
    }
    let sample = generate(
        trainer.model(),
        trainer.vocab(),
        &trainer.vocab().start(),
        &SampleConfig {
            tokens: 200,
            ..SampleConfig::default()
        },
    )?;
    say(format!(
        "sample (200 tokens, temperature 0.8, top-k 200, seed 1):\n{}",
        sample.text.trim()
    ));
    crate::note_slow_paths(&counted);
    Ok(())
}

/// `kiln generate`: continue a prompt with a trained GPT.
#[derive(clap::Args)]
pub(crate) struct GenerateArgs {
    /// The model: a run folder (its model.safetensors), a model file, a
    /// checkpoint, or a folder of checkpoints (its newest).
    #[arg(long)]
    model: PathBuf,
    /// The text to continue (default: a new line, or the vocabulary's
    /// first character where it has no new line).
    #[arg(long)]
    prompt: Option<String>,
    /// Tokens (characters) to generate.
    #[arg(long, default_value_t = 500)]
    tokens: usize,
    /// Divides the logits before sampling (0: always the most likely character).
    #[arg(long, default_value_t = 0.8, value_parser = crate::f32_flag)]
    temperature: f32,
    /// Sample among the K most likely characters only (0: all).
    #[arg(long, value_name = "K", default_value_t = 200)]
    top_k: usize,
    /// Seed of the draws.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Recompute the whole context for every token instead of keeping a
    /// key/value cache (slower; for comparison).
    #[arg(long)]
    no_cache: bool,
    /// `json`: one JSON object with the text and the timings on stdout.
    #[arg(long, value_parser = ["text", "json"], default_value = "text")]
    format: String,
    /// Backend, as for `kiln train`.
    #[arg(long, default_value = "cpu")]
    pub(crate) backend: String,
    /// Worker threads (default: KILN_THREADS, else all cores).
    #[arg(long)]
    pub(crate) threads: Option<usize>,
}

/// The error for an image command (`kiln eval`, `kiln predict`) given a
/// language model, saying what to use instead.
pub(crate) fn refuse_language_model<B: Backend>(
    model: &Sequential<B>,
    file: &Path,
    command: &str,
) -> Result<()> {
    if model.takes_tokens() {
        return Err(Error::invalid(format!(
            "{}: `{}` is a language model; {command} classifies images. Sample it with kiln generate, serve it with kiln serve (POST /v1/generate); its validation loss is in the run's history.jsonl",
            file.display(),
            model.name()
        )));
    }
    Ok(())
}

/// A trained language model and its vocabulary, from a run folder, model
/// file or checkpoint.
pub(crate) fn load_lm<B: Backend>(
    path: &Path,
    backend: &B,
) -> Result<(Sequential<B>, kiln_data::Vocab, PathBuf)> {
    let (loaded, file) = crate::load_model(path, backend)?;
    let vocab = trainer_lm::vocab_for(&loaded.model, &loaded.metadata)
        .map_err(|e| Error::invalid(format!("{}: {e}", file.display())))?;
    Ok((loaded.model, vocab, file))
}

pub(crate) fn run_generate<B: Backend>(a: &GenerateArgs, backend: B) -> Result<()> {
    let (model, vocab, file) = load_lm(&a.model, &backend)?;
    let cfg = SampleConfig {
        tokens: a.tokens,
        temperature: a.temperature,
        top_k: (a.top_k > 0).then_some(a.top_k),
        seed: a.seed,
        cache: !a.no_cache,
    };
    let prompt = a.prompt.clone().unwrap_or_else(|| vocab.start());
    let json = a.format == "json";
    // Text is printed as it is sampled: the prompt with the first token
    // (nothing, if the model fails before it), each token flushed when a
    // person watches the terminal (a pipe gets whole lines).
    let mut stdout = std::io::stdout().lock();
    let watched = std::io::IsTerminal::is_terminal(&stdout);
    let mut started = false;
    let out = kiln_train::generate::generate_streaming(&model, &vocab, &prompt, &cfg, |t| {
        if json {
            return Ok(());
        }
        let write = |e| Error::io("writing the generated text to stdout", e);
        if !started {
            stdout.write_all(prompt.as_bytes()).map_err(write)?;
            started = true;
        }
        stdout.write_all(t.as_bytes()).map_err(write)?;
        if watched {
            stdout.flush().map_err(write)?;
        }
        Ok(())
    })
    .map_err(|e| match e {
        e @ Error::Io { .. } => e,
        e => Error::invalid(format!("{}: {e}", file.display())),
    });
    if started {
        // The line the text ends on, even when the generation failed.
        writeln!(stdout).map_err(|e| Error::io("writing to stdout", e))?;
    }
    drop(stdout);
    let out = out?;
    if json {
        let mut v = serde_json::to_value(&out).map_err(|e| Error::invalid(e.to_string()))?;
        v["backend"] = serde_json::Value::String(backend.name());
        println!("{v}");
    } else {
        eprintln!(
            "{} tokens in {:.2} s: {:.0} tokens/s ({}, {})",
            out.new_tokens,
            out.seconds,
            out.tokens_per_sec,
            if out.cached {
                "key/value cache"
            } else {
                "context recomputed per token"
            },
            backend.name()
        );
    }
    Ok(())
}
