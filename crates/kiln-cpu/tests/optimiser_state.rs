//! Optimiser state never holds subnormals: Adam's moments and SGD's
//! velocity are stored with values below 2⁻¹²⁶ flushed to +0
//! (`kiln_core::flush_state`), the step uses them as stored, and every
//! kernel set and thread count gives the reference's bits.

mod common;

use common::{every_set_and_thread_count, values};
use kiln_core::{flush_state, AdamStep, Backend, HostData, SgdStep};
use kiln_cpu::CpuBackend;

/// Elements: more than two of the optimiser's per-task chunks (2¹⁵), with
/// an odd tail.
const N: usize = 70_001;

/// Four times the smallest normal f32: one step of decay (β < 1) takes the
/// smaller of the state's values (uniform up to this in magnitude, or half
/// of it for `v`) into the subnormal range — about a quarter of `m` and of
/// SGD's velocity, half of `v`.
const TINY: f32 = f32::MIN_POSITIVE * 4.0;

/// The parameters' scale (2⁻¹¹⁰): small enough that a step from [`TINY`]
/// state shows in their bits — with the state as stored, or unflushed —
/// and normal all the same.
const PARAMS: f32 = 1.0 / (1u128 << 110) as f32;

fn params(seed: u64) -> Vec<f32> {
    values(N, seed).iter().map(|x| x * PARAMS).collect()
}

fn f32s(h: &HostData) -> Vec<f32> {
    h.to_f32_vec()
}

/// A gradient that has stopped (exact zeros) on even elements, and is
/// tiny on odd ones.
fn stopped_gradient() -> Vec<f32> {
    values(N, 11)
        .iter()
        .enumerate()
        .map(|(i, g)| if i % 2 == 0 { 0.0 } else { g * TINY })
        .collect()
}

fn adam_step() -> AdamStep {
    AdamStep {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-7,
        weight_decay: 0.0,
        decoupled: true,
        step: 40,
    }
}

/// One Adam step on `b` from state near the subnormal range: `(p, m, v)`.
fn adam(b: &CpuBackend) -> [Vec<f32>; 3] {
    let mut p = HostData::F32(params(1));
    let g = HostData::F32(stopped_gradient());
    let mut m = HostData::F32(values(N, 2).iter().map(|x| x * TINY).collect());
    let mut v = HostData::F32(values(N, 3).iter().map(|x| x.abs() * TINY / 2.0).collect());
    b.adam_update(&mut p, &g, &mut m, &mut v, &adam_step())
        .unwrap();
    [f32s(&p), f32s(&m), f32s(&v)]
}

const SGD: SgdStep = SgdStep {
    lr: 0.1,
    momentum: 0.9,
    weight_decay: 0.0,
    nesterov: false,
};

/// One SGD step with momentum (Nesterov when asked): `(p, velocity)`.
fn sgd(b: &CpuBackend, nesterov: bool) -> [Vec<f32>; 2] {
    let mut p = HostData::F32(params(4));
    let g = HostData::F32(stopped_gradient());
    let mut vel = HostData::F32(values(N, 5).iter().map(|x| x * TINY).collect());
    let step = SgdStep { nesterov, ..SGD };
    b.sgd_update(&mut p, &g, Some(&mut vel), &step).unwrap();
    [f32s(&p), f32s(&vel)]
}

fn bits(x: &[Vec<f32>]) -> Vec<Vec<u32>> {
    x.iter()
        .map(|v| v.iter().map(|x| x.to_bits()).collect())
        .collect()
}

/// How many of `state` were flushed: zero where the unflushed value is not.
fn flushed(state: &[f32], unflushed: &[f32]) -> usize {
    state
        .iter()
        .zip(unflushed)
        .filter(|&(&s, &u)| s == 0.0 && u != 0.0)
        .count()
}

fn assert_no_subnormals(name: &str, state: &[f32]) {
    if let Some(i) = state.iter().position(|x| x.is_subnormal()) {
        panic!("{name}[{i}] = {:e} is subnormal", state[i]);
    }
}

