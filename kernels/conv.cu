// Convolutions: forward and filter gradient as implicit GEMMs on the SIMT
// core of simt_gemm.cuh, the input gradient as a gather. The
// im2col matrix is never built — the B loader computes each element's
// source pixel (or a zero in the padding) on the fly. Operands are
// contiguous f32 NCHW (the host gathers others); results are stored as
// `dtype`.
//
//   forward:         out[o, (img,oy,ox)]  = Σ_(c,ky,kx) w[o,(c,ky,kx)] · x[img,c,iy,ix]
//   backward-data:   dx[img,c,iy,ix]      = Σ_(o,ky,kx) w[o,c,ky,kx] · dy[img,o,oy,ox]  (a gather)
//   backward-filter: dw[o, (c,ky,kx)]     = Σ_(img,oy,ox) dy[img,o,oy,ox] · x[img,c,iy,ix]
//
// with iy = oy·sh + ky − pad_top, ix = ox·sw + kx − pad_left. The filter
// gradient's k (every output pixel of every image) is long and its tile
// small, so it is split over grid z-slices into a workspace that
// kiln_sum_splits adds up in a fixed order.
#include "simt_gemm.cuh"

// Mirrors kiln_cuda::launch::ConvArg.
struct ConvArg {
    i64 n, c, h, w, o, kh, kw, sh, sw, pt, pl, oh, ow;
};

// The im2col matrix's element at patch index (c, ky, kx) and output pixel
// (img, oy, ox): x[img, c, oy·sh + ky − pt, ox·sw + kx − pl], or 0 in the
// padding.
__device__ __forceinline__ float im2col(const float* x, const ConvArg& p, i64 patch, i64 pixel) {
    i64 kx = patch % p.kw, t = patch / p.kw, ky = t % p.kh, c = t / p.kh;
    i64 ox = pixel % p.ow;
    t = pixel / p.ow;
    i64 oy = t % p.oh, img = t / p.oh;
    i64 iy = oy * p.sh + ky - p.pt, ix = ox * p.sw + kx - p.pl;
    if (iy < 0 || iy >= p.h || ix < 0 || ix >= p.w) return 0.0f;
    return x[((img * p.c + c) * p.h + iy) * p.w + ix];
}

// ----- forward ---------------------------------------------------------
struct FwdA {
    const float* w; i64 K;
    __device__ __forceinline__ float operator()(int, i64 o, i64 kk) const { return w[o * K + kk]; }
};
struct FwdB {
    const float* x; ConvArg p;
    __device__ __forceinline__ float operator()(int, i64 kk, i64 col) const { return im2col(x, p, kk, col); }
};
struct FwdStore {
    void* out; int dtype; const float* bias; int act; ConvArg p;
    __device__ __forceinline__ void operator()(int, i64 o, i64 col, float acc) const {
        i64 cells = p.oh * p.ow, img = col / cells, cell = col % cells;
        epilogue_store(out, nullptr, bias, 1.0f, 0.0f, act, dtype, (img * p.o + o) * cells + cell, o, acc);
    }
};

extern "C" __global__ void __launch_bounds__(SG_THREADS)
kiln_conv2d(const float* x, const float* w, const float* bias, int act, void* out, int dtype,
            ConvArg p) {
    i64 K = p.c * p.kh * p.kw;
    simt_gemm_tile(FwdA{w, K}, FwdB{x, p}, FwdStore{out, dtype, bias, act, p}, 0, p.o,
                   p.n * p.oh * p.ow, 0, K);
}

// ----- backward-data ---------------------------------------------------
// A gather, one input cell per thread: dx sums w · dy over the (o, ky, kx)
// whose window covers the cell, and only those. (As an implicit GEMM the
// uncovered terms would be w · 0, which is NaN for an infinite weight where
// the gradient is finite.)
extern "C" __global__ void kiln_conv2d_backward_data(const float* dy, const float* w, void* dx, int dtype,
                                                     ConvArg p) {
    i64 cells = p.h * p.w;
    GRID_STRIDE(i, p.n * p.c * cells) {
        i64 cell = i % cells, t = i / cells, c = t % p.c, img = t / p.c;
        i64 iy = cell / p.w, ix = cell % p.w;
        float acc = 0.0f;
        for (i64 ky = 0; ky < p.kh; ++ky) {
            i64 ty = iy + p.pt - ky;
            if (ty < 0 || ty % p.sh || ty / p.sh >= p.oh) continue;
            i64 oy = ty / p.sh;
            for (i64 kx = 0; kx < p.kw; ++kx) {
                i64 tx = ix + p.pl - kx;
                if (tx < 0 || tx % p.sw || tx / p.sw >= p.ow) continue;
                i64 ox = tx / p.sw;
                for (i64 o = 0; o < p.o; ++o)
                    acc = fmaf(w[((o * p.c + c) * p.kh + ky) * p.kw + kx],
                               dy[((img * p.o + o) * p.oh + oy) * p.ow + ox], acc);
            }
        }
        store_f32(dx, dtype, i, acc);
    }
}

// ----- backward-filter (split-K) ----------------------------------------
struct FiltA {
    const float* dy; ConvArg p;
    __device__ __forceinline__ float operator()(int, i64 o, i64 kk) const {
        i64 cells = p.oh * p.ow, img = kk / cells, cell = kk % cells;
        return dy[(img * p.o + o) * cells + cell];
    }
};
struct FiltB {
    const float* x; ConvArg p;
    __device__ __forceinline__ float operator()(int, i64 kk, i64 col) const { return im2col(x, p, col, kk); }
};
struct FiltStore {
    float* ws; i64 len, cols;
    __device__ __forceinline__ void operator()(int, i64 o, i64 col, float acc) const {
        ws[(i64)blockIdx.z * len + o * cols + col] = acc;
    }
};

// Slice z sums k over [z·chunk, min((z+1)·chunk, K)) into ws[z].
extern "C" __global__ void __launch_bounds__(SG_THREADS)
kiln_conv2d_backward_filter(const float* x, const float* dy, float* ws, i64 chunk, ConvArg p) {
    i64 K = p.n * p.oh * p.ow, cols = p.c * p.kh * p.kw;
    i64 begin = (i64)blockIdx.z * chunk;
    i64 end = begin + chunk < K ? begin + chunk : K;
    simt_gemm_tile(FiltA{dy, p}, FiltB{x, p}, FiltStore{ws, p.o * cols, cols}, 0, p.o, cols, begin,
                   end);
}

// out[i] = Σ_s ws[s·len + i], in slice order (deterministic), as `dtype`.
extern "C" __global__ void kiln_sum_splits(const float* ws, i64 splits, i64 len, void* out,
                                           int dtype) {
    GRID_STRIDE(i, len) {
        float s = 0.0f;
        for (i64 z = 0; z < splits; ++z) s += ws[z * len + i];
        store_f32(out, dtype, i, s);
    }
}
