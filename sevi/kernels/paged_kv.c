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
 * step), and `restrict` tells gcc that outputs do not alias the cache. The query heads of a KV head
 * (GQA) are taken together, so each K or V tile is loaded once for all of them (q.K of 8 rows x 16 heads
 * x 150 keys, 2 heads per KV head: 18.5 -> 15.5 us, p.V 18.9 -> 12.9; 4 per KV head: 28 -> 17, 32 -> 15).
 * Accumulators are fixed-size arrays: gcc keeps no variable-length array in registers. While a block is
 * streamed the next one is prefetched (prefetch_at). Other layouts take plain loops.
 * Each loop is written once over an element type that is a compile-time constant in every caller
 * (always_inline), so each type gets its own specialised code.
 *
 * vLLM's AMX layout (bfloat16 on CPUs with AMX tiles: cpu_attn_amx.hpp's reshape_and_cache) is no strided
 * view; `et` BF16_AMX reads it in place (sd, sn unused). In one (block, KV head) region of bs * D values:
 *   K of slot n, dim d at (n / 16) * 16 * D + (d / 2) * 32 + (n % 16) * 2 + d % 2: groups of 16 keys, and in
 *     each one 64-byte tile row per pair of dims (d, d + 1), its 16 keys side by side;
 *   V of slot n, dim d at (d / 16) * 16 * bs + (n / 2) * 32 + (d % 16) * 2 + n % 2: groups of 16 dims, and in
 *     each one tile row per pair of keys (n, n + 1), its 16 dims side by side.
 * So a tile row read as 32-bit words holds in word i the pair's two values for key (dim) i, low half first:
 * a shift and a mask widen both to float32, and the loops are the CPU layout's with two FMAs per word.
 * paged_kv.py checks this formula against vLLM's own writer before it takes this path.
 */
#include <stdint.h>
#include <math.h>
#include <string.h>
#if defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif

/* Outputs per register tile: one vector register of AVX-512, or of AVX2 (a 16-float tile built with AVX2
 * only made gcc move every tile through memory: 9x slower). */
#ifdef __AVX512F__
#define CH 16
#else
#define CH 8
#endif
/* GCC/Clang vector extension: a tile as one value (the compiler maps it to the ISA's registers);
 * aligned(4) because cache rows are only float-aligned. */
typedef float tile __attribute__((vector_size(CH * sizeof(float)), aligned(4)));
typedef uint16_t half_tile __attribute__((vector_size(CH * sizeof(uint16_t)), aligned(2)));
typedef uint32_t word_tile __attribute__((vector_size(CH * sizeof(uint32_t))));
typedef int32_t int_tile __attribute__((vector_size(CH * sizeof(int32_t))));
/* Key tiles per span while streaming through a block (one query head: 8 accumulators of AVX-512's 32
 * registers, 4 of AVX2's 16). */
#ifdef __AVX512F__
#define SPAN 8
#else
#define SPAN 4
#endif

enum { F32 = 0, BF16 = 1, F16 = 2, BF16_AMX = 3 };
/* Word tiles per 16-wide group of the AMX layout (16 keys of K, 16 dims of V). */
#define KW (16 / CH)
/* Prefetch hint: 3 = into L1 (2, 1 and 0 measured the same within noise). */
#define PF_LOCALITY 3
#define ALWAYS_INLINE static inline __attribute__((always_inline))

/* Element types this build reads (bit et set): float16 needs the compiler's _Float16. */
int64_t sevi_paged_element_types(void) {
#ifdef __FLT16_MAX__
    return (1 << F32) | (1 << BF16) | (1 << F16) | (1 << BF16_AMX);
#else
    return (1 << F32) | (1 << BF16) | (1 << BF16_AMX);
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
#elif defined(__F16C__) && defined(__AVX__)
        return (tile)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)base + i)));
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

