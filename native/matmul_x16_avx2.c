/* AVX2 tiles for the x16 GEMMs (layouts in x16_formats.h): the same weights
 * the VNNI tiles read, for CPUs without AVX-512 (Zen 3 and older). A 64-byte
 * weight vector is two 32-byte halves, rows 0-7 and 8-15; a tile runs both
 * halves in one pass for one token (decode: one stream over the weights) and
 * one half per pass for more tokens (the other half comes back from L2), so
 * every per-token sum stays in a register.
 *
 * vpmaddubsw multiplies 32 unsigned weight bytes by 32 signed activation bytes
 * (-127..127) and adds pairs into 16 int16 lanes, two per row: with 4-bit
 * weights |pair| <= 2 * 15 * 127 = 3810, so 8 of them add up in int16 without
 * overflow (5-bit: 4; 6-bit: 2), and one vpmaddwd then applies the row's
 * sub-block scale (duplicated into both int16 lanes of the row) and sums the
 * pair into the row's int32. Q8_0's signed weights use ggml's sign trick
 * (|w| times the activation with w's sign), one vpmaddwd per vector.
 */
#include "x16_formats.h"

#ifndef PF_AVX2

pf_x16_tile_fn pf_avx2_x16_tile(int type) { (void)type; return NULL; }

#else

#include <immintrin.h>
#include <string.h>

#define PF_INLINE static inline __attribute__((always_inline))

/* Tokens per pass (tiles split the driver's PF_X16_TOKENS into these): more
 * would not keep their sums in the 16 ymm registers (Q5_K: 3 was no faster). */
#define AVX2_TOKENS 4

PF_INLINE __m256i bcast_word(const void *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
}

PF_INLINE __m256i load_half(const uint8_t *vec64, int h) { return _mm256_loadu_si256((const __m256i *)(vec64 + 32 * h)); }

