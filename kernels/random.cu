// Draws from the Philox4x32-10 streams of kiln_core::rng, so a seed gives
// the same numbers on every backend: uniform element i is word i % 4 of
// block offset + i/4 as 24 bits scaled to [0, 1) (then low + (high − low)·u
// in f64, rounded to f32 — bitwise the CPU's); normal element i uses block
// offset + i/2 through Box–Muller in f64 (the CPU's formula; the device's
// f64 log and cos may differ from the host's libm in the last bit of the
// double, which the rounding to f32 almost always absorbs).
#include "common.cuh"

extern "C" __global__ void kiln_uniform(void* dst, int dtype, i64 n, u64 seed, u64 offset,
                                        double low, double high) {
    GRID_STRIDE(i, n) {
        float u = uniform_at(seed, offset, (u64)i);
        store_f32(dst, dtype, i, (float)(low + (high - low) * (double)u));
    }
}

extern "C" __global__ void kiln_normal(void* dst, int dtype, i64 n, u64 seed, u64 offset,
                                       double mean, double std) {
    GRID_STRIDE(i, n) {
        u32 w[4];
        block_words(seed, offset + (u64)i / 2, w);
        u32 w1 = (i % 2 == 0) ? w[0] : w[2];
        u32 w2 = (i % 2 == 0) ? w[1] : w[3];
        double u1 = ((double)w1 + 1.0) / 4294967296.0;
        double u2 = (double)w2 / 4294967296.0;
        double z = sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
        store_f32(dst, dtype, i, (float)(mean + std * z));
    }
}
