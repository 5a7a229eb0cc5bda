/* Forward render of the fast kernel (square crystal, nearest-neighbour F, flat detector) in one pass.
 *
 * The same physics as simulator._chunk_fast, term for term: per pixel and sub-pixel the unit direction,
 * per source the scattering vector Q = (diff - incident) / lambda (1/m), per orientation H = A Q (double),
 * h0 = ceil(H - 0.5), d = H - h0, |F_latt|^2 = prod_i sin^2(N_i pi d_i) / sin^2(pi d_i) (float), times
 * F(h0)^2; the sum over terms times r_e^2 fluence / steps, the solid angle and the polarisation of the
 * pixel's first sub-pixel.  torch evaluates this as some 25 passes over (orientations x 3 x pixels)
 * arrays; here each term stays in registers, which is what makes the whole-detector render cheap.
 *
 * sin(pi t) is an odd polynomial on the reduced argument (|t| <= 1/2 after removing the nearest integer,
 * which only flips the sign, and the sign does not matter once squared): absolute error below 1e-7, so the
 * ratio keeps float32 precision.  Each pixel's terms are summed in one fixed order,
 * so the image does not depend on how the rows are split between threads.
 */
#include <math.h>
#include <stdint.h>

typedef struct {
    int ov;               /* sub-pixels per pixel edge */
    int n_src, n_orient;
    int point_pixel;      /* solid angle 1/R^2 instead of px^2 cd / R^3 */
    int polar_mode;       /* 0: none, 1: K = 0 (0.5 (1 + cos^2 2theta)), 2: Kahn factor with frame E, B */
    double pix0[3], fdet[3], sdet[3];
    double px, close_distance, scale, kahn;
    double E_in[3], B_in[3];
    double N[3];
    const double *dirs;   /* (n_src, 3) unit incident directions */
    const double *lams;   /* (n_src,) wavelengths, m */
    const double *A;      /* (n_orient, 3, 3) rows a, b, c in m */
    const float *F;       /* structure factors, (hr, kr, lr) C order, or NULL */
    int dims[3], mins[3];
    float default_F;
} nb_spec;

/* sin(pi r) with r = t - rint(t) in [-1/2, 1/2]: |sin(pi t)| up to the sign, which squaring removes.
 * Taylor series to x^11 in x = pi r (|x| <= pi/2): truncation error below 6e-8. */
static inline float sinpi_red(float t)
{
    float r = t - rintf(t);
    float x = r * 3.14159265358979f;
    float x2 = x * x;
    float p = -2.5052108e-08f;
    p = p * x2 + 2.7557319e-06f;
    p = p * x2 - 1.9841270e-04f;
    p = p * x2 + 8.3333333e-03f;
    p = p * x2 - 1.6666667e-01f;
    return x + x * x2 * p;
}

/* prod_i sin^2(N_i pi d_i) / sin^2(pi d_i); the ratio of sines is taken before squaring (no underflow for
 * tiny d) and a 1e-30 offset turns d = 0 into sin(N e) / sin(e) = N, as the torch kernel does */
static inline float sincg3(float d0, float d1, float d2, float n0, float n1, float n2)
{
    d0 += 1e-30f; d1 += 1e-30f; d2 += 1e-30f;
    float r0 = sinpi_red(n0 * d0) / sinpi_red(d0);
    float r1 = sinpi_red(n1 * d1) / sinpi_red(d1);
    float r2 = sinpi_red(n2 * d2) / sinpi_red(d2);
    r0 *= r0; r1 *= r1; r2 *= r2;
    return r0 * r1 * r2;
}

/* The terms of W pixels (n = ov^2 sub-pixels each, unit directions dx, dy, dz (M = W n), first-sub-pixel
 * airpaths air0) summed into out[j] (j < W; skipped where mrow[j] == 0 when mrow is given).  One code path for
 * nb_render_rows and nb_render_pixels, so both give the same bits. */
