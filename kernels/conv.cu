// Convolutions as implicit GEMMs on the SIMT core of simt_gemm.cuh: the
// im2col matrix is never built — the B loader computes each element's
// source pixel (or a zero in the padding) on the fly. Operands are
// contiguous f32 NCHW (the host gathers others); results are stored as
// `dtype`.
//
//   forward:         out[o, (img,oy,ox)]  = Σ_(c,ky,kx) w[o,(c,ky,kx)] · x[img,c,iy,ix]
//   backward-data:   dx[c, (img,iy,ix)]   = Σ_(o,ky,kx) w[o,c,ky,kx] · dy[img,o,oy,ox]
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
struct DataA {
    const float* w; ConvArg p;
    __device__ __forceinline__ float operator()(int, i64 c, i64 kk) const {
        i64 kx = kk % p.kw, t = kk / p.kw, ky = t % p.kh, o = t / p.kh;
        return w[((o * p.c + c) * p.kh + ky) * p.kw + kx];
    }
};
struct DataB {
    const float* dy; ConvArg p;
    __device__ __forceinline__ float operator()(int, i64 kk, i64 col) const {
        i64 kx = kk % p.kw, t = kk / p.kw, ky = t % p.kh, o = t / p.kh;
        i64 ix = col % p.w; t = col / p.w;
        i64 iy = t % p.h, img = t / p.h;
        i64 ty = iy + p.pt - ky, tx = ix + p.pl - kx;
        if (ty < 0 || tx < 0 || ty % p.sh || tx % p.sw) return 0.0f;
        i64 oy = ty / p.sh, ox = tx / p.sw;
        if (oy >= p.oh || ox >= p.ow) return 0.0f;
        return dy[((img * p.o + o) * p.oh + oy) * p.ow + ox];
    }
};
struct DataStore {
    void* dx; int dtype; ConvArg p;
    __device__ __forceinline__ void operator()(int, i64 c, i64 col, float acc) const {
        i64 cells = p.h * p.w, img = col / cells, cell = col % cells;
        epilogue_store(dx, nullptr, nullptr, 1.0f, 0.0f, OP_NONE, dtype, (img * p.c + c) * cells + cell, 0, acc);
    }
};

extern "C" __global__ void __launch_bounds__(SG_THREADS)
kiln_conv2d_backward_data(const float* dy, const float* w, void* dx, int dtype, ConvArg p) {
    simt_gemm_tile(DataA{w, p}, DataB{dy, p}, DataStore{dx, dtype, p}, 0, p.c, p.n * p.h * p.w, 0,
                   p.o * p.kh * p.kw);
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
