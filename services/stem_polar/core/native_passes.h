/* The two passes for one pixel type, included by native.c once per type with
 *   PIX        the pixel type (uint16_t, float),
 *   LD_PX      a loader: n pixels -> a float vector (zero-padded),
 *   LOG_PX     log(1 + x) of such a vector (with the small-count table for integer data),
 *   F(name)    the name with the type's suffix (sp_pass1_u16, sp_pass1_f32, ...).
 * See native.c for what the kernels compute. */

/* ------------------------------------------------------------------------------------------------ pass 1 */

/* Background levels of nb frames: bg[f] += e'_f . wbg over the listed vectors only (blk: ascending offsets of
 * the VL-pixel vectors that hold a non-zero weight; the outer ring of the detector, about a third of it). With
 * a scratch eb (nb * nblk vectors) the logs of those vectors are kept there for the sweep (no second log). */
INLINE void F(pass1_background)(const PIX *const *rows, const int nb, size_t P, const float *ref,
                             const float *wbg, const int64_t *blk, size_t nblk, smalltab tab, double *bg,
                             float *eb) {
    vf d[P1_FRAMES] = {{0}};
#define BG_VECTOR(n)                                                             \
    {                                                                            \
        vf r = ld_f(ref + k, n), w = ld_f(wbg + k, n);                           \
        for (int f = 0; f < nb; f++) {                                           \
            vf e = LOG_PX(LD_PX(rows[f] + k, n), tab);                           \
            if (eb) memcpy(eb + ((size_t)f * nblk + j) * VL, &e, sizeof e);      \
            d[f] += (e - r) * w;                                                 \
        }                                                                        \
    }
    for (size_t j = 0; j < nblk; j++) {
        size_t k = (size_t)blk[j];
        if (k + VL <= P)
            BG_VECTOR(VL)
        else
            BG_VECTOR(P - k)
    }
#undef BG_VECTOR
    for (int f = 0; f < nb; f++) bg[f] += (double)hsum(d[f]);
}

/* The pass-1 update of one vector (n pixels at offset k) for nb frames: E(f) gives frame f's log vector. */
#define P1_VECTOR(E)                                                                \
    {                                                                               \
        vf r = ld_f(ref + k, n), s0 = {0}, s1 = {0}, s2 = {0};                      \
        for (int f = 0; f < nb; f++) {                                              \
            vf x = LD_PX(rows[f] + k, n);                                           \
            vf d = ((E) - r) - fb[f];                                               \
            s0 += x, s1 += d, s2 += d * d;                                          \
        }                                                                           \
        st_f(acc0 + k, ld_f(acc0 + k, n) + s0, n);                                  \
        st_f(acc1 + k, ld_f(acc1 + k, n) + s1, n);                                  \
        st_f(acc2 + k, ld_f(acc2 + k, n) + s2, n);                                  \
    }

/* nb (1..P1_FRAMES) frames in one sweep: acc0 += x; acc1 += D, acc2 += D^2 with D = log1p(x) - ref - bg
 * (bg from pass1_background first when use_bg, else 0); next: the rows of the following frames (prefetched).
 * With eb (scratch of P1_FRAMES * nblk vectors) the background vectors reuse the logs kept by
 * pass1_background and the sweep covers the other vectors only (the same sums, bit for bit: every pixel's
 * accumulators see the same values in the same frame order). */
INLINE void F(pass1_group)(const PIX *const *rows, const PIX *const *next, const int nb, size_t P,
                        const float *ref, const float *wbg, const int64_t *blk, size_t nblk, const int use_bg,
                        float *acc0, float *acc1, float *acc2, double *bg, float *eb) {
    const smalltab tab = load_small_table();
    float fb[P1_FRAMES] = {0};
    if (use_bg) {
        F(pass1_background)(rows, nb, P, ref, wbg, blk, nblk, tab, bg, eb);
        for (int f = 0; f < nb; f++) fb[f] = (float)bg[f];
    }
    /* the logs kept in eb pay off when the ring took the slow log path (dense data: mean ring log above
     * log(1 + 32 - 2)); on a dark ring recomputing its logs from the register table costs less than the split
     * sweep. Both ways give the same bits. */
    int reuse = use_bg && eb && nblk;
    for (int f = 0; f < nb && reuse; f++) reuse = fb[f] > 3.43f;
    if (!reuse) {
        SWEEP(P, {
            for (int f = 0; f < nb; f++) __builtin_prefetch(next[f] + k, 0, 3);
            P1_VECTOR(LOG_PX(x, tab))
        })
        return;
    }
    for (size_t j = 0; j < nblk; j++) { /* background vectors: logs from the scratch */
        const size_t k = (size_t)blk[j];
        if (k + VL <= P) {
            const size_t n = VL; /* a constant: plain vector loads */
            P1_VECTOR(ld_f(eb + ((size_t)f * nblk + j) * VL, VL))
        } else {
            const size_t n = P - k;
            P1_VECTOR(ld_f(eb + ((size_t)f * nblk + j) * VL, VL))
        }
    }
    size_t j = 0;
    SWEEP(P, {
        while (j < nblk && (size_t)blk[j] < k) j++;
        if (j == nblk || (size_t)blk[j] != k) {
            for (int f = 0; f < nb; f++) __builtin_prefetch(next[f] + k, 0, 3);
            P1_VECTOR(LOG_PX(x, tab))
        }
    })
}
#undef P1_VECTOR

