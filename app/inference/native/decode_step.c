/* A Llama decode step of up to 16 rows (64 on AMX tiles), in one call: every layer, then the
 * final norm and the head.
 *
 * Built at first use by native.py (cc -O3 -march=native -fopenmp: native.FLAGS) and called through ctypes.
 * The matrices are the fast path's int8 copies (int8.py): int8 weights, one float32 scale per
 * output channel. A product's input rows are quantized to int16 (below), or on AMX tiles
 * rounded to bfloat16 (a bfloat16 model's steps of AMX_FROM rows or more); the residual
 * stream, norms, rope, attention and SiLU are float32; the KV cache is the engine's own tensor
 * (bfloat16 or float32), written and read in place.
 *
 * Why: at 1-4 rows a decode step reads every weight once and does little arithmetic with it,
 * so its floor is the bytes it reads. Through torch it is ~1000 small ops (~33 per layer), each
 * paying Python and ATen dispatch and an OpenMP fork/join, for as much time as the products.
 * Here one OpenMP parallel region spans the whole step: each product is an `omp for` over its
 * output channels, five barriers per layer, and nothing is dispatched. From BLOCKED_FROM rows
 * on, where a Mat has a blocked copy, its products are the blocked ones (block_rows), and
 * from AMX_FROM rows, where the build has AMX, the tiles' (amx_block).
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
#include <omp.h>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

/* With AMX (bfloat16 tiles) a step of a bfloat16 model takes up to 64 rows: from AMX_FROM rows
 * its products run on the tiles (amx_block), in bfloat16 activations. Whole steps, SmolLM2-135M
 * on a Xeon with AMX (ad hoc, 60 cached positions, medians of 3): 6 rows 20.6 / 18.0 ms on
 * the tiles / the int16 blocked products, 7 rows 21.9 / 20.3, 8 rows 19.4 / 24.4 and 21.7 /
 * 20.5 (two runs), 12 rows 21.5 / 29.7, 16 rows 24.9 / 37.1: so from 8. */
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#define AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#define MAX_ROWS 64
#define AMX_FROM 8
#else
#define AMX 0
#define MAX_ROWS 16
#define AMX_FROM (MAX_ROWS + 1)
#endif
#define INT16_ROWS 16  /* the most rows a step takes off the tiles */
#define CHUNKS 8  /* an omp for's chunks per thread (chunk()) */
/* The products read their int8 weights PREFETCH bytes ahead (_mm_prefetch): a thread's share
 * of outputs comes in chunks of a few KB (dynamic chunks, below), and the hardware prefetcher
 * starts over at each. Whole steps on an AMD EPYC with AVX512-BF16 (ad hoc, 60 cached positions,
 * medians over 3-4 s): 1 row 4.43 -> 4.00 ms, 8 rows 9.2 -> 7.7, 16 rows 15.3 -> 13.3; the AVX2
 * build there 1 row 4.8 -> 4.1, 8 rows 15.6 -> 14.0. 1, 4 and 8 KB ahead were about the same. */
#define PREFETCH 2048
#define DOT_ROWS 8     /* dot_rows' widest case; more rows go in groups (dot_many) */
/* Steps of BLOCKED_FROM rows or more take the blocked products where a Mat has them, GROUP_ROWS
 * rows at a time (block_rows: as many rows as the accumulators' registers hold). With AVX512 the
 * dot products hold up to 4 rows; with AVX2 alone (16 registers of 8 int32 lanes) the blocked
 * ones were already faster at 2 (native.blocked_from). */
#if defined(__AVX512BW__) || !defined(__AVX2__)
#define BLOCKED_FROM 5
#define GROUP_ROWS 8
#else
#define BLOCKED_FROM 2
#define GROUP_ROWS 6
#endif

typedef struct {
    const int8_t *w;     /* [n, k] */
    const float *scale;  /* [n] */
    const float *bias;   /* [n] or NULL */
    int n, k;
    /* The first nb outputs again, blocked (or NULL, nb 0): blocks of 32 outputs, and in a
     * block, for each pair of inputs (k/2 of them), 64 bytes: [2 halves][16 outputs][2 inputs]. */
    const int8_t *wb;
    int nb;
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

/* ---- products of int8 weights with int16 activations --------------------------------- */

/* A product's input rows are quantized to int16 first, each row with its own scale (its
 * largest |value| / 32767): 15 bits, against bfloat16's 8 bits of mantissa that the torch path
 * multiplies in. Widening int8 weights to int16 and multiply-adding pairs into int32
 * (vpmaddwd; vpdpwssd with VNNI) costs a third of the instructions per weight of widening them
 * to float32 for an FMA; at 1-4 rows the float32 form was bound by those instructions, not by
 * memory (11 GB/s per core against 28 GB/s for a plain sum). One int32 lane takes one pair-sum
 * (at most 2 * 127 * 32767) per 32 (AVX512) or 16 (AVX2) weights, so a lane holds 258 of them
 * without overflow: each lane's sums go to float every BLOCK weights. */

#if defined(__AVX512BW__)
#define BLOCK 8192
static inline __m512i madd_acc(__m512i acc, __m512i w, __m512i x) {
#if defined(__AVX512VNNI__)
    return _mm512_dpwssd_epi32(acc, w, x);
#else
    return _mm512_add_epi32(acc, _mm512_madd_epi16(w, x));
#endif
}
#elif defined(__AVX2__)
#define BLOCK 4096
static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

#if defined(__AVX512F__)
/* exp(x) in 16 lanes: 2^n e^r with n = round(x / ln 2), |r| <= ln 2 / 2, e^r by its Taylor
 * polynomial to r^7 (at most 7.3e-8 from exp over [-87, 88], every 0.0007; float32's ulp is
 * 6e-8 relative); far below, 0. The softmax and SiLU loops called libm's expf once per value:
 * at 64 rows ~9 % of a step (perf, one thread). */
static inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.0f)), _mm512_set1_ps(-104.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.0f / 5040);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}
#endif

