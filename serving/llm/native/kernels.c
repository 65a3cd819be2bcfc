/*
 * The CPU engine's weight products, and its decode step outside them in four calls per
 * layer instead of about thirty ATen operators: built and loaded by serving/llm/native;
 * the ATen path in serving/llm/runner.py stays the reference these are tested against.
 *
 * - decode_attention: RoPE on the new queries and key, the KV cache write, and attention
 *   for every active sequence. ATen's version (index_put, two batched products of tiny
 *   matrices, a mask, a softmax) took 22 of the 34 ms a 16-sequence step spent outside its
 *   weight products on an AVX2 EPYC.
 * - add_rms_norm: the residual add and the next RMSNorm.
 * - silu_mul: SiLU(gate) * up.
 * - matmul_f32 / matmul_bf16 / matmul_i8: x @ w for a weight packed in panels of 16
 *   output columns, float32, bfloat16 or int8 with a scale per column, always with
 *   float32 accumulation. Over the 30 layers' weights (AVX2 EPYC, 2 threads,
 *   benchmarks/llm_matmul.py) 19 ms at one row against MKL's 44 and oneDNN's 41, 46 ms at
 *   16 rows against oneDNN's 67; bfloat16 weights 14 and 37 ms, int8 10 and 34.
 *
 * Layout (float32, the runner's):
 *   qkv    [n, (heads + 2 * kv_heads) * head_dim], row b at qkv + b * qkv_stride: the
 *          fused projection's output, queries then keys then values, not yet rotated
 *   cos, sin [max_context, head_dim]: RoPE's tables (rotate-half layout, as transformers)
 *   cache  [max_active, kv_heads, max_context, head_dim] for K and for V
 *   out    [n, heads * head_dim] contiguous
 * Sequence b's rotated key and its value go to position positions[b] of slot b, and its
 * queries attend to positions 0..positions[b] of slot b only (no mask, no work past its
 * end).
 *
 * One task per (sequence, KV head): the group's query heads read that head's keys and
 * values. Everything is float32; sums run over 8-float AVX vectors in a fixed order, so one
 * build gives the same result whatever the thread count or schedule. exp is a degree-6
 * polynomial after range reduction (relative error below 2e-7).
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define LANES 8
#define CHUNK 64 /* dimensions per pass: 8 vectors, held in registers */
#define MAX_GROUP 16
#define MAX_HEAD_DIM 256

/* The 8 sums of 8 vectors, as one vector: lane j is the sum of a[j]'s lanes. */
static inline __m256 sum8(const __m256 a[8]) {
    const __m256 b0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    const __m256 b1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(b0, b1, 0x20),
                         _mm256_permute2f128_ps(b0, b1, 0x31));
}

/* The sum of v's 8 lanes, always in the same order. */
static inline float hsum(__m256 v) {
    float lanes[LANES];
    _mm256_storeu_ps(lanes, v);
    return ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) +
           ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
}

/* exp(x), x clamped to [-87, 88]: exp(x) = 2^k * exp(r), |r| <= ln2/2. */
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
    const __m256 k = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(k, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r), _mm256_set1_ps(1.0f));
    const __m256i bits = _mm256_slli_epi32(
        _mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}

/* Ask for rows [from, to) of a [*, head_dim] block to be brought into the cache. */
#define KEYS_AHEAD 4
#define PREFETCH_ROWS(base, from, to, head_dim, hint)                                     \
    for (const char *p = (const char *)((base) + (from) * (head_dim)),                     \
                    *end = (const char *)((base) + (to) * (head_dim));                     \
         p < end; p += 64)                                                                  \
    _mm_prefetch(p, hint)

/* scores[t] = scale * q . keys[t] for t < length (padded to a multiple of 8 with -inf).
 * Eight keys at a time: eight independent sums, reduced together. With ``values`` (the
 * first head of a group) the keys KEYS_AHEAD blocks ahead and the values of this block are
 * prefetched, so the reads from memory overlap the products. */