#define PASS1_GROUP(NB)                                                                                  \
    do {                                                                                                 \
        if (use_bg)                                                                                      \
            F(pass1_group)(rows, next, NB, P, ref, wbg, blk, nblk, 1, a0, a1, a2, bgs + t, eb);             \
        else                                                                                             \
            F(pass1_group)(rows, next, NB, P, ref, wbg, blk, nblk, 0, a0, a1, a2, bgs + t, eb);             \
    } while (0)

/* Pass-1 sums of frames base[idx[t]] (one group): acc rows [sum x, sum D, sum D^2] (float32, the caller keeps
 * at most 256 frames per accumulator); bgs[t] holds the constant ref . wbg on entry and bg of frame t on exit;
 * blk lists the vectors with a non-zero background weight (see pass1_background). */
void F(sp_pass1)(const PIX *base, const int64_t *idx, size_t n, size_t P, const float *ref,
                  const float *wbg, const int64_t *blk, size_t nblk, int use_bg, float *acc, double *bgs) {
    float *a0 = acc, *a1 = acc + P, *a2 = acc + 2 * P;
    /* the background vectors' logs of a group of frames (NULL: computed twice, same results) */
    float *eb = use_bg && nblk ? (float *)aligned_alloc(64, ((P1_FRAMES * nblk * VL * sizeof(float) + 63) / 64) * 64)
                               : NULL;
    for (size_t t = 0; t < n; t += P1_FRAMES) {
        const PIX *rows[P1_FRAMES], *next[P1_FRAMES];
        size_t nb = n - t < P1_FRAMES ? n - t : P1_FRAMES;
        for (size_t f = 0; f < P1_FRAMES; f++) {
            rows[f] = base + idx[t + (f < nb ? f : 0)] * P;
            size_t u = t + P1_FRAMES + f;
            next[f] = u < n ? base + idx[u] * P : rows[f];
        }
        switch (nb) {
        case 4: PASS1_GROUP(4); break;
        case 3: PASS1_GROUP(3); break;
        case 2: PASS1_GROUP(2); break;
        default: PASS1_GROUP(1); break;
        }
    }
    free(eb);
}
#undef PASS1_GROUP

/* ------------------------------------------------------------------------------------------------ pass 2 */

/* One sweep over nb frames: GROUP template rows w0..w4 against e = log1p(x) (from the raw rows when from_raw,
 * else from the e rows in ebuf), plus the 3 CoM moment rows against raw x when com; stores e rows into ebuf
 * when keep_e (more template groups follow). */