/* out[b] = dot(w[0:k], xq[b][0:k]) for b < B (unscaled); xq rows `ldq` apart. Each weight is
 * widened once and multiplied into every row. Inlined with B a constant (dot_rows), so the
 * accumulators stay in registers: with B known only at run time they went through memory. */
static inline __attribute__((always_inline)) void dot_rows_of(const int8_t *w, const int16_t *xq, int ldq, int k,
                                                              const int B, float *out) {
    int i = 0;
#if defined(__AVX512BW__)
    __m512 total[MAX_ROWS];
    for (int b = 0; b < B; b++) total[b] = _mm512_setzero_ps();
    for (int start = 0; start + 32 <= k; start += BLOCK) {
        int stop = start + BLOCK < k ? start + BLOCK : k;
        __m512i acc[MAX_ROWS];
        for (int b = 0; b < B; b++) acc[b] = _mm512_setzero_si512();
        for (i = start; i + 32 <= stop; i += 32) {
            _mm_prefetch((const char *)(w + i + PREFETCH), _MM_HINT_T0);
            __m512i wv = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(w + i)));
            for (int b = 0; b < B; b++)
                acc[b] = madd_acc(acc[b], wv, _mm512_loadu_si512((const void *)(xq + (size_t)b * ldq + i)));
        }
        for (int b = 0; b < B; b++) total[b] = _mm512_add_ps(total[b], _mm512_cvtepi32_ps(acc[b]));
    }
    for (int b = 0; b < B; b++) out[b] = _mm512_reduce_add_ps(total[b]);
#elif defined(__AVX2__)
    __m256 total[MAX_ROWS];
    for (int b = 0; b < B; b++) total[b] = _mm256_setzero_ps();
    for (int start = 0; start + 16 <= k; start += BLOCK) {
        int stop = start + BLOCK < k ? start + BLOCK : k;
        __m256i acc[MAX_ROWS];
        for (int b = 0; b < B; b++) acc[b] = _mm256_setzero_si256();
        for (i = start; i + 16 <= stop; i += 16) {
            _mm_prefetch((const char *)(w + i + PREFETCH), _MM_HINT_T0);
            __m256i wv = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + i)));
            for (int b = 0; b < B; b++)
                acc[b] = _mm256_add_epi32(acc[b], _mm256_madd_epi16(wv, _mm256_loadu_si256(
                    (const __m256i *)(xq + (size_t)b * ldq + i))));
        }
        for (int b = 0; b < B; b++) total[b] = _mm256_add_ps(total[b], _mm256_cvtepi32_ps(acc[b]));
    }
    for (int b = 0; b < B; b++) out[b] = hsum256(total[b]);
#else
    for (int b = 0; b < B; b++) out[b] = 0.0f;
#endif
    for (; i < k; i++)  /* the tail (and the whole product without AVX2) */
        for (int b = 0; b < B; b++) out[b] += (float)w[i] * (float)xq[(size_t)b * ldq + i];
}

static void dot_rows(const int8_t *w, const int16_t *xq, int ldq, int k, int B, float *out) {
    switch (B) {
    case 1: dot_rows_of(w, xq, ldq, k, 1, out); break;
    case 2: dot_rows_of(w, xq, ldq, k, 2, out); break;
    case 3: dot_rows_of(w, xq, ldq, k, 3, out); break;
    case 4: dot_rows_of(w, xq, ldq, k, 4, out); break;
    case 5: dot_rows_of(w, xq, ldq, k, 5, out); break;
    case 6: dot_rows_of(w, xq, ldq, k, 6, out); break;
    case 7: dot_rows_of(w, xq, ldq, k, 7, out); break;
    default: dot_rows_of(w, xq, ldq, k, DOT_ROWS, out); break;
    }
}

/* dot_rows for any number of rows, DOT_ROWS at a time. */
static void dot_many(const int8_t *w, const int16_t *xq, int ldq, int k, int B, float *out) {
    for (int b0 = 0; b0 < B; b0 += DOT_ROWS)
        dot_rows(w, xq + (size_t)b0 * ldq, ldq, k, B - b0 < DOT_ROWS ? B - b0 : DOT_ROWS, out + b0);
}

/* The products of one block of 32 outputs (Mat.wb's layout) with B rows: out[b][o]. From 5
 * rows on, the dot form above is bound by its multiply-adds and their horizontal sums; here
 * the outputs lie across a vector's lanes and each row's input pair is broadcast to them, so
 * one widened weight vector serves every row and nothing is summed across lanes (the way
 * oneDNN blocks its matrices). Rows go 8 at a time: 16 accumulators, two per row. Sums go to
 * float every KPAIRS input pairs, before an int32 lane could overflow (see BLOCK). */
