/* Q4_K / Q5_K sub-block scales and mins, unpacked four at a time (SSE2). */
#ifndef PYFORGE_K_SCALES_H
#define PYFORGE_K_SCALES_H

#if defined(__x86_64__) || defined(__SSE2__)
#include <emmintrin.h>
#include <stdint.h>
#include <string.h>

/* The 12 packed scale bytes -> bytes 0..7 = sc[0..7], bytes 8..15 = m[0..7],
 * four sub-blocks per 32-bit word at a time (layout in quants.h). Scalar on
 * purpose: the integer ALUs are idle while the vector ports are the limit. */
static inline __m128i k_scales_mins(const uint8_t *p) {
    uint32_t w0, w1, w2;
    memcpy(&w0, p, 4), memcpy(&w1, p + 4, 4), memcpy(&w2, p + 8, 4);
    const uint32_t sc_lo = w0 & 0x3f3f3f3fu, m_lo = w1 & 0x3f3f3f3fu;
    const uint32_t sc_hi = (w2 & 0x0f0f0f0fu) | ((w0 >> 2) & 0x30303030u);
    const uint32_t m_hi = ((w2 >> 4) & 0x0f0f0f0fu) | ((w1 >> 2) & 0x30303030u);
    return _mm_set_epi32((int)m_hi, (int)m_lo, (int)sc_hi, (int)sc_lo);
}
#endif

#endif
