/* Paged q.K and p.V for the aligned rows, read in place from vLLM's block cache (no gathered copy).
 *
 * Built on first use by paged_kernel.py (gcc -O3 -shared); rows.py falls back to its gather + bmm
 * path when no compiler is there. The cache holds float32, bfloat16 or float16 values (`et`, read as
 * float32, half the bytes for the 16-bit ones); queries, probabilities and outputs are float32. A cache
 * view is addressed by element strides: key (block, kv head, d, n) at b*sb + g*sg + d*sd + n*sn,
 * likewise for values, so both the CPU kernel's layout (K as [D, block], V as [block, D]) and
 * row-major layouts are read as they lie.
 *
 * Row r reads blocks blocks[r*nb .. r*nb+nb-1]; key k of a row lies in its block k / bs at slot k % bs.
 * Rows are K keys wide, of which row r reads its first lens[r] (its causal keys; all K when lens is
 * NULL): rows of different lengths in one batch read only their own keys. Scores past a row's length
 * are written as 0 (the caller's key mask drops them); their probabilities must be 0 and are not read.
 * Query head h of KV head g is q[r][g][h] (GQA: rep query heads per KV head share its K and V).
 *
 * Speed: the CPU layout's loops keep a tile of CH outputs in a local accumulator across the whole
 * reduction (gcc keeps it in vector registers: one load and one FMA per input vector, no store per
 * step), and `restrict` tells gcc that outputs do not alias the cache. Other layouts take plain loops.
 * Each loop is written once over an element type that is a compile-time constant in every caller
 * (always_inline), so each type gets its own specialised code.
 */
#include <stdint.h>
#include <math.h>
#include <string.h>
#if defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif

#define CH 16 /* outputs per register tile: one AVX-512 vector or two AVX2 vectors */
/* GCC/Clang vector extension: a tile as one value (the compiler maps it to the ISA's registers);
 * aligned(4) because cache rows are only float-aligned. */
typedef float tile __attribute__((vector_size(CH * sizeof(float)), aligned(4)));
typedef uint16_t half_tile __attribute__((vector_size(CH * sizeof(uint16_t)), aligned(2)));
typedef uint32_t word_tile __attribute__((vector_size(CH * sizeof(uint32_t))));
typedef int32_t int_tile __attribute__((vector_size(CH * sizeof(int32_t))));
/* Tiles accumulated at once while streaming through a block: as many as the vector registers hold
 * (8 x 512 bits of AVX-512's 32 registers; 4 x 2 x 256 bits of AVX2's 16). */
#ifdef __AVX512F__
#define SPAN 8
#else
#define SPAN 4
#endif

enum { F32 = 0, BF16 = 1, F16 = 2 };
#define ALWAYS_INLINE static inline __attribute__((always_inline))

/* Element types this build reads (bit et set): float16 needs the compiler's _Float16. */
int64_t sevi_paged_element_types(void) {
#ifdef __FLT16_MAX__
    return (1 << F32) | (1 << BF16) | (1 << F16);
#else
    return (1 << F32) | (1 << BF16);
#endif
}

/* CH cache values from element i on, as float32. bfloat16 is the top half of a float32. */
ALWAYS_INLINE tile load_tile(const void *restrict base, int64_t i, const int et) {
    if (et == BF16) {
        const half_tile h = *(const half_tile *)((const uint16_t *)base + i);
        return (tile)(__builtin_convertvector(h, word_tile) << 16);
    }
#ifdef __FLT16_MAX__
    if (et == F16) {
#if defined(__AVX512F__)
        return (tile)_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)base + i)));
#else
        tile t;
        for (int j = 0; j < CH; j++) t[j] = (float)((const _Float16 *)base)[i + j];
        return t;
#endif
    }
#endif
    return *(const tile *)((const float *)base + i);
}

ALWAYS_INLINE float load_one(const void *restrict base, int64_t i, const int et) {
    if (et == BF16) {
        const uint32_t w = (uint32_t)((const uint16_t *)base)[i] << 16;
        float f;
        memcpy(&f, &w, sizeof f);
        return f;
    }
#ifdef __FLT16_MAX__
    if (et == F16) return (float)((const _Float16 *)base)[i];
#endif
    return ((const float *)base)[i];
}