static void dot_keys(const float *q, const float *keys, const float *values, int64_t length,
                     int head_dim, float scale, float *scores) {
    for (int64_t t0 = 0; t0 < length; t0 += LANES) {
        const int rows = length - t0 < LANES ? (int)(length - t0) : LANES;
        if (values != NULL) {
            const int64_t ahead = t0 + KEYS_AHEAD * LANES;
            if (ahead < length)
                PREFETCH_ROWS(keys, ahead, ahead + LANES < length ? ahead + LANES : length,
                              head_dim, _MM_HINT_T0);
            PREFETCH_ROWS(values, t0, t0 + rows, head_dim, _MM_HINT_T1);
        }
        __m256 acc[LANES];
        for (int j = 0; j < LANES; j++) acc[j] = _mm256_setzero_ps();
        for (int d = 0; d < head_dim; d += LANES) {
            const __m256 qd = _mm256_loadu_ps(q + d);
            for (int j = 0; j < LANES; j++) {
                /* past the end: reread the last key, its score is overwritten below */
                const int64_t t = t0 + (j < rows ? j : rows - 1);
                acc[j] = _mm256_fmadd_ps(qd, _mm256_loadu_ps(keys + t * head_dim + d), acc[j]);
            }
        }
        _mm256_storeu_ps(scores + t0, _mm256_mul_ps(sum8(acc), _mm256_set1_ps(scale)));
        for (int j = rows; j < LANES; j++) scores[t0 + j] = -INFINITY;
    }
}

/* weights[t] = exp(scores[t] - max) over the padded row, in place; returns 1 / their sum. */
static float softmax_weights(float *scores, int64_t padded) {
    __m256 best = _mm256_set1_ps(-INFINITY);
    for (int64_t t = 0; t < padded; t += LANES)
        best = _mm256_max_ps(best, _mm256_loadu_ps(scores + t));
    float lanes[LANES], top = -INFINITY;
    _mm256_storeu_ps(lanes, best);
    for (int j = 0; j < LANES; j++) top = lanes[j] > top ? lanes[j] : top;
    const __m256 neg_inf = _mm256_set1_ps(-INFINITY), shift = _mm256_set1_ps(top);
    __m256 total = _mm256_setzero_ps();
    for (int64_t t = 0; t < padded; t += LANES) {
        const __m256 s = _mm256_loadu_ps(scores + t);
        const __m256 e = _mm256_andnot_ps(_mm256_cmp_ps(s, neg_inf, _CMP_EQ_OQ),
                                          exp8(_mm256_sub_ps(s, shift)));
        _mm256_storeu_ps(scores + t, e);
        total = _mm256_add_ps(total, e);
    }
    return 1.0f / hsum(total);
}

/* out = inv * sum_t weights[t] * values[t], 64 dimensions at a time in registers. */
static void weigh_values(const float *weights, const float *values, int64_t length,
                         int head_dim, float inv, float *out) {
    for (int c = 0; c < head_dim; c += CHUNK) {
        __m256 acc[CHUNK / LANES];
        for (int i = 0; i < CHUNK / LANES; i++) acc[i] = _mm256_setzero_ps();
        for (int64_t t = 0; t < length; t++) {
            const __m256 w = _mm256_set1_ps(weights[t]);
            const float *row = values + t * head_dim + c;
            for (int i = 0; i < CHUNK / LANES; i++)
                acc[i] = _mm256_fmadd_ps(w, _mm256_loadu_ps(row + i * LANES), acc[i]);
        }
        for (int i = 0; i < CHUNK / LANES; i++)
            _mm256_storeu_ps(out + c + i * LANES, _mm256_mul_ps(acc[i], _mm256_set1_ps(inv)));
    }
}

