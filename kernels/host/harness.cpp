// Runs kiln's grid-stride CUDA kernels on the CPU (see shim.h) for
// crates/kiln-cuda/tests/host_emulation.rs, which compares them with the
// CPU backend bit for bit. Values travel as decimal bit patterns.
//
//   harness random uniform|normal SEED OFFSET N DTYPE P1 P2
//   harness copy SRC_DTYPE DST_DTYPE SRC_LEN RANK OFFSET DIMS... STRIDES...   (stdin: source)
//   harness pool PLANES H W KH KW SH SW PT PL OH OW                           (stdin: x, dy)
//   harness unary OP N | unary_backward OP N | binary OP N | affine N MUL ADD  (stdin: operands)
//   harness adam N LR_T BETA1 BETA2 EPS DECAY L2                              (stdin: p, g, m, v)
#include <cstdio>
#include <string>
#include <vector>

#include "shim.h"
#include "../elementwise.cu"
#include "../memory.cu"
#include "../optim.cu"
#include "../pool.cu"
#include "../random.cu"

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
    } else {
        return 2;
    }
    return 0;
}