#[test]
fn adam_stores_its_moments_flushed_and_steps_with_them() {
    let [p, m, v] = adam(&CpuBackend::reference());
    assert_no_subnormals("m", &m);
    assert_no_subnormals("v", &v);
    // The step, written out from the contract.
    let s = adam_step();
    let c = s.schedule().unwrap();
    let (p0, g) = (params(1), stopped_gradient());
    let m0: Vec<f32> = values(N, 2).iter().map(|x| x * TINY).collect();
    let v0: Vec<f32> = values(N, 3).iter().map(|x| x.abs() * TINY / 2.0).collect();
    let (mut raw_m, mut raw_v) = (Vec::new(), Vec::new());
    for i in 0..N {
        let pd = p0[i] - c.decay * p0[i];
        let mi = s.beta1 * m0[i] + (1.0 - s.beta1) * g[i];
        let vi = s.beta2 * v0[i] + (1.0 - s.beta2) * g[i] * g[i];
        raw_m.push(mi);
        raw_v.push(vi);
        let (mi, vi) = (flush_state(mi), flush_state(vi));
        let want = pd - c.lr_t * (mi / (vi.sqrt() + s.eps));
        assert_eq!(p[i].to_bits(), want.to_bits(), "p[{i}]");
        assert_eq!(m[i].to_bits(), mi.to_bits(), "m[{i}]");
        assert_eq!(v[i].to_bits(), vi.to_bits(), "v[{i}]");
    }
    // The data reach the case: a quarter of m and half of v flushed, and
    // the step taken with the unflushed moments would differ.
    assert!(flushed(&m, &raw_m) > N / 5, "{}", flushed(&m, &raw_m));
    assert!(flushed(&v, &raw_v) > N / 5, "{}", flushed(&v, &raw_v));
    let unflushed = (0..N)
        .filter(|&i| {
            let pd = p0[i] - c.decay * p0[i];
            let raw = pd - c.lr_t * (raw_m[i] / (raw_v[i].sqrt() + s.eps));
            raw.to_bits() != p[i].to_bits()
        })
        .count();
    assert!(unflushed > N / 10, "{unflushed}");
}

#[test]
fn sgd_stores_its_velocity_flushed() {
    for nesterov in [false, true] {
        let [p, vel] = sgd(&CpuBackend::reference(), nesterov);
        assert_no_subnormals("velocity", &vel);
        let (p0, g) = (params(4), stopped_gradient());
        let v0: Vec<f32> = values(N, 5).iter().map(|x| x * TINY).collect();
        let mut raw = Vec::new();
        let mut unflushed = 0;
        for i in 0..N {
            // The step, written out from the contract.
            let v = SGD.momentum * v0[i] + g[i];
            raw.push(v);
            let step = |v: f32| {
                let d = if nesterov { g[i] + SGD.momentum * v } else { v };
                p0[i] - SGD.lr * d
            };
            let want = step(flush_state(v));
            assert_eq!(vel[i].to_bits(), flush_state(v).to_bits(), "velocity[{i}]");
            assert_eq!(
                p[i].to_bits(),
                want.to_bits(),
                "p[{i}], nesterov {nesterov}"
            );
            unflushed += usize::from(step(v).to_bits() != want.to_bits());
        }
        assert!(flushed(&vel, &raw) > N / 5, "{}", flushed(&vel, &raw));
        assert!(unflushed > N / 10, "{unflushed}");
    }
}

#[test]
fn every_set_and_thread_count_flushes_as_the_reference() {
    let reference = CpuBackend::reference();
    let want_adam = bits(&adam(&reference));
    let want_sgd: Vec<_> = [false, true].map(|n| bits(&sgd(&reference, n))).into();
    for b in every_set_and_thread_count() {
        let on = (b.name(), b.threads());
        assert!(bits(&adam(&b)) == want_adam, "adam: {on:?}");
        for (nesterov, want) in [false, true].into_iter().zip(&want_sgd) {
            assert!(
                &bits(&sgd(&b, nesterov)) == want,
                "sgd (nesterov {nesterov}): {on:?}"
            );
        }
    }
}