static int attend(const float *q, const float *k_slot, const float *v_slot, float *out,
                  int64_t length, int group, int head_dim, float scale) {
    /* k_slot/v_slot: this (slot, KV head)'s [max_context, head_dim] rows; length >= 1. */
    const int64_t padded = (length + LANES - 1) / LANES * LANES;
    float *scores = malloc(sizeof(float) * (size_t)padded);
    if (scores == NULL) return -1;
    for (int h = 0; h < group; h++) {
        const float *qh = q + (int64_t)h * head_dim;
        dot_keys(qh, k_slot, h == 0 ? v_slot : NULL, length, head_dim, scale, scores);
        const float inv = softmax_weights(scores, padded);
        weigh_values(scores, v_slot, length, head_dim, inv, out + (int64_t)h * head_dim);
    }
    free(scores);
    return 0;
}

/* x rotated by RoPE into out (rotate-half: dimension i pairs with i + head_dim / 2). */
static inline void rotate(const float *x, const float *cos, const float *sin, float *out,
                          int head_dim) {
    const int half = head_dim / 2;
    for (int i = 0; i < half; i += LANES) {
        const __m256 a = _mm256_loadu_ps(x + i), b = _mm256_loadu_ps(x + half + i);
        _mm256_storeu_ps(out + i, _mm256_fmsub_ps(a, _mm256_loadu_ps(cos + i),
                                                  _mm256_mul_ps(b, _mm256_loadu_ps(sin + i))));
        _mm256_storeu_ps(out + half + i,
                         _mm256_fmadd_ps(b, _mm256_loadu_ps(cos + half + i),
                                         _mm256_mul_ps(a, _mm256_loadu_ps(sin + half + i))));
    }
}

/* Returns 0; -1 if a score buffer could not be allocated (the new cache rows are
 * written, the output is not); -2 for a group beyond MAX_GROUP, or a head_dim beyond
 * MAX_HEAD_DIM or not a multiple of CHUNK; -3 for a position outside [0, max_context)
 * (nothing is touched on -2 and -3). */
int decode_attention(const float *qkv, int64_t qkv_stride, const float *cos_table,
                     const float *sin_table, float *k_cache, float *v_cache,
                     const int64_t *positions, float *out, int n, int kv_heads, int group,
                     int head_dim, int64_t max_context, float scale, int threads) {
    if (group < 1 || group > MAX_GROUP || head_dim % CHUNK || head_dim > MAX_HEAD_DIM)
        return -2;
    for (int b = 0; b < n; b++)
        if (positions[b] < 0 || positions[b] >= max_context) return -3;
    const int tasks = n * kv_heads;
    const int64_t heads = (int64_t)kv_heads * group;
    int failed = 0;
    /* threads: torch's intra-op count, passed in because OpenMP's own default is per
     * calling thread (the engine's decode thread may never have set it). */
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1) reduction(| : failed)
    for (int task = 0; task < tasks; task++) {
        const int b = task / kv_heads, h = task % kv_heads;
        const int64_t pos = positions[b];
        const float *row = qkv + b * qkv_stride;
        const float *cos = cos_table + pos * head_dim, *sin = sin_table + pos * head_dim;
        const int64_t head = ((int64_t)b * kv_heads + h) * max_context * head_dim;
        float *k_slot = k_cache + head, *v_slot = v_cache + head;
        rotate(row + (heads + h) * head_dim, cos, sin, k_slot + pos * head_dim, head_dim);
        memcpy(v_slot + pos * head_dim, row + (heads + kv_heads + h) * head_dim,
               sizeof(float) * (size_t)head_dim);
        float q[MAX_GROUP * MAX_HEAD_DIM];
        for (int g = 0; g < group; g++)
            rotate(row + (h * group + g) * (int64_t)head_dim, cos, sin, q + g * head_dim,
                   head_dim);
        float *og = out + ((int64_t)b * kv_heads + h) * group * head_dim;
        failed |= attend(q, k_slot, v_slot, og, pos + 1, group, head_dim, scale) != 0;
    }
    return failed ? -1 : 0;
}

