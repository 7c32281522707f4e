/* The LoRA of one-token rows, each on its own slot: y[t] += B_s^T (A_s x[t]) for every row (t, s).
 *
 * Why C: on a CPU decode step each row is two matrix-vector products over factors of ~36 KB, and torch's
 * batched matmul spends more on each small product than reading its bytes takes (benchmarks/
 * lora_layout_bench.py). Here a row costs one pass over its A and one over its B, read where they lie in
 * the slot tensors, and a module costs one call for all its rows.
 *
 * Layout (rahf_serve/lora_slots.py): A of slot s starts at A + s * a_stride, rank k's row of `in` factors
 * at + k * in; B is stored transposed, rank k's row of `out` factors at B + s * b_stride + k * out (strides
 * in elements). Factors are float32, or bfloat16 (`--lora-dtype`: half the memory and half the bytes a row
 * reads), widened exactly to float32 as they are read; x and y are float32, row-major with row strides ldx
 * and ldy (y may be a column slice of a wider output). tokens: the
 * rows' positions in x and y, or NULL for 0 .. n-1. Each row's arithmetic depends on that row alone, so
 * a row's result does not change with the batch around it. What stays fixed for a step (the rows) and for
 * a module (its factors) comes in two structs made once, so a call converts six arguments, not fourteen.
 *
 * Sums run in independent lanes of ranks (eight, then four, then one), vectorised with `omp simd`, each
 * product fused into its sum where the CPU has FMA; a bfloat16 A is read one rank after another (below).
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
#include "extension.h"
#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#endif

struct rahf_rows {
    int64_t n;
    const int64_t *tokens;
    const int64_t *slots;
    int64_t r;
};

enum { RAHF_F32 = 0, RAHF_BF16 = 1 };

struct rahf_factors {
    int64_t in, out;
    const void *A;
    int64_t a_stride;
    const void *B;
    int64_t b_stride;
    int64_t dtype;
};

/* Each function below is written once for both factor types and inlined with `dtype` a constant: each
 * type gets its own loops, vectorised, with no branch on the type inside them. */
#define SPECIALISED static inline __attribute__((always_inline))

SPECIALISED int64_t size_of(int dtype)
{
    return dtype == RAHF_BF16 ? 2 : 4;
}

/* Element j of the factor row at p as float32; a bfloat16 is the top half of the float32 it rounds. */
SPECIALISED float load(const char *p, int64_t j, int dtype)
{
    if (dtype == RAHF_BF16) {
        union { uint32_t u; float f; } c = {.u = (uint32_t)((const uint16_t *)p)[j] << 16};
        return c.f;
    }
    return ((const float *)p)[j];
}

/* a * b + c, fused where the CPU has it: one rounding instead of two, and a pass over a step's sites at
 * eight rows ~7% shorter (fewer instructions between the loads; benchmarks/site_kernel_bench.py). Only
 * where the build targets FMA: elsewhere fmaf is a slow library call. */
#if defined(__FMA__) || defined(__ARM_FEATURE_FMA)
#define MULADD(a, b, c) __builtin_fmaf((a), (b), (c))
#else
#define MULADD(a, b, c) ((a) * (b) + (c))
#endif

/* Start the streams of a row's factors, the first two cache lines of each rank's A and B row: issued
 * together, their first misses overlap instead of each pass waiting on its own (about a tenth off a step's
 * kernel time, benchmarks/adapter_row_bench.py). `a_row`, `b_row`: a rank's row in bytes. */
SPECIALISED void prefetch_row(const char *a, const char *b, int64_t r, int64_t a_row, int64_t b_row)
{
    for (int64_t k = 0; k < r; k++) {
        __builtin_prefetch(a + k * a_row);
        __builtin_prefetch(a + k * a_row + 64);
        __builtin_prefetch(b + k * b_row);
        __builtin_prefetch(b + k * b_row + 64);
    }
}

/* Lanes of a one-rank sum: four vectors of eight float32. */
#define ONE_RANK_LANES 32