/* 8 row scales (bytes) as int16, each in both lanes of its row's pair. */
PF_INLINE __m256i row_scales16(const uint8_t *sc8) {
    const __m128i dup = _mm_setr_epi8(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
    return _mm256_cvtepu8_epi16(_mm_shuffle_epi8(_mm_loadl_epi64((const __m128i *)sc8), dup));
}

/* Prefetch an eighth of the block two blocks ahead, per sub-block: a block is
 * not read front to back, which the hardware prefetchers follow poorly. */
PF_INLINE void prefetch_part(const void *block, size_t block_bytes, int part) {
    const char *ahead = (const char *)block + 2 * block_bytes;
    const int lines = (int)(block_bytes / 64 / 8);
    for (int l = 0; l < lines; l++) _mm_prefetch(ahead + 64 * (lines * part + l), _MM_HINT_T0);
}

PF_INLINE void store_rows(const pf_x16_job *job, int64_t gr, int64_t t, int h, __m256 v) {
    _mm256_storeu_ps(job->out + t * job->n_out + 16 * gr + 8 * h, v);
}

/* -- Q4_K / Q5_K ------------------------------------------------------------ */

/* Bit b of every byte of v, moved to bit 4 (the fifth bit of a Q5_K weight). */
PF_INLINE __m256i bit_to_16(__m256i v, const int b) {
    const __m256i m = _mm256_set1_epi8(0x10);
    if (b < 4) return _mm256_and_si256(_mm256_slli_epi16(v, 4 - b), m);
    if (b > 4) return _mm256_and_si256(_mm256_srli_epi16(v, b - 4), m);
    return _mm256_and_si256(v, m);
}

/* Halves h0 .. h0 + H - 1 of row group gr for T tokens. Per sub-block and
 * token: 8 vpmaddubsw into int16 sums (Q5_K: low and high nibbles apart, 4
 * each), vpmaddwd by the row scales; per block, 4 vpmaddwd for the mins. */
PF_INLINE void k_tile(const pf_x16_job *job, int64_t gr, int64_t t0, const int T, const int H, const int h0,
                      const int is_q5) {
    const int64_t nb = job->nb;
    const size_t block_bytes = is_q5 ? sizeof(block_q5_K_x16) : sizeof(block_q4_K_x16);
    const char *wb = (const char *)job->w + (size_t)(gr * nb) * block_bytes;
    const block_q8_K *y[AVX2_TOKENS];
    const int16_t *bs[AVX2_TOKENS];
    const __m256i m4 = _mm256_set1_epi8(0x0f);
    __m256 facc[2][AVX2_TOKENS];
    for (int t = 0; t < T; t++) {
        y[t] = (const block_q8_K *)job->act + (t0 + t) * nb, bs[t] = job->k_sums + (t0 + t) * nb * 8;
        for (int h = 0; h < H; h++) facc[h][t] = _mm256_setzero_ps();
    }
    for (int64_t i = 0; i < nb; i++) {
        const block_q4_K_x16 *b = (const block_q4_K_x16 *)(wb + (size_t)i * block_bytes);
        const uint8_t (*hb)[64] = is_q5 ? ((const block_q5_K_x16 *)b)->hb : NULL;
        __m256i isum[2][AVX2_TOKENS];
        for (int h = 0; h < H; h++)
            for (int t = 0; t < T; t++) isum[h][t] = _mm256_setzero_si256();
        for (int j = 0; j < 8; j++) {
            prefetch_part(b, block_bytes, j);
            /* low and high nibbles in separate sums where few chains would
             * otherwise wait on each other's latency, and always for Q5_K */
            const int split = is_q5 || T * H <= 2;
            __m256i lo_sum[2][AVX2_TOKENS], hi_sum[2][AVX2_TOKENS], h5[2];
            for (int h = 0; h < H; h++) {
                h5[h] = is_q5 ? load_half(hb[j], h0 + h) : _mm256_setzero_si256();
                for (int t = 0; t < T; t++) lo_sum[h][t] = hi_sum[h][t] = _mm256_setzero_si256();
            }
            for (int g = 4 * j; g < 4 * j + 4; g++) {
                __m256i lo[2], hi[2];
                for (int h = 0; h < H; h++) {
                    const __m256i wv = load_half(b->qs[g], h0 + h);
                    lo[h] = _mm256_and_si256(wv, m4), hi[h] = _mm256_and_si256(_mm256_srli_epi16(wv, 4), m4);
                    if (is_q5) {
                        lo[h] = _mm256_or_si256(lo[h], bit_to_16(h5[h], 2 * (g - 4 * j)));
                        hi[h] = _mm256_or_si256(hi[h], bit_to_16(h5[h], 2 * (g - 4 * j) + 1));
                    }
                }
                for (int t = 0; t < T; t++) {
                    const __m256i a_lo = bcast_word(y[t][i].qs + 8 * g), a_hi = bcast_word(y[t][i].qs + 8 * g + 4);
                    for (int h = 0; h < H; h++) {
                        lo_sum[h][t] = _mm256_add_epi16(lo_sum[h][t], _mm256_maddubs_epi16(lo[h], a_lo));
                        const __m256i p_hi = _mm256_maddubs_epi16(hi[h], a_hi);
                        if (split) hi_sum[h][t] = _mm256_add_epi16(hi_sum[h][t], p_hi);
                        else lo_sum[h][t] = _mm256_add_epi16(lo_sum[h][t], p_hi);
                    }
                }
            }
            for (int h = 0; h < H; h++) {
                const __m256i s = row_scales16(b->sc[j] + 8 * (h0 + h));
                for (int t = 0; t < T; t++) {
                    __m256i v;
                    if (is_q5)
                        v = _mm256_add_epi32(_mm256_madd_epi16(lo_sum[h][t], s), _mm256_madd_epi16(hi_sum[h][t], s));
                    else   /* 4-bit: the 8 products fit one int16 sum */
                        v = _mm256_madd_epi16(split ? _mm256_add_epi16(lo_sum[h][t], hi_sum[h][t]) : lo_sum[h][t], s);
                    isum[h][t] = _mm256_add_epi32(isum[h][t], v);
                }
            }
        }
        for (int h = 0; h < H; h++) {
            const int r0 = 8 * (h0 + h);
            const __m256 d = _mm256_loadu_ps(b->d + r0), dmin = _mm256_loadu_ps(b->dmin + r0);
            for (int t = 0; t < T; t++) {
                __m256i msum = _mm256_setzero_si256();
                for (int p = 0; p < 4; p++)
                    msum = _mm256_add_epi32(msum, _mm256_madd_epi16(_mm256_loadu_si256((const __m256i *)b->m[p][r0]),
                                                                    bcast_word(bs[t] + 8 * i + 2 * p)));
                __m256 v = _mm256_mul_ps(d, _mm256_cvtepi32_ps(isum[h][t]));
                v = _mm256_fnmadd_ps(dmin, _mm256_cvtepi32_ps(msum), v);
                facc[h][t] = _mm256_fmadd_ps(_mm256_set1_ps(y[t][i].d), v, facc[h][t]);
            }
        }
    }
    for (int h = 0; h < H; h++)
        for (int t = 0; t < T; t++) store_rows(job, gr, t0 + t, h0 + h, facc[h][t]);
}

/* -- Q6_K ------------------------------------------------------------------- */

/* k-group 2s + e of a block, half h, as two vectors of 4 columns per row (0..63). */
PF_INLINE void q6_group(const block_q6_K_x16 *b, int s, int e, int h, __m256i *lo, __m256i *hi) {
    const __m256i m4 = _mm256_set1_epi8(0x0f), m30 = _mm256_set1_epi8(0x30);
    const __m256i wv = load_half(b->qs[2 * s + e], h), hb = load_half(b->hb[s], h);
    const __m256i l4 = _mm256_and_si256(wv, m4), h4 = _mm256_and_si256(_mm256_srli_epi16(wv, 4), m4);
    if (e == 0) {
        *lo = _mm256_or_si256(l4, _mm256_and_si256(_mm256_slli_epi16(hb, 4), m30));
        *hi = _mm256_or_si256(h4, _mm256_and_si256(_mm256_slli_epi16(hb, 2), m30));
    } else {
        *lo = _mm256_or_si256(l4, _mm256_and_si256(hb, m30));
        *hi = _mm256_or_si256(h4, _mm256_and_si256(_mm256_srli_epi16(hb, 2), m30));
    }
}

/* d * d_a * sum_s sc_s ((q - 32) . a)_s: unsigned q (0..63) through
 * vpmaddubsw, 2 per int16 sum; the -32 back as 32 * sum_s sc_s * bsums_s. */
PF_INLINE void q6_tile(const pf_x16_job *job, int64_t gr, int64_t t0, const int T, const int H, const int h0) {
    const block_q6_K_x16 *wb = (const block_q6_K_x16 *)job->w + gr * job->nb;
    const block_q8_K *y[AVX2_TOKENS];
    /* per row pair (s even, s odd) of sc[p][r]: each scale into both int16 lanes of its row */
    const __m256i dup_even = _mm256_setr_epi8(0, 1, 0, 1, 4, 5, 4, 5, 8, 9, 8, 9, 12, 13, 12, 13,
                                              0, 1, 0, 1, 4, 5, 4, 5, 8, 9, 8, 9, 12, 13, 12, 13);
    const __m256i dup_odd = _mm256_add_epi8(dup_even, _mm256_set1_epi8(2));
    __m256 facc[2][AVX2_TOKENS];
    for (int t = 0; t < T; t++) {
        y[t] = (const block_q8_K *)job->act + (t0 + t) * job->nb;
        for (int h = 0; h < H; h++) facc[h][t] = _mm256_setzero_ps();
    }
    for (int64_t i = 0; i < job->nb; i++) {
        const block_q6_K_x16 *b = wb + i;
        __m256i isum[2][AVX2_TOKENS];
        for (int h = 0; h < H; h++)
            for (int t = 0; t < T; t++) isum[h][t] = _mm256_setzero_si256();
        for (int p = 0; p < 8; p++) {
            prefetch_part(b, sizeof *b, p);
            for (int s = 2 * p; s < 2 * p + 2; s++) {   /* sub-block s: k-groups 2s, 2s+1 = hb row s */
                __m256i lo0[2], hi0[2], lo1[2], hi1[2], sc[2];
                for (int h = 0; h < H; h++) {
                    q6_group(b, s, 0, h0 + h, &lo0[h], &hi0[h]);
                    q6_group(b, s, 1, h0 + h, &lo1[h], &hi1[h]);
                    const __m256i pair = _mm256_loadu_si256((const __m256i *)b->sc[p][8 * (h0 + h)]);
                    sc[h] = _mm256_shuffle_epi8(pair, s & 1 ? dup_odd : dup_even);
                }
                for (int t = 0; t < T; t++) {
                    const int8_t *a = y[t][i].qs + 16 * s;
                    const __m256i a0 = bcast_word(a), a1 = bcast_word(a + 4), a2 = bcast_word(a + 8),
                                  a3 = bcast_word(a + 12);
                    for (int h = 0; h < H; h++) {
                        const __m256i d0 = _mm256_add_epi16(_mm256_maddubs_epi16(lo0[h], a0),
                                                            _mm256_maddubs_epi16(lo1[h], a2));
                        const __m256i d1 = _mm256_add_epi16(_mm256_maddubs_epi16(hi0[h], a1),
                                                            _mm256_maddubs_epi16(hi1[h], a3));
                        isum[h][t] = _mm256_add_epi32(isum[h][t], _mm256_add_epi32(_mm256_madd_epi16(d0, sc[h]),
                                                                                   _mm256_madd_epi16(d1, sc[h])));
                    }
                }
            }
        }
        for (int h = 0; h < H; h++) {
            const int r0 = 8 * (h0 + h);
            const __m256 d = _mm256_loadu_ps(b->d + r0);
            for (int t = 0; t < T; t++) {
                __m256i corr = _mm256_setzero_si256();
                for (int p = 0; p < 8; p++)
                    corr = _mm256_add_epi32(corr, _mm256_madd_epi16(_mm256_loadu_si256((const __m256i *)b->sc[p][r0]),
                                                                    bcast_word(y[t][i].bsums + 2 * p)));
                const __m256i v = _mm256_sub_epi32(isum[h][t], _mm256_slli_epi32(corr, 5));
                facc[h][t] = _mm256_fmadd_ps(_mm256_mul_ps(d, _mm256_set1_ps(y[t][i].d)), _mm256_cvtepi32_ps(v),
                                             facc[h][t]);
            }
        }
    }
    for (int h = 0; h < H; h++)
        for (int t = 0; t < T; t++) store_rows(job, gr, t0 + t, h0 + h, facc[h][t]);
}

/* -- Q8_0 / Q4_0 ------------------------------------------------------------ */

/* facc[t] += d_w * d_a * s32[t] for one block: the row scales of half h times token t's scale. */
PF_INLINE void q32_block_update(const pf_x16_job *job, const float *dw, int64_t i, int64_t t0, const int T, int h,
                                const __m256i *s32, __m256 *facc) {
    const __m256 d = _mm256_loadu_ps(dw + 8 * h);
    for (int t = 0; t < T; t++)
        facc[t] = _mm256_fmadd_ps(_mm256_mul_ps(d, _mm256_set1_ps(job->da[(t0 + t) * job->nb + i])),
                                  _mm256_cvtepi32_ps(s32[t]), facc[t]);
}

/* Q4_0: the block's 8 nibble vectors (0..15) unpacked once, then per token 8
 * vpmaddubsw in one int16 sum, minus 8 * sum(a). */
PF_INLINE void q4_0_kernel(const pf_x16_job *job, int64_t gr, int64_t t0, const int T, const int H, const int h0) {
    const int64_t nb = job->nb;
    const __m256i m4 = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
    __m256 facc[2][AVX2_TOKENS];
    for (int h = 0; h < H; h++)
        for (int t = 0; t < T; t++) facc[h][t] = _mm256_setzero_ps();
    for (int64_t i = 0; i < nb; i++) {
        const block_q4_0_x16 *b = (const block_q4_0_x16 *)job->w + gr * nb + i;
        for (int h = 0; h < H; h++) {
            __m256i wv[8], s32[AVX2_TOKENS];
            for (int g = 0; g < 4; g++) {
                const __m256i v = load_half(b->qs[g], h0 + h);
                wv[2 * g] = _mm256_and_si256(v, m4), wv[2 * g + 1] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
            }
            for (int t = 0; t < T; t++) {
                const int64_t at = (t0 + t) * nb + i;
                const int8_t *a = ((const block_q8_0 *)job->act)[at].qs;
                __m256i s16 = _mm256_setzero_si256();
                for (int g = 0; g < 8; g++) s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(wv[g], bcast_word(a + 4 * g)));
                s32[t] = _mm256_sub_epi32(_mm256_madd_epi16(s16, ones), _mm256_set1_epi32(8 * job->q_sums[at]));
            }
            q32_block_update(job, b->d, i, t0, T, h0 + h, s32, facc[h]);
        }
    }
    for (int h = 0; h < H; h++)
        for (int t = 0; t < T; t++) store_rows(job, gr, t0 + t, h0 + h, facc[h][t]);
}

