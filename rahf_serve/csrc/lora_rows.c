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
 * reads), widened exactly to float32 as they are read, or multiplied in bfloat16 dot products (RAHF_BF16_DOTS,
 * below); x and y are float32, row-major with row strides ldx and ldy (y may be a column slice of a wider
 * output). tokens: the
 * rows' positions in x and y, or NULL for 0 .. n-1. Each row's arithmetic depends on that row alone, so
 * a row's result does not change with the batch around it. What stays fixed for a step (the rows) and for
 * a module (its factors) comes in two structs made once, so a call converts six arguments, not fourteen.
 *
 * Sums run in vectors of eight (vec8.h), each product fused into its sum where the CPU has FMA; rows on
 * one slot are done together, each factor read once for several of them, in a fixed order per row (below).
 *
 * `site` does the modules that read one input and add into one output (q/k/v, gate/up) in one call:
 * inside a forward, each call from Python costs several times what it costs in a tight loop (its code and
 * data are cold after the weights streamed by), so a decode step makes four calls a layer, not seven; and
 * the forward's C products call it themselves (`site_function`, a C function pointer), so where those run
 * a decode step's LoRA rows take no call from Python at all.
 * Each module reaches its group's plan through a cell its SlotLinear keeps pointed at it.
 *
 * Built as a Python extension module (`lora_rows`, two METH_FASTCALL functions at the end), not a plain
 * library called through ctypes: inside a forward a ctypes call converting seven integers through libffi
 * took ~4.5 us, a direct call taking four ~1 us, and a step makes 120 of them.
 */
#include "extension.h"
#include "vec8.h"
#include "bf16.h"
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

struct rahf_rows {
    int64_t n;
    const int64_t *tokens;
    const int64_t *slots;
    int64_t r;
};

/* The factors' type, and how a row multiplies them: F32 and BF16 in float32 arithmetic (a bfloat16 widened
 * exactly), BF16_DOTS bfloat16 factors in bfloat16 dot products (below; the engine's `--matmul-dtype
 * bfloat16`). */
enum { RAHF_F32 = 0, RAHF_BF16 = 1, RAHF_BF16_DOTS = 2 };

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

/* Eight factors from element j of the factor row at p, as float32. */
SPECIALISED vec8 load_factors(const char *p, int64_t j, int dtype)
{
    if (dtype == RAHF_BF16) {
#if defined(__AVX2__)
        /* One widening load and a shift (GCC 12 makes four operations of the portable form below). */
        const __m128i half = _mm_loadu_si128((const __m128i *)(p + 2 * j));
        return (vec8)_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
#else
        typedef uint16_t u16x8 __attribute__((vector_size(16)));
        typedef uint32_t u32x8 __attribute__((vector_size(32)));
        u16x8 half;
        memcpy(&half, p + 2 * j, sizeof half);
        const u32x8 bits = __builtin_convertvector(half, u32x8) << 16;
        vec8 v;
        memcpy(&v, &bits, sizeof v);
        return v;
#endif
    }
    return load8((const float *)p + j);
}

/* Rows that share a slot are done together, up to GROUP of them: each factor vector read feeds all of them
 * from registers. Row after row, each read the slot's factors again from cache and was bound by that: eight
 * rows on one adapter cost a SmolLM2-135M step 8-10% over its base rows where reading their factors once
 * costs ~2%; in groups of four a pass over the step's sites takes 0.64-0.78x as long (benchmarks/
 * site_kernel_bench.py --adapters 1). GROUP rows' sums, a block of factors and the rows' inputs fit in
 * AVX-512's 32 registers; AVX2 has 16. */
#if defined(__AVX512F__)
#define GROUP 4
#define SUMS 16
#else
#define GROUP 2
#define SUMS 8
#endif

/* The expansion's columns per step, in vectors of eight (expand_block): AVX2's two rows keep sums for two
 * vectors through a block of ranks; AVX-512's four rows keep one, as measured there. */
