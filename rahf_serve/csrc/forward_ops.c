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
 * each weight it reads feeds four rows' multiply-adds, eight with AVX-512 (benchmarks/panel_product_bench.py).
 *
 * Layouts (rahf_serve/packed_llama.py and kvcache.py own them; nothing is checked here):
 *   activations [tokens, ld] row-major float32;
 *   a weight [out, in] as panels [ceil(out / PANEL), in, PANEL], the columns past `out` zero; in bfloat16
 *   [ceil(out / PANEL), ceil(in / 2), PANEL, 2], an odd last input paired with zero;
 *   a layer's cache [2 (keys, values), max_rows, kv_heads, max_len, head_dim], contiguous;
 *   rotary tables [positions, head_dim]: cos, and sin with its first half negated, so that with the two
 *   halves of x swapped (x') the rotation is x * cos + x' * sin, transformers' rotate_half in one formula.
 * Each token's arithmetic depends on that token alone (and, in the attention, on its row's cache), so a
 * row's result does not change with the batch around it.
 *
 * A product can add a LoRA site's rows to its output before it returns: it calls the row kernel's site
 * function (csrc/extension.h's `rahf_site_fn`, from the other extension module), so a decode step makes one
 * call from Python per product, not one for the product and one for its LoRA, and the rows run without
 * the GIL as the product does.
 *
 * Built as a Python extension module (`forward_ops`), the arguments ints (addresses and sizes) and floats.
 */
#include "extension.h"
#include "vec8.h"
#include "bf16.h"
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* A panel's width and the row blocks: a block keeps its rows' sums, the panel's vectors and a broadcast in
 * registers. AVX2 (sixteen registers): panels of 24 columns, blocks of four rows (12 sums, 3 + 1). AVX-512
 * (32): panels of 48, blocks of eight rows in vectors of sixteen (24 sums, 3 + 1; nine where nine are
 * left: 27 + 3 + 1), and of up to four in vectors of eight (24 sums, 6 + 1). Eight rows in one pass
 * compute while the panel streams in, where in blocks of four the first waits on memory and the second
 * finds the panel in cache: on the project's CPU
 * eight rows reach 79-89 GFLOP/s against AVX2's 59-61 and sixteen 93-99 against 78-83, while one to four
 * rows, which wait on memory either way, run about as fast in both (benchmarks/panel_product_bench.py
 * --against AVX2). */
#if defined(__AVX512F__)
#define PANEL 48
#else
#define PANEL 24
#endif

/* Stores a row's sums (in `tile`, PANEL floats) to out[0 .. cols), or adds them to it. */
static inline void put_row(float *out, const float *tile, int64_t cols, int add)
{
    if (add) {
        for (int64_t j = 0; j < cols; j++)
            out[j] += tile[j];
    } else {
        memcpy(out, tile, (size_t)cols * sizeof(float));
    }
}

/* AVX2's products over bfloat16 panels (`bf16_products()`, below) run where the build has AVX2 and FMA but
 * not AVX-512, whose own use its dot-product instruction. */
#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
#define AVX2_BF16 1
#endif

#if defined(AVX2_BF16)
/* Eight lanes of bfloat16 pairs at w as two float32 vectors: the second of each pair is the top half of its
 * lane, the first the bottom half shifted up. */
static inline __attribute__((always_inline)) void pair_halves(const float *w, vec8 *second, vec8 *first)
{
    const __m256i lanes = _mm256_loadu_si256((const __m256i *)w);
    *second = (vec8)_mm256_castsi256_ps(_mm256_and_si256(lanes, _mm256_set1_epi32((int)0xffff0000u)));
    *first = (vec8)_mm256_castsi256_ps(_mm256_slli_epi32(lanes, 16));
}
#endif

/* How far ahead of its reads a pass that streams a panel in for others asks for it (`panel_steps`), in the
 * panel's rows: 128 rows, 12 KB at 24 columns (a row of inputs or of pairs is PANEL four-byte lanes). */
#define AHEAD 128

/* The sums of rows 0 .. R-1 (R at most four, a constant where it is inlined, so each count gets its own loop
 * with no multiply-adds for rows it does not have) of x [R, ldx] carried over rows k0 .. k1 of one panel, in
 * order, in vectors of eight; `ahead`: also prefetch the panel AHEAD rows ahead. A float32 panel [in, PANEL]
 * has a row per input. A bfloat16 one (`bf16`, AVX2_BF16) [pairs, PANEL, 2] has a row per pair of inputs,
 * x's rows rounded to bfloat16 and kept as float32 [R, 2 * pairs], each pair's second input first: AVX2 has
 * no dot-product instruction, so each lane's two products are fused into its sum one after the other, the
 * pair's second input first, as the instruction does; the product of two bfloat16 is exact in float32, so
 * each step rounds once, as the instruction's do. Unlike the instruction, a denormal bfloat16 weight or sum
 * is not read as zero. */
static inline __attribute__((always_inline)) void panel_steps(const float *x, int64_t ldx, const int R,
                                                              const float *restrict panel, int64_t k0, int64_t k1,
                                                              vec8 sums[4][PANEL / 8], const int ahead,
                                                              const int bf16)
{
    enum { V = PANEL / 8 };
    vec8 s[4][V];
    for (int m = 0; m < R; m++)
        for (int v = 0; v < V; v++)
            s[m][v] = sums[m][v];
    for (int64_t k = k0; k < k1; k++) {
        const float *w = panel + k * PANEL;
        if (ahead) {  /* a row is 1.5 cache lines at 24 columns */
            __builtin_prefetch(w + AHEAD * PANEL);
            __builtin_prefetch(w + AHEAD * PANEL + 16);
        }
#if defined(AVX2_BF16)
        if (bf16) {
            for (int v = 0; v < V; v++) {
                vec8 second, first;
                pair_halves(w + 8 * v, &second, &first);
                for (int m = 0; m < R; m++) {
                    s[m][v] = VMULADD(splat(x[m * ldx + 2 * k]), second, s[m][v]);
                    s[m][v] = VMULADD(splat(x[m * ldx + 2 * k + 1]), first, s[m][v]);
                }
            }
            continue;
        }
#else
        (void)bf16;
#endif
        vec8 wv[V];
        for (int v = 0; v < V; v++)
            wv[v] = load8(w + 8 * v);
        for (int m = 0; m < R; m++) {
            const vec8 b = splat(x[m * ldx + k]);
            for (int v = 0; v < V; v++)
                s[m][v] = VMULADD(b, wv[v], s[m][v]);
        }
    }
    for (int m = 0; m < R; m++)
        for (int v = 0; v < V; v++)
            sums[m][v] = s[m][v];
}

/* Rows 0 .. R-1 of x [R, ldx] times one panel of `rows` rows (panel_steps): their `cols` first columns into
 * y [R, ldy], or added to it (`add`). Each sum runs over the panel's rows in order, whatever the rows
 * around; the wider vectors below and the chunks of `chunked_blocks` sum each column in the same order, so a
 * row's result is the same in all. */
static inline __attribute__((always_inline)) void panel_rows(const float *x, int64_t ldx, const int R,
                                                             const float *restrict panel, int64_t rows, float *y,
                                                             int64_t ldy, int64_t cols, int add, const int bf16)
{
    enum { V = PANEL / 8 };
    vec8 s[4][V];
    for (int m = 0; m < R; m++)
        for (int v = 0; v < V; v++)
            s[m][v] = splat(0);
    panel_steps(x, ldx, R, panel, 0, rows, s, 0, bf16);
    for (int m = 0; m < R; m++) {
        float tile[PANEL];
        for (int v = 0; v < V; v++)
            store8(tile + 8 * v, s[m][v]);
        put_row(y + m * ldy, tile, cols, add);
    }
}

#if defined(__AVX512F__)
typedef float vec16 __attribute__((vector_size(64)));

static inline vec16 load16(const float *p)
{
    vec16 v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* panel_rows for R of five to nine rows, in vectors of sixteen. */
static inline __attribute__((always_inline)) void panel_rows16(const float *x, int64_t ldx, const int R,
                                                               const float *restrict panel, int64_t in, float *y,
                                                               int64_t ldy, int64_t cols, int add)
{
    vec16 s[9][3];
    for (int m = 0; m < R; m++)
        for (int v = 0; v < 3; v++)
            s[m][v] = (vec16)_mm512_setzero_ps();
    for (int64_t k = 0; k < in; k++) {
        const float *w = panel + k * PANEL;
        const vec16 wv[3] = {load16(w), load16(w + 16), load16(w + 32)};
        for (int m = 0; m < R; m++) {
            const vec16 b = (vec16)_mm512_set1_ps(x[m * ldx + k]);
            for (int v = 0; v < 3; v++)
                s[m][v] = (vec16)_mm512_fmadd_ps((__m512)b, (__m512)wv[v], (__m512)s[m][v]);
        }
    }
    for (int m = 0; m < R; m++) {
        float tile[PANEL];
        memcpy(tile, s[m], sizeof tile);
        put_row(y + m * ldy, tile, cols, add);
    }
}
#endif

#if !defined(__AVX512F__)
/* Blocks of rows over a panel, CHUNK of its rows at a time (float32: blocks of four, for 8 .. CHUNKED_ROWS
 * rows, the decode steps of a batch; bfloat16: blocks of two, every two rows or more, sixteen at a time):
 * the first block's pass streams the panel in, prefetching ahead, and the others take each chunk from L1
 * right behind it, their sums kept between chunks. Block after block over the whole panel, the first waited
 * on memory at the speed of its rows and the others computed after it. Chunked, SmolLM2-135M's float32
 * products at eight rows take 0.77-0.83x as long, at sixteen 0.87-0.93x, and a decode step of eight rows
 * 0.82x, on an AVX2 EPYC (benchmarks/panel_product_bench.py and forward_ops_bench.py --against). The
 * prefetch only pays where other blocks follow: a one-row pass prefetching took 1.16x as long (the
 * hardware's prefetch does better alone), and float32 past sixteen rows gained nothing (1.02-1.05x). */
#define CHUNKED_ROWS 16
#define CHUNK 32

/* The sums of rows 0 .. tokens-1 kept in blocks of B (row t's in s[t / B][t % B]) into y, as put_row. */
static inline __attribute__((always_inline)) void put_sums(vec8 (*s)[4][PANEL / 8], int64_t tokens, const int B,
                                                           float *y, int64_t ldy, int64_t cols, int add)
{
    for (int64_t t = 0; t < tokens; t++) {
        float tile[PANEL];
        for (int v = 0; v < PANEL / 8; v++)
            store8(tile + 8 * v, s[t / B][t % B][v]);
        put_row(y + t * ldy, tile, cols, add);
    }
}

/* Rows 0 .. tokens-1 (at most CHUNKED_ROWS: a multiple of B, or of two and one more) times one panel in blocks
 * of B, an odd last row a block of its own, as panel_rows. bfloat16 panels go in blocks of two: a block's
 * broadcasts are two a row per pair, and in fours they did not fit the registers beside the sums (eight rows
 * 0.99-1.04x float32's time, in twos 0.93-0.97x). */
static inline __attribute__((always_inline)) void chunked_blocks(const float *x, int64_t ldx, int64_t tokens,
                                                                 const float *panel, int64_t rows, float *y,
                                                                 int64_t ldy, int64_t cols, int add, const int B,
                                                                 const int bf16)
{
    enum { V = PANEL / 8 };
    const int64_t blocks = tokens / B, odd = tokens % B;
    vec8 s[CHUNKED_ROWS / 2 + 1][4][V];
    for (int64_t b = 0; b <= blocks; b++)
        for (int m = 0; m < B; m++)
            for (int v = 0; v < V; v++)
                s[b][m][v] = splat(0);
    for (int64_t k0 = 0; k0 < rows; k0 += CHUNK) {
        const int64_t k1 = k0 + CHUNK < rows ? k0 + CHUNK : rows;
        if (blocks)
            panel_steps(x, ldx, B, panel, k0, k1, s[0], 1, bf16);
        for (int64_t b = 1; b < blocks; b++)
            panel_steps(x + B * b * ldx, ldx, B, panel, k0, k1, s[b], 0, bf16);
        if (odd)
            panel_steps(x + B * blocks * ldx, ldx, 1, panel, k0, k1, s[blocks], 0, bf16);
    }
    put_sums(s, tokens, B, y, ldy, cols, add);
}
#endif

#if defined(AVX2_BF16)
/* bfloat16 rows from WIDENED_FROM on, up to WIDE_ROWS at a time: each chunk of the panel is widened once into
 * float32 in L1, its pairs' second inputs' row before their first's, as x's rows lie (bf16_pairs), and the
 * float32 blocks of four run over it: the same fused steps in the same order as panel_steps' bfloat16 loop,
 * with the widening paid once for every block rather than in each. A prompt chunk's products: at 32 and 64
 * rows 0.91-0.99x float32's time, in blocks of two 0.76-0.92x; from 12 to 16 rows it gained nothing over
 * blocks of two (benchmarks/panel_product_bench.py --bf16). */
#define WIDENED_FROM 24
#define WIDE_ROWS 64

/* Rows 0 .. tokens-1 (a multiple of four, at most WIDE_ROWS) times one bfloat16 panel of `pairs` rows, as
 * panel_rows. */
static void widened_blocks(const float *x, int64_t ldx, int64_t tokens, const float *panel, int64_t pairs, float *y,
                           int64_t ldy, int64_t cols, int add)
{
    enum { V = PANEL / 8 };
    const int64_t blocks = tokens / 4;
    vec8 s[WIDE_ROWS / 4][4][V];
    for (int64_t b = 0; b < blocks; b++)
        for (int m = 0; m < 4; m++)
            for (int v = 0; v < V; v++)
                s[b][m][v] = splat(0);
    float wide[2 * CHUNK * PANEL] __attribute__((aligned(32)));
    for (int64_t k0 = 0; k0 < pairs; k0 += CHUNK) {
        const int64_t k1 = k0 + CHUNK < pairs ? k0 + CHUNK : pairs;
        for (int64_t k = k0; k < k1; k++) {
            const float *w = panel + k * PANEL;
            float *o = wide + 2 * (k - k0) * PANEL;
            for (int v = 0; v < V; v++) {
                vec8 second, first;
                pair_halves(w + 8 * v, &second, &first);
                store8(o + 8 * v, second);
                store8(o + PANEL + 8 * v, first);
            }
        }
        for (int64_t b = 0; b < blocks; b++)
            panel_steps(x + 4 * b * ldx + 2 * k0, ldx, 4, wide, 0, 2 * (k1 - k0), s[b], 0, 0);
    }
    put_sums(s, tokens, 4, y, ldy, cols, add);
}
#endif

/* One panel's rows: blocks of eight (AVX-512); or in chunks (chunked_blocks, widened_blocks), then blocks of
 * four; then the rest. `rows`, `bf16`: as panel_rows. */
static inline __attribute__((always_inline)) void rows_block(const float *x, int64_t ldx, int64_t tokens,
                                                             const float *panel, int64_t rows, float *y, int64_t ldy,
                                                             int64_t cols, int add, const int bf16)
{
    int64_t m = 0;
#if defined(__AVX512F__)
    for (; m + 8 <= tokens; m += 8) {
        if (tokens - m == 9) {  /* nine in one pass (27 sums, 3 panel vectors and a broadcast in the 32
                                   registers): a ninth row's pass of its own read the panel again, and took
                                   a step of eight decoding rows and a one-token row 1.19x as long as eight,
                                   in one pass 1.11x (forward_ops_bench.py --rows 8 9 --against) */
            panel_rows16(x + m * ldx, ldx, 9, panel, rows, y + m * ldy, ldy, cols, add);
            m += 9;
            break;
        }
        panel_rows16(x + m * ldx, ldx, 8, panel, rows, y + m * ldy, ldy, cols, add);
    }
#else
#if defined(AVX2_BF16)
    if (bf16 && tokens >= WIDENED_FROM) {  /* in fours, the last one to three rows in chunks */
        for (; m + 4 <= tokens; m += WIDE_ROWS) {
            const int64_t n = tokens - m < WIDE_ROWS ? (tokens - m) & ~(int64_t)3 : WIDE_ROWS;
            widened_blocks(x + m * ldx, ldx, n, panel, rows, y + m * ldy, ldy, cols, add);
            if (n < WIDE_ROWS) {
                m += n;
                break;
            }
        }
        if (m < tokens)
            chunked_blocks(x + m * ldx, ldx, tokens - m, panel, rows, y + m * ldy, ldy, cols, add, 2, 1);
        return;
    }
#endif
    if (bf16 && tokens > 1) {  /* every row, sixteen at a time */
        for (; m < tokens; m += CHUNKED_ROWS)
            chunked_blocks(x + m * ldx, ldx, tokens - m < CHUNKED_ROWS ? tokens - m : CHUNKED_ROWS, panel, rows,
                           y + m * ldy, ldy, cols, add, 2, 1);
        return;
    }
    if (!bf16 && tokens >= 8 && tokens <= CHUNKED_ROWS) {
        m = tokens & ~(int64_t)3;
        chunked_blocks(x, ldx, m, panel, rows, y, ldy, cols, add, 4, 0);
    }
    for (; m + 4 <= tokens; m += 4)
        panel_rows(x + m * ldx, ldx, 4, panel, rows, y + m * ldy, ldy, cols, add, bf16);
#endif
    x += m * ldx;
    y += m * ldy;
    switch (tokens - m) {
#if defined(__AVX512F__)
    case 7: panel_rows16(x, ldx, 7, panel, rows, y, ldy, cols, add); break;
    case 6: panel_rows16(x, ldx, 6, panel, rows, y, ldy, cols, add); break;
    case 5: panel_rows16(x, ldx, 5, panel, rows, y, ldy, cols, add); break;
    case 4: panel_rows(x, ldx, 4, panel, rows, y, ldy, cols, add, bf16); break;
#endif
    case 3: panel_rows(x, ldx, 3, panel, rows, y, ldy, cols, add, bf16); break;
    case 2: panel_rows(x, ldx, 2, panel, rows, y, ldy, cols, add, bf16); break;
    case 1: panel_rows(x, ldx, 1, panel, rows, y, ldy, cols, add, bf16); break;
    default: break;
    }
}

/* A float32 panel's rows. */
static void panel_block(const float *x, int64_t ldx, int64_t tokens, const float *panel, int64_t in, float *y,
                        int64_t ldy, int64_t cols, int add)
{
    rows_block(x, ldx, tokens, panel, in, y, ldy, cols, add, 0);
}

#if defined(__AVX512F__)
/* Products in bfloat16 (AVX512_BF16, where the CPU has it: `bf16_products()`): the weight in panels of
 * pairs [ceil(out / PANEL), ceil(in / 2), PANEL, 2], each lane two bfloat16 of consecutive inputs, and the
 * rows' inputs rounded to bfloat16 pairs likewise; one dot-product instruction does two inputs' multiply-adds
 * per lane into float32 sums. Half the bytes of float32 and twice the multiply-adds per instruction. Built
 * for that extension alone (bf16.h), so an AVX-512 CPU without it loads the module and never calls them. */

static inline __attribute__((always_inline)) BF16 void bf16_rows(const uint32_t *x, int64_t ldx, const int R,
                                                                  const uint32_t *restrict panel, int64_t pairs,
                                                                  float *y, int64_t ldy, int64_t cols, int add)
{
    __m512 s[9][3];
    for (int m = 0; m < R; m++)
        for (int v = 0; v < 3; v++)
            s[m][v] = _mm512_setzero_ps();
    for (int64_t k = 0; k < pairs; k++) {
        const uint32_t *w = panel + k * PANEL;
        const __m512bh w0 = (__m512bh)_mm512_loadu_si512(w), w1 = (__m512bh)_mm512_loadu_si512(w + 16),
                       w2 = (__m512bh)_mm512_loadu_si512(w + 32);
        for (int m = 0; m < R; m++) {
            const __m512bh b = (__m512bh)_mm512_set1_epi32((int)x[m * ldx + k]);
            s[m][0] = _mm512_dpbf16_ps(s[m][0], b, w0);
            s[m][1] = _mm512_dpbf16_ps(s[m][1], b, w1);
            s[m][2] = _mm512_dpbf16_ps(s[m][2], b, w2);
        }
    }
    for (int m = 0; m < R; m++) {
        float tile[PANEL];
        memcpy(tile, s[m], sizeof tile);
        put_row(y + m * ldy, tile, cols, add);
    }
}

/* One panel's rows in bfloat16: as panel_block, in blocks of eight, nine where nine are left. */
static BF16 void bf16_block(const uint32_t *x, int64_t ldx, int64_t tokens, const uint32_t *panel, int64_t pairs,
                            float *y, int64_t ldy, int64_t cols, int add)
{
    int64_t m = 0;
    for (; m + 8 <= tokens; m += 8) {
        if (tokens - m == 9) {
            bf16_rows(x + m * ldx, ldx, 9, panel, pairs, y + m * ldy, ldy, cols, add);
            return;
        }
        bf16_rows(x + m * ldx, ldx, 8, panel, pairs, y + m * ldy, ldy, cols, add);
    }
    x += m * ldx;
    y += m * ldy;
    switch (tokens - m) {
    case 7: bf16_rows(x, ldx, 7, panel, pairs, y, ldy, cols, add); break;
    case 6: bf16_rows(x, ldx, 6, panel, pairs, y, ldy, cols, add); break;
    case 5: bf16_rows(x, ldx, 5, panel, pairs, y, ldy, cols, add); break;
    case 4: bf16_rows(x, ldx, 4, panel, pairs, y, ldy, cols, add); break;
    case 3: bf16_rows(x, ldx, 3, panel, pairs, y, ldy, cols, add); break;
    case 2: bf16_rows(x, ldx, 2, panel, pairs, y, ldy, cols, add); break;
    case 1: bf16_rows(x, ldx, 1, panel, pairs, y, ldy, cols, add); break;
    default: break;
    }
}

/* x [tokens, ldx] float32 as bfloat16 pairs [tokens, pairs] (rounded to nearest even, as torch rounds), a
 * last odd input paired with zero. */
static BF16 void bf16_pairs(const float *x, int64_t ldx, int64_t tokens, int64_t in, uint32_t *out)
{
    const int64_t pairs = (in + 1) / 2;
    for (int64_t t = 0; t < tokens; t++) {
        const float *r = x + t * ldx;
        uint16_t *o = (uint16_t *)(out + t * pairs);
        for (int64_t k = 0; k < 2 * pairs; k += 32) {
            const int64_t left = 2 * pairs - k;
            const __mmask32 m = left >= 32 ? 0xffffffffu : (__mmask32)((1u << left) - 1);
            _mm512_mask_storeu_epi16(o + k, m, (__m512i)bf16_32(r, k, in));
        }
    }
}

static int bf16_products(void) { return __builtin_cpu_supports("avx512bf16"); }
#elif defined(AVX2_BF16)
/* Products over bfloat16 panels where AVX2 has no dot-product instruction: the same panels of pairs and the
 * same arithmetic, fused multiply-adds in its order (panel_steps). Half float32's bytes: one to four rows,
 * which wait on memory, take 0.53-0.64x float32's time; eight, which compute, 0.83-0.92x; sixteen to
 * sixty-four 1.0-1.11x, the widening of the weights costing about what their bytes save (SmolLM2-135M's
 * products on an AVX2 EPYC, benchmarks/panel_product_bench.py --bf16). */

/* One panel's rows in bfloat16 (x: rows rounded, as float32 [tokens, 2 * pairs]). */
static void bf16_block(const float *x, int64_t ldx, int64_t tokens, const uint32_t *panel, int64_t pairs, float *y,
                       int64_t ldy, int64_t cols, int add)
{
    rows_block(x, ldx, tokens, (const float *)panel, pairs, y, ldy, cols, add, 1);
}

/* Eight float32 lanes' bits rounded to bfloat16 as the instruction rounds, to nearest even (torch's
 * rounding), a NaN made quiet and a denormal zero, as float32 bits. */
static inline __m256i bf16_round8(__m256i v)
{
    const __m256i top = _mm256_set1_epi32((int)0xffff0000u), exponent = _mm256_set1_epi32(0x7f800000);
    const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(v, _mm256_set1_epi32(0x7fffffff)), exponent);
    const __m256i denormal = _mm256_cmpeq_epi32(_mm256_and_si256(v, exponent), _mm256_setzero_si256());
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(v, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_and_si256(_mm256_add_epi32(v, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), odd)), top);
    r = _mm256_blendv_epi8(r, _mm256_and_si256(_mm256_or_si256(v, _mm256_set1_epi32(0x00400000)), top), nan);
    return _mm256_blendv_epi8(r, _mm256_and_si256(v, _mm256_set1_epi32((int)0x80000000u)), denormal);
}

