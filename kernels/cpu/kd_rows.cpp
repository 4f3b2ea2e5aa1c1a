// Native CPU kernel of promptkd: the fused elementwise pass of the chunked KD loss.
//
// Given one chunk of full-vocabulary logit rows of both sides (float32, [rows, V], from torch's GEMMs),
// one call computes, per row, the loss soft_weight * D(p, q) + hard_weight * CE(s, label) and, when a
// per-row scale is given, the logit gradients scale * d(loss)/d(logits), written in place over the
// logits. The notation and formulas are those of promptkd/kd/math.py (a = s / T, b = t / T,
// lq = log_softmax(a), lp = log_softmax(b), q = exp(lq), p = exp(lp); Gp = p df/dp, Gq = q df/dq,
// cp = sum Gp, cq = sum Gq; dD/da = Gq - q cq, dD/db = Gp - p cp).
//
// A row's logits (V floats per side) stay in the core's cache across the passes:
//   1. the maxima of s and t;
//   2. the exponentials exp(a - max a), exp(b - max b) into per-thread scratch rows, and their sums;
//   3. the divergence's elementwise terms (the log-mixture of JSD and the skew divergences into a
//      third scratch row) and the row sums D, cp, cq;
//   4. the gradients (merged into pass 3 when they need no row sum: forward KL for the student,
//      reverse KL for the teacher).
// Exponentials and logarithms are vectorised polynomials (Cody-Waite reduction, the classic Cephes
// coefficients, about 1 ulp); sums accumulate in double. NaN inputs give NaN outputs.
//
// Plain C ABI (loaded with ctypes by promptkd/kd/native.py): no torch headers, no Python. Rows run in
// parallel with OpenMP; in a process that imported torch first, this library shares torch's libgomp.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "vmath.h"

