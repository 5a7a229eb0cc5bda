"""Fused one-pass kernels for the scaling passes (numba, from Debian's ``python3-numba`` when present).

Each refinement pass over the observation table is one loop over the observations that reads each
column once and scatter-adds into float64 accumulators, with no per-observation temporaries (the
numpy path in ``core.refine`` allocates ~10 arrays of the chunk length per pass and converts int32
indices to intp inside ``np.bincount``): the reference pass (with the smoother also the group sums
of the variable-projection term, in the same cache lines), the normal-equation pass (objective,
R-factor, per-still and per-|q|-bin sums and the projected still/smoother coupling in one go) and
the outlier test. Also the O(n) helpers of the data path (id compaction, counting sort by group
block, in-place compaction). The arithmetic follows the numpy path, so both agree to rounding of the
summation order; the tests compare them.

The kernels release the GIL (``nogil``) and work on one contiguous range of observations, so
``core.refine`` runs one range per thread with private accumulators and adds them afterwards.
``available()`` is False when numba cannot be imported; callers then use the numpy path.
"""
from __future__ import annotations

import math

import numpy as np

try:  # pragma: no cover - depends on the machine
    from numba import njit

    _HAVE_NUMBA = True
except Exception:  # noqa: BLE001 - any import problem means "not available"
    _HAVE_NUMBA = False


MAX_M = 5  # smoother control points in v1: still-by-smoother arrays are padded to this many columns


def available() -> bool:
    return _HAVE_NUMBA


