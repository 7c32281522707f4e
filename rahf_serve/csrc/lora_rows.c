/* The LoRA of one-token rows, each on its own slot: y[t] += B_s^T (A_s x[t]) for every row (t, s).
 *
 * Why C: on a CPU decode step each row is two matrix-vector products over factors of ~36 KB, and torch's
 * batched matmul spends more on each small product than reading its bytes takes (benchmarks/
 * lora_layout_bench.py). Here a row costs one pass over its A and one over its B, read where they lie in
 * the slot tensors, and a module costs one call for all its rows.
 *
 * Layout (rahf_serve/lora_slots.py): A of slot s starts at A + s * a_stride, rank k's row of `in` floats
 * at + k * in; B is stored transposed, rank k's row of `out` floats at B + s * b_stride + k * out. x and y
 * are row-major with row strides ldx and ldy (y may be a column slice of a wider output). tokens: the
 * rows' positions in x and y, or NULL for 0 .. n-1. Each row's arithmetic depends on that row alone, so
 * a row's result does not change with the batch around it. What stays fixed for a step (the rows) and for
 * a module (its factors) comes in two structs made once, so a call converts six arguments, not fourteen.
 *
 * Sums run in independent lanes of ranks (eight, then four, then one), vectorised with `omp simd` (no
 * OpenMP runtime is linked: -fopenmp-simd only enables the pragmas).
 *
 * `site` does the modules that read one input and add into one output (q/k/v, gate/up) in one call:
 * inside a forward, each call from Python costs several times what it costs in a tight loop (its code and
 * data are cold after the weights streamed by), so a decode step makes four calls a layer, not seven.
 * Each module reaches its group's plan through a cell its SlotLinear keeps pointed at it.
 *
 * Built as a Python extension module (`lora_rows`, two METH_FASTCALL functions at the end), not a plain
 * library called through ctypes: inside a forward a ctypes call converting seven integers through libffi
 * took ~4.5 us, a direct call taking four ~1 us, and a step makes 120 of them.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

struct rahf_rows {
    int64_t n;
    const int64_t *tokens;
    const int64_t *slots;
    int64_t r;
};

struct rahf_factors {
    int64_t in, out;
    const float *A;
    int64_t a_stride;
    const float *B;
    int64_t b_stride;
};

/* Start the streams of a row's factors, the first two lines of each rank's A and B row: issued together,
 * their first misses overlap instead of each pass waiting on its own (about a tenth off a step's kernel
 * time, benchmarks/adapter_row_bench.py). */
static inline void prefetch_row(const float *a, const float *b, int64_t r, int64_t in, int64_t out)
{
    for (int64_t k = 0; k < r; k++) {
        __builtin_prefetch(a + k * in);
        __builtin_prefetch(a + k * in + 16);
        __builtin_prefetch(b + k * out);
        __builtin_prefetch(b + k * out + 16);
    }
}