/* Ask for the cache line of element i of the region the loop reads next, which starts at element pf (< 0:
 * none); the loops call it at the offset they are reading in the current region, so the next region
 * arrives one region ahead. Why: the loops stream one block region at a time (16 KB for 128 keys x 32
 * floats) and the hardware prefetcher stops at each page and starts over at each new region; a step's
 * aligned layers read K and V from memory, not cache (8 rows x 650 keys x 8 KV heads: 5 MB each per
 * layer), where q.K ran at 26 GB/s and a plain sequential sum reaches 40 (8 layers in turn, per layer:
 * q.K 205 -> 167 us, p.V 225 -> 157). */
ALWAYS_INLINE void prefetch_at(const void *restrict base, int64_t pf, int64_t i, const int et) {
    if (pf >= 0) __builtin_prefetch((const char *)base + (pf + i) * (et == F32 ? 4 : 2), 0, PF_LOCALITY);
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

/* p[0..w) <- exp(p[0..w) - max) in place; returns their sum (the softmax's denominator: the caller
 * divides the p.V output by it, one multiply per output value instead of one per key). */
static float exp_row(float *restrict p, int64_t w) {
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
    return total;
}

/* K as [D, block]: T tiles of keys from key n0 of the block at kb, for the REP query heads of one KV head
 * at once (q head h at qg + h * D, its scores at o + h * K): each d row of the tiles is read once, in
 * order (one memory stream per block), and serves every head; REP * T accumulator tiles stay in
 * registers. `keep` < T * CH: only the first `keep` scores of the last tile are stored (a partial tile
 * whose slots past the row's keys are still in the block: read, never stored). */
ALWAYS_INLINE void scores_tiles(const float *restrict qg, const void *restrict kc, int64_t kb, int64_t pf, int64_t D,
                                int64_t sd, int64_t n0, float scale, float *restrict o, int64_t K, int64_t keep,
                                const int REP, const int T, const int et) {
    tile acc[16]; /* REP * T of them (a fixed size: gcc keeps no variable-length array in registers) */
    for (int i = 0; i < REP * T; i++) acc[i] = (tile){0};
    for (int64_t d = 0; d < D; d++) {
        const int64_t row = kb + d * sd + n0;
        tile kt[SPAN];
        for (int t = 0; t < T; t++) {
            kt[t] = load_tile(kc, row + t * CH, et);
            prefetch_at(kc, pf, d * sd + n0 + t * CH, et);
        }
        for (int h = 0; h < REP; h++) {
            const float qd = qg[h * D + d];
            for (int t = 0; t < T; t++) acc[h * T + t] += qd * kt[t];
        }
    }
    for (int h = 0; h < REP; h++)
        for (int t = 0; t < T; t++) {
            const tile x = acc[h * T + t] * scale;
            float *dst = o + h * K + n0 + t * CH;
            if ((t + 1) * CH <= keep) memcpy(dst, &x, sizeof x);
            else for (int64_t i = 0; i < keep - t * CH; i++) dst[i] = x[i];
        }
}

/* The first w keys of one block (K as [D, block]) for REP heads: spans of T tiles, then single tiles, then
 * a last partial tile where the block holds it, then one key at a time (blocks that are no whole number
 * of tiles). A short row or a sequence's last block reads only the tiles it needs. */
ALWAYS_INLINE void scores_block(const float *restrict qg, const void *restrict kc, int64_t kb, int64_t pf, int64_t D,
                                int64_t sd, int64_t w, int64_t bs, float scale, float *restrict o, int64_t K,
                                const int REP, const int T, const int et) {
    int64_t n0 = 0;
    for (; n0 + T * CH <= w; n0 += T * CH) scores_tiles(qg, kc, kb, pf, D, sd, n0, scale, o, K, T * CH, REP, T, et);
    for (; n0 + CH <= w; n0 += CH) scores_tiles(qg, kc, kb, pf, D, sd, n0, scale, o, K, CH, REP, 1, et);
    if (n0 < w && n0 + CH <= bs) {
        scores_tiles(qg, kc, kb, pf, D, sd, n0, scale, o, K, w - n0, REP, 1, et);
        return;
    }
    for (int h = 0; h < REP; h++)
        for (int64_t n = n0; n < w; n++) {
            float acc = 0.0f;
            for (int64_t d = 0; d < D; d++) acc += qg[h * D + d] * load_one(kc, kb + d * sd + n, et);
            o[h * K + n] = acc * scale;
        }
}

/* V as [block, D] with D = NT * CH, the REP query heads of one KV head at once (head h's probabilities at
 * ph + h * K, its output at o + h * D): out += sum over the block's first w keys of p[n] * V[n], each key's
 * row read once, in order, into NT tiles that serve every head (REP * NT accumulators in registers). */
ALWAYS_INLINE void values_block(const float *restrict ph, const void *restrict vc, int64_t vb, int64_t pf, int64_t w,
                                int64_t sn, int64_t K, int64_t D, float *restrict o, const int REP, const int NT,
                                const int et) {
    tile acc[16]; /* REP * NT of them */
    for (int i = 0; i < REP * NT; i++) acc[i] = (tile){0};
    for (int64_t n = 0; n < w; n++) {
        const int64_t row = vb + n * sn;
        tile vt[8];
        for (int t = 0; t < NT; t++) {
            vt[t] = load_tile(vc, row + t * CH, et);
            prefetch_at(vc, pf, n * sn + t * CH, et);
        }
        for (int h = 0; h < REP; h++) {
            const float pk = ph[h * K + n];
            for (int t = 0; t < NT; t++) acc[h * NT + t] += pk * vt[t];
        }
    }
    for (int h = 0; h < REP; h++)
        for (int t = 0; t < NT; t++) ((tile *)(o + h * D))[t] += acc[h * NT + t];
}

/* A tile row of the AMX layout as CH words from word i on: both bfloat16 halves of each, as float32. */
ALWAYS_INLINE void load_pairs(const uint16_t *restrict base, int64_t i, tile *lo, tile *hi) {
    word_tile w;
    memcpy(&w, base + 2 * i, sizeof w);
    *lo = (tile)(w << 16);
    *hi = (tile)(w & 0xFFFF0000u);
}

/* AMX K: the scores of one group of 16 keys (from slot n0 of the block, the group at gb) for REP query heads
 * at once: each pair row of the group is read once, in order, and serves every head; `keep` <= 16 scores
 * stored (slots past the row's keys are read, never stored). */
ALWAYS_INLINE void amx_scores_group(const float *restrict qg, const uint16_t *restrict kc, int64_t gb, int64_t pf,
                                    int64_t D, int64_t n0, float scale, float *restrict o, int64_t K, int64_t keep,
                                    const int REP) {
    tile acc[16]; /* REP * KW of them */
    for (int i = 0; i < REP * KW; i++) acc[i] = (tile){0};
    for (int64_t j = 0; j < D / 2; j++) {
        const int64_t row = gb + j * 32;
        prefetch_at(kc, pf, n0 * D + j * 32, BF16);
        for (int t = 0; t < KW; t++) {
            tile lo, hi;
            load_pairs(kc + row, t * CH, &lo, &hi);
            for (int h = 0; h < REP; h++)
                acc[h * KW + t] += qg[h * D + 2 * j] * lo + qg[h * D + 2 * j + 1] * hi;
        }
    }
    for (int h = 0; h < REP; h++)
        for (int t = 0; t < KW; t++) {
            const tile x = acc[h * KW + t] * scale;
            float *dst = o + h * K + n0 + t * CH;
            if ((t + 1) * CH <= keep) memcpy(dst, &x, sizeof x);
            else for (int64_t i = 0; i < keep - t * CH; i++) dst[i] = x[i];
        }
}

/* AMX V: out[16 dims from d0] += sum over the block's first w keys of p[n] * V[n] for REP heads, the group of
 * 16 dims at gb; the key pairs' rows read once, in order. A last odd key takes only its low half (the other
 * slot may hold anything, NaN included, and its probability is not the row's). */
ALWAYS_INLINE void amx_values_group(const float *restrict ph, const uint16_t *restrict vc, int64_t vb, int64_t pf,
                                    int64_t w, int64_t bs, int64_t K, int64_t D, int64_t d0, float *restrict o,
                                    const int REP) {
    const int64_t gb = vb + d0 * bs; /* the group of dims d0 .. d0 + 15: (d0 / 16) * 16 * bs into the region */
    tile acc[16]; /* REP * KW of them */
    for (int i = 0; i < REP * KW; i++) acc[i] = (tile){0};
    int64_t m = 0;
    for (; 2 * m + 1 < w; m++) {
        prefetch_at(vc, pf, d0 * bs + m * 32, BF16);
        for (int t = 0; t < KW; t++) {
            tile lo, hi;
            load_pairs(vc + gb + m * 32, t * CH, &lo, &hi);
            for (int h = 0; h < REP; h++) acc[h * KW + t] += ph[h * K + 2 * m] * lo + ph[h * K + 2 * m + 1] * hi;
        }
    }
    if (2 * m < w)
        for (int t = 0; t < KW; t++) {
            tile lo, hi;
            load_pairs(vc + gb + m * 32, t * CH, &lo, &hi);
            for (int h = 0; h < REP; h++) acc[h * KW + t] += ph[h * K + 2 * m] * lo;
        }
    for (int h = 0; h < REP; h++)
        for (int t = 0; t < KW; t++) {
            tile x;
            float *dst = o + h * D + d0 + t * CH;
            memcpy(&x, dst, sizeof x);
            x += acc[h * KW + t];
            memcpy(dst, &x, sizeof x);
        }
}

/* Query heads per AMX group call: REP * KW accumulators within ACC (defined below). */
#define AMX_CASES(CALL) \
    switch (c) {        \
    case 8: CALL(8); break; \
    case 4: CALL(4); break; \
    case 2: CALL(2); break; \
    default: CALL(1); break; \
    }

/* Query heads of one KV head taken together by the fused loops, at most ACC accumulator tiles in
 * registers (16 of AVX-512's 32, 8 of AVX2's 16, beside the tiles loaded): the largest of 8, 4, 2, 1
 * heads that fits, for `left` heads still to do and `per_head` tiles per head. */
#ifdef __AVX512F__
#define ACC 16
#else
#define ACC 8
#endif
static inline int head_chunk(int64_t left, int64_t per_head) {
    for (int c = 8; c > 1; c /= 2)
        if (c <= left && c * per_head <= ACC) return c;
    return 1;
}

/* Key tiles per span for c heads at once: as many as fit beside their accumulators, at most SPAN. */
#define TILES(c) (ACC / (c) >= SPAN ? SPAN : ACC / (c) >= 1 ? ACC / (c) : 1)

/* Where the region after (r, g, block j) starts (the next block of the row's head, else the first block of
 * its next head or row), for prefetching; -1 after the last. */
static inline int64_t next_region(const int64_t *restrict blocks, const int64_t *restrict lens, int64_t r, int64_t g,
                                  int64_t j, int64_t R, int64_t nb, int64_t G, int64_t bs, int64_t K, int64_t sb,
                                  int64_t sg) {
    const int64_t Kr = lens && lens[r] < K ? lens[r] : K;
    if (j + 1 < nb && (j + 1) * bs < Kr) return blocks[r * nb + j + 1] * sb + g * sg;
    if (g + 1 < G) return blocks[r * nb] * sb + (g + 1) * sg;
    if (r + 1 < R) return blocks[(r + 1) * nb] * sb;
    return -1;
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
                const int64_t pf = next_region(blocks, lens, r, g, j, R, nb, G, bs, K, sb, sg);
                if (et == BF16_AMX) { /* AMX tiles: groups of 16 keys, several heads per pass */
                    for (int64_t n0 = 0; n0 < w; n0 += 16)
                        for (int64_t h = 0; h < rep;) {
                            const int c = head_chunk(rep - h, KW);
                            const int64_t keep = w - n0 < 16 ? w - n0 : 16;
#define AMX_SCORES(C) amx_scores_group(qg + h * D, kc, kb + n0 * D, pf, D, n0, scale, og + h * K + k0, K, keep, C)
                            AMX_CASES(AMX_SCORES)
#undef AMX_SCORES
                            h += c;
                        }
                } else if (sn == 1) { /* K as [D, block] (the CPU layout): each K tile loaded once for several heads */
                    for (int64_t h = 0; h < rep;) {
                        const int c = head_chunk(rep - h, 1);
                        const float *qh = qg + h * D;
                        float *o = og + h * K + k0;
                        switch (c) { /* a constant head count per case: the accumulators stay in registers */
                        case 8: scores_block(qh, kc, kb, pf, D, sd, w, bs, scale, o, K, 8, TILES(8), et); break;
                        case 4: scores_block(qh, kc, kb, pf, D, sd, w, bs, scale, o, K, 4, TILES(4), et); break;
                        case 2: scores_block(qh, kc, kb, pf, D, sd, w, bs, scale, o, K, 2, TILES(2), et); break;
                        default: scores_block(qh, kc, kb, pf, D, sd, w, bs, scale, o, K, 1, TILES(1), et); break;
                        }
                        h += c;
                    }
                } else { /* K as [block, D]: one dot product per key */
                    for (int64_t h = 0; h < rep; h++)
                        for (int64_t n = 0; n < w; n++) {
                            float acc = 0.0f;
                            for (int64_t d = 0; d < D; d++)
                                acc += qg[h * D + d] * load_one(kc, kb + n * sn + d * sd, et);
                            og[h * K + k0 + n] = acc * scale;
                        }
                }
            }
        }
    }
}

