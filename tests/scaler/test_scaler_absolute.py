"""Absolute scaling (seed 002 phase 4): composition, scattering factors, Compton, Krogh-Moe sum rule."""
import json

import h5py
import numpy as np
import pytest
from cctbx.eltbx import xray_scattering

from scaler.core import absolute as ab


def test_f0_matches_cctbx():
    for el in ("H", "C", "N", "O", "S", "Fe"):
        g = xray_scattering.wk1995(el).fetch()
        for s in (0.0, 0.13, 0.5, 1.2):
            assert ab.f0(el, np.array([s]))[0] == pytest.approx(g.at_stol(s / 2), rel=1e-12)


def test_formula_and_sequence_compositions():
    assert ab.parse_formula("C2H5OH") == {"C": 2, "H": 6, "O": 1}
    assert ab.parse_formula("Ca(OH)2", 3) == {"Ca": 3, "O": 6, "H": 6}
    assert ab.parse_formula("C100 H160 (H2O)10") == {"C": 100, "H": 180, "O": 10}
    # glycylglycine C4H8N2O3; lysozyme-like check of a tripeptide Ala-Cys-Trp: C3H7NO2 + C3H7NO2S + C11H12N2O2 - 2 H2O
    assert ab.composition_from_sequence("GG") == {"C": 4, "H": 8, "N": 2, "O": 3}
    assert ab.composition_from_sequence(">x\nACW\n", copies=2) == {"C": 34, "H": 44, "N": 8, "O": 8, "S": 2}
    with pytest.raises(ValueError):
        ab.parse_formula("C2Xx3")
    with pytest.raises(ValueError):
        ab.composition_from_sequence("ACJ")
    assert ab.total_electrons({"H": 2, "O": 1}) == 10


def test_composition_from_pdb(tmp_path):
    pdb = tmp_path / "m.pdb"
    pdb.write_text(
        "CRYST1   20.000   30.000   40.000  90.00  90.00  90.00 P 21 21 21    4\n"
        "ATOM      1  N   GLY A   1       1.000   1.000   1.000  1.00 10.00           N\n"
        "ATOM      2  CA  GLY A   1       2.000   1.000   1.000  1.00 10.00           C\n"
        "ATOM      3  C   GLY A   1       3.000   1.000   1.000  1.00 10.00           C\n"
        "ATOM      4  O   GLY A   1       4.000   1.000   1.000  1.00 10.00           O\n"
        "HETATM    5  O   HOH A 101       6.000   1.000   1.000  0.50 10.00           O\n"
        "END\n")
    comp, vol = ab.composition_from_pdb(pdb)
    assert vol == pytest.approx(20 * 30 * 40)
    # 4 symmetry copies; Gly residue hydrogens (3) added because the model has none; water at half occupancy
    assert comp == pytest.approx({"N": 4, "C": 8, "O": 6, "H": 12})


def test_compton_limits_and_hydrogen():
    comp = {"C": 2, "H": 3, "O": 1}
    s = np.array([0.0, 0.2, 0.6, 3.0])
    inc = ab.incoherent_scattering(s, comp)
    assert inc[0] == pytest.approx(0.0, abs=0.05)
    assert np.all(np.diff(inc) > 0)
    assert inc[-1] == pytest.approx(ab.total_electrons(comp), rel=0.05)  # -> Z at large s
    # free hydrogen atom: the tabulated S (xraylib, Hubbell 1975) is Pirenne's 1 - f^2 of the 1s atom
    # (test_scaler_bragg checks it point by point); cctbx's wk1995 H is the bonded-H form factor, not the free atom
    sh = np.linspace(0.05, 1.0, 20)
    assert np.all(ab.incoherent_scattering(sh, {"H": 1}) > 0) and ab.incoherent_scattering(np.array([4.0]), {"H": 1})[0] \
        == pytest.approx(1.0, abs=1e-3)
    # Breit-Dirac recoil lowers Compton at high angle
    assert np.all(ab.incoherent_scattering(s[1:], comp, wavelength=1.0) < inc[1:])