static void render_block(const nb_spec *sp, int W, const double *dx, const double *dy, const double *dz,
                         const double *air0, double *qx, double *qy, double *qz, float *acc, float *out,
                         const uint8_t *mrow)
{
    const int n = sp->ov * sp->ov;
    const int M = W * n;
    const float n0 = (float)sp->N[0], n1 = (float)sp->N[1], n2 = (float)sp->N[2];
    const int hr = sp->dims[0], kr = sp->dims[1], lr = sp->dims[2];
    const int hm = sp->mins[0], km = sp->mins[1], lm = sp->mins[2];
    const float *F = sp->F;
    const float dF = sp->default_F;
    for (int m = 0; m < M; m++) acc[m] = 0.0f;
    for (int si = 0; si < sp->n_src; si++) {
        const double *inc = sp->dirs + 3 * si;
        const double il = 1.0 / sp->lams[si];
        for (int m = 0; m < M; m++) {
            qx[m] = (dx[m] - inc[0]) * il;
            qy[m] = (dy[m] - inc[1]) * il;
            qz[m] = (dz[m] - inc[2]) * il;
        }
        for (int o = 0; o < sp->n_orient; o++) {
            const double *a = sp->A + 9 * o;
            if (F) {
#pragma GCC ivdep
                for (int m = 0; m < M; m++) {
                    const double h = a[0] * qx[m] + a[1] * qy[m] + a[2] * qz[m];
                    const double k = a[3] * qx[m] + a[4] * qy[m] + a[5] * qz[m];
                    const double l = a[6] * qx[m] + a[7] * qy[m] + a[8] * qz[m];
                    const double h0 = ceil(h - 0.5), k0 = ceil(k - 0.5), l0 = ceil(l - 0.5);
                    const float t = sincg3((float)(h - h0), (float)(k - k0), (float)(l - l0), n0, n1, n2);
                    const int i = (int)h0 - hm, jj = (int)k0 - km, kk = (int)l0 - lm;
                    const int inside = (i >= 0) & (i < hr) & (jj >= 0) & (jj < kr) & (kk >= 0) & (kk < lr);
                    const float f = inside ? F[((long)i * kr + jj) * lr + kk] : dF;
                    acc[m] += t * (f * f);
                }
            } else {
                const float f2 = dF * dF;
                for (int m = 0; m < M; m++) {
                    const double h = a[0] * qx[m] + a[1] * qy[m] + a[2] * qz[m];
                    const double k = a[3] * qx[m] + a[4] * qy[m] + a[5] * qz[m];
                    const double l = a[6] * qx[m] + a[7] * qy[m] + a[8] * qz[m];
                    const float t = sincg3((float)(h - ceil(h - 0.5)), (float)(k - ceil(k - 0.5)),
                                           (float)(l - ceil(l - 0.5)), n0, n1, n2);
                    acc[m] += t * f2;
                }
            }
        }
    }
    const double *inc0 = sp->dirs;
    for (int j = 0; j < W; j++) {
        if (mrow && !mrow[j]) continue;
        double I = 0.0;
        for (int u = 0; u < n; u++) I += acc[j * n + u];
        const double R = air0[j];
        const double om = sp->point_pixel ? 1.0 / (R * R) : sp->px * sp->px * sp->close_distance / (R * R * R);
        double pol = 1.0;
        if (sp->polar_mode) {
            const int m = j * n;
            const double c = dx[m] * inc0[0] + dy[m] * inc0[1] + dz[m] * inc0[2];
            const double c2 = c * c;
            if (sp->polar_mode == 1) {
                pol = 0.5 * (1.0 + c2);
            } else {
                const double E = dx[m] * sp->E_in[0] + dy[m] * sp->E_in[1] + dz[m] * sp->E_in[2];
                const double B = dx[m] * sp->B_in[0] + dy[m] * sp->B_in[1] + dz[m] * sp->B_in[2];
                const double den = E * E + B * B;
                const double cos2psi = den > 0 ? (E * E - B * B) / den : 1.0;
                pol = 0.5 * (1.0 + c2 - sp->kahn * cos2psi * (1.0 - c2));
            }
        }
        out[j] = (float)(I * sp->scale * om * pol);
    }
}

