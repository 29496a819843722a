/* A Llama decode step of a few rows, in one call: every layer, then the final norm and the head.
 *
 * Built at first use by native.py (cc -O3 -march=native -fopenmp) and called through ctypes.
 * The matrices are the fast path's int8 copies (int8.py): int8 weights, one float32 scale per
 * output channel. Activations, norms, rope and attention are float32; the KV cache is the
 * engine's own tensor (bfloat16 or float32), written and read in place.
 *
 * Why: at 1-4 rows a decode step reads every weight once and does little arithmetic with it,
 * so its floor is the bytes it reads. Through torch it is ~1000 small ops (~33 per layer), each
 * paying Python and ATen dispatch and an OpenMP fork/join, for as much time as the products.
 * Here one OpenMP parallel region spans the whole step: each product is an `omp for` over its
 * output channels, the small ops run between two barriers, and nothing is dispatched.
 *
 * Layouts (row-major, contiguous):
 *   h      [B, hidden] float32, the residual stream, updated in place
 *   qkv    [(H + 2 KV) D, hidden]: q's heads, then k's, then v's (fastllama.layer_matrices)
 *   cache  per layer: [rows, KV, capacity, D]; row b's head g at base + (b KV + g) capacity D
 *   cos, sin_signed  [max_len, D]: rope(x) = x cos + swap_halves(x) sin_signed (fastllama._rope)
 */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#define MAX_ROWS 8

typedef struct {
    const int8_t *w;     /* [n, k] */
    const float *scale;  /* [n] */
    const float *bias;   /* [n] or NULL */
    int n, k;
} Mat;

typedef struct {
    const float *ln1, *ln2;  /* [hidden] */
    Mat qkv, o, gu, down;
} Layer;

typedef struct {
    int n_layers, hidden, heads, kv_heads, head_dim, inter, vocab, max_len;
    float eps, sm_scale;
    const Layer *layers;
    const float *norm;  /* [hidden], the final norm */
    Mat head;           /* [vocab, hidden] */
} Model;

/* ---- dot products of an int8 row with float32 activations ------------------------------ */

static inline float hsum_tail(const int8_t *w, const float *x, int k, int n, float acc) {
    for (; k < n; k++) acc += (float)w[k] * x[k];
    return acc;
}

#if defined(__AVX512F__)
static inline __m512 widen16(const int8_t *w) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)w)));
}
#elif defined(__AVX2__)
static inline __m256 widen8(const int8_t *w) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)w)));
}
static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

/* out[b] = dot(w[0:k], x[b][0:k]) for b < B; x rows `ldx` apart. Each weight is widened
 * once and multiplied into every row. */
static void dot_rows(const int8_t *w, const float *x, int ldx, int k, int B, float *out) {
    int i = 0;
#if defined(__AVX512F__)
    __m512 acc[MAX_ROWS];
    for (int b = 0; b < B; b++) acc[b] = _mm512_setzero_ps();
    for (; i + 16 <= k; i += 16) {
        __m512 wv = widen16(w + i);
        for (int b = 0; b < B; b++) acc[b] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + (size_t)b * ldx + i), acc[b]);
    }
    for (int b = 0; b < B; b++) out[b] = hsum_tail(w, x + (size_t)b * ldx, i, k, _mm512_reduce_add_ps(acc[b]));
#elif defined(__AVX2__)
    __m256 acc[MAX_ROWS];
    for (int b = 0; b < B; b++) acc[b] = _mm256_setzero_ps();
    for (; i + 8 <= k; i += 8) {
        __m256 wv = widen8(w + i);
        for (int b = 0; b < B; b++) acc[b] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + (size_t)b * ldx + i), acc[b]);
    }
    for (int b = 0; b < B; b++) out[b] = hsum_tail(w, x + (size_t)b * ldx, i, k, hsum256(acc[b]));
#else
    for (int b = 0; b < B; b++) out[b] = hsum_tail(w, x + (size_t)b * ldx, 0, k, 0.0f);
#endif
}

/* y[b][j] (= or +=) x[b] . m[j] * scale[j] (+ bias[j]), the output channels shared out among
 * the team's threads (an orphaned `omp for`: called inside the step's parallel region; its
 * implicit barrier ends the product). */
