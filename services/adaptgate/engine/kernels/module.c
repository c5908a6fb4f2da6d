/* adaptgate.engine._cpu_kernels: the Python face of the fused CPU kernels (engine/cpu_kernels.py calls it).
 *
 * Built by setup.py without the kernels' ISA flags, unlike the kernels it calls, so importing it and checking
 * arguments runs on any x86-64 CPU: the import resolves every symbol (the kernels and libgomp) up front,
 * and a CPU without an instruction set can load it and validate against it but never reaches its kernels.
 * engine/cpu_features.py decides which instruction sets this CPU runs and says so through `enable`; until
 * then a call that passes every check raises RuntimeError instead of an illegal instruction.
 *
 * Each function takes tensors as addresses (torch's data_ptr()) with their sizes, checked by the
 * caller (dtype, shape, contiguity). Here every index the kernels follow is checked against those
 * sizes in one pass over the index arrays, cheap beside the kernel itself, so a wrong index is a
 * ValueError rather than a read or write out of bounds. The GIL is released while a kernel runs.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <omp.h>
#include <string.h>

#include "kernels.h"

static int enabled = 0;

static int as_i64(PyObject *o, int64_t *out) {
    long long v = PyLong_AsLongLong(o);
    if (v == -1 && PyErr_Occurred()) return -1;
    *out = (int64_t)v;
    return 0;
}

static int as_ptr(PyObject *o, void **out) {
    void *p = PyLong_AsVoidPtr(o);  /* NULL for an empty tensor: the sizes checked then say nothing is read */
    if (p == NULL && PyErr_Occurred()) return -1;
    *out = p;
    return 0;
}

/* `count` addresses then `ints` integers, positionally. */
static int parse(const char *name, PyObject *const *args, Py_ssize_t nargs, Py_ssize_t count, void **ptrs,
                 Py_ssize_t ints, int64_t *values) {
    if (nargs != count + ints) {
        PyErr_Format(PyExc_TypeError, "%s takes %zd arguments (%zd given)", name, count + ints, nargs);
        return -1;
    }
    for (Py_ssize_t i = 0; i < count; i++)
        if (as_ptr(args[i], &ptrs[i]) < 0) return -1;
    for (Py_ssize_t i = 0; i < ints; i++)
        if (as_i64(args[count + i], &values[i]) < 0) return -1;
    return 0;
}

/* Whether the instruction set `isa` (kernels.h's ISA_*) was enabled, else a RuntimeError. */
static int ready(int isa) {
    if (enabled & isa) return 0;
    PyErr_SetString(PyExc_RuntimeError, "this fused CPU kernel is not enabled on this CPU (engine.cpu_features decides)");
    return -1;
}

/* The first index outside [0, bound), or -1. */
static int64_t out_of_range(const int64_t *index, int64_t n, int64_t bound) {
    int64_t bad = 0;
    for (int64_t i = 0; i < n; i++) bad |= (uint64_t)index[i] >= (uint64_t)bound;
    if (!bad) return -1;
    for (int64_t i = 0; i < n; i++)
        if ((uint64_t)index[i] >= (uint64_t)bound) return i;
    return -1;
}

/* lora_delta(x, y, a, b, tokens, slots, n, fin, fout, rank, total_tokens, n_slots, fp32): in bf16 (fp32 = 0) b is
   B with rank pairs interleaved, [slots, rank/2, fout, 2]; in fp32, B itself, [slots, rank, fout]. */
