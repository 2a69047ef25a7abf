// Software versions of the tensor-core primitives of tc_ops.cuh for the
// CPU emulation, written from the PTX ISA's descriptions: cp.async as a
// plain copy (the kernels wait before reading anyway); ldmatrix and
// mma.sync as warp-collective exchanges — each lane puts its address or
// fragment registers in a slot, a block barrier, each lane computes its
// result from its warp's slots, a barrier. Every thread of the block must
// reach each call, as in kiln's kernels.
//
// Fragment layouts (g = lane / 4, q = lane % 4; two 16-bit elements per
// register, the lower column in the low half):
//   m16n8k16 A: a0 (g, 2q..2q+1), a1 (g+8, 2q..), a2 (g, 2q+8..), a3 (g+8, 2q+8..)
//            B: b0 (k 2q..2q+1, n g), b1 (k 2q+8.., n g)
//   m16n8k8 (tf32) A: a0 (g, q), a1 (g+8, q), a2 (g, q+4), a3 (g+8, q+4)
//            B: b0 (k q, n g), b1 (k q+4, n g)
//   C (both): c0 (g, 2q), c1 (g, 2q+1), c2 (g+8, 2q), c3 (g+8, 2q+1)
//   ldmatrix .x4: matrix j's row r is at the address lane 8j + r gives;
//   lane l gets M_j[g][2q..2q+1] (.trans: M_j[2q..2q+1][g]) in register j.
#pragma once

inline void cp_async16(void* dst, const void* src, bool valid) {
    if (valid) std::memcpy(dst, src, 16);
    else std::memset(dst, 0, 16);
}
inline void cp_async_commit() {}
template <int N>
inline void cp_async_wait() {}

inline const void* kiln_tc_addresses[1024];
inline u32 kiln_tc_regs[1024][6];

inline void kiln_ldmatrix(u32 (&r)[4], const void* p, bool trans) {
    unsigned t = threadIdx.x, w0 = t & ~31u, lane = t & 31u;
    kiln_tc_addresses[t] = p;
    __syncthreads();
    unsigned g = lane / 4, q = lane % 4;
    for (unsigned j = 0; j < 4; ++j) {
        auto m = [&](unsigned row, unsigned col) {
            return (u32)((const u16*)kiln_tc_addresses[w0 + 8 * j + row])[col];
        };
        u32 lo = trans ? m(2 * q, g) : m(g, 2 * q);
        u32 hi = trans ? m(2 * q + 1, g) : m(g, 2 * q + 1);
        r[j] = lo | (hi << 16);
    }
    __syncthreads();
}
inline void ldmatrix_x4(u32 (&r)[4], const void* p) { kiln_ldmatrix(r, p, false); }
inline void ldmatrix_x4_trans(u32 (&r)[4], const void* p) { kiln_ldmatrix(r, p, true); }

// D = A·B + C for one warp; `tf32` selects m16n8k8 with 32-bit elements,
// otherwise m16n8k16 with 16-bit elements widened by `half`.
template <class Half>
inline void kiln_mma(float (&c)[4], const u32 (&a)[4], const u32 (&b)[2], bool tf32, Half half) {
    unsigned t = threadIdx.x, w0 = t & ~31u, lane = t & 31u;
    for (int i = 0; i < 4; ++i) kiln_tc_regs[t][i] = a[i];
    kiln_tc_regs[t][4] = b[0];
    kiln_tc_regs[t][5] = b[1];
    __syncthreads();
    const int K = tf32 ? 8 : 16;
    float A[16][16], B[16][8];
    for (unsigned l = 0; l < 32; ++l) {
        const u32* r = kiln_tc_regs[w0 + l];
        unsigned g = l / 4, q = l % 4;
        if (tf32) {
            A[g][q] = __uint_as_float(r[0]);
            A[g + 8][q] = __uint_as_float(r[1]);
            A[g][q + 4] = __uint_as_float(r[2]);
            A[g + 8][q + 4] = __uint_as_float(r[3]);
            B[q][g] = __uint_as_float(r[4]);
            B[q + 4][g] = __uint_as_float(r[5]);
        } else {
            auto put = [&](float (*M)[16], unsigned row, unsigned col, u32 v) {
                M[row][col] = half((u16)(v & 0xffffu));
                M[row][col + 1] = half((u16)(v >> 16));
            };
            put(A, g, 2 * q, r[0]);
            put(A, g + 8, 2 * q, r[1]);
            put(A, g, 2 * q + 8, r[2]);
            put(A, g + 8, 2 * q + 8, r[3]);
            B[2 * q][g] = half((u16)(r[4] & 0xffffu));
            B[2 * q + 1][g] = half((u16)(r[4] >> 16));
            B[2 * q + 8][g] = half((u16)(r[5] & 0xffffu));
            B[2 * q + 9][g] = half((u16)(r[5] >> 16));
        }
    }
    __syncthreads();
    unsigned g = lane / 4, q = lane % 4;
    for (int e = 0; e < 4; ++e) {
        unsigned row = g + (e >= 2 ? 8 : 0), col = 2 * q + (e & 1);
        float s = c[e];
        for (int k = 0; k < K; ++k) s += A[row][k] * B[k][col];
        c[e] = s;
    }
}

struct MmaBf16 {
    static void mma(float (&c)[4], const u32 (&a)[4], const u32 (&b)[2]) {
        kiln_mma(c, a, b, false, [](u16 h) { return bf16_to_f32(h); });
    }
};
struct MmaF16 {
    static void mma(float (&c)[4], const u32 (&a)[4], const u32 (&b)[2]) {
        kiln_mma(c, a, b, false, [](u16 h) { return f16_to_f32(h); });
    }
};
struct MmaTf32 {
    static void mma(float (&c)[4], const u32 (&a)[4], const u32 (&b)[2]) {
        kiln_mma(c, a, b, true, [](u16 h) { return (float)h; });
    }
};

// cvt.rna.tf32.f32: 10 mantissa bits, rounded to nearest, ties away from zero.
inline u32 to_tf32(float x) {
    u32 u = __float_as_uint(x);
    if ((u & 0x7f800000u) == 0x7f800000u) return u;  // ±∞ and NaN as they are
    return (u + 0x1000u) & 0xffffe000u;
}