static void gemv(const Mat *m, int B, const float *x, int ldx, float *y, int ldy, int accumulate) {
    #pragma omp for schedule(static)
    for (int j = 0; j < m->n; j++) {
        float d[MAX_ROWS];
        dot_rows(m->w + (size_t)j * m->k, x, ldx, m->k, B, d);
        float s = m->scale[j], bias = m->bias ? m->bias[j] : 0.0f;
        for (int b = 0; b < B; b++) {
            float v = d[b] * s + bias;
            if (accumulate) y[(size_t)b * ldy + j] += v;
            else y[(size_t)b * ldy + j] = v;
        }
    }
}

/* ---- the small ops ------------------------------------------------------------------ */

static void rms_norm(const float *x, const float *weight, int n, float eps, float *out) {
    double ss = 0.0;
    #pragma omp simd reduction(+:ss)
    for (int i = 0; i < n; i++) ss += (double)x[i] * x[i];
    float r = 1.0f / sqrtf((float)(ss / n) + eps);
    for (int i = 0; i < n; i++) out[i] = x[i] * r * weight[i];
}

static inline float bf16_to_f32(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {  /* round to nearest even, as torch's .to() */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);  /* NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static void rope(float *x, const float *cos, const float *sin_signed, int d) {
    float tmp[512];
    int half = d / 2;
    for (int i = 0; i < d; i++) tmp[i] = x[(i + half) % d];
    for (int i = 0; i < d; i++) x[i] = x[i] * cos[i] + tmp[i] * sin_signed[i];
}

static inline void cache_put(void *base, int bf16, size_t i, float v) {
    if (bf16) ((uint16_t *)base)[i] = f32_to_bf16(v);
    else ((float *)base)[i] = v;
}

/* One query head of one row against its key/value head, positions 0..n-1: out [D]. */
static void attend(const float *q, const void *keys, const void *values, int bf16, int n, int d, float scale,
                   float *scores, float *out) {
    float top = -INFINITY;
    for (int t = 0; t < n; t++) {
        float s = 0.0f;
        size_t at = (size_t)t * d;
        if (bf16) {
            const uint16_t *k = (const uint16_t *)keys + at;
            #pragma omp simd reduction(+:s)
            for (int i = 0; i < d; i++) s += q[i] * bf16_to_f32(k[i]);
        } else {
            const float *k = (const float *)keys + at;
            #pragma omp simd reduction(+:s)
            for (int i = 0; i < d; i++) s += q[i] * k[i];
        }
        s *= scale;
        scores[t] = s;
        if (s > top) top = s;
    }
    float total = 0.0f;
    for (int t = 0; t < n; t++) total += (scores[t] = expf(scores[t] - top));
    float inv = 1.0f / total;
    for (int i = 0; i < d; i++) out[i] = 0.0f;
    for (int t = 0; t < n; t++) {
        float p = scores[t] * inv;
        size_t at = (size_t)t * d;
        if (bf16) {
            const uint16_t *v = (const uint16_t *)values + at;
            for (int i = 0; i < d; i++) out[i] += p * bf16_to_f32(v[i]);
        } else {
            const float *v = (const float *)values + at;
            for (int i = 0; i < d; i++) out[i] += p * v[i];
        }
    }
}

static inline float silu(float x) { return x / (1.0f + expf(-x)); }

/* ---- the step ----------------------------------------------------------------------- */

/* One token for rows 0..B-1 (B <= MAX_ROWS): h [B, hidden] holds their embeddings and comes
 * back as the final-normed hidden states; logits [B, vocab] get the head's products.
 * positions[b]: where row b's new token goes (= the tokens its cache holds). k_cache, v_cache:
 * per layer, the cache tensor's data. Returns 0, or -1 if B or a position is out of range, or
 * -2 if scratch memory could not be had. */
int inferql_decode_step(const Model *m, int B, float *h, void *const *k_cache, void *const *v_cache,
                        int cache_bf16, int capacity, const int *positions, const float *cos,
                        const float *sin_signed, float *logits, int threads) {
    if (B < 1 || B > MAX_ROWS || m->head_dim > 512) return -1;
    int width = 0;
    for (int b = 0; b < B; b++) {
        if (positions[b] < 0 || positions[b] >= capacity || positions[b] >= m->max_len) return -1;
        if (positions[b] + 1 > width) width = positions[b] + 1;
    }
    const int H = m->heads, KV = m->kv_heads, D = m->head_dim, hid = m->hidden, inter = m->inter;
    const int group = H / KV, qkv_n = (H + 2 * KV) * D;
    int widest = hid > 2 * inter ? hid : 2 * inter;
    if (qkv_n > widest) widest = qkv_n;
    /* x: normed input; y: a product's output; att: attention output; scores: per (row, head) */
    float *x = malloc(sizeof(float) * (size_t)B * widest);
    float *y = malloc(sizeof(float) * (size_t)B * widest);
    float *att = malloc(sizeof(float) * (size_t)B * H * D);
    float *scores = malloc(sizeof(float) * (size_t)B * H * width);
    if (!x || !y || !att || !scores) {
        free(x); free(y); free(att); free(scores);
        return -2;
    }
    const size_t row_stride = (size_t)KV * capacity * D, head_stride = (size_t)capacity * D;

    #pragma omp parallel num_threads(threads)
    {
        for (int l = 0; l < m->n_layers; l++) {
            const Layer *ly = &m->layers[l];
            #pragma omp for schedule(static)
            for (int b = 0; b < B; b++) rms_norm(h + (size_t)b * hid, ly->ln1, hid, m->eps, x + (size_t)b * hid);
            gemv(&ly->qkv, B, x, hid, y, qkv_n, 0);
            /* rope on q and k, the new key and value into the cache */
            #pragma omp for schedule(static)
            for (int b = 0; b < B; b++) {
                float *r = y + (size_t)b * qkv_n;
                int p = positions[b];
                for (int hd = 0; hd < H + KV; hd++) rope(r + hd * D, cos + (size_t)p * D, sin_signed + (size_t)p * D, D);
                for (int g = 0; g < KV; g++) {
                    size_t at = b * row_stride + g * head_stride + (size_t)p * D;
                    for (int i = 0; i < D; i++) {
                        cache_put(k_cache[l], cache_bf16, at + i, r[(H + g) * D + i]);
                        cache_put(v_cache[l], cache_bf16, at + i, r[(H + KV + g) * D + i]);
                    }
                }
            }
            #pragma omp for schedule(static)
            for (int task = 0; task < B * H; task++) {
                int b = task / H, hd = task % H, g = hd / group;
                size_t base = b * row_stride + g * head_stride;
                const void *keys = cache_bf16 ? (const void *)((const uint16_t *)k_cache[l] + base)
                                              : (const void *)((const float *)k_cache[l] + base);
                const void *vals = cache_bf16 ? (const void *)((const uint16_t *)v_cache[l] + base)
                                              : (const void *)((const float *)v_cache[l] + base);
                attend(y + (size_t)b * qkv_n + hd * D, keys, vals, cache_bf16, positions[b] + 1, D, m->sm_scale,
                       scores + (size_t)task * width, att + (size_t)b * H * D + hd * D);
            }
            gemv(&ly->o, B, att, H * D, h, hid, 1);
            #pragma omp for schedule(static)
            for (int b = 0; b < B; b++) rms_norm(h + (size_t)b * hid, ly->ln2, hid, m->eps, x + (size_t)b * hid);
            gemv(&ly->gu, B, x, hid, y, 2 * inter, 0);
            #pragma omp for schedule(static)
            for (int i = 0; i < B * inter; i++) {
                int b = i / inter, j = i % inter;
                float *r = y + (size_t)b * 2 * inter;
                x[(size_t)b * inter + j] = silu(r[j]) * r[inter + j];
            }
            gemv(&ly->down, B, x, inter, h, hid, 1);
        }
        #pragma omp for schedule(static)
        for (int b = 0; b < B; b++) {
            rms_norm(h + (size_t)b * hid, m->norm, hid, m->eps, x + (size_t)b * hid);
            memcpy(h + (size_t)b * hid, x + (size_t)b * hid, sizeof(float) * hid);
        }
        gemv(&m->head, B, h, hid, logits, m->vocab, 0);
    }
    free(x); free(y); free(att); free(scores);
    return 0;
}

/* y [B, n] = x [B, k] @ (w * scale[:, None]).T + bias: one product alone (tests, the bench). */
void inferql_gemv(const int8_t *w, const float *scale, const float *bias, int n, int k, int B, const float *x,
                  float *y, int threads) {
    Mat m = {w, scale, bias, n, k};
    if (B > MAX_ROWS) return;
    #pragma omp parallel num_threads(threads)
    gemv(&m, B, x, k, y, n, 0);
}