/* h[k] = A[k] . x for k < r: ranks in blocks of eight lanes (eight streams read at once), then four, then one.
 * A bfloat16 A goes one rank at a time instead, its ranks' rows one stream in order: its rows are half as
 * long, and a pass over a step's sites at eight rows took ~5% longer with eight short streams at once than
 * with one (benchmarks/site_kernel_bench.py); a float32 A took ~7% longer with one. One rank sums in
 * ONE_RANK_LANES lanes, each its own sum, so several multiply-adds are in flight where a single sum waited
 * on the last: bfloat16 passes 6-9% shorter with the factors in cache, 2-4% from memory. */
SPECIALISED void shrink(const char *a, int64_t r, int64_t in, const float *restrict x, float *restrict h, int dtype)
{
    const int64_t row = in * size_of(dtype);
    const int lanes = dtype != RAHF_BF16;
    int64_t k = 0;
    for (; lanes && k + 8 <= r; k += 8) {
        const char *restrict a0 = a + k * row, *restrict a1 = a0 + row, *restrict a2 = a1 + row,
                   *restrict a3 = a2 + row, *restrict a4 = a3 + row, *restrict a5 = a4 + row,
                   *restrict a6 = a5 + row, *restrict a7 = a6 + row;
        float s0 = 0, s1 = 0, s2 = 0, s3 = 0, s4 = 0, s5 = 0, s6 = 0, s7 = 0;
#pragma omp simd reduction(+:s0, s1, s2, s3, s4, s5, s6, s7)
        for (int64_t j = 0; j < in; j++) {
            const float v = x[j];
            s0 = MULADD(load(a0, j, dtype), v, s0);
            s1 = MULADD(load(a1, j, dtype), v, s1);
            s2 = MULADD(load(a2, j, dtype), v, s2);
            s3 = MULADD(load(a3, j, dtype), v, s3);
            s4 = MULADD(load(a4, j, dtype), v, s4);
            s5 = MULADD(load(a5, j, dtype), v, s5);
            s6 = MULADD(load(a6, j, dtype), v, s6);
            s7 = MULADD(load(a7, j, dtype), v, s7);
        }
        h[k] = s0, h[k + 1] = s1, h[k + 2] = s2, h[k + 3] = s3;
        h[k + 4] = s4, h[k + 5] = s5, h[k + 6] = s6, h[k + 7] = s7;
    }
    for (; lanes && k + 4 <= r; k += 4) {
        const char *restrict a0 = a + k * row, *restrict a1 = a0 + row, *restrict a2 = a1 + row,
                   *restrict a3 = a2 + row;
        float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+:s0, s1, s2, s3)
        for (int64_t j = 0; j < in; j++) {
            const float v = x[j];
            s0 = MULADD(load(a0, j, dtype), v, s0);
            s1 = MULADD(load(a1, j, dtype), v, s1);
            s2 = MULADD(load(a2, j, dtype), v, s2);
            s3 = MULADD(load(a3, j, dtype), v, s3);
        }
        h[k] = s0, h[k + 1] = s1, h[k + 2] = s2, h[k + 3] = s3;
    }
    for (; k < r; k++) {
        const char *restrict a0 = a + k * row;
        float acc[ONE_RANK_LANES] = {0};
        int64_t j = 0;
        for (; j + ONE_RANK_LANES <= in; j += ONE_RANK_LANES) {
#pragma omp simd
            for (int c = 0; c < ONE_RANK_LANES; c++)
                acc[c] = MULADD(load(a0, j + c, dtype), x[j + c], acc[c]);
        }
        float s0 = 0;
        for (; j < in; j++)
            s0 = MULADD(load(a0, j, dtype), x[j], s0);
#pragma omp simd reduction(+:s0)
        for (int c = 0; c < ONE_RANK_LANES; c++)
            s0 += acc[c];
        h[k] = s0;
    }
}

