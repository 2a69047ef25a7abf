// Causal scaled-dot-product attention over f32 operands (the host widens
// f16/bf16 first and rounds the results once): `batch` problems of
// queries [T, D], keys and values [S, D], S ≥ T, query i of a problem
// seeing keys 0..=i + S − T. Problem b = e·heads + h is head h of example
// e: its rows are read where an AttentionRows puts them (heads side by
// side in a row, as a fused projection holds them; rows and examples any
// distance apart) and its results written into rows `heads·D` wide, the
// heads merged. One block per query row (grid-stride over the batch·T
// problem rows) for the forward pass and the queries' gradients, one per
// key row for the keys' and values' gradients. A row's scores live in
// this block's slice of a workspace (S floats, 2·S backward), never the
// [batch, T, S] probabilities; every sum has one owner and a fixed order —
// no atomics, so results repeat bit for bit. Dropout on the probabilities
// (kiln_core::AttentionDropout) draws weight (r, j)'s factor — element
// r·S + j of the Philox stream (seed, offset), r = b·T + i the problem
// row — where the weight is used, forward and backward; rate 0 draws
// nothing.
#include "common.cuh"

// Where an operand's rows lie: row i of problem b = e·heads + h starts
// `e·example + h·d + i·row` floats in (kiln_core::AttentionPlan::row_start
// for any strides). Contiguous one-head operands have example = rows·d and
// row = d; the results, heads merged, example = rows·heads·d and
// row = heads·d.
struct AttentionRows {
    i64 example;
    i64 row;
};

// Row i of problem b of an operand laid out as `at`, `heads` heads `d` wide.
__device__ __forceinline__ i64 attention_row(AttentionRows at, i64 heads, i64 d, i64 b, i64 i) {
    return (b / heads) * at.example + (b % heads) * d + i * at.row;
}

// The results' rows: `rows` rows per problem, its example's heads side by
// side in each.
__device__ __forceinline__ i64 merged_row(i64 heads, i64 rows, i64 d, i64 b, i64 i) {
    AttentionRows at = {rows * heads * d, heads * d};
    return attention_row(at, heads, d, b, i);
}

// Query `q`'s scores against the first `seen` keys (rows of `k`, `d`
// wide, `row` apart), scaled, into `scores`; returns their max and
// Σ exp(s − max) in every thread.
__device__ void attention_scores(const float* q, const float* k, i64 row, float* scores, i64 seen,
                                 i64 d, float scale, float* scratch, float* max_out,
                                 float* sum_out) {
    for (i64 j = threadIdx.x; j < seen; j += blockDim.x) {
        const float* kj = k + j * row;
        float s = 0.0f;
        for (i64 p = 0; p < d; ++p) s = fmaf(q[p], kj[p], s);
        scores[j] = s * scale;
    }
    __syncthreads();
    row_stats(scores, seen, scratch, max_out, sum_out);
}

// Problem row r's dropped probabilities P̃ = P∘M over the keys it sees,
// in `p` (its block's workspace); returns how many it sees.
__device__ i64 attention_probabilities(const float* q, AttentionRows qa, const float* k,
                                       AttentionRows ka, float* p, i64 r, i64 heads, i64 queries,
                                       i64 keys, i64 d, float scale, Dropout drop, float* scratch) {
    i64 b = r / queries, i = r % queries, seen = i + keys - queries + 1;
    float m, l;
    attention_scores(q + attention_row(qa, heads, d, b, i), k + attention_row(ka, heads, d, b, 0),
                     ka.row, p, seen, d, scale, scratch, &m, &l);
    for (i64 j = threadIdx.x; j < seen; j += blockDim.x)
        p[j] = expf(p[j] - m) / l * drop.factor((u64)(r * keys + j));
    __syncthreads();
    return seen;
}

// y[r] = Σⱼ P̃ᵣⱼ·v[j], keys ascending.
extern "C" __global__ void kiln_attention_causal(const float* q, AttentionRows qa, const float* k,
                                                 AttentionRows ka, const float* v, AttentionRows va,
                                                 float* y, float* work, i64 batch, i64 heads,
                                                 i64 queries, i64 keys, i64 d, float scale,
                                                 u64 seed, u64 offset, float rate, float keep) {
    __shared__ float scratch[32];
    Dropout drop = {seed, offset, rate, keep};
    float* p = work + (i64)blockIdx.x * keys;
    for (i64 r = blockIdx.x; r < batch * queries; r += gridDim.x) {
        i64 seen = attention_probabilities(q, qa, k, ka, p, r, heads, queries, keys, d, scale, drop,
                                           scratch);
        i64 b = r / queries;
        const float* vb = v + attention_row(va, heads, d, b, 0);
        float* yr = y + merged_row(heads, queries, d, b, r % queries);
        for (i64 c = threadIdx.x; c < d; c += blockDim.x) {
            float acc = 0.0f;
            for (i64 j = 0; j < seen; ++j) acc = fmaf(p[j], vb[j * va.row + c], acc);
            yr[c] = acc;
        }
        __syncthreads();
    }
}