/* exp(x) for x <= 0 (a score minus its row's max): 2^n * e^r with x = n ln2 + r, |r| <= ln2 / 2, e^r by
 * its degree-7 Taylor polynomial (relative error about 1e-8, below float32's rounding); exactly 0 below
 * -87 (masked keys, MASKED minus the max), where 2^n would leave the float range. */
ALWAYS_INLINE tile exp_tile(tile x) {
    const int_tile keep = x > -87.0f; /* -1 (all bits) where x is in range */
    x = (tile)(((int_tile)x & keep) | ((int_tile)((tile){0} - 87.0f) & ~keep));
    const int_tile n = __builtin_convertvector(x * 1.44269504088896341f - 0.5f, int_tile); /* round, x <= 0 */
    const tile nf = __builtin_convertvector(n, tile);
    const tile r = (x - nf * 0.693145751953125f) - nf * 1.428606765330187e-06f; /* ln 2, split: exact n ln2 */
    tile e = 1.0f / 5040 + r * (1.0f / 40320);
    e = 1.0f / 720 + r * e;
    e = 1.0f / 120 + r * e;
    e = 1.0f / 24 + r * e;
    e = 1.0f / 6 + r * e;
    e = 0.5f + r * e;
    e = 1.0f + r * e;
    e = 1.0f + r * e;
    const int_tile two_n = (n + 127) << 23; /* 2^n as float bits, n >= -126 */
    return (tile)((int_tile)(e * (tile)two_n) & keep);
}

/* p[0..w) <- softmax(p[0..w)) in place. */
static void softmax_row(float *restrict p, int64_t w) {
    /* The max a tile at a time (gcc does not vectorise a float max reduction without -ffast-math). */
    tile top = (tile){0} - INFINITY;
    int64_t k = 0;
    for (; k + CH <= w; k += CH) {
        tile x;
        memcpy(&x, p + k, sizeof x);
        const int_tile more = x > top;
        top = (tile)(((int_tile)x & more) | ((int_tile)top & ~more));
    }
    float m = -INFINITY;
    for (int i = 0; i < CH; i++) m = top[i] > m ? top[i] : m;
    for (; k < w; k++) m = p[k] > m ? p[k] : m;
    tile sum = {0};
    k = 0;
    for (; k + CH <= w; k += CH) {
        tile x;
        memcpy(&x, p + k, sizeof x);
        x = exp_tile(x - m);
        memcpy(p + k, &x, sizeof x);
        sum += x;
    }
    if (k < w) { /* the tail, through a padded tile */
        tile x = (tile){0} - INFINITY;
        memcpy(&x, p + k, (size_t)(w - k) * sizeof(float));
        x = exp_tile(x - m);
        memcpy(p + k, &x, (size_t)(w - k) * sizeof(float));
        sum += x;
    }
    float total = 0.0f;
    for (int i = 0; i < CH; i++) total += sum[i];
    const float inv = 1.0f / total;
    for (k = 0; k < w; k++) p[k] *= inv;
}

/* K as [D, block], a span of SPAN * CH keys from key s0 of the block at kb, all of them the row's: each
 * d row of the span is read once, in order (one memory stream per block), into SPAN register tiles. */
ALWAYS_INLINE void scores_span(const float *restrict qh, const void *restrict kc, int64_t kb, int64_t D,
                               int64_t sd, int64_t s0, float scale, float *restrict o, const int et) {
    tile acc[SPAN];
    for (int t = 0; t < SPAN; t++) acc[t] = (tile){0};
    for (int64_t d = 0; d < D; d++) {
        const float qd = qh[d];
        const int64_t row = kb + d * sd + s0;
        for (int t = 0; t < SPAN; t++) acc[t] += qd * load_tile(kc, row + t * CH, et);
    }
    for (int t = 0; t < SPAN; t++) ((tile *)(o + s0))[t] = acc[t] * scale;
}

/* V as [block, D] with D = NT * CH: out[:] += sum over the block's first w keys of p[n] * V[n], each
 * key's row read once, in order, into NT register tiles. */
ALWAYS_INLINE void values_block(const float *restrict ph, const void *restrict vc, int64_t vb, int64_t w,
                                int64_t sn, float *restrict o, const int NT, const int et) {
    tile acc[8];
    for (int t = 0; t < NT; t++) acc[t] = (tile){0};
    for (int64_t n = 0; n < w; n++) {
        const float pk = ph[n];
        const int64_t row = vb + n * sn;
        for (int t = 0; t < NT; t++) acc[t] += pk * load_tile(vc, row + t * CH, et);
    }
    for (int t = 0; t < NT; t++) ((tile *)o)[t] += acc[t];
}