#define KPAIRS 256
static inline __attribute__((always_inline)) void block_group(const int8_t *wb, const int16_t *xq, int ldq, int k,
                                                              const int R, float out[][32]) {
#if defined(__AVX512BW__)
    __m512 total[16];
    for (int r = 0; r < 2 * R; r++) total[r] = _mm512_setzero_ps();
    for (int p0 = 0; p0 < k / 2; p0 += KPAIRS) {
        int p1 = p0 + KPAIRS < k / 2 ? p0 + KPAIRS : k / 2;
        __m512i acc[16];
        for (int r = 0; r < 2 * R; r++) acc[r] = _mm512_setzero_si512();
        for (int p = p0; p < p1; p++) {
            _mm_prefetch((const char *)(wb + (size_t)p * 64 + PREFETCH), _MM_HINT_T0);
            __m512i w0 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(wb + (size_t)p * 64)));
            __m512i w1 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(wb + (size_t)p * 64 + 32)));
            for (int r = 0; r < R; r++) {
                int32_t pair;
                memcpy(&pair, xq + (size_t)r * ldq + 2 * p, 4);
                __m512i xv = _mm512_set1_epi32(pair);
                acc[2 * r] = madd_acc(acc[2 * r], w0, xv);
                acc[2 * r + 1] = madd_acc(acc[2 * r + 1], w1, xv);
            }
        }
        for (int r = 0; r < 2 * R; r++) total[r] = _mm512_add_ps(total[r], _mm512_cvtepi32_ps(acc[r]));
    }
    for (int r = 0; r < R; r++) {
        _mm512_storeu_ps(out[r], total[2 * r]);
        _mm512_storeu_ps(out[r] + 16, total[2 * r + 1]);
    }
#elif defined(__AVX2__)
    /* 8 int32 lanes: a row's 32 outputs are 4 vectors, so 16 registers cannot hold 8 rows'
     * accumulators. One half of the block (16 outputs, 32 bytes per pair) at a time, up to 6
     * rows: 12 accumulators, 2 weight vectors and the broadcast; the running float sums wait
     * in `out` (in registers too, they made gcc spill the accumulators to the stack). The
     * second half's bytes come from cache (a block is 32 x k bytes: 18 KB at k 576). */
    for (int half = 0; half < 2; half++) {
        for (int r = 0; r < R; r++) {
            _mm256_storeu_ps(out[r] + half * 16, _mm256_setzero_ps());
            _mm256_storeu_ps(out[r] + half * 16 + 8, _mm256_setzero_ps());
        }
        for (int p0 = 0; p0 < k / 2; p0 += KPAIRS) {
            int p1 = p0 + KPAIRS < k / 2 ? p0 + KPAIRS : k / 2;
            __m256i acc[12];
            for (int r = 0; r < 2 * R; r++) acc[r] = _mm256_setzero_si256();
            for (int p = p0; p < p1; p++) {
                const int8_t *wp = wb + (size_t)p * 64 + half * 32;
                _mm_prefetch((const char *)(wp + PREFETCH), _MM_HINT_T0);
                __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)wp));
                __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(wp + 16)));
                for (int r = 0; r < R; r++) {
                    int32_t pair;
                    memcpy(&pair, xq + (size_t)r * ldq + 2 * p, 4);
                    __m256i xv = _mm256_set1_epi32(pair);
                    acc[2 * r] = _mm256_add_epi32(acc[2 * r], _mm256_madd_epi16(w0, xv));
                    acc[2 * r + 1] = _mm256_add_epi32(acc[2 * r + 1], _mm256_madd_epi16(w1, xv));
                }
            }
            for (int r = 0; r < R; r++)
                for (int c = 0; c < 2; c++) {
                    float *o = out[r] + half * 16 + c * 8;
                    _mm256_storeu_ps(o, _mm256_add_ps(_mm256_loadu_ps(o), _mm256_cvtepi32_ps(acc[2 * r + c])));
                }
        }
    }
#else  /* plain loops: correct, not fast (native.usable keeps such CPUs on torch) */
    for (int r = 0; r < R; r++) {
        const int16_t *x = xq + (size_t)r * ldq;
        for (int o = 0; o < 32; o++) {
            float sum = 0.0f;
            for (int p = 0; p < k / 2; p++) {
                const int8_t *wp = wb + (size_t)p * 64 + (o / 16) * 32 + (o % 16) * 2;
                sum += (float)((int32_t)wp[0] * x[2 * p] + (int32_t)wp[1] * x[2 * p + 1]);
            }
            out[r][o] = sum;
        }
    }
#endif
}

/* Rows GROUP_ROWS at a time, each group's row count a constant (its accumulators stay in
 * registers). */
