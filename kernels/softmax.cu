// Softmax, log-softmax and fused softmax-cross-entropy over the last axis
// of contiguous f32 rows: one block per row (grid-stride over rows), the
// row's max and Σ exp(x − max) folded with warp shuffles.
#include "common.cuh"

extern "C" __global__ void kiln_softmax_rows(const float* x, float* y, i64 rows, i64 c, int log) {
    __shared__ float scratch[32];
    for (i64 r = blockIdx.x; r < rows; r += gridDim.x) {
        const float* row = x + r * c;
        float* out = y + r * c;
        float m, s;
        row_stats(row, c, scratch, &m, &s);
        if (log) {
            float lse = logf(s);
            for (i64 j = threadIdx.x; j < c; j += blockDim.x) out[j] = row[j] - m - lse;
        } else {
            for (i64 j = threadIdx.x; j < c; j += blockDim.x) out[j] = expf(row[j] - m) / s;
        }
    }
}

// loss[r] = logsumexp(row) − row[label]; grad = softmax(row) − onehot(label).
// A label ≥ c makes the row NaN and writes r + 1 to *bad (any such row: the
// host reports one at its next synchronisation), without reading past the row.
extern "C" __global__ void kiln_softmax_xent(const float* logits, const u32* labels, float* loss,
                                             float* grad, i64 rows, i64 c, u64* bad) {
    __shared__ float scratch[32];
    for (i64 r = blockIdx.x; r < rows; r += gridDim.x) {
        const float* row = logits + r * c;
        float* g = grad + r * c;
        float m, s;
        row_stats(row, c, scratch, &m, &s);
        i64 label = labels[r];
        if (label >= c) {
            if (threadIdx.x == 0) {
                loss[r] = __int_as_float(0x7fc00000);
                *bad = (u64)r + 1;
            }
            for (i64 j = threadIdx.x; j < c; j += blockDim.x) g[j] = __int_as_float(0x7fc00000);
            continue;
        }
        if (threadIdx.x == 0) loss[r] = (m + logf(s)) - row[label];
        for (i64 j = threadIdx.x; j < c; j += blockDim.x)
            g[j] = expf(row[j] - m) / s - (j == label ? 1.0f : 0.0f);
    }
}

// Causal-masked softmax over rows of `keys` scores, `queries` rows per
// matrix: row r (query i = r mod queries) sees keys 0..=i + keys − queries;
// the rest are 0 and not read.
extern "C" __global__ void kiln_softmax_causal(const float* x, float* y, i64 rows, i64 queries,
                                               i64 keys) {
    __shared__ float scratch[32];
    for (i64 r = blockIdx.x; r < rows; r += gridDim.x) {
        const float* row = x + r * keys;
        float* out = y + r * keys;
        i64 seen = r % queries + keys - queries + 1;
        float m, s;
        row_stats(row, seen, scratch, &m, &s);
        for (i64 j = threadIdx.x; j < keys; j += blockDim.x) out[j] = j < seen ? expf(row[j] - m) / s : 0.0f;
    }
}
