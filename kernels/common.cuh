// Shared by every kiln kernel: element types, conversions, strided
// indexing, grid-stride loops and warp reductions. Self-contained (no CUDA
// headers), so NVRTC compiles it with nothing but the wheel.
#pragma once

typedef unsigned short u16;
typedef unsigned int u32;
typedef long long i64;
typedef unsigned long long u64;

// Element types, as kiln_cuda::kernels::DTYPE_* numbers them.
#define KILN_F32 0
#define KILN_F16 1
#define KILN_BF16 2
#define KILN_U32 3

#define KILN_MAX_RANK 6

// A view: element i (row-major over dims) lives at offset + Σ index·stride.
// Mirrors kiln_cuda::launch::Strided (#[repr(C)]).
struct Strided {
    int rank;
    int pad;
    i64 offset;
    i64 dims[KILN_MAX_RANK];
    i64 strides[KILN_MAX_RANK];
};

// Fully unrolled, so the struct's arrays are indexed by constants and stay
// in registers / the parameter bank (a loop over `rank` would copy them to
// local memory).
__device__ __forceinline__ i64 strided_offset(const Strided& s, i64 i) {
    i64 o = s.offset;
#pragma unroll
    for (int d = KILN_MAX_RANK - 1; d >= 0; --d) {
        if (d < s.rank) {
            i64 q = i % s.dims[d];
            i /= s.dims[d];
            o += q * s.strides[d];
        }
    }
    return o;
}

__device__ __forceinline__ float bf16_to_f32(u16 h) { return __uint_as_float(((u32)h) << 16); }

