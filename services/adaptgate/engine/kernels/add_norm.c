/* BERT's residual add and LayerNorm in one pass, for CPUs with AVX512-BF16.
 *
 * out[t] = (s - mean(s)) / sqrt(var(s) + eps) · gamma + beta, where s = x[t] + r[t]: PyTorch runs the
 * add and the norm as two ops, each a pass over the [T, H] activations, and its bf16 layer_norm is
 * slow on CPUs. Here a row is loaded once, its sum kept in fp32 (no bf16 rounding between the add and
 * the norm), its statistics taken in fp32, and the result rounded to bf16 once.
 * Layouts: x, r, out [T, H] bf16 row-major; gamma, beta [H] bf16; module.c checks H <= ADD_NORM_MAX_H.
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>

#include "kernels.h"

#define INLINE static inline __attribute__((always_inline))
#define MAX_H ADD_NORM_MAX_H

INLINE __mmask16 tail(int64_t left) { return left >= 16 ? 0xFFFF : (__mmask16)((1u << left) - 1u); }

INLINE __m512 load_bf16(const uint16_t *p, __mmask16 m) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

/* One row; sum: H floats of scratch. */
static void add_norm_row(const uint16_t *x, const uint16_t *r, const uint16_t *gamma, const uint16_t *beta, uint16_t *out,
                         int64_t h, float eps, float *sum) {
    __m512 total = _mm512_setzero_ps();
    for (int64_t c = 0; c < h; c += 16) {
        __mmask16 m = tail(h - c);
        __m512 s = _mm512_add_ps(load_bf16(x + c, m), load_bf16(r + c, m));
        _mm512_mask_storeu_ps(sum + c, m, s);
        total = _mm512_add_ps(total, s);  /* masked lanes load as zero */
    }
    float mean = _mm512_reduce_add_ps(total) / (float)h;
    __m512 vmean = _mm512_set1_ps(mean), squares = _mm512_setzero_ps();
    for (int64_t c = 0; c < h; c += 16) {
        __mmask16 m = tail(h - c);
        __m512 d = _mm512_maskz_sub_ps(m, _mm512_maskz_loadu_ps(m, sum + c), vmean);
        squares = _mm512_fmadd_ps(d, d, squares);
    }
    __m512 inv = _mm512_set1_ps(1.f / sqrtf(_mm512_reduce_add_ps(squares) / (float)h + eps));
    for (int64_t c = 0; c < h; c += 16) {
        __mmask16 m = tail(h - c);
        __m512 y = _mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, sum + c), vmean), inv);
        y = _mm512_fmadd_ps(y, load_bf16(gamma + c, m), load_bf16(beta + c, m));
        _mm256_mask_storeu_epi16(out + c, m, (__m256i)_mm512_cvtneps_pbh(y));
    }
}

void add_layer_norm_bf16(const uint16_t *x, const uint16_t *r, const uint16_t *gamma, const uint16_t *beta, uint16_t *out,
                         int64_t rows, int64_t h, float eps) {
#pragma omp parallel
    {
        float sum[MAX_H];
#pragma omp for schedule(static)
        for (int64_t t = 0; t < rows; t++) add_norm_row(x + t * h, r + t * h, gamma, beta, out + t * h, h, eps, sum);
    }
}