#if defined(__AVX512F__)
#define TILE 1
#else
#define TILE 2
#endif

/* Each row's arithmetic is fixed whatever the rows beside it and however the loops below block rows and
 * ranks, so a row's result does not depend on its batch:
 *   h[k] = A[k] . x: LANES(dtype) lanes of sums over the input in order (vectors of eight side by side),
 *   the vectors added in pairs, their eight lanes in hsum's tree, then the input past the last whole
 *   LANES one element at a time;
 *   y += sum_k h[k] B[k] in blocks of eight ranks, then four, then one: a block of several adds to y the
 *   chain h0 B0, then + h1 B1 fused, ..., a single rank is fused into y.
 * A float32 A's ranks are read eight at a time (eight streams, eight sums in flight); a bfloat16 A's one
 * after another, in the order they lie, with 32 lanes keeping four sums in flight: from memory, reading
 * eight ranks of a bfloat16 A at once made a pass over a step's sites ~18% longer, where for a float32 A
 * it made no difference (benchmarks/site_kernel_bench.py). */
#define LANES(dtype) ((dtype) == RAHF_BF16 ? 32 : 8)

/* h_g[k0 + k] for k < K and the G rows x_g sharing A (a: rank k0's row, `row` bytes long). */
SPECIALISED void shrink_block(const char *a, int64_t row, int64_t in, const float *const *x, float *const *h,
                              int64_t k0, int G, int K, int dtype)
{
    enum { MAX = 8 };  /* K x LANES / 8 vectors of sums per row */
    const int V = LANES(dtype) / 8;
    vec8 s[GROUP][MAX];
    for (int g = 0; g < G; g++)
        for (int u = 0; u < K * V; u++)
            s[g][u] = splat(0);
    int64_t j = 0;
    for (; j + 8 * V <= in; j += 8 * V)
        for (int k = 0; k < K; k++)
            for (int v = 0; v < V; v++) {
                const vec8 f = load_factors(a + k * row, j + 8 * v, dtype);
                for (int g = 0; g < G; g++)
                    s[g][k * V + v] = VMULADD(f, load8(x[g] + j + 8 * v), s[g][k * V + v]);
            }
    float sums[GROUP * MAX];
    if (V == 1 && G * K == 8) {  /* the eight sums of a float32 block at once, in hsum's order */
        vec8 all[8];
        for (int g = 0; g < G; g++)
            for (int k = 0; k < K; k++)
                all[g * K + k] = s[g][k];
        store8(sums, lane_sums(all));
    } else {
        for (int g = 0; g < G; g++)
            for (int k = 0; k < K; k++) {
                const vec8 *sk = s[g] + k * V;
                sums[g * K + k] = hsum(V == 4 ? (sk[0] + sk[1]) + (sk[2] + sk[3]) : sk[0]);
            }
    }
    for (int g = 0; g < G; g++)
        for (int k = 0; k < K; k++) {
            float t = sums[g * K + k];
            for (int64_t i = j; i < in; i++)
                t = MULADD(load(a + k * row, i, dtype), x[g][i], t);
            h[g][k0 + k] = t;
        }
}

/* h_g = A x_g for the G rows sharing A: float32 ranks eight at a time while the G x 8 sums fit in SUMS
 * registers, else four, then one at a time; bfloat16 ranks one at a time (four vectors of sums each). */
SPECIALISED void shrink(const char *a, int64_t r, int64_t in, const float *const *x, float *const *h, int G,
                        int dtype)
{
    const int64_t row = in * size_of(dtype);
    const int K = dtype == RAHF_BF16 ? 1 : SUMS / G >= 8 ? 8 : 4;
    int64_t k = 0;
    for (; k + K <= r; k += K)
        shrink_block(a + k * row, row, in, x, h, k, G, K, dtype);
    for (; k + 4 <= r; k += 4)
        shrink_block(a + k * row, row, in, x, h, k, G, 4, dtype);
    for (; k < r; k++)
        shrink_block(a + k * row, row, in, x, h, k, G, 1, dtype);
}