/* x [tokens, ldx] rounded to bfloat16 (bf16_round8), kept as float32 [tokens, 2 * pairs], a last odd input
 * paired with zero, each pair's second input first: the order of the fused steps (panel_steps). */
static void bf16_pairs(const float *x, int64_t ldx, int64_t tokens, int64_t in, float *out)
{
    const int64_t width = 2 * ((in + 1) / 2);
    for (int64_t t = 0; t < tokens; t++) {
        const float *r = x + t * ldx;
        float *o = out + t * width;
        int64_t j = 0;
        for (; j + 8 <= in; j += 8)  /* the shuffle swaps each pair */
            _mm256_storeu_si256((__m256i *)(o + j),
                                _mm256_shuffle_epi32(bf16_round8(_mm256_loadu_si256((const __m256i *)(r + j))), 0xb1));
        if (j < width) {  /* the last inputs, zeros past the row */
            float lanes[8] = {0}, rounded[8];
            memcpy(lanes, r + j, (size_t)(in - j) * sizeof *lanes);
            const __m256i v = bf16_round8(_mm256_loadu_si256((const __m256i *)lanes));
            _mm256_storeu_si256((__m256i *)rounded, _mm256_shuffle_epi32(v, 0xb1));
            memcpy(o + j, rounded, (size_t)(width - j) * sizeof *rounded);
        }
    }
}

