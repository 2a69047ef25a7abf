// Draws from the Philox4x32-10 streams of kiln_core::rng, so a seed gives
// the same numbers on every backend: uniform element i is word i % 4 of
// block offset + i/4 as 24 bits scaled to [0, 1) (then low + (high − low)·u
// in f64, rounded to f32 — bitwise the CPU's); normal element i uses block
// offset + i/2 through Box–Muller in f64 (the CPU's formula; the device's
// f64 log and cos may differ from the host's libm in the last bit of the
// double, which the rounding to f32 almost always absorbs).
#include "common.cuh"

__device__ __forceinline__ void philox(u32 c[4], u32 k0, u32 k1) {
    for (int round = 0; round < 10; ++round) {
        if (round > 0) { k0 += 0x9E3779B9u; k1 += 0xBB67AE85u; }
        u32 hi0 = __umulhi(0xD2511F53u, c[0]), lo0 = 0xD2511F53u * c[0];
        u32 hi1 = __umulhi(0xCD9E8D57u, c[2]), lo1 = 0xCD9E8D57u * c[2];
        u32 n0 = hi1 ^ c[1] ^ k0, n2 = hi0 ^ c[3] ^ k1;
        c[0] = n0; c[1] = lo1; c[2] = n2; c[3] = lo0;
    }
}

__device__ __forceinline__ void block_words(u64 seed, u64 n, u32 out[4]) {
    out[0] = (u32)n; out[1] = (u32)(n >> 32); out[2] = 0; out[3] = 0;
    philox(out, (u32)seed, (u32)(seed >> 32));
}

extern "C" __global__ void kiln_uniform(void* dst, int dtype, i64 n, u64 seed, u64 offset,
                                        double low, double high) {
    GRID_STRIDE(i, n) {
        u32 w[4];
        block_words(seed, offset + (u64)i / 4, w);
        int j = (int)(i % 4);  // a select, not an indexed load: w stays in registers
        u32 word = j == 0 ? w[0] : j == 1 ? w[1] : j == 2 ? w[2] : w[3];
        float u = (float)(word >> 8) * (1.0f / 16777216.0f);
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
