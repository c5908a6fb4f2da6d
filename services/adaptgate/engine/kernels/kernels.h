/* The fused CPU kernels (lora.c, attention.c, add_norm.c, compiled for AVX512-BF16; lora_f32.c, for AVX2 and
 * FMA) as module.c calls them.
 * They trust their arguments: module.c checks every index and size first. bf16 is stored as uint16_t. */
#ifndef ADAPTGATE_KERNELS_H
#define ADAPTGATE_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#define LORA_MAX_RANK 64     /* lora.c keeps a token's rank-sized intermediate in registers */
#define LORA_MAX_RUN 32      /* the most neighbouring tokens of one slot lora_over_runs hands a step at once */
/* The instruction sets module.c's `enable` lets run: a kernel runs only once its set is enabled. */
#define ISA_AVX512_BF16 1 /* lora.c, attention.c, add_norm.c */
#define ISA_AVX2_FMA 2    /* lora_f32.c */
#define ADD_NORM_MAX_H 8192  /* add_norm.c's per-thread scratch row: 32 KB of stack */

/* One LoRA kernel's step: y[t] += (x[t]·Aᵀ)·B for nt tokens of one slot (1 or 2 from lora_over_tokens, up to
 * max_run from lora_over_runs), whose rows of x and y are xs[t], ys[t] and whose slot's A and B are `as`, `bs`. */
typedef void (*lora_step)(int nt, const void *const *xs, void *const *ys, const void *as, const void *bs, int64_t fin,
                          int64_t fout, int64_t rank);

/* A lora_step that calls a kernel's inline `through(nt, ...)` with nt a constant, so each of the two is specialised. */
#define LORA_STEP(name, through)                                                                                    \
    static void name(int nt, const void *const *xs, void *const *ys, const void *as, const void *bs, int64_t fin,  \
                     int64_t fout, int64_t rank) {                                                                  \
        if (nt == 2)                                                                                                \
            through(2, xs, ys, as, bs, fin, fout, rank);                                                            \
        else                                                                                                        \
            through(1, xs, ys, as, bs, fin, fout, rank);                                                            \
    }

/* Every listed token through `step`, split across the calling thread's OpenMP team (lora_tokens.c); `element`
 * is the size of one value of x, y, A and B, from which each token's rows and each slot's A and B are found. */
void lora_over_tokens(lora_step step, const void *x, void *y, const void *a, const void *b, size_t element,
                      const int64_t *tokens, const int64_t *slots, int64_t n, int64_t fin, int64_t fout, int64_t rank);
/* The same with runs of up to max_run (at most LORA_MAX_RUN) tokens; lora_over_tokens is max_run 2. */
void lora_over_runs(lora_step step, int max_run, const void *x, void *y, const void *a, const void *b, size_t element,
                    const int64_t *tokens, const int64_t *slots, int64_t n, int64_t fin, int64_t fout, int64_t rank);

void lora_delta_bf16(const uint16_t *x, uint16_t *y, const uint16_t *a, const uint16_t *bv, const int64_t *tokens,
                     const int64_t *slots, int64_t n, int64_t fin, int64_t fout, int64_t rank);

void lora_delta_f32(const float *x, float *y, const float *a, const float *b, const int64_t *tokens, const int64_t *slots,
                    int64_t n, int64_t fin, int64_t fout, int64_t rank);

int packed_attention_bf16(const uint16_t *q, const uint16_t *k, const uint16_t *v, uint16_t *out, const int64_t *starts,
                          const int64_t *lengths, int64_t rows, int64_t heads, int64_t d, int64_t max_len);

void add_layer_norm_bf16(const uint16_t *x, const uint16_t *r, const uint16_t *gamma, const uint16_t *beta,
                         uint16_t *out, int64_t rows, int64_t h, float eps);

#endif
