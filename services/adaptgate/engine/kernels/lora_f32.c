/* Many LoRA deltas in one pass over the tokens, in fp32, for x86-64 CPUs with AVX2 and FMA.
 *
 * The fp32 sibling of lora.c, for models served in fp32 (CPUs without bf16 arithmetic): y[t] += (x[t] · A[s]ᵀ)
 * · B[s] for every listed token t and its slot s, in place. PyTorch's alternative is a gathered bmm with a
 * copy of A and B per batch entry and a fixed cost per entry, or one small GEMM per adapter; here every
 * adapter's tokens cost the same as one adapter's, and a token's rank-sized intermediate stays in registers.
 *
 * Two neighbouring tokens of one slot (a row's tokens are contiguous) go through together, so each load of A
 * or B serves both. Built ahead of time by setup.py with -mavx2 -mfma; lora_tokens.c splits the tokens across threads.
 *
 * Layouts (fp32, row-major): x [T, fin], y [T, fout], a [S, rank, fin], b [S, rank, fout]. rank is a
 * multiple of 8 and at most LORA_MAX_RANK; module.c checks tokens and slots are in range.
 */
#include <immintrin.h>
#include <stdint.h>

#include "kernels.h"

#if !defined(__AVX2__) || !defined(__FMA__)
#error "this kernel needs AVX2 and FMA"
#endif

#define MAX_RANK LORA_MAX_RANK
#define RANKS_PER_SWEEP 4 /* 2 tokens x 4 ranks of accumulators, plus the loads, fit the 16 ymm registers */
#define INLINE static inline __attribute__((always_inline))

/* The first `left` of 8 lanes (none when left <= 0): the mask of a row's last, partial vector. */
INLINE __m256i tail8(int64_t left) {
    int n = left <= 0 ? 0 : left >= 8 ? 8 : (int)left;
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

INLINE __m256 load8(const float *p, int masked, __m256i m) { return masked ? _mm256_maskload_ps(p, m) : _mm256_loadu_ps(p); }

INLINE void store8(float *p, __m256 v, int masked, __m256i m) {
    if (masked)
        _mm256_maskstore_ps(p, m, v);
    else
        _mm256_storeu_ps(p, v);
}

INLINE float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* acc[t][k] += x[t][i..i+8] * a[k][i..i+8] for one column block of the shrink. */
INLINE void shrink_step(int nt, const float *const *x, const float *a, int64_t fin, int64_t i, int masked, __m256i m,
                        __m256 (*acc)[RANKS_PER_SWEEP]) {
    __m256 xv[2];
    for (int t = 0; t < nt; t++) xv[t] = load8(x[t] + i, masked, m);
    for (int k = 0; k < RANKS_PER_SWEEP; k++) {
        __m256 av = load8(a + k * fin + i, masked, m);
        for (int t = 0; t < nt; t++) acc[t][k] = _mm256_fmadd_ps(xv[t], av, acc[t][k]);
    }
}

/* h[t][k] = x[t] · a[k] for nt (1 or 2) tokens that share a, RANKS_PER_SWEEP ranks per sweep over x. */
INLINE void shrink(int nt, const float *const *x, const float *a, int64_t fin, int64_t rank, float (*h)[MAX_RANK]) {
    int64_t full = fin & ~(int64_t)7;
    __m256i tail = tail8(fin - full);
    for (int64_t k0 = 0; k0 < rank; k0 += RANKS_PER_SWEEP) {
        __m256 acc[2][RANKS_PER_SWEEP];
        for (int t = 0; t < nt; t++)
            for (int k = 0; k < RANKS_PER_SWEEP; k++) acc[t][k] = _mm256_setzero_ps();
        const float *ak = a + k0 * fin;
        for (int64_t i = 0; i < full; i += 8) shrink_step(nt, x, ak, fin, i, 0, tail, acc);
        if (full < fin) shrink_step(nt, x, ak, fin, full, 1, tail, acc);
        for (int t = 0; t < nt; t++)
            for (int k = 0; k < RANKS_PER_SWEEP; k++) h[t][k0 + k] = hsum(acc[t][k]);
    }
}

/* y[t][o..o+16] += h[t] · b[:, o..o+16] for nt tokens; y is read and written once. */
INLINE void expand_block(int nt, const float (*h)[MAX_RANK], const float *b, int64_t fout, int64_t rank, float *const *y,
                         int64_t o, int masked, __m256i m0, __m256i m1) {
    __m256 acc[2][2];
    for (int t = 0; t < nt; t++) {
        acc[t][0] = load8(y[t] + o, masked, m0);
        acc[t][1] = load8(y[t] + o + 8, masked, m1);
    }
    for (int64_t k = 0; k < rank; k++) {
        __m256 b0 = load8(b + k * fout + o, masked, m0), b1 = load8(b + k * fout + o + 8, masked, m1);
        for (int t = 0; t < nt; t++) {
            __m256 hk = _mm256_broadcast_ss(&h[t][k]);
            acc[t][0] = _mm256_fmadd_ps(hk, b0, acc[t][0]);
            acc[t][1] = _mm256_fmadd_ps(hk, b1, acc[t][1]);
        }
    }
    for (int t = 0; t < nt; t++) {
        store8(y[t] + o, acc[t][0], masked, m0);
        store8(y[t] + o + 8, acc[t][1], masked, m1);
    }
}

INLINE void expand(int nt, const float (*h)[MAX_RANK], const float *b, int64_t fout, int64_t rank, float *const *y) {
    int64_t full = fout & ~(int64_t)15;
    __m256i all = tail8(8);
    for (int64_t o = 0; o < full; o += 16) expand_block(nt, h, b, fout, rank, y, o, 0, all, all);
    if (full < fout) expand_block(nt, h, b, fout, rank, y, full, 1, tail8(fout - full), tail8(fout - full - 8));
}

/* The step lora_tokens.c calls: xs, ys the nt tokens' rows of x and y. */
INLINE void tokens_through(int nt, const void *const *xs, void *const *ys, const void *as, const void *bs, int64_t fin,
                           int64_t fout, int64_t rank) {
    float h[2][MAX_RANK];
    shrink(nt, (const float *const *)xs, as, fin, rank, h);
    expand(nt, (const float (*)[MAX_RANK])h, bs, fout, rank, (float *const *)ys);
}

LORA_STEP(step, tokens_through)

void lora_delta_f32(const float *x, float *y, const float *a, const float *b, const int64_t *tokens, const int64_t *slots,
                    int64_t n, int64_t fin, int64_t fout, int64_t rank) {
    lora_over_tokens(step, x, y, a, b, sizeof(float), tokens, slots, n, fin, fout, rank);
}
