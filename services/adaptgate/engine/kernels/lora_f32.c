/* Many LoRA deltas in one pass over the tokens, in fp32, for x86-64 CPUs with AVX2 and FMA.
 *
 * The fp32 sibling of lora.c, for models served in fp32 (CPUs without bf16 arithmetic): y[t] += (x[t] · A[s]ᵀ)
 * · B[s] for every listed token t and its slot s, in place. PyTorch's alternative is a gathered bmm with a
 * copy of A and B per batch entry and a fixed cost per entry, or one small GEMM per adapter; here every
 * adapter's tokens cost the same as one adapter's.
 *
 * lora_tokens.c hands the step runs of up to LORA_MAX_RUN neighbouring tokens of one slot (a row's tokens are
 * contiguous). The step walks A and B in tiles small enough for the L1 cache and runs every token of the run
 * through a tile before the next, so a slot's A and B (larger than L1 for wide layers) are read from further
 * away once per run rather than once per token. Within a tile, tokens go three at a time, so each load of A
 * or B serves three FMAs and both keep 12 independent accumulators in flight, more than the FMA latency
 * needs. Built ahead of time by setup.py with -mavx2 -mfma.
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
#define MAX_RUN LORA_MAX_RUN
#define GROUP 3           /* tokens that go through a tile together (shrink and expand assume 3) */
#define RANKS_PER_SWEEP 4 /* 3 tokens x 4 ranks of accumulators, 3 vectors of x and one of A: 16 ymm registers */
#define EXPAND_VECTORS 4  /* 3 tokens x 4 vectors of accumulators, a broadcast of h per token and one of B: 16 */
#define TILE 4096         /* floats of A or B (16 KB) every token of a run goes through before the next tile */
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

/* v, kept in a register: GCC otherwise folds the load of a vector two FMAs share into each of them, which
 * doubles the loads, and the loads, not the FMAs, then bound the loop. */
INLINE __m256 in_register(__m256 v) {
    __asm__("" : "+x"(v));
    return v;
}

/* The four sums of acc[0..3]'s lanes, in order. */
INLINE __m128 hsum4(const __m256 *acc) {
    __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3]));
    return _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
}

/* acc[t][k] += x[t][i..i+8] * a[k][i..i+8] for one column block of the shrink. */
INLINE void shrink_step(int nt, const float *const *x, const float *a, int64_t fin, int64_t i, int masked, __m256i m,
                        __m256 (*acc)[RANKS_PER_SWEEP]) {
    __m256 xv[GROUP];
    for (int t = 0; t < nt; t++) xv[t] = load8(x[t] + i, masked, m);
    for (int k = 0; k < RANKS_PER_SWEEP; k++) {
        __m256 av = in_register(load8(a + k * fin + i, masked, m));
        for (int t = 0; t < nt; t++) acc[t][k] = _mm256_fmadd_ps(xv[t], av, acc[t][k]);
    }
}

/* h[t][k] (+)= x[t][i0..i1] · a[k][i0..i1] for nt (up to GROUP) tokens, RANKS_PER_SWEEP ranks per sweep; `first`
 * sets h rather than adding to it. i0 is a multiple of 8, and so is i1 unless it is fin. */
INLINE void shrink_tile(int nt, const float *const *x, const float *a, int64_t fin, int64_t rank, int64_t i0,
                        int64_t i1, int first, float (*h)[MAX_RANK]) {
    int64_t full = i0 + ((i1 - i0) & ~(int64_t)7);
    __m256i tail = tail8(i1 - full);
    for (int64_t k0 = 0; k0 < rank; k0 += RANKS_PER_SWEEP) {
        __m256 acc[GROUP][RANKS_PER_SWEEP];
        for (int t = 0; t < nt; t++)
            for (int k = 0; k < RANKS_PER_SWEEP; k++) acc[t][k] = _mm256_setzero_ps();
        const float *ak = a + k0 * fin;
        for (int64_t i = i0; i < full; i += 8) shrink_step(nt, x, ak, fin, i, 0, tail, acc);
        if (full < i1) shrink_step(nt, x, ak, fin, full, 1, tail, acc);
        for (int t = 0; t < nt; t++) {
            __m128 sums = hsum4(acc[t]);
            _mm_storeu_ps(&h[t][k0], first ? sums : _mm_add_ps(sums, _mm_loadu_ps(&h[t][k0])));
        }
    }
}

