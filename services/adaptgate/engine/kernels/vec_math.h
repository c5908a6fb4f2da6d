/* Vector math shared by the kernels: fp32 on 16 lanes, accurate well past bf16's rounding. */
#ifndef ADAPTGATE_VEC_MATH_H
#define ADAPTGATE_VEC_MATH_H

#include <immintrin.h>

#define INLINE static inline __attribute__((always_inline))

#include <stdint.h>

/* The first `left` of 16 lanes (none for left <= 0). */
INLINE __mmask16 tail16(int64_t left) { return left <= 0 ? 0 : left >= 16 ? 0xFFFF : (__mmask16)((1u << left) - 1u); }

/* e^x for x <= 0 (attention scores after the max is subtracted; GELU's e^(-z²)): 2^n · p(r), |r| <= ln2/2, degree-6 Taylor. */
INLINE __m512 exp_ps(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
    __m512 p = _mm512_set1_ps(1.f / 720.f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    return _mm512_scalef_ps(p, n);
}

/* The exact (erf) GELU, x·Φ(x), as BERT's `hidden_act: gelu` and oneDNN's gelu_erf epilogue: erf by
 * Abramowitz & Stegun 7.1.26 (absolute error under 1.5e-7), odd-extended to negative arguments. */
INLINE __m512 gelu_ps(__m512 x) {
    __m512 z = _mm512_mul_ps(x, _mm512_set1_ps(0.70710678118654752f));
    __m512 az = _mm512_abs_ps(z);
    __m512 d = _mm512_fmadd_ps(az, _mm512_set1_ps(0.3275911f), _mm512_set1_ps(1.f));
    __m512 t = _mm512_rcp14_ps(d);
    t = _mm512_mul_ps(t, _mm512_fnmadd_ps(d, t, _mm512_set1_ps(2.f)));  /* one Newton step: 1/d to fp32 */
    __m512 p = _mm512_set1_ps(1.061405429f);
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-1.453152027f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.421413741f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-0.284496736f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(0.254829592f));
    p = _mm512_mul_ps(p, t);
    __m512 erf_abs = _mm512_fnmadd_ps(p, exp_ps(_mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), az), az)), _mm512_set1_ps(1.f));
    __m512 erf = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(erf_abs),
        _mm512_and_si512(_mm512_castps_si512(z), _mm512_set1_epi32((int)0x80000000u))));
    return _mm512_mul_ps(_mm512_mul_ps(x, _mm512_set1_ps(0.5f)), _mm512_add_ps(erf, _mm512_set1_ps(1.f)));
}

#endif