/* y += sum_k h[k] B[k], in the same blocks of ranks. */
SPECIALISED void expand(const char *b, int64_t r, int64_t out, const float *h, float *restrict y, int dtype)
{
    const int64_t row = out * size_of(dtype);
    int64_t k = 0;
    for (; k + 8 <= r; k += 8) {
        const char *restrict b0 = b + k * row, *restrict b1 = b0 + row, *restrict b2 = b1 + row,
                   *restrict b3 = b2 + row, *restrict b4 = b3 + row, *restrict b5 = b4 + row,
                   *restrict b6 = b5 + row, *restrict b7 = b6 + row;
        const float h0 = h[k], h1 = h[k + 1], h2 = h[k + 2], h3 = h[k + 3], h4 = h[k + 4], h5 = h[k + 5],
                    h6 = h[k + 6], h7 = h[k + 7];
#pragma omp simd
        for (int64_t j = 0; j < out; j++)
            y[j] += MULADD(h7, load(b7, j, dtype), MULADD(h6, load(b6, j, dtype), MULADD(h5, load(b5, j, dtype),
                    MULADD(h4, load(b4, j, dtype), MULADD(h3, load(b3, j, dtype), MULADD(h2, load(b2, j, dtype),
                    MULADD(h1, load(b1, j, dtype), h0 * load(b0, j, dtype))))))));
    }
    for (; k + 4 <= r; k += 4) {
        const char *restrict b0 = b + k * row, *restrict b1 = b0 + row, *restrict b2 = b1 + row,
                   *restrict b3 = b2 + row;
        const float h0 = h[k], h1 = h[k + 1], h2 = h[k + 2], h3 = h[k + 3];
#pragma omp simd
        for (int64_t j = 0; j < out; j++)
            y[j] += MULADD(h3, load(b3, j, dtype), MULADD(h2, load(b2, j, dtype),
                    MULADD(h1, load(b1, j, dtype), h0 * load(b0, j, dtype))));
    }
    for (; k < r; k++) {
        const char *restrict b0 = b + k * row;
        const float h0 = h[k];
#pragma omp simd
        for (int64_t j = 0; j < out; j++)
            y[j] = MULADD(h0, load(b0, j, dtype), y[j]);
    }
}

/* Rows lo .. hi-1 of `rows`. */
SPECIALISED void rows_of(const struct rahf_rows *rows, int64_t lo, int64_t hi, const struct rahf_factors *f,
                         const float *x, int64_t ldx, float *y, int64_t ldy, int dtype)
{
    const int64_t r = rows->r, in = f->in, out = f->out, size = size_of(dtype);
    const int64_t *tokens = rows->tokens, *slots = rows->slots;
    const char *A = f->A, *B = f->B;
    const int64_t a_slot = f->a_stride * size, b_slot = f->b_stride * size;
    float h[r > 0 ? r : 1];
    if (lo < hi)
        prefetch_row(A + slots[lo] * a_slot, B + slots[lo] * b_slot, r, in * size, out * size);
    for (int64_t i = lo; i < hi; i++) {
        if (i + 1 < hi)  /* the next row's streams start while this one computes */
            prefetch_row(A + slots[i + 1] * a_slot, B + slots[i + 1] * b_slot, r, in * size, out * size);
        const int64_t t = tokens ? tokens[i] : i;
        shrink(A + slots[i] * a_slot, r, in, x + t * ldx, h, dtype);
        expand(B + slots[i] * b_slot, r, out, h, y + t * ldy, dtype);
    }
}

static void lora_rows(const struct rahf_rows *rows, int64_t lo, int64_t hi, const struct rahf_factors *f,
                      const float *x, int64_t ldx, float *y, int64_t ldy)
{
    if (f->dtype == RAHF_BF16)
        rows_of(rows, lo, hi, f, x, ldx, y, ldy, RAHF_BF16);
    else
        rows_of(rows, lo, hi, f, x, ldx, y, ldy, RAHF_F32);
}

/* A module group's plan for the step, as lora_slots._Rows.publish writes it. */
enum { RAHF_NONE = 0, RAHF_ROWS = 1, RAHF_OTHER = 2 };

