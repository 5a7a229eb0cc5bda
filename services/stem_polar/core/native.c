/* stem-polar native kernels: the two fused passes over uint16 frames, vectorised (see native.py).
 *
 * Same contract as the numba kernels in kernels.py (pass1_frames / pass2_frames), about 2-3x faster per pass
 * on an AVX-512 core:
 *   - log(1 + x) is evaluated in SIMD registers instead of a scalar 65536-entry table gather: a register table
 *     for vectors whose counts are all below 32, else exponent/mantissa split, a 17-entry reduction and a short
 *     series (within 1 ulp of the exact value);
 *   - frames are taken two (pass 2) or four (pass 1) at a time, so every template / moment / accumulator row
 *     loaded from cache serves several frames; pass 1 is one sweep after each frame's background level (from
 *     the outer-ring vectors only), pass 2 one sweep for up to five template rows and the three moment rows.
 * Written with GCC vector extensions (AVX-512 when the compiler targets it, else 256-bit), no intrinsics.
 * Rows of any length: the last partial vector is zero-padded (log1p(0) = 0 adds nothing to the sums).
 */
#include <stddef.h>
#include <stdint.h>
#include <math.h>
#include <string.h>
#if defined(__AVX__)
#include <immintrin.h>
#endif

#if defined(__AVX512F__)
#define VL 16
#else
#define VL 8
#endif

typedef float vf __attribute__((vector_size(VL * 4)));
typedef int32_t vi __attribute__((vector_size(VL * 4)));
typedef uint16_t vu16 __attribute__((vector_size(VL * 2)));

#define INLINE static inline __attribute__((always_inline))

/* Software prefetch of the next frames' pixels at the same offset: page-cache frames are scattered 4 KiB pages,
 * where the hardware prefetcher stops at every page boundary. */
#define PREFETCH(na, nb_, k)                          \
    do {                                              \
        __builtin_prefetch((na) + (k), 0, 3);         \
        __builtin_prefetch((nb_) + (k), 0, 3);        \
    } while (0)

/* BODY over a row of P pixels in vectors of VL (n = VL, a constant: plain vector loads), then the last
 * partial vector once (n = P - k: zero-padded loads, partial stores). BODY uses k and n. */
#define SWEEP(P, ...)                                  \
    {                                                   \
        size_t k = 0;                                   \
        for (; k + VL <= (P); k += VL) {                \
            const size_t n = VL;                        \
            __VA_ARGS__                                 \
        }                                               \
        if (k < (P)) {                                  \
            const size_t n = (P) - k;                   \
            __VA_ARGS__                                 \
        }                                               \
    }

INLINE vf ld_u16(const uint16_t *p, size_t n) {
    vu16 u = {0};
    memcpy(&u, p, n * sizeof(uint16_t));
    return __builtin_convertvector(u, vf);
}
INLINE vf ld_f(const float *p, size_t n) {
    vf v = {0};
    memcpy(&v, p, n * sizeof(float));
    return v;
}
INLINE void st_f(float *p, vf v, size_t n) { memcpy(p, &v, n * sizeof(float)); }
INLINE float hsum(vf v) {
    float s = 0.0f;
    for (int l = 0; l < VL; l++) s += v[l];
    return s;
}

/* log(1 + x) for integer-valued x in [0, 2^24): y = 1 + x is exact; y = 2^k m, m in [1, 2) from the bits;
 * m is reduced by the nearest c_j = 1 + j/16 (j = 0..15, from the top mantissa bits): log m = log c_j +
 * log(1 + r), r = m / c_j - 1 with |r| <= 1/31, so a degree-5 series suffices. 1/c_j and log c_j come from
 * two-register tables (one permute each); ln 2 is split in a high part exact in k ln2_hi and a low part.
 * Within 1 ulp of the float64 value for every uint16 (tested exhaustively); x = 0 gives exactly 0. */
static float red_inv[2 * VL], red_log[2 * VL];

