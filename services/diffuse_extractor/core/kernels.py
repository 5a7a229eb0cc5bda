"""Fused one-pass kernels of the per-still path (numba, from Debian's ``python3-numba`` when present).

The numpy path gathers each table column with its own ``np.take`` over an index array, counts mask
bits and |q|-shell sums with ``np.bincount`` (which converts uint8 / float32 inputs to intp /
float64 copies first) and bins the beamstop image through float32 and float64 temporaries. Each
kernel here reads its inputs once, in memory order, and writes only its outputs:

- ``static_flat``: a flat panel's static pixel geometry and multipliers (``extract.static_pixels``);
- ``gather_panel``: the per-pixel table of one panel (q = u / lambda - s0, hkl, corrected intensity,
  sigma, exposure, the multipliers, raw, background, x, y), row by row from the flags;
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


def _jit_vec(fn):
    """``_jit`` with numpy's error model: a division by zero gives inf/nan instead of raising, so that loops
    with divisions vectorise (callers divide by nonzero values only)."""
    try:
        return njit(nogil=True, cache=True, error_model="numpy")(fn)
    except Exception:  # noqa: BLE001 - as _jit
        return njit(nogil=True, cache=False, error_model="numpy")(fn)


if _HAVE_NUMBA:

    # gather_panel's passes over the unflagged pixels of one detector row (1-D arrays: they vectorise, see _hd_*)
    @_jit_vec
    def _gt_select(frow, idx):
        """The columns of the row's unflagged pixels into ``idx`` (branch-free); returns how many."""
        m = 0
        for x in range(frow.shape[0]):
            idx[m] = x
            m += frow[x] == 0
        return m

    @_jit_vec
    def _gt_take(src, idx, m, out):
        for k in range(m):
            out[k] = src[idx[k]]

    @_jit_vec
    def _gt_fill(out, v):
        for k in range(out.shape[0]):
            out[k] = v

    @_jit_vec
    def _gt_q(qc, inv_wl, s):
        """One q component in place from the gathered unit-vector component: u (1/lambda) - s0."""
        for k in range(qc.shape[0]):
            qc[k] = qc[k] * inv_wl - s

    @_jit_vec
    def _gt_qn(qx, qy, qz, out):
        for k in range(out.shape[0]):
            out[k] = np.sqrt((qx[k] * qx[k] + qy[k] * qy[k]) + qz[k] * qz[k])

    @_jit_vec
    def _gt_hkl(qx, qy, qz, a0, a1, a2, out):
        for k in range(out.shape[0]):
            out[k] = (a0 * qx[k] + a1 * qy[k]) + a2 * qz[k]

    @_jit_vec
    def _gt_inv(c, out):
        one = np.float32(1.0)
        for k in range(out.shape[0]):
            out[k] = one / c[k]

    @_jit_vec
    def _gt_net_sig(r, c, gain, net, sig):
        for k in range(r.shape[0]):
            rk = r[k]
            ck = c[k]
            v = rk if not (rk < gain) else gain  # np.maximum (NaN propagates)
            v = v * gain
            net[k] = rk * ck
            sig[k] = np.sqrt(v) * ck

    @_jit_vec
    def _gt_net_sig_bkg(r, c, b, bgv, has_bgvar, gain, bscale, bvar, bvar2, net, sig):
        """As ``_gt_net_sig`` with a background (``b`` scaled in place by ``bscale``) and its variance."""
        zero = np.float32(0.0)
        for k in range(r.shape[0]):
            rk = r[k]
            ck = c[k]
            v = rk if not (rk < gain) else gain
            v = v * gain
            bk = b[k] * bscale
            b[k] = bk
            if has_bgvar:
                v = v + bvar2 * bgv[k]
            else:
                bp = bk if not (bk < zero) else zero
                v = v + bvar * bp
            net[k] = (rk - bk) * ck
            sig[k] = np.sqrt(v) * ck

    @_jit
    def gather_panel(flags, u, corr, pol, eff, lor, sa, air, mode, raw, bkg, has_bkg, bgvar, has_bgvar, nx, inv_wl,
                     s0, gain, bscale, bvar, bvar2, off, q, qn, total, cols, x_out, y_out, raw_out, bkg_out, net, sig,
                     ainv, has_hkl, hkl, expo):
        """Table rows of the unflagged pixels of one panel, written from row ``off`` on; returns the count.

        Multipliers j = 0..4 (polarisation, efficiency, lorentz, solid_angle, air) go to ``cols[j]``
        per ``mode[j]``: 0 = not written (a constant table column), 1 = gathered from the panel's
        array, 2 = filled with its element 0 (a constant panel in a varying column).
        float32 arithmetic as ``extract._tabulate``: q = u (1/lambda) - s0, |q| = sqrt((qx^2 + qy^2) + qz^2);
        var = gain max(raw, gain) [+ bvar max(bkg bscale, 0), or + bvar2 bgvar with a background variance];
        I = (raw [- bkg bscale]) c; sigma = sqrt(var) c; exposure 1 / c; with ``has_hkl`` the indices
        h_j = (ainv[j, 0] qx + ainv[j, 1] qy) + ainv[j, 2] qz (``extract._hkl``'s float32 operations).
        Row by row: the row's unflagged columns are listed, the inputs gathered at them straight into the output
        columns (u into q, the correction, raw counts, multipliers, background), and the arithmetic runs in
        passes over those contiguous rows, which vectorise (~1.3x less CPU than one scalar pass per pixel).
        """
        npix = flags.shape[0]
        ny = npix // nx
        idx = np.empty(nx, np.int64)
        bgv = np.empty(nx, np.float32)
        o = off
        for yy in range(ny):
            row = yy * nx
            end = row + nx
            m = _gt_select(flags[row:end], idx)
            if m == 0:
                continue
            e = o + m
            _gt_take(u[0, row:end], idx, m, q[0, o:e])
            _gt_take(u[1, row:end], idx, m, q[1, o:e])
            _gt_take(u[2, row:end], idx, m, q[2, o:e])
            _gt_take(corr[row:end], idx, m, total[o:e])
            _gt_take(raw[row:end], idx, m, raw_out[o:e])
            # (written out: a loop over a tuple of arrays costs reference counting)
            if mode[0] == 1:
                _gt_take(pol[row:end], idx, m, cols[0, o:e])
            elif mode[0] == 2:
                _gt_fill(cols[0, o:e], pol[0])
            if mode[1] == 1:
                _gt_take(eff[row:end], idx, m, cols[1, o:e])
            elif mode[1] == 2:
                _gt_fill(cols[1, o:e], eff[0])
            if mode[2] == 1:
                _gt_take(lor[row:end], idx, m, cols[2, o:e])
            elif mode[2] == 2:
                _gt_fill(cols[2, o:e], lor[0])
            if mode[3] == 1:
                _gt_take(sa[row:end], idx, m, cols[3, o:e])
            elif mode[3] == 2:
                _gt_fill(cols[3, o:e], sa[0])
            if mode[4] == 1:
                _gt_take(air[row:end], idx, m, cols[4, o:e])
            elif mode[4] == 2:
                _gt_fill(cols[4, o:e], air[0])
            for k in range(m):
                x_out[o + k] = idx[k]
            _gt_fill(y_out[o:e], yy)
            _gt_q(q[0, o:e], inv_wl, s0[0])
            _gt_q(q[1, o:e], inv_wl, s0[1])
            _gt_q(q[2, o:e], inv_wl, s0[2])
            _gt_qn(q[0, o:e], q[1, o:e], q[2, o:e], qn[o:e])
            if has_hkl:
                for j in range(3):
                    _gt_hkl(q[0, o:e], q[1, o:e], q[2, o:e], ainv[j, 0], ainv[j, 1], ainv[j, 2], hkl[j, o:e])
            _gt_inv(total[o:e], expo[o:e])
            if has_bkg:
                _gt_take(bkg[row:end], idx, m, bkg_out[o:e])
                if has_bgvar:
                    _gt_take(bgvar[row:end], idx, m, bgv[:m])
                _gt_net_sig_bkg(raw_out[o:e], total[o:e], bkg_out[o:e], bgv[:m], has_bgvar, gain, bscale, bvar,
                                bvar2, net[o:e], sig[o:e])
            else:
                _gt_net_sig(raw_out[o:e], total[o:e], gain, net[o:e], sig[o:e])
            o = e
        return o - off

    # static_flat's passes over one detector row (1-D arrays: LLVM vectorises them, see _hd_* below; the table
    # look-up is a gather and stays scalar)
    @_jit_vec
    def _sf_t(a2d, b2y, s_lo, inv_h, n_int, idx, w):
        """Interval index and position within it of ``s = b^2 + (a^2 + d0^2)`` along a row."""
        for x in range(a2d.shape[0]):
            t = (b2y + a2d[x] - s_lo) * inv_h
            i = int(t)
            i = i if i < n_int - 1 else n_int - 1
            idx[x] = i
            w[x] = t - i

    @_jit_vec
    def _sf_interp5(coef, idx, w, inv, gi, ev, sv, av):
        """The five radial functions from their local cubics."""
        for x in range(idx.shape[0]):
            i = idx[x]
            wx = w[x]
            inv[x] = coef[i, 0] + wx * (coef[i, 1] + wx * (coef[i, 2] + wx * coef[i, 3]))
            gi[x] = coef[i, 4] + wx * (coef[i, 5] + wx * (coef[i, 6] + wx * coef[i, 7]))
            ev[x] = coef[i, 8] + wx * (coef[i, 9] + wx * (coef[i, 10] + wx * coef[i, 11]))
            sv[x] = coef[i, 12] + wx * (coef[i, 13] + wx * (coef[i, 14] + wx * coef[i, 15]))
            av[x] = coef[i, 16] + wx * (coef[i, 17] + wx * (coef[i, 18] + wx * coef[i, 19]))

    @_jit_vec
    def _sf_form(a, by, gi, inv, cc, cf, cs, out):
        """``v . u`` for a fixed vector v: ``(b cs + a cf) g/|r'| + cc/|r'|``."""
        for x in range(a.shape[0]):
            out[x] = (by * cs + a[x] * cf) * gi[x] + inv[x] * cc

    @_jit_vec
    def _sf_abs_form(a, by, gi, inv, cc, cf, cs, out):
        for x in range(a.shape[0]):
            out[x] = abs((by * cs + a[x] * cf) * gi[x] + inv[x] * cc)

    @_jit_vec
    def _sf_pol(a, by, gi, inv, c30, c31, c32, c40, c41, c42, p_a, p_b, p_c, pv, p3o):
        """1/P from the polarisation normal (row 3) and beam direction (row 4) forms; the latter kept for |q|."""
        for x in range(a.shape[0]):
            ax = a[x]
            g = gi[x]
            iv = inv[x]
            p1 = (by * c32 + ax * c31) * g + iv * c30
            p3 = (by * c42 + ax * c41) * g + iv * c40
            pv[x] = 1.0 / (p1 * p1 * p_b + p_a + p3 * p3 * p_c)
            p3o[x] = p3

    @_jit_vec
    def _sf_mul(t, a):
        for x in range(t.shape[0]):
            t[x] = t[x] * a[x]

    @_jit_vec
    def _sf_store(src, dst):
        for x in range(src.shape[0]):
            dst[x] = src[x]

    @_jit_vec
    def _sf_rbin(p3, qk, qs, rbin):
        for x in range(p3.shape[0]):
            qn = np.sqrt((1.0 - p3[x]) * qk) * qs
            rbin[x] = min(qn, 1999.0)

    @_jit
    def static_flat(a, b, b2, a2d, coef, s_lo, inv_h, fc, consts, eff_known, has_lor, u, pol, eff, sa, air, tot,
                    lor, rbin):
        """``extract._static_flat_numpy`` for a whole flat panel (same float64 operations, same bits): per
        pixel ``s = b^2 + (a^2 + d0^2)``, the five radial functions from the local cubics of ``coef``
        (``extract.radial_table``), the unit vector ``u_j = (b cb_j + a ca_j) g/|r'| + c_j/|r'|`` (rows 0-2 of
        ``fc``; rows 3, 4, 5: polarisation normal, beam direction, Lorentz axis), the multipliers, their
        product (in the order 1/P, 1/QE, solid angle, air, Lorentz) and the |q| shell. Row by row in passes
        over row buffers that vectorise (~1.7x less CPU than one scalar pass per pixel)."""
        ny = b.shape[0]
        nx = a.shape[0]
        n_int = coef.shape[0]
        p_a, p_b, p_c, qk, qs = consts[0], consts[1], consts[2], consts[3], consts[4]
        idx = np.empty(nx, np.int64)
        w = np.empty(nx)
        inv = np.empty(nx)
        gi = np.empty(nx)
        ev = np.empty(nx)
        sv = np.empty(nx)
        av = np.empty(nx)
        pv = np.empty(nx)
        p3 = np.empty(nx)
        lo = np.empty(nx)
        tt = np.empty(nx)
        for y in range(ny):
            by = b[y]
            row = y * nx
            _sf_t(a2d, b2[y], s_lo, inv_h, n_int, idx, w)
            _sf_interp5(coef, idx, w, inv, gi, ev, sv, av)
            for j in range(3):
                _sf_form(a, by, gi, inv, fc[j, 0], fc[j, 1], fc[j, 2], u[j, row:row + nx])
            _sf_pol(a, by, gi, inv, fc[3, 0], fc[3, 1], fc[3, 2], fc[4, 0], fc[4, 1], fc[4, 2], p_a, p_b, p_c,
                    pv, p3)
            _sf_store(pv, pol[row:row + nx])
            _sf_store(pv, tt)
            if eff_known:
                _sf_store(ev, eff[row:row + nx])
                _sf_mul(tt, ev)
            _sf_store(sv, sa[row:row + nx])
            _sf_mul(tt, sv)
            _sf_store(av, air[row:row + nx])
            _sf_mul(tt, av)
            if has_lor:
                _sf_abs_form(a, by, gi, inv, fc[5, 0], fc[5, 1], fc[5, 2], lo)
                _sf_store(lo, lor[row:row + nx])
                _sf_mul(tt, lo)
            _sf_store(tt, tot[row:row + nx])
            _sf_rbin(p3, qk, qs, rbin[row:row + nx])

    @_jit
    def shell_clip_sums(mean, b, x, ep, inten, clip_hi, clip_lo, keep, cnt, s_i, s_ep):
        """One clipping pass of ``background.isotropic_profile`` (its numpy operations, same float64 values):
        per sampled pixel lam = max(mean[shell], 0) ep, kept when ``clip_lo sqrt(max(lam, 1)) <= x - lam <=
        clip_hi sqrt(max(lam, 1))`` (``clip_lo`` negative); per shell the count of kept pixels and the sums of
        their intensities and ``ep``, added in pixel order as ``np.bincount`` does."""
        for p in range(b.shape[0]):
            bi = b[p]
            mv = mean[bi]
            mv = mv if not (mv < 0.0) else 0.0  # np.maximum(mean, 0.0) (NaN propagates)
            lam = mv * ep[p]
            r = lam if not (lam < 1.0) else 1.0
            root = np.sqrt(r)
            d = x[p] - lam
            k = (d <= clip_hi * root) and (d >= clip_lo * root)
            keep[p] = k
            if k:
                cnt[bi] += 1.0
                s_i[bi] += inten[p]
                s_ep[bi] += ep[p]

    @_jit
    def trust_flags(d, lo, hi, overload_bit, good, has_good, out):
        """``masks.untrusted_and_overload`` before the rectangles, in one pass over a float32 panel: 1 (UNTRUSTED)
        where ``d <= lo`` or the format mask ``good`` is False, ``overload_bit`` where ``d >= hi`` (float32
        comparisons, as numpy makes them with the limits rounded to float32)."""
        for p in range(d.shape[0]):
            v = d[p]
            f = 1 if v <= lo else 0
            if v >= hi:
                f |= overload_bit
            if has_good and not good[p]:
                f |= 1
            out[p] = f

    @_jit
    def flag_histogram(flags, hist):
        """hist[v] += number of pixels with flag value v (uint8, flattened). Zeros (most pixels) are counted in a
        register: incrementing one memory slot pixel after pixel waits on the previous increment each time."""
        zeros = 0
        for p in range(flags.shape[0]):
            v = flags[p]
            if v == 0:
                zeros += 1
            else:
                hist[v] += 1
        hist[0] += zeros

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

    # HOT/DEAD rule: each inner loop is its own small function over 1-D arrays, which LLVM vectorises (the
    # divisions run 4 to a vector instruction); written inline in one kernel they stayed scalar (~1.5x slower)
    @_jit_vec
    def _hd_mean_row(nrow, trow, mrow, wrow):
        """One row of the per-pixel mean (0 where unseen) and of the seen indicator."""
        for x in range(nrow.shape[0]):
            nf = np.float64(nrow[x])
            seen = nf > 0.0
            m = trow[x] / (nf if seen else 1.0)
            mrow[x] = m if seen else 0.0
            wrow[x] = 1.0 if seen else 0.0

    @_jit_vec
    def _hd_slide(t, a, b):
        """t += a - b (the vertical running sum: the row entering the window minus the row leaving it)."""
        for x in range(t.shape[0]):
            t[x] += a[x] - b[x]

    @_jit_vec
    def _hd_add(t, a):
        for x in range(t.shape[0]):
            t[x] += a[x]

    @_jit_vec
    def _hd_div(out, a, d):
        for x in range(out.shape[0]):
            out[x] = a[x] / d

    @_jit_vec
    def _hd_sub(out, a, b):
        for x in range(out.shape[0]):
            out[x] = a[x] - b[x]

    @_jit_vec
    def _hd_prefix(rm, rw, dm, dw, accm, accw):
        """The horizontal running sums of both images from their first windows and per-step differences."""
        rm[0] = accm
        rw[0] = accw
        for x in range(1, rm.shape[0]):
            accm += dm[x]
            accw += dw[x]
            rm[x] = accm
            rw[x] = accw

    @_jit_vec
    def _hd_loc(rm, rw, mrow, fsize, area, loc):
        """The neighbourhood mean without the pixel itself (``runstats._local_mean``'s arithmetic)."""
        for x in range(loc.shape[0]):
            mv = mrow[x]
            tot = (rm[x] / fsize) * area - mv
            cnt = (rw[x] / fsize) * area - 1.0
            lv = tot / (cnt if cnt > 1.0 else 1.0)
            loc[x] = lv if cnt > 0.5 else 0.0

    @_jit_vec
    def _hd_rule(nrow, mrow, loc, ssrow, nzrow, hot_factor, hot_nsigma, steady_factor, dead_expected, hot_bit,
                 dead_bit, orow):
        for x in range(nrow.shape[0]):
            nn = nrow[x]
            f = 0
            if nn != 0:
                mv = mrow[x]
                lv = loc[x]
                nf = np.float64(nn)
                if mv > hot_factor * lv:
                    if mv - lv > hot_nsigma * np.sqrt((lv if lv > 1.0 else 1.0) / nf):
                        var = ssrow[x] / nf - mv * mv
                        if var <= steady_factor * (mv if mv > 1.0 else 1.0):
                            f |= hot_bit
                if nzrow[x] == nn and lv * nf > dead_expected:
                    f |= dead_bit
            orow[x] = f

    @_jit
    def hot_dead(n, total, sumsq, n_zero, size, hot_factor, hot_nsigma, steady_factor, dead_expected, hot_bit,
                 dead_bit, out):
        """``runstats.RunningPixelStats.hot_dead_flags`` for one panel, operation by operation (same float64
        values, so the same flags): mean, variance, the neighbourhood mean (box filter as scipy's
        ``uniform_filter``: rows first, then columns, the arithmetic of ``box_rows`` / ``box_cols_row``) and
        the rule. Streams over the rows: the mean and seen images are kept only for the size + 1 rows the
        vertical running sums need (a ring), so no full-size temporary is made. Per row both images go through
        the column filter together; the row divided by ``size`` sits in a buffer padded with ``size`` zeros on
        each side, so the running sum's steps need no bounds tests."""
        ny, nx = n.shape
        s1 = size // 2
        s2 = size - s1 - 1
        R = size + 1
        ring_m = np.empty((R, nx))
        ring_w = np.empty((R, nx))
        zero = np.zeros(nx)
        tm = np.zeros(nx)
        tw = np.zeros(nx)
        fm = np.zeros(nx + 2 * size)
        fw = np.zeros(nx + 2 * size)
        dm = np.zeros(nx)
        dw = np.zeros(nx)
        rm = np.empty(nx)
        rw = np.empty(nx)
        loc = np.empty(nx)
        for yy in range(min(s2 + 1, ny)):
            _hd_mean_row(n[yy], total[yy], ring_m[yy % R], ring_w[yy % R])
        for j in range(size):
            yy = j - s1
            if 0 <= yy < ny:
                _hd_add(tm, ring_m[yy % R])
                _hd_add(tw, ring_w[yy % R])
        area = np.float64(size * size)
        fsize = np.float64(size)
        for y in range(ny):
            if y > 0:
                ya = y + s2
                yb = y - s1 - 1
                if ya < ny:
                    _hd_mean_row(n[ya], total[ya], ring_m[ya % R], ring_w[ya % R])
                am = ring_m[ya % R] if ya < ny else zero
                aw = ring_w[ya % R] if ya < ny else zero
                bm = ring_m[yb % R] if yb >= 0 else zero
                bw = ring_w[yb % R] if yb >= 0 else zero
                _hd_slide(tm, am, bm)
                _hd_slide(tw, aw, bw)
            _hd_div(fm[size:size + nx], tm, fsize)
            _hd_div(fw[size:size + nx], tw, fsize)
            accm = 0.0
            accw = 0.0
            for j in range(size):  # the first window (zeros before the row)
                accm += fm[size + j - s1]
                accw += fw[size + j - s1]
            # step x: the value entering the window (x + s2) minus the one leaving it (x - s1 - 1)
            _hd_sub(dm[1:], fm[size + 1 + s2:size + nx + s2], fm[size - s1:size + nx - s1 - 1])
            _hd_sub(dw[1:], fw[size + 1 + s2:size + nx + s2], fw[size - s1:size + nx - s1 - 1])
            _hd_prefix(rm, rw, dm, dw, accm, accw)
            mrow = ring_m[y % R]
            _hd_loc(rm, rw, mrow, fsize, area, loc)
            _hd_rule(n[y], mrow, loc, sumsq[y], n_zero[y], hot_factor, hot_nsigma, steady_factor, dead_expected,
                     hot_bit, dead_bit, out[y])


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
                 u16, u16.copy(), one.copy(), one.copy(), one.copy(), one.copy(), np.eye(3, dtype=f32), True,
                 np.empty((3, 4), f32), one.copy())
    flag_histogram(flags, np.zeros(256, np.int64))
    trust_flags(one, f32(0.0), f32(1.0), 2, np.ones(4, np.bool_), True, flags.copy())
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
    shell_clip_sums(np.ones(2), np.zeros(2, np.int64), np.ones(2), np.ones(2), np.ones(2), 2.5, -4.0,
                    np.empty(2, np.bool_), np.zeros(2), np.zeros(2), np.zeros(2))
    return True