/* unit directions of pixel (f, s)'s sub-pixels into d*[j n ..], its first sub-pixel's airpath into air0[j] */
static inline void pixel_dirs(const nb_spec *sp, int j, double f, double s, double *dx, double *dy, double *dz,
                              double *air0)
{
    const int ov = sp->ov, n = ov * ov;
    const double sub = sp->px / ov;
    const double Fb = f * sp->px, Sb = s * sp->px;
    for (int a = 0; a < ov; a++) {
        for (int b = 0; b < ov; b++) {
            const double Fd = Fb + (b + 0.5) * sub, Sd = Sb + (a + 0.5) * sub;
            const double x = sp->pix0[0] + sp->fdet[0] * Fd + sp->sdet[0] * Sd;
            const double y = sp->pix0[1] + sp->fdet[1] * Fd + sp->sdet[1] * Sd;
            const double z = sp->pix0[2] + sp->fdet[2] * Fd + sp->sdet[2] * Sd;
            const double R = sqrt(x * x + y * y + z * z);
            const int m = j * n + a * ov + b;
            dx[m] = x / R; dy[m] = y / R; dz[m] = z / R;
            if (a == 0 && b == 0) air0[j] = R;
        }
    }
}

/* Render rows [s_begin, s_end) x columns [f_begin, f_end) into out (row stride `stride` floats, out[0] being
 * pixel (s_begin, f_begin)).  mask (same layout, may be NULL): pixels with 0 are skipped (left untouched).
 * work: scratch of at least 8 * (f_end - f_begin) * ov^2 doubles. */
void nb_render_rows(const nb_spec *sp, int s_begin, int s_end, int f_begin, int f_end,
                    float *out, long stride, const uint8_t *mask, long mask_stride, double *work)
{
    const int n = sp->ov * sp->ov;
    const int W = f_end - f_begin;
    const int M = W * n;
    double *dx = work, *dy = work + M, *dz = work + 2 * M;
    double *qx = work + 3 * M, *qy = work + 4 * M, *qz = work + 5 * M;
    double *air0 = work + 6 * M;
    float *acc = (float *)(work + 7 * M);
    for (int s = s_begin; s < s_end; s++) {
        const uint8_t *mrow = mask ? mask + (long)(s - s_begin) * mask_stride : 0;
        if (mrow) {
            int any = 0;
            for (int j = 0; j < W; j++) any |= mrow[j];
            if (!any) continue;
        }
        for (int j = 0; j < W; j++) pixel_dirs(sp, j, (double)(f_begin + j), (double)s, dx, dy, dz, air0);
        render_block(sp, W, dx, dy, dz, air0, qx, qy, qz, acc, out + (long)(s - s_begin) * stride, mrow);
    }
}

/* Render the P listed pixels (fast fi[p], slow si[p]) into out[p]: the same bits as nb_render_rows gives them
 * (spot-local pixel sets without rendering whole rows). */
int nb_render_pixels(const nb_spec *sp, long P, const int64_t *fi, const int64_t *si_, float *out)
{
    const int n = sp->ov * sp->ov;
    const int Bmax = 256;
    const long Mb = (long)Bmax * n;
    double *work = (double *)malloc(sizeof(double) * (7 * Mb + Bmax) + sizeof(float) * Mb);
    if (!work) return -1;
    double *dx = work, *dy = work + Mb, *dz = work + 2 * Mb;
    double *qx = work + 3 * Mb, *qy = work + 4 * Mb, *qz = work + 5 * Mb;
    double *air0 = work + 6 * Mb;
    float *acc = (float *)(air0 + Bmax);
    for (long p0 = 0; p0 < P; p0 += Bmax) {
        const int B = (int)(P - p0 < Bmax ? P - p0 : Bmax);
        for (int j = 0; j < B; j++) pixel_dirs(sp, j, (double)fi[p0 + j], (double)si_[p0 + j], dx, dy, dz, air0);
        render_block(sp, B, dx, dy, dz, air0, qx, qy, qz, acc, out + p0, 0);
    }
    free(work);
    return 0;
}

int nb_abi_version(void) { return 2; }

