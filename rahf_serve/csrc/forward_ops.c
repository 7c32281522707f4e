/* The packed llama forward's operators on CPU, float32: its matrix products over weights stored in panels,
 * RMSNorm, rotary embedding with the KV cache write, and the attention of one-token (decoding) rows over
 * their cache slots.
 *
 * Why C: on a one-row decode step of a small model each of these is a few microseconds of arithmetic that
 * torch spends 15-50 us dispatching (a norm ~40 us inside the step, the attention ~50 us, the rotation and
 * the cache write five operators between them): ~7 ms of a 45 ms SmolLM2-135M step beside 38 ms of weight
 * streaming. Here each is one call (benchmarks/forward_ops_bench.py measures the step with and without).
 *
 * The products: torch's (MKL's) at the few rows of a decode step reached 5-8 GFLOP/s at one row and 24-36 at
 * eight on the project's CPU, against the ~100 a core does: a small product is mostly the reorganising of
 * the weight that a large one amortises. Here the weight is reorganised once, at load, into panels of PANEL
 * output columns, each panel [in, PANEL] contiguous, so a product streams every weight once, in order, and
 * each weight it reads feeds four rows' multiply-adds (benchmarks/panel_product_bench.py).
 *
 * Layouts (rahf_serve/packed_llama.py and kvcache.py own them; nothing is checked here):
 *   activations [tokens, ld] row-major float32;
 *   a weight [out, in] as panels [ceil(out / PANEL), in, PANEL], the columns past `out` zero;
 *   a layer's cache [2 (keys, values), max_rows, kv_heads, max_len, head_dim], contiguous;
 *   rotary tables [positions, head_dim]: cos, and sin with its first half negated, so that with the two
 *   halves of x swapped (x') the rotation is x * cos + x' * sin, transformers' rotate_half in one formula.
 * Each token's arithmetic depends on that token alone (and, in the attention, on its row's cache), so a
 * row's result does not change with the batch around it.
 *
 * Built as a Python extension module (`forward_ops`), the arguments ints (addresses and sizes) and floats.
 */
#include "extension.h"
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__FMA__) && defined(__AVX__)
#include <immintrin.h>
#endif

/* Output columns per panel: three vectors of eight, so four rows' sums (twelve vectors), the panel's three
 * and a broadcast fit the sixteen vector registers of AVX2. */
#define PANEL 24

typedef float vec8 __attribute__((vector_size(32)));

