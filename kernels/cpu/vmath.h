// Vectorisable float32 math shared by promptkd's native CPU kernels (kd_rows.cpp, sparse_rows.cpp).
//
// Exponentials and logarithms are polynomials (Cody-Waite reduction, the classic Cephes coefficients,
// about 1 ulp) written so that `#pragma omp simd` loops vectorise them; NaN stays NaN.

#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace promptkd {

inline __attribute__((always_inline)) float bits_to_float(int32_t i) {
    float f;
    std::memcpy(&f, &i, sizeof f);
    return f;
}

// exp(x) for float x: x = n ln2 + r, |r| <= ln2 / 2, exp(r) by a degree-7 polynomial; 0 below the
// smallest normal exponent, +inf above the largest; NaN stays NaN (comparisons with NaN are false).
// exp_clamped is the core, for x already within those bounds.
inline __attribute__((always_inline)) float exp_clamped(float xc) {
    const float round = 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to an integer
    float n = (xc * 1.44269504088896341f + round) - round;
    float r = xc - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    return p * bits_to_float((static_cast<int32_t>(n) + 127) << 23);
}

inline __attribute__((always_inline)) float vexp(float x) {
    const float hi = 88.3762626647949f, lo = -87.3365447504f;
    float xc = x > hi ? hi : x;
    xc = xc < lo ? lo : xc;
    float y = exp_clamped(xc);
    y = x < lo ? 0.0f : y;
    y = x > hi ? INFINITY : y;
    return y;
}

// exp(x) for x <= 0 (or NaN), such as a logit less its row's maximum: vexp without the overflow branch.
inline __attribute__((always_inline)) float vexp_nonpos(float x) {
    const float lo = -87.3365447504f;
    const float y = exp_clamped(x < lo ? lo : x);
    return x < lo ? 0.0f : y;
}

// log(1 + e) for 0 <= e <= 1 (what a log-sum-exp of two terms needs): log(1 + f) by the Cephes
// polynomial, with f = e itself below sqrt(2) - 1 (no rounding of 1 + e) and f = (1 + e) / 2 - 1 above.
inline __attribute__((always_inline)) float vlog1p_unit(float e) {
    const bool big = e > 0.41421356237f;
    float f = big ? (1.0f + e) * 0.5f - 1.0f : e;
    float z = f * f;
    float p = 7.0376836292e-2f;
    p = p * f - 1.1514610310e-1f;
    p = p * f + 1.1676998740e-1f;
    p = p * f - 1.2420140846e-1f;
    p = p * f + 1.4249322787e-1f;
    p = p * f - 1.6668057665e-1f;
    p = p * f + 2.0000714765e-1f;
    p = p * f - 2.4999993993e-1f;
    p = p * f + 3.3333331174e-1f;
    float y = p * f * z - 0.5f * z + f;
    return big ? y + 0.693147180559945f : y;
}


inline float row_max(const float* x, int64_t n) {
    float m = -INFINITY;
    bool nan = false;
#pragma omp simd reduction(max : m) reduction(| : nan)
    for (int64_t v = 0; v < n; ++v) {
        m = x[v] > m ? x[v] : m;
        nan |= x[v] != x[v];
    }
    return nan ? NAN : m;
}

}  // namespace promptkd
