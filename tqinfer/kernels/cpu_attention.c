/* Attention over TurboQuant records on the CPU: the decode step's scores and weighted values, and a
 * prefill chunk's dequantized tiles, read straight from the paged pool through the block table.
 *
 * tqinfer/kernels/cpu.py compiles this file once per record layout, with the layout as macros
 * (TQ_D, TQ_G, the parts' TQ_P<k>_CH/DIM/BITS/PLANES/SCALE), so every loop below has constant
 * trip counts and the compiler unrolls and vectorizes them. Sixteen codes at a time: their bit
 * fields go to the lanes of a 16 x int32 vector (one broadcast and one variable shift), the
 * centroids come from a 16-entry table held in a register (one permute), then the norm. The
 * torch twin (tqinfer/kernels/reference.py) does the same math in many passes over memory.
 *
 * Record layout (tqinfer/quant/packing.py, turboquant.py): a part's codes are planes of widths 4, 2,
 * 1 (b = 3: a 2-bit plane, then a 1-bit plane), code j of a width-w plane at bit (j * w) % 8 of byte
 * j * w / 8 (the 1-bit plane of b = 3: at bit PERM3[j % 8], see high_bits3); the part's fp16 norm at byte TQ_P<k>_SCALE. Rotated space: part k's values occupy
 * channels [TQ_P<k>_CH, + TQ_P<k>_DIM). The query arrives rotated and the output leaves rotated.
 *
 * Pool [blocks, H, BS, R] uint8; table: the sequence's block ids (int32); token t of head h sits at
 * ((table[t / BS] * H + h) * BS + t % BS) * R. Threads: OpenMP over (head, token range) units, in
 * the process's own OpenMP runtime (torch's), so torch.set_num_threads governs both.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#ifndef TQ_D
#error "compile with the layout macros (tqinfer/kernels/cpu.py)"
#endif
#if TQ_PARTS < 1 || TQ_PARTS > 2
#error "records of one or two parts"
#endif
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "records are little-endian"
#endif

typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
typedef uint32_t vu __attribute__((vector_size(64)));

#define NV (TQ_D / 16)   /* 16-lane vectors per head vector */
#define INLINE static inline __attribute__((always_inline))

INLINE float fp16(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    uint32_t s = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 31, m = h & 1023, b;
    if (e == 31) {
        b = s | 0x7f800000u | (m << 13);
    } else if (e) {
        b = s | ((e + 112) << 23) | (m << 13);
    } else {  /* zero or subnormal: m * 2^-24 */
        float v = (float)m * (1.0f / 16777216.0f);
        memcpy(&b, &v, 4);
        b |= s;
    }
    float f;
    memcpy(&f, &b, 4);
    return f;
}

/* Bits sh[0..15] of the 16-bit word at byte j / 8 of src, one per lane. */
INLINE vi bits16(const uint8_t *src, int j, vu sh) {
    uint16_t w;
    memcpy(&w, src + j / 8, 2);
    return (vi)((((vu){}) + (uint32_t)w) >> sh & 1);
}

/* The 16 fields of width W for codes j .. j + 15 of the plane at src, one per lane. */
INLINE vi fields(const uint8_t *src, int j, int W) {
    if (W == 4) {
        const vu sh = {0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28};
        uint32_t w[2];
        memcpy(w, src + j / 2, 8);
        vu x = {w[0], w[0], w[0], w[0], w[0], w[0], w[0], w[0], w[1], w[1], w[1], w[1], w[1], w[1], w[1], w[1]};
        return (vi)((x >> sh) & 15);
    }
    if (W == 2) {
        const vu sh = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};
        uint32_t w;
        memcpy(&w, src + j / 4, 4);
        return (vi)((((vu){}) + w) >> sh & 3);
    }
    return bits16(src, j, (vu){0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15});
}

/* The high bits of 3-bit codes j .. j + 15: their 1-bit plane holds code j at bit PERM3[j % 8] of byte
 * j / 8 (packing.py: codes 0-7 of a byte at bits 0, 1, 4, 5, 2, 3, 6, 7). */
