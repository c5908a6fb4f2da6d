/* Many LoRA deltas in one pass over the tokens, for CPUs with AVX512-BF16 (Zen 4, Sapphire Rapids on).
 *
 * y[t] += (x[t] · A[s]ᵀ) · B[s] for every listed token t and its slot s, in place. One token's whole
 * low-rank path stays in registers: its rank-sized intermediate never goes to memory, and y is read
 * and written once. PyTorch's gathered bmm does the same arithmetic in four passes with a fixed cost
 * per batch entry, which at rank 8 is most of the time. Built at run time by lora_kernel.py
 * (`-march=native -fopenmp`); its OpenMP is the libgomp torch already loaded (same soname), so the
 * calling thread's torch thread count applies.
 *
 * Layouts (bf16 stored as uint16, row-major): x [T, fin], y [T, fout], a [S, rank, fin],
 * bv [S, rank/2, fout, 2] (B with pairs of ranks interleaved, the operand layout of vdpbf16ps).
 * rank is even and at most MAX_RANK.
 */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>

#ifndef __AVX512BF16__
#error "this kernel needs AVX512-BF16"
#endif

#define MAX_RANK 64

int lora_max_rank(void) { return MAX_RANK; }

int lora_threads(void) { return omp_get_max_threads(); }

static inline __mmask32 tail32(int64_t left) { return left >= 32 ? 0xFFFFFFFFu : (__mmask32)((1u << left) - 1u); }

static inline __mmask16 tail16(int64_t left) { return left >= 16 ? 0xFFFF : (__mmask16)((1u << left) - 1u); }

/* h[k] = x · a[k] for k < rank, eight ranks per sweep over x. */
static void shrink(const uint16_t *x, const uint16_t *a, int64_t fin, int64_t rank, float *h) {
    for (int64_t k0 = 0; k0 < rank; k0 += 8) {
        int kn = rank - k0 < 8 ? (int)(rank - k0) : 8;
        __m512 acc[8];
        for (int k = 0; k < 8; k++) acc[k] = _mm512_setzero_ps();
        for (int64_t i = 0; i < fin; i += 32) {
            __mmask32 m = tail32(fin - i);
            __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(m, x + i);
            for (int k = 0; k < kn; k++) {
                __m512bh av = (__m512bh)_mm512_maskz_loadu_epi16(m, a + (k0 + k) * fin + i);
                acc[k] = _mm512_dpbf16_ps(acc[k], xv, av);
            }
        }
        for (int k = 0; k < kn; k++) h[k0 + k] = _mm512_reduce_add_ps(acc[k]);
    }
}

/* y += h · b, sixteen outputs at a time; h is rounded to bf16 pairs, y is rounded once at the end. */
static void expand(const float *h, const uint16_t *bv, int64_t fout, int64_t rank, uint16_t *y) {
    int32_t pairs[MAX_RANK / 2];
    for (int64_t k2 = 0; k2 < rank / 2; k2++) {
        __m128bh p = _mm_cvtneps_pbh(_mm_setr_ps(h[2 * k2], h[2 * k2 + 1], 0.f, 0.f));
        pairs[k2] = _mm_cvtsi128_si32((__m128i)p);
    }
    for (int64_t o = 0; o < fout; o += 16) {
        __mmask16 m = tail16(fout - o);
        __m512 acc = _mm512_setzero_ps();
        for (int64_t k2 = 0; k2 < rank / 2; k2++) {
            __m512bh bk = (__m512bh)_mm512_maskz_loadu_epi32(m, bv + (k2 * fout + o) * 2);
            acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_set1_epi32(pairs[k2]), bk);
        }
        __m512i yi = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, y + o));
        __m512 yf = _mm512_add_ps(_mm512_castsi512_ps(_mm512_slli_epi32(yi, 16)), acc);
        _mm256_mask_storeu_epi16(y + o, m, (__m256i)_mm512_cvtneps_pbh(yf));
    }
}

void lora_delta_bf16(const uint16_t *x, uint16_t *y, const uint16_t *a, const uint16_t *bv,
                     const int64_t *tokens, const int64_t *slots, int64_t n, int64_t fin, int64_t fout,
                     int64_t rank) {
#pragma omp parallel for schedule(static)
    for (int64_t j = 0; j < n; j++) {
        float h[MAX_RANK];
        shrink(x + tokens[j] * fin, a + slots[j] * rank * fin, fin, rank, h);
        expand(h, bv + slots[j] * rank * fout, fout, rank, y + tokens[j] * fout);
    }
}
