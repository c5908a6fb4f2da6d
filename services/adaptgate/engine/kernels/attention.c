/* Attention within each row of packed tokens, for CPUs with AVX512-BF16 (BERT-style encoders, no mask).
 *
 * PyTorch's CPU scaled_dot_product_attention wants a padded [rows, heads, L, d] grid, and at the
 * lengths of short texts its per-tile overhead, plus the copies onto and off that grid, cost many
 * times the arithmetic. This reads q, k and v straight from the packed [T, heads*d] tensors and
 * writes the context the same way. Per (row, head): keys are laid out as transposed bf16 pairs
 * (vdpbf16ps's operand layout), two queries at a time share every key load, each with two
 * accumulators (even and odd steps: at short lengths the loops are bound by the latency of one chain
 * of fused multiply-adds, so two chains per query keep the FMA units busy), softmax runs in fp32
 * (max-subtracted, a degree-6 exp), and the context is rounded to bf16 once. d must be even;
 * module.c checks the rows lie in order within the tokens and none is longer than max_len.
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

#include "kernels.h"

#define INLINE static inline __attribute__((always_inline))

/* e^x for x <= 0 (scores after the max is subtracted): 2^n · p(r), |r| <= ln2/2, degree-6 Taylor. */
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

INLINE __mmask16 tail16(int64_t left) { return left <= 0 ? 0 : left >= 16 ? 0xFFFF : (__mmask16)((1u << left) - 1u); }

/* One (row, head). kv: keys as bf16 pairs transposed, [d/2, lp] 32-bit words (vdpbf16ps's layout);
   vf: values in fp32 [len, d]; s: scores [2, lp]. */