__attribute__((constructor(150))) static void init_reduction_tables(void) {
    for (int j = 0; j < 2 * VL; j++) {
        double c = 1.0 + (j <= 15 ? j : 15) / 16.0;
        float inv = (float)(1.0 / c);
        red_inv[j] = inv;
        red_log[j] = (float)(-log((double)inv)); /* log of the c that 1/c rounds to: m * inv is exact in r */
    }
}

typedef struct {
    vf inv_lo, inv_hi, log_lo, log_hi;
} logtab;

INLINE logtab load_log_tables(void) {
    logtab t;
    memcpy(&t.inv_lo, red_inv, sizeof t.inv_lo);
    memcpy(&t.inv_hi, red_inv + VL, sizeof t.inv_hi);
    memcpy(&t.log_lo, red_log, sizeof t.log_lo);
    memcpy(&t.log_hi, red_log + VL, sizeof t.log_hi);
    return t;
}

INLINE vf vlog1p(vf x, logtab t) {
    vf y = x + 1.0f;
    vi b;
    memcpy(&b, &y, sizeof b);
    vi k = (b >> 23) - 0x7f;
    vi mant = b & 0x007fffff;
    vi j = (mant + (1 << 18)) >> 19; /* nearest sixteenth: 0 .. 16, */
    j -= j >> 4;                      /* 16 -> 15 (|r| <= 1/31 still): 16 table entries fit 2 registers */
    vi mb = mant | 0x3f800000;
    vf m;
    memcpy(&m, &mb, sizeof m);
    vf inv = __builtin_shuffle(t.inv_lo, t.inv_hi, j), lc = __builtin_shuffle(t.log_lo, t.log_hi, j);
    vf r = m * inv - 1.0f;
    vf p = r * (1.0f + r * (-0.5f + r * (0.333333343f + r * (-0.25f + r * 0.2f))));
    vf kf = __builtin_convertvector(k, vf);
    return (kf * 0.693145751953125f + lc) + (p + kf * 1.428606765330187e-06f);
}

/* Small counts (the dark field of counting detectors): when every lane of a vector is below NSMALL, log(1 + x)
 * is one two-register permute of a table that holds vlog1p(0 .. NSMALL-1), i.e. bit for bit the general path's
 * values, so results do not depend on which path a vector takes. Other vectors use the polynomial. */
#define NSMALL (2 * VL)
static float small_table[NSMALL];

__attribute__((constructor(200))) static void init_small_table(void) {
    const logtab lt = load_log_tables();
    for (int j = 0; j < NSMALL; j += VL) {
        vf x;
        for (int l = 0; l < VL; l++) x[l] = (float)(j + l);
        vf v = vlog1p(x, lt);
        memcpy(small_table + j, &v, sizeof v);
    }
}

typedef struct {
    vf lo, hi; /* the small-count table, held in registers through a sweep */
} smalltab;

INLINE smalltab load_small_table(void) {
    smalltab t;
    memcpy(&t.lo, small_table, sizeof t.lo);
    memcpy(&t.hi, small_table + VL, sizeof t.hi);
    return t;
}

INLINE int all_small(vi xi) {
#if defined(__AVX512F__)
    __m512i v;
    memcpy(&v, &xi, sizeof v);
    return _mm512_test_epi32_mask(v, _mm512_set1_epi32(~(NSMALL - 1))) == 0;
#elif defined(__AVX__)
    __m256i v;
    memcpy(&v, &xi, sizeof v);
    return _mm256_testz_si256(v, _mm256_set1_epi32(~(NSMALL - 1)));
#else
    vi big = xi & ~(NSMALL - 1);
    int any = 0;
    for (int l = 0; l < VL; l++) any |= big[l];
    return any == 0;
#endif
}

INLINE vf vlog1p_counts(vf x, smalltab t) {
    vi xi = __builtin_convertvector(x, vi);
    if (__builtin_expect(all_small(xi), 1)) return __builtin_shuffle(t.lo, t.hi, xi);
    return vlog1p(x, load_log_tables()); /* tables from L1: registers stay free for the accumulators */
}

/* ------------------------------------------------------------------------------------------------ pass 1 */

