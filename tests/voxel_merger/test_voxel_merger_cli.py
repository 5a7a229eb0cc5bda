"""End to end through files: run, grid/accumulate/merge, scales, observation table, inspect, worker."""
import json

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from voxel_merger.artifacts import read_map, read_observation_table, write_still
from voxel_merger.cli import app
from voxel_merger.synthetic import synthetic_still

CELL = (20.0, 24.0, 28.0, 90.0, 90.0, 90.0)
runner = CliRunner()


def flat(h, k, l):
    return 50.0 + 10.0 * np.cos(h) * np.cos(k) + 0.0 * l


@pytest.fixture(scope="module")
def stills(tmp_path_factory):
    d = tmp_path_factory.mktemp("stills")
    rng = np.random.default_rng(11)
    scales = {}
    paths = []
    for i in range(6):
        b = float(rng.uniform(0.5, 2.0))
        s = synthetic_still(f"img_{i:03d}", CELL, flat, rng, space_group="P 21 21 21", n_side=70, pixel=1.2,
                            sigma0=1.0, scale=b, cell_jitter=0.001)
        scales[s.still_id] = b
        paths.append(write_still(d / f"still_{i}.h5", s.still_id, s.h, s.k, s.l, s.intensity, s.sigma,
                                 s.q_magnitude, s.crystal))
    (d / "scales.json").write_text(json.dumps(scales))
    return d, paths, scales


def test_run_writes_nexus_map_figures_and_table(stills, tmp_path):
    d, paths, scales = stills
    out = tmp_path / "out"
    res = runner.invoke(app, ["run", *map(str, paths), "--out", str(out), "--scales", str(d / "scales.json"),
                              "--reject-sigma", "6"])
    assert res.exit_code == 0, res.output
    for name in ("map.h5", "observations.h5", "slice_h0.png", "slice_k0.png", "slice_l0.png",
                 "radial_profile.png", "stats.json", "grid.json"):
        assert (out / name).stat().st_size > 0, name
    with h5py.File(out / "map.h5", "r") as f:
        g = f["entry/map"]
        assert g.attrs["NX_class"] == "NXdata" and g.attrs["signal"] == "intensity"
        assert list(g.attrs["axes"]) == ["h", "k", "l"]
        assert g["intensity"].shape == (g["h"].size, g["k"].size, g["l"].size)
        assert f.attrs["producer"] == "voxel-merger"
    m = read_map(out / "map.h5")
    meas = m.counts > 0
    hh, kk, ll = np.meshgrid(m.grid.axis(0), m.grid.axis(1), m.grid.axis(2), indexing="ij")
    # scales divided out: the planted function comes back (flat is smooth on the voxel scale)
    z = (m.intensity[meas] - flat(hh, kk, ll)[meas]) / m.sigma[meas]
    assert abs(np.median(z)) < 0.3
    assert m.statistics["n_stills"] == 6 and m.statistics["cc_half"]["overall"] > 0.5
    t = read_observation_table(out / "observations.h5")
    assert len(t["still_names"]) == 6 and t["voxel_id"].size == t["intensity"].size == m.statistics["n_observations"]
    assert (t["voxel_id"] >= 0).all() and (t["q_magnitude"] > 0).all()
    # the table holds unscaled intensities: per still their ratio to the map is the scale b
    for idx, name in enumerate(t["still_names"]):
        sel = t["still_id"] == idx
        ratio = np.median(t["intensity"][sel] / m.intensity.ravel()[t["voxel_id"][sel]])
        assert ratio == pytest.approx(scales[name], rel=0.02)
    res = runner.invoke(app, ["inspect", str(out / "map.h5")])
    assert res.exit_code == 0 and "CC1/2" in res.output


