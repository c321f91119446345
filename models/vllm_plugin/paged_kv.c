/* Paged q.K and p.V for the aligned rows, read in place from vLLM's block cache (no gathered copy).
 *
 * Built on first use by paged_kernel.py (gcc -O3 -shared); rows.py falls back to its gather + bmm
 * path when no compiler is there. float32 only. A cache view is addressed by element strides: key
 * (block, kv head, d, n) at b*sb + g*sg + d*sd + n*sn, likewise for values, so both the CPU kernel's
 * layout (K as [D, block], V as [block, D]) and row-major layouts are read as they lie.
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
 */
#include <stdint.h>

#define CH 16 /* outputs per register tile: one AVX-512 vector or two AVX2 vectors */
/* GCC/Clang vector extension: a tile as one value (the compiler maps it to the ISA's registers);
 * aligned(4) because cache rows are only float-aligned. */
typedef float tile __attribute__((vector_size(CH * sizeof(float)), aligned(4)));
/* Tiles accumulated at once while streaming through a block: as many as the vector registers hold
 * (8 x 512 bits of AVX-512's 32 registers; 4 x 2 x 256 bits of AVX2's 16). */
#ifdef __AVX512F__
#define SPAN 8
#else
#define SPAN 4
#endif

/* K as [D, block], a span of SPAN * CH keys from key s0 of the block, all inside it: each d row of the
 * span is read once, in order (one memory stream per block), into SPAN register tiles. */
static inline void scores_span(const float *restrict qh, const float *restrict kb, int64_t D, int64_t sd,
                               int64_t s0, int64_t m, float scale, float *restrict o) {
    tile acc[SPAN];
    for (int t = 0; t < SPAN; t++) acc[t] = (tile){0};
    for (int64_t d = 0; d < D; d++) {
        const float qd = qh[d];
        const tile *row = (const tile *)(kb + d * sd + s0);
        for (int t = 0; t < SPAN; t++) acc[t] += qd * row[t];
    }
    if (m == SPAN * CH) {
        for (int t = 0; t < SPAN; t++) ((tile *)(o + s0))[t] = acc[t] * scale;
    } else { /* the keys past m are in the block but not the sequence's: computed, not stored */
        for (int64_t i = 0; i < m; i++) o[s0 + i] = acc[i / CH][i % CH] * scale;
    }
}

/* V as [block, D] with D = NT * CH: out[:] += sum over the block's first w keys of p[n] * V[n], each
 * key's row read once, in order, into NT register tiles. */
static inline __attribute__((always_inline)) void values_block(const float *restrict ph, const float *restrict vb,
                                                                int64_t w, int64_t sn, float *restrict o,
                                                                const int NT) {
    tile acc[8];
    for (int t = 0; t < NT; t++) acc[t] = (tile){0};
    for (int64_t n = 0; n < w; n++) {
        const float pk = ph[n];
        const tile *row = (const tile *)(vb + n * sn);
        for (int t = 0; t < NT; t++) acc[t] += pk * row[t];
    }
    for (int t = 0; t < NT; t++) ((tile *)o)[t] += acc[t];
}

