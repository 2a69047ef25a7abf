// Tensor-core GEMMs for Ampere and later (sm_80+): BF16 and F16 with
// mma.sync.m16n8k16 and TF32 with mma.sync.m16n8k8, f32 accumulation,
// shared-memory tiles filled by cp.async with double buffering, BF16
// fragments read with ldmatrix, and the fused epilogue of simt_gemm.cuh.
//
// Operands: contiguous row-major A [batch, m, k] and B [batch, k, n] (bf16
// or f16 for the 16-bit kernels; f32 for TF32, rounded to tf32 on the way
// into the tensor cores); k and n multiples of 8 (16-bit) or 4 (TF32) so every
// 16-byte cp.async is aligned — the host checks and otherwise takes the
// SIMT kernel. Tiles: 128×128 per 256-thread block, 8 warps as 2 (m) × 4
// (n), each warp 64×32 = 4×4 MMA tiles. Hopper's wgmma is a later step.
#include "simt_gemm.cuh"
#include "tc_ops.cuh"

#define TC_BM 128
#define TC_BN 128
#define TC_THREADS 256

// Writes one warp's 64×32 accumulator tile through the epilogue.
__device__ __forceinline__ void store_warp_tile(const StoreMatrix& st, int batch, float acc[4][4][4],
                                                i64 row0, i64 col0, i64 m, i64 n) {
    int lane = threadIdx.x & 31;
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                i64 row = row0 + i * 16 + lane / 4 + (r >= 2 ? 8 : 0);
                i64 col = col0 + j * 8 + (lane % 4) * 2 + (r & 1);
                if (row < m && col < n) st(batch, row, col, acc[i][j][r]);
            }
}

// One pipeline stage: the block's 128×BK tile of A and BK×128 tile of B,
// as 16-byte cp.async copies (512 of each: two per thread), zero-filled
// past the matrix edges; then the copies are committed as one group.
template <class T, int BK, int AS, int BS>
__device__ __forceinline__ void load_stage(T (*as)[AS], T (*bs)[BS], const T* a, const T* b, i64 m0,
                                           i64 n0, i64 k0, i64 m, i64 n, i64 k) {
    constexpr int E = 16 / sizeof(T);  // elements per copy
    constexpr int ACH = BK / E;        // copies per row of the A tile
    constexpr int BCH = TC_BN / E;     // copies per row of the B tile
    static_assert(TC_BM * ACH == 2 * TC_THREADS && BK * BCH == 2 * TC_THREADS, "two copies each");
    const int t = threadIdx.x;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        int c = t + r * TC_THREADS;
        int row = c / ACH, col = (c % ACH) * E;
        bool ok = m0 + row < m && k0 + col < k;
        cp_async16(&as[row][col], ok ? a + (m0 + row) * k + k0 + col : a, ok);
        int brow = c / BCH, bcol = (c % BCH) * E;
        bool okb = k0 + brow < k && n0 + bcol < n;
        cp_async16(&bs[brow][bcol], okb ? b + (k0 + brow) * n + n0 + bcol : b, okb);
    }
    cp_async_commit();
}

