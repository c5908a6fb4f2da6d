/* Many LoRA deltas in one pass over the tokens, for CPUs with AVX512-BF16 (Zen 4, Sapphire Rapids on).
 *
 * y[t] += (x[t] · A[s]ᵀ) · B[s] for every listed token t and its slot s, in place. One token's whole
 * low-rank path stays in registers: its rank-sized intermediate never goes to memory, and y is read
 * and written once. PyTorch's gathered bmm does the same arithmetic in four passes with a fixed cost
 * per batch entry, which at small ranks is most of the time. Built ahead of time by setup.py with
 * explicit ISA flags; its OpenMP (lora_tokens.c) is the libgomp torch already loaded (same soname, and torch is imported
 * before this library), so the calling thread's torch thread count applies and no second thread pool exists.
 *
 * Two neighbouring tokens of one slot (a row's tokens are contiguous) go through together, so each
 * load of A or B serves both.
 *
 * Layouts (bf16 stored as uint16, row-major): x [T, fin], y [T, fout], a [S, rank, fin],
 * bv [S, rank/2, fout, 2] (B with pairs of ranks interleaved, the operand layout of vdpbf16ps).
 * rank is a multiple of 8 and at most LORA_MAX_RANK; module.c checks tokens and slots are in range.
 */
#include <immintrin.h>
#include <stdint.h>

#include "kernels.h"

#ifndef __AVX512BF16__
#error "this kernel needs AVX512-BF16"
#endif

#define MAX_RANK LORA_MAX_RANK
#define INLINE static inline __attribute__((always_inline))

INLINE __mmask32 tail32(int64_t left) { return left >= 32 ? 0xFFFFFFFFu : (__mmask32)((1u << left) - 1u); }

INLINE __mmask16 tail16(int64_t left) { return left <= 0 ? 0 : left >= 16 ? 0xFFFF : (__mmask16)((1u << left) - 1u); }

/* h[t][k] = x[t] · a[k] for nt (1 or 2) tokens that share a, eight ranks per sweep over x. */
INLINE void shrink(int nt, const uint16_t *const *x, const uint16_t *a, int64_t fin, int64_t rank, float (*h)[MAX_RANK]) {
    for (int64_t k0 = 0; k0 < rank; k0 += 8) {
        __m512 acc[2][8];
        for (int t = 0; t < nt; t++)
            for (int k = 0; k < 8; k++) acc[t][k] = _mm512_setzero_ps();
        for (int64_t i = 0; i < fin; i += 32) {
            __mmask32 m = tail32(fin - i);
            __m512bh xv[2];
            for (int t = 0; t < nt; t++) xv[t] = (__m512bh)_mm512_maskz_loadu_epi16(m, x[t] + i);
            for (int k = 0; k < 8; k++) {
                __m512bh av = (__m512bh)_mm512_maskz_loadu_epi16(m, a + (k0 + k) * fin + i);
                for (int t = 0; t < nt; t++) acc[t][k] = _mm512_dpbf16_ps(acc[t][k], xv[t], av);
            }
        }
        for (int t = 0; t < nt; t++)
            for (int k = 0; k < 8; k++) h[t][k0 + k] = _mm512_reduce_add_ps(acc[t][k]);
    }
}

/* Ranks 2·k2 and 2·k2+1 of h as one bf16 pair, broadcast: vdpbf16ps's other operand. */
INLINE __m512bh pair_of(const float *h, int64_t k2) {
    __m128bh p = _mm_cvtneps_pbh(_mm_setr_ps(h[2 * k2], h[2 * k2 + 1], 0.f, 0.f));
    return (__m512bh)_mm512_set1_epi32(_mm_cvtsi128_si32((__m128i)p));
}

/* y += acc for 16 bf16 outputs (masked), rounded once. */
INLINE void add_to(uint16_t *y, __m512 acc, __mmask16 m) {
    __m512i yi = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, y));
    __m512 yf = _mm512_add_ps(_mm512_castsi512_ps(_mm512_slli_epi32(yi, 16)), acc);
    _mm256_mask_storeu_epi16(y, m, (__m256i)_mm512_cvtneps_pbh(yf));
}

/* y[t] += h[t] · b for nt (1 or 2) tokens that share b, 32 outputs at a time. */
INLINE void expand(int nt, const float (*h)[MAX_RANK], const uint16_t *bv, int64_t fout, int64_t rank, uint16_t *const *y) {
    __m512bh hp[2][MAX_RANK / 2];
    for (int t = 0; t < nt; t++)
        for (int64_t k2 = 0; k2 < rank / 2; k2++) hp[t][k2] = pair_of(h[t], k2);
    for (int64_t o = 0; o < fout; o += 32) {
        __mmask16 m0 = tail16(fout - o), m1 = tail16(fout - o - 16);
        __m512 acc[2][2];
        for (int t = 0; t < nt; t++) acc[t][0] = acc[t][1] = _mm512_setzero_ps();
        for (int64_t k2 = 0; k2 < rank / 2; k2++) {
            const uint16_t *row = bv + (k2 * fout + o) * 2;
            __m512bh b0 = (__m512bh)_mm512_maskz_loadu_epi32(m0, row);
            __m512bh b1 = (__m512bh)_mm512_maskz_loadu_epi32(m1, row + 32);
            for (int t = 0; t < nt; t++) {
                acc[t][0] = _mm512_dpbf16_ps(acc[t][0], hp[t][k2], b0);
                acc[t][1] = _mm512_dpbf16_ps(acc[t][1], hp[t][k2], b1);
            }
        }
        for (int t = 0; t < nt; t++) {
            add_to(y[t] + o, acc[t][0], m0);
            if (m1) add_to(y[t] + o + 16, acc[t][1], m1);
        }
    }
}

/* The step lora_tokens.c calls: xs, ys the nt tokens' rows of x and y. */
INLINE void tokens_through(int nt, const void *const *xs, void *const *ys, const void *as, const void *bs, int64_t fin,
                           int64_t fout, int64_t rank) {
    float h[2][MAX_RANK];
    shrink(nt, (const uint16_t *const *)xs, as, fin, rank, h);
    expand(nt, (const float (*)[MAX_RANK])h, bs, fout, rank, (uint16_t *const *)ys);
}

LORA_STEP(step, tokens_through)

void lora_delta_bf16(const uint16_t *x, uint16_t *y, const uint16_t *a, const uint16_t *bv,
                     const int64_t *tokens, const int64_t *slots, int64_t n, int64_t fin, int64_t fout,
                     int64_t rank) {
    lora_over_tokens(step, x, y, a, bv, sizeof(uint16_t), tokens, slots, n, fin, fout, rank);
}
