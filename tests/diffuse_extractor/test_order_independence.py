"""The same stills extracted in another order, by other processes, give the same per-still tables (and so the same
map: the merger sums the stills' partials in a fixed order).

Stills and background-only frames rendered by the simulator (diff_sim_refiner), the true crystal model per still;
the extractor's library as the bus worker calls it (``pipeline.process`` with the run's pixel statistics and
beamstop record, the flow's fixed Bragg radius). A "process" is the extractor's per-process beamstop store: cleared
before each still when every still goes to another process.
"""
from __future__ import annotations

import numpy as np
import pytest

COLUMNS = ["x", "y", "h", "k", "l", "intensity", "sigma"]
RADIUS_PX = 6.0  # the flow's run-wide default (orchestration.diffuse.DiffuseRunConfig.bragg_radius_px)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from dxtbx.model import Crystal
    from dxtbx.model.experiment_list import ExperimentList, ExperimentListFactory

    from diff_sim_refiner.datasets.stills import StillsSpec, generate_stills

    d = tmp_path_factory.mktemp("order")
    truth = generate_stills(d, StillsSpec(n_stills=3, n_background_frames=2, seed=11))
    expts = []
    for st in truth["stills"]:
        el = ExperimentListFactory.from_filenames([str(d / st["file"])])
        real = np.linalg.inv(np.asarray(st["A"]))  # rows: real-space a, b, c of A = U B
        el[0].crystal = Crystal(real[0], real[1], real[2], space_group_symbol=truth["space_group"])
        p = d / st["file"].replace(".cbf", ".expt")
        ExperimentList([el[0]]).as_file(str(p))
        expts.append(p)
    return {"dir": d, "expts": expts, "background": [d / f for f in truth["background_frames"]]}


def _run(dataset, run_dir, order, *, new_process_per_still: bool, record: bool) -> list[dict]:
    """Extract the stills in ``order`` as one run; per-still table columns in the stills' own order."""
    from diffractflow.formats.still_table import StillTable
    from diffuse_extractor import pipeline
    from diffuse_extractor.core.params import BackgroundJob, ExtractionParams

    run_dir.mkdir()
    rec = run_dir / "beamstop.npz" if record else None
    bkg, _ = pipeline.make_background(dataset["background"], run_dir / "background.h5", BackgroundJob(),
                                      beamstop_record=rec)
    pipeline._RUN_BEAMSTOPS.clear()
    tables = {}
    for i in order:
        if new_process_per_still:
            pipeline._RUN_BEAMSTOPS.clear()
        out = pipeline.process(dataset["expts"][i], run_dir / f"s{i}", params=ExtractionParams(bragg_radius_px=RADIUS_PX),
                               background_path=bkg, pngs=False, run_key=str(run_dir),
                               pixel_stats=run_dir / "pixel_stats.h5", beamstop_record=rec)
        with StillTable(out[0]["artifact"]) as t:
            tables[i] = t.read_columns(COLUMNS)
    pipeline._RUN_BEAMSTOPS.clear()
    return [tables[i] for i in sorted(tables)]


def _same(a: list[dict], b: list[dict]) -> list[bool]:
    return [all(np.array_equal(ta[c], tb[c]) for c in COLUMNS) for ta, tb in zip(a, b)]


def test_two_orders_and_processes_give_identical_tables(dataset, tmp_path):
    a = _run(dataset, tmp_path / "a", [0, 1, 2], new_process_per_still=False, record=True)
    b = _run(dataset, tmp_path / "b", [2, 0, 1], new_process_per_still=True, record=True)
    assert all(len(t["intensity"]) > 100_000 for t in a)
    assert _same(a, b) == [True, True, True]


def test_without_the_record_the_first_still_sets_the_shadow(dataset, tmp_path):
    """The check above can fail: without the run's record, one process reuses the shadow found on the first still
    it extracted, and another order gives other tables."""
    a = _run(dataset, tmp_path / "a", [0, 1, 2], new_process_per_still=False, record=False)
    b = _run(dataset, tmp_path / "b", [2, 0, 1], new_process_per_still=False, record=False)
    assert not all(_same(a, b))
