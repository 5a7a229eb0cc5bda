"""The voxel merger's one parameter model: unknown keys refused, the CLI's defaults are the model's (the bus's
hdf5 backend among them), every params dict the orchestration sends is valid, the merge outlier rule is one for
CLI and bus, and a bug in the handler is a failure the bus retries, not a rejection."""
from __future__ import annotations


import numpy as np
import pytest
import typer
from pydantic import ValidationError

from voxel_merger.artifacts import write_still
from voxel_merger.cli import app
from voxel_merger.core.params import (AccumulateParams, MergeOptions, MergeParams, RunParams, merge_options,
                                      merge_reject_sigma)
from voxel_merger.worker import STAGE


def _reason(exc: ValidationError) -> str:
    """The rejection reason as the runtime words it (diffractflow.runtime, bad_params)."""
    return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())


@pytest.mark.parametrize("params, key", [({"smoothr": True}, "smoothr"),
                                         ({"mode": "merge", "subdivisions": 3}, "subdivisions"),
                                         ({"mode": "accumulate", "symmetry": "P 1"}, "symmetry"),
                                         ({"mode": "run", "grid_spec": {}}, "grid_spec")])
def test_unknown_params_are_refused_naming_the_key(params, key):
    with pytest.raises(ValidationError) as e:
        STAGE.params_model.model_validate(params)
    assert key in _reason(e.value) and "Extra inputs are not permitted" in _reason(e.value)


def test_job_kind_by_mode_run_when_absent():
    assert isinstance(STAGE.params_model.model_validate({}).root, RunParams)
    with pytest.raises(ValidationError) as e:
        STAGE.params_model.model_validate({"mode": "explode"})
    assert "mode must be 'accumulate', 'merge' or 'run'" in _reason(e.value)


# CLI option -> MergeOptions field where the names differ (merge's --table is the observation table to read)
CLI_NAMES = {"shells": "n_shells", "table": "write_table"}


@pytest.mark.parametrize("command, n_fields", [("run", 9), ("grid", 2), ("accumulate", 1), ("merge", 6)])
def test_cli_defaults_are_the_models(command, n_fields):
    cmd = typer.main.get_command(app).commands[command]
    checked = []
    for p in cmd.params:
        field = CLI_NAMES.get(p.name, p.name)
        if field in MergeOptions.model_fields and not (command == "merge" and p.name == "table"):
            assert p.default == MergeOptions.model_fields[field].default, (command, p.name)
            checked.append(field)
    assert len(checked) == n_fields, checked
    if "backend" in checked:  # the bus's default backend is the CLI's
        assert cmd.params[[p.name for p in cmd.params].index("backend")].default == \
            STAGE.params_model.model_validate({}).root.backend == "hdf5"


def test_orchestration_params_are_valid():
    """The params orchestration/diffuse.py sends the voxel-merger (accumulate per still, the two merges)."""
    from orchestration.diffuse import DiffuseRunConfig, grid_spec

    cfg = DiffuseRunConfig(space_group="P 43 21 2", unit_cell=[57.8, 57.8, 150.0, 90, 90, 90], symmetry="P 43 21 2")
    acc = STAGE.params_model.model_validate({"mode": "accumulate", "grid_spec": grid_spec(cfg)}).root
    assert isinstance(acc, AccumulateParams) and acc.grid_spec["d_min"] == cfg.d_min
    merge_params = {"mode": "merge", "symmetry": cfg.symmetry, "reject_sigma": cfg.reject_sigma,
                    "exclude_bragg_voxels": cfg.exclude_bragg_voxels and cfg.subdivisions >= 3}
    for params in ({**merge_params, "reject_sigma": None}, merge_params):
        p = STAGE.params_model.model_validate(params).root
        assert isinstance(p, MergeParams) and p.symmetry == "P 43 21 2" and p.exclude_bragg_voxels
    assert merge_options(p).reject_sigma == 5.0 and merge_options(p).backend == "hdf5"


def test_merge_outlier_rule():
    """Not given: 5 σ with scales, off without; 0: off; a value: itself (CLI merge and bus merge jobs alike)."""
    assert merge_reject_sigma(None, scaled=True) == 5.0
    assert merge_reject_sigma(None, scaled=False) is None
    assert merge_reject_sigma(0.0, scaled=True) is None
    assert merge_reject_sigma(7.0, scaled=False) == 7.0


def test_a_bug_is_a_failure_retried_not_a_rejection(planted_bug, volume):
    """A ValueError from a bug in accumulation is retried, then dead-lettered as a failure, never a rejection
    (bad_input)."""
    import voxel_merger.worker as worker

    still = volume / "incoming" / "still.h5"
    still.parent.mkdir(parents=True)
    hkl = np.random.default_rng(0).uniform(-5, 5, (3, 100))
    write_still(still, "s0", *hkl, np.full(100, 10.0), np.full(100, 3.0))
    spec = {"unit_cell": [50, 60, 70, 90, 90, 90], "space_group": "P 1", "d_min": 4.0, "subdivisions": 3}
    assert planted_bug(STAGE, worker, "accumulate_one", {"still": still}, {"mode": "accumulate", "grid_spec": spec}) \
        == (2, [("bug", "failure")])


def test_cli_refuses_a_bad_option_value_naming_it(tmp_path):
    from typer.testing import CliRunner

    r = CliRunner().invoke(app, ["merge", str(tmp_path / "p.h5"), "--out", str(tmp_path / "o"), "--shells", "0"])
    assert r.exit_code == 2 and "--shells:" in r.output and "greater than or equal to 1" in r.output
    r = CliRunner().invoke(app, ["grid", str(tmp_path / "s.h5"), "--out", str(tmp_path / "g.json"),
                                 "--subdivisions", "4"])
    assert r.exit_code == 2 and "odd" in r.output