namespace {

using promptkd::row_max;
using promptkd::vexp;
using promptkd::vlog1p_unit;

constexpr int FORWARD_KL = 1, REVERSE_KL = 2, JSD = 3, SKEW_FORWARD_KL = 4, SKEW_REVERSE_KL = 5;

// The statistics of a row that every pass after the first two needs.
struct Row {
    float* s;
    float* t;
    const float* ea;  // exp(a - max a)
    const float* eb;  // exp(b - max b)
    float* lm;        // log-mixture scratch (JSD, skew)
    float ma, mb, lla, llb, ra, rb;  // maxima of a, b; log-sums; reciprocal sums
    float ms, llc;                   // max of s and log-sum at T = 1 (the hard loss)
    float ks, kh;                    // gradient factors: scale * soft_weight / T, scale * hard_weight
};

// The hard loss's gradient at element v: softmax(s)_v (the label's -1 is added by the caller).
// s_v: the student logit at v, read through the caller's (restrict) pointer before it is overwritten.
template <int HARD>
inline __attribute__((always_inline)) float hard_grad(const Row& r, float q, float s_v) {
    if (HARD == 0) return 0.0f;
    if (HARD == 1) return r.kh * q;  // T == 1: softmax(s) is q
    return r.kh * vexp((s_v - r.ms) - r.llc);
}

// Forward / reverse KL: the divergence and the gradients. FWD: D = sum p (lp - lq), dD/da = q - p,
// dD/db = p (lp - lq - D); reverse KL mirrored. The gradient that needs no D is written in the same pass.
template <bool FWD, bool NS, bool NT, int HARD>
__attribute__((target_clones("arch=x86-64-v3", "default")))
double kl_row(const Row& r, int64_t V, float it) {
    constexpr bool MERGE = FWD ? !NT : !NS;  // the side whose gradient needs D is not wanted
    float* __restrict s = r.s;
    float* __restrict t = r.t;
    const float* __restrict ea = r.ea;
    const float* __restrict eb = r.eb;
    double d = 0.0;
#pragma omp simd reduction(+ : d)
    for (int64_t v = 0; v < V; ++v) {
        float q = ea[v] * r.ra, p = eb[v] * r.rb;
        float lq = (s[v] * it - r.ma) - r.lla, lp = (t[v] * it - r.mb) - r.llb;
        d += FWD ? p * (lp - lq) : q * (lq - lp);
        if (MERGE && FWD && NS) s[v] = r.ks * (q - p) + hard_grad<HARD>(r, q, s[v]);
        if (MERGE && !FWD && NT) t[v] = r.ks * (p - q);
    }
    if (!MERGE) {
        const float dd = static_cast<float>(d);
#pragma omp simd
        for (int64_t v = 0; v < V; ++v) {
            float q = ea[v] * r.ra, p = eb[v] * r.rb;
            float lq = (s[v] * it - r.ma) - r.lla, lp = (t[v] * it - r.mb) - r.llb;
            float gs = FWD ? q - p : q * (lq - lp - dd);
            float gt = FWD ? p * (lp - lq - dd) : p - q;
            if (NS) s[v] = r.ks * gs + hard_grad<HARD>(r, q, s[v]);
            if (NT) t[v] = r.ks * gt;
        }
    }
    return d;
}

// The elementwise terms of JSD and the skew divergences at one element (promptkd/kd/math.py): f, Gp, Gq.
// l = log M; e = exp(-|lp + wp - lq - wq|) and q_big (the q term is the larger) when known, else computed.
template <int DIV>
inline __attribute__((always_inline)) void mix_terms(float p, float q, float lp, float lq, float l, float w_mix,
                                                     float beta, float one_m_beta, float& f, float& gp, float& gq) {
    if (DIV == JSD) {
        gp = beta * p * (lp - l);
        gq = one_m_beta * q * (lq - l);
        f = gp + gq;
    } else if (DIV == SKEW_FORWARD_KL) {  // w_mix = (1 - alpha) q / M
        f = p * (lp - l);
        gp = f + p * w_mix;
        gq = -p * w_mix;
    } else {  // skew reverse KL, w_mix = (1 - alpha) p / M
        f = q * (lq - l);
        gp = -q * w_mix;
        gq = f + q * w_mix;
    }
}

// JSD and the skew divergences: lM = logaddexp(lp + wp, lq + wq) into r.lm with the sums D, cp, cq; then
// the gradients dD/da = Gq - q cq, dD/db = Gp - p cp.
template <int DIV, bool NS, bool NT, int HARD>
__attribute__((target_clones("arch=x86-64-v3", "default")))
double mix_row(const Row& r, int64_t V, float it, float wp, float wq) {
    float* __restrict s = r.s;
    float* __restrict t = r.t;
    float* __restrict lm = r.lm;
    const float* __restrict ea = r.ea;
    const float* __restrict eb = r.eb;
    const float beta = std::exp(wp), one_m_beta = std::exp(wq);
    double d = 0.0, cp = 0.0, cq = 0.0;
#pragma omp simd reduction(+ : d, cp, cq)
    for (int64_t v = 0; v < V; ++v) {
        float q = ea[v] * r.ra, p = eb[v] * r.rb;
        float lq = (s[v] * it - r.ma) - r.lla, lp = (t[v] * it - r.mb) - r.llb;
        float x = lp + wp, y = lq + wq;
        bool q_big = y >= x;
        float mx = q_big ? y : x, mn = q_big ? x : y;
        float e = vexp(mn - mx);
        float l = mx + vlog1p_unit(e);
        lm[v] = l;
        float big = DIV == SKEW_FORWARD_KL ? (q_big ? 1.0f : e) : (q_big ? e : 1.0f);
        float f, gp, gq;
        mix_terms<DIV>(p, q, lp, lq, l, big / (1.0f + e), beta, one_m_beta, f, gp, gq);
        d += f;
        cp += gp;
        cq += gq;
    }
    if (NS || NT) {
        const float fcp = static_cast<float>(cp), fcq = static_cast<float>(cq);
#pragma omp simd
        for (int64_t v = 0; v < V; ++v) {
            float q = ea[v] * r.ra, p = eb[v] * r.rb;
            float lq = (s[v] * it - r.ma) - r.lla, lp = (t[v] * it - r.mb) - r.llb;
            float l = lm[v];
            float w_mix = DIV == SKEW_FORWARD_KL ? vexp(lq + wq - l) : DIV == SKEW_REVERSE_KL ? vexp(lp + wp - l) : 0.0f;
            float f, gp, gq;
            mix_terms<DIV>(p, q, lp, lq, l, w_mix, beta, one_m_beta, f, gp, gq);
            if (NT) t[v] = r.ks * (gp - p * fcp);
            if (NS) s[v] = r.ks * (gq - q * fcq) + hard_grad<HARD>(r, q, s[v]);
        }
    }
    return d;
}

// Passes 1-2 of a row: maxima, exponentials into ea / eb, sums.
__attribute__((target_clones("arch=x86-64-v3", "default")))
void row_stats(Row& r, int64_t V, float it, bool hard) {
    const float* __restrict s = r.s;
    const float* __restrict t = r.t;
    float* __restrict ea = const_cast<float*>(r.ea);
    float* __restrict eb = const_cast<float*>(r.eb);
    r.ms = row_max(s, V);
    r.ma = r.ms * it;  // max(s / T) = max(s) / T for T > 0
    r.mb = row_max(t, V) * it;
    const float ma = r.ma, mb = r.mb;
    double sa = 0.0, sb = 0.0;
#pragma omp simd reduction(+ : sa, sb)
    for (int64_t v = 0; v < V; ++v) {
        float xa = vexp(s[v] * it - ma), xb = vexp(t[v] * it - mb);
        ea[v] = xa;
        eb[v] = xb;
        sa += xa;
        sb += xb;
    }
    r.lla = static_cast<float>(std::log(sa));
    r.llb = static_cast<float>(std::log(sb));
    r.ra = static_cast<float>(1.0 / sa);
    r.rb = static_cast<float>(1.0 / sb);
    r.llc = r.lla;
    if (hard && it != 1.0f) {  // the hard loss's log-sum at T = 1
        const float ms = r.ms;
        double sc = 0.0;
#pragma omp simd reduction(+ : sc)
        for (int64_t v = 0; v < V; ++v) sc += vexp(s[v] - ms);
        r.llc = static_cast<float>(std::log(sc));
    }
}

using RowFn = double (*)(const Row&, int64_t, float, float, float);

template <int DIV, bool NS, bool NT, int HARD>
double run_row(const Row& r, int64_t V, float it, float wp, float wq) {
    if constexpr (DIV == FORWARD_KL || DIV == REVERSE_KL)
        return kl_row<DIV == FORWARD_KL, NS, NT, HARD>(r, V, it);
    else
        return mix_row<DIV, NS, NT, HARD>(r, V, it, wp, wq);
}

template <int DIV, int HARD>
RowFn pick_flags(bool ns, bool nt) {
    if (ns) return nt ? run_row<DIV, true, true, HARD> : run_row<DIV, true, false, HARD>;
    return nt ? run_row<DIV, false, true, HARD> : run_row<DIV, false, false, HARD>;
}

template <int DIV>
RowFn pick_hard(int hard, bool ns, bool nt) {
    if (hard == 0) return pick_flags<DIV, 0>(ns, nt);
    if (hard == 1) return pick_flags<DIV, 1>(ns, nt);
    return pick_flags<DIV, 2>(ns, nt);
}

RowFn pick(int div, int hard, bool ns, bool nt) {
    switch (div) {
        case FORWARD_KL: return pick_hard<FORWARD_KL>(hard, ns, nt);
        case REVERSE_KL: return pick_hard<REVERSE_KL>(hard, ns, nt);
        case JSD: return pick_hard<JSD>(hard, ns, nt);
        case SKEW_FORWARD_KL: return pick_hard<SKEW_FORWARD_KL>(hard, ns, nt);
        default: return pick_hard<SKEW_REVERSE_KL>(hard, ns, nt);
    }
}

}  // namespace