static void row_head(const uint16_t *q, const uint16_t *k, const uint16_t *v, uint16_t *out, int64_t stride,
                     int64_t len, int64_t d, float scale, uint32_t *kv, float *vf, float *s) {
    int64_t lp = (len + 15) / 16 * 16, d2 = d / 2;
    for (int64_t j = 0; j < len; j++) {
        const uint32_t *kj = (const uint32_t *)(k + j * stride);
        for (int64_t c2 = 0; c2 < d2; c2++) kv[c2 * lp + j] = kj[c2];
        for (int64_t c0 = 0; c0 < d; c0 += 16) {
            __mmask16 m = tail16(d - c0);
            __m512i w = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, v + j * stride + c0));
            _mm512_mask_storeu_ps(vf + j * d + c0, m, _mm512_castsi512_ps(_mm512_slli_epi32(w, 16)));
        }
    }
    for (int64_t c2 = 0; c2 < d2; c2++)
        for (int64_t j = len; j < lp; j++) kv[c2 * lp + j] = 0;
    __m512 vscale = _mm512_set1_ps(scale);
    for (int64_t i = 0; i < len; i += 2) {
        int nq = len - i >= 2 ? 2 : 1;
        const uint32_t *qi[2] = {(const uint32_t *)(q + i * stride), (const uint32_t *)(q + (i + nq - 1) * stride)};
        for (int64_t j0 = 0; j0 < lp; j0 += 16) {
            /* two accumulators per query (even and odd pairs): four dependency chains, not two */
            __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), b0 = _mm512_setzero_ps(), b1 = _mm512_setzero_ps();
            int64_t c2 = 0;
            for (; c2 + 1 < d2; c2 += 2) {
                __m512bh ke = (__m512bh)_mm512_loadu_si512(kv + c2 * lp + j0);
                __m512bh ko = (__m512bh)_mm512_loadu_si512(kv + (c2 + 1) * lp + j0);
                a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_set1_epi32((int)qi[0][c2]), ke);
                a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_set1_epi32((int)qi[1][c2]), ke);
                b0 = _mm512_dpbf16_ps(b0, (__m512bh)_mm512_set1_epi32((int)qi[0][c2 + 1]), ko);
                b1 = _mm512_dpbf16_ps(b1, (__m512bh)_mm512_set1_epi32((int)qi[1][c2 + 1]), ko);
            }
            if (c2 < d2) {
                __m512bh kk = (__m512bh)_mm512_loadu_si512(kv + c2 * lp + j0);
                a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_set1_epi32((int)qi[0][c2]), kk);
                a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_set1_epi32((int)qi[1][c2]), kk);
            }
            _mm512_storeu_ps(s + j0, _mm512_mul_ps(_mm512_add_ps(a0, b0), vscale));
            _mm512_storeu_ps(s + lp + j0, _mm512_mul_ps(_mm512_add_ps(a1, b1), vscale));
        }
        float inv[2];
        for (int t = 0; t < nq; t++) {
            float *st = s + t * lp;
            __m512 mx = _mm512_set1_ps(-INFINITY);
            for (int64_t j0 = 0; j0 < lp; j0 += 16) mx = _mm512_mask_max_ps(mx, tail16(len - j0), mx, _mm512_loadu_ps(st + j0));
            __m512 vmax = _mm512_set1_ps(_mm512_reduce_max_ps(mx)), sum = _mm512_setzero_ps();
            for (int64_t j0 = 0; j0 < lp; j0 += 16) {
                __m512 e = _mm512_maskz_mov_ps(tail16(len - j0), exp_ps(_mm512_sub_ps(_mm512_loadu_ps(st + j0), vmax)));
                _mm512_storeu_ps(st + j0, e);
                sum = _mm512_add_ps(sum, e);
            }
            inv[t] = 1.f / _mm512_reduce_add_ps(sum);
        }
        for (int64_t c0 = 0; c0 < d; c0 += 16) {
            __mmask16 m = tail16(d - c0);
            __m512 o0 = _mm512_setzero_ps(), o1 = _mm512_setzero_ps(), p0 = _mm512_setzero_ps(), p1 = _mm512_setzero_ps();
            int64_t j = 0;
            for (; j + 1 < len; j += 2) {
                __m512 ve = _mm512_maskz_loadu_ps(m, vf + j * d + c0), vo = _mm512_maskz_loadu_ps(m, vf + (j + 1) * d + c0);
                o0 = _mm512_fmadd_ps(_mm512_set1_ps(s[j]), ve, o0);
                o1 = _mm512_fmadd_ps(_mm512_set1_ps(s[lp + j]), ve, o1);
                p0 = _mm512_fmadd_ps(_mm512_set1_ps(s[j + 1]), vo, p0);
                p1 = _mm512_fmadd_ps(_mm512_set1_ps(s[lp + j + 1]), vo, p1);
            }
            if (j < len) {
                __m512 vv = _mm512_maskz_loadu_ps(m, vf + j * d + c0);
                o0 = _mm512_fmadd_ps(_mm512_set1_ps(s[j]), vv, o0);
                o1 = _mm512_fmadd_ps(_mm512_set1_ps(s[lp + j]), vv, o1);
            }
            __m512 o[2] = {_mm512_mul_ps(_mm512_add_ps(o0, p0), _mm512_set1_ps(inv[0])),
                           _mm512_mul_ps(_mm512_add_ps(o1, p1), _mm512_set1_ps(inv[1]))};
            for (int t = 0; t < nq; t++)
                _mm256_mask_storeu_epi16(out + (i + t) * stride + c0, m, (__m256i)_mm512_cvtneps_pbh(o[t]));
        }
    }
}

/* q, k, v, out [T, heads*d] bf16; row r holds tokens starts[r] .. starts[r] + lengths[r] - 1, none longer
   than max_len. Returns 0, or -1 when a thread's scratch buffer could not be allocated. */
int packed_attention_bf16(const uint16_t *q, const uint16_t *k, const uint16_t *v, uint16_t *out,
                          const int64_t *starts, const int64_t *lengths, int64_t rows, int64_t heads, int64_t d,
                          int64_t max_len) {
    int64_t stride = heads * d, lp = (max_len + 15) / 16 * 16;
    float scale = 1.f / sqrtf((float)d);
    int failed = 0;
#pragma omp parallel reduction(| : failed)
    {
        void *buffer = malloc(sizeof(float) * (size_t)(lp * d / 2 + lp * d + 2 * lp));
        uint32_t *kv = buffer;
        float *vf = (float *)(kv + lp * d / 2), *s = vf + lp * d;
        failed = buffer == NULL;
#pragma omp for schedule(dynamic, 4)
        for (int64_t p = 0; p < rows * heads; p++) {
            if (buffer == NULL) continue;
            int64_t r = p / heads, h = p % heads, off = starts[r] * stride + h * d;
            row_head(q + off, k + off, v + off, out + off, stride, lengths[r], d, scale, kv, vf, s);
        }
        free(buffer);
    }
    return failed ? -1 : 0;
}