def synthetic_crystal(n_atoms=150, cell=(18.0, 20.0, 22.0), s_max=0.7, b_iso=12.0, k0=3.7e-3, seed=3, n_vox=150_000):
    """Independent-atom crystal: Bragg |F|^2 e^{-B s^2/2} on the lattice, Einstein diffuse
    sum f^2 (1 - e^{-B s^2/2}) plus Compton, all times an unknown relative scale k0."""
    rng = np.random.default_rng(seed)
    a, b, c = cell
    els = rng.choice(["C", "N", "O", "S", "H"], size=n_atoms, p=[0.3, 0.1, 0.12, 0.03, 0.45])
    pos = []
    while len(pos) < n_atoms:
        x = rng.uniform(0, 1, 3) * cell
        if all(np.linalg.norm((x - p) - np.round((x - p) / cell) * cell) >= 1.4 for p in pos):
            pos.append(x)
    frac = np.array(pos) / cell
    comp = {}
    for e in els:
        comp[e] = comp.get(e, 0) + 1
    hmax = [int(s_max * d) + 1 for d in cell]
    H = np.array(np.meshgrid(*[np.arange(-m, m + 1) for m in hmax], indexing="ij")).reshape(3, -1).T
    sv = np.sqrt(((H / cell) ** 2).sum(1))
    sel = (sv > 0) & (sv < s_max)
    H, sv = H[sel], sv[sel]
    fj = np.stack([ab.f0(e, sv) for e in els], axis=1)
    F = (fj * np.exp(2j * np.pi * H @ frac.T)).sum(1)
    i_bragg = k0 * np.abs(F) ** 2 * np.exp(-b_iso * sv ** 2 / 2)
    u = rng.uniform(0, 1, n_vox) ** (1 / 3) * s_max
    i_diff = k0 * (ab.coherent_sum_f2(u, comp) * (1 - np.exp(-b_iso * u ** 2 / 2)) + ab.incoherent_scattering(u, comp))
    i_diff *= 1 + 0.02 * rng.normal(size=n_vox)
    return {"comp": comp, "volume": a * b * c, "s_bragg": sv, "i_bragg": i_bragg, "s_diff": u, "i_diff": i_diff,
            "k0": k0, "s_max": s_max, "cell": cell}


def test_krogh_moe_absolute_scale_synthetic():
    """Known composition, unknown relative scale k0: the sum rule recovers 1/k0 within 2 %."""
    x = synthetic_crystal()
    edges = ab.shell_edges(x["s_max"], 24)
    prof, nd, nb = ab.shell_profile(edges, x["s_diff"], x["i_diff"], x["s_bragg"], x["i_bragg"])
    res = ab.krogh_moe_scale(edges, prof, x["comp"], x["volume"])
    assert res["scale"] * x["k0"] == pytest.approx(1.0, abs=0.02)
    assert res["forward_term"] == pytest.approx(ab.total_electrons(x["comp"]) ** 2 / x["volume"])
    # without the F(000) term the scale is biased high by about forward/theory
    biased = ab.krogh_moe_scale(edges, prof, x["comp"], x["volume"], forward_term=False)["scale"]
    assert biased > res["scale"]
    # Compton subtraction leaves the coherent diffuse on e.u./cell
    out = ab.absolute_diffuse(x["i_diff"], x["s_diff"], 1 / x["k0"], x["comp"])
    coherent = ab.coherent_sum_f2(x["s_diff"], x["comp"]) * (1 - np.exp(-12.0 * x["s_diff"] ** 2 / 2))
    hi = x["s_diff"] > 0.3
    assert np.median(out[hi] / coherent[hi]) == pytest.approx(1.0, abs=0.01)