static inline vec8 load8(const float *p)
{
    vec8 v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* v in every lane (not {0} + v: adding zero is an operation the compiler must keep, -0 + 0 being +0). */
static inline vec8 splat(float v)
{
    return (vec8){v, v, v, v, v, v, v, v};
}

static inline void store8(float *p, vec8 v)
{
    memcpy(p, &v, sizeof v);
}

/* a * b + c, fused where the build targets FMA (the C standard mode does not contract a * b + c itself). */
#if defined(__FMA__) && defined(__AVX__)
#define VMULADD(a, b, c) ((vec8)_mm256_fmadd_ps((__m256)(a), (__m256)(b), (__m256)(c)))
#else
#define VMULADD(a, b, c) ((a) * (b) + (c))
#endif

/* Rows 0 .. R-1 (R at most four, a constant where it is inlined, so each count gets its own loop with no
 * multiply-adds for rows it does not have) of x [R, ldx] times one panel [in, PANEL]: their `cols` first
 * columns into y [R, ldy], or added to it (`add`). Each sum runs over `in` in order, whatever the rows around. */
static inline __attribute__((always_inline)) void panel_rows(const float *x, int64_t ldx, const int R,
                                                             const float *restrict panel, int64_t in, float *y,
                                                             int64_t ldy, int64_t cols, int add)
{
    vec8 s[4][3] = {{{0}}};
    for (int64_t k = 0; k < in; k++) {
        const float *w = panel + k * PANEL;
        const vec8 wv[3] = {load8(w), load8(w + 8), load8(w + 16)};
        for (int m = 0; m < R; m++) {
            const vec8 b = splat(x[m * ldx + k]);
            for (int v = 0; v < 3; v++)
                s[m][v] = VMULADD(b, wv[v], s[m][v]);
        }
    }
    for (int m = 0; m < R; m++) {
        float *out = y + m * ldy;
        if (cols == PANEL) {
            for (int v = 0; v < 3; v++)
                store8(out + 8 * v, add ? load8(out + 8 * v) + s[m][v] : s[m][v]);
        } else {
            float tile[PANEL];
            for (int v = 0; v < 3; v++)
                store8(tile + 8 * v, s[m][v]);
            for (int64_t j = 0; j < cols; j++)
                out[j] = add ? out[j] + tile[j] : tile[j];
        }
    }
}

/* One panel's rows, four at a time, then the one to three left. */
static void panel_block(const float *x, int64_t ldx, int64_t tokens, const float *panel, int64_t in, float *y,
                        int64_t ldy, int64_t cols, int add)
{
    int64_t m = 0;
    for (; m + 4 <= tokens; m += 4)
        panel_rows(x + m * ldx, ldx, 4, panel, in, y + m * ldy, ldy, cols, add);
    switch (tokens - m) {
    case 3: panel_rows(x + m * ldx, ldx, 3, panel, in, y + m * ldy, ldy, cols, add); break;
    case 2: panel_rows(x + m * ldx, ldx, 2, panel, in, y + m * ldy, ldy, cols, add); break;
    case 1: panel_rows(x + m * ldx, ldx, 1, panel, in, y + m * ldy, ldy, cols, add); break;
    default: break;
    }
}

/* Below this many multiply-adds a product stays on one thread: waking the others costs more. */
#define SHARED_PRODUCT (1 << 17)

/* Panels lo .. hi-1 of a product (below). */
static void panel_range(const float *x, int64_t ldx, int64_t tokens, const float *panels, int64_t in,
                        int64_t out, float *y, int64_t ldy, int add, int64_t lo, int64_t hi)
{
    for (int64_t p = lo; p < hi; p++) {
        const int64_t cols = out - p * PANEL < PANEL ? out - p * PANEL : PANEL;
        panel_block(x, ldx, tokens, panels + p * in * PANEL, in, y + p * PANEL, ldy, cols, add);
    }
}

/* y [tokens, ldy] = x [tokens, ldx] W^T (or y += it, `add`), W [out, in] as panels. A panel's rows go in
 * blocks of four while it is in cache; panels are shared between torch's threads (`threads`) when the
 * product is large enough. */
static void panel_product(const float *x, int64_t ldx, int64_t tokens, const float *panels, int64_t in,
                          int64_t out, float *y, int64_t ldy, int add, int64_t threads)
{
    const int64_t count = (out + PANEL - 1) / PANEL;
#ifdef _OPENMP
    if (threads > 1 && count > 1 && tokens * in * out >= SHARED_PRODUCT) {
#pragma omp parallel num_threads((int)threads)
        {
            const int64_t n = omp_get_num_threads(), t = omp_get_thread_num();
            panel_range(x, ldx, tokens, panels, in, out, y, ldy, add, count * t / n, count * (t + 1) / n);
        }
        return;
    }
#else
    (void)threads;
#endif
    panel_range(x, ldx, tokens, panels, in, out, y, ldy, add, 0, count);
}

/* y[t] = w * x[t] / sqrt(mean(x[t]^2) + eps), LlamaRMSNorm in float32. */
static void rms_norm(const float *restrict x, const float *restrict w, float *restrict y, int64_t tokens, int64_t n,
                     float eps)
{
    for (int64_t t = 0; t < tokens; t++) {
        const float *restrict xt = x + t * n;
        float *restrict yt = y + t * n;
        float sum = 0;
#pragma omp simd reduction(+:sum)
        for (int64_t j = 0; j < n; j++)
            sum += xt[j] * xt[j];
        const float inv = 1.0f / sqrtf(sum / (float)n + eps);
#pragma omp simd
        for (int64_t j = 0; j < n; j++)
            yt[j] = w[j] * (xt[j] * inv);
    }
}

/* y = x rotated (y may be x): the halves of a head computed together, so in place needs no copy. */
static inline void rotate(const float *x, float *y, const float *restrict cos, const float *restrict sin,
                          int64_t head_dim)
{
    const int64_t half = head_dim / 2;
#pragma omp simd
    for (int64_t j = 0; j < half; j++) {
        const float a = x[j], b = x[j + half];
        y[j] = a * cos[j] + b * sin[j];
        y[j + half] = b * cos[j + half] + a * sin[j + half];
    }
}

struct layout {
    int64_t heads, kv_heads, head_dim, max_rows, max_len;
};

/* The offset of (row, kv head, column) in a layer's keys; its value lies `plane` further. */
static inline int64_t slot_at(const struct layout *l, int64_t row, int64_t kv_head, int64_t column)
{
    return ((row * l->kv_heads + kv_head) * l->max_len + column) * l->head_dim;
}

/* For each token t of qkv [tokens, ld] (q heads, then k heads, then v heads): q rotated in place, k rotated
 * into the cache at (rows[t], columns[t]), v copied there; positions are the columns. */
static void rotate_and_store(float *qkv, int64_t ld, int64_t tokens, const struct layout *l, const float *cos,
                             const float *sin, const int64_t *rows, const int64_t *columns, float *cache)
{
    const int64_t hd = l->head_dim, plane = l->max_rows * l->kv_heads * l->max_len * hd;
    for (int64_t t = 0; t < tokens; t++) {
        float *x = qkv + t * ld;
        const int64_t p = columns[t];
        const float *c = cos + p * hd, *s = sin + p * hd;
        for (int64_t h = 0; h < l->heads; h++)
            rotate(x + h * hd, x + h * hd, c, s, hd);
        for (int64_t h = 0; h < l->kv_heads; h++) {
            float *key = cache + slot_at(l, rows[t], h, p);
            rotate(x + (l->heads + h) * hd, key, c, s, hd);
            memcpy(key + plane, x + (l->heads + l->kv_heads + h) * hd, hd * sizeof(float));
        }
    }
}

/* scores[i][j] = scale q_i . k_j for the `group` query heads q_i sharing these keys, j < n. Keys in blocks of
 * eight, each block read once for every head (it stays in L1 between them) and its eight dot products summed
 * in independent lanes: one key at a time, each head over every key, each sum waiting on its previous
 * multiply-add, the 30 layers' attention of one row at 2,000 tokens took 1.25x as long (14.6 ms against 11.7;
 * eight rows 114 against 91). */
static void scores_of(const float *q, int64_t group, const float *keys, int64_t n, int64_t hd, float scale,
                      float *scores)
{
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
        const float *restrict k0 = keys + j * hd, *restrict k1 = k0 + hd, *restrict k2 = k1 + hd,
                    *restrict k3 = k2 + hd, *restrict k4 = k3 + hd, *restrict k5 = k4 + hd, *restrict k6 = k5 + hd,
                    *restrict k7 = k6 + hd;
        for (int64_t i = 0; i < group; i++) {
            const float *restrict qi = q + i * hd;
            float d0 = 0, d1 = 0, d2 = 0, d3 = 0, d4 = 0, d5 = 0, d6 = 0, d7 = 0;
#pragma omp simd reduction(+:d0, d1, d2, d3, d4, d5, d6, d7)
            for (int64_t e = 0; e < hd; e++) {
                const float v = qi[e];
                d0 += v * k0[e];
                d1 += v * k1[e];
                d2 += v * k2[e];
                d3 += v * k3[e];
                d4 += v * k4[e];
                d5 += v * k5[e];
                d6 += v * k6[e];
                d7 += v * k7[e];
            }
            float *si = scores + i * n + j;
            si[0] = d0 * scale, si[1] = d1 * scale, si[2] = d2 * scale, si[3] = d3 * scale;
            si[4] = d4 * scale, si[5] = d5 * scale, si[6] = d6 * scale, si[7] = d7 * scale;
        }
    }
    for (; j < n; j++) {
        const float *restrict k = keys + j * hd;
        for (int64_t i = 0; i < group; i++) {
            const float *restrict qi = q + i * hd;
            float d = 0;
#pragma omp simd reduction(+:d)
            for (int64_t e = 0; e < hd; e++)
                d += qi[e] * k[e];
            scores[i * n + j] = d * scale;
        }
    }
}

