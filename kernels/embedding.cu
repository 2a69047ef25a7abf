// Embedding lookups over f32 tables (the host widens f16/bf16 first and
// rounds the copy back, exactly): a row copy per id, and the backward
// scatter-add with one thread per column summing the positions in order —
// no atomics, so no result depends on scheduling. An id ≥ vocab makes its
// output row NaN (or is skipped by the backward pass) and writes
// 1 + its position to *bad, which the host reports at its next
// synchronisation.
#include "common.cuh"

extern "C" __global__ void kiln_embedding(const float* table, const u32* ids, float* out,
                                          i64 positions, i64 dim, i64 vocab, u64* bad) {
    // Rows of width 0 still have their ids checked: one thread a position.
    i64 width = dim > 0 ? dim : 1;
    GRID_STRIDE(i, positions * width) {
        i64 p = i / width, j = i - p * width;
        i64 id = ids[p];
        if (id >= vocab) *bad = (u64)p + 1;
        if (dim > 0) out[i] = id < vocab ? table[id * dim + j] : __int_as_float(0x7fc00000);
    }
}

// dtable (zeroed by the host) += dy rows, column j summed over the positions in order.
extern "C" __global__ void kiln_embedding_backward(const u32* ids, const float* dy, float* dtable,
                                                   i64 positions, i64 dim, i64 vocab, u64* bad) {
    // With rows of width 0, one thread still checks the ids.
    GRID_STRIDE(j, dim > 0 ? dim : 1) {
        for (i64 p = 0; p < positions; ++p) {
            i64 id = ids[p];
            if (id >= vocab) *bad = (u64)p + 1;
            else if (dim > 0) dtable[id * dim + j] += dy[p * dim + j];
        }
    }
}