if _HAVE_NUMBA:

    @njit(nogil=True, cache=True)
    def reference_sums(s, g, inten, w, b, kb, gb, use_g, wslot, start_tab, with_y, acc):
        """acc[g, 0] += w t I, acc[g, 1] += w t^2 with t = b[s] (* gb[kb] if use_g).

        With ``with_y`` (smoother) also acc[g, 2 + j] += w t b W_j(q): the group sums behind the
        variable-projection term Y[g, j] = -I_h * acc[g, 2 + j], gathered in the same cache lines.
        """
        na = wslot.shape[1]
        for i in range(s.shape[0]):
            bk = b[s[i]]
            t = bk
            k = 0
            if use_g:
                k = kb[i]
                t = t * gb[k]
            wt = w[i] * t
            gi = g[i]
            acc[gi, 0] += wt * inten[i]
            acc[gi, 1] += wt * t
            if with_y:
                v = wt * bk
                base = 2 + start_tab[k]
                for m in range(na):
                    acc[gi, base + m] += wslot[k, m] * v

    @njit(nogil=True, cache=True)
    def normal_sums(s, g, inten, w, b, ih, kb, gb, wdense, M, refine_b, cross,
                    fa, Ass, rs, Usc, Ak, rk, Yd, x):
        """One pass of ``ScalingProblem.normal_equations`` (see there for the meaning of each sum).

        fa[0] += sum w r^2, fa[1] += sum |r|; per still Ass, rs; with a smoother (M > 0) the
        still/smoother coupling Usc[s, j] += W_j(q) w I_h^2 g b (``wdense`` = dg/dc_j per q bin, padded
        to 5 columns like Usc, Yd and x) and the per-q-bin sums Ak, rk; with ``cross`` the projected part
        of the coupling, x[s, j] += w g I_h t Yd[g, j] (Yd from the reference pass).
        Per-still sums are kept in registers over each run of equal still index (tables are usually
        written still by still) and added to the arrays when the still changes.
        """
        f = 0.0
        ar = 0.0
        cur = -1
        a_ss = 0.0
        a_rs = 0.0
        u0 = 0.0
        u1 = 0.0
        u2 = 0.0
        u3 = 0.0
        u4 = 0.0
        x0 = 0.0
        x1 = 0.0
        x2 = 0.0
        x3 = 0.0
        x4 = 0.0
        for i in range(s.shape[0]):
            si = s[i]
            if si != cur:
                if cur >= 0:
                    Ass[cur] += a_ss
                    rs[cur] += a_rs
                    Usc[cur, 0] += u0
                    Usc[cur, 1] += u1
                    Usc[cur, 2] += u2
                    Usc[cur, 3] += u3
                    Usc[cur, 4] += u4
                    x[cur, 0] += x0
                    x[cur, 1] += x1
                    x[cur, 2] += x2
                    x[cur, 3] += x3
                    x[cur, 4] += x4
                cur = si
                a_ss = 0.0
                a_rs = 0.0
                u0 = 0.0
                u1 = 0.0
                u2 = 0.0
                u3 = 0.0
                u4 = 0.0
                x0 = 0.0
                x1 = 0.0
                x2 = 0.0
                x3 = 0.0
                x4 = 0.0
            gi = g[i]
            h = ih[gi]
            bk = b[si]
            if M > 0:
                k = kb[i]
                gk = gb[k]
                t = bk * gk
            else:
                k = 0
                gk = 1.0
                t = bk
            r = inten[i] - t * h
            wi = w[i] * 1.0
            wr = wi * r
            f += wr * r
            ar += abs(r)
            wih = wi * h
            wih2 = wih * h
            if refine_b:
                if M > 0:
                    a_ss += wih2 * gk * gk
                    a_rs += wr * h * gk
                else:
                    a_ss += wih2
                    a_rs += wr * h
            if M > 0:
                if refine_b:
                    u = wih2 * gk * bk
                    u0 += wdense[k, 0] * u
                    u1 += wdense[k, 1] * u
                    u2 += wdense[k, 2] * u
                    u3 += wdense[k, 3] * u
                    u4 += wdense[k, 4] * u
                Ak[k] += wih2 * bk * bk
                rk[k] += wr * h * bk
                if cross:
                    u = wi * gk * h * t
                    x0 += Yd[gi, 0] * u
                    x1 += Yd[gi, 1] * u
                    x2 += Yd[gi, 2] * u
                    x3 += Yd[gi, 3] * u
                    x4 += Yd[gi, 4] * u
        if cur >= 0:
            Ass[cur] += a_ss
            rs[cur] += a_rs
            Usc[cur, 0] += u0
            Usc[cur, 1] += u1
            Usc[cur, 2] += u2
            Usc[cur, 3] += u3
            Usc[cur, 4] += u4
            x[cur, 0] += x0
            x[cur, 1] += x1
            x[cur, 2] += x2
            x[cur, 3] += x3
            x[cur, 4] += x4
        fa[0] += f
        fa[1] += ar

    @njit(nogil=True, cache=True)
    def outlier_flags(s, g, inten, w, b, ih, var, nobs, kb, gb, use_g, zmax, out):
        """out[i] = |I - t I_h| / sqrt(1/w + t^2 var(I_h)) > zmax for groups with >= 3 observations."""
        count = 0
        for i in range(s.shape[0]):
            t = b[s[i]]
            if use_g:
                t = t * gb[kb[i]]
            gi = g[i]
            wi = w[i] * 1.0
            s2 = 1.0 / wi if wi > 0 else math.inf
            z = (inten[i] - t * ih[gi]) / math.sqrt(s2 + t * t * var[gi])
            bad = math.isfinite(z) and abs(z) > zmax and nobs[gi] >= 3
            out[i] = bad
            if bad:
                count += 1
        return count

    @njit(nogil=True, cache=True)
    def group_counts(g, counts):
        for i in range(g.shape[0]):
            counts[g[i]] += 1

    @njit(nogil=True, cache=True)
    def min_max(x):
        lo = x[0]
        hi = x[0]
        for i in range(1, x.shape[0]):
            v = x[i]
            if v < lo:
                lo = v
            elif v > hi:
                hi = v
        return lo, hi

    @njit(nogil=True, cache=True)
    def mark_present(ids, lo, present):
        for i in range(ids.shape[0]):
            present[ids[i] - lo] = True

    @njit(nogil=True, cache=True)
    def lut_gather(ids, lo, lut, out):
        """out[i] = lut[ids[i] - lo]."""
        for i in range(ids.shape[0]):
            out[i] = lut[ids[i] - lo]

    @njit(nogil=True, cache=True)
    def abs_sum(x):
        acc = 0.0
        for i in range(x.shape[0]):
            acc += abs(x[i])
        return acc

    @njit(nogil=True, cache=True)
    def q_bins(q, x0, scale, n_bins, out):
        """out[i] = clip(floor((q - x0) * scale), 0, n_bins - 1) (as ``SmootherSetup.bin_index``)."""
        top = n_bins - 1
        for i in range(q.shape[0]):
            v = (q[i] * 1.0 - x0) * scale
            if not (v >= 0.0):  # also NaN
                out[i] = 0
            elif v >= top:  # also +inf
                out[i] = top
            else:
                out[i] = int(v)

    @njit(nogil=True, cache=True)
    def block_counts(g, shift, n_blocks):
        """Number of observations in each group block g >> shift."""
        counts = np.zeros(n_blocks, dtype=np.int64)
        for i in range(g.shape[0]):
            counts[g[i] >> shift] += 1
        return counts

    @njit(nogil=True, cache=True)
    def scatter_by_block(g, shift, offsets, a, out):
        """out[new position of i] = a[i] for the stable counting sort by block g >> shift."""
        pos = offsets.copy()
        for i in range(g.shape[0]):
            k = g[i] >> shift
            out[pos[k]] = a[i]
            pos[k] += 1

    @njit(nogil=True, cache=True)
    def compact(a, drop):
        """Move the entries not flagged in ``drop`` to the front of ``a`` in place (stable); returns their number."""
        j = 0
        for i in range(a.shape[0]):
            if not drop[i]:
                a[j] = a[i]
                j += 1
        return j