/* x[b] += delta[b]; out[b] = x[b] / sqrt(mean(x[b]^2) + eps) * weight, for n rows of
 * width (a multiple of 8). delta may be NULL (the first layer's norm: no add). */
void add_rms_norm(float *x, const float *delta, const float *weight, float *out, int n,
                  int width, float eps) {
    for (int b = 0; b < n; b++) {
        float *xb = x + (int64_t)b * width;
        const float *db = delta == NULL ? NULL : delta + (int64_t)b * width;
        __m256 squares = _mm256_setzero_ps();
        for (int i = 0; i < width; i += LANES) {
            __m256 v = _mm256_loadu_ps(xb + i);
            if (db != NULL) {
                v = _mm256_add_ps(v, _mm256_loadu_ps(db + i));
                _mm256_storeu_ps(xb + i, v);
            }
            squares = _mm256_fmadd_ps(v, v, squares);
        }
        const __m256 inv = _mm256_set1_ps(1.0f / sqrtf(hsum(squares) / (float)width + eps));
        float *ob = out + (int64_t)b * width;
        for (int i = 0; i < width; i += LANES)
            _mm256_storeu_ps(ob + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(xb + i), inv),
                                                   _mm256_loadu_ps(weight + i)));
    }
}

/* out[b, i] = silu(gate_up[b, i]) * gate_up[b, width + i]: the MLP's activation, for n rows
 * of 2 * width (width a multiple of 8). */
void silu_mul(const float *gate_up, float *out, int n, int width) {
    const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
    for (int b = 0; b < n; b++) {
        const float *gate = gate_up + (int64_t)b * 2 * width, *up = gate + width;
        float *ob = out + (int64_t)b * width;
        for (int i = 0; i < width; i += LANES) {
            const __m256 g = _mm256_loadu_ps(gate + i);
            const __m256 sig = _mm256_div_ps(one, _mm256_add_ps(one, exp8(_mm256_sub_ps(zero, g))));
            _mm256_storeu_ps(ob + i, _mm256_mul_ps(_mm256_mul_ps(g, sig), _mm256_loadu_ps(up + i)));
        }
    }
}

/* ---- Weight products ------------------------------------------------------------------
 *
 * x [rows, in] float32 (row stride xs) times a weight packed in panels: panel p holds
 * output columns 16p..16p+15 as [in][16], contiguous, so a product streams each panel
 * once from memory (serving/llm/native packs them). out [rows, cols] (row stride os).
 * scales [cols] (int8 weights; NULL for float ones) multiply each column's sum at the end.
 *
 * Every output is one float32 FMA chain over k = 0..in-1 in order, started at zero: the
 * same sum whatever the row count, the tile it falls in, the thread count or the CPU (no
 * split over k, no reassociation). A sequence's logits are therefore bitwise the same
 * decoded alone or beside fifteen others, and the same on every x86-64 with AVX2/FMA.
 *
 * A tile is R rows (at most 6) by P panels (1 or 2): 2 * R * P accumulators, the
 * panel's 2 * P weight vectors and one broadcast of x in the 16 AVX registers. One-
 * and two-row products take two panels at a time so a chain is never alone in waiting on
 * its FMA latency; more rows take one panel, reused across the rows' tiles from cache.
 */
#define PANEL 16
#define TILE_ROWS 6
#define ALWAYS_INLINE __attribute__((always_inline)) static inline

ALWAYS_INLINE void widen_f32(const float *w, __m256 *lo, __m256 *hi) {
    *lo = _mm256_loadu_ps(w);
    *hi = _mm256_loadu_ps(w + LANES);
}

/* bfloat16 is float32's upper half: widening is a shift, exact. */
ALWAYS_INLINE void widen_bf16(const uint16_t *w, __m256 *lo, __m256 *hi) {
    const __m256i a = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)w));
    const __m256i b = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(w + LANES)));
    *lo = _mm256_castsi256_ps(_mm256_slli_epi32(a, 16));
    *hi = _mm256_castsi256_ps(_mm256_slli_epi32(b, 16));
}