/* h[k] = A[k] . x for k < r: ranks in blocks of eight lanes (eight streams read at once), then four, then one. */
static inline void shrink(const float *a, int64_t r, int64_t in, const float *restrict x, float *restrict h)
{
    int64_t k = 0;
    for (; k + 8 <= r; k += 8) {
        const float *restrict a0 = a + k * in, *restrict a1 = a0 + in, *restrict a2 = a1 + in,
                    *restrict a3 = a2 + in, *restrict a4 = a3 + in, *restrict a5 = a4 + in,
                    *restrict a6 = a5 + in, *restrict a7 = a6 + in;
        float s0 = 0, s1 = 0, s2 = 0, s3 = 0, s4 = 0, s5 = 0, s6 = 0, s7 = 0;
#pragma omp simd reduction(+:s0, s1, s2, s3, s4, s5, s6, s7)
        for (int64_t j = 0; j < in; j++) {
            const float v = x[j];
            s0 += a0[j] * v;
            s1 += a1[j] * v;
            s2 += a2[j] * v;
            s3 += a3[j] * v;
            s4 += a4[j] * v;
            s5 += a5[j] * v;
            s6 += a6[j] * v;
            s7 += a7[j] * v;
        }
        h[k] = s0, h[k + 1] = s1, h[k + 2] = s2, h[k + 3] = s3;
        h[k + 4] = s4, h[k + 5] = s5, h[k + 6] = s6, h[k + 7] = s7;
    }
    for (; k + 4 <= r; k += 4) {
        const float *restrict a0 = a + k * in, *restrict a1 = a0 + in, *restrict a2 = a1 + in,
                    *restrict a3 = a2 + in;
        float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+:s0, s1, s2, s3)
        for (int64_t j = 0; j < in; j++) {
            const float v = x[j];
            s0 += a0[j] * v;
            s1 += a1[j] * v;
            s2 += a2[j] * v;
            s3 += a3[j] * v;
        }
        h[k] = s0, h[k + 1] = s1, h[k + 2] = s2, h[k + 3] = s3;
    }
    for (; k < r; k++) {
        const float *restrict a0 = a + k * in;
        float s0 = 0;
#pragma omp simd reduction(+:s0)
        for (int64_t j = 0; j < in; j++)
            s0 += a0[j] * x[j];
        h[k] = s0;
    }
}

/* y += sum_k h[k] B[k], in the same blocks of ranks. */
static inline void expand(const float *b, int64_t r, int64_t out, const float *h, float *restrict y)
{
    int64_t k = 0;
    for (; k + 8 <= r; k += 8) {
        const float *restrict b0 = b + k * out, *restrict b1 = b0 + out, *restrict b2 = b1 + out,
                    *restrict b3 = b2 + out, *restrict b4 = b3 + out, *restrict b5 = b4 + out,
                    *restrict b6 = b5 + out, *restrict b7 = b6 + out;
        const float h0 = h[k], h1 = h[k + 1], h2 = h[k + 2], h3 = h[k + 3], h4 = h[k + 4], h5 = h[k + 5],
                    h6 = h[k + 6], h7 = h[k + 7];
#pragma omp simd
        for (int64_t j = 0; j < out; j++)
            y[j] += h0 * b0[j] + h1 * b1[j] + h2 * b2[j] + h3 * b3[j] + h4 * b4[j] + h5 * b5[j] + h6 * b6[j]
                    + h7 * b7[j];
    }
    for (; k + 4 <= r; k += 4) {
        const float *restrict b0 = b + k * out, *restrict b1 = b0 + out, *restrict b2 = b1 + out,
                    *restrict b3 = b2 + out;
        const float h0 = h[k], h1 = h[k + 1], h2 = h[k + 2], h3 = h[k + 3];
#pragma omp simd
        for (int64_t j = 0; j < out; j++)
            y[j] += h0 * b0[j] + h1 * b1[j] + h2 * b2[j] + h3 * b3[j];
    }
    for (; k < r; k++) {
        const float *restrict b0 = b + k * out;
        const float h0 = h[k];
#pragma omp simd
        for (int64_t j = 0; j < out; j++)
            y[j] += h0 * b0[j];
    }
}

static void lora_rows(const struct rahf_rows *rows, const struct rahf_factors *f, const float *x, int64_t ldx,
                      float *y, int64_t ldy)
{
    const int64_t n = rows->n, r = rows->r, in = f->in, out = f->out;
    const int64_t *tokens = rows->tokens, *slots = rows->slots;
    const float *A = f->A, *B = f->B;
    const int64_t a_stride = f->a_stride, b_stride = f->b_stride;
    float h[r > 0 ? r : 1];
    if (n > 0)
        prefetch_row(A + slots[0] * a_stride, B + slots[0] * b_stride, r, in, out);
    for (int64_t i = 0; i < n; i++) {
        if (i + 1 < n)  /* the next row's streams start while this one computes */
            prefetch_row(A + slots[i + 1] * a_stride, B + slots[i + 1] * b_stride, r, in, out);
        const int64_t t = tokens ? tokens[i] : i;
        shrink(A + slots[i] * a_stride, r, in, x + t * ldx, h);
        expand(B + slots[i] * b_stride, r, out, h, y + t * ldy);
    }
}