static void block_rows(const int8_t *wb, const int16_t *xq, int ldq, int k, int B, float out[][32]) {
    for (int b0 = 0; b0 < B; b0 += GROUP_ROWS) {
        const int16_t *x = xq + (size_t)b0 * ldq;
        switch (B - b0 < GROUP_ROWS ? B - b0 : GROUP_ROWS) {
        case 1: block_group(wb, x, ldq, k, 1, out + b0); break;
        case 2: block_group(wb, x, ldq, k, 2, out + b0); break;
        case 3: block_group(wb, x, ldq, k, 3, out + b0); break;
        case 4: block_group(wb, x, ldq, k, 4, out + b0); break;
        case 5: block_group(wb, x, ldq, k, 5, out + b0); break;
#if GROUP_ROWS == 8
        case 6: block_group(wb, x, ldq, k, 6, out + b0); break;
        case 7: block_group(wb, x, ldq, k, 7, out + b0); break;
        default: block_group(wb, x, ldq, k, 8, out + b0); break;
#else
        default: block_group(wb, x, ldq, k, 6, out + b0); break;
#endif
        }
    }
}

/* Rows x[b][0:k] (`ldx` apart) -> int16 xq[b] (`ldq` apart) and their scales. */
static void quantize(const float *x, int ldx, int k, int B, int16_t *xq, int ldq, float *scale) {
    for (int b = 0; b < B; b++) {
        const float *r = x + (size_t)b * ldx;
        int16_t *q = xq + (size_t)b * ldq;
        float top = 0.0f;
        /* No fmaxf nor lrintf: without -ffast-math gcc calls libm for each element of those
         * (~5 % of a 1-row step); rintf rounds the same way (to nearest, ties to even) inline. */
        #pragma omp simd reduction(max:top)
        for (int i = 0; i < k; i++) {
            float a = fabsf(r[i]);
            top = a > top ? a : top;
        }
        float s = top > 0.0f ? top / 32767.0f : 1.0f, inv = 1.0f / s;
        #pragma omp simd
        for (int i = 0; i < k; i++) q[i] = (int16_t)rintf(r[i] * inv);
        scale[b] = s;
    }
}

/* Activations quantized for a product (private to a thread). With `amx`, q holds them in
 * bfloat16 instead (s all 1), in rows padded with zeros to a multiple of 16 (a tile's rows),
 * and `tiles` is room for one block of weights in bfloat16 (amx_block). */
typedef struct {
    int16_t *q;    /* [B][ld] */
    float s[MAX_ROWS];
    int ld;
    int amx;
    uint16_t *tiles;
} Quantized;

/* A product's input rows, as the step's products take them (Quantized). */
static void prepare(const float *x, int ldx, int k, int B, Quantized *q) {
#if AMX
    if (q->amx) {
        for (int b = 0; b < B; b++) {
            const float *r = x + (size_t)b * ldx;
            uint16_t *o = (uint16_t *)q->q + (size_t)b * q->ld;
            for (int i = 0; i < k; i += 32)  /* k % 32 == 0: the step and inferql_gemv check */
                _mm512_storeu_si512((void *)(o + i), (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(r + i + 16),
                                                                                 _mm512_loadu_ps(r + i)));
            q->s[b] = 1.0f;
        }
        return;
    }
#endif
    quantize(x, ldx, k, B, q->q, q->ld, q->s);
}

#if AMX
/* AMX multiplies tiles of 16 rows x 64 bytes: C (float32, 16 x 16) += A (bfloat16, 16 rows x 32
 * inputs) B (32 inputs x 16 outputs, each row a pair of inputs for the 16 outputs: exactly a
 * half of Mat.wb's pair of inputs, once in bfloat16). The int8 weights are read once per
 * step as elsewhere and widened to bfloat16 in registers (exact: |w| <= 127) into `tiles`;
 * one tile product (16 x 16 x 32) took 15 ns here, 23 ns with its four tile loads (a loop of
 * them alone, ad hoc): ~350 GMAC/s per core; the int16 blocked products reached ~125 GMAC/s
 * on both cores at 16 rows (an earlier standalone trial, README).
 * A layer's products alone at 64 rows, both cores: ~245 GMAC/s with the widening and the
 * weights' bytes (the blocked ones: no 64-row form). Tiles 0-3: C (rows 0-15 and 16-31 of a
 * pass, by the block's two halves), 4-5: A, 6-7: B. */
typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} TileConfig;

static int amx_permitted(void) {  /* Linux hands out the tiles' state on request (once per process) */
    static int permitted = -1;
    if (permitted < 0) permitted = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
    return permitted;
}

/* Every tile 16 rows x 64 bytes. Static data: gcc 12's _tile_loadconfig tells the compiler
 * it reads only a pointer's worth of the config, so the stores filling a local one were
 * dropped as dead. */
static const TileConfig TILES __attribute__((aligned(64))) = {
    .palette = 1, .colsb = {64, 64, 64, 64, 64, 64, 64, 64}, .rows = {16, 16, 16, 16, 16, 16, 16, 16}};

static void amx_configure(void) { _tile_loadconfig(&TILES); }

/* out[b][o] for one block of 32 outputs (Mat.wb) and rows 0..B-1 of xa (bfloat16, ldx apart,
 * zero rows up to a multiple of 16); tiles: room for the block in bfloat16 (k/32 x 2 KB). */