struct rahf_plan {
    int64_t state;                 /* NONE: no row uses these modules' slots; ROWS: every LoRA row is one
                                      token, at `rows`; OTHER: more than this kernel does (prompt chunks) */
    int64_t total;                 /* the step's token count */
    const struct rahf_rows *rows;
    int64_t threads;               /* torch's thread count when the plan was made: the most a site shares
                                      its rows between (a thread's own OpenMP setting can differ from torch's) */
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

/* What a row of a module costs: the factors it reads (in elements). */
static double row_cost(const struct rahf_plan *p, const struct rahf_factors *f)
{
    return (double)p->rows->r * (double)(f->in + f->out);
}

/* The share [c0, c1) of a site's work, its modules' rows in order, each row weighed by `row_cost` and done
 * by the share its middle falls in: whoever does a row, its arithmetic is the same. */
static void site_share(const struct rahf_site *s, const float *x, float *y, double c0, double c1)
{
    const struct rahf_site_module *m = s->m;
    double at = 0;
    for (int64_t i = 0; i < s->n; i++) {
        const struct rahf_plan *p = *m[i].plan;
        if (p->state != RAHF_ROWS)
            continue;
        const int64_t n = p->rows->n;
        const double w = row_cost(p, m[i].f);
        int64_t lo = 0, hi = n;
        while (lo < n && at + (lo + 0.5) * w < c0)
            lo++;
        while (hi > lo && at + (hi - 0.5) * w >= c1)
            hi--;
        if (lo < hi)
            lora_rows(p->rows, lo, hi, m[i].f, x, s->ldx, y + m[i].column, s->ldy);
        at += n * w;
    }
}

/* Below this many factors a site's rows are not shared between threads: waking them costs more. */
#define RAHF_SHARED_WORK (1 << 14)

/* Every module's rows, or nothing at all (returning 0) when one of them needs more than the kernel or
 * its plan was made for another token count than `total`: the caller then takes its own path.
 *
 * Where the module is built with OpenMP (against the runtime torch already loaded, so its threads are
 * torch's), a site with enough rows shares them between as many threads as torch's products use (the
 * plans say how many): the
 * factors of a step's rows are read at one core's speed otherwise, while its base matmuls use every
 * core. */
static int lora_site(const struct rahf_site *s, int64_t total, const float *x, float *y)
{
    const struct rahf_site_module *m = s->m;
    double work = 0;
    int64_t threads = 1;
    for (int64_t i = 0; i < s->n; i++) {
        const struct rahf_plan *p = *m[i].plan;
        if (p->state == RAHF_OTHER || (p->state == RAHF_ROWS && p->total != total))
            return 0;
        if (p->state == RAHF_ROWS) {
            work += p->rows->n * row_cost(p, m[i].f);
            threads = p->threads > threads ? p->threads : threads;
        }
    }
#ifdef _OPENMP
    if (threads > 1 && work >= RAHF_SHARED_WORK) {
#pragma omp parallel num_threads((int)threads)
        {
            const double share = work / omp_get_num_threads();
            site_share(s, x, y, share * omp_get_thread_num(), share * (omp_get_thread_num() + 1));
        }
        return 1;
    }
#else
    (void)threads;
#endif
    site_share(s, x, y, 0, work + 1);
    return 1;
}

/* rows(&rahf_rows, &rahf_factors, x, ldx, y, ldy): one module's rows. */
static PyObject *py_rows(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    int64_t a[6];
    if (parse_args(args, nargs, "rows", 6, 0, a, NULL) < 0)
        return NULL;
    const struct rahf_rows *rows = (const struct rahf_rows *)(intptr_t)a[0];
    lora_rows(rows, 0, rows->n, (const struct rahf_factors *)(intptr_t)a[1], (const float *)(intptr_t)a[2], a[3],
              (float *)(intptr_t)a[4], a[5]);
    Py_RETURN_NONE;
}

/* site(&rahf_site, total, x, y) -> whether it did the rows. */
static PyObject *py_site(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    int64_t a[4];
    if (parse_args(args, nargs, "site", 4, 0, a, NULL) < 0)
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
    return with_openmp_flag(PyModule_Create(&module));
}
