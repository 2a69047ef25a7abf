// The emulated CUDA device's launch entry point: kiln's kernels compiled
// for the CPU (through shim.h), called with cuLaunchKernel's convention — a
// kernel name, a grid, a block, and one pointer per parameter — so that the
// Rust backend's own launch code (crates/kiln-cuda/src/emulator.rs) drives
// them exactly as it drives a GPU. Built by g++ as a shared library:
//
//   g++ -std=c++20 -O2 -fPIC -shared -I kernels kernels/host/emulator.cpp -o libkiln_cuda_host.so
//
// Launches are serialised (one device, one stream): the kernels' __shared__
// arrays are statics here.
#include <cstddef>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <type_traits>
#include <utility>

#include "shim.h"
#include "../conv.cu"
#include "../attention.cu"
#include "../elementwise.cu"
#include "../embedding.cu"
#include "../gemm_simt.cu"
#include "../gemm_tc.cu"
#include "../memory.cu"
#include "../norm.cu"
#include "../optim.cu"
#include "../pool.cu"
#include "../random.cu"
#include "../reduce.cu"
#include "../softmax.cu"

namespace {

using Runner = void (*)(KilnDim3 grid, unsigned block, void** args);

// Calls `kernel` with its parameters read through `args`, as
// cuLaunchKernel does: args[i] points to a value of parameter i's type.
template <bool Blocks, class... P, size_t... I>
void call(void (*kernel)(P...), KilnDim3 grid, unsigned block, void** args, std::index_sequence<I...>) {
    if constexpr (Blocks)
        kiln_launch_blocks(grid, block, kernel, *static_cast<std::decay_t<P>*>(args[I])...);
    else
        kiln_launch_serial(grid, block, kernel, *static_cast<std::decay_t<P>*>(args[I])...);
}

template <bool Blocks, class... P>
constexpr size_t arity(void (*)(P...)) {
    return sizeof...(P);
}

struct Entry {
    const char* name;
    size_t params;
    Runner run;
};

// SERIAL: grid-stride kernels; BLOCKS: kernels whose threads cooperate.
#define SERIAL(k) \
    Entry{#k, arity<false>(k), [](KilnDim3 g, unsigned b, void** a) { \
              call<false>(k, g, b, a, std::make_index_sequence<arity<false>(k)>{}); }}
#define BLOCKS(k) \
    Entry{#k, arity<true>(k), [](KilnDim3 g, unsigned b, void** a) { \
              call<true>(k, g, b, a, std::make_index_sequence<arity<true>(k)>{}); }}

const Entry KERNELS[] = {
    SERIAL(kiln_fill_b32),
    SERIAL(kiln_fill_b16),
    SERIAL(kiln_copy),
    SERIAL(kiln_unary),
    SERIAL(kiln_unary_backward),
    SERIAL(kiln_affine),
    SERIAL(kiln_binary),
    SERIAL(kiln_binary_row),
    BLOCKS(kiln_reduce_rows),
    SERIAL(kiln_reduce_short_rows),
    BLOCKS(kiln_argmax_rows),
    BLOCKS(kiln_softmax_rows),
    BLOCKS(kiln_softmax_xent),
    BLOCKS(kiln_softmax_causal),
    BLOCKS(kiln_attention_causal),
    BLOCKS(kiln_attention_causal_backward_q),
    BLOCKS(kiln_attention_causal_backward_kv),
    SERIAL(kiln_embedding),
    SERIAL(kiln_embedding_backward),
    BLOCKS(kiln_layer_norm),
    BLOCKS(kiln_layer_norm_backward_dx),
    SERIAL(kiln_layer_norm_backward_params),
    BLOCKS(kiln_gemm_simt),
    BLOCKS(kiln_gemm_bf16),
    BLOCKS(kiln_gemm_f16),
    BLOCKS(kiln_gemm_tf32),
    BLOCKS(kiln_conv2d),
    SERIAL(kiln_conv2d_backward_data),
    BLOCKS(kiln_conv2d_backward_filter),
    SERIAL(kiln_sum_splits),
    SERIAL(kiln_max_pool2d),
    SERIAL(kiln_max_pool2d_backward),
    SERIAL(kiln_sgd),
    SERIAL(kiln_adam),
    SERIAL(kiln_uniform),
    SERIAL(kiln_normal),
};

std::mutex device;

}  // namespace

// Runs kernel `name` on `grid` × `block` with `params` parameter pointers.
// Returns 0, or writes why not into `error` (NUL-terminated, at most
// `error_len` bytes) and returns 1.
extern "C" int kiln_host_launch(const char* name, const unsigned grid[3], const unsigned block[3],
                                unsigned shared_bytes, void** args, size_t params, char* error,
                                size_t error_len) {
    auto fail = [&](const char* fmt, auto... v) {
        if (error_len > 0) std::snprintf(error, error_len, fmt, v...);
        return 1;
    };
    for (const Entry& e : KERNELS) {
        if (std::strcmp(e.name, name) != 0) continue;
        if (params != e.params)
            return fail("%s takes %zu parameters, the launch passed %zu", name, e.params, params);
        if (block[1] != 1 || block[2] != 1 || block[0] == 0 || block[0] > 1024)
            return fail("%s: block (%u, %u, %u): kiln's kernels use 1-D blocks of 1..1024 threads", name,
                        block[0], block[1], block[2]);
        if (shared_bytes != 0) return fail("%s: dynamic shared memory is not emulated", name);
        if (grid[0] == 0 || grid[1] == 0 || grid[2] == 0 || grid[1] > 65535 || grid[2] > 65535)
            return fail("%s: grid (%u, %u, %u) is not a valid CUDA grid", name, grid[0], grid[1], grid[2]);
        for (size_t i = 0; i < params; ++i)
            if (!args[i]) return fail("%s: parameter %zu is a null pointer to its value", name, i);
        std::lock_guard<std::mutex> lock(device);
        e.run(KilnDim3{grid[0], grid[1], grid[2]}, block[0], args);
        return 0;
    }
    return fail("no kernel `%s` in the host emulation", name);
}

// The number of kernels and the name of kernel `i`, so the Rust side can
// check its table against this one.
extern "C" size_t kiln_host_kernels() { return sizeof(KERNELS) / sizeof(KERNELS[0]); }
extern "C" const char* kiln_host_kernel_name(size_t i) {
    return i < kiln_host_kernels() ? KERNELS[i].name : nullptr;
}
