// f32 SIMT GEMM (the tiled SGEMM of simt_gemm.cuh) over strided operands
// of any float type, with the fused epilogue; one grid z-slice per batch.
#include "simt_gemm.cuh"

extern "C" __global__ void __launch_bounds__(SG_THREADS)
kiln_gemm_simt(MatrixArg a, MatrixArg b, EpilogueArg ep, i64 m, i64 n, i64 k) {
    simt_gemm_tile(LoadMatrix{a}, LoadMatrix{b}, StoreMatrix{ep}, blockIdx.z, m, n, 0, k);
}
