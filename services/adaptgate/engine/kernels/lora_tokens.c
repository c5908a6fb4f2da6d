/* The loop both LoRA kernels (lora.c in bf16, lora_f32.c in fp32) run their tokens in.
 *
 * Compiled without ISA flags (like module.c): it only splits the listed tokens across the calling thread's
 * OpenMP team (torch's libgomp, see lora.c) and hands each run of neighbouring tokens of one slot (one or two
 * for lora.c, up to LORA_MAX_RUN for lora_f32.c) to the kernel's own step, which reads that slot's A and B once
 * for the whole run.
 */
#include <omp.h>
#include <stddef.h>

#include "kernels.h"

void lora_over_runs(lora_step step, int max_run, const void *x, void *y, const void *a, const void *b, size_t element,
                    const int64_t *tokens, const int64_t *slots, int64_t n, int64_t fin, int64_t fout, int64_t rank) {
    const char *x_bytes = x, *a_bytes = a, *b_bytes = b;
    char *y_bytes = y;
#pragma omp parallel
    {
        int64_t threads = omp_get_num_threads(), me = omp_get_thread_num();
        int64_t end = n * (me + 1) / threads;
        for (int64_t j = n * me / threads; j < end;) {
            int nt = 1;
            while (nt < max_run && j + nt < end && slots[j + nt] == slots[j]) nt++;
            const void *xs[LORA_MAX_RUN];
            void *ys[LORA_MAX_RUN];
            for (int t = 0; t < nt; t++) {
                xs[t] = x_bytes + (size_t)(tokens[j + t] * fin) * element;
                ys[t] = y_bytes + (size_t)(tokens[j + t] * fout) * element;
            }
            const void *as = a_bytes + (size_t)(slots[j] * rank * fin) * element;
            const void *bs = b_bytes + (size_t)(slots[j] * rank * fout) * element; /* bf16's interleaved B: as many */
            step(nt, xs, ys, as, bs, fin, fout, rank);
            j += nt;
        }
    }
}

void lora_over_tokens(lora_step step, const void *x, void *y, const void *a, const void *b, size_t element,
                      const int64_t *tokens, const int64_t *slots, int64_t n, int64_t fin, int64_t fout, int64_t rank) {
    lora_over_runs(step, 2, x, y, a, b, element, tokens, slots, n, fin, fout, rank);
}