/* The ranks k0 .. k0 + K of h_g B into the G rows' y_g (b: rank k0's row, `row` bytes long): each of the K
 * B vectors of eight columns read once for all G rows. TILE vectors of columns at a time: each h_g[k] loaded
 * and broadcast then feeds TILE vectors of sums; a vector at a time loaded each again for every eight columns
 * (y's stores may alias h, so the compiler keeps none of them in registers across columns). */
SPECIALISED void expand_block(const char *b, int64_t row, int64_t out, const float *const *h, float *const *y,
                              int64_t k0, int G, int K, int dtype)
{
    int64_t c = 0;
    for (; TILE > 1 && c + 8 * TILE <= out; c += 8 * TILE) {
        vec8 t[GROUP][TILE];
        for (int k = 0; k < K; k++) {
            vec8 f[TILE];
            for (int v = 0; v < TILE; v++)
                f[v] = load_factors(b + k * row, c + 8 * v, dtype);
            for (int g = 0; g < G; g++) {
                const vec8 hk = splat(h[g][k0 + k]);
                for (int v = 0; v < TILE; v++)
                    t[g][v] = K == 1 ? VMULADD(hk, f[v], load8(y[g] + c + 8 * v))
                              : k == 0 ? hk * f[v] : VMULADD(hk, f[v], t[g][v]);
            }
        }
        for (int g = 0; g < G; g++)
            for (int v = 0; v < TILE; v++)
                store8(y[g] + c + 8 * v, K == 1 ? t[g][v] : load8(y[g] + c + 8 * v) + t[g][v]);
    }
    for (; c + 8 <= out; c += 8) {
        vec8 f[8];
        for (int k = 0; k < K; k++)
            f[k] = load_factors(b + k * row, c, dtype);
        for (int g = 0; g < G; g++) {
            const float *hg = h[g] + k0;
            if (K == 1) {
                store8(y[g] + c, VMULADD(splat(hg[0]), f[0], load8(y[g] + c)));
                continue;
            }
            vec8 t = splat(hg[0]) * f[0];
            for (int k = 1; k < K; k++)
                t = VMULADD(splat(hg[k]), f[k], t);
            store8(y[g] + c, load8(y[g] + c) + t);
        }
    }
    for (; c < out; c++)
        for (int g = 0; g < G; g++) {
            const float *hg = h[g] + k0;
            if (K == 1) {
                y[g][c] = MULADD(hg[0], load(b, c, dtype), y[g][c]);
                continue;
            }
            float t = hg[0] * load(b, c, dtype);
            for (int k = 1; k < K; k++)
                t = MULADD(hg[k], load(b + k * row, c, dtype), t);
            y[g][c] += t;
        }
}

/* y_g += B^T h_g for the G rows sharing B. */
SPECIALISED void expand(const char *b, int64_t r, int64_t out, const float *const *h, float *const *y, int G,
                        int dtype)
{
    const int64_t row = out * size_of(dtype);
    int64_t k = 0;
    for (; k + 8 <= r; k += 8)
        expand_block(b + k * row, row, out, h, y, k, G, 8, dtype);
    for (; k + 4 <= r; k += 4)
        expand_block(b + k * row, row, out, h, y, k, G, 4, dtype);
    for (; k < r; k++)
        expand_block(b + k * row, row, out, h, y, k, G, 1, dtype);
}

/* The G rows from i on, all on slot s: their shrink and expand specialised for G. */
SPECIALISED void group_of(const struct rahf_rows *rows, int64_t i, int G, const char *a, const char *b,
                          const struct rahf_factors *f, const float *x, int64_t ldx, float *y, int64_t ldy,
                          float *hs, int dtype)
{
    const float *xs[GROUP];
    float *ys[GROUP], *h[GROUP];
    for (int g = 0; g < G; g++) {
        const int64_t t = rows->tokens ? rows->tokens[i + g] : i + g;
        xs[g] = x + t * ldx, ys[g] = y + t * ldy, h[g] = hs + g * rows->r;
    }
    shrink(a, rows->r, f->in, xs, h, G, dtype);
    expand(b, rows->r, f->out, (const float *const *)h, ys, G, dtype);
}