INLINE void F(pass2_sweep)(const PIX *ra, const PIX *rb, const PIX *na, const PIX *nb_,
                        const int nb, size_t P, const float *w0,
                        const float *w1, const float *w2, const float *w3, const float *w4, const float *M,
                        const int com, const int from_raw, const int keep_e, float *ebuf, float out_a[8],
                        float out_b[8]) {
    vf a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, a4 = {0}, b0 = {0}, b1 = {0}, b2 = {0}, b3 = {0}, b4 = {0};
    vf ma0 = {0}, ma1 = {0}, ma2 = {0}, mb0 = {0}, mb1 = {0}, mb2 = {0};
    float *ea = ebuf, *eb = ebuf + P;
    const smalltab tab = load_small_table();
    SWEEP(P, {
        vf xa = {0}, xb = {0}, e1, e2 = {0};
        if (from_raw) {
            PREFETCH(na, nb_, k);
            xa = LD_PX(ra + k, n);
            e1 = LOG_PX(xa, tab);
            if (nb == 2) {
                xb = LD_PX(rb + k, n);
                e2 = LOG_PX(xb, tab);
            }
            if (keep_e) {
                st_f(ea + k, e1, n);
                if (nb == 2) st_f(eb + k, e2, n);
            }
        } else {
            e1 = ld_f(ea + k, n);
            if (nb == 2) e2 = ld_f(eb + k, n);
        }
        vf w;
        w = ld_f(w0 + k, n), a0 += e1 * w, b0 += e2 * w;
        w = ld_f(w1 + k, n), a1 += e1 * w, b1 += e2 * w;
        w = ld_f(w2 + k, n), a2 += e1 * w, b2 += e2 * w;
        w = ld_f(w3 + k, n), a3 += e1 * w, b3 += e2 * w;
        w = ld_f(w4 + k, n), a4 += e1 * w, b4 += e2 * w;
        if (com) {
            w = ld_f(M + k, n), ma0 += xa * w, mb0 += xb * w;
            w = ld_f(M + P + k, n), ma1 += xa * w, mb1 += xb * w;
            w = ld_f(M + 2 * P + k, n), ma2 += xa * w, mb2 += xb * w;
        }
    })
    out_a[0] = hsum(a0), out_a[1] = hsum(a1), out_a[2] = hsum(a2), out_a[3] = hsum(a3), out_a[4] = hsum(a4);
    out_b[0] = hsum(b0), out_b[1] = hsum(b1), out_b[2] = hsum(b2), out_b[3] = hsum(b3), out_b[4] = hsum(b4);
    if (com) {
        out_a[5] = hsum(ma0), out_a[6] = hsum(ma1), out_a[7] = hsum(ma2);
        out_b[5] = hsum(mb0), out_b[6] = hsum(mb1), out_b[7] = hsum(mb2);
    }
}

INLINE void F(pass2_frames_nb)(const PIX *ra, const PIX *rb, const PIX *na, const PIX *nb_,
                            const int nb, size_t P, const float *WT, size_t nP, const float *zrow, const float *M,
                            int com, float *ebuf, float *pa, float *pb, float *qa, float *qb) {
    float oa[8] = {0}, ob[8] = {0};
    for (size_t c = 0; c < nP; c += GROUP) {
        const float *w[GROUP];
        for (int j = 0; j < GROUP; j++) w[j] = c + j < nP ? WT + (c + j) * P : zrow;
        int first = c == 0, keep = first && nP > GROUP;
        if (first && com) {
            if (keep)
                F(pass2_sweep)(ra, rb, na, nb_, nb, P, w[0], w[1], w[2], w[3], w[4], M, 1, 1, 1, ebuf, oa, ob);
            else
                F(pass2_sweep)(ra, rb, na, nb_, nb, P, w[0], w[1], w[2], w[3], w[4], M, 1, 1, 0, ebuf, oa, ob);
        } else if (first) {
            if (keep)
                F(pass2_sweep)(ra, rb, na, nb_, nb, P, w[0], w[1], w[2], w[3], w[4], M, 0, 1, 1, ebuf, oa, ob);
            else
                F(pass2_sweep)(ra, rb, na, nb_, nb, P, w[0], w[1], w[2], w[3], w[4], M, 0, 1, 0, ebuf, oa, ob);
        } else {
            F(pass2_sweep)(ra, rb, na, nb_, nb, P, w[0], w[1], w[2], w[3], w[4], M, 0, 0, 0, ebuf, oa, ob);
        }
        for (int j = 0; j < GROUP && c + j < nP; j++) {
            pa[c + j] = oa[j];
            if (nb == 2) pb[c + j] = ob[j];
        }
        if (first && com) {
            for (int j = 0; j < 3; j++) {
                qa[j] = oa[GROUP + j];
                if (nb == 2) qb[j] = ob[GROUP + j];
            }
        }
    }
}

/* Pass-2 products of frames base[idx[t]]: out_p[t * ldp + c] = log1p(x) . WT[c] for c < nP, and with com
 * out_r[t * 3 + j] = x . M[j] (CoM moments). zrow: P zeros (pads the last template group); ebuf: 2 * P floats. */