static void amx_block(const int8_t *wb, const uint16_t *xa, int ldx, int k, int B, float out[][32],
                      uint16_t *tiles) {
    for (int p = 0; p < k / 2; p++)  /* input pair p: row p % 16 of both halves' tiles at p / 16 */
        for (int half = 0; half < 2; half++) {
            __m256i v = _mm256_loadu_si256((const __m256i *)(wb + (size_t)p * 64 + half * 32));
            __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(v)));
            __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(v, 1)));
            _mm512_storeu_si512((void *)(tiles + ((size_t)((p / 16) * 2 + half) * 16 + p % 16) * 32),
                                (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
        }
    const size_t stride = (size_t)ldx * 2;
    for (int m = 0; m < B; m += 32) {
        const int two = B - m > 16;
        _tile_zero(0);
        _tile_zero(1);
        if (two) {
            _tile_zero(2);
            _tile_zero(3);
        }
        for (int kt = 0; kt < k / 32; kt++) {
            _tile_loadd(6, tiles + (size_t)kt * 1024, 64);
            _tile_loadd(7, tiles + (size_t)kt * 1024 + 512, 64);
            _tile_loadd(4, xa + (size_t)m * ldx + kt * 32, stride);
            _tile_dpbf16ps(0, 4, 6);
            _tile_dpbf16ps(1, 4, 7);
            if (two) {
                _tile_loadd(5, xa + (size_t)(m + 16) * ldx + kt * 32, stride);
                _tile_dpbf16ps(2, 5, 6);
                _tile_dpbf16ps(3, 5, 7);
            }
        }
        _tile_stored(0, &out[m][0], 128);
        _tile_stored(1, &out[m][16], 128);
        if (two) {
            _tile_stored(2, &out[m + 16][0], 128);
            _tile_stored(3, &out[m + 16][16], 128);
        }
    }
}

/* out[b] = dot(w[0:k], xa[b]) for the outputs outside the blocks, bfloat16 rows (ldx apart). */
static void dot_bf16(const int8_t *w, const uint16_t *xa, int ldx, int k, int B, float *out) {
    for (int b = 0; b < B; b++) {
        const uint16_t *x = xa + (size_t)b * ldx;
        __m512 acc = _mm512_setzero_ps();
        for (int i = 0; i < k; i += 16)
            acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + i)))),
                                  _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(
                                      _mm256_loadu_si256((const __m256i *)(x + i))), 16)), acc);
        out[b] = _mm512_reduce_add_ps(acc);
    }
}
#else
static inline int amx_permitted(void) { return 0; }
#endif

/* Output j of every row from its unscaled products d[b * ldd]: y[b][j] (= or +=) d * x's row
 * scale * m's channel scale (+ bias). */
static inline void put(const Mat *m, int B, const Quantized *x, int j, const float *d, int ldd, float *y, int ldy,
                       int accumulate) {
    float s = m->scale[j], bias = m->bias ? m->bias[j] : 0.0f;
    for (int b = 0; b < B; b++) {
        float v = d[(size_t)b * ldd] * x->s[b] * s + bias;
        if (accumulate) y[(size_t)b * ldy + j] += v;
        else y[(size_t)b * ldy + j] = v;
    }
}

/* put() for the 32 outputs j0.. of a block at once: d[b][o]. */
static inline void put_block(const Mat *m, int B, const Quantized *x, int j0, float d[][32], float *y, int ldy,
                             int accumulate) {
    const float *sc = m->scale + j0;
    float bias[32] = {0};
    if (m->bias) memcpy(bias, m->bias + j0, sizeof bias);
    for (int b = 0; b < B; b++) {
        float *out = y + (size_t)b * ldy + j0, xs = x->s[b];
        if (accumulate) {
            #pragma omp simd
            for (int o = 0; o < 32; o++) out[o] += d[b][o] * xs * sc[o] + bias[o];
        } else {
            #pragma omp simd
            for (int o = 0; o < 32; o++) out[o] = d[b][o] * xs * sc[o] + bias[o];
        }
    }
}

/* Block t of m (32 outputs) against x's rows: d[b][o], unscaled; on the tiles where x is
 * bfloat16. */
static inline void block_of(const Mat *m, int t, int B, const Quantized *x, float d[][32]) {
    const int8_t *wb = m->wb + (size_t)t * 32 * m->k;
#if AMX
    if (x->amx) {
        amx_block(wb, (const uint16_t *)x->q, x->ld, m->k, B, d, x->tiles);
        return;
    }
#endif
    block_rows(wb, x->q, x->ld, m->k, B, d);
}

/* Output j of m (a row of its plain weights) against x's rows: d[b], unscaled. */
static inline void dots_of(const Mat *m, int j, int B, const Quantized *x, float *d) {
    const int8_t *w = m->w + (size_t)j * m->k;
#if AMX
    if (x->amx) {
        dot_bf16(w, (const uint16_t *)x->q, x->ld, m->k, B, d);
        return;
    }
#endif
    dot_many(w, x->q, x->ld, m->k, B, d);
}

/* The chunks an `omp for` hands out on demand (schedule(dynamic)): CHUNKS per thread. On these
 * 2-core machines the server's event loop and its client take a core now and then; with a
 * static share the other thread then waited at the next barrier for the descheduled one, with
 * dynamic chunks it takes the rest of the work. A step beside a process busy 0.6 ms every
 * 10 ms (ad hoc, SmolLM2-135M, Xeon with AMX): 64 rows +33 % static, +3.8 % dynamic; 16 rows
 * +6.2 % and +2.1 %; alone, 64 rows 52.6 and 49.8 ms, 1 row the same within the noise. */
