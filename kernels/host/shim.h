// Runs kiln's CUDA kernels on the CPU for machines without a GPU (the
// emulated device of crates/kiln-cuda/src/emulator.rs, through
// emulator.cpp, and the harness of tests/host_emulation.rs): the CUDA
// keywords become plain C++ and the few intrinsics get exact software
// versions. Grid-stride kernels run serially (`kiln_launch_serial`);
// block-wide kernels run each block's threads as fibers on one OS thread
// (`kiln_launch_blocks`), with __syncthreads a switch back to the block's
// scheduler, __shared__ a static (blocks run one after another) and warp
// shuffles exchanged through a slot per thread between two barriers — so
// every thread of a block must reach each barrier, as CUDA requires; a
// block whose threads do not (some finished, some waiting) aborts.
// The tensor-core primitives (inline PTX on the GPU) have software versions
// in tc_emulation.h.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <math.h>
#include <cstdio>
#include <functional>
#include <memory>
#include <ucontext.h>
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
inline thread_local KilnDim3 threadIdx, blockIdx, blockDim, gridDim;

// A fiber's saved context, made by kiln_context_init and switched by
// kiln_context_switch. On x86-64 a switch saves only what the ABI says a
// call preserves (6 registers, MXCSR and the x87 control word), without
// ucontext's signal-mask system call; elsewhere it is ucontext.
#if defined(__x86_64__)
struct KilnContext {
    void* sp = nullptr;
};
extern "C" void kiln_fiber_switch(void** save_sp, void* load_sp);
asm(R"(
    .text
    .p2align 4
    .globl kiln_fiber_switch
    .hidden kiln_fiber_switch
    .type kiln_fiber_switch, @function
kiln_fiber_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size kiln_fiber_switch, .-kiln_fiber_switch
)");
// A context that starts `entry` (which must never return) on `stack`.
inline void kiln_context_init(KilnContext& c, char* stack, size_t size, void (*entry)()) {
    uintptr_t top = ((uintptr_t)(stack + size)) & ~(uintptr_t)15;
    void** sp = (void**)top;
    *--sp = nullptr;         // alignment: `entry` starts as if called
    *--sp = (void*)entry;    // kiln_fiber_switch's `ret` goes here
    for (int r = 0; r < 6; ++r) *--sp = nullptr;  // rbp, rbx, r12–r15
    *--sp = (void*)(uintptr_t)(0x037Full << 32 | 0x1F80u);  // x87 CW, MXCSR defaults
    c.sp = sp;
}
inline void kiln_context_switch(KilnContext& save, KilnContext& load) { kiln_fiber_switch(&save.sp, load.sp); }
#else
struct KilnContext {
    ucontext_t uc;
};
inline void kiln_context_init(KilnContext& c, char* stack, size_t size, void (*entry)()) {
    getcontext(&c.uc);
    c.uc.uc_stack.ss_sp = stack;
    c.uc.uc_stack.ss_size = size;
    c.uc.uc_link = nullptr;
    makecontext(&c.uc, entry, 0);
}
inline void kiln_context_switch(KilnContext& save, KilnContext& load) { swapcontext(&save.uc, &load.uc); }
#endif

// The threads of the block being run, as fibers.
struct KilnFibers {
    KilnContext scheduler;
    std::vector<KilnContext> threads;
    std::vector<std::unique_ptr<char[]>> stacks;
    std::vector<bool> done;
    const std::function<void()>* body = nullptr;
    unsigned current = 0;
};
inline thread_local KilnFibers* kiln_fibers = nullptr;
// This OS thread's fibers, reused by every block-wide launch on it.
inline KilnFibers& kiln_fiber_pool() {
    static thread_local KilnFibers pool;
    return pool;
}
inline thread_local float kiln_shuffle_slots[1024];

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
    if (!kiln_fibers) {
        std::fprintf(stderr, "kiln host emulation: __syncthreads in a kernel launched serially\n");
        std::abort();
    }
    kiln_context_switch(kiln_fibers->threads[kiln_fibers->current], kiln_fibers->scheduler);
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

// Runs `kernel(args...)` for every thread of `grid` × `block`, one after
// another: for grid-stride kernels, which never wait for each other.
template <class Kernel, class... Args>
void kiln_launch_serial(KilnDim3 grid, unsigned block, Kernel kernel, Args... args) {
    gridDim = grid;
    blockDim = {block, 1, 1};
    for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
            for (unsigned x = 0; x < grid.x; ++x)
                for (unsigned t = 0; t < block; ++t) {
                    blockIdx = {x, y, z};
                    threadIdx = {t, 0, 0};
                    kernel(args...);
                }
}

// A 1-D serial launch (the harness's shorthand).
template <class Kernel, class... Args>
void kiln_launch(unsigned grid, unsigned block, Kernel kernel, Args... args) {
    kiln_launch_serial(KilnDim3{grid, 1, 1}, block, kernel, args...);
}

// A fiber's body: the kernel, then back to the scheduler for good.
inline void kiln_fiber_entry() {
    KilnFibers* f = kiln_fibers;
    unsigned t = f->current;
    (*f->body)();
    f->done[t] = true;
    kiln_context_switch(f->threads[t], f->scheduler);
    std::abort();  // a finished fiber is never resumed
}

// Bytes of stack per emulated thread (kiln's kernels keep small register
// tiles; 256 threads take 16 MiB).
constexpr size_t KILN_FIBER_STACK = 64 << 10;

// Runs `kernel(args...)` on a grid of blocks, one block at a time, each
// block's `block` threads as fibers switched at every __syncthreads: each
// round resumes every thread once, so a round ends when all of them have
// reached the same barrier.
template <class Kernel, class... Args>
void kiln_launch_blocks(KilnDim3 grid, unsigned block, Kernel kernel, Args... args) {
    if (block == 0 || block > 1024) std::abort();
    gridDim = grid;
    blockDim = {block, 1, 1};
    // The fibers' stacks stay allocated for the OS thread's lifetime: a
    // launch must not pay for mapping 16 MiB.
    KilnFibers& fibers = kiln_fiber_pool();
    if (fibers.threads.size() < block) {
        fibers.threads.resize(block);
        fibers.done.resize(block);
        while (fibers.stacks.size() < block) fibers.stacks.emplace_back(new char[KILN_FIBER_STACK]);
    }
    std::function<void()> body = [&] { kernel(args...); };
    fibers.body = &body;
    if (kiln_fibers) std::abort();  // no launches from inside a kernel
    kiln_fibers = &fibers;
    for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
            for (unsigned x = 0; x < grid.x; ++x) {
                blockIdx = {x, y, z};
                for (unsigned t = 0; t < block; ++t) {
                    kiln_context_init(fibers.threads[t], fibers.stacks[t].get(), KILN_FIBER_STACK, kiln_fiber_entry);
                    fibers.done[t] = false;
                }
                for (;;) {
                    for (unsigned t = 0; t < block; ++t) {
                        if (fibers.done[t]) continue;
                        fibers.current = t;
                        threadIdx = {t, 0, 0};
                        kiln_context_switch(fibers.scheduler, fibers.threads[t]);
                    }
                    unsigned done = 0;
                    for (unsigned t = 0; t < block; ++t) done += fibers.done[t];
                    if (done == block) break;
                    if (done != 0) {
                        std::fprintf(stderr,
                                     "kiln host emulation: block (%u, %u, %u): %u of %u threads finished while "
                                     "the others wait at __syncthreads\n",
                                     x, y, z, done, block);
                        std::abort();
                    }
                }
            }
    kiln_fibers = nullptr;
}