/* out[r][g*rep+h][k] = scale * (q[r][g][h] . K(r, g, k)), k < lens[r]; 0 for lens[r] <= k < K */
void sevi_paged_scores(const float *restrict q, const float *restrict kc, const int64_t *restrict blocks,
                       const int64_t *restrict lens, int64_t R, int64_t nb, int64_t G, int64_t rep, int64_t D,
                       int64_t bs, int64_t K, int64_t sb, int64_t sg, int64_t sd, int64_t sn, float scale,
                       float *restrict out) {
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
                const float *kb = kc + blocks[r * nb + j] * sb + g * sg;
                for (int64_t h = 0; h < rep; h++) {
                    const float *qh = qg + h * D;
                    float *o = og + h * K + k0;
                    if (sn == 1 && bs % (SPAN * CH) == 0) { /* the CPU layout, blocks of whole spans */
                        for (int64_t s0 = 0; s0 < w; s0 += SPAN * CH)
                            scores_span(qh, kb, D, sd, s0, w - s0 < SPAN * CH ? w - s0 : SPAN * CH, scale, o);
                    } else if (sn == 1) { /* K as [D, block]: a tile of CH keys, accumulated over d */
                        int64_t n0 = 0;
                        for (; n0 + CH <= w; n0 += CH) {
                            tile acc = {0};
                            for (int64_t d = 0; d < D; d++) acc += qh[d] * *(const tile *)(kb + d * sd + n0);
                            *(tile *)(o + n0) = acc * scale;
                        }
                        if (n0 < w && n0 + CH <= bs) { /* last, partial tile: the slots past w are in the
                                                           block (never NaN-checked, never stored) */
                            tile acc = {0};
                            for (int64_t d = 0; d < D; d++) acc += qh[d] * *(const tile *)(kb + d * sd + n0);
                            acc *= scale;
                            for (int64_t i = 0; i < w - n0; i++) o[n0 + i] = acc[i];
                        } else if (n0 < w) {
                            for (int64_t n = n0; n < w; n++) {
                                float acc = 0.0f;
                                for (int64_t d = 0; d < D; d++) acc += qh[d] * kb[d * sd + n];
                                o[n] = acc * scale;
                            }
                        }
                    } else { /* K as [block, D]: one dot product per key */
                        for (int64_t n = 0; n < w; n++) {
                            const float *kr = kb + n * sn;
                            float acc = 0.0f;
                            for (int64_t d = 0; d < D; d++) acc += qh[d] * kr[d * sd];
                            o[n] = acc * scale;
                        }
                    }
                }
            }
        }
    }
}

/* out[r][g][h][:] = sum_k p[r][g*rep+h][k] * V(r, g, k), k < lens[r] */
void sevi_paged_values(const float *restrict p, const float *restrict vc, const int64_t *restrict blocks,
                       const int64_t *restrict lens, int64_t R, int64_t nb, int64_t G, int64_t rep, int64_t D,
                       int64_t bs, int64_t K, int64_t sb, int64_t sg, int64_t sn, int64_t sd, float *restrict out) {
    for (int64_t r = 0; r < R; r++) {
        const int64_t Kr = lens && lens[r] < K ? lens[r] : K;
        for (int64_t g = 0; g < G; g++) {
            const float *pg = p + (r * G + g) * rep * K;
            float *og = out + (r * G + g) * rep * D;
            for (int64_t i = 0; i < rep * D; i++) og[i] = 0.0f;
            for (int64_t j = 0; j < nb && j * bs < Kr; j++) {
                const int64_t k0 = j * bs;
                const int64_t w = Kr - k0 < bs ? Kr - k0 : bs;
                const float *vb = vc + blocks[r * nb + j] * sb + g * sg;
                for (int64_t h = 0; h < rep; h++) {
                    const float *ph = pg + h * K + k0;
                    float *o = og + h * D;
                    if (sd == 1 && D % CH == 0 && D / CH <= 8) { /* the CPU layout: stream through the block */
                        switch (D / CH) { /* a constant tile count per case: the tiles stay in registers */
                        case 1: values_block(ph, vb, w, sn, o, 1); break;
                        case 2: values_block(ph, vb, w, sn, o, 2); break;
                        case 3: values_block(ph, vb, w, sn, o, 3); break;
                        case 4: values_block(ph, vb, w, sn, o, 4); break;
                        case 5: values_block(ph, vb, w, sn, o, 5); break;
                        case 6: values_block(ph, vb, w, sn, o, 6); break;
                        case 7: values_block(ph, vb, w, sn, o, 7); break;
                        default: values_block(ph, vb, w, sn, o, 8); break;
                        }
                    } else if (sd == 1 && D % CH == 0) { /* V as [block, D]: a tile of CH values, accumulated over keys */
                        for (int64_t d0 = 0; d0 < D; d0 += CH) {
                            tile acc = {0};
                            for (int64_t n = 0; n < w; n++) acc += ph[n] * *(const tile *)(vb + n * sn + d0);
                            *(tile *)(o + d0) += acc;
                        }
                    } else { /* any other layout: one dot product per output value */
                        for (int64_t d = 0; d < D; d++) {
                            const float *vr = vb + d * sd;
                            float acc = 0.0f;
                            for (int64_t n = 0; n < w; n++) acc += ph[n] * vr[n * sn];
                            o[d] += acc;
                        }
                    }
                }
            }
        }
    }
}
