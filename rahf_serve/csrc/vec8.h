/* Eight float32 lanes in portable GCC vectors (one AVX register where the build targets AVX), shared by the
 * extension modules in csrc/. Each kernel fixes the order of its own sums with these: nothing here reorders
 * arithmetic, so a kernel's results are the same in every build that has the same fused multiply-add. */
#ifndef RAHF_VEC8_H
#define RAHF_VEC8_H

#include <string.h>
#if defined(__AVX__)
#include <immintrin.h>
#endif

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

/* The sum of v's lanes, pairs first: ((v0 + v1) + (v2 + v3)) + ((v4 + v5) + (v6 + v7)). */
static inline float hsum(vec8 v)
{
    return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
}

#endif