/* ---------------------------------------------------------------------------------------------------------
 * The fused kernel's forward under autograd (simulator._FusedFastChunk), one source at a time: from unit
 * directions diff (3, M) (float), the term sum acc (M) and the loss-independent derivatives the hand-written
 * backward needs: G (n_orient*3, M) = d terms / dH, Gq (3, M) = sum_o A_o^T G_o, GN (3, M) = d terms / dN
 * (each may be NULL when not needed).  dr/dx = (N cos Nx - r cos x) / sin x, or its series x (c1 + c3 x^2)
 * where |N x| < 0.1; dr/dN = x cos Nx / sin x.  Vectorised over the sub-pixels, one orientation at a time.
 * ------------------------------------------------------------------------------------------------------- */

static inline float sinpi_s(float t, float *c)   /* sin(pi t) and cos(pi t), signed, any t */
{
    const float k = rintf(t);
    const float r = t - k;
    const float sg = 1.0f - 2.0f * (float)((int)k & 1);
    const float x = r * 3.14159265358979f, x2 = x * x;
    float p = -2.5052108e-08f;
    p = p * x2 + 2.7557319e-06f;
    p = p * x2 - 1.9841270e-04f;
    p = p * x2 + 8.3333333e-03f;
    p = p * x2 - 1.6666667e-01f;
    float q = 2.0876757e-09f;
    q = q * x2 - 2.7557319e-07f;
    q = q * x2 + 2.4801587e-05f;
    q = q * x2 - 1.3888889e-03f;
    q = q * x2 + 4.1666667e-02f;
    q = q * x2 - 0.5f;
    *c = sg * (1.0f + x2 * q);
    return sg * (x + x * x2 * p);
}

void nb_fused_source(const nb_spec *sp, long M, const float *diff, int si, float *acc, float *G, float *Gq,
                     float *GN)
{
    const double i0 = sp->dirs[3 * si], i1 = sp->dirs[3 * si + 1], i2 = sp->dirs[3 * si + 2];
    const double il = 1.0 / sp->lams[si];
    const float *Fp = sp->F;
    const int hr = sp->dims[0], kr = sp->dims[1], lr = sp->dims[2];
    const int hm = sp->mins[0], km = sp->mins[1], lm = sp->mins[2];
    const float dF = sp->default_F;
    float Nf[3], c1[3], c3[3];
    for (int i = 0; i < 3; i++) {
        Nf[i] = (float)sp->N[i];
        const float N2 = Nf[i] * Nf[i];
        c1[i] = -Nf[i] * (N2 - 1.0f) / 3.0f;
        c3[i] = Nf[i] * (N2 - 1.0f) * (3.0f * N2 - 7.0f) / 90.0f;
    }
    const int derive = (G != 0) | (Gq != 0) | (GN != 0);
    for (long m = 0; m < M; m++) acc[m] = 0.0f;
    if (Gq) for (long m = 0; m < 3 * M; m++) Gq[m] = 0.0f;
    if (GN) for (long m = 0; m < 3 * M; m++) GN[m] = 0.0f;
    const float PI = 3.14159265358979f;
    for (int o = 0; o < sp->n_orient; o++) {
        const double *ap = sp->A + 9 * o;
        const double a[9] = {ap[0], ap[1], ap[2], ap[3], ap[4], ap[5], ap[6], ap[7], ap[8]};
        float *Go = G ? G + (long)o * 3 * M : 0;
#pragma GCC ivdep
        for (long m = 0; m < M; m++) {
            const double q0 = (diff[m] - i0) * il, q1 = (diff[M + m] - i1) * il, q2 = (diff[2 * M + m] - i2) * il;
            const double h = a[0] * q0 + a[1] * q1 + a[2] * q2;
            const double k = a[3] * q0 + a[4] * q1 + a[5] * q2;
            const double l = a[6] * q0 + a[7] * q1 + a[8] * q2;
            const double h0 = ceil(h - 0.5), k0 = ceil(k - 0.5), l0 = ceil(l - 0.5);
            const float d[3] = {(float)(h - h0) + 1e-30f, (float)(k - k0) + 1e-30f, (float)(l - l0) + 1e-30f};
            float r[3], cN[3], cx[3], sx[3];
            for (int i = 0; i < 3; i++) {
                sx[i] = sinpi_s(d[i], &cx[i]);
                r[i] = sinpi_s(Nf[i] * d[i], &cN[i]) / sx[i];
            }
            float f = dF;
            if (Fp) {
                const int i = (int)h0 - hm, j = (int)k0 - km, kk = (int)l0 - lm;
                const int inside = (i >= 0) & (i < hr) & (j >= 0) & (j < kr) & (kk >= 0) & (kk < lr);
                f = inside ? Fp[((long)i * kr + j) * lr + kk] : dF;
            }
            const float F2 = f * f;
            const float r2[3] = {r[0] * r[0], r[1] * r[1], r[2] * r[2]};
            acc[m] += r2[0] * r2[1] * r2[2] * F2;
            if (derive) {
                const float oth[3] = {r2[1] * r2[2], r2[0] * r2[2], r2[0] * r2[1]};
                float g[3];
                for (int i = 0; i < 3; i++) {
                    const float common = 2.0f * F2 * oth[i] * r[i];
                    const float x = d[i] * PI;
                    const float Nx = Nf[i] * x;
                    const float drdx = fabsf(Nx) < 0.1f ? x * (c1[i] + c3[i] * x * x) : (Nf[i] * cN[i] - r[i] * cx[i]) / sx[i];
                    g[i] = common * drdx * PI;
                    if (GN) GN[i * M + m] += common * (x * cN[i] / sx[i]);
                }
                if (Go) { Go[m] = g[0]; Go[M + m] = g[1]; Go[2 * M + m] = g[2]; }
                if (Gq) {
                    Gq[m] += (float)(a[0] * g[0] + a[3] * g[1] + a[6] * g[2]);
                    Gq[M + m] += (float)(a[1] * g[0] + a[4] * g[1] + a[7] * g[2]);
                    Gq[2 * M + m] += (float)(a[2] * g[0] + a[5] * g[1] + a[8] * g[2]);
                }
            }
        }
    }
}