static inline int chunk(int tasks) {
    int c = tasks / (omp_get_num_threads() * CHUNKS);
    return c > 0 ? c : 1;
}

/* y[b][j] (= or +=) x[b] . m[j] * scale[j] (+ bias[j]), the output channels shared out among
 * the team's threads (an orphaned `omp for`, inside the step's parallel region; its implicit
 * barrier ends the product). The tasks: the blocks of 32 outputs (from BLOCKED_FROM rows, or
 * on the tiles, where m has them), then one task per remaining output. */
static void gemv(const Mat *m, int B, const Quantized *x, float *y, int ldy, int accumulate) {
    const int blocks = (B >= BLOCKED_FROM || x->amx) && m->wb ? m->nb / 32 : 0, first = blocks * 32;
    const int c = chunk(blocks + m->n - first);
    #pragma omp for schedule(dynamic, c)
    for (int t = 0; t < blocks + m->n - first; t++) {
        if (t < blocks) {
            float d[MAX_ROWS][32];
            block_of(m, t, B, x, d);
            put_block(m, B, x, t * 32, d, y, ldy, accumulate);
        } else {
            int j = first + t - blocks;
            float d[MAX_ROWS];
            dots_of(m, j, B, x, d);
            put(m, B, x, j, d, 1, y, ldy, accumulate);
        }
    }
}

static inline float silu(float x) { return x / (1.0f + expf(-x)); }

/* Output j of the gated product from its unscaled gate and up products g, u [b * ldd]:
 * out[b][j] = silu(gate) * up. */
static inline void put_gated(const Mat *m, int B, const Quantized *x, int j, const float *g, const float *u,
                             int ldd, float *out, int ldo) {
    const int inter = m->n / 2;
    float sg = m->scale[j], su = m->scale[inter + j];
    for (int b = 0; b < B; b++)
        out[(size_t)b * ldo + j] = silu(g[(size_t)b * ldd] * x->s[b] * sg) * (u[(size_t)b * ldd] * x->s[b] * su);
}

/* put_gated() for the 32 outputs j0.. of a block at once: g[b][o], u[b][o]. */
static inline void put_gated_block(const Mat *m, int B, const Quantized *x, int j0, float g[][32], float u[][32],
                                   float *out, int ldo) {
    const int inter = m->n / 2;
    const float *sg = m->scale + j0, *su = m->scale + inter + j0;
    for (int b = 0; b < B; b++) {
        float *o = out + (size_t)b * ldo + j0, xs = x->s[b];
#if defined(__AVX512F__)
        for (int c = 0; c < 32; c += 16) {
            __m512 gate = _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(g[b] + c), _mm512_set1_ps(xs)),
                                        _mm512_loadu_ps(sg + c));
            __m512 up = _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(u[b] + c), _mm512_set1_ps(xs)),
                                      _mm512_loadu_ps(su + c));
            __m512 act = _mm512_div_ps(gate, _mm512_add_ps(_mm512_set1_ps(1.0f), exp16(_mm512_sub_ps(
                _mm512_setzero_ps(), gate))));
            _mm512_storeu_ps(o + c, _mm512_mul_ps(act, up));
        }
#else
        for (int c = 0; c < 32; c++) o[c] = silu(g[b][c] * xs * sg[c]) * (u[b][c] * xs * su[c]);
#endif
    }
}

/* out[b][j] = silu(gate_j . x[b]) * (up_j . x[b]) for j < inter, with gate_j the row j of the
 * stacked [gate; up] matrix and up_j the row inter + j: both halves of one output in one
 * thread, so the activation needs no pass (nor barrier) of its own. */
static void gated_gemv(const Mat *m, int B, const Quantized *x, float *out, int ldo) {
    const int inter = m->n / 2;
    if ((B >= BLOCKED_FROM || x->amx) && m->wb && m->nb == m->n && inter % 32 == 0) {
        /* gate block t and up block inter / 32 + t: the same 32 outputs */
        const int c = chunk(inter / 32);
        #pragma omp for schedule(dynamic, c)
        for (int t = 0; t < inter / 32; t++) {
            float g[MAX_ROWS][32], u[MAX_ROWS][32];
            block_of(m, t, B, x, g);
            block_of(m, inter / 32 + t, B, x, u);
            put_gated_block(m, B, x, t * 32, g, u, out, ldo);
        }
        return;
    }
    const int c = chunk(inter);
    #pragma omp for schedule(dynamic, c)
    for (int j = 0; j < inter; j++) {
        float g[MAX_ROWS], u[MAX_ROWS];
        dots_of(m, j, B, x, g);
        dots_of(m, inter + j, B, x, u);
        put_gated(m, B, x, j, g, u, 1, out, ldo);
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

#if defined(__AVX512F__)
/* 16 values of the cache at element i, as float32 (bfloat16: the high half of a float32). */
static inline __attribute__((always_inline)) __m512 load16(const void *base, const int bf16, size_t i) {
    if (bf16)
        return _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)base + i))), 16));
    return _mm512_loadu_ps((const float *)base + i);
}