def test_absolute_cli_end_to_end(tmp_path):
    from typer.testing import CliRunner

    from scaler.cli import app

    x = synthetic_crystal(n_atoms=80, n_vox=60_000, seed=4)
    mp = tmp_path / "map.h5"
    with h5py.File(mp, "w") as f:
        f["q_magnitude"] = x["s_diff"]
        f["intensity"] = x["i_diff"]
    bp = tmp_path / "bragg.h5"
    with h5py.File(bp, "w") as f:
        f["d"] = 1 / x["s_bragg"]
        f["intensity"] = x["i_bragg"]
    formula = "".join(f"{k}{v}" for k, v in x["comp"].items())
    out = tmp_path / "abs"
    r = CliRunner().invoke(app, ["absolute", "--map", str(mp), "--out", str(out), "--formula", formula,
                                 "--cell-volume", str(x["volume"]), "--bragg", str(bp), "--n-shells", "20"])
    assert r.exit_code == 0, r.output
    res = json.loads((out / "absolute.json").read_text())
    assert res["scale"] * x["k0"] == pytest.approx(1.0, abs=0.02)
    with h5py.File(out / "absolute_map.h5") as f:
        assert f.attrs["schema"] == "diffractflow.scaler.absolute_map"
        v = f["entry/absolute/intensity"][()]
        comp = f["entry/absolute/compton"][()]
    np.testing.assert_allclose(v, res["scale"] * x["i_diff"] - comp)
    assert (out / "absolute_profile.png").stat().st_size > 1000
    # no composition -> usage error naming the problem
    r = CliRunner().invoke(app, ["absolute", "--map", str(mp), "--out", str(out), "--cell-volume", "100"])
    assert r.exit_code == 2 and "exactly one of formula" in r.output


def test_nexus_map_reader_s_and_absolute_worker(tmp_path):
    """voxel-merger map layout: |s| from fractional hkl matches cctbx d-spacings; worker absolute mode."""
    from cctbx import miller, uctbx
    from cctbx.array_family import flex as cflex
    from diffractflow.config import Settings
    from diffractflow.messages import ArtifactRef, JobRequest
    from diffractflow.runtime import run_inline

    from scaler.artifacts import read_map
    from scaler.worker import STAGE

    cell = (30.0, 40.0, 50.0, 90.0, 100.0, 90.0)
    h = np.arange(-4, 5, dtype=float)
    k = np.arange(-3, 4, dtype=float)
    l_ = np.arange(-5, 6, dtype=float)
    vol = tmp_path / "vol"
    (vol / "in").mkdir(parents=True)
    mp = vol / "in" / "map.h5"
    rng = np.random.default_rng(0)
    inten = rng.uniform(1, 2, (len(h), len(k), len(l_)))
    inten[4, 3, 5] = np.nan  # origin voxel without data
    from voxel_merger.artifacts import write_map
    from voxel_merger.core.grid import GlobalGrid

    grid = GlobalGrid(ndiv=1, lo=(-4, -3, -5), shape=inten.shape, unit_cell=cell)
    np.testing.assert_array_equal(grid.axis(0), h)
    write_map(mp, grid, inten, np.ones_like(inten), np.isfinite(inten).astype(int))
    m = read_map(mp)
    uc = uctbx.unit_cell(cell)
    H, K, L = np.meshgrid(h, k, l_, indexing="ij")
    idx = cflex.miller_index([(int(a), int(b), int(c)) for a, b, c in zip(H.ravel(), K.ravel(), L.ravel())
                              if (a, b, c) != (0, 0, 0)])
    d = uc.d(idx).as_numpy_array()
    s_ours = m["s"].ravel()[(H.ravel() != 0) | (K.ravel() != 0) | (L.ravel() != 0)]
    np.testing.assert_allclose(s_ours, 1 / d, rtol=1e-10)
    job = JobRequest(job_id="abs-1", service="scaler", inputs={"map": ArtifactRef(path="in/map.h5")},
                     params={"mode": "absolute", "formula": "C50H80N14O15S", "copies": 4, "n_shells": 8})
    ctx = run_inline(STAGE, job, Settings(volume=vol))
    assert {"absolute_map", "absolute", "plot_profile"} <= set(ctx.outputs)
    res = json.loads(ctx.outputs["absolute"].read_text())
    assert res["cell_volume"] == pytest.approx(uc.volume())
    assert res["F000"] == pytest.approx(4 * (50 * 6 + 80 + 14 * 7 + 15 * 8 + 16))
    assert ctx.metrics["absolute_scale"] == pytest.approx(res["scale"]) and res["scale"] > 0
    with h5py.File(ctx.outputs["absolute_map"]) as f:
        out = f["entry/absolute/intensity"][()]
    assert out.shape == inten.shape and np.isnan(out[4, 3, 5])