/* ---------------------------------------------------------------------------------------------------------
 * Forward + derivatives in one pass for render_loss (the refiner's route): for an explicit list of pixels
 * (fast index fi[p], slow index si[p]), the photons out[p] (float, the same float ops and summation order as
 * nb_render_rows, so equal to the forward image bit for bit) and, per pixel, the derivatives
 *   J[p*K + k] = d out[p] / d theta_k,  theta_k entering only through the orientation matrices, given
 *   D (n_orient, K, 3, 3) = d A_o / d theta_k,  so d H / d theta_k = D_ok Q (float64),
 *   JN[p*3 + i] = d out[p] / d N_i (may be NULL),
 * accumulated in float64.  Per term: dt/dH_i = 2 F^2 prod_{j!=i} r_j^2 r_i dr_i/dx_i pi with r = sin(N x) /
 * sin(x), x = pi d, dr/dx = (N cos Nx - r cos x) / sin x (its series x (c1 + c3 x^2) where |N x| < 0.1),
 * dr/dN = x cos Nx / sin x.  Each pixel is computed on its own in one fixed order: results do not depend on
 * how the pixel list is split between threads.
 * ------------------------------------------------------------------------------------------------------- */
#include <stdlib.h>

#define NB_GB 256  /* pixels per block */

/* sin(pi d), cos(pi d) for |d| <= 1/2 (no range reduction; the same polynomial as sinpi_red / sinpi_s) */
static inline float sinpi_half(float d, float *c)
{
    const float x = d * 3.14159265358979f, x2 = x * x;
    float p = -2.5052108e-08f;
    p = p * x2 + 2.7557319e-06f;
    p = p * x2 - 1.9841270e-04f;
    p = p * x2 + 8.3333333e-03f;
    p = p * x2 - 1.6666667e-01f;
    float q = 2.0876757e-09f;
    q = q * x2 - 2.7557319e-07f;
    q = q * x2 + 2.4801587e-05f;
    q = q * x2 - 1.3888889e-03f;
    q = q * x2 + 4.1666667e-02f;
    q = q * x2 - 0.5f;
    *c = 1.0f + x2 * q;
    return x + x * x2 * p;
}