/* One token's heads that share kv head `g` (`group` of them) over its row's first n keys: out = softmax(scale
 * q.K) V, scores in `scores` [group, n]. The group is done together so each key and value is read once. */
static void attend_group(const float *q, int64_t group, const float *keys, const float *values, int64_t n,
                         int64_t hd, float scale, float *scores, float *out)
{
    scores_of(q, group, keys, n, hd, scale, scores);
    for (int64_t i = 0; i < group; i++) {
        float *restrict si = scores + i * n;
        float top = si[0];
        for (int64_t j = 1; j < n; j++)
            top = si[j] > top ? si[j] : top;
        float sum = 0;
        for (int64_t j = 0; j < n; j++) {
            si[j] = expf(si[j] - top);
            sum += si[j];
        }
        const float inv = 1.0f / sum;
        for (int64_t j = 0; j < n; j++)
            si[j] *= inv;
    }
    for (int64_t i = 0; i < group * hd; i++)
        out[i] = 0;
    for (int64_t j = 0; j < n; j++) {
        const float *restrict v = values + j * hd;
        for (int64_t i = 0; i < group; i++) {
            float *restrict oi = out + i * hd;
            const float p = scores[i * n + j];
#pragma omp simd
            for (int64_t e = 0; e < hd; e++)
                oi[e] += p * v[e];
        }
    }
}

