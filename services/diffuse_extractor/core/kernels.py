"""Fused one-pass kernels of the per-still path (numba, from Debian's ``python3-numba`` when present).

The numpy path gathers each table column with its own ``np.take`` over an index array, counts mask
bits and |q|-shell sums with ``np.bincount`` (which converts uint8 / float32 inputs to intp /
float64 copies first) and bins the beamstop image through float32 and float64 temporaries. Each
kernel here reads its inputs once, in memory order, and writes only its outputs:

- ``static_flat``: a flat panel's static pixel geometry and multipliers (``extract.static_pixels``);
- ``gather_panel``: the per-pixel table of one panel (q = u / lambda - s0, corrected intensity,
  sigma, the multipliers, raw, background, x, y) straight from the flags, no index array;
- ``flag_histogram``: the 256-bin histogram of the uint8 flags;
- ``shell_sums`` / ``shell_outliers``: the outlier test's per-|q|-shell counts and sums, and the
  pixels above the shell threshold;
- ``bin_weighted``: the beamstop search's b x b block sums of the weighted good pixels and counts;
- ``expand_blocks``: a binned image back to full resolution (each value over its b x b block).

Arithmetic follows the numpy path operation by operation (float32 where it is float32, float64
sums in the same order), so results are bit-identical to it; the tests compare both paths.
``enabled()`` is False when numba cannot be imported or ``DIFFUSE_EXTRACTOR_KERNELS=numpy`` is set
(read at each call); callers then use the numpy path. Compiled code is cached on disk when a cache
directory is writable (``NUMBA_CACHE_DIR`` otherwise).
"""
from __future__ import annotations

import os

import numpy as np

try:  # pragma: no cover - depends on the machine
    from numba import njit

    _HAVE_NUMBA = True
except Exception:  # noqa: BLE001 - any import problem means "not available"
    _HAVE_NUMBA = False

ENV = "DIFFUSE_EXTRACTOR_KERNELS"


def available() -> bool:
    return _HAVE_NUMBA


def enabled() -> bool:
    """The fused kernels unless numba is missing or ``DIFFUSE_EXTRACTOR_KERNELS=numpy`` is set."""
    return _HAVE_NUMBA and os.environ.get(ENV, "").lower() != "numpy"


def _jit(fn):
    """njit(nogil, cache) with a silent fallback to no disk cache when no cache directory is usable."""
    try:
        return njit(nogil=True, cache=True)(fn)
    except Exception:  # noqa: BLE001 - e.g. "cannot cache function: no locator available"
        return njit(nogil=True, cache=False)(fn)


