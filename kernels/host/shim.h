// Runs kiln's grid-stride kernels on the CPU, serially, for tests on
// machines without a GPU (crates/kiln-cuda/tests/host_emulation.rs): the
// CUDA keywords become plain C++, threadIdx/blockIdx are globals a launcher
// steps through, and the few intrinsics get exact software versions.
// Only kernels without __syncthreads or warp shuffles can run this way.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#define KILN_HOST 1
#define __global__
#define __device__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(x)

struct KilnDim3 {
    unsigned x = 0, y = 0, z = 0;
};
inline KilnDim3 threadIdx, blockIdx, blockDim, gridDim;

inline uint32_t __float_as_uint(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float __uint_as_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline uint32_t __umulhi(uint32_t a, uint32_t b) { return (uint32_t)(((uint64_t)a * b) >> 32); }
// f64 → f32 rounding toward zero.
inline float __double2float_rz(double d) {
    float f = (float)d;
    if (std::fabs((double)f) > std::fabs(d)) f = std::nextafter(f, 0.0f);
    return f;
}
// Warp shuffles have no serial meaning: a kernel that needs one aborts.
inline float __shfl_xor_sync(unsigned, float, int) { std::abort(); }
inline void __syncthreads() { std::abort(); }

// IEEE binary16 through GCC's _Float16 (correctly rounded, nearest even).
inline float kiln_host_f16_to_f32(uint16_t h) { _Float16 x; std::memcpy(&x, &h, 2); return (float)x; }
inline uint16_t kiln_host_f32_to_f16(float f) { _Float16 x = (_Float16)f; uint16_t h; std::memcpy(&h, &x, 2); return h; }

// Runs `kernel(args...)` for every thread of a 1-D grid, in order.
template <class Kernel, class... Args>
void kiln_launch(unsigned grid, unsigned block, Kernel kernel, Args... args) {
    gridDim = {grid, 1, 1};
    blockDim = {block, 1, 1};
    for (unsigned b = 0; b < grid; ++b)
        for (unsigned t = 0; t < block; ++t) {
            blockIdx = {b, 0, 0};
            threadIdx = {t, 0, 0};
            kernel(args...);
        }
}