void F(sp_pass2)(const PIX *base, const int64_t *idx, size_t n, size_t P, const float *WT, size_t nP,
                  const float *zrow, const float *M, int com, float *out_p, size_t ldp, float *out_r,
                  float *ebuf) {
    size_t t = 0;
    for (; t + 2 <= n; t += 2) {
        const PIX *ra = base + idx[t] * P, *rb = base + idx[t + 1] * P;
        const PIX *na = t + 2 < n ? base + idx[t + 2] * P : rb, *nb_ = t + 3 < n ? base + idx[t + 3] * P : rb;
        F(pass2_frames_nb)(ra, rb, na, nb_, 2, P, WT, nP, zrow, M, com, ebuf, out_p + t * ldp, out_p + (t + 1) * ldp,
                        out_r + t * 3, out_r + (t + 1) * 3);
    }
    if (t < n) {
        const PIX *ra = base + idx[t] * P;
        F(pass2_frames_nb)(ra, ra, ra, ra, 1, P, WT, nP, zrow, M, com, ebuf, out_p + t * ldp, out_p + t * ldp,
                        out_r + t * 3, out_r + t * 3);
    }
}

/* log1p of frames base[idx[t]] into out[t] (float32 rows of P): the values the passes use (for tests). */
void F(sp_log_rows)(const PIX *base, const int64_t *idx, size_t n, size_t P, float *out) {
    const smalltab tab = load_small_table();
    for (size_t t = 0; t < n; t++) {
        const PIX *r = base + idx[t] * P;
        SWEEP(P, { st_f(out + t * P + k, LOG_PX(LD_PX(r + k, n), tab), n); })
    }
}

/* ------------------------------------------------------------------------------- pass 2, moments from the gate */

/* As pass2_sweep for frames whose rows are whole vectors (detector width Wd a multiple of VL) with the CoM
 * moments taken from the gate row G and the pixel coordinates instead of three moment rows: g = x G, then
 * sum g, sum g dx, sum g dy with dx = dxr[column] (one detector row of offsets, L1-resident) and dy = dyr[row]
 * (a broadcast per detector row). NW (1..GROUP, a constant after inlining) template rows, no padding rows:
 * each distinct row streamed from L2 costs more than its arithmetic. */
INLINE void F(pass2g_sweep)(const PIX *ra, const PIX *rb, const PIX *na, const PIX *nb_, const int nb,
                            const size_t H, const size_t Wd, const float *const *w, const int NW, const float *G,
                            const float *dxr, const float *dyr, const int com, const int from_raw,
                            const int keep_e, float *ebuf, float out_a[8], float out_b[8]) {
    vf a[GROUP] = {{0}}, b[GROUP] = {{0}};
    vf ma0 = {0}, ma1 = {0}, ma2 = {0}, mb0 = {0}, mb1 = {0}, mb2 = {0};
    const size_t P = H * Wd;
    float *ea = ebuf, *eb = ebuf + P;
    const smalltab tab = load_small_table();
    for (size_t r = 0; r < H; r++) {
        const vf dy = (vf){0} + dyr[r];
        for (size_t c = 0; c < Wd; c += VL) {
            const size_t k = r * Wd + c, n = VL;
            vf xa = {0}, xb = {0}, e1, e2 = {0};
            if (from_raw) {
                PREFETCH(na, nb_, k);
                xa = LD_PX(ra + k, n);
                e1 = LOG_PX(xa, tab);
                if (nb == 2) {
                    xb = LD_PX(rb + k, n);
                    e2 = LOG_PX(xb, tab);
                }
                if (keep_e) {
                    st_f(ea + k, e1, n);
                    if (nb == 2) st_f(eb + k, e2, n);
                }
            } else {
                e1 = ld_f(ea + k, n);
                if (nb == 2) e2 = ld_f(eb + k, n);
            }
            for (int j = 0; j < NW; j++) {
                vf wv = ld_f(w[j] + k, n);
                a[j] += e1 * wv, b[j] += e2 * wv;
            }
            if (com) {
                vf g = ld_f(G + k, n), dx = ld_f(dxr + c, n);
                vf ga = xa * g, gb = xb * g;
                ma2 += ga, mb2 += gb;
                ma0 += ga * dx, mb0 += gb * dx;
                ma1 += ga * dy, mb1 += gb * dy;
            }
        }
    }
    for (int j = 0; j < NW; j++) out_a[j] = hsum(a[j]), out_b[j] = hsum(b[j]);
    if (com) {
        out_a[5] = hsum(ma0), out_a[6] = hsum(ma1), out_a[7] = hsum(ma2);
        out_b[5] = hsum(mb0), out_b[6] = hsum(mb1), out_b[7] = hsum(mb2);
    }
}