/* out[r][g*rep+h][k] = scale * (q[r][g][h] . K(r, g, k)), k < lens[r]; 0 for lens[r] <= k < K */
ALWAYS_INLINE void scores(const float *restrict q, const void *restrict kc, const int64_t *restrict blocks,
                          const int64_t *restrict lens, int64_t R, int64_t nb, int64_t G, int64_t rep, int64_t D,
                          int64_t bs, int64_t K, int64_t sb, int64_t sg, int64_t sd, int64_t sn, float scale,
                          float *restrict out, const int et) {
    for (int64_t r = 0; r < R; r++) {
        const int64_t Kr = lens && lens[r] < K ? lens[r] : K;
        for (int64_t g = 0; g < G; g++) {
            const float *qg = q + (r * G + g) * rep * D;
            float *og = out + (r * G + g) * rep * K;
            for (int64_t h = 0; h < rep; h++)
                for (int64_t k = Kr; k < K; k++) og[h * K + k] = 0.0f;
            for (int64_t j = 0; j < nb && j * bs < Kr; j++) {
                const int64_t k0 = j * bs;
                const int64_t w = Kr - k0 < bs ? Kr - k0 : bs;
                const int64_t kb = blocks[r * nb + j] * sb + g * sg;
                for (int64_t h = 0; h < rep; h++) {
                    const float *qh = qg + h * D;
                    float *o = og + h * K + k0;
                    if (sn == 1) { /* K as [D, block] (the CPU layout) */
                        int64_t n0 = 0;
                        /* Whole spans of the row's keys first; the rest a tile of CH keys at a time, so a
                         * short row reads only the tiles it needs, not a whole span of the block. */
                        if (bs % (SPAN * CH) == 0)
                            for (; n0 + SPAN * CH <= w; n0 += SPAN * CH)
                                scores_span(qh, kc, kb, D, sd, n0, scale, o, et);
                        for (; n0 + CH <= w; n0 += CH) {
                            tile acc = {0};
                            for (int64_t d = 0; d < D; d++) acc += qh[d] * load_tile(kc, kb + d * sd + n0, et);
                            *(tile *)(o + n0) = acc * scale;
                        }
                        if (n0 < w && n0 + CH <= bs) { /* last, partial tile: the slots past w are in the
                                                           block (never NaN-checked, never stored) */
                            tile acc = {0};
                            for (int64_t d = 0; d < D; d++) acc += qh[d] * load_tile(kc, kb + d * sd + n0, et);
                            acc *= scale;
                            for (int64_t i = 0; i < w - n0; i++) o[n0 + i] = acc[i];
                        } else if (n0 < w) {
                            for (int64_t n = n0; n < w; n++) {
                                float acc = 0.0f;
                                for (int64_t d = 0; d < D; d++) acc += qh[d] * load_one(kc, kb + d * sd + n, et);
                                o[n] = acc * scale;
                            }
                        }
                    } else { /* K as [block, D]: one dot product per key */
                        for (int64_t n = 0; n < w; n++) {
                            float acc = 0.0f;
                            for (int64_t d = 0; d < D; d++) acc += qh[d] * load_one(kc, kb + n * sn + d * sd, et);
                            o[n] = acc * scale;
                        }
                    }
                }
            }
        }
    }
}

/* out[r][g][h][:] = sum_k p[r][g*rep+h][k] * V(r, g, k), k < lens[r]. With `normalize`, p holds scores
 * and is first turned into their softmax over each row's keys, in place (the row is in L1 then: one
 * pass over the scores from memory instead of torch's softmax making its own). */