/* values_block on the next heads of a KV head for nt <= 8 tiles of their D values (from vb, pf and o on), as many
 * of the `left` heads as one case takes (the count is returned): head count and tile count are constants in
 * each case, so the accumulators stay in registers; one head at a time for the pairs without a case. */
ALWAYS_INLINE int values_heads(const float *restrict ph, const void *restrict vc, int64_t vb, int64_t pf, int64_t w,
                               int64_t sn, int64_t K, int64_t D, float *restrict o, int64_t nt, int64_t left,
                               const int et) {
#define VB(C, NT) do { values_block(ph, vc, vb, pf, w, sn, K, D, o, C, NT, et); return C; } while (0)
    switch (head_chunk(left, nt) * 16 + nt) {
    case 8 * 16 + 1: VB(8, 1);
    case 8 * 16 + 2: VB(8, 2);
    case 4 * 16 + 1: VB(4, 1);
    case 4 * 16 + 2: VB(4, 2);
    case 4 * 16 + 4: VB(4, 4);
    case 2 * 16 + 1: VB(2, 1);
    case 2 * 16 + 2: VB(2, 2);
    case 2 * 16 + 4: VB(2, 4);
    case 2 * 16 + 8: VB(2, 8);
    default: break;
    }
    switch (nt) {
    case 1: VB(1, 1);
    case 2: VB(1, 2);
    case 3: VB(1, 3);
    case 4: VB(1, 4);
    case 5: VB(1, 5);
    case 6: VB(1, 6);
    case 7: VB(1, 7);
    default: VB(1, 8);
    }
#undef VB
}