if _HAVE_NUMBA:

    @_jit
    def gather_panel(flags, u, corr, pol, eff, lor, sa, air, mode, raw, bkg, has_bkg, bgvar, has_bgvar, nx, inv_wl,
                     s0, gain, bscale, bvar, bvar2, off, q, qn, total, cols, x_out, y_out, raw_out, bkg_out, net, sig):
        """Table rows of the unflagged pixels of one panel, written from row ``off`` on; returns the count.

        Multipliers j = 0..4 (polarisation, efficiency, lorentz, solid_angle, air) go to ``cols[j]``
        per ``mode[j]``: 0 = not written (a constant table column), 1 = gathered from the panel's
        array, 2 = filled with its element 0 (a constant panel in a varying column).
        float32 arithmetic as ``extract._tabulate``: q = u (1/lambda) - s0, |q| = sqrt((qx^2 + qy^2) + qz^2);
        var = gain max(raw, gain) [+ bvar max(bkg bscale, 0), or + bvar2 bgvar with a background variance];
        I = (raw [- bkg bscale]) c; sigma = sqrt(var) c.
        """
        npix = flags.shape[0]
        o = off
        zero = np.float32(0.0)
        m0, m1, m2, m3, m4 = mode[0], mode[1], mode[2], mode[3], mode[4]
        s_0, s_1, s_2, s_3, s_4 = (m0 == 1) * 1, (m1 == 1) * 1, (m2 == 1) * 1, (m3 == 1) * 1, (m4 == 1) * 1
        ny = npix // nx
        for yy in range(ny):  # (two loops: no division per pixel for x and y)
            for xx in range(nx):
                p = yy * nx + xx
                if flags[p] != 0:
                    continue
                c = corr[p]
                r = raw[p]
                qx = u[0, p] * inv_wl - s0[0]
                qy = u[1, p] * inv_wl - s0[1]
                qz = u[2, p] * inv_wl - s0[2]
                q[0, o] = qx
                q[1, o] = qy
                q[2, o] = qz
                qn[o] = np.sqrt((qx * qx + qy * qy) + qz * qz)
                total[o] = c
                # (written out: a loop over a tuple of arrays costs reference counting per pixel)
                if m0 != 0:
                    cols[0, o] = pol[p * s_0]
                if m1 != 0:
                    cols[1, o] = eff[p * s_1]
                if m2 != 0:
                    cols[2, o] = lor[p * s_2]
                if m3 != 0:
                    cols[3, o] = sa[p * s_3]
                if m4 != 0:
                    cols[4, o] = air[p * s_4]
                x_out[o] = xx
                y_out[o] = yy
                raw_out[o] = r
                v = r if not (r < gain) else gain  # np.maximum (NaN propagates)
                v = v * gain
                if has_bkg:
                    b = bkg[p] * bscale
                    bkg_out[o] = b
                    if has_bgvar:
                        v = v + bvar2 * bgvar[p]
                    else:
                        bp = b if not (b < zero) else zero
                        v = v + bvar * bp
                    net[o] = (r - b) * c
                else:
                    net[o] = r * c
                sig[o] = np.sqrt(v) * c
                o += 1
        return o - off

    @_jit
    def static_flat(a, b, b2, a2d, coef, s_lo, inv_h, fc, consts, eff_known, has_lor, u, pol, eff, sa, air, tot,
                    lor, rbin):
        """``extract._static_flat_numpy`` for a whole flat panel in one pass (same float64 operations): per
        pixel ``s = b^2 + (a^2 + d0^2)``, the five radial functions from the local cubics of ``coef``
        (``extract.radial_table``), the unit vector ``u_j = (b cb_j + a ca_j) g/|r'| + c_j/|r'|`` (rows 0-2 of
        ``fc``; rows 3, 4, 5: polarisation normal, beam direction, Lorentz axis), the multipliers, their
        product and the |q| shell."""
        ny = b.shape[0]
        nx = a.shape[0]
        n_int = coef.shape[0]
        p_a, p_b, p_c, qk, qs = consts[0], consts[1], consts[2], consts[3], consts[4]
        # (the constants as scalars: stores to the outputs would otherwise make the compiler reload them)
        c00, c01, c02, c10, c11, c12 = fc[0, 0], fc[0, 1], fc[0, 2], fc[1, 0], fc[1, 1], fc[1, 2]
        c20, c21, c22, c30, c31, c32 = fc[2, 0], fc[2, 1], fc[2, 2], fc[3, 0], fc[3, 1], fc[3, 2]
        c40, c41, c42, c50, c51, c52 = fc[4, 0], fc[4, 1], fc[4, 2], fc[5, 0], fc[5, 1], fc[5, 2]
        for y in range(ny):
            by = b[y]
            b2y = b2[y]
            row = y * nx
            for x in range(nx):
                p = row + x
                ax = a[x]
                t = (b2y + a2d[x] - s_lo) * inv_h
                i = int(t)
                if i > n_int - 1:
                    i = n_int - 1
                w = t - i
                inv = coef[i, 0] + w * (coef[i, 1] + w * (coef[i, 2] + w * coef[i, 3]))
                gi = coef[i, 4] + w * (coef[i, 5] + w * (coef[i, 6] + w * coef[i, 7]))
                ev = coef[i, 8] + w * (coef[i, 9] + w * (coef[i, 10] + w * coef[i, 11]))
                sv = coef[i, 12] + w * (coef[i, 13] + w * (coef[i, 14] + w * coef[i, 15]))
                av = coef[i, 16] + w * (coef[i, 17] + w * (coef[i, 18] + w * coef[i, 19]))
                u[0, p] = (by * c02 + ax * c01) * gi + inv * c00
                u[1, p] = (by * c12 + ax * c11) * gi + inv * c10
                u[2, p] = (by * c22 + ax * c21) * gi + inv * c20
                p1 = (by * c32 + ax * c31) * gi + inv * c30
                p3 = (by * c42 + ax * c41) * gi + inv * c40
                pv = 1.0 / (p1 * p1 * p_b + p_a + p3 * p3 * p_c)
                pol[p] = pv
                tt = pv
                if eff_known:
                    eff[p] = ev
                    tt = tt * ev
                sa[p] = sv
                tt = tt * sv
                air[p] = av
                tt = tt * av
                if has_lor:
                    lo = abs((by * c52 + ax * c51) * gi + inv * c50)
                    lor[p] = lo
                    tt = tt * lo
                tot[p] = tt
                qn = np.sqrt((1.0 - p3) * qk) * qs
                rbin[p] = min(qn, 1999.0)

    @_jit
    def flag_histogram(flags, hist):
        """hist[v] += number of pixels with flag value v (uint8, flattened)."""
        for p in range(flags.shape[0]):
            hist[flags[p]] += 1

    @_jit
    def shell_sums(d, w, has_w, flags, rbin, cnt, num):
        """Per |q| shell: cnt += 1 and num += float32(d w) over the unflagged pixels (index order)."""
        for p in range(d.shape[0]):
            if flags[p] != 0:
                continue
            v = d[p] * w[p] if has_w else d[p]
            b = rbin[p]
            cnt[b] += 1.0
            num[b] += np.float64(v)

    @_jit
    def shell_outliers(d, w, has_w, flags, rbin, thr, hits):
        """Flat indices of the unflagged pixels with float32(d w) > thr[shell] into ``hits`` (as many as
        fit, in index order); returns how many there are."""
        n = 0
        nb = thr.shape[0]
        cap = hits.shape[0]
        for p in range(d.shape[0]):
            if flags[p] != 0:
                continue
            v = d[p] * w[p] if has_w else d[p]
            b = min(max(rbin[p], 0), nb - 1)
            if np.float64(v) > thr[b]:
                if n < cap:
                    hits[n] = p
                n += 1
        return n

    @_jit
    def expand_blocks(f, b, out):
        """out[y, x] = f[y // b, x // b] (``masks._expand``)."""
        ny, nx = out.shape
        nfull = nx // b
        for y in range(ny):
            row = f[y // b]
            orow = out[y]
            for bx in range(nfull):
                v = row[bx]
                for j in range(bx * b, bx * b + b):
                    orow[j] = v
            for x in range(nfull * b, nx):
                orow[x] = row[nfull]

    @_jit
    def bin_weighted(d, w, has_w, good, b, out_sum, out_cnt):
        """b x b block sums (float64, rows first then columns, as ``masks._bin_sum``) of float32(d w)
        over the ``good`` pixels (others count 0), and the number of good pixels per block."""
        ny, nx = d.shape
        nyb, nxb = out_sum.shape
        rows = np.empty(nx, np.float64)
        rcnt = np.empty(nx, np.int64)
        for by in range(nyb):
            rows[:] = 0.0
            rcnt[:] = 0
            for j in range(b):
                y = by * b + j
                if y >= ny:
                    break
                for x in range(nx):
                    if good[y, x]:
                        v = d[y, x] * w[y, x] if has_w else d[y, x]
                        rows[x] += np.float64(v)
                        rcnt[x] += 1
            for bx in range(nxb):
                s = 0.0
                n = 0
                for j in range(b):
                    x = bx * b + j
                    if x >= nx:
                        break
                    s += rows[x]
                    n += rcnt[x]
                out_sum[by, bx] = s
                out_cnt[by, bx] = n


    @_jit
    def stats_add(d, flags, bad, n, total, sumsq, n_zero):
        """Add one still to the running sums (``runstats.RunningPixelStats.add``): pixels without a ``bad``
        bit count; d as float64, total += d, sumsq += d d, n += 1, n_zero += (d == 0)."""
        for p in range(d.shape[0]):
            if flags[p] & bad:
                continue
            v = np.float64(d[p])
            n[p] += 1
            total[p] += v
            sumsq[p] += v * v
            if v == 0.0:
                n_zero[p] += 1

    @_jit
    def box_rows(src, size, out):
        """``scipy.ndimage.uniform_filter1d(src, size, axis=0, mode="constant", cval=0)`` for 2-D float64,
        with scipy's arithmetic (a running sum over the zero-extended line, divided per output), so the
        values are bit-identical; each column is its own line, processed row by row (memory order)."""
        ny, nx = src.shape
        s1 = size // 2
        s2 = size - s1 - 1
        tmp = np.zeros(nx)
        for j in range(size):  # the first window: lines extended by s1 zeros before the data
            y = j - s1
            if 0 <= y < ny:
                for x in range(nx):
                    tmp[x] += src[y, x]
            else:
                for x in range(nx):
                    tmp[x] += 0.0
        for x in range(nx):
            out[0, x] = tmp[x] / size
        for y in range(1, ny):
            ya = y + s2  # the value entering the window
            yb = y - s1 - 1  # the value leaving it
            for x in range(nx):
                a = src[ya, x] if ya < ny else 0.0
                b = src[yb, x] if yb >= 0 else 0.0
                tmp[x] += a - b
                out[y, x] = tmp[x] / size

    @_jit
    def box_cols_row(row, size, out):
        """``box_rows`` along one row (axis 1) into ``out``."""
        nx = row.shape[0]
        s1 = size // 2
        s2 = size - s1 - 1
        tmp = 0.0
        for j in range(size):
            x = j - s1
            tmp += row[x] if 0 <= x < nx else 0.0
        out[0] = tmp / size
        for x in range(1, nx):
            xa = x + s2
            xb = x - s1 - 1
            a = row[xa] if xa < nx else 0.0
            b = row[xb] if xb >= 0 else 0.0
            tmp += a - b
            out[x] = tmp / size

    @_jit
    def _mean_row(n, total, y, mrow, wrow):
        """Row ``y`` of the per-pixel mean (0 where unseen) and of the seen indicator."""
        for x in range(n.shape[1]):
            if n[y, x] > 0:
                mrow[x] = total[y, x] / np.float64(n[y, x])
                wrow[x] = 1.0
            else:
                mrow[x] = 0.0
                wrow[x] = 0.0

    @_jit
    def hot_dead(n, total, sumsq, n_zero, size, hot_factor, hot_nsigma, steady_factor, dead_expected, hot_bit,
                 dead_bit, out):
        """``runstats.RunningPixelStats.hot_dead_flags`` for one panel, operation by operation (same float64
        values, so the same flags): mean, variance, the neighbourhood mean (box filter as scipy's
        ``uniform_filter``: rows first, then columns, the arithmetic of ``box_rows`` / ``box_cols_row``) and
        the rule. Streams over the rows: the mean and seen images are kept only for the size + 1 rows the
        vertical running sums need (a ring), so no full-size temporary is made. Per row the column filter
        runs on both images at once and its divisions are separate loops (vectorised): ~1.4x faster than
        calling ``box_cols_row`` twice."""
        ny, nx = n.shape
        s1 = size // 2
        s2 = size - s1 - 1
        R = size + 1
        ring_m = np.empty((R, nx))
        ring_w = np.empty((R, nx))
        zero = np.zeros(nx)
        tm = np.zeros(nx)
        tw = np.zeros(nx)
        rm = np.empty(nx)
        fm = np.empty(nx)
        fw = np.empty(nx)
        rw = np.empty(nx)
        for yy in range(min(s2 + 1, ny)):
            _mean_row(n, total, yy, ring_m[yy % R], ring_w[yy % R])
        for j in range(size):
            yy = j - s1
            if 0 <= yy < ny:
                rmv = ring_m[yy % R]
                rwv = ring_w[yy % R]
                for x in range(nx):
                    tm[x] += rmv[x]
                    tw[x] += rwv[x]
            else:
                for x in range(nx):
                    tm[x] += 0.0
                    tw[x] += 0.0
        area = np.float64(size * size)
        fsize = np.float64(size)
        for y in range(ny):
            if y > 0:
                ya = y + s2
                yb = y - s1 - 1
                if ya < ny:
                    _mean_row(n, total, ya, ring_m[ya % R], ring_w[ya % R])
                    am = ring_m[ya % R]
                    aw = ring_w[ya % R]
                else:
                    am = zero
                    aw = zero
                if yb >= 0:
                    bm = ring_m[yb % R]
                    bw = ring_w[yb % R]
                else:
                    bm = zero
                    bw = zero
                for x in range(nx):
                    tm[x] += am[x] - bm[x]
                    tw[x] += aw[x] - bw[x]
            # the row filter of tm / size and tw / size (box_cols_row's arithmetic, both at once)
            for x in range(nx):
                fm[x] = tm[x] / fsize
                fw[x] = tw[x] / fsize
            accm = 0.0
            accw = 0.0
            for j in range(size):
                x = j - s1
                if 0 <= x < nx:
                    accm += fm[x]
                    accw += fw[x]
                else:
                    accm += 0.0
                    accw += 0.0
            rm[0] = accm
            rw[0] = accw
            for x in range(1, nx):
                xa = x + s2
                xb = x - s1 - 1
                am_ = fm[xa] if xa < nx else 0.0
                bm_ = fm[xb] if xb >= 0 else 0.0
                aw_ = fw[xa] if xa < nx else 0.0
                bw_ = fw[xb] if xb >= 0 else 0.0
                accm += am_ - bm_
                accw += aw_ - bw_
                rm[x] = accm
                rw[x] = accw
            for x in range(nx):
                rm[x] = rm[x] / fsize
                rw[x] = rw[x] / fsize
            mrow = ring_m[y % R]
            for x in range(nx):
                nn = n[y, x]
                if nn == 0:
                    out[y, x] = 0
                    continue
                mv = mrow[x]
                tot = rm[x] * area - mv
                cnt = rw[x] * area - 1.0
                loc = tot / (cnt if cnt > 1.0 else 1.0) if cnt > 0.5 else 0.0
                nf = np.float64(nn)
                f = 0
                if mv > hot_factor * loc:
                    if mv - loc > hot_nsigma * np.sqrt((loc if loc > 1.0 else 1.0) / nf):
                        var = sumsq[y, x] / nf - mv * mv
                        if var <= steady_factor * (mv if mv > 1.0 else 1.0):
                            f |= hot_bit
                if n_zero[y, x] == nn and loc * nf > dead_expected:
                    f |= dead_bit
                out[y, x] = f


def warm_up() -> bool:
    """Load every kernel (from the disk cache, else compile) with the argument types the extraction uses.

    numba imports ~60 of its modules and loads the machine code on a kernel's first call (~0.4 s
    in all); a worker calls this when it starts so that its first job does not pay for it.
    Returns whether the kernels are enabled.
    """
    if not enabled():
        return False
    f32, u8 = np.float32, np.uint8
    one = np.ones(4, f32)
    flags = np.zeros(4, u8)
    cols2 = np.empty((5, 4), f32)
    q = np.empty((3, 4), f32)
    u16 = np.empty(4, np.uint16)
    gather_panel(flags, np.ones((3, 4), f32), one, one, one, one, one, one, np.ones(5, np.int64), one, one,
                 False, one, False, 2, f32(1.0), np.zeros(3, f32), f32(1.0), f32(1.0), f32(1.0), f32(1.0), 0, q,
                 one.copy(), one.copy(),
                 cols2,
                 u16, u16.copy(), one.copy(), one.copy(), one.copy(), one.copy())
    flag_histogram(flags, np.zeros(256, np.int64))
    f64 = np.ones(2)
    static_flat(f64, f64, f64, f64, np.zeros((1, 20)), 1.0, 1.0, np.zeros((6, 3)), np.ones(5), True, False,
                np.empty((3, 4), f32), one.copy(), one.copy(), one.copy(), one.copy(), one.copy(), one.copy(),
                np.empty(4, np.uint16))
    rbin = np.zeros(4, np.uint16)  # PanelPixels.radial_bin
    shell_sums(one, one, True, flags, rbin, np.zeros(1), np.zeros(1))
    shell_outliers(one, one, True, flags, rbin, np.zeros(1), np.zeros(4, np.int64))
    bin_weighted(np.ones((2, 2), f32), np.ones((2, 2), f32), True, np.ones((2, 2), bool), 2,
                 np.empty((1, 1)), np.empty((1, 1)))
    expand_blocks(np.zeros((1, 1), u8), 2, np.empty((2, 2), u8))
    stats_add(one, flags, u8(3), np.zeros(4, np.uint16), np.zeros(4), np.zeros(4), np.zeros(4, np.uint16))
    hot_dead(np.ones((2, 2), np.uint16), np.ones((2, 2)), np.ones((2, 2)), np.zeros((2, 2), np.uint16), 7, 5.0, 8.0,
             4.0, 20.0, 1, 2, np.empty((2, 2), u8))
    return True
