/* stem-polar native kernels: the two fused passes over uint16 frames, vectorised (see native.py).
 *
 * Same contract as the numba kernels in kernels.py (pass1_frames / pass2_frames), about 2-3x faster per pass
 * on an AVX-512 core:
 *   - log(1 + x) is evaluated in SIMD registers instead of a scalar 65536-entry table gather: a register table
 *     for vectors whose counts are all below 32, else exponent/mantissa split, a 32-entry reduction and a
 *     degree-3 series (within 1 ulp of the exact value); AVX2 builds take those other vectors from a table of the
 *     series' values with one hardware gather (faster there, same bits);
 *   - frames are taken two (pass 2) or four (pass 1) at a time, so every template / moment / accumulator row
 *     loaded from cache serves several frames; pass 1 is one sweep after each frame's background level (from
 *     the outer-ring vectors only), pass 2 one sweep for up to five template rows and the three moment rows
 *     (sp_pass2g: the moments from one gate row and the pixel offsets, one row streamed instead of three).
 * Written with GCC vector extensions (AVX-512 when the compiler targets it, else 256-bit); intrinsics only for
 * the mask test, getexp/getmant and the AVX2 gather.
 * Rows of any length: the last partial vector is zero-padded (log1p(0) = 0 adds nothing to the sums).
 */
#include <stddef.h>
#include <stdint.h>
#include <math.h>
#include <string.h>
#include <stdlib.h>
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
    /* through int32: one zero-extension and one conversion of the whole vector (GCC splits u16 -> float in
     * two halves otherwise); exact either way */
    return __builtin_convertvector(__builtin_convertvector(u, vi), vf);
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

/* log(1 + x) for integer-valued x in [0, 2^24): y = 1 + x is exact; y = 2^k m, m in [1, 2) (AVX-512: getexp and
 * getmant, else from the bits); m is reduced by the nearest c_j = 1 + j/32 (j = 0..31, from the top mantissa
 * bits): log m = log c_j + log(1 + r), r = m / c_j - 1 with |r| <= 1/63, so a degree-3 series suffices (the
 * truncation, r^4/4 <= 1.6e-8, is below 0.04 ulp wherever r != 0: y < 64 lies on the c_j grid). 1/c_j and
 * log c_j come from 32-entry tables (one two-register permute each with AVX-512, two and a blend with 256-bit
 * vectors: the same values); ln 2 is split in a high part exact in k ln2_hi and a low part.
 * Within 1 ulp of the float64 value for every uint16 (tested exhaustively); x = 0 gives exactly 0. */
#define NRED 32
static float red_inv[NRED], red_log[NRED];

__attribute__((constructor(150))) static void init_reduction_tables(void) {
    for (int j = 0; j < NRED; j++) {
        double c = 1.0 + j / 32.0;
        float inv = (float)(1.0 / c);
        red_inv[j] = inv;
        red_log[j] = (float)(-log((double)inv)); /* log of the c that 1/c rounds to: m * inv is exact in r */
    }
}

typedef struct {
    vf inv[NRED / VL], lg[NRED / VL];
} logtab;

INLINE logtab load_log_tables(void) {
    logtab t;
    for (int i = 0; i < NRED / VL; i++) {
        memcpy(&t.inv[i], red_inv + i * VL, sizeof(vf));
        memcpy(&t.lg[i], red_log + i * VL, sizeof(vf));
    }
    return t;
}

/* t[j] for j in 0 .. 31 from a table held in NRED / VL vectors. */
INLINE vf table32(const vf *t, vi j) {
#if VL == 16
    return __builtin_shuffle(t[0], t[1], j);
#else
    vf a = __builtin_shuffle(t[0], t[1], j & 15), b = __builtin_shuffle(t[2], t[3], j & 15);
    vi hi = -(j >> 4), ai, bi; /* all ones where j >= 16 */
    memcpy(&ai, &a, sizeof ai);
    memcpy(&bi, &b, sizeof bi);
    ai = (ai & ~hi) | (bi & hi);
    memcpy(&a, &ai, sizeof a);
    return a;
#endif
}

