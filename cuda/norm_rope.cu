/* Non-matmul model primitives: rmsnorm and layernorm (alone, or after the residual add), rope,
 * silu * mul, gelu_tanh * mul, soft-capping, scaling, residual add, bias.
 * Each has an _f32 and an _f16 entry point (activations float or half);
 * norm weights, biases and freq factors are always float32. Arithmetic is
 * float throughout, as native/ops_kernels.c (the reference) does.
 */
#include "common.cuh"

/* ------------------------------------------------------------------------ */
/* rmsnorm: out[i, :] = x[i, :] / sqrt(mean(x[i, :]^2) + eps) * w            */
/* ------------------------------------------------------------------------ */
/* rmsnorm_{f32,f16}(x, w, out, d, eps)
 *   x, out  [n, d] (out may be x)    w  float [d]
 *   grid (n), block (multiple of 32, <= 1024; 256): one block per row. */
template <typename T>
__device__ void rmsnorm_row(const T *x, const float *__restrict__ w, T *out, int d, float eps) {
    __shared__ float scratch[32];
    const T *xr = x + (pf_i64)blockIdx.x * d;
    T *orow = out + (pf_i64)blockIdx.x * d;
    float ss = 0.0f;
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
        float v = pf_load(xr + j);
        ss += v * v;
    }
    const float r = rsqrtf(pf_block_sum(ss, scratch) / (float)d + eps);
    for (int j = threadIdx.x; j < d; j += blockDim.x) pf_store(orow + j, pf_load(xr + j) * r * w[j]);
}

extern "C" __global__ void rmsnorm_f32(const float *x, const float *w, float *out, int d, float eps) {
    rmsnorm_row(x, w, out, d, eps);
}
extern "C" __global__ void rmsnorm_f16(const __half *x, const float *w, __half *out, int d, float eps) {
    rmsnorm_row(x, w, out, d, eps);
}

/* add_rmsnorm_{f32,f16}(x, y, w, out, d, eps): x += y (the residual add, stored
 * as add_inplace stores it), then out = rmsnorm(x) as rmsnorm_*: one launch and
 * one pass over x instead of two. x, y, out [n, d] (out not x or y); w float [d];
 * grid (n), block (multiple of 32, <= 1024; 256). Each thread reads back only the
 * elements of x it wrote itself, so no barrier is needed between the passes. */
template <typename T>
__device__ void add_rmsnorm_row(T *x, const T *y, const float *__restrict__ w, T *out, int d, float eps) {
    __shared__ float scratch[32];
    T *xr = x + (pf_i64)blockIdx.x * d;
    const T *yr = y + (pf_i64)blockIdx.x * d;
    T *orow = out + (pf_i64)blockIdx.x * d;
    float ss = 0.0f;
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
        pf_store(xr + j, pf_load(xr + j) + pf_load(yr + j));
        const float v = pf_load(xr + j);    /* the stored (rounded) sum, as rmsnorm would read it */
        ss += v * v;
    }
    const float r = rsqrtf(pf_block_sum(ss, scratch) / (float)d + eps);
    for (int j = threadIdx.x; j < d; j += blockDim.x) pf_store(orow + j, pf_load(xr + j) * r * w[j]);
}

extern "C" __global__ void add_rmsnorm_f32(float *x, const float *y, const float *w, float *out, int d, float eps) {
    add_rmsnorm_row(x, y, w, out, d, eps);
}
extern "C" __global__ void add_rmsnorm_f16(__half *x, const __half *y, const float *w, __half *out, int d,
                                           float eps) {
    add_rmsnorm_row(x, y, w, out, d, eps);
}

/* ------------------------------------------------------------------------ */
/* layernorm: out[i, :] = (x[i, :] - mean) / sqrt(var + eps) * w + b         */
/* ------------------------------------------------------------------------ */
/* layernorm_{f32,f16}(x, w, b, out, d, eps) and add_layernorm_{f32,f16}(x, y, w, b,
 * out, d, eps) (x += y first, stored as add_inplace stores it), laid out and
 * launched as rmsnorm_* / add_rmsnorm_*; w, b float [d]. The variance is a second
 * pass around the mean (no cancellation in E[x^2] - mean^2); each thread reads back
 * only elements it wrote, so no barrier is needed between the passes. */