/* The n rows (1 .. GROUP) from i on, all on the slot whose factors are at a and b. */
typedef void (*group_fn)(const struct rahf_rows *rows, int64_t i, int n, const char *a, const char *b,
                         const struct rahf_factors *f, const float *x, int64_t ldx, float *y, int64_t ldy);

/* A group_fn for float32 arithmetic on factors of `dtype`, each group size its own loops. */
SPECIALISED void groups_of(const struct rahf_rows *rows, int64_t i, int n, const char *a, const char *b,
                           const struct rahf_factors *f, const float *x, int64_t ldx, float *y, int64_t ldy,
                           int dtype)
{
    float h[GROUP * (rows->r > 0 ? rows->r : 1)];
    switch (n) {
    case 1: group_of(rows, i, 1, a, b, f, x, ldx, y, ldy, h, dtype); break;
    case 2: group_of(rows, i, 2, a, b, f, x, ldx, y, ldy, h, dtype); break;
#if GROUP > 2
    case 3: group_of(rows, i, 3, a, b, f, x, ldx, y, ldy, h, dtype); break;
    case 4: group_of(rows, i, 4, a, b, f, x, ldx, y, ldy, h, dtype); break;
#endif
    }
}

static void f32_groups(const struct rahf_rows *rows, int64_t i, int n, const char *a, const char *b,
                       const struct rahf_factors *f, const float *x, int64_t ldx, float *y, int64_t ldy)
{
    groups_of(rows, i, n, a, b, f, x, ldx, y, ldy, RAHF_F32);
}

static void bf16_groups(const struct rahf_rows *rows, int64_t i, int n, const char *a, const char *b,
                        const struct rahf_factors *f, const float *x, int64_t ldx, float *y, int64_t ldy)
{
    groups_of(rows, i, n, a, b, f, x, ldx, y, ldy, RAHF_BF16);
}

#if defined(__AVX512F__)
/* Rows in bfloat16 dot products (AVX512_BF16, where the CPU has it: `bf16_dots()`), as the forward's
 * bfloat16 products do theirs: a row's input is rounded to bfloat16 and h = A x summed by `vdpbf16ps`, two
 * inputs' multiply-adds per float32 lane; h is rounded to bfloat16 pairs of ranks and y += B^T h summed
 * the same way, two ranks per lane, the pairs of B's rows interleaved as they are read. Twice float32's
 * multiply-adds per instruction: eight rows on one adapter are bound by that arithmetic, not by the
 * factors' bytes. A row's arithmetic is again fixed by the row alone:
 *   h[k] = 16 lanes of sums over the input's pairs in order (32 inputs a step, past `in` zero), added in
 *   _mm512_reduce_add_ps's order;
 *   y += h B: 16 columns at a time, each the chain y, + (h0 B0 + h1 B1), + (h2 B2 + h3 B3), ... over the
 *   rank pairs in order (a last odd rank paired with zero).
 * Built for that extension alone, as forward_ops' products are (bf16.h). */
#define DOTS static inline __attribute__((always_inline)) BF16

/* 32 bfloat16 factors from j on, those past `in` zero. */
DOTS __m512bh factor_pairs(const uint16_t *a, int64_t j, int64_t in)
{
    const int64_t left = in - j;
    const __mmask32 m = left >= 32 ? 0xffffffffu : (__mmask32)((1u << left) - 1);
    return (__m512bh)_mm512_maskz_loadu_epi16(m, a + j);
}