// Per query row r: the probabilities P, dP = (dy·vᵀ)∘M, δᵣ = Σⱼ PⱼdPⱼ
// (kept in `delta` for the key kernel, with the row's max and sum of
// exponentials as `stats`), dS = P∘(dP − δ) and dq[r] = scale·Σⱼ dSⱼ·k[j].
extern "C" __global__ void kiln_attention_causal_backward_q(
    const float* q, AttentionRows qa, const float* k, AttentionRows ka, const float* v,
    AttentionRows va, const float* dy, AttentionRows dya, float* dq, float* stats, float* work,
    i64 batch, i64 heads, i64 queries, i64 keys, i64 d, float scale, u64 seed, u64 offset,
    float rate, float keep) {
    __shared__ float scratch[32];
    Dropout drop = {seed, offset, rate, keep};
    float* p = work + (i64)blockIdx.x * 2 * keys;
    float* ds = p + keys;
    for (i64 r = blockIdx.x; r < batch * queries; r += gridDim.x) {
        i64 b = r / queries, i = r % queries, seen = i + keys - queries + 1;
        const float* kb = k + attention_row(ka, heads, d, b, 0);
        const float* vb = v + attention_row(va, heads, d, b, 0);
        const float* g = dy + attention_row(dya, heads, d, b, i);
        float m, l;
        attention_scores(q + attention_row(qa, heads, d, b, i), kb, ka.row, p, seen, d, scale,
                         scratch, &m, &l);
        float delta = 0.0f;
        for (i64 j = threadIdx.x; j < seen; j += blockDim.x) {
            p[j] = expf(p[j] - m) / l;
            float dp = 0.0f;
            for (i64 c = 0; c < d; ++c) dp = fmaf(g[c], vb[j * va.row + c], dp);
            dp *= drop.factor((u64)(r * keys + j));
            ds[j] = dp;
            delta += p[j] * dp;
        }
        delta = block_fold(delta, 0.0f, scratch, [](float w) { return warp_sum(w); });
        for (i64 j = threadIdx.x; j < seen; j += blockDim.x) ds[j] = p[j] * (ds[j] - delta);
        if (threadIdx.x == 0) {
            stats[3 * r] = m;
            stats[3 * r + 1] = l;
            stats[3 * r + 2] = delta;
        }
        __syncthreads();
        float* dqr = dq + merged_row(heads, queries, d, b, i);
        for (i64 c = threadIdx.x; c < d; c += blockDim.x) {
            float acc = 0.0f;
            for (i64 j = 0; j < seen; ++j) acc = fmaf(ds[j], kb[j * ka.row + c], acc);
            dqr[c] = acc * scale;
        }
        __syncthreads();
    }
}

// Queries handled per step of the key kernel: their P and dS in shared
// memory, then summed in query order by the thread owning each column.
#define ATTENTION_TILE 32

// Per key row (b, j): dk[j] = scale·Σᵢ dSᵢⱼ·q[i] and dv[j] = Σᵢ P̃ᵢⱼ·dy[i]
// over the queries that see key j, ascending, each Pᵢⱼ, its factor and
// dSᵢⱼ recomputed from the row statistics the query kernel kept.
extern "C" __global__ void kiln_attention_causal_backward_kv(
    const float* q, AttentionRows qa, const float* k, AttentionRows ka, const float* v,
    AttentionRows va, const float* dy, AttentionRows dya, const float* stats, float* dk, float* dv,
    i64 batch, i64 heads, i64 queries, i64 keys, i64 d, float scale, u64 seed, u64 offset,
    float rate, float keep) {
    Dropout drop = {seed, offset, rate, keep};
    __shared__ float tile_p[ATTENTION_TILE];
    __shared__ float tile_ds[ATTENTION_TILE];
    for (i64 row = blockIdx.x; row < batch * keys; row += gridDim.x) {
        i64 b = row / keys, j = row % keys;
        i64 first = j > keys - queries ? j - (keys - queries) : 0;
        const float* kj = k + attention_row(ka, heads, d, b, j);
        const float* vj = v + attention_row(va, heads, d, b, j);
        // The problem's first query and output row; query i's rows are
        // i·qa.row and i·dya.row further.
        const float* qb = q + attention_row(qa, heads, d, b, 0);
        const float* gb = dy + attention_row(dya, heads, d, b, 0);
        float* dkj = dk + merged_row(heads, keys, d, b, j);
        float* dvj = dv + merged_row(heads, keys, d, b, j);
        for (i64 c = threadIdx.x; c < d; c += blockDim.x) {
            dkj[c] = 0.0f;
            dvj[c] = 0.0f;
        }
        for (i64 i0 = first; i0 < queries; i0 += ATTENTION_TILE) {
            i64 n = queries - i0 < ATTENTION_TILE ? queries - i0 : ATTENTION_TILE;
            if (threadIdx.x < n) {
                i64 i = i0 + threadIdx.x, r = b * queries + i;
                const float *qi = qb + i * qa.row, *g = gb + i * dya.row;
                float s = 0.0f, dp = 0.0f;
                for (i64 c = 0; c < d; ++c) {
                    s = fmaf(qi[c], kj[c], s);
                    dp = fmaf(g[c], vj[c], dp);
                }
                float pij = expf(s * scale - stats[3 * r]) / stats[3 * r + 1];
                float f = drop.factor((u64)(r * keys + j));
                tile_p[threadIdx.x] = pij * f;
                tile_ds[threadIdx.x] = pij * (dp * f - stats[3 * r + 2]);
            }
            __syncthreads();
            for (i64 c = threadIdx.x; c < d; c += blockDim.x) {
                float ak = dkj[c], av = dvj[c];
                for (i64 t = 0; t < n; ++t) {
                    i64 i = i0 + t;
                    ak = fmaf(tile_ds[t], qb[i * qa.row + c], ak);
                    av = fmaf(tile_p[t], gb[i * dya.row + c], av);
                }
                dkj[c] = ak;
                dvj[c] = av;
            }
            __syncthreads();
        }
        for (i64 c = threadIdx.x; c < d; c += blockDim.x) dkj[c] *= scale;
        __syncthreads();
    }
}
