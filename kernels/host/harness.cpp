// Runs kiln's grid-stride CUDA kernels on the CPU (see shim.h) for
// crates/kiln-cuda/tests/host_emulation.rs, which compares them with the
// CPU backend bit for bit. Values travel as decimal bit patterns.
//
//   harness random uniform|normal SEED OFFSET N DTYPE P1 P2
//   harness copy SRC_DTYPE DST_DTYPE SRC_LEN RANK OFFSET DIMS... STRIDES...   (stdin: source)
//   harness pool PLANES H W KH KW SH SW PT PL OH OW                           (stdin: x, dy)
#include <cstdio>
#include <string>
#include <vector>

#include "shim.h"
#include "../memory.cu"
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
    } else {
        return 2;
    }
    return 0;
}
