"""merge of single-still partials also writes the scaler's observation table (one row per still and voxel)."""
import json

import numpy as np
from typer.testing import CliRunner

from diffractflow.formats.scales import read_scales
from voxel_merger.artifacts import read_observation_table, write_still
from voxel_merger.cli import app
from voxel_merger.core.grid import GlobalGrid
from voxel_merger.synthetic import synthetic_still

CELL = (20.0, 24.0, 28.0, 90.0, 90.0, 90.0)
runner = CliRunner()


def smooth(h, k, l):
    return 80.0 + 20.0 * np.cos(0.7 * h) * np.cos(0.5 * k) + 5.0 * np.sin(0.3 * l)


def test_partials_table_rows_are_per_still_voxel_means_and_scale_correctly(tmp_path, cli_partials):
    rng = np.random.default_rng(5)
    stills, paths, planted = [], [], {}
    for i in range(8):
        b = float(np.exp(rng.normal(0, 0.2)))
        s = synthetic_still(f"img_{i:03d}", CELL, smooth, rng, space_group="P 21 21 21", n_side=60, pixel=1.2,
                            sigma0=0.5, scale=b)
        planted[s.still_id] = b
        stills.append(s)
        paths.append(write_still(tmp_path / f"still_{i}.h5", s.still_id, s.h, s.k, s.l, s.intensity, s.sigma,
                                 s.q_magnitude, s.crystal))
    partials = cli_partials(paths, tmp_path)
    r = runner.invoke(app, ["merge", *map(str, partials), "--out", str(tmp_path / "m")])
    assert r.exit_code == 0, r.output
    t = read_observation_table(tmp_path / "m" / "observations.h5")
    assert sorted(t["still_names"]) == sorted(planted)

    # independent check of one still's rows: inverse-variance mean per voxel with numpy
    grid = GlobalGrid.from_dict(json.loads((tmp_path / "grid.json").read_text())["grid"])
    s = stills[3]
    ids = grid.voxel_ids(s.h, s.k, s.l)
    ok = ids >= 0
    w = 1.0 / s.sigma[ok] ** 2
    sw = np.bincount(ids[ok], weights=w, minlength=grid.n_voxels)
    swi = np.bincount(ids[ok], weights=w * s.intensity[ok], minlength=grid.n_voxels)
    idx = list(t["still_names"]).index(s.still_id)
    rows = t["still_id"] == idx
    np.testing.assert_array_equal(np.sort(t["voxel_id"][rows]), np.flatnonzero(sw > 0))
    order = np.argsort(t["voxel_id"][rows])
    vox = t["voxel_id"][rows][order]
    np.testing.assert_allclose(t["intensity"][rows][order], swi[vox] / sw[vox], rtol=1e-12)
    np.testing.assert_allclose(t["sigma"][rows][order], 1 / np.sqrt(sw[vox]), rtol=1e-12)

    # the scaler recovers the planted relative scales from this table
    from scaler.cli import app as scaler_app

    r = runner.invoke(scaler_app, ["run", "--observations", str(tmp_path / "m" / "observations.h5"),
                                   "--out", str(tmp_path / "s")])
    assert r.exit_code == 0, r.output
    b = read_scales(tmp_path / "s" / "scales.json")
    assert set(b) == set(t["still_names"])  # keyed by still id (scales version 2)
    got = np.array([b[n] for n in t["still_names"]])
    want = np.array([planted[n] for n in t["still_names"]])
    ratio = got / want
    ratio /= np.exp(np.mean(np.log(ratio)))
    assert np.max(np.abs(ratio - 1)) < 0.01


def test_table_only_merge_writes_the_same_table_and_no_map(tmp_path, cli_partials):
    """The flow's unscaled merge only feeds the scaler: with table_only it writes the same observation table as a
    full merge (row for row, ASU voxels included) and neither map nor figures."""
    import pytest

    from diffractflow.errors import InputError
    from voxel_merger.core.params import MergeOptions
    from voxel_merger.pipeline import merge_partials

    rng = np.random.default_rng(11)
    paths = []
    for i in range(4):
        s = synthetic_still(f"img_{i:03d}", CELL, smooth, rng, space_group="P 21 21 21", n_side=50, pixel=1.2,
                            sigma0=0.5, scale=float(np.exp(rng.normal(0, 0.2))))
        paths.append(write_still(tmp_path / f"still_{i}.h5", s.still_id, s.h, s.k, s.l, s.intensity, s.sigma,
                                 s.q_magnitude, s.crystal))
    partials = cli_partials(paths, tmp_path)
    opt = dict(symmetry="P 21 21 21", figures=False, backend="memory")
    full, _ = merge_partials(partials, tmp_path / "full", MergeOptions(**opt))
    only, stats = merge_partials(partials, tmp_path / "only", MergeOptions(**opt, table_only=True))
    assert "map" in full and set(only) == {"observations", "stats"}
    assert not (tmp_path / "only" / "map.h5").exists()
    a, b = read_observation_table(full["observations"]), read_observation_table(only["observations"])
    assert list(a["still_names"]) == list(b["still_names"]) and len(a["voxel_id"]) > 1000
    for key in ("still_id", "voxel_id", "intensity", "sigma"):
        np.testing.assert_array_equal(a[key], b[key])
    assert stats["n_stills"] == 4 and stats["table_only"] is True
    with pytest.raises(InputError, match="table_only"):
        merge_partials(partials, tmp_path / "bad", MergeOptions(**opt, table_only=True, reject_sigma=5.0))
