"""A rotation sequence goes down the sequence path and integrates (synthetic frames, planted crystal)."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("dials")


def test_sequence_is_routed_indexed_and_integrated(sequence_run):
    run, truth = sequence_run
    assert run.exit_code == 0, run.stdout[-3000:]
    assert len(run.rows) == 1  # 8 oscillation frames grouped into one sequence
    row = run.rows[0]
    assert row["kind"] == "sequence" and row["status"] == "indexed", row["reason"]
    assert row["input_files"] == [str(p.resolve()) for p in truth.paths]
    assert row["space_group"] == "P 41 21 2"
    np.testing.assert_allclose(row["unit_cell"], truth.unit_cell, rtol=2e-3)
    assert row["n_indexed"] > 0.8 * row["n_spots"] and row["n_refined"] > 0.8 * row["n_indexed"]
    assert row["n_integrated"] > 0.5 * truth.n_reflections
    assert row["rmsd_x_px"] < 0.5 and row["rmsd_y_px"] < 0.5 and row["rmsd_z"] < 0.1  # deg
    assert row["validation_passed"] and row["q_median_error"] < 5e-4


def test_sequence_orientation_matches_planted_crystal(sequence_run):
    """Found A equals planted A up to an operation of the lattice's point group (indexing ambiguity)."""
    from cctbx import sgtbx

    run, truth = sequence_run
    A = np.array(run.rows[0]["A_matrix"])
    ops = [np.array(op.r().as_double()).reshape(3, 3) for op in sgtbx.space_group_info("P 4 2 2").group()]
    # A_found h' = A_true h with h = R h' for a rotation R of the point group
    best = min(np.abs(A - truth.A @ R).max() for R in ops)
    assert best < 2e-3 * np.abs(truth.A).max()


def test_sequence_files_are_a_rotation_experiment(sequence_run):
    from dials.array_family import flex
    from dxtbx.model.experiment_list import ExperimentList

    run, truth = sequence_run
    row = run.rows[0]
    el = ExperimentList.from_file(row["expt_path"], check_format=False)
    assert el[0].scan is not None and el[0].scan.get_oscillation()[1] == pytest.approx(0.5)
    assert el[0].scan.get_num_images() == 8
    refl = flex.reflection_table.from_file(row["refl_path"])
    sel = refl.get_flags(refl.flags.integrated_sum)
    assert sel.count(True) == row["n_integrated"]
    # phi of integrated reflections spans the 4 deg scan
    z = np.array(refl["xyzcal.mm"]).reshape(-1, 3)[:, 2]
    assert np.degrees(z.min()) < 1.0 and np.degrees(z.max()) > 3.0
