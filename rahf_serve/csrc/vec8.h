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

/* hsum of each of s[0..7], as one vector {hsum(s[0]), ..., hsum(s[7])}: the same pairs in the same order,
 * in 9 operations for the eight where hsum takes about as many for one. */
static inline vec8 lane_sums(const vec8 s[8])
{
#if defined(__AVX__)
    /* Pairs, then fours, within each 128-bit half, then the two halves. */
    const __m256 t0 = _mm256_hadd_ps((__m256)s[0], (__m256)s[1]), t1 = _mm256_hadd_ps((__m256)s[2], (__m256)s[3]);
    const __m256 t2 = _mm256_hadd_ps((__m256)s[4], (__m256)s[5]), t3 = _mm256_hadd_ps((__m256)s[6], (__m256)s[7]);
    const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
    return (vec8)_mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
#else
    vec8 d;
    for (int j = 0; j < 8; j++)
        d[j] = hsum(s[j]);
    return d;
#endif
}

#endif