/* Q8_0: the stored unsigned bytes back to signed (xor 0x80), |w| times
 * sign(a, w), one vpmaddwd per vector (a pair reaches 2 * 128 * 127). Each
 * weight vector is unpacked and used by every token in turn: kept, the 8 of a
 * block as |w| and w would fill the registers the per-token sums need. */
PF_INLINE void q8_0_kernel(const pf_x16_job *job, int64_t gr, int64_t t0, const int T, const int H, const int h0) {
    const int64_t nb = job->nb;
    const __m256i ones = _mm256_set1_epi16(1), bias = _mm256_set1_epi8((char)0x80);
    __m256 facc[2][AVX2_TOKENS];
    for (int h = 0; h < H; h++)
        for (int t = 0; t < T; t++) facc[h][t] = _mm256_setzero_ps();
    for (int64_t i = 0; i < nb; i++) {
        const block_q8_0_x16 *b = (const block_q8_0_x16 *)job->w + gr * nb + i;
        const int8_t *a[AVX2_TOKENS];
        for (int t = 0; t < T; t++) a[t] = ((const block_q8_0 *)job->act)[(t0 + t) * nb + i].qs;
        __m256i s32[2][AVX2_TOKENS];
        for (int h = 0; h < H; h++)
            for (int t = 0; t < T; t++) s32[h][t] = _mm256_setzero_si256();
        for (int g = 0; g < 8; g++)
            for (int h = 0; h < H; h++) {
                const __m256i w = _mm256_xor_si256(load_half(b->qs[g], h0 + h), bias), aw = _mm256_abs_epi8(w);
                for (int t = 0; t < T; t++) {
                    const __m256i p = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(bcast_word(a[t] + 4 * g), w));
                    s32[h][t] = _mm256_add_epi32(s32[h][t], _mm256_madd_epi16(p, ones));
                }
            }
        for (int h = 0; h < H; h++) q32_block_update(job, b->d, i, t0, T, h0 + h, s32[h], facc[h]);
    }
    for (int h = 0; h < H; h++)
        for (int t = 0; t < T; t++) store_rows(job, gr, t0 + t, h0 + h, facc[h][t]);
}