/* one orientation's terms over M sub-pixels: acc += term, g0..g2 = d term / dH, jn += d term / dN (need_N) */
static inline void grad_terms(const double *a, long M, const double *qx, const double *qy, const double *qz,
                              const nb_spec *sp, const float *Nf, const float *c1, const float *c3, float *acc,
                              float *g0, float *g1, float *g2, double *jn, const int need_N,
                              const int KC, const float *Df, const float *fx, const float *fy, const float *fz,
                              float *jk)
{
    const int hr = sp->dims[0], kr = sp->dims[1], lr = sp->dims[2];
    const int hm = sp->mins[0], km = sp->mins[1], lm = sp->mins[2];
    const float *Fp = sp->F;
    const float dF = sp->default_F;
    const float PI = 3.14159265358979f;
#pragma GCC ivdep
    for (long m = 0; m < M; m++) {
        const double h = a[0] * qx[m] + a[1] * qy[m] + a[2] * qz[m];
        const double k = a[3] * qx[m] + a[4] * qy[m] + a[5] * qz[m];
        const double l = a[6] * qx[m] + a[7] * qy[m] + a[8] * qz[m];
        const double h0 = ceil(h - 0.5), k0 = ceil(k - 0.5), l0 = ceil(l - 0.5);
        const float d[3] = {(float)(h - h0) + 1e-30f, (float)(k - k0) + 1e-30f, (float)(l - l0) + 1e-30f};
        float r[3], cN[3], cx[3], iv[3];
        for (int i = 0; i < 3; i++) {
            iv[i] = 1.0f / sinpi_half(d[i], &cx[i]);
            r[i] = sinpi_s(Nf[i] * d[i], &cN[i]) * iv[i];
        }
        float f = dF;
        if (Fp) {
            const int i = (int)h0 - hm, jj = (int)k0 - km, kk = (int)l0 - lm;
            const int inside = (i >= 0) & (i < hr) & (jj >= 0) & (jj < kr) & (kk >= 0) & (kk < lr);
            f = inside ? Fp[((long)i * kr + jj) * lr + kk] : dF;
        }
        const float F2 = f * f;
        const float r2[3] = {r[0] * r[0], r[1] * r[1], r[2] * r[2]};
        acc[m] += r2[0] * r2[1] * r2[2] * F2;
        const float oth[3] = {r2[1] * r2[2], r2[0] * r2[2], r2[0] * r2[1]};
        float g[3];
        for (int i = 0; i < 3; i++) {
            const float common = 2.0f * F2 * oth[i] * r[i];
            const float x = d[i] * PI;
            const float Nx = Nf[i] * x;
            const float drdx = fabsf(Nx) < 0.1f ? x * (c1[i] + c3[i] * x * x)
                                                : (Nf[i] * cN[i] - r[i] * cx[i]) * iv[i];
            g[i] = common * drdx * PI;
            if (need_N) jn[i * M + m] += (double)(common * (x * cN[i] * iv[i]));
        }
        if (KC) {   /* d term / d theta_k = g . (D_ok Q), fused for small K (compile-time KC) */
            for (int kk = 0; kk < KC; kk++) {
                const float *e = Df + kk * 9;
                const float dh = e[0] * fx[m] + e[1] * fy[m] + e[2] * fz[m];
                const float dk = e[3] * fx[m] + e[4] * fy[m] + e[5] * fz[m];
                const float dl = e[6] * fx[m] + e[7] * fy[m] + e[8] * fz[m];
                jk[kk * M + m] += g[0] * dh + g[1] * dk + g[2] * dl;
            }
        } else {
            g0[m] = g[0]; g1[m] = g[1]; g2[m] = g[2];
        }
    }
}

