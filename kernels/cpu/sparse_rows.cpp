// Native CPU kernels of promptkd's offline distillation: teacher targets from a chunk of logit rows, and
// the student's loss on sparse targets. Same contract as kd_rows.cpp: float32 [rows, V] rows from torch's
// GEMMs, one call per chunk, rows in parallel (OpenMP), sums in double. Formulas: promptkd/sparse/rows.py.
//
// promptkd_topk_rows     per row, the k largest logits (ties to the lower id) and their log-probabilities
//                        under the full-vocabulary softmax of logits / T. Two passes: the selection (a buffer
//                        of candidates cut back to its k best by nth_element when full; a block of 16 logits
//                        is looked at one by one only when its maximum beats the k-th best so far), then the
//                        exponential sum from the best logit.
// promptkd_sample_rows   per row, S tokens drawn from softmax(logits / T) by inverse transform: exp(a - max a)
//                        into a scratch row with sums per block of 64, S uniforms from Philox4x32-10 (key =
//                        the row's key, counter = (row counter, draw, 0)), sorted, then one walk over the
//                        block sums that descends into a block only where a draw lands. Returns the distinct
//                        ids, most drawn first (ties to the lower id), with log(count / S).
// promptkd_sparse_rows   per row, the loss on sparse targets (ids, teacher log-probabilities) and its logit
//                        gradient, written over the logits: the target ids are masked (-inf) for the max
//                        and exponential sum of the rest of the row, then restored; the rest's gradient is
//                        one multiple of its exponentials, the ids' are fixed up one by one.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

#include "vmath.h"

