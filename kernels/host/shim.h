// Runs kiln's CUDA kernels on the CPU for tests on machines without a GPU
// (crates/kiln-cuda/tests/host_emulation.rs): the CUDA keywords become
// plain C++ and the few intrinsics get exact software versions. Grid-stride
// kernels run serially (`kiln_launch`); block-wide kernels run each block's
// threads as real threads (`kiln_launch_blocks`), with __syncthreads a
// barrier, __shared__ a static (blocks run one after another) and warp
// shuffles exchanged through a slot per thread between two barriers — so
// every thread of a block must reach each shuffle, as kiln's kernels do.
// The tensor-core primitives (inline PTX on the GPU) have software versions
// in tc_emulation.h.
#pragma once
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <math.h>
#include <thread>
#include <vector>

#define KILN_HOST 1
#define __global__
#define __device__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(x)

#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

struct KilnDim3 {
    unsigned x = 0, y = 0, z = 0;
};
inline thread_local KilnDim3 threadIdx, blockIdx;
inline KilnDim3 blockDim, gridDim;
inline thread_local std::barrier<>* kiln_block_barrier = nullptr;
inline float kiln_shuffle_slots[1024];

struct alignas(16) float4 {
    float x, y, z, w;
};

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
// Only under kiln_launch_blocks (a serial launch has no block to wait for).
inline void __syncthreads() {
    if (!kiln_block_barrier) std::abort();
    kiln_block_barrier->arrive_and_wait();
}
inline float __shfl_xor_sync(unsigned, float v, int lane_mask) {
    unsigned t = threadIdx.x;
    kiln_shuffle_slots[t] = v;
    __syncthreads();
    float r = kiln_shuffle_slots[t ^ (unsigned)lane_mask];
    __syncthreads();
    return r;
}

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

// Runs `kernel(args...)` on a grid of blocks, one block at a time, each
// block's `block` threads concurrently.
template <class Kernel, class... Args>
void kiln_launch_blocks(KilnDim3 grid, unsigned block, Kernel kernel, Args... args) {
    gridDim = grid;
    blockDim = {block, 1, 1};
    for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
            for (unsigned x = 0; x < grid.x; ++x) {
                std::barrier<> bar((std::ptrdiff_t)block);
                std::vector<std::thread> threads;
                for (unsigned t = 0; t < block; ++t)
                    threads.emplace_back([&, t] {
                        blockIdx = {x, y, z};
                        threadIdx = {t, 0, 0};
                        kiln_block_barrier = &bar;
                        kernel(args...);
                    });
                for (auto& th : threads) th.join();
            }
}