#define PROMPTKD_API __attribute__((visibility("default")))

extern "C" {

// The ABI version promptkd/kd/native.py checks before using the library.
PROMPTKD_API int promptkd_cpu_abi_version() { return 2; }

// One chunk: s, t [rows, vocab] float32 with row strides s_stride, t_stride (elements); labels [rows]
// int64 targets already clamped to [0, vocab) (read only when hard_weight > 0); scale [rows] or NULL.
// loss [rows] receives soft_weight * D + hard_weight * CE per row. With scale != NULL, s and t are
// overwritten with scale * d(loss)/d(s) and scale * d(loss)/d(t) where need_s / need_t.
// Returns 0, or -1 for arguments out of range (nothing written).
PROMPTKD_API int promptkd_kd_rows(int64_t rows, int64_t vocab, float* s, int64_t s_stride, float* t,
                                  int64_t t_stride, const int64_t* labels, const float* scale, float* loss,
                                  int32_t divergence, float inv_t, float soft_weight, float hard_weight, float lw_p,
                                  float lw_q, int32_t need_s, int32_t need_t) {
    if (rows < 0 || vocab < 1 || divergence < FORWARD_KL || divergence > SKEW_REVERSE_KL || !(inv_t > 0.0f) ||
        s_stride < vocab || t_stride < vocab || (hard_weight > 0.0f && labels == nullptr))
        return -1;
    const bool hard = hard_weight > 0.0f, grad = scale != nullptr;
    const int hard_mode = !hard ? 0 : inv_t == 1.0f ? 1 : 2;
    // Without a scale no gradient is written: the loss-only pass.
    const RowFn fn = pick(divergence, grad ? hard_mode : 0, grad && need_s, grad && need_t);
    const bool mixture = divergence >= JSD;
#pragma omp parallel
    {
        std::vector<float> scratch(static_cast<size_t>(vocab) * (mixture ? 3 : 2));
#pragma omp for schedule(static)
        for (int64_t i = 0; i < rows; ++i) {
            Row r{};
            r.s = s + i * s_stride;
            r.t = t + i * t_stride;
            r.ea = scratch.data();
            r.eb = scratch.data() + vocab;
            r.lm = mixture ? scratch.data() + 2 * vocab : nullptr;
            row_stats(r, vocab, inv_t, hard);
            const float sc = grad ? scale[i] : 0.0f;
            r.ks = sc * soft_weight * inv_t;
            r.kh = sc * hard_weight;
            const int64_t label = hard ? labels[i] : 0;
            // read before the gradient overwrites s
            const float ce = hard ? -((r.s[label] - r.ms) - r.llc) : 0.0f;
            const double d = fn(r, vocab, inv_t, lw_p, lw_q);
            if (grad && need_s && hard) r.s[label] -= r.kh;
            loss[i] = soft_weight * static_cast<float>(d) + hard_weight * ce;
        }
    }
    return 0;
}

}  // extern "C"