/* out[r][g][h][:] = sum_k p[r][g*rep+h][k] * V(r, g, k), k < lens[r]. With `normalize`, p holds scores:
 * each row's keys are first turned into exp(score - max) in place (the row is in L1 then: one pass over
 * the scores from memory instead of torch's softmax making its own), and the outputs are divided by
 * their sum: the softmax, without a pass to normalise p itself. */
ALWAYS_INLINE void values(float *restrict p, const void *restrict vc, const int64_t *restrict blocks,
                          const int64_t *restrict lens, int64_t R, int64_t nb, int64_t G, int64_t rep, int64_t D,
                          int64_t bs, int64_t K, int64_t sb, int64_t sg, int64_t sn, int64_t sd, float *restrict out,
                          int64_t normalize, const int et) {
    for (int64_t r = 0; r < R; r++) {
        const int64_t Kr = lens && lens[r] < K ? lens[r] : K;
        for (int64_t g = 0; g < G; g++) {
            float *pg = p + (r * G + g) * rep * K;
            float *og = out + (r * G + g) * rep * D;
            float total[rep]; /* each head's softmax denominator, with `normalize` */
            for (int64_t h = 0; h < rep; h++) total[h] = normalize ? exp_row(pg + h * K, Kr) : 1.0f;
            for (int64_t i = 0; i < rep * D; i++) og[i] = 0.0f;
            for (int64_t j = 0; j < nb && j * bs < Kr; j++) {
                const int64_t k0 = j * bs;
                const int64_t w = Kr - k0 < bs ? Kr - k0 : bs;
                const int64_t vb = blocks[r * nb + j] * sb + g * sg;
                const int64_t pf = next_region(blocks, lens, r, g, j, R, nb, G, bs, K, sb, sg);
                if (et == BF16_AMX) { /* AMX tiles: groups of 16 dims, several heads per pass */
                    for (int64_t d0 = 0; d0 < D; d0 += 16)
                        for (int64_t h = 0; h < rep;) {
                            const int c = head_chunk(rep - h, KW);
#define AMX_VALUES(C) amx_values_group(pg + h * K + k0, vc, vb, pf, w, bs, K, D, d0, og + h * D, C)
                            AMX_CASES(AMX_VALUES)
#undef AMX_VALUES
                            h += c;
                        }
                    continue;
                }
                if (sd == 1 && D % CH == 0) { /* the CPU layout: stream through the block, each V row loaded
                                                 once for several heads, 8 tiles of it at a time */
                    for (int64_t d0 = 0; d0 < D; d0 += 8 * CH) {
                        const int64_t nt = (D - d0) / CH < 8 ? (D - d0) / CH : 8;
                        const int64_t pf0 = pf < 0 ? pf : pf + d0;
                        for (int64_t h = 0; h < rep;)
                            h += values_heads(pg + h * K + k0, vc, vb + d0, pf0, w, sn, K, D, og + h * D + d0, nt,
                                              rep - h, et);
                    }
                    continue;
                }
                for (int64_t h = 0; h < rep; h++) /* any other layout: one dot product per output value */
                    for (int64_t d = 0; d < D; d++) {
                        float acc = 0.0f;
                        for (int64_t n = 0; n < w; n++)
                            acc += pg[h * K + k0 + n] * load_one(vc, vb + n * sn + d * sd, et);
                        og[h * D + d] += acc;
                    }
            }
            for (int64_t h = 0; h < rep; h++) /* the softmax's division, on D outputs instead of Kr keys */
                if (normalize && total[h] > 0.0f) {
                    const float inv = 1.0f / total[h];
                    for (int64_t d = 0; d < D; d++) og[h * D + d] *= inv;
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
    case BF16_AMX: scores(q, kc, blocks, lens, R, nb, G, rep, D, bs, K, sb, sg, 0, 0, scale, out, BF16_AMX); break;
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
    case BF16_AMX:
        values(p, vc, blocks, lens, R, nb, G, rep, D, bs, K, sb, sg, 0, 0, out, normalize, BF16_AMX);
        break;
#ifdef __FLT16_MAX__
    case F16: values(p, vc, blocks, lens, R, nb, G, rep, D, bs, K, sb, sg, sn, sd, out, normalize, F16); break;
#endif
    default: values(p, vc, blocks, lens, R, nb, G, rep, D, bs, K, sb, sg, sn, sd, out, normalize, F32); break;
    }
}
