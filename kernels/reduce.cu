// Row reductions with warp shuffles: the host permutes the reduced axes to
// the end, so every reduction is `rows × run` → `rows`. One block per row
// (grid-stride over rows); each thread folds a strided slice, warps fold
// with shuffles, and warp results meet in shared memory. Rows of at most
// 32 elements take one thread each instead (kiln_reduce_short_rows).
#include "common.cuh"

#define R_SUM 0
#define R_MEAN 1
#define R_MAX 2
#define R_MIN 3
#define REDUCE_THREADS 256

__device__ __forceinline__ float fold(int op, float a, float b) {
    return op == R_MAX ? nan_max(a, b) : op == R_MIN ? nan_min(a, b) : a + b;
}

__device__ __forceinline__ float identity_of(int op) {
    return op == R_MAX ? -KILN_INF : op == R_MIN ? KILN_INF : 0.0f;
}

extern "C" __global__ void kiln_reduce_rows(const float* x, float* y, i64 rows, i64 run, int op) {
    __shared__ float scratch[32];
    const float identity = identity_of(op);
    for (i64 r = blockIdx.x; r < rows; r += gridDim.x) {
        const float* row = x + r * run;
        float acc = identity;
        for (i64 j = threadIdx.x; j < run; j += blockDim.x) acc = fold(op, acc, row[j]);
        acc = op == R_MAX   ? block_fold(acc, identity, scratch, [](float v) { return warp_max(v); })
              : op == R_MIN ? block_fold(acc, identity, scratch, [](float v) { return warp_min(v); })
                            : block_fold(acc, identity, scratch, [](float v) { return warp_sum(v); });
        if (threadIdx.x == 0) y[r] = op == R_MEAN ? acc / (float)run : acc;
    }
}

// Short rows (`run` ≤ 32, e.g. a reduction over a leading axis of 2 to 4):
// one thread per row, folding it in order — a whole block per row would
// leave all but `run` of its 256 threads idle.
extern "C" __global__ void kiln_reduce_short_rows(const float* x, float* y, i64 rows, i64 run, int op) {
    const float identity = identity_of(op);
    for (i64 r = (i64)blockIdx.x * blockDim.x + threadIdx.x; r < rows; r += (i64)gridDim.x * blockDim.x) {
        const float* row = x + r * run;
        float acc = identity;
        for (i64 j = 0; j < run; ++j) acc = fold(op, acc, row[j]);
        y[r] = op == R_MEAN ? acc / (float)run : acc;
    }
}

// The index of each row's first maximum; a NaN counts as the maximum.
extern "C" __global__ void kiln_argmax_rows(const float* x, u32* y, i64 rows, i64 run) {
    __shared__ float best_v[REDUCE_THREADS];
    __shared__ i64 best_i[REDUCE_THREADS];
    for (i64 r = blockIdx.x; r < rows; r += gridDim.x) {
        const float* row = x + r * run;
        float bv = 0.0f;
        i64 bi = -1;
        for (i64 j = threadIdx.x; j < run; j += blockDim.x) {
            float v = row[j];
            if (bi < 0 || (bv == bv && (v != v || v > bv))) { bv = v; bi = j; }
        }
        best_v[threadIdx.x] = bv;
        best_i[threadIdx.x] = bi;
        __syncthreads();
        for (int s = blockDim.x / 2; s > 0; s >>= 1) {
            if (threadIdx.x < s) {
                float ov = best_v[threadIdx.x + s];
                i64 oi = best_i[threadIdx.x + s];
                float mv = best_v[threadIdx.x];
                i64 mi = best_i[threadIdx.x];
                bool take = oi >= 0 && (mi < 0 ||
                    (mv != mv ? (ov != ov && oi < mi)
                              : (ov != ov || ov > mv || (ov == mv && oi < mi))));
                if (take) { best_v[threadIdx.x] = ov; best_i[threadIdx.x] = oi; }
            }
            __syncthreads();
        }
        if (threadIdx.x == 0) y[r] = (u32)best_i[0];
        __syncthreads();
    }
}
