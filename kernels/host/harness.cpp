// Runs kiln's grid-stride CUDA kernels on the CPU (see shim.h) for
// crates/kiln-cuda/tests/host_emulation.rs, which compares them with the
// CPU backend bit for bit. Values travel as decimal bit patterns.
//
//   harness random uniform|normal SEED OFFSET N DTYPE P1 P2
//   harness copy SRC_DTYPE DST_DTYPE SRC_LEN RANK OFFSET DIMS... STRIDES...   (stdin: source)
//   harness pool PLANES H W KH KW SH SW PT PL OH OW                           (stdin: x, dy)
//   harness unary OP N | unary_backward OP N | binary OP N | affine N MUL ADD  (stdin: operands)
//   harness adam N LR_T BETA1 BETA2 EPS DECAY L2                              (stdin: p, g, m, v)
//   harness sgd N LR MOMENTUM WEIGHT_DECAY NESTEROV                            (stdin: p, g, velocity)
//   harness reduce OP ROWS RUN | argmax ROWS RUN | softmax LOG ROWS C          (stdin: x)
//   harness xent ROWS C                                                        (stdin: logits, labels)
//   harness gemm|gemm_tc DTYPE BATCH M N K (OFF BS RS CS LEN)×2 ALPHA BETA ACT OUT_DTYPE HAS_BIAS HAS_C0
//       (gemm_tc: the tensor-core kernel of DTYPE, f32 meaning TF32; contiguous operands)
//                                                                  (stdin: A, B[, bias][, C0])
//   harness conv|conv_data|conv_filter N C H W O KH KW SH SW PT PL OH OW X1 X2
//       conv: X1 = activation, X2 = has bias (stdin: x, w[, bias]); conv_data (stdin: dy, w);
//       conv_filter: X1 = split-K chunk (stdin: x, dy)
#include <cstdio>
#include <string>
#include <vector>

#include "shim.h"
#include "../conv.cu"
#include "../elementwise.cu"
#include "../gemm_simt.cu"
#include "../gemm_tc.cu"
#include "../memory.cu"
#include "../optim.cu"
#include "../pool.cu"
#include "../random.cu"
#include "../reduce.cu"
#include "../softmax.cu"

static unsigned grid_for(i64 n) {
    // Few blocks, so the grid-stride loops take more than one lap.
    i64 blocks = (n + 255) / 256;
    return (unsigned)(blocks < 1 ? 1 : blocks > 3 ? 3 : blocks);
}

static size_t width(int dtype) { return dtype == KILN_F16 || dtype == KILN_BF16 ? 2 : 4; }

static std::vector<unsigned char> read_bits(size_t n, int dtype) {
    std::vector<unsigned char> out(n * width(dtype));
    for (size_t i = 0; i < n; ++i) {
        unsigned long long v;
        if (std::scanf("%llu", &v) != 1) std::exit(3);
        if (width(dtype) == 2) {
            uint16_t h = (uint16_t)v;
            std::memcpy(&out[i * 2], &h, 2);
        } else {
            uint32_t w = (uint32_t)v;
            std::memcpy(&out[i * 4], &w, 4);
        }
    }
    return out;
}

static void print_bits(const void* p, size_t n, int dtype) {
    for (size_t i = 0; i < n; ++i) {
        if (width(dtype) == 2) {
            uint16_t h;
            std::memcpy(&h, (const char*)p + i * 2, 2);
            std::printf("%u\n", (unsigned)h);
        } else {
            uint32_t w;
            std::memcpy(&w, (const char*)p + i * 4, 4);
            std::printf("%u\n", w);
        }
    }
}

