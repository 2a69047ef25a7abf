//! Sampling text from a trained language model, with a key/value cache
//! (each new token one step over the cache) or by recomputing the context.
//!
//! ```
//! use kiln_cpu::CpuBackend;
//! use kiln_data::Vocab;
//! use kiln_nn::{GptConfig, Sequential};
//! use kiln_train::{generate, SampleConfig};
//!
//! // An untrained tiny GPT over a two-letter vocabulary: the machinery, not the prose.
//! let vocab = Vocab::of("ab");
//! let cfg = GptConfig { n_layer: 1, n_head: 1, n_embd: 8, block_size: 8, ..GptConfig::char_small() };
//! let model = Sequential::from_spec(&cfg.spec(vocab.len())?, 1, &CpuBackend::reference())?;
//! let sample = SampleConfig { tokens: 12, temperature: 0.0, ..SampleConfig::default() };
//! let g = generate(&model, &vocab, "ab", &sample)?;
//! assert_eq!(g.new_tokens, 12);
//! assert!(g.completion.chars().all(|c| c == 'a' || c == 'b'));
//! // With the cache or recomputing the context, greedy picks agree.
//! let again = generate(&model, &vocab, "ab", &SampleConfig { cache: false, ..sample })?;
//! assert_eq!(again.completion, g.completion);
//! # Ok::<(), kiln_core::Error>(())
//! ```

use std::time::Instant;

use kiln_core::rng::Philox;
use kiln_core::{no_grad, Backend, DType, Error, HostData, Result, Tensor};
use kiln_data::text::Vocab;
use kiln_nn::{DecodeState, Sequential};
use serde::Serialize;

/// The most tokens one call may generate.
pub const MAX_NEW_TOKENS: usize = 1 << 20;

/// How [`generate`] samples.
#[derive(Clone, Debug, PartialEq)]
pub struct SampleConfig {
    /// Tokens to generate.
    pub tokens: usize,
    /// Logits are divided by it before the softmax; 0 picks the most likely
    /// token (greedy).
    pub temperature: f32,
    /// Sample only among the `k` most likely tokens (`None`: all).
    pub top_k: Option<usize>,
    /// Seeds the draws: token `i` uses the Philox stream `(seed, i)`.
    pub seed: u64,
    /// Keep attention's keys and values between steps (the fast path);
    /// `false` recomputes the whole context for every token.
    pub cache: bool,
}

impl Default for SampleConfig {
    fn default() -> Self {
        SampleConfig {
            tokens: 500,
            temperature: 0.8,
            top_k: Some(200),
            seed: 1,
            cache: true,
        }
    }
}

impl SampleConfig {
    /// Checks the numbers, with errors that say what to change.
    pub fn check(&self) -> Result<()> {
        if self.tokens == 0 || self.tokens > MAX_NEW_TOKENS {
            return Err(Error::invalid(format!(
                "tokens {} must be 1 to {MAX_NEW_TOKENS}",
                self.tokens
            )));
        }
        if !(self.temperature.is_finite() && (0.0..=100.0).contains(&self.temperature)) {
            return Err(Error::invalid(format!(
                "temperature {} must be in [0, 100] (0: greedy)",
                self.temperature
            )));
        }
        if self.top_k == Some(0) {
            return Err(Error::invalid("top-k 0: keep at least one token"));
        }
        Ok(())
    }
}

/// What [`generate`] produced, and how fast.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Generated {
    /// The prompt followed by the new text.
    pub text: String,
    /// The new text alone.
    pub completion: String,
    /// Tokens in the prompt.
    pub prompt_tokens: usize,
    /// Tokens generated.
    pub new_tokens: usize,
    /// Seconds spent generating (the prompt's pass included).
    pub seconds: f64,
    /// New tokens per second.
    pub tokens_per_sec: f64,
    /// Whether the key/value cache was used.
    pub cached: bool,
}

/// How [`generate`]'s error begins when the model's logits are not finite
/// (NaN or ±∞) for the context: what a server answers with 422 rather
/// than blaming the request.
pub const NOT_FINITE: &str = "the model's output is not finite";

/// Continues `prompt` by `cfg.tokens` tokens sampled from `model` (a token
/// model over `vocab`). The context is the last `block` tokens, as the
/// model was trained. With the cache, when the context fills up the cache
/// restarts from its last half (so positions stay within the block), which
/// costs one pass over half a block every half block; without it, every
/// token recomputes its last `block` tokens.
///
/// Within one block both ways see the same context and, greedy or with the
/// same seed, pick the same tokens (up to float rounding in near ties).
pub fn generate<B: Backend>(
    model: &Sequential<B>,
    vocab: &Vocab,
    prompt: &str,
    cfg: &SampleConfig,
) -> Result<Generated> {
    generate_streaming(model, vocab, prompt, cfg, |_| Ok(()))
}