int nb_grad_pixels(const nb_spec *sp, long P, const int64_t *fi, const int64_t *si_, const double *D, int K,
                   float *out, double *J, double *JN)
{
    const int ov = sp->ov, n = ov * ov;
    const long Mb = (long)NB_GB * n;
    const int nK = K > 0 ? K : 1;
    double *buf = (double *)malloc(sizeof(double) * (Mb * (6 + 3) + NB_GB) + sizeof(float) * Mb * (7 + nK));
    if (!buf) return -1;
    double *dx = buf, *dy = buf + Mb, *dz = buf + 2 * Mb;
    double *qx = buf + 3 * Mb, *qy = buf + 4 * Mb, *qz = buf + 5 * Mb;
    double *jn = buf + 6 * Mb;              /* (3, Mb) */
    double *air0 = jn + 3 * Mb;             /* (NB_GB) */
    float *acc = (float *)(air0 + NB_GB);   /* (Mb) */
    float *g0 = acc + Mb, *g1 = acc + 2 * Mb, *g2 = acc + 3 * Mb;
    float *fx = acc + 4 * Mb, *fy = acc + 5 * Mb, *fz = acc + 6 * Mb;   /* Q in float, for d H / d theta */
    float *jk = acc + 7 * Mb;               /* (K, Mb): per sub-pixel sums over orientations, like acc */
    const double sub = sp->px / ov;
    float Nf[3], c1[3], c3[3];
    for (int i = 0; i < 3; i++) {
        Nf[i] = (float)sp->N[i];
        const float N2 = Nf[i] * Nf[i];
        c1[i] = -Nf[i] * (N2 - 1.0f) / 3.0f;
        c3[i] = Nf[i] * (N2 - 1.0f) * (3.0f * N2 - 7.0f) / 90.0f;
    }
    /* d A / d theta in float, scaled to O(1): the products D Q are derivatives (float precision suffices; the
     * sums are float64); the scale is taken out again per pixel */
    const long nD = (long)sp->n_orient * K * 9;
    float *Df = (float *)malloc(sizeof(float) * (nD > 0 ? nD : 1));
    double *Ds = (double *)malloc(sizeof(double) * nK);
    if (!Df || !Ds) { free(buf); free(Df); free(Ds); return -1; }
    for (int kk = 0; kk < K; kk++) {
        double mx = 0.0;
        for (int o = 0; o < sp->n_orient; o++)
            for (int e = 0; e < 9; e++) mx = fmax(mx, fabs(D[((long)o * K + kk) * 9 + e]));
        Ds[kk] = mx > 0 ? mx : 1.0;
        for (int o = 0; o < sp->n_orient; o++)
            for (int e = 0; e < 9; e++) Df[((long)o * K + kk) * 9 + e] = (float)(D[((long)o * K + kk) * 9 + e] / Ds[kk]);
    }
    for (long p0 = 0; p0 < P; p0 += NB_GB) {
        const int B = (int)(P - p0 < NB_GB ? P - p0 : NB_GB);
        const long M = (long)B * n;
        for (int j = 0; j < B; j++) {
            const double Fb = (double)fi[p0 + j] * sp->px, Sb = (double)si_[p0 + j] * sp->px;
            for (int a = 0; a < ov; a++) {
                for (int b = 0; b < ov; b++) {
                    const double Fd = Fb + (b + 0.5) * sub, Sd = Sb + (a + 0.5) * sub;
                    const double x = sp->pix0[0] + sp->fdet[0] * Fd + sp->sdet[0] * Sd;
                    const double y = sp->pix0[1] + sp->fdet[1] * Fd + sp->sdet[1] * Sd;
                    const double z = sp->pix0[2] + sp->fdet[2] * Fd + sp->sdet[2] * Sd;
                    const double R = sqrt(x * x + y * y + z * z);
                    const int m = j * n + a * ov + b;
                    dx[m] = x / R; dy[m] = y / R; dz[m] = z / R;
                    if (a == 0 && b == 0) air0[j] = R;
                }
            }
        }
        for (long m = 0; m < M; m++) acc[m] = 0.0f;
        for (long m = 0; m < (long)K * M; m++) jk[m] = 0.0f;
        if (JN) for (long m = 0; m < 3 * M; m++) jn[m] = 0.0;
        for (int s = 0; s < sp->n_src; s++) {
            const double *inc = sp->dirs + 3 * s;
            const double il = 1.0 / sp->lams[s];
            for (long m = 0; m < M; m++) {
                qx[m] = (dx[m] - inc[0]) * il;
                qy[m] = (dy[m] - inc[1]) * il;
                qz[m] = (dz[m] - inc[2]) * il;
                fx[m] = (float)qx[m]; fy[m] = (float)qy[m]; fz[m] = (float)qz[m];
            }
            for (int o = 0; o < sp->n_orient; o++) {
                const double *ao = sp->A + 9 * o;
                const float *Do = Df + (long)o * K * 9;
#define NB_GT(NN, KK) grad_terms(ao, M, qx, qy, qz, sp, Nf, c1, c3, acc, g0, g1, g2, jn, NN, KK, Do, fx, fy, fz, jk)
                if (K >= 1 && K <= 3) {
                    if (JN) { if (K == 1) NB_GT(1, 1); else if (K == 2) NB_GT(1, 2); else NB_GT(1, 3); }
                    else { if (K == 1) NB_GT(0, 1); else if (K == 2) NB_GT(0, 2); else NB_GT(0, 3); }
                    continue;
                }
                if (JN) NB_GT(1, 0); else NB_GT(0, 0);
#undef NB_GT
                for (int kk = 0; kk < K; kk++) {
                    const float *e = Df + ((long)o * K + kk) * 9;
                    float *jrow = jk + (long)kk * M;
#pragma GCC ivdep
                    for (long m = 0; m < M; m++) {
                        const float dh = e[0] * fx[m] + e[1] * fy[m] + e[2] * fz[m];
                        const float dk = e[3] * fx[m] + e[4] * fy[m] + e[5] * fz[m];
                        const float dl = e[6] * fx[m] + e[7] * fy[m] + e[8] * fz[m];
                        jrow[m] += g0[m] * dh + g1[m] * dk + g2[m] * dl;
                    }
                }
            }
        }
        const double *inc0 = sp->dirs;
        for (int j = 0; j < B; j++) {
            double I = 0.0;
            for (int u = 0; u < n; u++) I += acc[j * n + u];
            const double R = air0[j];
            const double om = sp->point_pixel ? 1.0 / (R * R) : sp->px * sp->px * sp->close_distance / (R * R * R);
            double pol = 1.0;
            if (sp->polar_mode) {
                const int m = j * n;
                const double c = dx[m] * inc0[0] + dy[m] * inc0[1] + dz[m] * inc0[2];
                const double c2 = c * c;
                if (sp->polar_mode == 1) {
                    pol = 0.5 * (1.0 + c2);
                } else {
                    const double E = dx[m] * sp->E_in[0] + dy[m] * sp->E_in[1] + dz[m] * sp->E_in[2];
                    const double Bv = dx[m] * sp->B_in[0] + dy[m] * sp->B_in[1] + dz[m] * sp->B_in[2];
                    const double den = E * E + Bv * Bv;
                    const double cos2psi = den > 0 ? (E * E - Bv * Bv) / den : 1.0;
                    pol = 0.5 * (1.0 + c2 - sp->kahn * cos2psi * (1.0 - c2));
                }
            }
            const double fac = sp->scale * om * pol;
            out[p0 + j] = (float)(I * sp->scale * om * pol);   /* nb_render_rows' order of products */
            for (int kk = 0; kk < K; kk++) {
                double t = 0.0;
                for (int u = 0; u < n; u++) t += jk[(long)kk * M + j * n + u];
                J[(p0 + j) * K + kk] = t * fac * Ds[kk];
            }
            if (JN) {
                for (int i = 0; i < 3; i++) {
                    double t = 0.0;
                    for (int u = 0; u < n; u++) t += jn[(long)i * M + j * n + u];
                    JN[(p0 + j) * 3 + i] = t * fac;
                }
            }
        }
    }
    free(Df);
    free(Ds);
    free(buf);
    return 0;
}

/* out[k] += sum_p g[p] J[p*K + k] in pixel order (float64): the chain rule's last step, deterministic */
void nb_grad_reduce(long P, int K, const double *g, const double *J, double *out)
{
    for (long p = 0; p < P; p++) {
        const double gp = g[p];
        for (int k = 0; k < K; k++) out[k] += gp * J[p * K + k];
    }
}