/* h[t] = x[t] · aᵀ for the nt tokens of a run, a tile of A's columns at a time. */
INLINE void shrink(int nt, const float *const *x, const float *a, int64_t fin, int64_t rank, float (*h)[MAX_RANK]) {
    int64_t width = (TILE / rank) & ~(int64_t)7; /* rank <= MAX_RANK keeps it at least 8 */
    for (int64_t i0 = 0; i0 < fin; i0 += width) {
        int64_t i1 = i0 + width < fin ? i0 + width : fin;
        int t = 0;
        for (; t + GROUP <= nt; t += GROUP) shrink_tile(GROUP, x + t, a, fin, rank, i0, i1, i0 == 0, h + t);
        if (nt - t == 2) /* what the groups of 3 leave: two tokens or one */
            shrink_tile(2, x + t, a, fin, rank, i0, i1, i0 == 0, h + t);
        else if (nt - t == 1)
            shrink_tile(1, x + t, a, fin, rank, i0, i1, i0 == 0, h + t);
    }
}

/* y[t][o..o+8v] += h[t] · b[:, o..o+8v] for nt (up to GROUP) tokens; y is read and written once. The last of the v
 * vectors is partial when `masked` (mask m). */
INLINE void expand_block(int nt, int v, const float (*h)[MAX_RANK], const float *b, int64_t fout, int64_t rank,
                         float *const *y, int64_t o, int masked, __m256i m) {
    __m256 acc[GROUP][EXPAND_VECTORS];
    for (int t = 0; t < nt; t++)
        for (int j = 0; j < v; j++) acc[t][j] = _mm256_setzero_ps();
    for (int64_t k = 0; k < rank; k++) {
        __m256 hk[GROUP];
        for (int t = 0; t < nt; t++) hk[t] = _mm256_broadcast_ss(&h[t][k]);
        for (int j = 0; j < v; j++) {
            __m256 bv = in_register(load8(b + k * fout + o + 8 * j, masked && j == v - 1, m));
            for (int t = 0; t < nt; t++) acc[t][j] = _mm256_fmadd_ps(hk[t], bv, acc[t][j]);
        }
    }
    for (int t = 0; t < nt; t++)
        for (int j = 0; j < v; j++) {
            float *p = y[t] + o + 8 * j;
            int last = masked && j == v - 1;
            store8(p, _mm256_add_ps(load8(p, last, m), acc[t][j]), last, m);
        }
}

/* y[t][o0..o1] += h[t] · b[:, o0..o1] for nt (up to GROUP) tokens, EXPAND_VECTORS vectors at a time. o0 is a multiple
 * of 8, and so is o1 unless it is fout. */
INLINE void expand_tile(int nt, const float (*h)[MAX_RANK], const float *b, int64_t fout, int64_t rank, float *const *y,
                        int64_t o0, int64_t o1) {
    __m256i none = _mm256_setzero_si256();
    int64_t o = o0;
    for (; o + 8 * EXPAND_VECTORS <= o1; o += 8 * EXPAND_VECTORS)
        expand_block(nt, EXPAND_VECTORS, h, b, fout, rank, y, o, 0, none);
    for (; o + 8 <= o1; o += 8) expand_block(nt, 1, h, b, fout, rank, y, o, 0, none);
    if (o < o1) expand_block(nt, 1, h, b, fout, rank, y, o, 1, tail8(o1 - o));
}

/* y[t] += h[t] · b for the nt tokens of a run, a tile of B's columns at a time. */
INLINE void expand(int nt, const float (*h)[MAX_RANK], const float *b, int64_t fout, int64_t rank, float *const *y) {
    int64_t width = TILE / rank / (8 * EXPAND_VECTORS) * (8 * EXPAND_VECTORS);
    if (width == 0) width = 8 * EXPAND_VECTORS;
    for (int64_t o0 = 0; o0 < fout; o0 += width) {
        int64_t o1 = o0 + width < fout ? o0 + width : fout;
        int t = 0;
        for (; t + GROUP <= nt; t += GROUP) expand_tile(GROUP, h + t, b, fout, rank, y + t, o0, o1);
        if (nt - t == 2)
            expand_tile(2, h + t, b, fout, rank, y + t, o0, o1);
        else if (nt - t == 1)
            expand_tile(1, h + t, b, fout, rank, y + t, o0, o1);
    }
}

/* The step lora_over_runs calls: xs, ys the rows of x and y of a run of nt tokens of one slot. */
static void step(int nt, const void *const *xs, void *const *ys, const void *as, const void *bs, int64_t fin,
                 int64_t fout, int64_t rank) {
    float h[MAX_RUN][MAX_RANK];
    shrink(nt, (const float *const *)xs, as, fin, rank, h);
    expand(nt, (const float (*)[MAX_RANK])h, bs, fout, rank, (float *const *)ys);
}

void lora_delta_f32(const float *x, float *y, const float *a, const float *b, const int64_t *tokens, const int64_t *slots,
                    int64_t n, int64_t fin, int64_t fout, int64_t rank) {
    lora_over_runs(step, MAX_RUN, x, y, a, b, sizeof(float), tokens, slots, n, fin, fout, rank);
}
