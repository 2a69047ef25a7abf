// Elementwise kernels over contiguous f32 buffers (the host gathers other
// layouts and types first, and rounds the result once): unary maps and
// their gradients, the fused affine map, binary ops, and a binary op with
// a row broadcast over leading axes (a bias).
#include "common.cuh"

extern "C" __global__ void kiln_unary(const float* x, float* y, i64 n, int op) {
    GRID_STRIDE(i, n) y[i] = unary_f32(op, x[i]);
}

// dx = op'(x) · dy, written from y = op(x) where that is all it needs.
extern "C" __global__ void kiln_unary_backward(const float* x, const float* y, const float* dy,
                                               float* dx, i64 n, int op) {
    GRID_STRIDE(i, n) {
        float d = dy[i], r;
        switch (op) {
            case OP_NEG: r = -d; break;
            case OP_ABS: { float v = x[i]; r = v > 0.0f ? d : (v < 0.0f ? -d : 0.0f * d); break; }
            case OP_EXP: r = d * y[i]; break;
            case OP_LOG: r = d / x[i]; break;
            case OP_SQRT: r = d * 0.5f / y[i]; break;
            case OP_SQUARE: r = d * 2.0f * x[i]; break;
            case OP_RECIP: { float v = y[i]; r = -d * v * v; break; }
            case OP_RELU: r = y[i] > 0.0f ? d : 0.0f * d; break;
            case OP_SIGMOID: { float v = y[i]; r = d * v * (1.0f - v); break; }
            case OP_TANH: { float v = y[i]; r = d * (1.0f - v * v); break; }
            case OP_GELU: {
                float v = x[i];
                r = gelu_backward(v, sigmoid_f32(gelu_s(v)), d);
                break;
            }
            default: r = d;
        }
        dx[i] = r;
    }
}

extern "C" __global__ void kiln_affine(const float* x, float* y, i64 n, float mul, float add) {
    GRID_STRIDE(i, n) y[i] = fmaf(x[i], mul, add);
}

// Binary ops, numbered as kiln_core's BinaryOp.
#define B_ADD 0
#define B_SUB 1
#define B_MUL 2
#define B_DIV 3
#define B_MAX 4
#define B_MIN 5
#define B_EQ 6
#define B_GT 7
#define B_GE 8

__device__ __forceinline__ float binary_f32(int op, float a, float b) {
    switch (op) {
        case B_ADD: return a + b;
        case B_SUB: return a - b;
        case B_MUL: return a * b;
        case B_DIV: return a / b;
        case B_MAX: return nan_max(a, b);
        case B_MIN: return nan_min(a, b);
        case B_EQ: return a == b ? 1.0f : 0.0f;
        case B_GT: return a > b ? 1.0f : 0.0f;
        default: return a >= b ? 1.0f : 0.0f;
    }
}

extern "C" __global__ void kiln_binary(const float* a, const float* b, float* y, i64 n, int op) {
    GRID_STRIDE(i, n) y[i] = binary_f32(op, a[i], b[i]);
}

// y[i] = op(a[i], row[i % len]) — or op(row[..], a[i]) when `row_first`.
extern "C" __global__ void kiln_binary_row(const float* a, const float* row, float* y, i64 n,
                                           i64 len, int op, int row_first) {
    GRID_STRIDE(i, n) {
        float r = row[i % len];
        y[i] = row_first ? binary_f32(op, r, a[i]) : binary_f32(op, a[i], r);
    }
}