static int bf16_products(void) { return 1; }
#else
static int bf16_products(void) { return 0; }
#endif

/* Below this many multiply-adds a product stays on one thread: waking the others costs more. */
#define SHARED_PRODUCT (1 << 17)

/* Panels lo .. hi-1 of a product (below); `x` and `panels` in bfloat16 pairs where `bf16`. */
static void panel_range(const void *x, int64_t ldx, int64_t tokens, const void *panels, int64_t in, int64_t out,
                        float *y, int64_t ldy, int add, int bf16, int64_t lo, int64_t hi)
{
    for (int64_t p = lo; p < hi; p++) {
        const int64_t cols = out - p * PANEL < PANEL ? out - p * PANEL : PANEL;
#if defined(__AVX512F__) || defined(AVX2_BF16)
        if (bf16) {
            const int64_t pairs = (in + 1) / 2;
            bf16_block(x, ldx, tokens, (const uint32_t *)panels + p * pairs * PANEL, pairs, y + p * PANEL, ldy,
                       cols, add);
            continue;
        }
#endif
        panel_block(x, ldx, tokens, (const float *)panels + p * in * PANEL, in, y + p * PANEL, ldy, cols, add);
    }
}

/* y [tokens, ldy] = x [tokens, ldx] W^T (or y += it, `add`), W [out, in] as panels, float32 or (`bf16`)
 * bfloat16 pairs, whose product rounds x's rows to bfloat16 first. A panel's rows go in blocks while it is in
 * cache; panels are shared between torch's threads (`threads`) when the product is large enough. Returns -1
 * when the bfloat16 rows' scratch cannot be had, 0 otherwise. */
