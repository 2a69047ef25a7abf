// Fused optimiser steps over f32 parameters, the CPU's formulas term for
// term (Keras' Adam; SGD with momentum, Nesterov and L2 decay).
#include "common.cuh"

// Optimiser state is stored with subnormals flushed to +0, NaN kept
// (kiln_core::flush_state): a moment whose gradient stops would otherwise
// stay subnormal for good. FLT_MIN is 2^-126.
__device__ __forceinline__ float flush_state(float x) {
    return fabsf(x) < 1.17549435e-38f ? 0.0f : x;
}

extern "C" __global__ void kiln_sgd(float* p, const float* g, float* vel, i64 n, float lr,
                                    float momentum, float weight_decay, int nesterov) {
    GRID_STRIDE(i, n) {
        float gi = g[i] + weight_decay * p[i];
        if (vel) {
            float v = flush_state(momentum * vel[i] + gi);
            vel[i] = v;
            float d = nesterov ? gi + momentum * v : v;
            p[i] -= lr * d;
        } else {
            p[i] -= lr * gi;
        }
    }
}

// lr_t = lr·√(1−β₂ᵗ)/(1−β₁ᵗ) is computed on the host in f64, as on the CPU.
extern "C" __global__ void kiln_adam(float* p, const float* g, float* m, float* v, i64 n,
                                     float lr_t, float beta1, float beta2, float eps, float decay,
                                     float l2) {
    GRID_STRIDE(i, n) {
        float pi = p[i];
        pi -= decay * pi;
        float gi = g[i] + l2 * pi;
        float mi = flush_state(beta1 * m[i] + (1.0f - beta1) * gi);
        float vi = flush_state(beta2 * v[i] + (1.0f - beta2) * gi * gi);
        m[i] = mi;
        v[i] = vi;
        p[i] = pi - lr_t * (mi / (sqrtf(vi) + eps));
    }
}