template <typename T>
__device__ void layernorm_row(T *x, const T *y, const float *__restrict__ w, const float *__restrict__ b, T *out,
                              int d, float eps) {
    __shared__ float scratch[32];
    T *xr = x + (pf_i64)blockIdx.x * d;
    T *orow = out + (pf_i64)blockIdx.x * d;
    float s = 0.0f;
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
        if (y) pf_store(xr + j, pf_load(xr + j) + pf_load(y + (pf_i64)blockIdx.x * d + j));
        s += pf_load(xr + j);
    }
    const float mean = pf_block_sum(s, scratch) / (float)d;
    float ss = 0.0f;
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
        const float c = pf_load(xr + j) - mean;
        ss += c * c;
    }
    const float r = rsqrtf(pf_block_sum(ss, scratch) / (float)d + eps);
    for (int j = threadIdx.x; j < d; j += blockDim.x) pf_store(orow + j, (pf_load(xr + j) - mean) * r * w[j] + b[j]);
}

extern "C" __global__ void layernorm_f32(float *x, const float *w, const float *b, float *out, int d, float eps) {
    layernorm_row(x, (const float *)nullptr, w, b, out, d, eps);
}
extern "C" __global__ void layernorm_f16(__half *x, const float *w, const float *b, __half *out, int d, float eps) {
    layernorm_row(x, (const __half *)nullptr, w, b, out, d, eps);
}
extern "C" __global__ void add_layernorm_f32(float *x, const float *y, const float *w, const float *b, float *out,
                                             int d, float eps) {
    layernorm_row(x, y, w, b, out, d, eps);
}
extern "C" __global__ void add_layernorm_f16(__half *x, const __half *y, const float *w, const float *b,
                                             __half *out, int d, float eps) {
    layernorm_row(x, y, w, b, out, d, eps);
}

/* ------------------------------------------------------------------------ */
/* rope, in place                                                            */
/* ------------------------------------------------------------------------ */
/* rope_{f32,f16}(x, positions, n_heads, head_dim, n_rot, theta, neox, freq_factors, mscale)
 *   x  [n_tok, n_heads, head_dim], rotated in place   positions  int32 [n_tok]
 *   freq_factors  float [n_rot / 2] or NULL
 *   grid (n_tok), block (128): the block's threads stride over the
 *   n_heads * n_rot / 2 pairs of token blockIdx.x.
 * Pair i (i < n_rot / 2) is (2i, 2i+1) normally, (i, i + n_rot/2) for neox,
 * rotated by pos * theta^(-2i / n_rot) / freq_factors[i] and multiplied by
 * mscale (longrope's attention factor; 1: plain rope). As on the CPU the
 * angle is formed in double (a float angle is ~4e-3 rad off at pos 1e5);
 * dimensions past n_rot are left alone. */
template <typename T>
__device__ void rope_token(T *x, const int *__restrict__ positions, int n_heads, int head_dim, int n_rot,
                           float theta, int neox, const float *__restrict__ freq_factors, float mscale) {
    const int half = n_rot / 2;
    const double pos = (double)positions[blockIdx.x];
    T *xt = x + (pf_i64)blockIdx.x * n_heads * head_dim;
    for (int k = threadIdx.x; k < n_heads * half; k += blockDim.x) {
        const int h = k / half, i = k % half;
        double inv_freq = pow((double)theta, -2.0 * (double)i / (double)n_rot);
        if (freq_factors) inv_freq /= (double)freq_factors[i];
        double s, c;
        sincos(pos * inv_freq, &s, &c);
        c *= mscale;
        s *= mscale;
        const int i0 = neox ? i : 2 * i, i1 = neox ? i + half : 2 * i + 1;
        T *xh = xt + h * head_dim;
        const float x0 = pf_load(xh + i0), x1 = pf_load(xh + i1);
        pf_store(xh + i0, x0 * (float)c - x1 * (float)s);
        pf_store(xh + i1, x0 * (float)s + x1 * (float)c);
    }
}

extern "C" __global__ void rope_f32(float *x, const int *positions, int n_heads, int head_dim, int n_rot,
                                    float theta, int neox, const float *freq_factors, float mscale) {
    rope_token(x, positions, n_heads, head_dim, n_rot, theta, neox, freq_factors, mscale);
}
extern "C" __global__ void rope_f16(__half *x, const int *positions, int n_heads, int head_dim, int n_rot,
                                    float theta, int neox, const float *freq_factors, float mscale) {
    rope_token(x, positions, n_heads, head_dim, n_rot, theta, neox, freq_factors, mscale);
}

/* ------------------------------------------------------------------------ */
/* Elementwise                                                               */
/* ------------------------------------------------------------------------ */
/* All: grid (min(ceil(n / blockDim.x), a few per SM)), block (256); a
 * grid-stride loop covers n elements. */

/* silu_mul_{f32,f16}(gate, up, out, n): out = gate * up / (1 + e^-gate)
 *   gate, up, out [n] (out may alias either). For gate << 0, e^-gate is inf
 *   and the quotient is 0, as on the CPU. */