static int panel_product(const float *x, int64_t ldx, int64_t tokens, const void *panels, int64_t in,
                         int64_t out, float *y, int64_t ldy, int add, int bf16, int64_t threads)
{
    const int64_t count = (out + PANEL - 1) / PANEL;
    const void *rows = x;
#if defined(__AVX512F__) || defined(AVX2_BF16)
    /* The thread's scratch for rows in pairs, kept: a decode step makes 121 products. AVX2 keeps each pair as
     * two float32. */
#if defined(__AVX512F__)
    typedef uint32_t pair_t;
    enum { PER_PAIR = 1 };
#else
    typedef float pair_t;
    enum { PER_PAIR = 2 };
#endif
    static __thread pair_t *scratch;
    static __thread int64_t held;
    if (bf16) {
        const int64_t need = tokens * ((in + 1) / 2) * PER_PAIR;
        if (need > held) {
            pair_t *grown = realloc(scratch, (size_t)need * sizeof *grown);
            if (grown == NULL)
                return -1;
            scratch = grown;
            held = need;
        }
        bf16_pairs(x, ldx, tokens, in, scratch);
        rows = scratch;
        ldx = (in + 1) / 2 * PER_PAIR;
    }
#else
    if (bf16)
        return -1;
#endif
#ifdef _OPENMP
    if (threads > 1 && count > 1 && tokens * in * out >= SHARED_PRODUCT) {
#pragma omp parallel num_threads((int)threads)
        {
            const int64_t n = omp_get_num_threads(), t = omp_get_thread_num();
            panel_range(rows, ldx, tokens, panels, in, out, y, ldy, add, bf16, count * t / n, count * (t + 1) / n);
        }
        return 0;
    }
#else
    (void)threads;
#endif
    panel_range(rows, ldx, tokens, panels, in, out, y, ldy, add, bf16, 0, count);
    return 0;
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

/* The attention's arithmetic runs in vectors of eight. A first version summed each key's dot product across
 * its lanes alone, called expf for each score and added each weighted value into the outputs in memory: eight
 * rows at 2,000 tokens of context took 83 ms over the 30 layers where reading their keys and values takes 30
 * (leaving the scores out saved 44% of it, the values' weighting 36%, the exponentials 16-23%); this one
 * 46-50 ms, and 8 against 13 ms at 256 tokens. */

/* Lanewise max; b where either is NaN. */
static inline vec8 vmax(vec8 a, vec8 b)
{
#if defined(__AVX__)
    return (vec8)_mm256_max_ps((__m256)a, (__m256)b);
#else
    for (int l = 0; l < 8; l++)
        a[l] = a[l] > b[l] ? a[l] : b[l];
    return a;
#endif
}

static inline float hmax(vec8 v)
{
    float m = v[0];
    for (int l = 1; l < 8; l++)
        m = v[l] > m ? v[l] : m;
    return m;
}

typedef int32_t vec8i __attribute__((vector_size(32)));

/* e^x for x <= 0, every lane (within ~2 ulp of expf; below -87 the result is ~1e-38, not 0, which a softmax
 * cannot tell apart): x = n ln2 + r with |r| <= ln2 / 2, e^r by Cephes' polynomial, 2^n put in the exponent. */
static inline vec8 exp_nonpositive(vec8 x)
{
    x = vmax(splat(-87.0f), x); /* a NaN stays one */
    const vec8 n = (x * splat(1.44269504088896341f) + splat(12582912.0f)) - splat(12582912.0f); /* rounded */
    const vec8 r = (x - n * splat(0.693359375f)) - n * splat(-2.12194440e-4f);
    vec8 p = splat(1.9875691500e-4f);
    p = VMULADD(p, r, splat(1.3981999507e-3f));
    p = VMULADD(p, r, splat(8.3334519073e-3f));
    p = VMULADD(p, r, splat(4.1665795894e-2f));
    p = VMULADD(p, r, splat(1.6666665459e-1f));
    p = VMULADD(p, r, splat(5.0000001201e-1f));
    p = VMULADD(p, r * r, r + splat(1.0f));
    const vec8i bits = (__builtin_convertvector(n, vec8i) + 127) << 23;
    vec8 scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* q . k_j for eight keys at k (rows of hd), as one vector; each key's products summed over eight lanes. */
static inline vec8 dots8(const float *q, const float *k, int64_t hd)
{
    vec8 s[8] = {{0}};
    int64_t e = 0;
    for (; e + 8 <= hd; e += 8) {
        const vec8 qv = load8(q + e);
        for (int j = 0; j < 8; j++)
            s[j] = VMULADD(qv, load8(k + j * hd + e), s[j]);
    }
    vec8 d = lane_sums(s);
    for (; e < hd; e++)
        for (int j = 0; j < 8; j++)
            d[j] += q[e] * k[j * hd + e];
    return d;
}

static float dot(const float *restrict q, const float *restrict k, int64_t hd)
{
    float d = 0;
    for (int64_t e = 0; e < hd; e++)
        d += q[e] * k[e];
    return d;
}

/* out[0 .. w) += sum_j p[j] v_j over jn values at v (rows of hd), w a multiple of eight, at most 64: the sums
 * stay in registers across the values. */
static inline __attribute__((always_inline)) void weigh_values(const float *p, const float *v, int64_t jn, int64_t hd, float *out, const int w)
{
    vec8 acc[8];
    for (int c = 0; c < w / 8; c++)
        acc[c] = load8(out + 8 * c);
    for (int64_t j = 0; j < jn; j++) {
        const vec8 b = splat(p[j]);
        for (int c = 0; c < w / 8; c++)
            acc[c] = VMULADD(b, load8(v + j * hd + 8 * c), acc[c]);
    }
    for (int c = 0; c < w / 8; c++)
        store8(out + 8 * c, acc[c]);
}

/* Keys per block of the values' weighting: their values (16 KB at 64 dimensions) stay in L1 while each of
 * the group's heads reads them. */
#define VALUE_BLOCK 64

/* One token's heads that share kv head `g` (`group` of them) over its row's first n keys: out = softmax(scale
 * q.K) V, scores in `scores` [group, n + 1]. The group is done together so each key and value is read once. */
static void attend_group(const float *q, int64_t group, const float *keys, const float *values, int64_t n,
                         int64_t hd, float scale, float *scores, float *out)
{
    const int64_t blocks = n / 8 * 8;
    /* Keys in blocks of eight, each block read once for all the group's heads (it stays in L1 between them). */
    for (int64_t j = 0; j < blocks; j += 8) {
        /* Memory is idle while the arithmetic on keys it has brought runs: fetch the values the last pass
         * reads meanwhile (5-13% shorter calls at eight rows, 256 to 2,000 tokens of context). */
        for (int64_t c = 0; c < 8 * hd; c += 16)
            __builtin_prefetch(values + j * hd + c);
        for (int64_t i = 0; i < group; i++)
            store8(scores + i * (n + 1) + j, dots8(q + i * hd, keys + j * hd, hd) * splat(scale));
    }
    for (int64_t j = blocks; j < n; j++)
        for (int64_t i = 0; i < group; i++)
            scores[i * (n + 1) + j] = dot(q + i * hd, keys + j * hd, hd) * scale;
    for (int64_t i = 0; i < group; i++) {
        float *restrict si = scores + i * (n + 1);
        vec8 top = splat(-INFINITY);
        for (int64_t j = 0; j < blocks; j += 8)
            top = vmax(top, load8(si + j));
        float m = hmax(top);
        for (int64_t j = blocks; j < n; j++)
            m = si[j] > m ? si[j] : m;
        vec8 sums = splat(0);
        for (int64_t j = 0; j < blocks; j += 8) {
            const vec8 p = exp_nonpositive(load8(si + j) - splat(m));
            store8(si + j, p);
            sums += p;
        }
        float sum = hsum(sums);
        for (int64_t j = blocks; j < n; j++) {
            si[j] = expf(si[j] - m);
            sum += si[j];
        }
        si[n] = 1.0f / sum; /* each head's scores are n + 1 apart: the sum's inverse after them */
    }
    for (int64_t i = 0; i < group * hd; i++)
        out[i] = 0;
    const int64_t wide = hd / 64 * 64, rest = (hd - wide) / 8 * 8;
    for (int64_t jb = 0; jb < n; jb += VALUE_BLOCK) {
        const int64_t jn = n - jb < VALUE_BLOCK ? n - jb : VALUE_BLOCK;
        for (int64_t i = 0; i < group; i++) {
            const float *p = scores + i * (n + 1) + jb, *v = values + jb * hd;
            float *oi = out + i * hd;
            for (int64_t e = 0; e < wide; e += 64)
                weigh_values(p, v + e, jn, hd, oi + e, 64);
            switch (rest) {
            case 56: weigh_values(p, v + wide, jn, hd, oi + wide, 56); break;
            case 48: weigh_values(p, v + wide, jn, hd, oi + wide, 48); break;
            case 40: weigh_values(p, v + wide, jn, hd, oi + wide, 40); break;
            case 32: weigh_values(p, v + wide, jn, hd, oi + wide, 32); break;
            case 24: weigh_values(p, v + wide, jn, hd, oi + wide, 24); break;
            case 16: weigh_values(p, v + wide, jn, hd, oi + wide, 16); break;
            case 8: weigh_values(p, v + wide, jn, hd, oi + wide, 8); break;
            default: break;
            }
            for (int64_t j = 0; j < jn; j++)
                for (int64_t e = wide + rest; e < hd; e++)
                    oi[e] += p[j] * v[j * hd + e];
        }
    }
    for (int64_t i = 0; i < group; i++) {
        const float inv = scores[i * (n + 1) + n];
        for (int64_t e = 0; e < hd; e++)
            out[i * hd + e] *= inv;
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
        float *scores = malloc((size_t)(group * (width + 1)) * sizeof(float));
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

/* product(x, ldx, tokens, panels, in, out, y, ldy, add, bf16, threads, site_function, site) -> whether the
 * site's LoRA rows were added too: `site_function` (a `rahf_site_fn`, or 0 for none) is called on `site`
 * after the product, with its input and output. `bf16`: the panels are bfloat16 pairs (`bf16_products()`
 * says whether this CPU can). */
static PyObject *py_product(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    int64_t a[13];
    if (parse_args(args, nargs, "product", 13, 0, a, NULL) < 0)
        return NULL;
    if (a[9] && !bf16_products()) {
        PyErr_SetString(PyExc_RuntimeError, "bfloat16 products need the AVX2 build (AVX2 and FMA), or the AVX-512 "
                                             "build on a CPU with AVX512_BF16; this build or CPU has neither");
        return NULL;
    }
    const rahf_site_fn lora = PTR(rahf_site_fn, a[11]);
    int done = 1, failed;
    /* Up to milliseconds, touching no Python object: the server's other threads run meanwhile. */
    Py_BEGIN_ALLOW_THREADS
    failed = panel_product(PTR(const float *, a[0]), a[1], a[2], PTR(const void *, a[3]), a[4], a[5],
                           PTR(float *, a[6]), a[7], (int)a[8], (int)a[9], a[10]);
    if (!failed && lora != NULL)
        done = lora(PTR(const void *, a[12]), a[2], PTR(const float *, a[0]), a[1], PTR(float *, a[6]), a[7]);
    Py_END_ALLOW_THREADS
    if (failed)
        return PyErr_NoMemory();
    return PyBool_FromLong(done);
}

static PyObject *py_bf16_products(PyObject *self, PyObject *unused)
{
    return PyBool_FromLong(bf16_products());
}

static PyMethodDef methods[] = {
    {"product", (PyCFunction)(void (*)(void))py_product, METH_FASTCALL, "x W^T, W stored as panels"},
    {"bf16_products", py_bf16_products, METH_NOARGS, "whether products over bfloat16 panels run here"},
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