/* int8 to float32 is exact; the column's scale is applied to the finished sum. */
ALWAYS_INLINE void widen_i8(const int8_t *w, __m256 *lo, __m256 *hi) {
    *lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)w)));
    *hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(w + LANES))));
}

/* One R x P tile; R and P are constants at each call, so the loops unroll into registers. */
#define DEFINE_TILE(NAME, WIDEN, WEIGHT)                                                       \
    ALWAYS_INLINE void NAME(const float *x, int64_t xs, const WEIGHT *w, int64_t panel_size,   \
                            const float *scales, float *out, int64_t os, int in, const int R,  \
                            const int P) {                                                     \
        __m256 acc[TILE_ROWS][4];                                                              \
        for (int r = 0; r < R; r++)                                                            \
            for (int j = 0; j < 2 * P; j++) acc[r][j] = _mm256_setzero_ps();                   \
        for (int k = 0; k < in; k++) {                                                         \
            __m256 wk[4];                                                                      \
            for (int p = 0; p < P; p++)                                                        \
                WIDEN(w + p * panel_size + (int64_t)k * PANEL, &wk[2 * p], &wk[2 * p + 1]);    \
            for (int r = 0; r < R; r++) {                                                      \
                const __m256 xk = _mm256_broadcast_ss(x + r * xs + k);                         \
                for (int j = 0; j < 2 * P; j++) acc[r][j] = _mm256_fmadd_ps(xk, wk[j], acc[r][j]); \
            }                                                                                  \
        }                                                                                      \
        if (scales != NULL)                                                                    \
            for (int j = 0; j < 2 * P; j++) {                                                  \
                const __m256 scale = _mm256_loadu_ps(scales + j * LANES);                      \
                for (int r = 0; r < R; r++) acc[r][j] = _mm256_mul_ps(acc[r][j], scale);       \
            }                                                                                  \
        for (int r = 0; r < R; r++)                                                            \
            for (int j = 0; j < 2 * P; j++) _mm256_storeu_ps(out + r * os + j * LANES, acc[r][j]); \
    }

DEFINE_TILE(tile_f32, widen_f32, float)
DEFINE_TILE(tile_bf16, widen_bf16, uint16_t)
DEFINE_TILE(tile_i8, widen_i8, int8_t)

/* Returns 0, or -2 (nothing written) when cols is not a multiple of PANEL, rows is
 * negative or in is not positive. */
#define DEFINE_MATMUL(NAME, TILE, WEIGHT)                                                      \
    int NAME(const float *x, int64_t xs, const WEIGHT *w, const float *scales, float *out,     \
             int64_t os, int rows, int in, int cols, int threads) {                            \
        if (cols % PANEL || rows < 0 || in < 1) return -2;                                     \
        const int panels = cols / PANEL, per = rows <= 2 ? 2 : 1;                              \
        const int units = (panels + per - 1) / per;                                            \
        const int64_t panel_size = (int64_t)in * PANEL;                                        \
        _Pragma("omp parallel for num_threads(threads) schedule(static)")                      \
        for (int u = 0; u < units; u++) {                                                      \
            const int p0 = u * per, P = panels - p0 < per ? panels - p0 : per;                 \
            const WEIGHT *wp = w + p0 * panel_size;                                            \
            const float *sp = scales == NULL ? NULL : scales + p0 * PANEL;                     \
            for (int r0 = 0; r0 < rows; r0 += TILE_ROWS) {                                     \
                const int R = rows - r0 < TILE_ROWS ? rows - r0 : TILE_ROWS;                   \
                const float *xr = x + r0 * xs;                                                 \
                float *o = out + r0 * os + p0 * PANEL;                                         \
                if (P == 2 && R == 1) TILE(xr, xs, wp, panel_size, sp, o, os, in, 1, 2);       \
                else if (P == 2) TILE(xr, xs, wp, panel_size, sp, o, os, in, 2, 2);            \
                else switch (R) {                                                              \
                    case 1: TILE(xr, xs, wp, panel_size, sp, o, os, in, 1, 1); break;          \
                    case 2: TILE(xr, xs, wp, panel_size, sp, o, os, in, 2, 1); break;          \
                    case 3: TILE(xr, xs, wp, panel_size, sp, o, os, in, 3, 1); break;          \
                    case 4: TILE(xr, xs, wp, panel_size, sp, o, os, in, 4, 1); break;          \
                    case 5: TILE(xr, xs, wp, panel_size, sp, o, os, in, 5, 1); break;          \
                    default: TILE(xr, xs, wp, panel_size, sp, o, os, in, 6, 1); break;         \
                }                                                                              \
            }                                                                                  \
        }                                                                                      \
        return 0;                                                                              \
    }