def test_accumulate_then_merge_equals_run(stills, tmp_path, cli_partials):
    d, paths, _ = stills
    partials = cli_partials(paths, tmp_path)
    res = runner.invoke(app, ["inspect", str(partials[0])])
    assert res.exit_code == 0 and "accumulator" in res.output
    res = runner.invoke(app, ["run", *map(str, paths), "--out", str(tmp_path / "r"), "--symmetry", "auto",
                              "--scales", str(d / "scales.json")])
    assert res.exit_code == 0, res.output
    # old runs' scales.json (version 1) is keyed by the table's integer still_id; the table's still_names map them
    names = read_observation_table(tmp_path / "r" / "observations.h5")["still_names"]
    by_index = {str(i): json.loads((d / "scales.json").read_text())[n] for i, n in enumerate(names)}
    (tmp_path / "scales_int.json").write_text(json.dumps(by_index))
    res = runner.invoke(app, ["merge", *map(str, partials[::-1]), "--out", str(tmp_path / "m"), "--backend", "hdf5",
                              "--symmetry", "auto", "--scales", str(tmp_path / "scales_int.json"),
                              "--table", str(tmp_path / "r" / "observations.h5")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["merge", *map(str, partials), "--out", str(tmp_path / "m2"),
                              "--scales", str(tmp_path / "scales_int.json")])
    assert res.exit_code != 0 and "table" in res.output  # integer keys without the table: clear error
    a, b = read_map(tmp_path / "m" / "map.h5"), read_map(tmp_path / "r" / "map.h5")
    assert a.grid == b.grid
    np.testing.assert_array_equal(a.counts, b.counts)
    ok = a.counts > 0
    np.testing.assert_allclose(a.intensity[ok], b.intensity[ok], rtol=1e-12)
    np.testing.assert_allclose(a.sigma[ok], b.sigma[ok], rtol=1e-12)
    assert a.statistics["cc_half"]["overall"] == pytest.approx(b.statistics["cc_half"]["overall"], rel=1e-9)


def test_bad_inputs_fail_with_clear_messages(stills, tmp_path):
    d, paths, _ = stills
    res = runner.invoke(app, ["run", str(tmp_path / "missing.h5"), "--out", str(tmp_path / "o")])
    assert res.exit_code != 0 and "missing.h5" in res.output
    bad = tmp_path / "bad.h5"
    with h5py.File(bad, "w") as f:
        f["x"] = np.zeros(3)
    res = runner.invoke(app, ["run", str(bad), "--out", str(tmp_path / "o")])
    assert res.exit_code != 0 and "bad.h5" in res.output and "not a diffuse still table" in res.output
    res = runner.invoke(app, ["run", str(paths[0]), "--out", str(tmp_path / "o"), "--subdivisions", "4"])
    assert res.exit_code == 2
    (tmp_path / "scales.json").write_text(json.dumps({"other": 1.0}))
    res = runner.invoke(app, ["run", str(paths[0]), "--out", str(tmp_path / "o"), "--scales",
                              str(tmp_path / "scales.json")])
    assert res.exit_code != 0 and "img_000" in res.output


def test_worker_accumulate_and_merge_modes(stills, tmp_path):
    from diffractflow.artifacts import Volume, sha256_file
    from diffractflow.config import Settings
    from diffractflow.messages import ArtifactRef, JobRequest
    from diffractflow.runtime import BadInput, JobContext

    from voxel_merger.artifacts import write_grid
    from voxel_merger.pipeline import MergeOptions, grid_from_inputs
    from voxel_merger.worker import STAGE, Params

    d, paths, _ = stills
    root = tmp_path / "vol"
    (root / "in").mkdir(parents=True)
    grid, info = grid_from_inputs(paths, MergeOptions())
    write_grid(root / "in" / "grid.json", grid, info)
    vol = Volume(root)

    def ctx_for(job_id, inputs, params):
        refs = {}
        for name, p in inputs.items():
            refs[name] = ArtifactRef(path=str(p.relative_to(root)), sha256=sha256_file(p))
        job = JobRequest(job_id=job_id, service="voxel-merger", inputs=refs, params=params)
        out = root / "jobs" / job_id
        out.mkdir(parents=True)
        return JobContext(job=job, volume=vol, out_dir=out, settings=Settings(volume=str(root)))

    partial_refs = {}
    for i, p in enumerate(paths[:3]):
        dst = root / "in" / p.name
        dst.write_bytes(p.read_bytes())
        ctx = ctx_for(f"acc{i}", {"still": dst, "grid": root / "in" / "grid.json"}, {"mode": "accumulate"})
        STAGE.handler(ctx, Params.model_validate(ctx.job.params))
        assert ctx.metrics["n_used"] > 0
        partial_refs[f"partial_{i}"] = ctx.outputs["partial"]
    ctx = ctx_for("merge", partial_refs, {"mode": "merge", "backend": "hdf5"})
    STAGE.handler(ctx, Params.model_validate(ctx.job.params))
    assert ctx.outputs["map"].exists() and ctx.metrics["n_stills"] == 3
    assert ctx.metrics["reject_sigma"] is None  # unscaled stills: no outlier test by default
    # the grid built by the merger from {unit_cell, space_group, d_min, subdivisions} equals `grid` of the stills
    # when given their average cell; partials made with it merge like the others
    spec = {"unit_cell": info["average_unit_cell"], "space_group": "P 21 21 21", "d_min": info["d_min"],
            "subdivisions": 3}
    spec_refs = {}
    for i, p in enumerate(paths[:3]):
        ctx = ctx_for(f"spec{i}", {"still": root / "in" / p.name}, {"mode": "accumulate", "grid_spec": spec})
        STAGE.handler(ctx, Params.model_validate(ctx.job.params))
        spec_refs[f"partial_{i}"] = ctx.outputs["partial"]
    from voxel_merger.storage import H5VoxelAccumulator

    with H5VoxelAccumulator(spec_refs["partial_0"], mode="r") as a:
        assert a.grid.shape == grid.shape and a.grid.lo == grid.lo and a.grid.space_group == grid.space_group
    d_, _, scales = stills
    sc = root / "in" / "scales.json"
    sc.write_text(json.dumps(scales))
    ctx = ctx_for("merge_scaled", {**spec_refs, "scales": sc}, {"mode": "merge"})
    STAGE.handler(ctx, Params.model_validate(ctx.job.params))
    assert ctx.metrics["reject_sigma"] == 5.0 and ctx.metrics["n_rejected"] == 0  # scaled: 5σ test, clean data
    # |s| in the merged map uses the average refined cell of the 3 stills merged, not the spec's (6 stills) cell
    info3 = grid_from_inputs(paths[:3], MergeOptions())[1]
    np.testing.assert_allclose(ctx.metrics["average_unit_cell"], info3["average_unit_cell"], rtol=1e-12)
    assert abs(ctx.metrics["average_unit_cell"][0] - info["average_unit_cell"][0]) > 1e-3
    ctx = ctx_for("bad_spec", {"still": root / "in" / paths[0].name}, {"mode": "accumulate",
                                                                       "grid_spec": {"unit_cell": [1, 2]}})
    with pytest.raises(BadInput, match="grid_spec"):
        STAGE.handler(ctx, Params.model_validate(ctx.job.params))
    ctx = ctx_for("run", {f"still_{i}": root / "in" / p.name for i, p in enumerate(paths[:3])},
                  {"mode": "run", "reject_sigma": 6.0, "symmetry": "auto"})
    STAGE.handler(ctx, Params.model_validate(ctx.job.params))
    assert {"map", "observations", "stats", "slice_l0"} <= set(ctx.outputs) and ctx.metrics["n_stills"] == 3
    ctx = ctx_for("bad", {"still": root / "in" / paths[0].name}, {"mode": "accumulate"})
    with pytest.raises(BadInput, match="grid"):
        STAGE.handler(ctx, Params.model_validate(ctx.job.params))


def test_reader_accepts_the_diffuse_extractor_layout(tmp_path):
    """/entry/pixels with float32 columns, Blosc compression, crystal A + space_group attr; a missing column is
    an input error naming the file (one layout: no alternative names are tried)."""
    import hdf5plugin
    from diffractflow.formats.still_table import write_still_header

    from voxel_merger.artifacts import InputError, open_still

    rng = np.random.default_rng(3)
    s = synthetic_still("x", CELL, flat, rng, space_group="P 21 21 21", n_side=30, pixel=1.0)
    q = np.linalg.norm(np.stack([s.h, s.k, s.l], 1) @ np.array(s.crystal.A_matrix).T, axis=1)
    comp = dict(hdf5plugin.Blosc(cname="lz4", clevel=5, shuffle=hdf5plugin.Blosc.SHUFFLE))
    for with_hkl in (True, False):
        p = tmp_path / f"ext_{with_hkl}.h5"
        with h5py.File(p, "w") as f:
            write_still_header(f, producer="diffuse-extractor", producer_version="0")
            e = f.create_group("entry")
            e.attrs.update(image_path="/data/thau_3_2_0007.cbf", image_index=0, experiment_index=0)
            px = e.create_group("pixels")
            cols = {"intensity": s.intensity, "sigma": s.sigma, "q": q, "exposure": np.ones(s.n_obs)}
            if with_hkl:
                cols.update(h=s.h, k=s.k, l=s.l)
            for n, v in cols.items():
                px.create_dataset(n, data=np.asarray(v, np.float32), chunks=(256,), **comp)
            cg = e.create_group("crystal")
            cg["A"] = np.array(s.crystal.A_matrix)
            cg["unit_cell"] = np.array(s.crystal.unit_cell)
            cg.attrs["space_group"] = "P 21 21 21"
        if not with_hkl:
            with pytest.raises(InputError, match=r"ext_False\.h5.*\['h', 'k', 'l'\]"):
                open_still(p)
            continue
        with open_still(p) as st:
            assert st.still_id == "thau_3_2_0007.cbf#0" and st.n_obs == s.n_obs and st.has_weight
            assert st.crystal.space_group == "P 21 21 21"
            np.testing.assert_allclose(st.crystal.unit_cell, s.crystal.unit_cell, rtol=1e-9)
            (c,) = list(st.iter_chunks())
            np.testing.assert_allclose(c.h, s.h, atol=2e-4)  # float32 storage
            np.testing.assert_allclose(c.l, s.l, atol=2e-4)
            np.testing.assert_allclose(c.q_magnitude, q, rtol=1e-6)
