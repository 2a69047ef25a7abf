// Row reductions with warp shuffles: the host permutes the reduced axes to
// the end, so every reduction is `rows × run` → `rows`. One block per row
// (grid-stride over rows); each thread folds a strided slice, warps fold
// with shuffles, and warp results meet in shared memory.
#include "common.cuh"

#define R_SUM 0
#define R_MEAN 1
#define R_MAX 2
#define R_MIN 3
#define REDUCE_THREADS 256

__device__ __forceinline__ float fold(int op, float a, float b) {
    return op == R_MAX ? nan_max(a, b) : op == R_MIN ? nan_min(a, b) : a + b;
}

__device__ __forceinline__ float fold_warp(int op, float v) {
    return op == R_MAX ? warp_max(v) : op == R_MIN ? warp_min(v) : warp_sum(v);
}

// Folds `v` over the block; every thread gets the result.
__device__ float block_fold(int op, float v, float* scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = fold_warp(op, v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    int warps = (blockDim.x + 31) >> 5;
    float identity = op == R_MAX ? -__int_as_float(0x7f800000) : op == R_MIN ? __int_as_float(0x7f800000) : 0.0f;
    v = lane < warps ? scratch[lane] : identity;
    return fold_warp(op, v);
}

extern "C" __global__ void kiln_reduce_rows(const float* x, float* y, i64 rows, i64 run, int op) {
    __shared__ float scratch[32];
    float identity = op == R_MAX ? -__int_as_float(0x7f800000) : op == R_MIN ? __int_as_float(0x7f800000) : 0.0f;
    for (i64 r = blockIdx.x; r < rows; r += gridDim.x) {
        const float* row = x + r * run;
        float acc = identity;
        for (i64 j = threadIdx.x; j < run; j += blockDim.x) acc = fold(op, acc, row[j]);
        acc = block_fold(op, acc, scratch);
        if (threadIdx.x == 0) y[r] = op == R_MEAN ? acc / (float)run : acc;
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