/* attend() for a head size D (a multiple of 16) known at compile time: q and the output
 * accumulators live in registers, each key and value row is 16 lanes at a time. */
static inline __attribute__((always_inline)) void attend_of(const float *q, const void *keys, const void *values,
                                                           const int bf16, int n, const int D, float scale,
                                                           float *scores, float *out) {
    __m512 qv[D / 16], o[D / 16];
    for (int c = 0; c < D / 16; c++) qv[c] = _mm512_mul_ps(_mm512_loadu_ps(q + 16 * c), _mm512_set1_ps(scale));
    float top = -INFINITY;
    for (int t = 0; t < n; t++) {
        __m512 acc = _mm512_mul_ps(qv[0], load16(keys, bf16, (size_t)t * D));
        for (int c = 1; c < D / 16; c++) acc = _mm512_fmadd_ps(qv[c], load16(keys, bf16, (size_t)t * D + 16 * c), acc);
        float s = _mm512_reduce_add_ps(acc);
        scores[t] = s;
        top = s > top ? s : top;
    }
    __m512 sum = _mm512_setzero_ps(), tv = _mm512_set1_ps(top);
    for (int t = 0; t < n; t += 16) {
        __mmask16 in = n - t >= 16 ? 0xffff : (__mmask16)((1u << (n - t)) - 1);
        __m512 e = _mm512_maskz_mov_ps(in, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(in, scores + t), tv)));
        _mm512_mask_storeu_ps(scores + t, in, e);
        sum = _mm512_add_ps(sum, e);
    }
    float total = _mm512_reduce_add_ps(sum);
    for (int c = 0; c < D / 16; c++) o[c] = _mm512_setzero_ps();
    for (int t = 0; t < n; t++) {
        __m512 p = _mm512_set1_ps(scores[t]);
        for (int c = 0; c < D / 16; c++) o[c] = _mm512_fmadd_ps(p, load16(values, bf16, (size_t)t * D + 16 * c), o[c]);
    }
    __m512 inv = _mm512_set1_ps(1.0f / total);
    for (int c = 0; c < D / 16; c++) _mm512_storeu_ps(out + 16 * c, _mm512_mul_ps(o[c], inv));
}
#endif

