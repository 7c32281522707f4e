/* Rounding float32 to bfloat16 for the AVX512_BF16 dot products of the extension modules in csrc/ (the
 * forward's products and the LoRA row kernel's), in their AVX-512 builds only. Both round to nearest even,
 * as torch rounds, so a row rounds the same in either module. The functions are compiled for the
 * extension alone (`BF16`): a module that includes them loads on any AVX-512 CPU and asks the CPU before
 * calling them. */
#ifndef RAHF_BF16_H
#define RAHF_BF16_H

#if defined(__AVX512F__)
#include <immintrin.h>
#include <stdint.h>

#define BF16 __attribute__((target("avx512bf16")))

/* The bfloat16 bits of v. */
static inline __attribute__((always_inline)) BF16 uint32_t bf16_bits(float v)
{
    return (uint16_t)_mm_cvtsi128_si32((__m128i)_mm_cvtneps_pbh(_mm_set_ss(v)));
}

/* The 32 inputs of x from j on as bfloat16, those past `in` zero. */
static inline __attribute__((always_inline)) BF16 __m512bh bf16_32(const float *x, int64_t j, int64_t in)
{
    const int64_t left = in - j;
    if (left >= 32)  /* the second operand's sixteen go first */
        return _mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + j + 16), _mm512_loadu_ps(x + j));
    const __mmask16 lo = left >= 16 ? 0xffff : (__mmask16)((1u << left) - 1);
    const __mmask16 hi = left <= 16 ? 0 : (__mmask16)((1u << (left - 16)) - 1);
    return _mm512_cvtne2ps_pbh(_mm512_maskz_loadu_ps(hi, x + j + 16), _mm512_maskz_loadu_ps(lo, x + j));
}
#endif

#endif