INLINE vf vlog1p(vf x, logtab t) {
    vf y = x + 1.0f, kf, m;
    vi mb;
#if defined(__AVX512F__) && VL == 16
    __m512 yv;
    memcpy(&yv, &y, sizeof yv);
    __m512 ev = _mm512_getexp_ps(yv), mv = _mm512_getmant_ps(yv, _MM_MANT_NORM_1_2, _MM_MANT_SIGN_src);
    memcpy(&kf, &ev, sizeof kf);
    memcpy(&m, &mv, sizeof m);
    memcpy(&mb, &m, sizeof mb);
#else
    vi b;
    memcpy(&b, &y, sizeof b);
    kf = __builtin_convertvector((b >> 23) - 0x7f, vf);
    mb = (b & 0x007fffff) | 0x3f800000;
    memcpy(&m, &mb, sizeof m);
#endif
    vi j = (mb + ((1 << 17) - 0x3f800000)) >> 18; /* nearest 32nd: 0 .. 32, */
    j -= j >> 5;                                 /* 32 -> 31 (|r| <= 1/63 still) */
    vf inv = table32(t.inv, j), lc = table32(t.lg, j);
    vf r = m * inv - 1.0f;
    vf p = r * (1.0f + r * (-0.5f + r * 0.333333343f));
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

/* Other vectors: on 256-bit (AVX2) builds a hardware gather from a 65536-entry table of vlog1p(0 .. 65535)
 * (256 KiB; detector counts crowd into a few cache lines of it): 1.8x faster per pass than the series on dense
 * data here (AMD Zen 3, ~0.85 vs ~1.6 ns per pixel), and the same bits as the series, so AVX2 and AVX-512 builds
 * agree. AVX-512 builds keep the series (an explicit gather was slower there). SP_LOG_GATHER=0/1 forces either. */
#if !defined(SP_LOG_GATHER)
#if defined(__AVX2__) && !defined(__AVX512F__)
#define SP_LOG_GATHER 1
#else
#define SP_LOG_GATHER 0
#endif
#endif

#if SP_LOG_GATHER
static float full_table[65536] __attribute__((aligned(64)));

__attribute__((constructor(210))) static void init_full_table(void) {
    const logtab lt = load_log_tables();
    for (int j = 0; j < 65536; j += VL) {
        vf x;
        for (int l = 0; l < VL; l++) x[l] = (float)(j + l);
        vf v = vlog1p(x, lt);
        memcpy(full_table + j, &v, sizeof v);
    }
}

INLINE vf gather_log(vi xi) {
#if defined(__AVX2__) && VL == 8
    __m256i v;
    memcpy(&v, &xi, sizeof v);
    __m256 g = _mm256_i32gather_ps(full_table, v, 4);
    vf r;
    memcpy(&r, &g, sizeof r);
    return r;
#else
    vf r;
    for (int l = 0; l < VL; l++) r[l] = full_table[xi[l]];
    return r;
#endif
}
#endif

INLINE vf vlog1p_counts(vf x, smalltab t) {
    vi xi = __builtin_convertvector(x, vi);
    if (__builtin_expect(all_small(xi), 1)) return __builtin_shuffle(t.lo, t.hi, xi);
#if SP_LOG_GATHER
    return gather_log(xi); /* uint16 counts: indices 0 .. 65535 */
#else
    return vlog1p(x, load_log_tables()); /* tables from L1: registers stay free for the accumulators */
#endif
}

/* Frames per pass-1 sweep: every accumulator row loaded serves four frames. */
#define P1_FRAMES 4

/* Template rows per sweep: 5 (sp_pass2: four clusters and the background column of the usual case in one sweep;
 * with the 3 moment rows 16 vector accumulators for two frames; sp_pass2g: up to five clusters, the background
 * level comes from pass 1). */
#define GROUP 5

/* uint16 frames (the usual detector format): exact float conversion, the small-count table. */
#define PIX uint16_t
#define LD_PX ld_u16
#define LOG_PX vlog1p_counts
#define F(name) name##_u16
#include "native_passes.h"
#undef PIX
#undef LD_PX
#undef LOG_PX
#undef F

/* float32 frames (e.g. EMPAD, processed data): the raw sums and CoM moments take the values as they are, the
 * log clips negative values at 0 (as the numpy path does); the series for every vector (the small-count table
 * holds integers only). Non-finite frames are rejected before the passes. */
INLINE vf vlog1p_float(vf x, smalltab t) {
    (void)t;
    vi keep = x > 0.0f;
    vi bits;
    memcpy(&bits, &x, sizeof bits);
    bits &= keep;
    memcpy(&x, &bits, sizeof x);
    return vlog1p(x, load_log_tables());
}

#define PIX float
#define LD_PX ld_f
#define LOG_PX vlog1p_float
#define F(name) name##_f32
#include "native_passes.h"
#undef PIX
#undef LD_PX
#undef LOG_PX
#undef F

/* Pixels per SIMD vector of this build (offsets in the background vector list are multiples of it). */
int sp_vector_pixels(void) { return VL; }


/* 1 when vectors with a count of 32 or more take the gather from the 65536-entry table, 0: the series. */
int sp_log_gather(void) { return SP_LOG_GATHER; }
