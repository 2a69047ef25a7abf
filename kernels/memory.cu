// Memory kernels: fills and the strided, converting copy every other op
// relies on (a view of any layout and type → a contiguous buffer of any
// float type; f16/bf16 go through f32, which is exact, and round once).
#include "common.cuh"

extern "C" __global__ void kiln_fill_b32(u32* dst, i64 n, u32 bits) {
    GRID_STRIDE(i, n) dst[i] = bits;
}

extern "C" __global__ void kiln_fill_b16(u16* dst, i64 n, u16 bits) {
    GRID_STRIDE(i, n) dst[i] = bits;
}

// dst[dst_view(i)] = convert(src[src_view(i)]) for i < n: a gather into a
// contiguous buffer (dst_view the identity), a scatter into a strided one,
// or both.
extern "C" __global__ void kiln_copy(const void* src, int src_dtype, Strided view, void* dst,
                                     int dst_dtype, Strided dst_view, i64 n) {
    GRID_STRIDE(j, n) {
        i64 o = strided_offset(view, j);
        i64 i = strided_offset(dst_view, j);
        if (src_dtype == dst_dtype) {
            if (src_dtype == KILN_F32 || src_dtype == KILN_U32) ((u32*)dst)[i] = ((const u32*)src)[o];
            else ((u16*)dst)[i] = ((const u16*)src)[o];
        } else if (src_dtype == KILN_U32 && dst_dtype != KILN_U32) {
            // u32 → float, rounded once: exact in f64, then to f32 rounding
            // to odd (truncate, set the last bit if inexact), so a second
            // rounding to f16/bf16 is still correct.
            double d = (double)((const u32*)src)[o];
            if (dst_dtype == KILN_F32) {
                ((float*)dst)[i] = (float)d;
            } else {
                float t = __double2float_rz(d);
                if ((double)t != d) t = __uint_as_float(__float_as_uint(t) | 1u);
                store_f32(dst, dst_dtype, i, t);
            }
        } else {
            store_f32(dst, dst_dtype, i, load_f32(src, src_dtype, o));
        }
    }
}