/// [`generate`], handing each new token's text to `on_token` as soon as
/// it is sampled (a command line prints it, so that a long generation
/// shows its progress and Ctrl-C keeps what was printed). An error from
/// `on_token` ends the generation with that error.
///
/// ```
/// # use kiln_data::text::TextCorpus;
/// # use kiln_nn::{GptConfig, Sequential};
/// # use kiln_train::{generate::generate_streaming, SampleConfig};
/// # let corpus = TextCorpus::from_text("abc", &"abcabc".repeat(20))?;
/// # let gpt = GptConfig { name: "tiny".into(), n_layer: 1, n_head: 1, n_embd: 8, block_size: 4, dropout: 0.0, bias: false };
/// # let model = Sequential::from_spec(&gpt.spec(corpus.vocab().len())?, 1, &kiln_cpu::CpuBackend::reference())?;
/// let cfg = SampleConfig { tokens: 5, ..SampleConfig::default() };
/// let mut streamed = String::new();
/// let out = generate_streaming(&model, corpus.vocab(), "ab", &cfg, |t| {
///     streamed.push_str(t);
///     Ok(())
/// })?;
/// assert_eq!(streamed, out.completion);
/// # Ok::<(), kiln_core::Error>(())
/// ```
pub fn generate_streaming<B: Backend>(
    model: &Sequential<B>,
    vocab: &Vocab,
    prompt: &str,
    cfg: &SampleConfig,
    mut on_token: impl FnMut(&str) -> Result<()>,
) -> Result<Generated> {
    cfg.check()?;
    if !model.takes_tokens() {
        return Err(Error::invalid(format!(
            "model `{}` is not a language model (its first layer is not an Embedding)",
            model.name()
        )));
    }
    let mut ids = vocab.encode(prompt)?;
    if ids.is_empty() {
        return Err(Error::invalid(
            "the prompt is empty: give at least one character (\"\\n\" starts a new line)",
        ));
    }
    let prompt_tokens = ids.len();
    let block = model.input_shape()[0];
    let backend = model.params()[0].backend().clone();
    let upload = |t: &[u32]| Tensor::from_host(HostData::U32(t.to_vec()), &[1, t.len()], &backend);
    model.set_training(false);
    let start = Instant::now();
    let mut state = DecodeState::new(block);
    let mut completion = Vec::with_capacity(cfg.tokens);
    no_grad(|| -> Result<()> {
        for i in 0..cfg.tokens {
            let logits = if cfg.cache {
                if i == 0 || state.position() == block {
                    // (Re)fill the cache: the whole prompt's tail, or half a block.
                    let keep = if i == 0 { block } else { block.div_ceil(2) };
                    state.reset();
                    model.decode(&upload(&ids[ids.len().saturating_sub(keep)..])?, &mut state)?
                } else {
                    model.decode(&upload(&ids[ids.len() - 1..])?, &mut state)?
                }
            } else {
                model.forward_logits(&upload(&ids[ids.len().saturating_sub(block)..])?)?
            };
            let t = logits.dims()[1];
            let last = logits.narrow(1, t - 1, 1)?.cast(DType::F32)?.to_vec_f32()?;
            if last.iter().any(|v| !v.is_finite()) {
                // Sampling from them would pick a token all the same (the
                // first, or a newline) and look like an answer.
                return Err(Error::invalid(format!(
                    "{NOT_FINITE} after {i} generated tokens (its weights overflow: a damaged file or a run that diverged)"
                )));
            }
            let next = sample(&last, cfg, i as u64);
            ids.push(next);
            completion.push(next);
            on_token(&vocab.decode(&[next]))?;
        }
        Ok(())
    })?;
    let seconds = start.elapsed().as_secs_f64();
    let completion = vocab.decode(&completion);
    Ok(Generated {
        text: format!("{prompt}{completion}"),
        completion,
        prompt_tokens,
        new_tokens: cfg.tokens,
        seconds,
        tokens_per_sec: cfg.tokens as f64 / seconds.max(1e-9),
        cached: cfg.cache,
    })
}

/// Draws token `i` from `logits` as `cfg` says (NaN logits never win).
fn sample(logits: &[f32], cfg: &SampleConfig, i: u64) -> u32 {
    let best = |a: &(usize, f64), b: &(usize, f64)| a.1.total_cmp(&b.1).then(b.0.cmp(&a.0));
    let mut scored: Vec<(usize, f64)> = logits
        .iter()
        .enumerate()
        .map(|(j, &v)| {
            (
                j,
                if v.is_nan() {
                    f64::NEG_INFINITY
                } else {
                    f64::from(v)
                },
            )
        })
        .collect();
    if cfg.temperature == 0.0 {
        return scored
            .iter()
            .copied()
            .max_by(best)
            .map_or(0, |(j, _)| j as u32);
    }
    if let Some(k) = cfg.top_k {
        if k < scored.len() {
            scored.sort_by(|a, b| best(b, a));
            scored.truncate(k);
        }
    }
    let t = f64::from(cfg.temperature);
    let top = scored.iter().map(|s| s.1).fold(f64::NEG_INFINITY, f64::max);
    let weights: Vec<f64> = scored.iter().map(|s| ((s.1 - top) / t).exp()).collect();
    let total: f64 = weights.iter().sum();
    if !(total.is_finite() && total > 0.0) {
        return scored
            .iter()
            .copied()
            .max_by(best)
            .map_or(0, |(j, _)| j as u32);
    }
    let mut u = f64::from(Philox::new(cfg.seed, i).next_f32()) * total;
    for (s, w) in scored.iter().zip(&weights) {
        if u < *w {
            return s.0 as u32;
        }
        u -= w;
    }
    scored.last().map_or(0, |s| s.0 as u32)
}
