// Layer normalisation over the last axis of contiguous f32 rows (the host
// widens f16/bf16 first and rounds the results once). Forward and dx: one
// block per row (grid-stride over rows), two-pass statistics folded with
// warp shuffles. dγ and dβ: one thread per column, summing the rows in
// order — no atomics, so no result depends on scheduling.
#include "common.cuh"

__device__ __forceinline__ float block_sum(float v, float* scratch) {
    return block_fold(v, 0.0f, scratch, [](float w) { return warp_sum(w); });
}

// y = (x − μ)·rstd·γ + β per row; μ and rstd = 1/√(σ² + ε) written per row.
extern "C" __global__ void kiln_layer_norm(const float* x, const float* gamma, const float* beta,
                                           float* y, float* mean, float* rstd, i64 rows, i64 c,
                                           float eps) {
    __shared__ float scratch[32];
    for (i64 r = blockIdx.x; r < rows; r += gridDim.x) {
        const float* row = x + r * c;
        float s = 0.0f;
        for (i64 j = threadIdx.x; j < c; j += blockDim.x) s += row[j];
        float m = block_sum(s, scratch) / (float)c;
        float q = 0.0f;
        for (i64 j = threadIdx.x; j < c; j += blockDim.x) {
            float d = row[j] - m;
            q += d * d;
        }
        float rs = 1.0f / sqrtf(block_sum(q, scratch) / (float)c + eps);
        if (threadIdx.x == 0) {
            mean[r] = m;
            rstd[r] = rs;
        }
        float* out = y + r * c;
        for (i64 j = threadIdx.x; j < c; j += blockDim.x) out[j] = (row[j] - m) * rs * gamma[j] + beta[j];
    }
}

// dx = rstd·(g − mean(g) − x̂·mean(g·x̂)) with g = dy·γ, x̂ = (x − μ)·rstd.
extern "C" __global__ void kiln_layer_norm_backward_dx(const float* x, const float* gamma,
                                                       const float* dy, const float* mean,
                                                       const float* rstd, float* dx, i64 rows,
                                                       i64 c) {
    __shared__ float scratch[32];
    for (i64 r = blockIdx.x; r < rows; r += gridDim.x) {
        const float *row = x + r * c, *drow = dy + r * c;
        float m = mean[r], rs = rstd[r];
        float a = 0.0f, b = 0.0f;
        for (i64 j = threadIdx.x; j < c; j += blockDim.x) {
            float g = drow[j] * gamma[j];
            a += g;
            b += g * ((row[j] - m) * rs);
        }
        a = block_sum(a, scratch) / (float)c;
        b = block_sum(b, scratch) / (float)c;
        float* out = dx + r * c;
        for (i64 j = threadIdx.x; j < c; j += blockDim.x) {
            float xhat = (row[j] - m) * rs;
            out[j] = rs * (drow[j] * gamma[j] - a - xhat * b);
        }
    }
}

// dγ[j] = Σ_r dy·x̂ and dβ[j] = Σ_r dy, each column's rows summed in order.
extern "C" __global__ void kiln_layer_norm_backward_params(const float* x, const float* dy,
                                                           const float* mean, const float* rstd,
                                                           float* dgamma, float* dbeta, i64 rows,
                                                           i64 c) {
    GRID_STRIDE(j, c) {
        float sg = 0.0f, sb = 0.0f;
        for (i64 r = 0; r < rows; ++r) {
            float d = dy[r * c + j];
            sg += d * ((x[r * c + j] - mean[r]) * rstd[r]);
            sb += d;
        }
        dgamma[j] = sg;
        dbeta[j] = sb;
    }
}