DEFINE_MATMUL(matmul_f32, tile_f32, float)
DEFINE_MATMUL(matmul_bf16, tile_bf16, uint16_t)
DEFINE_MATMUL(matmul_i8, tile_i8, int8_t)

/* ---- The same products with AVX-512 ------------------------------------------------------
 *
 * A panel is one 16-float register here. Each output is still one FMA chain over k in the
 * same order, started at zero, and scaled at the end: the same operations on the same
 * operands, so the bits are those of the AVX2 products above (the tests compare them). A
 * tile is up to 12 rows by two panels (24 accumulators of the 32 registers); a product's
 * rows are split into tiles of near-equal size, so 16 rows are two tiles of 8, not 12 + 4.
 * The panels are prefetched WIDE_AHEAD steps ahead (past a panel's end that is the next
 * panel, or nothing: a prefetch never faults). On an Intel Xeon with AMX (2 threads, the
 * 120 layer weights) that took one row from 11.2 to 9.2 ms in bfloat16 and 16 rows from
 * 29.7 to 23.9 ms in float32; AVX2's products were timed on AMD only and are left as
 * they are.
 * Compiled for AVX-512F by function attribute and only called where the CPU has it
 * (has_avx512, which also checks that the OS saves the registers).
 */
#define AVX512 __attribute__((target("avx512f")))
#define WIDE_TILE_ROWS 12
#define WIDE_AHEAD 64 /* k steps the panels are prefetched ahead (4 KB of float32) */

int has_avx512(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f");
}

AVX512 ALWAYS_INLINE __m512 widen16_f32(const float *w) { return _mm512_loadu_ps(w); }

AVX512 ALWAYS_INLINE __m512 widen16_bf16(const uint16_t *w) {
    const __m512i a = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)w));
    return _mm512_castsi512_ps(_mm512_slli_epi32(a, 16));
}

AVX512 ALWAYS_INLINE __m512 widen16_i8(const int8_t *w) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)w)));
}

#define DEFINE_WIDE_TILE(NAME, WIDEN, WEIGHT)                                                  \
    AVX512 ALWAYS_INLINE void NAME(const float *x, int64_t xs, const WEIGHT *w,                \
                                   int64_t panel_size, const float *scales, float *out,        \
                                   int64_t os, int in, const int R, const int P) {             \
        __m512 acc[WIDE_TILE_ROWS][2];                                                         \
        for (int r = 0; r < R; r++)                                                            \
            for (int p = 0; p < P; p++) acc[r][p] = _mm512_setzero_ps();                       \
        for (int k = 0; k < in; k++) {                                                         \
            __m512 wk[2];                                                                      \
            for (int p = 0; p < P; p++) wk[p] = WIDEN(w + p * panel_size + (int64_t)k * PANEL); \
            for (int p = 0; p < P; p++)                                                        \
                _mm_prefetch((const char *)(w + p * panel_size + (int64_t)(k + WIDE_AHEAD) * PANEL), \
                             _MM_HINT_T0);                                                     \
            for (int r = 0; r < R; r++) {                                                      \
                const __m512 xk = _mm512_set1_ps(x[r * xs + k]);                               \
                for (int p = 0; p < P; p++) acc[r][p] = _mm512_fmadd_ps(xk, wk[p], acc[r][p]); \
            }                                                                                  \
        }                                                                                      \
        if (scales != NULL)                                                                    \
            for (int p = 0; p < P; p++) {                                                      \
                const __m512 scale = _mm512_loadu_ps(scales + p * PANEL);                      \
                for (int r = 0; r < R; r++) acc[r][p] = _mm512_mul_ps(acc[r][p], scale);       \
            }                                                                                  \
        for (int r = 0; r < R; r++)                                                            \
            for (int p = 0; p < P; p++) _mm512_storeu_ps(out + r * os + p * PANEL, acc[r][p]); \
    }