// The main loop both kernels share: stage k-tile kt+1 while the tensor
// cores work on tile kt (`multiply(buf, acc)` runs one stage's MMAs into
// the warp's 64×32 accumulators), then the epilogue.
template <int BK, class Load, class Multiply>
__device__ __forceinline__ void tc_main_loop(const Load& load, const Multiply& multiply,
                                             const EpilogueArg& ep, i64 m, i64 n, i64 k) {
    const int warp = threadIdx.x >> 5, wm = warp / 4, wn = warp % 4;
    float acc[4][4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int r = 0; r < 4; ++r) acc[i][j][r] = 0.0f;

    const i64 tiles = (k + BK - 1) / BK;
    load(0, 0);
    for (i64 kt = 0; kt < tiles; ++kt) {
        int buf = kt & 1;
        if (kt + 1 < tiles) {
            load(buf ^ 1, (kt + 1) * BK);
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        multiply(buf, acc);
        __syncthreads();
    }
    const i64 m0 = (i64)blockIdx.y * TC_BM, n0 = (i64)blockIdx.x * TC_BN;
    store_warp_tile(StoreMatrix{ep}, blockIdx.z, acc, m0 + wm * 64, n0 + wn * 32, m, n);
}

// ----- BF16 and F16 -----------------------------------------------------------
// Both are m16n8k16 MMAs on 16-bit operands with the same fragment layout;
// only the instruction's input type differs.
#define BF_BK 32
#define BF_AS (BF_BK + 8)   // padded row strides (in 16-bit elements): ldmatrix
#define BF_BS (TC_BN + 8)   // rows stay 16-byte aligned, without bank conflicts

template <class Mma>
__device__ __forceinline__ void gemm_16bit(const u16* A, const u16* B, const EpilogueArg& ep, i64 m,
                                           i64 n, i64 k) {
    __shared__ __align__(16) u16 As[2][TC_BM][BF_AS];
    __shared__ __align__(16) u16 Bs[2][BF_BK][BF_BS];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int wm = warp / 4, wn = warp % 4;
    const i64 m0 = (i64)blockIdx.y * TC_BM, n0 = (i64)blockIdx.x * TC_BN;
    const u16* a = A + (i64)blockIdx.z * m * k;
    const u16* b = B + (i64)blockIdx.z * k * n;

    auto load = [&](int buf, i64 k0) {
        load_stage<u16, BF_BK, BF_AS, BF_BS>(As[buf], Bs[buf], a, b, m0, n0, k0, m, n, k);
    };
    auto multiply = [&](int buf, float (&acc)[4][4][4]) {
#pragma unroll
        for (int ks = 0; ks < BF_BK; ks += 16) {
            u32 af[4][4], bfr[4][2];
#pragma unroll
            for (int i = 0; i < 4; ++i)
                ldmatrix_x4(af[i], &As[buf][wm * 64 + i * 16 + lane % 16][ks + (lane / 16) * 8]);
#pragma unroll
            for (int j2 = 0; j2 < 2; ++j2) {
                // Matrices 0, 1: k 0–7 and 8–15 of n-tile 2·j2; 2, 3: of n-tile 2·j2 + 1.
                u32 r[4];
                ldmatrix_x4_trans(r, &Bs[buf][ks + lane % 16][wn * 32 + j2 * 16 + (lane / 16) * 8]);
                bfr[2 * j2][0] = r[0];
                bfr[2 * j2][1] = r[1];
                bfr[2 * j2 + 1][0] = r[2];
                bfr[2 * j2 + 1][1] = r[3];
            }
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) Mma::mma(acc[i][j], af[i], bfr[j]);
        }
    };
    tc_main_loop<BF_BK>(load, multiply, ep, m, n, k);
}

extern "C" __global__ void __launch_bounds__(TC_THREADS)
kiln_gemm_bf16(const u16* A, const u16* B, EpilogueArg ep, i64 m, i64 n, i64 k) {
    gemm_16bit<MmaBf16>(A, B, ep, m, n, k);
}

extern "C" __global__ void __launch_bounds__(TC_THREADS)
kiln_gemm_f16(const u16* A, const u16* B, EpilogueArg ep, i64 m, i64 n, i64 k) {
    gemm_16bit<MmaF16>(A, B, ep, m, n, k);
}

// ----- TF32 ----------------------------------------------------------------
#define TF_BK 16
#define TF_AS (TF_BK + 4)   // padded strides (in f32) for conflict-free
#define TF_BS (TC_BN + 8)   // fragment reads

extern "C" __global__ void __launch_bounds__(TC_THREADS)
kiln_gemm_tf32(const float* A, const float* B, EpilogueArg ep, i64 m, i64 n, i64 k) {
    __shared__ __align__(16) float As[2][TC_BM][TF_AS];
    __shared__ __align__(16) float Bs[2][TF_BK][TF_BS];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int wm = warp / 4, wn = warp % 4;
    const int g = lane / 4, q = lane % 4;
    const i64 m0 = (i64)blockIdx.y * TC_BM, n0 = (i64)blockIdx.x * TC_BN;
    const float* a = A + (i64)blockIdx.z * m * k;
    const float* b = B + (i64)blockIdx.z * k * n;

    auto load = [&](int buf, i64 k0) {
        load_stage<float, TF_BK, TF_AS, TF_BS>(As[buf], Bs[buf], a, b, m0, n0, k0, m, n, k);
    };
    auto multiply = [&](int buf, float (&acc)[4][4][4]) {
#pragma unroll
        for (int ks = 0; ks < TF_BK; ks += 8) {
            u32 af[4][4], bfr[4][2];
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                int r0 = wm * 64 + i * 16 + g;
                af[i][0] = to_tf32(As[buf][r0][ks + q]);
                af[i][1] = to_tf32(As[buf][r0 + 8][ks + q]);
                af[i][2] = to_tf32(As[buf][r0][ks + q + 4]);
                af[i][3] = to_tf32(As[buf][r0 + 8][ks + q + 4]);
            }
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                int c0 = wn * 32 + j * 8 + g;
                bfr[j][0] = to_tf32(Bs[buf][ks + q][c0]);
                bfr[j][1] = to_tf32(Bs[buf][ks + q + 4][c0]);
            }
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) MmaTf32::mma(acc[i][j], af[i], bfr[j]);
        }
    };
    tc_main_loop<TF_BK>(load, multiply, ep, m, n, k);
}