INLINE vi high_bits3(const uint8_t *src, int j) {
    return bits16(src, j, (vu){0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15});
}

/* Codes j .. j + 15 of a part of `dim` codes of `bits` bits whose planes start at src. */
INLINE vi codes16(const uint8_t *src, int dim, int bits, int j) {
    switch (bits) {
    case 4: return fields(src, j, 4);
    case 3: return fields(src, j, 2) | high_bits3(src + dim / 4, j) << 2;
    case 2: return fields(src, j, 2);
    default: return fields(src, j, 1);
    }
}

INLINE vf lookup(vi idx, vf tab) {
#if defined(__clang__)
    vf r;
    for (int i = 0; i < 16; i++) r[i] = tab[idx[i] & 15];
    return r;
#else
    return __builtin_shuffle(tab, idx);
#endif
}

/* Constant lane permutations of one vector (GCC's __builtin_shuffle predates __builtin_shufflevector,
 * which GCC has only from version 12). */
#if defined(__clang__)
#define PERMUTE(v, ...) __builtin_shufflevector(v, v, __VA_ARGS__)
#else
#define PERMUTE(v, ...) __builtin_shuffle(v, (vi){__VA_ARGS__})
#endif

INLINE float hsum(vf v) {
    v += PERMUTE(v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
    v += PERMUTE(v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
    v += PERMUTE(v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
    v += PERMUTE(v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
    return v[0];
}

/* <a, b> of two head vectors held as NV 16-lane vectors. */
INLINE float dot(const vf *a, const vf *b) {
    vf acc = a[0] * b[0];
    for (int k = 1; k < NV; k++) acc += a[k] * b[k];
    return hsum(acc);
}

/* One record -> its rotated values u[NV] (centroids times the part's norm). */
INLINE void decode(const uint8_t *rec, const vf *tabs, vf *u) {
    float n0 = fp16(rec + TQ_P0_SCALE);
    for (int j = 0; j < TQ_P0_DIM; j += 16)
        u[(TQ_P0_CH + j) / 16] = lookup(codes16(rec + TQ_P0_PLANES, TQ_P0_DIM, TQ_P0_BITS, j), tabs[0]) * n0;
#if TQ_PARTS == 2
    float n1 = fp16(rec + TQ_P1_SCALE);
    for (int j = 0; j < TQ_P1_DIM; j += 16)
        u[(TQ_P1_CH + j) / 16] = lookup(codes16(rec + TQ_P1_PLANES, TQ_P1_DIM, TQ_P1_BITS, j), tabs[1]) * n1;
#endif
}

/* The parts' centroids (2^bits floats each, concatenated in part order) as register tables. */
static void load_tables(const float *centroids, vf *tabs) {
    float t[16] = {0};
    memcpy(t, centroids, sizeof(float) << TQ_P0_BITS);
    memcpy(&tabs[0], t, sizeof(vf));
#if TQ_PARTS == 2
    memset(t, 0, sizeof t);
    memcpy(t, centroids + (1 << TQ_P0_BITS), sizeof(float) << TQ_P1_BITS);
    memcpy(&tabs[1], t, sizeof(vf));
#endif
}

/* One call's work: the records, the centroid tables, and its units: every head's tokens in `chunks`
 * ranges, so that two threads share three heads evenly. */
typedef struct {
    const uint8_t *pool;
    const int32_t *table;
    int64_t t0, n, H, BS, R, chunks;
    vf tabs[2];
} job_t;

static job_t job_of(const uint8_t *pool, const int32_t *table, int64_t t0, int64_t n, int64_t H, int64_t BS,
                    int64_t R, const float *centroids, int64_t max_chunks) {
    job_t j = {pool, table, t0, n, H, BS, R, 1, {{0}}};
    load_tables(centroids, j.tabs);
#ifdef _OPENMP
    int64_t threads = omp_get_max_threads();
    if (threads > 1 && n >= 512) {
        j.chunks = threads < max_chunks ? threads : max_chunks;
        while (j.chunks > 1 && n / j.chunks < 256) j.chunks--;
    }
#else
    (void)max_chunks;
#endif
    return j;
}

/* Walks one head's records over a unit's tokens, a block-table lookup per block. */
typedef struct {
    const job_t *j;
    int64_t h, tok;
    const uint8_t *rec;
} cursor_t;

/* Unit `unit` of a job: head *h, token indices [*lo, *hi) of the call's range. */
INLINE cursor_t unit_cursor(const job_t *j, int64_t unit, int64_t *h, int64_t *lo, int64_t *hi) {
    int64_t c = unit % j->chunks;
    *h = unit / j->chunks;
    *lo = j->n * c / j->chunks;
    *hi = j->n * (c + 1) / j->chunks;
    cursor_t cur = {j, *h, j->t0 + *lo, NULL};
    return cur;
}

INLINE const uint8_t *cursor_next(cursor_t *c) {
    const job_t *j = c->j;
    int64_t in_block = c->tok % j->BS;
    if (c->rec == NULL || in_block == 0)
        c->rec = j->pool + (((int64_t)j->table[c->tok / j->BS] * j->H + c->h) * j->BS + in_block) * j->R;
    else
        c->rec += j->R;
    c->tok++;
    return c->rec;
}

/* Scores of tokens [t0, t0 + n) against rotated queries q [H, G, D]: out[(h * G + g) * ld + i] for
 * token t0 + i. */
void tq_scores(const uint8_t *pool, const int32_t *table, int64_t t0, int64_t n, int64_t H, int64_t BS,
               int64_t R, const float *q, const float *centroids, float *out, int64_t ld) {
    const job_t j = job_of(pool, table, t0, n, H, BS, R, centroids, INT64_MAX);
#pragma omp parallel for schedule(static) if (j.chunks * H > 1)
    for (int64_t unit = 0; unit < H * j.chunks; unit++) {
        int64_t h, lo, hi;
        cursor_t cur = unit_cursor(&j, unit, &h, &lo, &hi);
        vf qv[TQ_G][NV];
        memcpy(qv, q + h * TQ_G * TQ_D, sizeof qv);
        float *o = out + h * TQ_G * ld;
        for (int64_t i = lo; i < hi; i++) {
            vf u[NV];
            decode(cursor_next(&cur), j.tabs, u);
            for (int g = 0; g < TQ_G; g++) o[g * ld + i] = dot(u, qv[g]);
        }
    }
}

/* Probabilities p[(h * G + g) * ld + i] of tokens [t0, t0 + n) times their values -> out [H, G, D]
 * (rotated space). work: H * max_chunks * G * D floats of scratch for the units' partial sums. */
void tq_values(const uint8_t *pool, const int32_t *table, int64_t t0, int64_t n, int64_t H, int64_t BS,
               int64_t R, const float *p, int64_t ld, const float *centroids, float *out, float *work,
               int64_t max_chunks) {
    const job_t j = job_of(pool, table, t0, n, H, BS, R, centroids, max_chunks);
#pragma omp parallel for schedule(static) if (j.chunks * H > 1)
    for (int64_t unit = 0; unit < H * j.chunks; unit++) {
        int64_t h, lo, hi;
        cursor_t cur = unit_cursor(&j, unit, &h, &lo, &hi);
        vf acc[TQ_G][NV];
        memset(acc, 0, sizeof acc);
        const float *ph = p + h * TQ_G * ld;
        for (int64_t i = lo; i < hi; i++) {
            vf u[NV];
            decode(cursor_next(&cur), j.tabs, u);
            for (int g = 0; g < TQ_G; g++) {
                float w = ph[g * ld + i];
                for (int k = 0; k < NV; k++) acc[g][k] += w * u[k];
            }
        }
        memcpy(work + unit * TQ_G * TQ_D, acc, sizeof acc);
    }
    for (int64_t h = 0; h < H; h++) {  /* the units' partial sums, in token order */
        float *o = out + h * TQ_G * TQ_D;
        memcpy(o, work + h * j.chunks * TQ_G * TQ_D, sizeof(float) * TQ_G * TQ_D);
        for (int64_t c = 1; c < j.chunks; c++) {
            const float *w = work + (h * j.chunks + c) * TQ_G * TQ_D;
            for (int k = 0; k < TQ_G * TQ_D; k++) o[k] += w[k];
        }
    }
}

/* Rotated values of tokens [t0, t0 + n) -> out [H, n, D] (a prefill chunk's tile, for matmuls). */
void tq_values_rotated(const uint8_t *pool, const int32_t *table, int64_t t0, int64_t n, int64_t H,
                       int64_t BS, int64_t R, const float *centroids, float *out) {
    const job_t j = job_of(pool, table, t0, n, H, BS, R, centroids, INT64_MAX);
#pragma omp parallel for schedule(static) if (j.chunks * H > 1)
    for (int64_t unit = 0; unit < H * j.chunks; unit++) {
        int64_t h, lo, hi;
        cursor_t cur = unit_cursor(&j, unit, &h, &lo, &hi);
        float *o = out + (h * n + lo) * TQ_D;
        for (int64_t i = lo; i < hi; i++, o += TQ_D) {
            vf u[NV];
            decode(cursor_next(&cur), j.tabs, u);
            memcpy(o, u, sizeof u);
        }
    }
}

/* A hot row (sinks, recent window, the new token) as fp32 vectors: bf16 rows are the high halves. */
typedef uint16_t vh __attribute__((vector_size(32)));

INLINE void hot_row(const void *rows, int64_t i, int64_t bf16, vf *x) {
    if (bf16) {
        const uint16_t *r = (const uint16_t *)rows + i * TQ_D;
        for (int k = 0; k < NV; k++) {
            vh a;
            memcpy(&a, r + 16 * k, sizeof a);
            x[k] = (vf)(__builtin_convertvector(a, vu) << 16);
        }
    } else {
        memcpy(x, (const float *)rows + i * TQ_D, sizeof(vf) * NV);
    }
}

INLINE vf select(vi mask, vf a, vf b) { return (vf)((mask & (vi)a) | (~mask & (vi)b)); }

/* e^x on 16 lanes (Cephes' expf: a degree-6 polynomial after 2^n is split off; ~1-2 ulp where the
 * result is a normal float; below e^-87.3 it returns ~1e-38, not 0; NaN stays NaN). */
INLINE vf vexp(vf x) {
    const vf one = (vf){} + 1.f, magic = (vf){} + 12582912.f;  /* 1.5 * 2^23: adding it rounds */
    vf c = select(x > (vf){} + 88.37f, (vf){} + 88.37f, x);
    c = select(c < (vf){} - 87.33f, (vf){} - 87.33f, c);
    vf n = (c * 1.44269504088896341f + magic) - magic;
    vf r = c - n * 0.693359375f + n * 2.12194440e-4f;
    vf y = ((((((vf){} + 1.9875691500e-4f) * r + 1.3981999507e-3f) * r + 8.3334519073e-3f) * r
             + 4.1665795894e-2f) * r + 1.6666665459e-1f) * r + 5.0000001201e-1f;
    y = y * r * r + r + one;
    vi e = (__builtin_convertvector(n, vi) + 127) << 23;
    return select(x != x, x, y * (vf)e);
}

/* A row of scores -> e^(score - max) in place; returns 1 / their sum. */
static float exp_row(float *row, int64_t m) {
    float mx = row[0];
    for (int64_t i = 1; i < m; i++) mx = (row[i] > mx || row[i] != row[i]) ? row[i] : mx;
    vf sum = {0};
    int64_t i = 0;
    for (; i + 16 <= m; i += 16) {
        vf v;
        memcpy(&v, row + i, sizeof v);
        v = vexp(v - mx);
        memcpy(row + i, &v, sizeof v);
        sum += v;
    }
    float tail = 0.f;
    for (; i < m; i++) tail += (row[i] = expf(row[i] - mx));
    return 1.f / (hsum(sum) + tail);
}

/* A decode token's attention weights over one sequence's hot rows and records, and the hot rows'
 * share of its output, in one call (the torch twin's _decode_row spends ~35 small ops a layer on this).
 *   q [H, G, D]: the queries (original space, unscaled); rk [H, D, D]: the keys' rotation
 *     (rotated = rk[h] @ x); scale: the softmax scale.
 *   k_hot / v_hot [H, hs, D] (bf16 when hot_bf16, else fp32): nh valid rows each; k1 / v1 [H, D]: the
 *     token's own key and value, the same dtype.
 *   records of tokens [t0, t0 + n) in pool / table (this library's layout: the keys').
 *   p [H, G, n] out: the records' softmax weights; o_hot [H, G, D] out: sum over the hot rows and
 *   the token of weight * value (original space). scores: H * G * (nh + 1 + n) floats of scratch.
 * The records' values are the caller's (tq_values of the values' layout, then the un-rotation). */
void tq_decode_weights(const float *q, const float *rk, float scale, const void *k_hot, const void *v_hot,
                       int64_t hs, int64_t nh, const void *k1, const void *v1, int64_t hot_bf16,
                       const uint8_t *pool, const int32_t *table, int64_t t0, int64_t n, int64_t H, int64_t BS,
                       int64_t R, const float *centroids, float *scores, float *p, float *o_hot) {
    const int64_t m = nh + 1 + n;  /* a row of scores: hot rows, the token, the records */
    float *q_rot = o_hot;  /* o_hot holds the rotated queries until the records are scored */
    for (int64_t h = 0; h < H; h++) {
        vf qv[TQ_G][NV], x[NV];
        memcpy(qv, q + h * TQ_G * TQ_D, sizeof qv);
        for (int g = 0; g < TQ_G; g++) {
            for (int k = 0; k < NV; k++) qv[g][k] *= scale;
            for (int i = 0; i < TQ_D; i++) {
                memcpy(x, rk + (h * TQ_D + i) * TQ_D, sizeof x);
                q_rot[(h * TQ_G + g) * TQ_D + i] = dot(x, qv[g]);
            }
        }
        for (int64_t i = 0; i <= nh; i++) {
            hot_row(i < nh ? k_hot : k1, i < nh ? h * hs + i : h, hot_bf16, x);
            for (int g = 0; g < TQ_G; g++) scores[(h * TQ_G + g) * m + i] = dot(x, qv[g]);
        }
    }
    if (n > 0)
        tq_scores(pool, table, t0, n, H, BS, R, q_rot, centroids, scores + nh + 1, m);
    float inv_all[H * TQ_G];
#pragma omp parallel for schedule(static) if (H * TQ_G * m >= 16384)
    for (int64_t r = 0; r < H * TQ_G; r++) {  /* each query row's softmax; the records' weights out */
        const float *row = scores + r * m;
        inv_all[r] = exp_row(scores + r * m, m);
        float *pr = p + r * n;
        for (int64_t i = 0; i < n; i++) pr[i] = row[nh + 1 + i] * inv_all[r];
    }
    for (int64_t h = 0; h < H; h++) {
        const float *inv = inv_all + h * TQ_G;
        vf o[TQ_G][NV], x[NV];
        memset(o, 0, sizeof o);
        for (int64_t i = 0; i <= nh; i++) {
            hot_row(i < nh ? v_hot : v1, i < nh ? h * hs + i : h, hot_bf16, x);
            for (int g = 0; g < TQ_G; g++) {
                float w = scores[(h * TQ_G + g) * m + i] * inv[g];
                for (int k = 0; k < NV; k++) o[g][k] += w * x[k];
            }
        }
        memcpy(o_hot + h * TQ_G * TQ_D, o, sizeof o);
    }
}