template <typename T>
__device__ void silu_mul_span(const T *gate, const T *up, T *out, pf_i64 n) {
    for (pf_i64 i = (pf_i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (pf_i64)gridDim.x * blockDim.x) {
        const float g = pf_load(gate + i);
        pf_store(out + i, g * pf_load(up + i) / (1.0f + expf(-g)));
    }
}
extern "C" __global__ void silu_mul_f32(const float *gate, const float *up, float *out, pf_i64 n) {
    silu_mul_span(gate, up, out, n);
}
extern "C" __global__ void silu_mul_f16(const __half *gate, const __half *up, __half *out, pf_i64 n) {
    silu_mul_span(gate, up, out, n);
}

/* gelu_tanh_mul_{f32,f16}(gate, up, out, n): out = gelu_tanh(gate) * up (GeGLU)
 *   = gate * up / (1 + e^(-2 sqrt(2/pi) (gate + 0.044715 gate^3))), the tanh
 *   form as a logistic, as on the CPU; gate, up, out [n] (out may alias either). */
template <typename T>
__device__ void gelu_tanh_mul_span(const T *gate, const T *up, T *out, pf_i64 n) {
    for (pf_i64 i = (pf_i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (pf_i64)gridDim.x * blockDim.x) {
        const float g = pf_load(gate + i), inner = g + 0.044715f * g * g * g;
        pf_store(out + i, g * pf_load(up + i) / (1.0f + expf(-1.5957691216057308f * inner)));
    }
}
extern "C" __global__ void gelu_tanh_mul_f32(const float *gate, const float *up, float *out, pf_i64 n) {
    gelu_tanh_mul_span(gate, up, out, n);
}
extern "C" __global__ void gelu_tanh_mul_f16(const __half *gate, const __half *up, __half *out, pf_i64 n) {
    gelu_tanh_mul_span(gate, up, out, n);
}

/* softcap_{f32,f16}(x, n, cap): x[n] = cap * tanh(x / cap), in place (logit
 * soft-capping, Gemma 2's final logits); cap > 0. */
template <typename T>
__device__ void softcap_span(T *x, pf_i64 n, float cap) {
    for (pf_i64 i = (pf_i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (pf_i64)gridDim.x * blockDim.x)
        pf_store(x + i, cap * tanhf(pf_load(x + i) / cap));
}
extern "C" __global__ void softcap_f32(float *x, pf_i64 n, float cap) { softcap_span(x, n, cap); }
extern "C" __global__ void softcap_f16(__half *x, pf_i64 n, float cap) { softcap_span(x, n, cap); }

/* add_inplace_{f32,f16}(x, y, n): x[n] += y[n] (the residual add). */
template <typename T>
__device__ void add_span(T *x, const T *y, pf_i64 n) {
    for (pf_i64 i = (pf_i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (pf_i64)gridDim.x * blockDim.x)
        pf_store(x + i, pf_load(x + i) + pf_load(y + i));
}
extern "C" __global__ void add_inplace_f32(float *x, const float *y, pf_i64 n) { add_span(x, y, n); }
extern "C" __global__ void add_inplace_f16(__half *x, const __half *y, pf_i64 n) { add_span(x, y, n); }

/* scale_{f32,f16}(x, factor, n): x[n] *= factor (Granite's multipliers, Gemma's embedding
 * scale; Gemma rounds its factor to the activation dtype first, models/gemma.py). */
template <typename T>
__device__ void scale_span(T *x, float factor, pf_i64 n) {
    for (pf_i64 i = (pf_i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (pf_i64)gridDim.x * blockDim.x)
        pf_store(x + i, pf_load(x + i) * factor);
}
extern "C" __global__ void scale_f32(float *x, float factor, pf_i64 n) { scale_span(x, factor, n); }
extern "C" __global__ void scale_f16(__half *x, float factor, pf_i64 n) { scale_span(x, factor, n); }

/* add_bias_{f32,f16}(x, bias, n, d): x[n, d] += bias[d] (float bias), Qwen2-style
 * q/k/v biases. n here is the element count of x. */
template <typename T>
__device__ void bias_span(T *x, const float *bias, pf_i64 n, int d) {
    for (pf_i64 i = (pf_i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (pf_i64)gridDim.x * blockDim.x)
        pf_store(x + i, pf_load(x + i) + bias[i % d]);
}
extern "C" __global__ void add_bias_f32(float *x, const float *bias, pf_i64 n, int d) { bias_span(x, bias, n, d); }
extern "C" __global__ void add_bias_f16(__half *x, const float *bias, pf_i64 n, int d) { bias_span(x, bias, n, d); }