/* One query head of one row against its key/value head, positions 0..n-1: out [D]. */
static void attend(const float *q, const void *keys, const void *values, int bf16, int n, int d, float scale,
                   float *scores, float *out) {
#if defined(__AVX512F__)
    if (d == 64) {
        if (bf16) attend_of(q, keys, values, 1, n, 64, scale, scores, out);
        else attend_of(q, keys, values, 0, n, 64, scale, scores, out);
        return;
    }
    if (d == 128) {
        if (bf16) attend_of(q, keys, values, 1, n, 128, scale, scores, out);
        else attend_of(q, keys, values, 0, n, 128, scale, scores, out);
        return;
    }
#endif
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

/* ---- the step ----------------------------------------------------------------------- */

/* Whether B rows' products run on the tiles: bfloat16 activations allowed (bf16), AMX. */
static int on_tiles(int B, int bf16) { return AMX && bf16 && B >= AMX_FROM && amx_permitted(); }

/* A thread's Quantized for B rows of up to `widest` inputs (with amx: bfloat16 rows, zero to a
 * multiple of 16, the block's room, the tiles configured). 0 if out of memory. */
static int inputs(Quantized *x, int B, int widest, int amx) {
    memset(x, 0, sizeof *x);
    x->ld = widest;
    x->amx = amx;
    /* the tiles read rows past B, which must be zero */
    x->q = amx ? calloc((size_t)(B + 15) / 16 * 16 * widest, sizeof(int16_t))
               : malloc(sizeof(int16_t) * (size_t)B * widest);
#if AMX
    if (amx) {
        x->tiles = aligned_alloc(64, (size_t)(widest / 32) * 2048);
        amx_configure();
    }
#endif
    return x->q && (!amx || x->tiles);
}

static void release(Quantized *x) {
#if AMX
    if (x->amx) _tile_release();
#endif
    free(x->q);
    free(x->tiles);
}

/* Row b's normed h, quantized into this thread's own buffer: every thread norms the same
 * rows for itself rather than one thread norming them between two barriers. */
static void norm_rows(const float *h, int B, int hid, const float *weight, float eps, float *normed, Quantized *x) {
    for (int b = 0; b < B; b++) rms_norm(h + (size_t)b * hid, weight, hid, eps, normed + (size_t)b * hid);
    prepare(normed, hid, hid, B, x);
}

/* Rope on row b's key head g and the query heads that share it, the new key and value into
 * the cache, then those query heads' attention over positions 0..p: out [H D]. */
static void attend_group(const Model *m, float *r, int p, int g, void *k_cache, void *v_cache, int bf16,
                         size_t base, const float *cos, const float *sin_signed, float *scores, float *out) {
    const int H = m->heads, KV = m->kv_heads, D = m->head_dim, group = H / KV;
    const float *c = cos + (size_t)p * D, *sn = sin_signed + (size_t)p * D;
    float *k = r + (H + g) * D, *v = r + (H + KV + g) * D;
    rope(k, c, sn, D);
    for (int i = 0; i < D; i++) {
        cache_put(k_cache, bf16, base + (size_t)p * D + i, k[i]);
        cache_put(v_cache, bf16, base + (size_t)p * D + i, v[i]);
    }
    const void *keys = bf16 ? (const void *)((const uint16_t *)k_cache + base) : (const void *)((const float *)k_cache + base);
    const void *vals = bf16 ? (const void *)((const uint16_t *)v_cache + base) : (const void *)((const float *)v_cache + base);
    for (int hd = g * group; hd < (g + 1) * group; hd++) {
        rope(r + hd * D, c, sn, D);
        attend(r + hd * D, keys, vals, bf16, p + 1, D, m->sm_scale, scores, out + hd * D);
    }
}

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
    const int qkv_n = (H + 2 * KV) * D;
    int widest = hid > inter ? hid : inter;
    if (H * D > widest) widest = H * D;
    /* shared: qkv's output, the attention's, the MLP's activation; scores per (row, kv head) */
    float *y = malloc(sizeof(float) * (size_t)B * qkv_n);
    float *att = malloc(sizeof(float) * (size_t)B * H * D);
    float *act = malloc(sizeof(float) * (size_t)B * inter);
    float *scores = malloc(sizeof(float) * (size_t)B * KV * width);
    int failed = !y || !att || !act || !scores;
    const size_t row_stride = (size_t)KV * capacity * D, head_stride = (size_t)capacity * D;
    const int amx = on_tiles(B, cache_bf16) && hid % 32 == 0 && inter % 32 == 0 && (H * D) % 32 == 0
                    && m->layers[0].qkv.wb && m->head.wb;
    if (B > INT16_ROWS && !amx) return -1;

    #pragma omp parallel num_threads(threads) if (!failed)
    {
        /* this thread's own: the normed rows and the quantized input of the next product */
        float *normed = malloc(sizeof(float) * (size_t)B * hid);
        Quantized x;
        int mine = normed && inputs(&x, B, widest, amx);
        #pragma omp atomic
        failed += !mine;
        #pragma omp barrier
        if (!failed) {
            for (int l = 0; l < m->n_layers; l++) {
                const Layer *ly = &m->layers[l];
                norm_rows(h, B, hid, ly->ln1, m->eps, normed, &x);
                gemv(&ly->qkv, B, &x, y, qkv_n, 0);
                #pragma omp for schedule(dynamic, 1)
                for (int task = 0; task < B * KV; task++) {
                    int b = task / KV, g = task % KV;
                    attend_group(m, y + (size_t)b * qkv_n, positions[b], g, k_cache[l], v_cache[l], cache_bf16,
                                 b * row_stride + g * head_stride, cos, sin_signed, scores + (size_t)task * width,
                                 att + (size_t)b * H * D);
                }
                prepare(att, H * D, H * D, B, &x);
                gemv(&ly->o, B, &x, h, hid, 1);
                norm_rows(h, B, hid, ly->ln2, m->eps, normed, &x);
                gated_gemv(&ly->gu, B, &x, act, inter);
                prepare(act, inter, inter, B, &x);
                gemv(&ly->down, B, &x, h, hid, 1);
            }
            norm_rows(h, B, hid, m->norm, m->eps, normed, &x);
            #pragma omp barrier
            #pragma omp master
            memcpy(h, normed, sizeof(float) * (size_t)B * hid);
            gemv(&m->head, B, &x, logits, m->vocab, 0);
        }
        free(normed);
        release(&x);
    }
    free(y); free(att); free(act); free(scores);
    return failed ? -2 : 0;
}

/* y [B, n] = x [B, k] @ (w * scale[:, None]).T + bias: one product alone (tests, the bench); wb, nb:
 * its blocked copy (Mat), or NULL, 0. */
int inferql_gemv(const int8_t *w, const float *scale, const float *bias, int n, int k, const int8_t *wb, int nb,
                 int B, const float *x, float *y, int threads, int bf16) {
    if (B < 1 || B > MAX_ROWS) return -1;
    Mat m = {w, scale, bias, n, k, wb, nb};
    const int amx = on_tiles(B, bf16) && wb && k % 32 == 0;
    if (B > INT16_ROWS && !amx) return -1;
    int failed = 0;
    #pragma omp parallel num_threads(threads)
    {
        Quantized q;  /* each thread its own, as in the step */
        int mine = inputs(&q, B, k, amx);
        #pragma omp atomic
        failed += !mine;
        #pragma omp barrier
        if (!failed) {
            prepare(x, k, k, B, &q);
            gemv(&m, B, &q, y, n, 0);
        }
        release(&q);
    }
    return failed ? -2 : 0;
}

/* The most rows a step takes: 64 on the tiles (bfloat16 activations: a bfloat16 model), else 16. */
int inferql_max_rows(int bf16) { return AMX && bf16 && amx_permitted() ? MAX_ROWS : INT16_ROWS; }

/* From how many rows the products run on the tiles (0: never here). */
int inferql_amx_from(void) { return AMX && amx_permitted() ? AMX_FROM : 0; }

/* The build's BLOCKED_FROM (native.py asks, to make the blocked copies only where they run). */
int inferql_blocked_from(void) { return BLOCKED_FROM; }
