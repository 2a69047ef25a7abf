//! The checks, one function per op family, dispatched by name.

mod attention;
mod conv;
mod elementwise;
mod embedding;
mod gemm;
mod memory;
mod norm;
mod optim;
mod random;
mod reduce;
mod softmax;

use kiln_core::{Backend, BinaryOp, DType, Layout, ReduceOp, UnaryOp, View};

use crate::{gradcheck, CaseError, Config, Report, Status};

/// Downloads `storage` through `layout` as f64 values.
pub(crate) fn fetch<B: Backend>(
    b: &B,
    storage: &B::Storage,
    layout: &Layout,
) -> Result<Vec<f64>, CaseError> {
    Ok(b.download(View::new(storage, layout))?.to_f64_vec())
}

/// Downloads a whole contiguous result of shape `dims`.
pub(crate) fn fetch_all<B: Backend>(
    b: &B,
    storage: &B::Storage,
    dims: &[usize],
) -> Result<Vec<f64>, CaseError> {
    let layout = Layout::contiguous(kiln_core::Shape::new(dims).map_err(CaseError::from)?);
    fetch(b, storage, &layout)
}

pub(crate) fn unknown(op: &str, dtype: DType, cfg: &Config) -> Report {
    let mut r = Report::without_cases(op, dtype, cfg, Status::Fail, "no such check".into());
    r.failure = Some(format!(
        "no check is named `{op}` for {dtype}; see kiln_conformance::CHECKS"
    ));
    r.reproduce = format!("kiln conformance --backend {}", cfg.backend);
    r
}

pub(crate) fn run<B: Backend>(b: &B, op: &str, dtype: DType, cfg: &Config) -> Report {
    if !crate::CHECKS
        .iter()
        .any(|(n, dts)| *n == op && dts.contains(&dtype))
    {
        return unknown(op, dtype, cfg);
    }
    let find_unary = |name: &str| UnaryOp::ALL.into_iter().find(|u| u.name() == name);
    let find_binary = |name: &str| BinaryOp::ALL.into_iter().find(|u| u.name() == name);
    if let Some(u) = op.strip_prefix("unary_backward_").and_then(find_unary) {
        return elementwise::unary_backward(b, u, dtype, cfg);
    }
    if let Some(u) = op.strip_prefix("unary_").and_then(find_unary) {
        return elementwise::unary(b, u, dtype, cfg);
    }
    if let Some(o) = op.strip_prefix("binary_").and_then(find_binary) {
        return elementwise::binary(b, o, dtype, cfg);
    }
    match op {
        "upload_download" => memory::upload_download(b, dtype, cfg),
        "copy_strided" => memory::copy_strided(b, dtype, cfg),
        "contiguous" => memory::contiguous(b, dtype, cfg),
        "full" => memory::full(b, dtype, cfg),
        "cast" => memory::cast(b, dtype, cfg),
        "gemm" => gemm::gemm(b, dtype, cfg, false),
        "gemm_epilogue" => gemm::gemm(b, dtype, cfg, true),
        "affine" => elementwise::affine(b, dtype, cfg),
        "reduce_sum" => reduce::reduce(b, ReduceOp::Sum, dtype, cfg),
        "reduce_mean" => reduce::reduce(b, ReduceOp::Mean, dtype, cfg),
        "reduce_max" => reduce::reduce(b, ReduceOp::Max, dtype, cfg),
        "reduce_min" => reduce::reduce(b, ReduceOp::Min, dtype, cfg),
        "argmax" => reduce::argmax(b, dtype, cfg),
        "softmax" => softmax::softmax(b, dtype, cfg, false),
        "softmax_causal" => softmax::softmax_causal(b, dtype, cfg),
        "attention_causal" => attention::attention_causal(b, dtype, cfg),
        "attention_causal_backward" => attention::attention_causal_backward(b, dtype, cfg),
        "layer_norm" => norm::layer_norm(b, dtype, cfg),
        "embedding" => embedding::embedding(b, dtype, cfg),
        "embedding_backward" => embedding::embedding_backward(b, dtype, cfg),
        "layer_norm_backward" => norm::layer_norm_backward(b, dtype, cfg),
        "log_softmax" => softmax::softmax(b, dtype, cfg, true),
        "softmax_cross_entropy" => softmax::cross_entropy(b, dtype, cfg),
        "conv2d" => conv::conv2d(b, dtype, cfg),
        "conv2d_backward_data" => conv::conv2d_backward_data(b, dtype, cfg),
        "conv2d_backward_filter" => conv::conv2d_backward_filter(b, dtype, cfg),
        "conv2d_pool" => conv::conv2d_pool(b, dtype, cfg),
        "max_pool2d" => conv::max_pool2d(b, dtype, cfg),
        "max_pool2d_backward" => conv::max_pool2d_backward(b, dtype, cfg),
        "sgd_update" => optim::sgd(b, cfg),
        "adam_update" => optim::adam(b, cfg),
        "random_uniform" => random::random(b, dtype, cfg, false),
        "random_normal" => random::random(b, dtype, cfg, true),
        _ if op.starts_with("grad_") => gradcheck::run(b, op, cfg),
        _ => unknown(op, dtype, cfg),
    }
}
