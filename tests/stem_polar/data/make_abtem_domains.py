"""Generate ``abtem_domains.npz``: a multislice (abTEM) 4D-STEM scan of a polar perovskite with two domains.

Run with a Python that has abTEM (numpy 2, so its own venv; ``tests/stem_polar/test_stem_polar_multislice.py``
explains how it was built). Physics written by others: abTEM propagates a 200 kV nanobeam probe through the
crystal's Lobato potential (multislice, so dynamical scattering and the resulting Friedel-pair asymmetry of a
non-centrosymmetric crystal are abTEM's, not ours).

Crystal: tetragonal perovskite ABO3 (PbTiO3-like, a = 3.9 A), viewed down [001], 16 cells (6.2 nm) thick.
Polarisation in the image plane along x: the B cation is displaced by +0.16 A and the O anions by -0.12 A
relative to the A sublattice in the matrix; a central square of 6 x 6 cells has the opposite polarisation (two
180-degree domains). The 12 x 12 x 16 cell supercell is scanned on a 24 x 24 grid (step 1.95 A).

Detector: abTEM's pixelated detector out to 16 mrad (0.536 mrad per pixel), its central 56 px embedded into a 72 x 72 counting
detector with the beam off centre by (+5, -7) px (the pattern's zero at row 35 + 5, column 35 - 7 of a 0-based
72-px axis; the exact centre is stored), then Poisson counts at ``DOSE`` electrons per probe position.

Stored: ``counts`` (24, 24, 72, 72) uint16, ``domains`` (24, 24) +1 matrix / -1 inverted square at the probe
positions, ``com_abtem`` (2, 24, 24) abTEM's own centre of mass of the noise-free patterns (mrad, [y, x]),
``beam_center`` (y, x) px, ``mrad_per_px``.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

A = 3.9           # lattice parameter (Angstrom)
NC = 12           # supercell, cells along x and y
NZ = 16           # thickness in cells
D_B = 0.16        # B-cation displacement along x (Angstrom) in the matrix
D_O = -0.12       # O displacement along x (Angstrom) in the matrix
SCAN = 24
CROP = 56          # px of abTEM's pattern kept about its zero frequency (+-15 mrad)
DET = 72
OFFSET = (5, -7)  # beam offset on the detector (px): +5 rows (down), -7 columns (left)
DOSE = 4000
SEED = 20261207


def polarity(x, y):
    """+1 in the matrix, -1 in the central 6 x 6 cell square (x, y in Angstrom)."""
    lo, hi = 3 * A, 9 * A
    return np.where((x >= lo) & (x < hi) & (y >= lo) & (y < hi), -1, 1)


def build_atoms():
    from ase import Atoms

    sym, pos = [], []
    for i in range(NC):
        for j in range(NC):
            p = int(polarity((i + 0.5) * A, (j + 0.5) * A))
            for k in range(NZ):
                x0, y0, z0 = i * A, j * A, k * A
                sym += ["Pb", "Ti", "O", "O", "O"]
                pos += [(x0, y0, z0),
                        (x0 + 0.5 * A + p * D_B, y0 + 0.5 * A, z0 + 0.5 * A),
                        (x0 + 0.5 * A + p * D_O, y0 + 0.5 * A, z0),
                        (x0 + 0.5 * A + p * D_O, y0, z0 + 0.5 * A),
                        (x0 + p * D_O, y0 + 0.5 * A, z0 + 0.5 * A)]
    pos = np.array(pos)
    pos[:, :2] %= NC * A
    return Atoms(sym, positions=pos, cell=[NC * A, NC * A, NZ * A], pbc=True)


def main(out: Path):
    import abtem

    t0 = time.time()
    atoms = build_atoms()
    potential = abtem.Potential(atoms, sampling=0.2, slice_thickness=A / 2, parametrization="lobato",
                                projection="infinite")
    probe = abtem.Probe(energy=200e3, semiangle_cutoff=2.0)
    probe.grid.match(potential)
    extent = NC * A
    scan = abtem.GridScan(start=(0, 0), end=(extent, extent), gpts=(SCAN, SCAN), endpoint=False)
    det = abtem.PixelatedDetector(max_angle=16.0)
    meas = probe.scan(potential, scan=scan, detectors=det).compute()
    arr = np.asarray(meas.array, dtype=np.float64)  # (scan x, scan y, kx, ky) in abTEM's axis order
    com = meas.center_of_mass()  # abTEM's own CoM (mrad), components along x and y
    com = np.asarray(com.array)
    comx, comy = com.real, com.imag
    mrad = float(meas.angular_sampling[0])
    # to (row = y, column = x) in both real and reciprocal space
    arr = arr.transpose(1, 0, 3, 2)
    comx, comy = comx.T, comy.T
    np.save(Path(out).with_suffix(".raw.npy"), arr) if os.environ.get("KEEP_RAW") else None
    m = arr.shape[-1]
    z = m // 2  # abTEM's zero frequency (fftshifted patterns)
    h = CROP // 2
    arr = arr[..., z - h:z + h, z - h:z + h]  # +-15 mrad about the zero frequency
    n = arr.shape[-1]
    c0 = h
    top = (DET - n) // 2 + OFFSET[0]
    left = (DET - n) // 2 + OFFSET[1]
    full = np.zeros((SCAN, SCAN, DET, DET))
    full[:, :, top:top + n, left:left + n] = arr / arr.sum(axis=(2, 3), keepdims=True)
    rng = np.random.default_rng(SEED)
    counts = rng.poisson(DOSE * full).astype(np.uint16)
    xp = np.arange(SCAN) * extent / SCAN
    X, Y = np.meshgrid(xp, xp)  # rows = y, columns = x
    domains = polarity(X, Y).astype(np.int8)
    np.savez_compressed(out, counts=counts, domains=domains, com_abtem=np.stack([comy, comx]).astype(np.float32),
                        beam_center=np.array([top + c0, left + c0]), mrad_per_px=mrad,
                        info=f"abTEM {abtem.__version__}, {__doc__.splitlines()[0]}")
    print(f"wrote {out} in {time.time() - t0:.0f} s: counts {counts.shape}, pattern {n} px, {mrad:.3f} mrad/px, "
          f"mean CoM_x matrix {comx[domains == 1].mean():+.4f} / square {comx[domains == -1].mean():+.4f} mrad")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("abtem_domains.npz"))