/* Frames per pass-1 sweep: every accumulator row loaded serves four frames. */
#define P1_FRAMES 4

/* Background levels of nb frames: bg[f] += e'_f . wbg over the listed vectors only (blk: offsets of the
 * VL-pixel vectors that hold a non-zero weight; the outer ring of the detector, about a third of it). */
INLINE void pass1_background(const uint16_t *const *rows, const int nb, size_t P, const float *ref,
                             const float *wbg, const int64_t *blk, size_t nblk, smalltab tab, double *bg) {
    vf d[P1_FRAMES] = {{0}};
#define BG_VECTOR(n)                                                             \
    {                                                                            \
        vf r = ld_f(ref + k, n), w = ld_f(wbg + k, n);                           \
        for (int f = 0; f < nb; f++) d[f] += (vlog1p_counts(ld_u16(rows[f] + k, n), tab) - r) * w; \
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

/* nb (1..P1_FRAMES) frames in one sweep: acc0 += x; acc1 += D, acc2 += D^2 with D = log1p(x) - ref - bg
 * (bg from pass1_background first when use_bg, else 0); next: the rows of the following frames (prefetched). */
INLINE void pass1_group(const uint16_t *const *rows, const uint16_t *const *next, const int nb, size_t P,
                        const float *ref, const float *wbg, const int64_t *blk, size_t nblk, const int use_bg,
                        float *acc0, float *acc1, float *acc2, double *bg) {
    const smalltab tab = load_small_table();
    float fb[P1_FRAMES] = {0};
    if (use_bg) {
        pass1_background(rows, nb, P, ref, wbg, blk, nblk, tab, bg);
        for (int f = 0; f < nb; f++) fb[f] = (float)bg[f];
    }
    SWEEP(P, {
        for (int f = 0; f < nb; f++) __builtin_prefetch(next[f] + k, 0, 3);
        vf r = ld_f(ref + k, n), s0 = {0}, s1 = {0}, s2 = {0};
        for (int f = 0; f < nb; f++) {
            vf x = ld_u16(rows[f] + k, n);
            vf d = (vlog1p_counts(x, tab) - r) - fb[f];
            s0 += x, s1 += d, s2 += d * d;
        }
        st_f(acc0 + k, ld_f(acc0 + k, n) + s0, n);
        st_f(acc1 + k, ld_f(acc1 + k, n) + s1, n);
        st_f(acc2 + k, ld_f(acc2 + k, n) + s2, n);
    })
}

#define PASS1_GROUP(NB)                                                                                  \
    do {                                                                                                 \
        if (use_bg)                                                                                      \
            pass1_group(rows, next, NB, P, ref, wbg, blk, nblk, 1, a0, a1, a2, bgs + t);                 \
        else                                                                                             \
            pass1_group(rows, next, NB, P, ref, wbg, blk, nblk, 0, a0, a1, a2, bgs + t);                 \
    } while (0)

/* Pass-1 sums of frames base[idx[t]] (one group): acc rows [sum x, sum D, sum D^2] (float32, the caller keeps
 * at most 256 frames per accumulator); bgs[t] holds the constant ref . wbg on entry and bg of frame t on exit;
 * blk lists the vectors with a non-zero background weight (see pass1_background). */
void sp_pass1_u16(const uint16_t *base, const int64_t *idx, size_t n, size_t P, const float *ref,
                  const float *wbg, const int64_t *blk, size_t nblk, int use_bg, float *acc, double *bgs) {
    float *a0 = acc, *a1 = acc + P, *a2 = acc + 2 * P;
    for (size_t t = 0; t < n; t += P1_FRAMES) {
        const uint16_t *rows[P1_FRAMES], *next[P1_FRAMES];
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
}
#undef PASS1_GROUP

/* ------------------------------------------------------------------------------------------------ pass 2 */

/* Template rows per sweep: 5 (four clusters and the background column of the usual case in one sweep); with the
 * 3 moment rows that is 16 vector accumulators for two frames. */
#define GROUP 5

/* One sweep over nb frames: GROUP template rows w0..w4 against e = log1p(x) (from the raw rows when from_raw,
 * else from the e rows in ebuf), plus the 3 CoM moment rows against raw x when com; stores e rows into ebuf
 * when keep_e (more template groups follow). */
INLINE void pass2_sweep(const uint16_t *ra, const uint16_t *rb, const uint16_t *na, const uint16_t *nb_,
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
            xa = ld_u16(ra + k, n);
            e1 = vlog1p_counts(xa, tab);
            if (nb == 2) {
                xb = ld_u16(rb + k, n);
                e2 = vlog1p_counts(xb, tab);
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

INLINE void pass2_frames_nb(const uint16_t *ra, const uint16_t *rb, const uint16_t *na, const uint16_t *nb_,
                            const int nb, size_t P, const float *WT, size_t nP, const float *zrow, const float *M,
                            int com, float *ebuf, float *pa, float *pb, float *qa, float *qb) {
    float oa[8] = {0}, ob[8] = {0};
    for (size_t c = 0; c < nP; c += GROUP) {
        const float *w[GROUP];
        for (int j = 0; j < GROUP; j++) w[j] = c + j < nP ? WT + (c + j) * P : zrow;
        int first = c == 0, keep = first && nP > GROUP;
        if (first && com) {
            if (keep)
                pass2_sweep(ra, rb, na, nb_, nb, P, w[0], w[1], w[2], w[3], w[4], M, 1, 1, 1, ebuf, oa, ob);
            else
                pass2_sweep(ra, rb, na, nb_, nb, P, w[0], w[1], w[2], w[3], w[4], M, 1, 1, 0, ebuf, oa, ob);
        } else if (first) {
            if (keep)
                pass2_sweep(ra, rb, na, nb_, nb, P, w[0], w[1], w[2], w[3], w[4], M, 0, 1, 1, ebuf, oa, ob);
            else
                pass2_sweep(ra, rb, na, nb_, nb, P, w[0], w[1], w[2], w[3], w[4], M, 0, 1, 0, ebuf, oa, ob);
        } else {
            pass2_sweep(ra, rb, na, nb_, nb, P, w[0], w[1], w[2], w[3], w[4], M, 0, 0, 0, ebuf, oa, ob);
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
void sp_pass2_u16(const uint16_t *base, const int64_t *idx, size_t n, size_t P, const float *WT, size_t nP,
                  const float *zrow, const float *M, int com, float *out_p, size_t ldp, float *out_r,
                  float *ebuf) {
    size_t t = 0;
    for (; t + 2 <= n; t += 2) {
        const uint16_t *ra = base + idx[t] * P, *rb = base + idx[t + 1] * P;
        const uint16_t *na = t + 2 < n ? base + idx[t + 2] * P : rb, *nb_ = t + 3 < n ? base + idx[t + 3] * P : rb;
        pass2_frames_nb(ra, rb, na, nb_, 2, P, WT, nP, zrow, M, com, ebuf, out_p + t * ldp, out_p + (t + 1) * ldp,
                        out_r + t * 3, out_r + (t + 1) * 3);
    }
    if (t < n) {
        const uint16_t *ra = base + idx[t] * P;
        pass2_frames_nb(ra, ra, ra, ra, 1, P, WT, nP, zrow, M, com, ebuf, out_p + t * ldp, out_p + t * ldp,
                        out_r + t * 3, out_r + t * 3);
    }
}

/* Pixels per SIMD vector of this build (offsets in the background vector list are multiples of it). */
int sp_vector_pixels(void) { return VL; }

/* log1p of frames base[idx[t]] into out[t] (float32 rows of P): the values the passes use (for tests). */
void sp_log_rows_u16(const uint16_t *base, const int64_t *idx, size_t n, size_t P, float *out) {
    const smalltab tab = load_small_table();
    for (size_t t = 0; t < n; t++) {
        const uint16_t *r = base + idx[t] * P;
        SWEEP(P, { st_f(out + t * P + k, vlog1p_counts(ld_u16(r + k, n), tab), n); })
    }
}