DEFINE_WIDE_TILE(wide_tile_f32, widen16_f32, float)
DEFINE_WIDE_TILE(wide_tile_bf16, widen16_bf16, uint16_t)
DEFINE_WIDE_TILE(wide_tile_i8, widen16_i8, int8_t)

#define WIDE_CASE(TILE, R, P)                                                                  \
    case R: TILE(xr, xs, wp, panel_size, sp, o, os, in, R, P); break;
#define WIDE_CASES(TILE, P)                                                                    \
    WIDE_CASE(TILE, 1, P) WIDE_CASE(TILE, 2, P) WIDE_CASE(TILE, 3, P) WIDE_CASE(TILE, 4, P)    \
    WIDE_CASE(TILE, 5, P) WIDE_CASE(TILE, 6, P) WIDE_CASE(TILE, 7, P) WIDE_CASE(TILE, 8, P)    \
    WIDE_CASE(TILE, 9, P) WIDE_CASE(TILE, 10, P) WIDE_CASE(TILE, 11, P)                        \
    default: TILE(xr, xs, wp, panel_size, sp, o, os, in, WIDE_TILE_ROWS, P); break;

/* The same contract as DEFINE_MATMUL's functions. */
#define DEFINE_WIDE_MATMUL(NAME, TILE, WEIGHT)                                                 \
    AVX512 int NAME(const float *x, int64_t xs, const WEIGHT *w, const float *scales,          \
                    float *out, int64_t os, int rows, int in, int cols, int threads) {         \
        if (cols % PANEL || rows < 0 || in < 1) return -2;                                     \
        const int panels = cols / PANEL, units = (panels + 1) / 2;                             \
        const int tiles = (rows + WIDE_TILE_ROWS - 1) / WIDE_TILE_ROWS;                        \
        const int64_t panel_size = (int64_t)in * PANEL;                                        \
        _Pragma("omp parallel for num_threads(threads) schedule(static)")                      \
        for (int u = 0; u < units; u++) {                                                      \
            const int p0 = 2 * u, P = panels - p0 < 2 ? 1 : 2;                                 \
            const WEIGHT *wp = w + p0 * panel_size;                                            \
            const float *sp = scales == NULL ? NULL : scales + p0 * PANEL;                     \
            for (int t = 0, r0 = 0; t < tiles; t++) {                                          \
                const int R = rows / tiles + (t < rows % tiles);                               \
                const float *xr = x + r0 * xs;                                                 \
                float *o = out + r0 * os + p0 * PANEL;                                         \
                if (P == 2) switch (R) { WIDE_CASES(TILE, 2) }                                 \
                else switch (R) { WIDE_CASES(TILE, 1) }                                        \
                r0 += R;                                                                       \
            }                                                                                  \
        }                                                                                      \
        return 0;                                                                              \
    }

DEFINE_WIDE_MATMUL(matmul_f32_avx512, wide_tile_f32, float)
DEFINE_WIDE_MATMUL(matmul_bf16_avx512, wide_tile_bf16, uint16_t)
DEFINE_WIDE_MATMUL(matmul_i8_avx512, wide_tile_i8, int8_t)