/* h_g[k0 + k] = A[k0 + k] . x_g for k < K and the G rows sharing A (a: rank k0's row). */
DOTS void shrink_dots_block(const uint16_t *a, int64_t in, const float *const *x, float *const *h, int64_t k0,
                            int G, int K)
{
    __m512 s[GROUP][4];
    for (int g = 0; g < G; g++)
        for (int k = 0; k < K; k++)
            s[g][k] = _mm512_setzero_ps();
    for (int64_t j = 0; j < in; j += 32) {
        __m512bh xb[GROUP];
        for (int g = 0; g < G; g++)
            xb[g] = bf16_32(x[g], j, in);
        for (int k = 0; k < K; k++) {
            const __m512bh f = factor_pairs(a + k * in, j, in);
            for (int g = 0; g < G; g++)
                s[g][k] = _mm512_dpbf16_ps(s[g][k], f, xb[g]);
        }
    }
    for (int g = 0; g < G; g++)
        for (int k = 0; k < K; k++)
            h[g][k0 + k] = _mm512_reduce_add_ps(s[g][k]);
}

/* Sixteen columns from c on of B's rows k and k + 1 (`second`: whether row k + 1 is there, else zeros),
 * interleaved into pairs: lane l holds (B[k][c + l], B[k + 1][c + l]). */