namespace {

using promptkd::row_max;
using promptkd::vexp;
using promptkd::vexp_nonpos;

// ---- Philox4x32-10 (Salmon et al. 2011; the generator of Triton's tl.randint and of
// promptkd/sparse/philox.py, which must agree bit for bit) ----

inline void philox(uint64_t key, uint32_t c[4]) {
    uint32_t k0 = static_cast<uint32_t>(key), k1 = static_cast<uint32_t>(key >> 32);
    for (int round = 0; round < 10; ++round) {
        const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c[0];
        const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * c[2];
        const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c[1] ^ k0;
        const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c[3] ^ k1;
        c[0] = n0;
        c[1] = static_cast<uint32_t>(p1);
        c[2] = n2;
        c[3] = static_cast<uint32_t>(p0);
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
}

// Draw `draw` of a row: 53 random bits from the first two words, a double in [0, 1).
inline double uniform(uint64_t key, uint64_t counter, uint32_t draw) {
    uint32_t c[4] = {static_cast<uint32_t>(counter), static_cast<uint32_t>(counter >> 32), draw, 0u};
    philox(key, c);
    return (static_cast<double>(c[0] >> 5) * 67108864.0 + static_cast<double>(c[1] >> 6)) *
           (1.0 / 9007199254740992.0);
}

// ---- top-k ----

struct Entry {
    float v;
    int64_t id;
};

// a ranks before b: the larger logit, or the lower id among equal logits. As a std heap comparator this
// keeps the worst of the k kept entries at the front.
inline bool before(const Entry& a, const Entry& b) { return a.v > b.v || (a.v == b.v && a.id < b.id); }

// Whether a logit of the block of 16 at x beats w: one vector compare, no horizontal reduction.
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
bool any_above16(const float* __restrict x, float w) {
    bool hit = false;
#pragma omp simd reduction(| : hit)
    for (int t = 0; t < 16; ++t) hit |= x[t] > w;
    return hit;
}

__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
double exp_sum(const float* __restrict x, int64_t V, float it, float ma) {
    double z = 0.0;
#pragma omp simd reduction(+ : z)
    for (int64_t v = 0; v < V; ++v) z += vexp_nonpos(x[v] * it - ma);  // ma: the row's largest x * it
    return z;
}

// The k best of the candidates in `cand` (its first k, unordered); returns the k-th best's logit.
inline float keep_best(std::vector<Entry>& cand, int32_t k) {
    std::nth_element(cand.begin(), cand.begin() + (k - 1), cand.end(), before);
    cand.resize(k);
    return cand[k - 1].v;
}

void topk_row(const float* x, int64_t V, int32_t k, float it, std::vector<Entry>& cand, int64_t* ids, float* lp) {
    // Candidates: the first k logits, then every logit above `worst`, the k-th best among the candidates kept at
    // the last compaction (an equal logit has a higher id than each kept one: it never ranks in the top k). When
    // the buffer fills, it is cut back to its k best, which raises `worst`.
    const size_t capacity = std::max<size_t>(2 * static_cast<size_t>(k), 32);
    cand.clear();
    const int64_t first = std::min<int64_t>(k, V);
    for (int64_t j = 0; j < first; ++j) cand.push_back({x[j], j});
    float worst = keep_best(cand, static_cast<int32_t>(first));
    auto offer = [&](int64_t j) {
        if (x[j] > worst) {
            cand.push_back({x[j], j});
            if (cand.size() >= capacity) worst = keep_best(cand, k);
        }
    };
    int64_t j = first;
    for (; j + 16 <= V; j += 16) {
        if (any_above16(x + j, worst))
            for (int t = 0; t < 16; ++t) offer(j + t);
    }
    for (; j < V; ++j) offer(j);
    keep_best(cand, k);
    std::sort(cand.begin(), cand.end(), before);
    const float ma = cand.front().v * it;  // the row's largest logit / T (max(s / T) = max(s) / T for T > 0)
    const double log_z = std::log(exp_sum(x, V, it, ma));
    for (int32_t i = 0; i < k; ++i) {
        ids[i] = cand[i].id;
        lp[i] = static_cast<float>(static_cast<double>(cand[i].v * it - ma) - log_z);
    }
}

// ---- sampling ----

constexpr int64_t BLOCK = 64;

__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
double exp_block(const float* __restrict x, float* __restrict e, int64_t n, float it, float ma) {
    double z = 0.0;
#pragma omp simd reduction(+ : z)
    for (int64_t v = 0; v < n; ++v) {
        const float ev = vexp_nonpos(x[v] * it - ma);  // ma: the row's largest x * it
        e[v] = ev;
        z += ev;
    }
    return z;
}

using Draws = std::vector<std::pair<double, int64_t>>;    // (target cumulative mass, id)
using Counts = std::vector<std::pair<int64_t, int64_t>>;  // (-count, id)

void sample_row(const float* x, int64_t V, int32_t samples, int32_t width, float it, uint64_t key, uint64_t counter,
                float* e, std::vector<double>& block_sums, Draws& draws, Counts& counts, int64_t* ids, float* lp) {
    const float ma = row_max(x, V) * it;
    const int64_t nb = (V + BLOCK - 1) / BLOCK;
    double z = 0.0;
    int64_t last = -1;  // the last block with mass: every draw lands at or before it
    for (int64_t b = 0; b < nb; ++b) {
        const int64_t lo = b * BLOCK, n = std::min(BLOCK, V - lo);
        block_sums[b] = exp_block(x + lo, e + lo, n, it, ma);
        z += block_sums[b];
        if (block_sums[b] > 0.0) last = b;
    }
    if (!(z > 0.0) || !std::isfinite(z) || last < 0) {  // NaN or infinite logits: nothing to draw from
        for (int32_t i = 0; i < width; ++i) {
            ids[i] = -1;
            lp[i] = NAN;
        }
        return;
    }
    draws.resize(samples);
    for (int32_t s = 0; s < samples; ++s) draws[s] = {uniform(key, counter, static_cast<uint32_t>(s)) * z, 0};
    std::sort(draws.begin(), draws.end());
    // cum: the sum of the blocks before b, accumulated in the order z was, so that every draw (< z) lands.
    double cum = 0.0;
    int64_t b = 0;
    for (auto& draw : draws) {
        const double c = draw.first;
        while (b < last && cum + block_sums[b] <= c) cum += block_sums[b++];
        const int64_t lo = b * BLOCK, hi = std::min(V, lo + BLOCK);
        int64_t pick = -1, positive = lo;
        double acc = cum;
        for (int64_t j = lo; j < hi; ++j) {
            if (e[j] > 0.0f) positive = j;
            acc += e[j];
            if (c < acc) {
                pick = j;
                break;
            }
        }
        // Summed element by element, a block may round below its block sum: the draw takes its last token.
        draw.second = pick >= 0 ? pick : positive;
    }
    // Distinct ids with their counts, the most drawn first, ties to the lower id.
    counts.clear();
    std::sort(draws.begin(), draws.end(), [](const auto& a, const auto& b) { return a.second < b.second; });
    for (int32_t s = 0; s < samples;) {
        int32_t t = s;
        while (t < samples && draws[t].second == draws[s].second) ++t;
        counts.push_back({-(t - s), draws[s].second});
        s = t;
    }
    std::sort(counts.begin(), counts.end());
    const int32_t n = static_cast<int32_t>(counts.size());
    for (int32_t i = 0; i < width; ++i) {
        ids[i] = i < n ? counts[i].second : -1;
        lp[i] = i < n ? static_cast<float>(std::log(static_cast<double>(-counts[i].first) / samples)) : -INFINITY;
    }
}

// ---- the loss on sparse targets ----

struct Targets {
    const int64_t* ids;  // [k], -1: no target
    const float* lp;     // [k] teacher log-probabilities
    int32_t k;
};

template <bool GRAD>
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
double rest_exp(const float* __restrict s, float* __restrict e, int64_t V, float it, float m) {
    double z = 0.0;
#pragma omp simd reduction(+ : z)
    for (int64_t v = 0; v < V; ++v) {
        const float ev = vexp_nonpos(s[v] * it - m);  // m: the rest's largest s * it
        if (GRAD) e[v] = ev;
        z += ev;
    }
    return z;
}

// s[v] = c * e[v] (+ kh * softmax(s)_v at T = 1 when HARD == 2: T != 1).
template <int HARD>
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
void rest_grad(float* __restrict s, const float* __restrict e, int64_t V, float c, float kh, float lse1) {
#pragma omp simd
    for (int64_t v = 0; v < V; ++v) {
        float g = c * e[v];
        if (HARD == 2) g += kh * vexp(s[v] - lse1);
        s[v] = g;
    }
}

// One row: returns the loss; with GRAD, s becomes scale * d(loss)/d(s). `saved` holds k floats.
template <bool GRAD>
float sparse_row(float* s, int64_t V, const Targets& tg, int64_t label, float scale, bool tail, float it, float sw,
                 float hw, float* e, float* saved) {
    const int32_t k = tg.k;
    int32_t valid = 0;
    for (int32_t i = 0; i < k; ++i) {
        const int64_t id = tg.ids[i];
        if (id < 0) continue;
        saved[i] = s[id];
        s[id] = -INFINITY;
        ++valid;
    }
    const float rest_max = row_max(s, V);  // NaN when the row holds one
    // An empty rest (every logit a target, or -inf) has no mass: its exponentials are 0 from any finite m.
    const bool rest_empty = valid >= V || rest_max == -INFINITY;
    const float mr = rest_empty ? 0.0f : rest_max * it;
    const double zr = rest_exp<GRAD>(s, e, V, it, mr);
    for (int32_t i = 0; i < k; ++i)
        if (tg.ids[i] >= 0) s[tg.ids[i]] = saved[i];
    // Log-sum of the whole row from the rest's and the targets' own maxima (no subtraction of rounded sums).
    double m = rest_empty ? -INFINITY : static_cast<double>(mr);
    for (int32_t i = 0; i < k; ++i)
        if (tg.ids[i] >= 0) m = std::max(m, static_cast<double>(saved[i] * it));
    if (std::isnan(rest_max)) m = NAN;
    double z = rest_empty ? 0.0 : std::exp(mr - m) * zr;
    double p_sum = 0.0;
    for (int32_t i = 0; i < k; ++i) {
        if (tg.ids[i] < 0) continue;
        z += std::exp(static_cast<double>(saved[i] * it) - m);
        p_sum += std::exp(static_cast<double>(tg.lp[i]));
    }
    const double lse = m + std::log(z);
    const double lq_rest = rest_empty ? -INFINITY : mr + std::log(zr) - lse;
    // Teacher mass: tail keeps the rest bucket p_r = 1 - sum p (none when the rest is empty); without tail
    // the targets are renormalised (log_norm = log sum p). A row without target mass has no soft term.
    const double p_rest = tail && !rest_empty ? std::max(0.0, 1.0 - p_sum) : 0.0;
    const bool soft = tail || p_sum > 0.0 || std::isnan(p_sum);  // (a NaN target passes: a NaN loss)
    const double log_norm = tail || !(p_sum > 0.0) ? 0.0 : std::log(p_sum);
    double d = 0.0;
    for (int32_t i = 0; i < k; ++i) {
        if (tg.ids[i] < 0 || !soft) continue;
        const double lp = static_cast<double>(tg.lp[i]) - log_norm;
        // p = 0 adds nothing; a NaN target passes (a NaN loss).
        if (lp != -INFINITY) d += std::exp(lp) * (lp - (static_cast<double>(saved[i] * it) - lse));
    }
    if (p_rest > 0.0) d += p_rest * (std::log(p_rest) - lq_rest);
    if (std::isnan(rest_max)) d = NAN;
    // The hard loss at T = 1.
    double lse1 = lse;
    float ce = 0.0f;
    const bool hard = hw > 0.0f;
    if (hard) {
        if (it != 1.0f) {
            const float m1 = row_max(s, V);
            lse1 = m1 + std::log(exp_sum(s, V, 1.0f, m1));
        }
        ce = static_cast<float>(lse1 - static_cast<double>(s[label]));
    }
    if (GRAD) {
        const double ks = static_cast<double>(scale) * sw * it, kh = static_cast<double>(scale) * hw;
        const double q_scale = std::exp(mr - lse);  // q_v = e_v * q_scale for the rest
        const double c_soft = !soft ? 0.0 : q_scale - (p_rest > 0.0 ? p_rest / zr : 0.0);
        const float lse1f = static_cast<float>(lse1);
        if (hard && it == 1.0f)
            rest_grad<0>(s, e, V, static_cast<float>(ks * c_soft + kh * q_scale), 0.0f, 0.0f);
        else if (hard)
            rest_grad<2>(s, e, V, static_cast<float>(ks * c_soft), static_cast<float>(kh), lse1f);
        else
            rest_grad<0>(s, e, V, static_cast<float>(ks * c_soft), 0.0f, 0.0f);
        for (int32_t i = 0; i < k; ++i) {
            const int64_t id = tg.ids[i];
            if (id < 0) continue;
            const double a = static_cast<double>(saved[i] * it);
            double g = 0.0;
            if (soft) g = ks * (std::exp(a - lse) - std::exp(static_cast<double>(tg.lp[i]) - log_norm));
            if (hard) g += kh * std::exp(static_cast<double>(saved[i]) - lse1);
            s[id] = static_cast<float>(g);
        }
        if (hard) s[label] -= static_cast<float>(kh);
    }
    return static_cast<float>(sw * d) + hw * ce;
}

}  // namespace

#define PROMPTKD_API __attribute__((visibility("default")))

extern "C" {

// x [rows, vocab] float32 logits (row stride x_stride); ids [rows, k] int64 and logprobs [rows, k] float32
// receive each row's k largest logits (descending, ties to the lower id) and their log-probabilities under
// softmax(x / T), inv_t = 1 / T. Returns 0, or -1 for arguments out of range (nothing written).
PROMPTKD_API int promptkd_topk_rows(int64_t rows, int64_t vocab, const float* x, int64_t x_stride, int32_t k,
                                    float inv_t, int64_t* ids, float* logprobs) {
    if (rows < 0 || vocab < 1 || k < 1 || k > vocab || x_stride < vocab || !(inv_t > 0.0f)) return -1;
#pragma omp parallel
    {
        std::vector<Entry> cand;
        cand.reserve(std::max<size_t>(2 * static_cast<size_t>(k), 32));
#pragma omp for schedule(static)
        for (int64_t i = 0; i < rows; ++i)
            topk_row(x + i * x_stride, vocab, k, inv_t, cand, ids + i * k, logprobs + i * k);
    }
    return 0;
}

// x as above; `samples` draws per row from softmax(x / T), row i drawing with Philox key keys[i] and
// counter counters[i]; ids / logprobs [rows, width] (width >= samples) receive the distinct drawn ids
// (most drawn first, ties to the lower id) with log(count / samples), padded with -1 / -inf. A row whose
// logits hold NaN or +inf gets ids -1 and NaN log-probabilities. Returns 0, or -1 (nothing written).
PROMPTKD_API int promptkd_sample_rows(int64_t rows, int64_t vocab, const float* x, int64_t x_stride,
                                      int32_t samples, int32_t width, float inv_t, const int64_t* keys,
                                      const int64_t* counters, int64_t* ids, float* logprobs) {
    if (rows < 0 || vocab < 1 || samples < 1 || width < samples || x_stride < vocab || !(inv_t > 0.0f)) return -1;
#pragma omp parallel
    {
        std::vector<float> e(static_cast<size_t>(vocab));
        std::vector<double> block_sums(static_cast<size_t>((vocab + BLOCK - 1) / BLOCK));
        Draws draws;
        Counts counts;
#pragma omp for schedule(static)
        for (int64_t i = 0; i < rows; ++i)
            sample_row(x + i * x_stride, vocab, samples, width, inv_t, static_cast<uint64_t>(keys[i]),
                       static_cast<uint64_t>(counters[i]), e.data(), block_sums, draws, counts, ids + i * width,
                       logprobs + i * width);
    }
    return 0;
}

// s [rows, vocab] float32 student logits (row stride s_stride), overwritable; ids [rows, k] int64 target ids
// (distinct per row, in [0, vocab), or -1 for none) and lp [rows, k] float32 teacher log-probabilities;
// labels [rows] int64 in [0, vocab) (read when hard_weight > 0); scale [rows] or NULL. loss [rows] receives
// soft_weight * D + hard_weight * CE (promptkd/sparse/rows.py); with a scale, s is overwritten with
// scale * d(loss)/d(s). Returns 0, or -1 for arguments out of range (nothing written).
PROMPTKD_API int promptkd_sparse_rows(int64_t rows, int64_t vocab, float* s, int64_t s_stride, int32_t k,
                                      const int64_t* ids, const float* lp, const int64_t* labels, const float* scale,
                                      float* loss, int32_t tail, float inv_t, float soft_weight, float hard_weight) {
    if (rows < 0 || vocab < 1 || k < 1 || s_stride < vocab || !(inv_t > 0.0f) ||
        (hard_weight > 0.0f && labels == nullptr))
        return -1;
    const bool grad = scale != nullptr;
#pragma omp parallel
    {
        std::vector<float> e(grad ? static_cast<size_t>(vocab) : 0), saved(static_cast<size_t>(k));
#pragma omp for schedule(static)
        for (int64_t i = 0; i < rows; ++i) {
            const Targets tg{ids + i * k, lp + i * k, k};
            const int64_t label = hard_weight > 0.0f ? labels[i] : 0;
            float* row = s + i * s_stride;
            loss[i] = grad ? sparse_row<true>(row, vocab, tg, label, scale[i], tail != 0, inv_t, soft_weight,
                                              hard_weight, e.data(), saved.data())
                           : sparse_row<false>(row, vocab, tg, label, 0.0f, tail != 0, inv_t, soft_weight,
                                               hard_weight, nullptr, saved.data());
        }
    }
    return 0;
}

// Four Philox4x32-10 words of (key, counter words c[0..3]), written over c: the tests compare the generator
// with promptkd/sparse/philox.py and Triton's.
PROMPTKD_API void promptkd_philox(uint64_t key, uint32_t* c) { philox(key, c); }

}  // extern "C"