/* Below this many key reads (tokens x kv heads x keys) an attention call stays on one thread: one row at
 * 2,000 tokens of context (6,000) shared over two threads took a one-row step from 62 to 54 ms
 * (benchmarks/forward_ops_bench.py --threads 2). */
#define SHARED_KEYS 4096

/* Tokens [first, end) of the step, one query each (q [tokens, ldq], heads side by side), each attending
 * its row's keys 0 .. columns[t] (its own, written this step, included); out [tokens, heads * head_dim].
 * Shared between torch's threads (`threads`, OpenMP builds) by (token, kv head) when the work is large.
 * Returns -1 when the scores' buffer cannot be allocated. */
static int attend_rows(const float *q, int64_t ldq, int64_t first, int64_t end, const struct layout *l,
                       const int64_t *rows, const int64_t *columns, const float *cache, float scale, float *out,
                       int64_t threads)
{
    const int64_t hd = l->head_dim, group = l->heads / l->kv_heads;
    const int64_t plane = l->max_rows * l->kv_heads * l->max_len * hd;
    int64_t width = 0, keys = 0;
    for (int64_t t = first; t < end; t++) {
        width = columns[t] + 1 > width ? columns[t] + 1 : width;
        keys += columns[t] + 1;
    }
    const int64_t tasks = (end - first) * l->kv_heads;
    int failed = 0;
#ifdef _OPENMP
    const int shared = threads > 1 && keys * l->kv_heads >= SHARED_KEYS;
#pragma omp parallel num_threads(shared ? (int)threads : 1) reduction(|:failed)
#else
    (void)threads;
    (void)keys;
#endif
    {
        float *scores = malloc((size_t)(group * width) * sizeof(float));
        /* Every thread meets the loop (a worksharing construct), with or without its buffer. */
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
        for (int64_t task = 0; task < tasks; task++) {
            if (scores == NULL) {
                failed = 1;
                continue;
            }
            const int64_t t = first + task / l->kv_heads, g = task % l->kv_heads;
            const float *k = cache + slot_at(l, rows[t], g, 0);
            attend_group(q + t * ldq + g * group * hd, group, k, k + plane, columns[t] + 1, hd, scale, scores,
                         out + t * l->heads * hd + g * group * hd);
        }
        free(scores);
    }
    return failed ? -1 : 0;
}