DOTS __m512bh rank_pairs(const uint16_t *b, int64_t out, int64_t c, __mmask16 m, int second)
{
    static const uint16_t order[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                       8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
    const __m512i lo = _mm512_castsi256_si512(_mm256_maskz_loadu_epi16(m, b + c));
    const __m512i hi = _mm512_castsi256_si512(_mm256_maskz_loadu_epi16(second ? m : 0, b + out + c));
    return (__m512bh)_mm512_permutex2var_epi16(lo, _mm512_loadu_si512(order), hi);
}

/* y_g += the rank pairs p0 .. p0 + P of h_g B (b: B's row 2 p0; hp_g: h_g in bfloat16 pairs), for the G
 * rows sharing B; each pair of B's rows read once for all of them. */
DOTS void expand_dots_block(const uint16_t *b, int64_t out, int64_t r, const uint32_t *const *hp, float *const *y,
                            int64_t p0, int G, int P)
{
    for (int64_t c = 0; c < out; c += 16) {
        const __mmask16 m = out - c >= 16 ? 0xffff : (__mmask16)((1u << (out - c)) - 1);
        __m512bh f[4];
        for (int p = 0; p < P; p++)
            f[p] = rank_pairs(b + 2 * p * out, out, c, m, 2 * (p0 + p) + 1 < r);
        for (int g = 0; g < G; g++) {
            __m512 t = _mm512_maskz_loadu_ps(m, y[g] + c);
            for (int p = 0; p < P; p++)
                t = _mm512_dpbf16_ps(t, (__m512bh)_mm512_set1_epi32((int)hp[g][p0 + p]), f[p]);
            _mm512_mask_storeu_ps(y[g] + c, m, t);
        }
    }
}

/* The G rows from i on, all on the slot at a and b, in bfloat16 dot products. */
DOTS void dots_group(const struct rahf_rows *rows, int64_t i, int G, const uint16_t *a, const uint16_t *b,
                     const struct rahf_factors *f, const float *x, int64_t ldx, float *y, int64_t ldy)
{
    const int64_t r = rows->r, in = f->in, out = f->out, pairs = (r + 1) / 2;
    float hs[GROUP * (r > 0 ? r : 1)];
    uint32_t hps[GROUP * (pairs > 0 ? pairs : 1)];
    const float *xs[GROUP];
    float *ys[GROUP], *h[GROUP];
    uint32_t *hp[GROUP];
    for (int g = 0; g < G; g++) {
        const int64_t t = rows->tokens ? rows->tokens[i + g] : i + g;
        xs[g] = x + t * ldx, ys[g] = y + t * ldy, h[g] = hs + g * r, hp[g] = hps + g * pairs;
    }
    int64_t k = 0;
    for (; k + 4 <= r; k += 4)
        shrink_dots_block(a + k * in, in, xs, h, k, G, 4);
    for (; k < r; k++)
        shrink_dots_block(a + k * in, in, xs, h, k, G, 1);
    for (int g = 0; g < G; g++)
        for (int64_t p = 0; p < pairs; p++)
            hp[g][p] = bf16_bits(h[g][2 * p]) | (2 * p + 1 < r ? bf16_bits(h[g][2 * p + 1]) << 16 : 0);
    int64_t p = 0;
    for (; p + 4 <= pairs; p += 4)
        expand_dots_block(b + 2 * p * out, out, r, (const uint32_t *const *)hp, ys, p, G, 4);
    for (; p < pairs; p++)
        expand_dots_block(b + 2 * p * out, out, r, (const uint32_t *const *)hp, ys, p, G, 1);
}

static BF16 void dots_groups(const struct rahf_rows *rows, int64_t i, int n, const char *a, const char *b,
                             const struct rahf_factors *f, const float *x, int64_t ldx, float *y, int64_t ldy)
{
    const uint16_t *a16 = (const uint16_t *)a, *b16 = (const uint16_t *)b;
    switch (n) {
    case 1: dots_group(rows, i, 1, a16, b16, f, x, ldx, y, ldy); break;
    case 2: dots_group(rows, i, 2, a16, b16, f, x, ldx, y, ldy); break;
    case 3: dots_group(rows, i, 3, a16, b16, f, x, ldx, y, ldy); break;
    case 4: dots_group(rows, i, 4, a16, b16, f, x, ldx, y, ldy); break;
    }
}

static int bf16_dots(void) { return __builtin_cpu_supports("avx512bf16"); }
#else
static int bf16_dots(void) { return 0; }
#endif

/* Rows lo .. hi-1 of `rows`, those on one slot next to each other in groups (the plan puts them side by
 * side), each group done by `group`. */
static void rows_of(const struct rahf_rows *rows, int64_t lo, int64_t hi, const struct rahf_factors *f,
                    const float *x, int64_t ldx, float *y, int64_t ldy, group_fn group)
{
    const int64_t r = rows->r, in = f->in, out = f->out, size = f->dtype == RAHF_F32 ? 4 : 2;
    const int64_t *slots = rows->slots;
    const char *A = f->A, *B = f->B;
    const int64_t a_slot = f->a_stride * size, b_slot = f->b_stride * size;
    if (lo < hi)
        prefetch_row(A + slots[lo] * a_slot, B + slots[lo] * b_slot, r, in * size, out * size);
    for (int64_t i = lo; i < hi;) {
        const int64_t s = slots[i];
        int n = 1;
        while (n < GROUP && i + n < hi && slots[i + n] == s)
            n++;
        if (i + n < hi)  /* the next group's streams start while this one computes */
            prefetch_row(A + slots[i + n] * a_slot, B + slots[i + n] * b_slot, r, in * size, out * size);
        group(rows, i, n, A + s * a_slot, B + s * b_slot, f, x, ldx, y, ldy);
        i += n;
    }
}

/* Returns -1 (doing nothing) for factors this build or CPU cannot multiply, 0 otherwise. */
static int lora_rows(const struct rahf_rows *rows, int64_t lo, int64_t hi, const struct rahf_factors *f,
                     const float *x, int64_t ldx, float *y, int64_t ldy)
{
    switch (f->dtype) {
    case RAHF_F32: rows_of(rows, lo, hi, f, x, ldx, y, ldy, f32_groups); return 0;
    case RAHF_BF16: rows_of(rows, lo, hi, f, x, ldx, y, ldy, bf16_groups); return 0;
#if defined(__AVX512F__)
    case RAHF_BF16_DOTS:
        if (!bf16_dots())
            return -1;
        rows_of(rows, lo, hi, f, x, ldx, y, ldy, dots_groups);
        return 0;
#endif
    default: return -1;
    }
}

/* A module group's plan for the step, as lora_slots._Rows.publish writes it. */
enum { RAHF_NONE = 0, RAHF_ROWS = 1, RAHF_OTHER = 2 };

struct rahf_plan {
    int64_t state;                 /* NONE: no row uses these modules' slots; ROWS: every LoRA token (a
                                      prompt chunk's too) is one of `rows`; OTHER: rows planned without
                                      this kernel */
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

/* Whether this build, on this CPU, multiplies factors of f's type. */
static int multiplies(const struct rahf_factors *f)
{
    return f->dtype == RAHF_F32 || f->dtype == RAHF_BF16 || (f->dtype == RAHF_BF16_DOTS && bf16_dots());
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
        if (p->state == RAHF_OTHER || (p->state == RAHF_ROWS && (p->total != total || !multiplies(m[i].f))))
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

/* lora_site as a `rahf_site_fn`: for inputs and outputs of the site's widths only. */
static int site_function(const void *site, int64_t total, const float *x, int64_t ldx, float *y, int64_t ldy)
{
    const struct rahf_site *s = site;
    return ldx == s->ldx && ldy == s->ldy && lora_site(s, total, x, y);
}

/* rows(&rahf_rows, &rahf_factors, x, ldx, y, ldy): one module's rows. */
static PyObject *py_rows(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    int64_t a[6];
    if (parse_args(args, nargs, "rows", 6, 0, a, NULL) < 0)
        return NULL;
    const struct rahf_rows *rows = (const struct rahf_rows *)(intptr_t)a[0];
    int failed;
    /* Touching no Python object: the server's other threads run meanwhile. */
    Py_BEGIN_ALLOW_THREADS
    failed = lora_rows(rows, 0, rows->n, (const struct rahf_factors *)(intptr_t)a[1], (const float *)(intptr_t)a[2],
                       a[3], (float *)(intptr_t)a[4], a[5]);
    Py_END_ALLOW_THREADS
    if (failed) {
        PyErr_SetString(PyExc_RuntimeError, "bfloat16 dot products need a CPU with AVX512_BF16 and the kernel's "
                                             "AVX-512 build");
        return NULL;
    }
    Py_RETURN_NONE;
}

/* site(&rahf_site, total, x, y) -> whether it did the rows. */
static PyObject *py_site(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    int64_t a[4];
    if (parse_args(args, nargs, "site", 4, 0, a, NULL) < 0)
        return NULL;
    int done;
    Py_BEGIN_ALLOW_THREADS
    done = lora_site((const struct rahf_site *)(intptr_t)a[0], a[1], (const float *)(intptr_t)a[2],
                     (float *)(intptr_t)a[3]);
    Py_END_ALLOW_THREADS
    return PyBool_FromLong(done);
}

static PyObject *py_bf16_dots(PyObject *self, PyObject *unused)
{
    return PyBool_FromLong(bf16_dots());
}

static PyMethodDef methods[] = {
    {"rows", (PyCFunction)(void (*)(void))py_rows, METH_FASTCALL, "one module's one-token rows"},
    {"site", (PyCFunction)(void (*)(void))py_site, METH_FASTCALL, "a site's modules' rows, or nothing"},
    {"bf16_dots", (PyCFunction)py_bf16_dots, METH_NOARGS, "whether rows multiply in bfloat16 dot products here"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "lora_rows", NULL, -1, methods};

PyMODINIT_FUNC PyInit_lora_rows(void)
{
    PyObject *m = with_openmp_flag(PyModule_Create(&module));
    if (m == NULL)
        return NULL;
    PyObject *f = PyLong_FromVoidPtr((void *)(rahf_site_fn)site_function);
    const int failed = f == NULL || PyModule_AddObjectRef(m, "site_function", f) < 0;
    Py_XDECREF(f);
    if (failed) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
