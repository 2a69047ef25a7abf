// The SIMT GEMM core, C[row, col] = Σ_k A(row, k)·B(k, col), shared by the
// plain GEMM (gemm_simt.cu) and the implicit-GEMM convolutions (conv.cu):
// operands come through loader functors (strided matrices, or im2col views
// computed on the fly), results leave through an epilogue functor.
//
// The block sums k over [k_begin, k) (split-K callers give each z-slice a
// range). Tiling: a 256-thread block computes a BM×BN = 128×128 tile of C, walking
// k in steps of BK = 8 through double-buffered shared memory (the next
// step's loads are in flight in registers while this step multiplies);
// each thread owns an 8×8 sub-tile (rows 4·ty + {0..3, 64..67}, columns
// likewise) so its shared-memory reads are float4s without bank conflicts.
#pragma once
#include "common.cuh"

#define SG_BM 128
#define SG_BN 128
#define SG_BK 8
#define SG_THREADS 256

template <class LoadA, class LoadB, class Epi>
__device__ __forceinline__ void simt_gemm_tile(const LoadA& la, const LoadB& lb, const Epi& ep,
                                               int batch, i64 m, i64 n, i64 k_begin,
                                               i64 k) {
    // A is stored transposed (k-major); its rows are padded by 4 floats so
    // the 8 threads that stash one A row's 8 k values hit 8 different banks.
    __shared__ __align__(16) float As[2][SG_BK][SG_BM + 4];
    __shared__ __align__(16) float Bs[2][SG_BK][SG_BN];
    const int t = threadIdx.x;
    const int tx = t % 16, ty = t / 16;
    const i64 m0 = (i64)blockIdx.y * SG_BM, n0 = (i64)blockIdx.x * SG_BN;

    // Each thread stages 4 elements of A and 4 of B per k step, in
    // registers, while the previous step's tile is being multiplied.
    float ra[4], rb[4];
    auto fetch = [&](i64 k0) {
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            int idx = t + r * SG_THREADS;
            i64 row = m0 + idx / SG_BK, kk = k0 + idx % SG_BK;
            ra[r] = (row < m && kk < k) ? la(batch, row, kk) : 0.0f;
            i64 kr = k0 + idx / SG_BN, col = n0 + idx % SG_BN;
            rb[r] = (kr < k && col < n) ? lb(batch, kr, col) : 0.0f;
        }
    };
    auto stash = [&](int buf) {
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            int idx = t + r * SG_THREADS;
            As[buf][idx % SG_BK][idx / SG_BK] = ra[r];
            Bs[buf][idx / SG_BN][idx % SG_BN] = rb[r];
        }
    };

    float acc[8][8];
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = 0.0f;

    fetch(k_begin);
    stash(0);
    __syncthreads();
    int buf = 0;
    for (i64 k0 = k_begin; k0 < k; k0 += SG_BK) {
        bool more = k0 + SG_BK < k;
        if (more) fetch(k0 + SG_BK);
#pragma unroll
        for (int kk = 0; kk < SG_BK; ++kk) {
            float a[8], b[8];
            float4 a0 = *(const float4*)&As[buf][kk][ty * 4];
            float4 a1 = *(const float4*)&As[buf][kk][64 + ty * 4];
            float4 b0 = *(const float4*)&Bs[buf][kk][tx * 4];
            float4 b1 = *(const float4*)&Bs[buf][kk][64 + tx * 4];
            a[0] = a0.x; a[1] = a0.y; a[2] = a0.z; a[3] = a0.w;
            a[4] = a1.x; a[5] = a1.y; a[6] = a1.z; a[7] = a1.w;
            b[0] = b0.x; b[1] = b0.y; b[2] = b0.z; b[3] = b0.w;
            b[4] = b1.x; b[5] = b1.y; b[6] = b1.z; b[7] = b1.w;
#pragma unroll
            for (int i = 0; i < 8; ++i)
#pragma unroll
                for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
        }
        if (more) {
            stash(buf ^ 1);
            __syncthreads();
            buf ^= 1;
        }
    }

#pragma unroll
    for (int i = 0; i < 8; ++i) {
        i64 row = m0 + (i < 4 ? ty * 4 + i : 64 + ty * 4 + i - 4);
        if (row >= m) continue;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            i64 col = n0 + (j < 4 ? tx * 4 + j : 64 + tx * 4 + j - 4);
            if (col < n) ep(batch, row, col, acc[i][j]);
        }
    }
}

// A strided matrix operand of any float type: element (b, i, j) at
// offset + b·bs + i·rs + j·cs. Mirrors kiln_cuda::launch::MatrixArg.
struct MatrixArg {
    const void* data;
    int dtype;
    int pad;
    i64 offset, bs, rs, cs;
};

struct LoadMatrix {
    MatrixArg a;
    __device__ __forceinline__ float operator()(int b, i64 i, i64 j) const {
        return load_f32(a.data, a.dtype, a.offset + b * a.bs + i * a.rs + j * a.cs);
    }
};

// The GEMM epilogue: out = act(α·acc + β·C₀ + bias[col]), stored as
// `dtype` into a contiguous [batch, m, n] buffer. Mirrors
// kiln_cuda::launch::EpilogueArg.
struct EpilogueArg {
    void* out;
    const float* c0;
    const float* bias;
    float alpha, beta;
    int act;
    int dtype;
    i64 m, n;
};

// One output element, out of line: inlined, a tile's 64 unrolled stores
// would be 64 copies of the activation and the type switch (it made the
// GEMM kernels' PTX 6× larger and their JIT 40× slower); as a call each is
// a handful of instructions, once per output at the end of the kernel.
// Stores act(α·acc + β·c0[at] + bias[bias_at]) as `dtype` at out[at].
__device__ __noinline__ void epilogue_store(void* out, const float* c0, const float* bias, float alpha,
                                            float beta, int act, int dtype, i64 at, i64 bias_at,
                                            float acc) {
    float v = alpha * acc;
    if (c0) v += beta * c0[at];
    if (bias) v += bias[bias_at];
    store_f32(out, dtype, at, act == OP_NONE ? v : unary_f32(act, v));
}

struct StoreMatrix {
    EpilogueArg e;
    __device__ __forceinline__ void operator()(int b, i64 row, i64 col, float acc) const {
        epilogue_store(e.out, e.c0, e.bias, e.alpha, e.beta, e.act, e.dtype,
                       ((i64)b * e.m + row) * e.n + col, col, acc);
    }
};