int main(int argc, char** argv) {
    if (argc < 2) return 2;
    std::string mode = argv[1];
    auto arg = [&](int i) { return std::strtoll(argv[i], nullptr, 10); };
    if (mode == "random") {
        bool uniform = std::string(argv[2]) == "uniform";
        u64 seed = std::strtoull(argv[3], nullptr, 10), offset = std::strtoull(argv[4], nullptr, 10);
        i64 n = arg(5);
        int dtype = (int)arg(6);
        double p1 = std::strtod(argv[7], nullptr), p2 = std::strtod(argv[8], nullptr);
        std::vector<unsigned char> out(n * width(dtype) + 1);
        if (uniform) kiln_launch(grid_for(n), 256, kiln_uniform, (void*)out.data(), dtype, n, seed, offset, p1, p2);
        else kiln_launch(grid_for(n), 256, kiln_normal, (void*)out.data(), dtype, n, seed, offset, p1, p2);
        print_bits(out.data(), n, dtype);
    } else if (mode == "copy") {
        int sd = (int)arg(2), dd = (int)arg(3);
        i64 len = arg(4);
        Strided view{};
        view.rank = (int)arg(5);
        view.offset = arg(6);
        i64 n = 1;
        for (int d = 0; d < KILN_MAX_RANK; ++d) { view.dims[d] = 1; view.strides[d] = 0; }
        for (int d = 0; d < view.rank; ++d) {
            view.dims[d] = arg(7 + d);
            view.strides[d] = arg(7 + view.rank + d);
            n *= view.dims[d];
        }
        Strided dst{};
        dst.rank = 1;
        for (int d = 0; d < KILN_MAX_RANK; ++d) { dst.dims[d] = 1; dst.strides[d] = 0; }
        dst.dims[0] = n;
        dst.strides[0] = 1;
        auto src = read_bits(len, sd);
        std::vector<unsigned char> out(n * width(dd) + 1);
        kiln_launch(grid_for(n), 256, kiln_copy, (const void*)src.data(), sd, view, (void*)out.data(), dd, dst, n);
        print_bits(out.data(), n, dd);
    } else if (mode == "pool") {
        PoolArg p{arg(2), arg(3), arg(4), arg(5), arg(6), arg(7), arg(8), arg(9), arg(10), arg(11), arg(12)};
        auto x = read_bits(p.planes * p.h * p.w, KILN_F32);
        auto dy = read_bits(p.planes * p.oh * p.ow, KILN_F32);
        i64 cells = p.planes * p.oh * p.ow, in_cells = p.planes * p.h * p.w;
        std::vector<float> y(cells + 1);
        std::vector<u32> at(cells + 1);
        std::vector<float> dx(in_cells + 1);
        kiln_launch(grid_for(cells), 256, kiln_max_pool2d, (const float*)x.data(), (void*)y.data(), KILN_F32, at.data(), p);
        kiln_launch(grid_for(in_cells), 256, kiln_max_pool2d_backward, (const float*)dy.data(), (const u32*)at.data(),
                    (void*)dx.data(), KILN_F32, p);
        print_bits(y.data(), cells, KILN_F32);
        print_bits(at.data(), cells, KILN_U32);
        print_bits(dx.data(), in_cells, KILN_F32);
    } else if (mode == "unary" || mode == "unary_backward" || mode == "binary" || mode == "affine") {
        // Operands: one for unary and affine, x, y, dy for unary_backward, a, b for binary.
        int op = mode == "affine" ? 0 : (int)arg(2);
        i64 n = arg(3);
        int k = mode == "unary_backward" ? 3 : mode == "binary" ? 2 : 1;
        std::vector<std::vector<unsigned char>> in;
        for (int j = 0; j < k; ++j) in.push_back(read_bits(n, KILN_F32));
        auto f = [&](int j) { return (const float*)in[j].data(); };
        std::vector<float> out(n + 1);
        if (mode == "unary") kiln_launch(grid_for(n), 256, kiln_unary, f(0), out.data(), n, op);
        if (mode == "unary_backward")
            kiln_launch(grid_for(n), 256, kiln_unary_backward, f(0), f(1), f(2), out.data(), n, op);
        if (mode == "binary") kiln_launch(grid_for(n), 256, kiln_binary, f(0), f(1), out.data(), n, op);
        if (mode == "affine")
            kiln_launch(grid_for(n), 256, kiln_affine, f(0), out.data(), n, std::strtof(argv[4], nullptr),
                        std::strtof(argv[5], nullptr));
        print_bits(out.data(), n, KILN_F32);
    } else if (mode == "adam") {
        i64 n = arg(2);
        float c[6];
        for (int j = 0; j < 6; ++j) c[j] = std::strtof(argv[3 + j], nullptr);
        auto p = read_bits(n, KILN_F32), g = read_bits(n, KILN_F32), m = read_bits(n, KILN_F32),
             v = read_bits(n, KILN_F32);
        kiln_launch(grid_for(n), 256, kiln_adam, (float*)p.data(), (const float*)g.data(), (float*)m.data(),
                    (float*)v.data(), n, c[0], c[1], c[2], c[3], c[4], c[5]);
        print_bits(p.data(), n, KILN_F32);
        print_bits(m.data(), n, KILN_F32);
        print_bits(v.data(), n, KILN_F32);
    } else if (mode == "sgd") {
        i64 n = arg(2);
        float c[3];
        for (int j = 0; j < 3; ++j) c[j] = std::strtof(argv[3 + j], nullptr);
        auto p = read_bits(n, KILN_F32), g = read_bits(n, KILN_F32), vel = read_bits(n, KILN_F32);
        kiln_launch(grid_for(n), 256, kiln_sgd, (float*)p.data(), (const float*)g.data(), (float*)vel.data(),
                    n, c[0], c[1], c[2], (int)arg(6));
        print_bits(p.data(), n, KILN_F32);
        print_bits(vel.data(), n, KILN_F32);
    } else if (mode == "reduce" || mode == "argmax" || mode == "softmax") {
        int op = mode == "argmax" ? 0 : (int)arg(2);
        int base = mode == "argmax" ? 2 : 3;
        i64 rows = arg(base), run = arg(base + 1);
        auto x = read_bits(rows * run, KILN_F32);
        const float* xp = (const float*)x.data();
        unsigned grid = (unsigned)(rows < 1 ? 1 : rows > 65535 ? 65535 : rows);
        if (mode == "reduce") {
            std::vector<float> y(rows + 1);
            kiln_launch_blocks({grid, 1, 1}, 256, kiln_reduce_rows, xp, y.data(), rows, run, op);
            print_bits(y.data(), rows, KILN_F32);
        } else if (mode == "argmax") {
            std::vector<u32> y(rows + 1);
            kiln_launch_blocks({grid, 1, 1}, 256, kiln_argmax_rows, xp, y.data(), rows, run);
            print_bits(y.data(), rows, KILN_U32);
        } else {
            std::vector<float> y(rows * run + 1);
            kiln_launch_blocks({grid, 1, 1}, 256, kiln_softmax_rows, xp, y.data(), rows, run, op);
            print_bits(y.data(), rows * run, KILN_F32);
        }
    } else if (mode == "xent") {
        i64 rows = arg(2), c = arg(3);
        auto x = read_bits(rows * c, KILN_F32);
        auto labels = read_bits(rows, KILN_U32);
        std::vector<float> loss(rows + 1), grad(rows * c + 1);
        unsigned grid = (unsigned)(rows < 1 ? 1 : rows);
        u64 bad = 0;
        kiln_launch_blocks({grid, 1, 1}, 256, kiln_softmax_xent, (const float*)x.data(), (const u32*)labels.data(),
                           loss.data(), grad.data(), rows, c, &bad);
        if (bad != 0) return 4;
        print_bits(loss.data(), rows, KILN_F32);
        print_bits(grad.data(), rows * c, KILN_F32);
    } else if (mode == "gemm" || mode == "gemm_tc") {
        int dtype = (int)arg(2);
        i64 batch = arg(3), m = arg(4), n = arg(5), k = arg(6);
        MatrixArg a{nullptr, dtype, 0, arg(7), arg(8), arg(9), arg(10)};
        i64 alen = arg(11);
        MatrixArg b{nullptr, dtype, 0, arg(12), arg(13), arg(14), arg(15)};
        i64 blen = arg(16);
        float alpha = std::strtof(argv[17], nullptr), beta = std::strtof(argv[18], nullptr);
        int act = (int)arg(19), out_dtype = (int)arg(20);
        bool has_bias = arg(21) != 0, has_c0 = arg(22) != 0;
        auto ad = read_bits(alen, dtype), bd = read_bits(blen, dtype);
        std::vector<unsigned char> bias, c0;
        if (has_bias) bias = read_bits(n, KILN_F32);
        if (has_c0) c0 = read_bits(batch * m * n, KILN_F32);
        a.data = ad.data();
        b.data = bd.data();
        std::vector<unsigned char> out(batch * m * n * width(out_dtype) + 4);
        EpilogueArg ep{out.data(), has_c0 ? (const float*)c0.data() : nullptr,
                       has_bias ? (const float*)bias.data() : nullptr, alpha, beta, act, out_dtype, m, n};
        KilnDim3 grid{(unsigned)((n + 127) / 128), (unsigned)((m + 127) / 128), (unsigned)batch};
        if (m > 0 && n > 0 && batch > 0) {
            if (mode == "gemm") {
                kiln_launch_blocks(grid, 256, kiln_gemm_simt, a, b, ep, m, n, k);
            } else if (dtype == KILN_BF16) {  // contiguous row-major operands
                kiln_launch_blocks(grid, 256, kiln_gemm_bf16, (const u16*)ad.data(), (const u16*)bd.data(), ep, m, n, k);
            } else if (dtype == KILN_F16) {
                kiln_launch_blocks(grid, 256, kiln_gemm_f16, (const u16*)ad.data(), (const u16*)bd.data(), ep, m, n, k);
            } else {
                kiln_launch_blocks(grid, 256, kiln_gemm_tf32, (const float*)ad.data(), (const float*)bd.data(), ep, m, n, k);
            }
        }
        print_bits(out.data(), batch * m * n, out_dtype);
    } else if (mode == "conv" || mode == "conv_data" || mode == "conv_filter") {
        ConvArg p{arg(2), arg(3), arg(4), arg(5), arg(6), arg(7), arg(8), arg(9), arg(10), arg(11), arg(12), arg(13), arg(14)};
        i64 x1 = arg(15), x2 = arg(16);
        i64 xs = p.n * p.c * p.h * p.w, ws = p.o * p.c * p.kh * p.kw, ys = p.n * p.o * p.oh * p.ow;
        auto tiles = [](i64 rows, i64 cols, i64 z) {
            return KilnDim3{(unsigned)((cols + 127) / 128), (unsigned)((rows + 127) / 128), (unsigned)z};
        };
        if (mode == "conv") {
            auto x = read_bits(xs, KILN_F32), w = read_bits(ws, KILN_F32);
            std::vector<unsigned char> bias;
            if (x2) bias = read_bits(p.o, KILN_F32);
            std::vector<float> y(ys + 1);
            if (ys > 0)
                kiln_launch_blocks(tiles(p.o, p.n * p.oh * p.ow, 1), 256, kiln_conv2d, (const float*)x.data(),
                                   (const float*)w.data(), x2 ? (const float*)bias.data() : nullptr, (int)x1,
                                   (void*)y.data(), KILN_F32, p);
            print_bits(y.data(), ys, KILN_F32);
        } else if (mode == "conv_data") {
            auto dy = read_bits(ys, KILN_F32), w = read_bits(ws, KILN_F32);
            std::vector<float> dx(xs + 1);
            if (xs > 0)
                kiln_launch(grid_for(xs), 256, kiln_conv2d_backward_data, (const float*)dy.data(),
                            (const float*)w.data(), (void*)dx.data(), KILN_F32, p);
            print_bits(dx.data(), xs, KILN_F32);
        } else {
            auto x = read_bits(xs, KILN_F32), dy = read_bits(ys, KILN_F32);
            i64 k = p.n * p.oh * p.ow, chunk = x1, cols = p.c * p.kh * p.kw;
            i64 slices = k > 0 ? (k + chunk - 1) / chunk : 1;
            std::vector<float> wsp(slices * ws + 1), dw(ws + 1);
            if (ws > 0) {
                kiln_launch_blocks(tiles(p.o, cols, slices), 256, kiln_conv2d_backward_filter, (const float*)x.data(),
                                   (const float*)dy.data(), wsp.data(), chunk, p);
                kiln_launch(grid_for(ws), 256, kiln_sum_splits, (const float*)wsp.data(), slices, ws,
                            (void*)dw.data(), KILN_F32);
            }
            print_bits(dw.data(), ws, KILN_F32);
        }
    } else {
        return 2;
    }
    return 0;
}