#define PTR(type, v) ((type)(intptr_t)(v))

/* rms_norm(x, w, y, tokens, n, eps) */
static PyObject *py_rms_norm(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    int64_t a[5];
    double eps;
    if (parse_args(args, nargs, "rms_norm", 5, 1, a, &eps) < 0)
        return NULL;
    rms_norm(PTR(const float *, a[0]), PTR(const float *, a[1]), PTR(float *, a[2]), a[3], a[4], (float)eps);
    Py_RETURN_NONE;
}

/* rotate_and_store(qkv, ld, tokens, heads, kv_heads, head_dim, max_rows, max_len, cos, sin, rows, columns,
 * cache) */
static PyObject *py_rotate_and_store(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    int64_t a[13];
    if (parse_args(args, nargs, "rotate_and_store", 13, 0, a, NULL) < 0)
        return NULL;
    const struct layout l = {a[3], a[4], a[5], a[6], a[7]};
    rotate_and_store(PTR(float *, a[0]), a[1], a[2], &l, PTR(const float *, a[8]), PTR(const float *, a[9]),
                     PTR(const int64_t *, a[10]), PTR(const int64_t *, a[11]), PTR(float *, a[12]));
    Py_RETURN_NONE;
}

/* attend_rows(q, ldq, first, end, heads, kv_heads, head_dim, max_rows, max_len, rows, columns, cache, out,
 * threads, scale) */
static PyObject *py_attend_rows(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    int64_t a[14];
    double scale;
    if (parse_args(args, nargs, "attend_rows", 14, 1, a, &scale) < 0)
        return NULL;
    const struct layout l = {a[4], a[5], a[6], a[7], a[8]};
    int done;
    /* Milliseconds at long contexts, touching no Python object: the server's other threads run meanwhile. */
    Py_BEGIN_ALLOW_THREADS
    done = attend_rows(PTR(const float *, a[0]), a[1], a[2], a[3], &l, PTR(const int64_t *, a[9]),
                       PTR(const int64_t *, a[10]), PTR(const float *, a[11]), (float)scale, PTR(float *, a[12]),
                       a[13]);
    Py_END_ALLOW_THREADS
    if (done < 0)
        return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* product(x, ldx, tokens, panels, in, out, y, ldy, add, threads) */
static PyObject *py_product(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    int64_t a[10];
    if (parse_args(args, nargs, "product", 10, 0, a, NULL) < 0)
        return NULL;
    /* Up to milliseconds, touching no Python object: the server's other threads run meanwhile. */
    Py_BEGIN_ALLOW_THREADS
    panel_product(PTR(const float *, a[0]), a[1], a[2], PTR(const float *, a[3]), a[4], a[5], PTR(float *, a[6]),
                  a[7], (int)a[8], a[9]);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"product", (PyCFunction)(void (*)(void))py_product, METH_FASTCALL, "x W^T, W stored as panels"},
    {"rms_norm", (PyCFunction)(void (*)(void))py_rms_norm, METH_FASTCALL, "RMSNorm of each token"},
    {"rotate_and_store", (PyCFunction)(void (*)(void))py_rotate_and_store, METH_FASTCALL,
     "rotary embedding of q and k, k and v written to the cache"},
    {"attend_rows", (PyCFunction)(void (*)(void))py_attend_rows, METH_FASTCALL,
     "attention of one-token rows over their cache slots"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "forward_ops", NULL, -1, methods};

PyMODINIT_FUNC PyInit_forward_ops(void)
{
    PyObject *m = with_openmp_flag(PyModule_Create(&module));
    if (m != NULL && PyModule_AddIntConstant(m, "panel", PANEL) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