ALWAYS_INLINE void values(float *restrict p, const void *restrict vc, const int64_t *restrict blocks,
                          const int64_t *restrict lens, int64_t R, int64_t nb, int64_t G, int64_t rep, int64_t D,
                          int64_t bs, int64_t K, int64_t sb, int64_t sg, int64_t sn, int64_t sd, float *restrict out,
                          int64_t normalize, const int et) {
    for (int64_t r = 0; r < R; r++) {
        const int64_t Kr = lens && lens[r] < K ? lens[r] : K;
        for (int64_t g = 0; g < G; g++) {
            float *pg = p + (r * G + g) * rep * K;
            float *og = out + (r * G + g) * rep * D;
            if (normalize)
                for (int64_t h = 0; h < rep; h++) softmax_row(pg + h * K, Kr);
            for (int64_t i = 0; i < rep * D; i++) og[i] = 0.0f;
            for (int64_t j = 0; j < nb && j * bs < Kr; j++) {
                const int64_t k0 = j * bs;
                const int64_t w = Kr - k0 < bs ? Kr - k0 : bs;
                const int64_t vb = blocks[r * nb + j] * sb + g * sg;
                for (int64_t h = 0; h < rep; h++) {
                    const float *ph = pg + h * K + k0;
                    float *o = og + h * D;
                    if (sd == 1 && D % CH == 0 && D / CH <= 8) { /* the CPU layout: stream through the block */
                        switch (D / CH) { /* a constant tile count per case: the tiles stay in registers */
                        case 1: values_block(ph, vc, vb, w, sn, o, 1, et); break;
                        case 2: values_block(ph, vc, vb, w, sn, o, 2, et); break;
                        case 3: values_block(ph, vc, vb, w, sn, o, 3, et); break;
                        case 4: values_block(ph, vc, vb, w, sn, o, 4, et); break;
                        case 5: values_block(ph, vc, vb, w, sn, o, 5, et); break;
                        case 6: values_block(ph, vc, vb, w, sn, o, 6, et); break;
                        case 7: values_block(ph, vc, vb, w, sn, o, 7, et); break;
                        default: values_block(ph, vc, vb, w, sn, o, 8, et); break;
                        }
                    } else if (sd == 1 && D % CH == 0) { /* V as [block, D]: a tile of CH values, accumulated over keys */
                        for (int64_t d0 = 0; d0 < D; d0 += CH) {
                            tile acc = {0};
                            for (int64_t n = 0; n < w; n++) acc += ph[n] * load_tile(vc, vb + n * sn + d0, et);
                            *(tile *)(o + d0) += acc;
                        }
                    } else { /* any other layout: one dot product per output value */
                        for (int64_t d = 0; d < D; d++) {
                            float acc = 0.0f;
                            for (int64_t n = 0; n < w; n++) acc += ph[n] * load_one(vc, vb + n * sn + d * sd, et);
                            o[d] += acc;
                        }
                    }
                }
            }
        }
    }
}

/* The exported entries: one specialised copy of each loop per element type. */
void sevi_paged_scores(const float *restrict q, const void *restrict kc, const int64_t *restrict blocks,
                       const int64_t *restrict lens, int64_t et, int64_t R, int64_t nb, int64_t G, int64_t rep,
                       int64_t D, int64_t bs, int64_t K, int64_t sb, int64_t sg, int64_t sd, int64_t sn, float scale,
                       float *restrict out) {
    switch (et) {
    case BF16: scores(q, kc, blocks, lens, R, nb, G, rep, D, bs, K, sb, sg, sd, sn, scale, out, BF16); break;
#ifdef __FLT16_MAX__
    case F16: scores(q, kc, blocks, lens, R, nb, G, rep, D, bs, K, sb, sg, sd, sn, scale, out, F16); break;
#endif
    default: scores(q, kc, blocks, lens, R, nb, G, rep, D, bs, K, sb, sg, sd, sn, scale, out, F32); break;
    }
}

void sevi_paged_values(float *restrict p, const void *restrict vc, const int64_t *restrict blocks,
                       const int64_t *restrict lens, int64_t et, int64_t R, int64_t nb, int64_t G, int64_t rep,
                       int64_t D, int64_t bs, int64_t K, int64_t sb, int64_t sg, int64_t sn, int64_t sd,
                       float *restrict out, int64_t normalize) {
    switch (et) {
    case BF16: values(p, vc, blocks, lens, R, nb, G, rep, D, bs, K, sb, sg, sn, sd, out, normalize, BF16); break;
#ifdef __FLT16_MAX__
    case F16: values(p, vc, blocks, lens, R, nb, G, rep, D, bs, K, sb, sg, sn, sd, out, normalize, F16); break;
#endif
    default: values(p, vc, blocks, lens, R, nb, G, rep, D, bs, K, sb, sg, sn, sd, out, normalize, F32); break;
    }
}