/* A module group's plan for the step, as lora_slots._Rows.publish writes it. */
enum { RAHF_NONE = 0, RAHF_ROWS = 1, RAHF_OTHER = 2 };

struct rahf_plan {
    int64_t state;                 /* NONE: no row uses these modules' slots; ROWS: every LoRA row is one
                                      token, at `rows`; OTHER: more than this kernel does (prompt chunks) */
    int64_t total;                 /* the step's token count */
    const struct rahf_rows *rows;
};

struct rahf_site_module {
    const struct rahf_plan *const *plan;    /* the module's cell, holding its group's plan */
    const struct rahf_factors *f;
    int64_t column;                          /* where its output starts in y's rows */
};

/* A site: modules reading x [total, ldx] and adding into y [total, ldy], both rows contiguous. */
struct rahf_site {
    int64_t n, ldx, ldy;
    const struct rahf_site_module *m;
};

/* Every module's rows, or nothing at all (returning 0) when one of them needs more than the kernel or
 * its plan was made for another token count than `total`: the caller then takes its own path. */
static int lora_site(const struct rahf_site *s, int64_t total, const float *x, float *y)
{
    const struct rahf_site_module *m = s->m;
    for (int64_t i = 0; i < s->n; i++) {
        const struct rahf_plan *p = *m[i].plan;
        if (p->state == RAHF_OTHER || (p->state == RAHF_ROWS && p->total != total))
            return 0;
    }
    for (int64_t i = 0; i < s->n; i++) {
        const struct rahf_plan *p = *m[i].plan;
        if (p->state == RAHF_ROWS)
            lora_rows(p->rows, m[i].f, x, s->ldx, y + m[i].column, s->ldy);
    }
    return 1;
}

/* The Python side passes addresses as ints (lora_kernel.py owns every struct and shape; nothing is checked
 * here but the argument count and that each is an int). */
static int int_args(PyObject *const *args, Py_ssize_t nargs, Py_ssize_t want, const char *name, int64_t *out)
{
    if (nargs != want) {
        PyErr_Format(PyExc_TypeError, "%s takes %zd ints (%zd given)", name, want, nargs);
        return -1;
    }
    for (Py_ssize_t i = 0; i < want; i++) {
        out[i] = PyLong_AsLongLong(args[i]);
        if (out[i] == -1 && PyErr_Occurred())
            return -1;
    }
    return 0;
}

/* rows(&rahf_rows, &rahf_factors, x, ldx, y, ldy): one module's rows. */
static PyObject *py_rows(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    int64_t a[6];
    if (int_args(args, nargs, 6, "rows", a) < 0)
        return NULL;
    lora_rows((const struct rahf_rows *)(intptr_t)a[0], (const struct rahf_factors *)(intptr_t)a[1],
              (const float *)(intptr_t)a[2], a[3], (float *)(intptr_t)a[4], a[5]);
    Py_RETURN_NONE;
}

/* site(&rahf_site, total, x, y) -> whether it did the rows. */
static PyObject *py_site(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    int64_t a[4];
    if (int_args(args, nargs, 4, "site", a) < 0)
        return NULL;
    return PyBool_FromLong(lora_site((const struct rahf_site *)(intptr_t)a[0], a[1], (const float *)(intptr_t)a[2],
                                     (float *)(intptr_t)a[3]));
}

static PyMethodDef methods[] = {
    {"rows", (PyCFunction)(void (*)(void))py_rows, METH_FASTCALL, "one module's one-token rows"},
    {"site", (PyCFunction)(void (*)(void))py_site, METH_FASTCALL, "a site's modules' rows, or nothing"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "lora_rows", NULL, -1, methods};

PyMODINIT_FUNC PyInit_lora_rows(void)
{
    return PyModule_Create(&module);
}