/* -- tiles: the driver's n <= PF_X16_TOKENS tokens in passes of <= AVX2_TOKENS ----
 * One token: both halves in one pass; more: one half per pass. T and H are
 * literals in each instance, so the sums live in registers. */
#define HALF_PASSES(kernel, job, gr, t0, T, ...)                                                   \
    do {                                                                                           \
        if ((T) == 1) {                                                                            \
            kernel(job, gr, t0, 1, 2, 0, ##__VA_ARGS__);                                           \
        } else {                                                                                   \
            kernel(job, gr, t0, T, 1, 0, ##__VA_ARGS__);                                           \
            kernel(job, gr, t0, T, 1, 1, ##__VA_ARGS__);                                           \
        }                                                                                          \
    } while (0)

#define AVX2_TILE(name, kernel, ...)                                                               \
    static void name(const pf_x16_job *job, int64_t gr, int64_t t0, int n) {                       \
        for (int64_t t = t0; t < t0 + n; t += AVX2_TOKENS) {                                       \
            switch (t0 + n - t < AVX2_TOKENS ? (int)(t0 + n - t) : AVX2_TOKENS) {                  \
            case 1: HALF_PASSES(kernel, job, gr, t, 1, ##__VA_ARGS__); break;                      \
            case 2: HALF_PASSES(kernel, job, gr, t, 2, ##__VA_ARGS__); break;                      \
            case 3: HALF_PASSES(kernel, job, gr, t, 3, ##__VA_ARGS__); break;                      \
            default: HALF_PASSES(kernel, job, gr, t, 4, ##__VA_ARGS__); break;                     \
            }                                                                                      \
        }                                                                                          \
    }

AVX2_TILE(q4_K_tile, k_tile, 0)
AVX2_TILE(q5_K_tile, k_tile, 1)
AVX2_TILE(q6_K_tile, q6_tile)
AVX2_TILE(q8_0_tile, q8_0_kernel)
AVX2_TILE(q4_0_tile, q4_0_kernel)

/* -- F32_X16: the VNNI family's arithmetic per lane (even and odd columns in
 * two chains, then their sum), so both families give the same bits. Rows past
 * n_out in the last group are not stored. */
PF_INLINE void f32_kernel(const pf_x16_job *job, int64_t gr, int64_t t0, const int T, const int H, const int h0) {
    const int64_t n_in = job->nb;
    const float *w = (const float *)job->w + gr * n_in * 16 + 8 * h0;
    const float *x = (const float *)job->act + t0 * n_in;
    __m256 even[2][AVX2_TOKENS], odd[2][AVX2_TOKENS];
    for (int h = 0; h < H; h++)
        for (int t = 0; t < T; t++) even[h][t] = odd[h][t] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 2 <= n_in; k += 2)
        for (int h = 0; h < H; h++) {
            const __m256 w0 = _mm256_loadu_ps(w + 16 * k + 8 * h), w1 = _mm256_loadu_ps(w + 16 * k + 16 + 8 * h);
            for (int t = 0; t < T; t++) {
                even[h][t] = _mm256_fmadd_ps(w0, _mm256_broadcast_ss(x + t * n_in + k), even[h][t]);
                odd[h][t] = _mm256_fmadd_ps(w1, _mm256_broadcast_ss(x + t * n_in + k + 1), odd[h][t]);
            }
        }
    if (k < n_in)
        for (int h = 0; h < H; h++)
            for (int t = 0; t < T; t++)
                even[h][t] = _mm256_fmadd_ps(_mm256_loadu_ps(w + 16 * k + 8 * h), _mm256_broadcast_ss(x + t * n_in + k),
                                             even[h][t]);
    for (int h = 0; h < H; h++) {
        const int64_t rows = job->n_out - 16 * gr - 8 * (h0 + h);   /* this half's rows that exist */
        if (rows <= 0) continue;
        const __m256i keep = _mm256_cmpgt_epi32(_mm256_set1_epi32(rows > 8 ? 8 : (int)rows),
                                                _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        for (int t = 0; t < T; t++)
            _mm256_maskstore_ps(job->out + (t0 + t) * job->n_out + 16 * gr + 8 * (h0 + h), keep,
                                _mm256_add_ps(even[h][t], odd[h][t]));
    }
}
AVX2_TILE(f32_tile, f32_kernel)

pf_x16_tile_fn pf_avx2_x16_tile(int type) {
    switch (type) {
    case PF_Q4_K: return q4_K_tile;
    case PF_Q5_K: return q5_K_tile;
    case PF_Q6_K: return q6_K_tile;
    case PF_Q8_0: return q8_0_tile;
    case PF_Q4_0: return q4_0_tile;
    case PF_F32: return f32_tile;
    default: return NULL;
    }
}

#endif /* PF_AVX2 */