/* One sweep specialised for its flags and row count (every branch inlines pass2g_sweep with constants). */
#define P2G_SWEEP(NW_, COM_, RAW_, KEEP_) \
    F(pass2g_sweep)(ra, rb, na, nb_, nb, H, Wd, w, NW_, G, dxr, dyr, COM_, RAW_, KEEP_, ebuf, oa, ob)
#define P2G_ROWS(COM_, RAW_, KEEP_)                   \
    switch (nw) {                                     \
    case 1: P2G_SWEEP(1, COM_, RAW_, KEEP_); break;   \
    case 2: P2G_SWEEP(2, COM_, RAW_, KEEP_); break;   \
    case 3: P2G_SWEEP(3, COM_, RAW_, KEEP_); break;   \
    case 4: P2G_SWEEP(4, COM_, RAW_, KEEP_); break;   \
    default: P2G_SWEEP(5, COM_, RAW_, KEEP_); break;  \
    }

static void F(pass2g_frames_nb)(const PIX *ra, const PIX *rb, const PIX *na, const PIX *nb_, const int nb,
                                size_t H, size_t Wd, const float *WT, size_t nP, const float *G, const float *dxr,
                                const float *dyr, int com, float *ebuf, float *pa, float *pb, float *qa, float *qb) {
    const size_t P = H * Wd;
    float oa[8] = {0}, ob[8] = {0};
    if (nP == 0 && com) { /* moments only */
        const float *w[1] = {G};
        F(pass2g_sweep)(ra, rb, na, nb_, nb, H, Wd, w, 0, G, dxr, dyr, 1, 1, 0, ebuf, oa, ob);
    }
    for (size_t c0 = 0; c0 < nP; c0 += GROUP) {
        const float *w[GROUP];
        const int nw = (int)(nP - c0 < GROUP ? nP - c0 : GROUP);
        for (int j = 0; j < nw; j++) w[j] = WT + (c0 + j) * P;
        for (int j = nw; j < GROUP; j++) w[j] = w[0];
        const int first = c0 == 0, keep = first && nP > GROUP;
        if (first && com && keep) {
            P2G_ROWS(1, 1, 1)
        } else if (first && com) {
            P2G_ROWS(1, 1, 0)
        } else if (first && keep) {
            P2G_ROWS(0, 1, 1)
        } else if (first) {
            P2G_ROWS(0, 1, 0)
        } else {
            P2G_ROWS(0, 0, 0)
        }
        for (int j = 0; j < nw; j++) {
            pa[c0 + j] = oa[j];
            if (nb == 2) pb[c0 + j] = ob[j];
        }
    }
    if (com) {
        for (int j = 0; j < 3; j++) {
            qa[j] = oa[GROUP + j];
            if (nb == 2) qb[j] = ob[GROUP + j];
        }
    }
}
#undef P2G_ROWS
#undef P2G_SWEEP

/* Pass-2 products of frames base[idx[t]] (H x Wd pixels, Wd a multiple of the vector width):
 * out_p[t * ldp + c] = log1p(x) . WT[c] for c < nP and, with com, out_r[t * 3 + .] = [x . (G dx), x . (G dy),
 * x . G] with dx = dxr[column], dy = dyr[row] (the gated CoM moments about the centre). ebuf: 2 * P floats. */
void F(sp_pass2g)(const PIX *base, const int64_t *idx, size_t n, size_t H, size_t Wd, const float *WT, size_t nP,
                  const float *G, const float *dxr, const float *dyr, int com, float *out_p, size_t ldp,
                  float *out_r, float *ebuf) {
    const size_t P = H * Wd;
    size_t t = 0;
    for (; t + 2 <= n; t += 2) {
        const PIX *ra = base + idx[t] * P, *rb = base + idx[t + 1] * P;
        const PIX *na = t + 2 < n ? base + idx[t + 2] * P : rb, *nb_ = t + 3 < n ? base + idx[t + 3] * P : rb;
        F(pass2g_frames_nb)(ra, rb, na, nb_, 2, H, Wd, WT, nP, G, dxr, dyr, com, ebuf, out_p + t * ldp,
                            out_p + (t + 1) * ldp, out_r + t * 3, out_r + (t + 1) * 3);
    }
    if (t < n) {
        const PIX *ra = base + idx[t] * P;
        F(pass2g_frames_nb)(ra, ra, ra, ra, 1, H, Wd, WT, nP, G, dxr, dyr, com, ebuf, out_p + t * ldp,
                            out_p + t * ldp, out_r + t * 3, out_r + t * 3);
    }
}
