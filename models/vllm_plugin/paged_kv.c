/* Paged q.K and p.V for the aligned rows, read in place from vLLM's block cache (no gathered copy).
 *
 * Built on first use by paged_kernel.py (gcc -O3 -shared); rows.py falls back to its gather + bmm
 * path when no compiler is there. float32 only. A cache view is addressed by element strides: key
 * (block, kv head, d, n) at b*sb + g*sg + d*sd + n*sn, likewise for values, so both the AVX2 CPU
 * layout (K as [D, block], V as [block, D]) and row-major layouts are read as they lie.
 *
 * Row r reads blocks blocks[r*nb .. r*nb+nb-1]; key k of a row lies in its block k / bs at slot k % bs.
 * Query head h of KV head g is q[r][g][h] (GQA: rep query heads per KV head share its K and V).
 */
#include <stdint.h>

/* out[r][g*rep+h][k] = scale * (q[r][g][h] . K(r, g, k)), k < K */
void sevi_paged_scores(const float *q, const float *kc, const int64_t *blocks, int64_t R, int64_t nb,
                       int64_t G, int64_t rep, int64_t D, int64_t bs, int64_t K, int64_t sb, int64_t sg,
                       int64_t sd, int64_t sn, float scale, float *out) {
    for (int64_t r = 0; r < R; r++) {
        for (int64_t g = 0; g < G; g++) {
            const float *qg = q + (r * G + g) * rep * D;
            float *og = out + (r * G + g) * rep * K;
            for (int64_t j = 0; j < nb && j * bs < K; j++) {
                const int64_t k0 = j * bs;
                const int64_t w = K - k0 < bs ? K - k0 : bs;
                const float *kb = kc + blocks[r * nb + j] * sb + g * sg;
                for (int64_t h = 0; h < rep; h++) {
                    const float *qh = qg + h * D;
                    float *o = og + h * K + k0;
                    if (sn == 1) { /* K as [D, block]: accumulate one row of keys per d (vectorises) */
                        for (int64_t n = 0; n < w; n++) o[n] = 0.0f;
                        for (int64_t d = 0; d < D; d++) {
                            const float qd = qh[d];
                            const float *row = kb + d * sd;
                            for (int64_t n = 0; n < w; n++) o[n] += qd * row[n];
                        }
                        for (int64_t n = 0; n < w; n++) o[n] *= scale;
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

/* out[r][g][h][:] = sum_k p[r][g*rep+h][k] * V(r, g, k), k < K */
void sevi_paged_values(const float *p, const float *vc, const int64_t *blocks, int64_t R, int64_t nb,
                       int64_t G, int64_t rep, int64_t D, int64_t bs, int64_t K, int64_t sb, int64_t sg,
                       int64_t sn, int64_t sd, float *out) {
    for (int64_t r = 0; r < R; r++) {
        for (int64_t g = 0; g < G; g++) {
            const float *pg = p + (r * G + g) * rep * K;
            float *og = out + (r * G + g) * rep * D;
            for (int64_t i = 0; i < rep * D; i++) og[i] = 0.0f;
            for (int64_t j = 0; j < nb && j * bs < K; j++) {
                const int64_t k0 = j * bs;
                const int64_t w = K - k0 < bs ? K - k0 : bs;
                const float *vb = vc + blocks[r * nb + j] * sb + g * sg;
                if (sd == 1) { /* V as [block, D]: add each key's row, weighted (vectorises over d) */
                    for (int64_t n = 0; n < w; n++) {
                        const float *vr = vb + n * sn;
                        for (int64_t h = 0; h < rep; h++) {
                            const float pk = pg[h * K + k0 + n];
                            float *o = og + h * D;
                            for (int64_t d = 0; d < D; d++) o[d] += pk * vr[d];
                        }
                    }
                } else { /* V as [D, block]: one dot product per output value */
                    for (int64_t h = 0; h < rep; h++) {
                        const float *ph = pg + h * K + k0;
                        float *o = og + h * D;
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
