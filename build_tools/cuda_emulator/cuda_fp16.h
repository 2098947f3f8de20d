/* The part of CUDA's cuda_fp16.h that cuda/*.cu uses, for the CPU emulator.
 *
 * __half is 16 bits of IEEE binary16, as on the GPU; conversions go through
 * the compiler's _Float16, which rounds to nearest even like __float2half_rn.
 */
#ifndef PYFORGE_CUDA_EMULATOR_FP16_H
#define PYFORGE_CUDA_EMULATOR_FP16_H

#include <string.h>

struct __half {
    unsigned short bits;
};
static_assert(sizeof(__half) == 2, "__half must be 2 bytes");

static inline __half __ushort_as_half(unsigned short bits) { return __half{bits}; }
static inline unsigned short __half_as_ushort(__half h) { return h.bits; }

static inline float __half2float(__half h) {
    _Float16 f;
    memcpy(&f, &h.bits, 2);
    return (float)f;
}

static inline __half __float2half_rn(float v) {
    _Float16 f = (_Float16)v;
    __half h;
    memcpy(&h.bits, &f, 2);
    return h;
}

static inline __half __float2half(float v) { return __float2half_rn(v); }

#endif