// Round to nearest even; a NaN stays a (quiet) NaN.
__device__ __forceinline__ u16 f32_to_bf16(float f) {
    u32 b = __float_as_uint(f);
    if ((b & 0x7fffffffu) > 0x7f800000u) return (u16)((b >> 16) | 0x40u);
    return (u16)((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
}

#ifdef KILN_HOST  // host/shim.h: the kernels run on the CPU in tests
__device__ __forceinline__ float f16_to_f32(u16 h) { return kiln_host_f16_to_f32(h); }
__device__ __forceinline__ u16 f32_to_f16(float f) { return kiln_host_f32_to_f16(f); }
#else
__device__ __forceinline__ float f16_to_f32(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ u16 f32_to_f16(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
#endif

__device__ __forceinline__ float load_f32(const void* p, int dtype, i64 i) {
    switch (dtype) {
        case KILN_F16: return f16_to_f32(((const u16*)p)[i]);
        case KILN_BF16: return bf16_to_f32(((const u16*)p)[i]);
        case KILN_U32: return (float)((const u32*)p)[i];
        default: return ((const float*)p)[i];
    }
}

__device__ __forceinline__ void store_f32(void* p, int dtype, i64 i, float v) {
    switch (dtype) {
        case KILN_F16: ((u16*)p)[i] = f32_to_f16(v); break;
        case KILN_BF16: ((u16*)p)[i] = f32_to_bf16(v); break;
        case KILN_U32: {
            // Truncation toward zero, saturating; NaN → 0. (2³² − 1 is not
            // an f32: the largest f32 below 2³² converts, anything at or
            // above 2³² saturates.)
            float t = v != v ? 0.0f : fmaxf(truncf(v), 0.0f);
            ((u32*)p)[i] = t >= 4294967296.0f ? 0xffffffffu : (u32)t;
            break;
        }
        default: ((float*)p)[i] = v;
    }
}

#define GRID_STRIDE(i, n) \
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (i64)gridDim.x * blockDim.x)

// max/min that propagate NaN (IEEE maximum), as the CPU kernels do.
__device__ __forceinline__ float nan_max(float a, float b) { return (a != a || b != b) ? __int_as_float(0x7fc00000) : fmaxf(a, b); }
__device__ __forceinline__ float nan_min(float a, float b) { return (a != a || b != b) ? __int_as_float(0x7fc00000) : fminf(a, b); }

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = nan_max(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
__device__ __forceinline__ float warp_min(float v) {
    for (int o = 16; o > 0; o >>= 1) v = nan_min(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Folds `v` over the block with `fold_warp` (a warp_* above), `identity`
// for the lanes past the last warp; every thread gets the result. `scratch`
// holds one float per warp.
template <class FoldWarp>
__device__ __forceinline__ float block_fold(float v, float identity, float* scratch, FoldWarp fold_warp) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = fold_warp(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    int warps = (blockDim.x + 31) >> 5;
    v = lane < warps ? scratch[lane] : identity;
    return fold_warp(v);
}

#define KILN_INF __int_as_float(0x7f800000)

// The row's max and Σ exp(x − max), in every thread of the block (the
// softmax kernels' and attention's row statistics).
__device__ __forceinline__ void row_stats(const float* row, i64 c, float* scratch, float* max_out,
                                          float* sum_out) {
    float m = -KILN_INF;
    for (i64 j = threadIdx.x; j < c; j += blockDim.x) m = nan_max(m, row[j]);
    m = block_fold(m, -KILN_INF, scratch, [](float v) { return warp_max(v); });
    float s = 0.0f;
    for (i64 j = threadIdx.x; j < c; j += blockDim.x) s += expf(row[j] - m);
    s = block_fold(s, 0.0f, scratch, [](float v) { return warp_sum(v); });
    *max_out = m;
    *sum_out = s;
}

// Activations and unary ops, numbered as kiln_core's UnaryOp.
#define OP_NEG 0
#define OP_ABS 1
#define OP_EXP 2
#define OP_LOG 3
#define OP_SQRT 4
#define OP_SQUARE 5
#define OP_RECIP 6
#define OP_RELU 7
#define OP_SIGMOID 8
#define OP_TANH 9
#define OP_GELU 10
#define OP_NONE 255

// e^-x overflows for x < -88 while the result is still a number.
__device__ __forceinline__ float sigmoid_f32(float x) {
    if (x >= 0.0f) return 1.0f / (1.0f + expf(-x));
    float e = expf(x);
    return e / (1.0f + e);
}

// GELU (tanh form): x·σ(s) with s = 2√(2/π)·(x + 0.044715x³).
#define GELU_K2 1.5957691216057308f
#define GELU_C 0.044715f
__device__ __forceinline__ float gelu_s(float x) { return GELU_K2 * x * (1.0f + GELU_C * x * x); }

__device__ __forceinline__ float unary_f32(int op, float x) {
    switch (op) {
        case OP_NEG: return -x;
        case OP_ABS: return fabsf(x);
        case OP_EXP: return expf(x);
        case OP_LOG: return logf(x);
        case OP_SQRT: return sqrtf(x);
        case OP_SQUARE: return x * x;
        case OP_RECIP: return 1.0f / x;
        case OP_RELU: return (x != x || x > 0.0f) ? x : 0.0f;
        case OP_SIGMOID: return sigmoid_f32(x);
        case OP_TANH: return tanhf(x);
        case OP_GELU: {
            // x·σ(s), the tanh form without its cancellation; GELU(−∞) = −0.
            float g = sigmoid_f32(gelu_s(x));
            return g == 0.0f ? -0.0f : x * g;
        }
        default: return x;
    }
}

// GELU's derivative times dy, given σ(s) (no ∞·0 where σ(1 − σ) is 0).
__device__ __forceinline__ float gelu_backward(float x, float g, float dy) {
    float t = g * (1.0f - g);
    float slope = t == 0.0f ? 0.0f : x * t * GELU_K2 * (1.0f + 3.0f * GELU_C * x * x);
    return dy * (g + slope);
}

// The Philox4x32-10 streams of kiln_core::rng (random.cu draws from them,
// attention.cu's dropout too): one block with 10 rounds.
__device__ __forceinline__ void philox(u32 c[4], u32 k0, u32 k1) {
    for (int round = 0; round < 10; ++round) {
        if (round > 0) { k0 += 0x9E3779B9u; k1 += 0xBB67AE85u; }
        u32 hi0 = __umulhi(0xD2511F53u, c[0]), lo0 = 0xD2511F53u * c[0];
        u32 hi1 = __umulhi(0xCD9E8D57u, c[2]), lo1 = 0xCD9E8D57u * c[2];
        u32 n0 = hi1 ^ c[1] ^ k0, n2 = hi0 ^ c[3] ^ k1;
        c[0] = n0; c[1] = lo1; c[2] = n2; c[3] = lo0;
    }
}

// The block at 64-bit counter n of seed's stream.
__device__ __forceinline__ void block_words(u64 seed, u64 n, u32 out[4]) {
    out[0] = (u32)n; out[1] = (u32)(n >> 32); out[2] = 0; out[3] = 0;
    philox(out, (u32)seed, (u32)(seed >> 32));
}

// Element i of the uniform [0, 1) stream (seed, offset): word i % 4 of
// block offset + i/4, its top 24 bits scaled.
__device__ __forceinline__ float uniform_at(u64 seed, u64 offset, u64 i) {
    u32 w[4];
    block_words(seed, offset + i / 4, w);
    int j = (int)(i % 4);  // a select, not an indexed load: w stays in registers
    u32 word = j == 0 ? w[0] : j == 1 ? w[1] : j == 2 ? w[2] : w[3];
    return (float)(word >> 8) * (1.0f / 16777216.0f);
}

// Inverted dropout's factor for element e (kiln_core::AttentionDropout):
// `keep` (1/(1 − rate)) where the stream's element e is ≥ rate, else 0;
// exactly 1 without dropout (rate 0, keep 1), with nothing drawn.
struct Dropout {
    u64 seed;
    u64 offset;
    float rate;
    float keep;
    __device__ __forceinline__ float factor(u64 e) const {
        if (rate == 0.0f) return 1.0f;
        return uniform_at(seed, offset, e) >= rate ? keep : 0.0f;
    }
};
