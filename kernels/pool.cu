// Max pooling over contiguous f32 NCHW planes. Forward: one thread per
// output cell, the window's first maximum (a NaN wins) and its index in the
// input plane. Backward without atomics: one thread per input cell sums,
// in window order, the gradients of the outputs whose maximum it was — so
// overlapping windows give the same bits on every run.
#include "common.cuh"

// Mirrors kiln_cuda::launch::PoolArg.
struct PoolArg {
    i64 planes, h, w, kh, kw, sh, sw, pt, pl, oh, ow;
};

extern "C" __global__ void kiln_max_pool2d(const float* x, void* y, int dtype, u32* argmax,
                                           PoolArg p) {
    i64 cells = p.oh * p.ow;
    GRID_STRIDE(i, p.planes * cells) {
        i64 plane = i / cells, cell = i % cells, oy = cell / p.ow, ox = cell % p.ow;
        const float* src = x + plane * p.h * p.w;
        float best = 0.0f;
        i64 at = -1;
        for (i64 ky = 0; ky < p.kh; ++ky) {
            i64 iy = oy * p.sh + ky - p.pt;
            if (iy < 0 || iy >= p.h) continue;
            for (i64 kx = 0; kx < p.kw; ++kx) {
                i64 ix = ox * p.sw + kx - p.pl;
                if (ix < 0 || ix >= p.w) continue;
                float v = src[iy * p.w + ix];
                if (at < 0 || (best == best && (v != v || v > best))) { best = v; at = iy * p.w + ix; }
            }
        }
        store_f32(y, dtype, i, best);
        argmax[i] = (u32)at;
    }
}

extern "C" __global__ void kiln_max_pool2d_backward(const float* dy, const u32* argmax, void* dx,
                                                    int dtype, PoolArg p) {
    i64 cells = p.h * p.w;
    GRID_STRIDE(i, p.planes * cells) {
        i64 plane = i / cells, cell = i % cells, iy = cell / p.w, ix = cell % p.w;
        const float* g = dy + plane * p.oh * p.ow;
        const u32* a = argmax + plane * p.oh * p.ow;
        float s = 0.0f;
        // Outputs whose window covers (iy, ix): oy·sh − pt ≤ iy < oy·sh − pt + kh.
        i64 oy_lo = iy + p.pt - p.kh + 1, ox_lo = ix + p.pl - p.kw + 1;
        oy_lo = oy_lo <= 0 ? 0 : (oy_lo + p.sh - 1) / p.sh;
        ox_lo = ox_lo <= 0 ? 0 : (ox_lo + p.sw - 1) / p.sw;
        for (i64 oy = oy_lo; oy < p.oh && oy * p.sh - p.pt <= iy; ++oy)
            for (i64 ox = ox_lo; ox < p.ow && ox * p.sw - p.pl <= ix; ++ox)
                if (a[oy * p.ow + ox] == (u32)cell) s += g[oy * p.ow + ox];
        store_f32(dx, dtype, i, s);
    }
}
