"""diffractflow.formats: one owner per shared file. Round trips, refusals naming the file, old version forms,
and scales keyed by still id merging to the same map as the old index-keyed scales."""
import json

import h5py
import numpy as np
import pytest

from diffractflow.errors import InputError
from diffractflow.formats import accumulator, merged_map, observations, scales, still_table, write_header

CELL = (20.0, 24.0, 28.0, 90.0, 90.0, 90.0)


class _Grid:
    """A grid as the map writer needs it (the voxel-merger's GlobalGrid has these members)."""

    def __init__(self, shape=(3, 4, 5), ndiv=2):
        self.shape, self.ndiv, self.unit_cell, self.space_group = shape, ndiv, CELL, "P 21 21 21"
        self.lo = tuple(-(n // 2) for n in shape)

    def axis(self, i):
        return (self.lo[i] + np.arange(self.shape[i])) / self.ndiv

    def to_dict(self):
        return {"ndiv": self.ndiv, "lo": list(self.lo), "shape": list(self.shape), "unit_cell": list(CELL),
                "space_group": self.space_group}


def _set_attr(path, name, value, group="/"):
    with h5py.File(path, "r+") as f:
        if value is None:
            del f[group].attrs[name]
        else:
            f[group].attrs[name] = value


def _delete(path, name):
    with h5py.File(path, "r+") as f:
        del f[name]


# ------------------------------------------------------------------------------------------------ still table
def _still(path, n=50, exposure=True):
    rng = np.random.default_rng(1)
    cols = {"h": rng.normal(size=n), "k": rng.normal(size=n), "l": rng.normal(size=n),
            "intensity": rng.uniform(1, 9, n), "sigma": rng.uniform(0.5, 1, n), "q": rng.uniform(0.1, 0.5, n)}
    if exposure:
        cols["exposure"] = rng.uniform(0.8, 1.2, n)
    A = np.diag([1 / CELL[0], 1 / CELL[1], 1 / CELL[2]])
    still_table.write_still_table(path, "img_0001.cbf#0", cols, crystal={"unit_cell": CELL, "A": A,
                                                                        "space_group": "P 21 21 21"},
                                  producer="test", producer_version="1")
    return cols, A


def test_still_table_round_trip_streams_the_columns(tmp_path):
    p = tmp_path / "still.h5"
    cols, A = _still(p)
    with h5py.File(p) as f:
        assert f.attrs["schema_version"] == 5 and isinstance(f.attrs["schema_version"], np.integer)
    with still_table.StillTable(p) as t:
        assert (t.still_id, t.version, t.n_pixels, t.has_exposure) == ("img_0001.cbf#0", 5, 50, True)
        assert t.crystal["unit_cell"] == CELL and t.crystal["space_group"] == "P 21 21 21"
        np.testing.assert_array_equal(t.crystal["A"], A)
        chunks = list(t.iter_chunks(chunk=20))
        assert [len(c["h"]) for c in chunks] == [20, 20, 10]
        for c in cols:
            np.testing.assert_array_equal(np.concatenate([ch[c] for ch in chunks]), cols[c])
        np.testing.assert_array_equal(t.read_columns(["q"])["q"], cols["q"])
        assert t.background_profile() is None  # written by the extractor only
        with pytest.raises(InputError, match=r"still\.h5.*no column\(s\) \['x'\]"):
            t.read_columns(["x"])


def test_still_table_id_from_the_image_when_no_still_id(tmp_path):
    p = tmp_path / "still.h5"
    _still(p)
    _set_attr(p, "still_id", None, "entry")
    _set_attr(p, "image_path", "/data/run3/thau_0007.cbf", "entry")
    _set_attr(p, "image_index", 2, "entry")
    with still_table.StillTable(p) as t:
        assert t.still_id == "thau_0007.cbf#2"


@pytest.mark.parametrize("damage, message", [
    (lambda p: _set_attr(p, "schema", "diffractflow.something_else"), "not a diffuse still table"),
    (lambda p: _set_attr(p, "schema_version", np.int64(6)), "schema version '6' is not supported"),
    (lambda p: _set_attr(p, "schema_version", "4.0"), "schema version '4.0' is not supported"),
    (lambda p: _delete(p, "entry/pixels/sigma"), r"lacks column\(s\) \['sigma'\]"),
])
def test_still_table_refusals_name_the_file(tmp_path, damage, message):
    p = tmp_path / "bad_still.h5"
    _still(p)
    damage(p)
    with pytest.raises(InputError, match=rf"bad_still\.h5.*{message}"):
        still_table.StillTable(p)


@pytest.mark.parametrize("old", ["1", "2", "3", "4"])
def test_still_table_reads_the_old_string_versions(tmp_path, old):
    p = tmp_path / "old.h5"
    _still(p, exposure=False)
    _set_attr(p, "schema_version", old)
    with still_table.StillTable(p) as t:
        assert t.version == int(old) and not t.has_exposure


# ------------------------------------------------------------------------------------------- observation table
def _table(path, n_stills=3, per=40):
    rng = np.random.default_rng(2)
    w = observations.ObservationTableWriter(path, {"ndiv": 2}, producer="test", producer_version="1", chunk=16)
    rows = {c: [] for c, _ in observations.FIELDS}
    for s in range(n_stills):
        i = w.still_index(f"img_{s:04d}.cbf#0")
        assert w.still_index(f"img_{s:04d}.cbf#0") == i == s
        v = rng.integers(0, 500, per)
        q, inten, sig, wt = rng.uniform(0.1, 0.4, per), rng.uniform(1, 5, per), rng.uniform(0.5, 1, per), \
            rng.uniform(1, 2, per)
        w.append(i, v, q, inten, sig, wt)
        for c, x in zip(("still_id", "voxel_id", "q_magnitude", "intensity", "sigma", "weight"),
                        (np.full(per, i), v, q, inten, sig, wt)):
            rows[c].append(x)
    w.close()
    return {c: np.concatenate(x) for c, x in rows.items()}


def test_observation_table_round_trip(tmp_path):
    p = tmp_path / "observations.h5"
    want = _table(p)
    got = observations.read_observations(p)
    for c in want:
        np.testing.assert_array_equal(got[c], want[c])
    assert list(got["still_names"]) == [f"img_{s:04d}.cbf#0" for s in range(3)]
    assert observations.read_still_names(p) == list(got["still_names"])
    with h5py.File(p) as f:
        assert f.attrs["schema_version"] == 2 and f.attrs["n_observations"] == 120


def test_observation_table_abandoned_leaves_nothing(tmp_path):
    p = tmp_path / "observations.h5"
    w = observations.ObservationTableWriter(p, {}, producer="test", producer_version="1")
    w.append(w.still_index("a#0"), np.arange(3), np.ones(3), np.ones(3), np.ones(3))
    w.close(ok=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("damage, message", [
    (lambda p: _set_attr(p, "schema", "diffractflow.voxel_merger.map"), "not an observation table"),
    (lambda p: _set_attr(p, "schema_version", np.int64(3)), "schema version '3' is not supported"),
    (lambda p: _delete(p, "weight"), r"lacks dataset\(s\) \['weight'\]"),
    (lambda p: _delete(p, "still_names"), r"lacks dataset\(s\) \['still_names'\]"),
])
def test_observation_table_refusals_name_the_file(tmp_path, damage, message):
    p = tmp_path / "bad_obs.h5"
    _table(p)
    damage(p)
    with pytest.raises(InputError, match=rf"bad_obs\.h5.*{message}"):
        observations.read_observations(p)


def test_observation_table_old_string_versions(tmp_path):
    """"1.1" was the version with the weight column (now 2); "1.0" the one without (now 1)."""
    p = tmp_path / "v11.h5"
    want = _table(p)
    _set_attr(p, "schema_version", "1.1")
    np.testing.assert_array_equal(observations.read_observations(p)["weight"], want["weight"])
    p = tmp_path / "v10.h5"
    observations.write_observations(p, want["still_id"], want["voxel_id"], want["q_magnitude"], want["intensity"],
                                    want["sigma"], producer="test", producer_version="1")
    _set_attr(p, "schema_version", "1.0")
    got = observations.read_observations(p)
    assert "weight" not in got and "still_names" not in got
    np.testing.assert_array_equal(got["intensity"], want["intensity"])
    with pytest.raises(InputError, match=r"v10\.h5: no still_names"):
        observations.read_still_names(p)
    # a table without any header (written by hand) is read as version 1, its exact layout
    with h5py.File(p, "r+") as f:
        for a in list(f.attrs):
            del f.attrs[a]
    np.testing.assert_array_equal(observations.read_observations(p)["voxel_id"], want["voxel_id"])


# ---------------------------------------------------------------------------------------- partial accumulator
def _partial(path):
    from voxel_merger.core.grid import GlobalGrid
    from voxel_merger.storage import H5VoxelAccumulator

    grid = GlobalGrid(ndiv=2, lo=(-4, -4, -4), shape=(9, 9, 9), unit_cell=CELL)
    rng = np.random.default_rng(3)
    h, k, l = (rng.uniform(-2, 2, 300) for _ in range(3))
    inten, sig = rng.uniform(1, 5, 300), rng.uniform(0.5, 1, 300)
    with H5VoxelAccumulator(path, grid, mode="w", cache_bytes=1 << 10, block_shift=6) as acc:  # blocked path
        acc.add(h, k, l, inten, sig, still_id="img_0001.cbf#0")
    return grid, (h, k, l, inten, sig)


def test_partial_accumulator_round_trip_equals_in_memory_sums(tmp_path):
    from voxel_merger.core.accumulate import VoxelAccumulator
    from voxel_merger.storage import H5VoxelAccumulator

    p = tmp_path / "partial.h5"
    grid, obs = _partial(p)
    ref = VoxelAccumulator(grid, 1)
    ref.add(*obs, still_id="img_0001.cbf#0")
    with h5py.File(p) as f:
        assert f["accumulator"].attrs["schema_version"] == 2
    with H5VoxelAccumulator(p, mode="r") as acc:
        assert acc.still_ids == ["img_0001.cbf#0"] and acc.grid == grid
        np.testing.assert_allclose(acc.read_range(0, grid.n_voxels), ref.read_range(0, grid.n_voxels), rtol=1e-12)


@pytest.mark.parametrize("damage, message", [
    (lambda p: _set_attr(p, "schema", "other", "accumulator"), "not a voxel-merger accumulator"),
    (lambda p: _set_attr(p, "schema_version", np.int64(4), "accumulator"), "schema version '4' is not supported"),
    (lambda p: _set_attr(p, "schema_version", "1.0", "accumulator"), "schema version '1.0' is not supported"),
    (lambda p: _set_attr(p, "n_obs", None, "accumulator"), r"lacks \['n_obs'\]"),
])
def test_partial_accumulator_refusals_name_the_file(tmp_path, damage, message):
    from voxel_merger.storage import H5VoxelAccumulator

    p = tmp_path / "bad_partial.h5"
    _partial(p)
    damage(p)
    with pytest.raises(InputError, match=rf"bad_partial\.h5.*{message}"):
        H5VoxelAccumulator(p, mode="r")


def test_partial_accumulator_reads_the_old_string_version(tmp_path):
    from voxel_merger.storage import H5VoxelAccumulator

    p = tmp_path / "old.h5"
    _partial(p)
    _set_attr(p, "schema_version", "2.0", "accumulator")
    with H5VoxelAccumulator(p, mode="r") as acc:
        assert acc.n_obs > 0
    with h5py.File(p, "r") as f:
        assert accumulator.check(p, f["accumulator"], []) == 2


# -------------------------------------------------------------------------------------------------- merged map
def _map(path):
    g = _Grid()
    rng = np.random.default_rng(4)
    inten = rng.uniform(1, 2, g.shape)
    inten[0, 0, 0] = np.nan
    sig = rng.uniform(0.1, 0.2, g.shape)
    counts = rng.integers(1, 9, g.shape)
    counts[0, 0, 0] = 0
    merged_map.write_map(path, g, inten, sig, counts, statistics={"n_stills": 3}, producer="test",
                         producer_version="1")
    return g, inten, sig, counts


def test_merged_map_round_trip_dense_and_streamed(tmp_path):
    g, inten, sig, counts = _map(tmp_path / "map.h5")
    m = merged_map.read_map(tmp_path / "map.h5")
    np.testing.assert_array_equal(m["intensity"], inten)
    np.testing.assert_array_equal(m["sigma"], sig)
    np.testing.assert_array_equal(m["counts"], counts)
    for i, ax in enumerate("hkl"):
        np.testing.assert_array_equal(m[ax], g.axis(i))
    assert m["grid"] == g.to_dict() and m["statistics"] == {"n_stills": 3} and m["space_group"] == "P 21 21 21"
    np.testing.assert_array_equal(m["unit_cell"], CELL)
    assert m["provenance"]["schema_version"] == 1
    slabs = ((i, inten[i], sig[i], counts[i]) for i in range(g.shape[0]))
    merged_map.write_map(tmp_path / "streamed.h5", g, slabs=slabs, producer="test", producer_version="1")
    s = merged_map.read_map(tmp_path / "streamed.h5", ("intensity", "counts"))
    np.testing.assert_array_equal(s["intensity"], inten)
    np.testing.assert_array_equal(s["counts"], counts)
    with merged_map.open_map(tmp_path / "map.h5") as f:  # one plane without reading the map
        np.testing.assert_array_equal(f["entry/map/intensity"][1], inten[1])


@pytest.mark.parametrize("chunk_voxels", [merged_map.CHUNK_VOXELS, 7])
def test_merged_map_chunks_are_h_planes_or_their_k_rows(tmp_path, monkeypatch, chunk_voxels):
    """One chunk per h-plane when it fits; a plane larger than the chunk limit is split along k (whole l rows,
    at least one per chunk), and the map reads back the same either way."""
    monkeypatch.setattr(merged_map, "CHUNK_VOXELS", chunk_voxels)
    g, inten, sig, counts = _map(tmp_path / "map.h5")
    nk, nl = g.shape[1], g.shape[2]
    want = (1, nk, nl) if nk * nl <= chunk_voxels else (1, max(1, chunk_voxels // nl), min(nl, chunk_voxels))
    with merged_map.open_map(tmp_path / "map.h5") as f:
        for name in ("intensity", "sigma", "counts"):
            d = f[f"entry/map/{name}"]
            assert d.chunks == want and d.compression == "gzip" and d.shuffle
    m = merged_map.read_map(tmp_path / "map.h5")
    np.testing.assert_array_equal(m["intensity"], inten)
    np.testing.assert_array_equal(m["counts"], counts)


@pytest.mark.parametrize("damage, message", [
    (lambda p: _set_attr(p, "schema", "diffractflow.voxel_merger.observations"), "not a voxel-merger map"),
    (lambda p: _set_attr(p, "schema_version", np.int64(2)), "schema version '2' is not supported"),
    (lambda p: _delete(p, "entry/map/counts"), r"lacks \['entry/map/counts'\]"),
])
def test_merged_map_refusals_name_the_file(tmp_path, damage, message):
    p = tmp_path / "bad_map.h5"
    _map(p)
    damage(p)
    with pytest.raises(InputError, match=rf"bad_map\.h5.*{message}"):
        merged_map.read_map(p)


def test_merged_map_old_string_version_reads_in_every_consumer(tmp_path):
    from orchestration.validation import read_map as validation_read_map
    from scaler.artifacts import read_map as scaler_read_map
    from voxel_merger.artifacts import read_map as merger_read_map

    p = tmp_path / "old.h5"
    g, inten, sig, counts = _map(p)
    _set_attr(p, "schema_version", "1.0")
    np.testing.assert_array_equal(merger_read_map(p).counts, counts)
    np.testing.assert_array_equal(validation_read_map(p)["intensity_errors"], sig)
    s = scaler_read_map(p)
    # |s| of voxel (1, 1, 1) of an orthorhombic cell: sqrt((h/a)^2 + (k/b)^2 + (l/c)^2), h = axis value
    h, k, l = (g.axis(i)[1] for i in range(3))
    assert s["s"][1, 1, 1] == pytest.approx(np.sqrt((h / CELL[0]) ** 2 + (k / CELL[1]) ** 2 + (l / CELL[2]) ** 2))


# ------------------------------------------------------------------------------------------------------ scales
def test_scales_round_trip_and_version_1_keys(tmp_path):
    p = tmp_path / "scales.json"
    scales.write_scales(p, {"a.cbf#0": 1.5, "b.cbf#0": 0.5})
    assert json.loads(p.read_text()) == {"schema": "diffractflow.scaler.scales", "schema_version": 2,
                                         "scales": {"a.cbf#0": 1.5, "b.cbf#0": 0.5}}
    assert scales.read_scales(p) == {"a.cbf#0": 1.5, "b.cbf#0": 0.5}
    with pytest.raises(ValueError, match="still id"):
        scales.write_scales(tmp_path / "x.json", {"0": 1.0})
    with pytest.raises(ValueError, match="table index"):
        scales.write_scales(tmp_path / "x.json", {"a.cbf#0": 1.0}, version=1)
    v1 = scales.write_scales(tmp_path / "v1.json", {"1": 0.5, "0": 1.5}, version=1)
    assert json.loads(v1.read_text())["schema_version"] == 1
    assert scales.read_scales(v1, ["a.cbf#0", "b.cbf#0"]) == {"a.cbf#0": 1.5, "b.cbf#0": 0.5}
    bare = tmp_path / "bare_scales.json"  # the bare {still id: b} earlier releases wrote for version 2
    bare.write_text(json.dumps({"a.cbf#0": 1.5, "b.cbf#0": 0.5}))
    assert scales.read_scales(bare) == {"a.cbf#0": 1.5, "b.cbf#0": 0.5}
    old = tmp_path / "old_scales.json"
    old.write_text(json.dumps({"0": 1.5, "1": 0.5}))
    assert scales.read_scales(old, ["a.cbf#0", "b.cbf#0"]) == {"a.cbf#0": 1.5, "b.cbf#0": 0.5}
    with pytest.raises(InputError, match=r"old_scales\.json.*table index"):
        scales.read_scales(old)
    with pytest.raises(InputError, match=r"old_scales\.json.*outside the observation table's 1 stills"):
        scales.read_scales(old, ["a.cbf#0"])
    doc = tmp_path / "doc.json"
    doc.write_text(json.dumps({"schema": scales.SCHEMA, "schema_version": "1", "scales": {"0": 2.0}}))
    assert scales.read_scales(doc, ["a.cbf#0"]) == {"a.cbf#0": 2.0}


@pytest.mark.parametrize("doc, message", [
    ({"schema": "diffractflow.other", "schema_version": 2, "scales": {}}, "not a scales JSON"),
    ({"schema": scales.SCHEMA, "schema_version": 3, "scales": {}}, "schema version 3 is not supported"),
    ({"schema": scales.SCHEMA, "schema_version": 2}, "lacks the 'scales' object"),
    ({"a#0": -1.0}, "must be positive"),
    ([1.0], "expected a JSON object"),
])
def test_scales_refusals_name_the_file(tmp_path, doc, message):
    p = tmp_path / "bad_scales.json"
    p.write_text(json.dumps(doc))
    with pytest.raises(InputError, match=rf"bad_scales\.json.*{message}"):
        scales.read_scales(p)


def test_header_integer_and_legacy_versions(tmp_path):
    from diffractflow.formats import check_header

    with h5py.File(tmp_path / "h.h5", "w") as f:
        write_header(f, schema="s", version=3, producer="test")
        assert check_header("h.h5", f.attrs, schema="s", versions=(3,), legacy={}, what="x") == 3
        f.attrs["schema_version"] = "3"  # a string form not listed for this format
        with pytest.raises(InputError, match=r"h\.h5: x schema version '3'"):
            check_header("h.h5", f.attrs, schema="s", versions=(3,), legacy={}, what="x")
        assert check_header("h.h5", f.attrs, schema="s", versions=(3,), legacy={"3": 3}, what="x") == 3


# ------------------------------------------------------------- scales by still id: the same map as by index
def test_scales_by_still_id_merge_to_the_same_map_as_index_keyed_scales(tmp_path):
    """The merge applies still-id scales without the observation table; old index-keyed scales need the table's
    still_names and give the identical map. The planted scales are recovered as the map's ratio to the truth."""
    from voxel_merger.artifacts import read_map, write_still
    from voxel_merger.core.params import MergeOptions
    from voxel_merger.pipeline import accumulate_one, grid_from_inputs, merge_partials, run
    from voxel_merger.synthetic import synthetic_still

    def truth(h, k, l):
        return 50.0 + 10.0 * np.cos(h) * np.cos(k) + 0.0 * l

    rng = np.random.default_rng(5)
    planted, paths = {}, []
    for i in range(4):
        b = float(rng.uniform(0.5, 2.0))
        s = synthetic_still(f"img_{i:04d}.cbf#0", CELL, truth, rng, space_group="P 21 21 21", n_side=40, pixel=1.5,
                            sigma0=0.5, scale=b)
        planted[s.still_id] = b
        paths.append(write_still(tmp_path / f"still_{i}.h5", s.still_id, s.h, s.k, s.l, s.intensity, s.sigma,
                                 s.q_magnitude, s.crystal))
    opt = MergeOptions()
    outputs, _ = run(paths, tmp_path / "run", opt)  # the table whose still_names decode old keys
    names = observations.read_still_names(outputs["observations"])
    scales.write_scales(tmp_path / "by_id.json", planted)
    (tmp_path / "by_index.json").write_text(json.dumps({str(i): planted[n] for i, n in enumerate(names)}))
    grid, _ = grid_from_inputs(paths, opt)
    partials = []
    for i, p in enumerate(paths):
        partials.append(tmp_path / f"partial_{i}.h5")
        accumulate_one(p, grid, partials[-1], opt)
    merge_partials(partials, tmp_path / "by_id", opt, scales_path=tmp_path / "by_id.json")
    merge_partials(partials, tmp_path / "by_index", opt, scales_path=tmp_path / "by_index.json",
                   table_path=outputs["observations"])
    a, b = read_map(tmp_path / "by_id" / "map.h5"), read_map(tmp_path / "by_index" / "map.h5")
    np.testing.assert_array_equal(a.counts, b.counts)
    np.testing.assert_array_equal(a.intensity, b.intensity)
    # the scales were applied: the map is the planted truth (unscaled: off by the scales' spread)
    meas = a.counts > 0
    H, K, L = np.meshgrid(*(a.grid.axis(i) for i in range(3)), indexing="ij")
    assert np.median(np.abs(a.intensity[meas] / truth(H, K, L)[meas] - 1)) < 0.03
    unscaled = read_map(outputs["map"])
    assert np.median(np.abs(unscaled.intensity[meas] / truth(H, K, L)[meas] - 1)) > 0.1


@pytest.mark.parametrize("open_", [
    lambda p: merged_map.read_map(p),
    lambda p: observations.read_observations(p),
    lambda p: still_table.StillTable(p),
], ids=["merged_map", "observations", "still_table"])
def test_every_hdf5_reader_names_a_missing_or_non_hdf5_file(tmp_path, open_):
    with pytest.raises(InputError, match=r"absent\.h5: .* not found"):
        open_(tmp_path / "absent.h5")
    text = tmp_path / "text.h5"
    text.write_text("not HDF5")
    with pytest.raises(InputError, match=r"text\.h5: .* is not a readable HDF5 file"):
        open_(text)
