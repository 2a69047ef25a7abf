// Causal scaled-dot-product attention over contiguous f32 operands (the
// host widens f16/bf16 first and rounds the results once): queries
// [batch, T, D], keys and values [batch, S, D], S ≥ T, query i of a problem
// seeing keys 0..=i + S − T. One block per query row (grid-stride over the
// batch·T rows) for the forward pass and the queries' gradients, one per
// key row for the keys' and values' gradients. A row's scores live in
// this block's slice of a workspace (S floats, 2·S backward), never the
// [batch, T, S] probabilities; every sum has one owner and a fixed order —
// no atomics, so results repeat bit for bit. Dropout on the probabilities
// (kiln_core::AttentionDropout) draws weight (r, j)'s factor — element
// r·S + j of the Philox stream (seed, offset) — where the weight is used,
// forward and backward; rate 0 draws nothing.
#include "common.cuh"

// Query `q`'s scores against the first `seen` keys (rows of `k`, `d`
// wide), scaled, into `scores`; returns their max and Σ exp(s − max) in
// every thread.
__device__ void attention_scores(const float* q, const float* k, float* scores, i64 seen, i64 d,
                                 float scale, float* scratch, float* max_out, float* sum_out) {
    for (i64 j = threadIdx.x; j < seen; j += blockDim.x) {
        const float* kj = k + j * d;
        float s = 0.0f;
        for (i64 p = 0; p < d; ++p) s = fmaf(q[p], kj[p], s);
        scores[j] = s * scale;
    }
    __syncthreads();
    row_stats(scores, seen, scratch, max_out, sum_out);
}

// Query row r's dropped probabilities P̃ = P∘M over the keys it sees, in
// `p` (its block's workspace); returns how many it sees.
__device__ i64 attention_probabilities(const float* q, const float* k, float* p, i64 r, i64 queries,
                                       i64 keys, i64 d, float scale, Dropout drop, float* scratch) {
    i64 b = r / queries, seen = r % queries + keys - queries + 1;
    float m, l;
    attention_scores(q + r * d, k + b * keys * d, p, seen, d, scale, scratch, &m, &l);
    for (i64 j = threadIdx.x; j < seen; j += blockDim.x)
        p[j] = expf(p[j] - m) / l * drop.factor((u64)(r * keys + j));
    __syncthreads();
    return seen;
}

// y[r] = Σⱼ P̃ᵣⱼ·v[j], keys ascending.
extern "C" __global__ void kiln_attention_causal(const float* q, const float* k, const float* v,
                                                 float* y, float* work, i64 batch, i64 queries,
                                                 i64 keys, i64 d, float scale, u64 seed,
                                                 u64 offset, float rate, float keep) {
    __shared__ float scratch[32];
    Dropout drop = {seed, offset, rate, keep};
    float* p = work + (i64)blockIdx.x * keys;
    for (i64 r = blockIdx.x; r < batch * queries; r += gridDim.x) {
        i64 seen = attention_probabilities(q, k, p, r, queries, keys, d, scale, drop, scratch);
        const float* vb = v + (r / queries) * keys * d;
        for (i64 c = threadIdx.x; c < d; c += blockDim.x) {
            float acc = 0.0f;
            for (i64 j = 0; j < seen; ++j) acc = fmaf(p[j], vb[j * d + c], acc);
            y[r * d + c] = acc;
        }
        __syncthreads();
    }
}

// Per query row r: the probabilities P, dP = (dy·vᵀ)∘M, δᵣ = Σⱼ PⱼdPⱼ
// (kept in `delta` for the key kernel, with the row's max and sum of
// exponentials as `stats`), dS = P∘(dP − δ) and dq[r] = scale·Σⱼ dSⱼ·k[j].
extern "C" __global__ void kiln_attention_causal_backward_q(
    const float* q, const float* k, const float* v, const float* dy, float* dq, float* stats,
    float* work, i64 batch, i64 queries, i64 keys, i64 d, float scale, u64 seed, u64 offset,
    float rate, float keep) {
    __shared__ float scratch[32];
    Dropout drop = {seed, offset, rate, keep};
    float* p = work + (i64)blockIdx.x * 2 * keys;
    float* ds = p + keys;
    for (i64 r = blockIdx.x; r < batch * queries; r += gridDim.x) {
        i64 b = r / queries, seen = r % queries + keys - queries + 1;
        const float *kb = k + b * keys * d, *vb = v + b * keys * d, *g = dy + r * d;
        float m, l;
        attention_scores(q + r * d, kb, p, seen, d, scale, scratch, &m, &l);
        float delta = 0.0f;
        for (i64 j = threadIdx.x; j < seen; j += blockDim.x) {
            p[j] = expf(p[j] - m) / l;
            float dp = 0.0f;
            for (i64 c = 0; c < d; ++c) dp = fmaf(g[c], vb[j * d + c], dp);
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
        for (i64 c = threadIdx.x; c < d; c += blockDim.x) {
            float acc = 0.0f;
            for (i64 j = 0; j < seen; ++j) acc = fmaf(ds[j], kb[j * d + c], acc);
            dq[r * d + c] = acc * scale;
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
    const float* q, const float* k, const float* v, const float* dy, const float* stats, float* dk,
    float* dv, i64 batch, i64 queries, i64 keys, i64 d, float scale, u64 seed, u64 offset,
    float rate, float keep) {
    Dropout drop = {seed, offset, rate, keep};
    __shared__ float tile_p[ATTENTION_TILE];
    __shared__ float tile_ds[ATTENTION_TILE];
    for (i64 row = blockIdx.x; row < batch * keys; row += gridDim.x) {
        i64 b = row / keys, j = row % keys;
        i64 first = j > keys - queries ? j - (keys - queries) : 0;
        const float *kj = k + row * d, *vj = v + row * d;
        for (i64 c = threadIdx.x; c < d; c += blockDim.x) {
            dk[row * d + c] = 0.0f;
            dv[row * d + c] = 0.0f;
        }
        for (i64 i0 = first; i0 < queries; i0 += ATTENTION_TILE) {
            i64 n = queries - i0 < ATTENTION_TILE ? queries - i0 : ATTENTION_TILE;
            if (threadIdx.x < n) {
                i64 r = b * queries + i0 + threadIdx.x;
                const float *qi = q + r * d, *g = dy + r * d;
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
                float ak = dk[row * d + c], av = dv[row * d + c];
                for (i64 t = 0; t < n; ++t) {
                    i64 r = b * queries + i0 + t;
                    ak = fmaf(tile_ds[t], q[r * d + c], ak);
                    av = fmaf(tile_p[t], dy[r * d + c], av);
                }
                dk[row * d + c] = ak;
                dv[row * d + c] = av;
            }
            __syncthreads();
        }
        for (i64 c = threadIdx.x; c < d; c += blockDim.x) dk[row * d + c] *= scale;
        __syncthreads();
    }
}