static PyObject *lora_delta(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    void *p[6];
    int64_t v[7];
    if (parse("lora_delta", args, nargs, 6, p, 7, v) < 0) return NULL;
    int64_t n = v[0], fin = v[1], fout = v[2], rank = v[3], total = v[4], slots = v[5], fp32 = v[6];
    const int64_t *token_index = p[4], *slot_index = p[5];
    if (n < 0 || fin <= 0 || fout <= 0 || total < 0 || slots <= 0)
        return PyErr_Format(PyExc_ValueError, "lora_delta: sizes must be positive (fin %lld, fout %lld, slots %lld)",
                            (long long)fin, (long long)fout, (long long)slots);
    if (rank <= 0 || rank % 8 || rank > LORA_MAX_RANK)
        return PyErr_Format(PyExc_ValueError, "lora_delta: rank %lld must be a multiple of 8 up to %d", (long long)rank,
                            LORA_MAX_RANK);
    int64_t bad = out_of_range(token_index, n, total);
    if (bad >= 0)
        return PyErr_Format(PyExc_ValueError, "lora_delta: tokens[%lld] = %lld is outside x's %lld rows", (long long)bad,
                            (long long)token_index[bad], (long long)total);
    bad = out_of_range(slot_index, n, slots);
    if (bad >= 0)
        return PyErr_Format(PyExc_ValueError, "lora_delta: slots[%lld] = %lld is outside the %lld slots", (long long)bad,
                            (long long)slot_index[bad], (long long)slots);
    if (ready(fp32 ? ISA_AVX2_FMA : ISA_AVX512_BF16) < 0) return NULL;
    Py_BEGIN_ALLOW_THREADS
    if (fp32)
        lora_delta_f32(p[0], p[1], p[2], p[3], token_index, slot_index, n, fin, fout, rank);
    else
        lora_delta_bf16(p[0], p[1], p[2], p[3], token_index, slot_index, n, fin, fout, rank);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* packed_attention(q, k, v, out, starts, lengths, rows, heads, d, max_len, total_tokens): the rows must
   follow each other from token 0 (row r + 1 starts where row r ends); tokens past the last row are zeroed. */
static PyObject *packed_attention(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    void *p[6];
    int64_t v[5];
    if (parse("packed_attention", args, nargs, 6, p, 5, v) < 0) return NULL;
    int64_t rows = v[0], heads = v[1], d = v[2], max_len = v[3], total = v[4];
    const int64_t *starts = p[4], *lengths = p[5];
    if (rows <= 0 || heads <= 0 || d <= 0 || d % 2)
        return PyErr_Format(PyExc_ValueError, "packed_attention: %lld rows of %lld heads of size %lld (an even size)",
                            (long long)rows, (long long)heads, (long long)d);
    if (max_len <= 0 || max_len > total)
        return PyErr_Format(PyExc_ValueError, "packed_attention: longest row %lld is outside 1..%lld tokens",
                            (long long)max_len, (long long)total);
    int64_t end = 0;
    for (int64_t r = 0; r < rows; r++) {
        if (starts[r] != end || lengths[r] < 0 || lengths[r] > max_len)
            return PyErr_Format(PyExc_ValueError,
                                "packed_attention: row %lld (start %lld, length %lld) does not follow at %lld or is longer "
                                "than %lld",
                                (long long)r, (long long)starts[r], (long long)lengths[r], (long long)end, (long long)max_len);
        end += lengths[r];
    }
    if (end > total)
        return PyErr_Format(PyExc_ValueError, "packed_attention: the rows hold %lld tokens, q only %lld", (long long)end,
                            (long long)total);
    if (ready(ISA_AVX512_BF16) < 0) return NULL;
    int failed;
    Py_BEGIN_ALLOW_THREADS
    failed = packed_attention_bf16(p[0], p[1], p[2], p[3], starts, lengths, rows, heads, d, max_len);
    memset((uint16_t *)p[3] + end * heads * d, 0, sizeof(uint16_t) * (size_t)((total - end) * heads * d));
    Py_END_ALLOW_THREADS
    if (failed) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* add_layer_norm(x, residual, gamma, beta, out, rows, h, eps) */
static PyObject *add_layer_norm(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    void *p[5];
    int64_t v[2];
    if (nargs != 8) return PyErr_Format(PyExc_TypeError, "add_layer_norm takes 8 arguments (%zd given)", nargs);
    if (parse("add_layer_norm", args, 7, 5, p, 2, v) < 0) return NULL;
    double eps = PyFloat_AsDouble(args[7]);
    if (eps == -1.0 && PyErr_Occurred()) return NULL;
    int64_t rows = v[0], h = v[1];
    if (rows < 0 || h <= 0 || h > ADD_NORM_MAX_H)
        return PyErr_Format(PyExc_ValueError, "add_layer_norm: hidden size %lld is outside 1..%d", (long long)h, ADD_NORM_MAX_H);
    if (ready(ISA_AVX512_BF16) < 0) return NULL;
    Py_BEGIN_ALLOW_THREADS
    add_layer_norm_bf16(p[0], p[1], p[2], p[3], p[4], rows, h, (float)eps);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *threads(PyObject *self, PyObject *unused) { return PyLong_FromLong(omp_get_max_threads()); }

static PyObject *enable(PyObject *self, PyObject *isa) {
    long bits = PyLong_AsLong(isa);
    if (bits == -1 && PyErr_Occurred()) return NULL;
    enabled |= (int)bits & (ISA_AVX512_BF16 | ISA_AVX2_FMA);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"lora_delta", (PyCFunction)(void (*)(void))lora_delta, METH_FASTCALL, "y[t] += (x[t]·A[s]ᵀ)·B[s] in place."},
    {"packed_attention", (PyCFunction)(void (*)(void))packed_attention, METH_FASTCALL, "Attention within each packed row."},
    {"add_layer_norm", (PyCFunction)(void (*)(void))add_layer_norm, METH_FASTCALL, "LayerNorm(x + residual)."},
    {"threads", threads, METH_NOARGS, "The OpenMP threads a kernel called from this thread would use."},
    {"enable", enable, METH_O, "Let the kernels of these ISA_* bits run: the caller has checked this CPU has them."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, .m_name = "_cpu_kernels", .m_size = -1, .m_methods = methods};

PyMODINIT_FUNC PyInit__cpu_kernels(void) {
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    if (PyModule_AddIntConstant(m, "MAX_RANK", LORA_MAX_RANK) < 0 || PyModule_AddIntConstant(m, "MAX_HIDDEN", ADD_NORM_MAX_H) < 0 ||
        PyModule_AddIntConstant(m, "ISA_AVX512_BF16", ISA_AVX512_BF16) < 0 || PyModule_AddIntConstant(m, "ISA_AVX2_FMA", ISA_AVX2_FMA) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
