"""The scaler's one parameter model: unknown keys refused, the CLI's defaults are the model's, every params dict the
orchestration sends is valid, and a bug in the handler is a failure the bus retries, not a rejection."""
from __future__ import annotations


import numpy as np
import pytest
import typer
from pydantic import ValidationError

from scaler.artifacts import write_observations
from scaler.cli import app
from scaler.core.params import AbsoluteParams, RelativeParams
from scaler.worker import STAGE


def _reason(exc: ValidationError) -> str:
    """The rejection reason as the runtime words it (diffractflow.runtime, bad_params)."""
    return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())


@pytest.mark.parametrize("params, key", [({"smoothr": True}, "smoothr"),
                                         ({"mode": "relative", "n_control_point": 4}, "n_control_point"),
                                         ({"mode": "absolute", "formula": "C10", "smoother": True}, "smoother"),
                                         ({"mode": "absolute", "formulae": "C10"}, "formulae")])
def test_unknown_params_are_refused_naming_the_key(params, key):
    with pytest.raises(ValidationError) as e:
        STAGE.params_model.model_validate(params)
    assert key in _reason(e.value) and "Extra inputs are not permitted" in _reason(e.value)


def test_job_kind_by_mode_relative_when_absent():
    assert isinstance(STAGE.params_model.model_validate({}).root, RelativeParams)
    p = STAGE.params_model.model_validate({"mode": "absolute", "formula": "C10"}).root
    assert isinstance(p, AbsoluteParams) and p.copies == 1.0
    with pytest.raises(ValidationError) as e:
        STAGE.params_model.model_validate({"mode": "scale"})
    assert "mode must be 'relative' or 'absolute'" in _reason(e.value)
    # seed 003: more than 5 smoother control points is the seed's parameter-limit error, reported on the field
    with pytest.raises(ValidationError) as e:
        STAGE.params_model.model_validate({"smoother": True, "n_control_points": 6})
    assert "n_control_points" in _reason(e.value) and "v1 model parameter limit exceeded" in _reason(e.value)


# CLI option -> model field where the names differ
CLI_NAMES = {"tolerance": "convergence_tolerance", "minimizer": "minimizer_type",
             "min_information": "smoother_min_information"}


@pytest.mark.parametrize("command, model", [("run", RelativeParams), ("absolute", AbsoluteParams)])
def test_cli_defaults_are_the_models(command, model):
    cmd = typer.main.get_command(app).commands[command]
    checked = 0
    for p in cmd.params:
        field = CLI_NAMES.get(p.name, p.name)
        if field in model.model_fields:
            assert p.default == model.model_fields[field].default, (command, p.name)
            checked += 1
    # every field but mode, q_range (two options, --q-min/--q-max) and sequences (a file) has its option
    assert checked == len(set(model.model_fields) - {"mode", "q_range", "sequences"})


def test_orchestration_params_are_valid():
    """The params orchestration/diffuse.py sends the scaler (diffuse_merge_flow), built from a run config."""
    from orchestration.diffuse import DiffuseRunConfig

    cfg = DiffuseRunConfig(space_group="P 43 21 2", unit_cell=[57.8, 57.8, 150.0, 90, 90, 90], formula="C400H640",
                           symmetry="P 43 21 2", rotation_smoothness=3.0)
    relative = {"mode": "relative", "smoother": cfg.smoother, "partiality_threshold": cfg.partiality_threshold,
                "sequences": {"sweep_0": ["sweep_0001.cbf#0", "sweep_0002.cbf#0"]},
                "rotation_smoothness": cfg.rotation_smoothness, "space_group": cfg.symmetry or cfg.space_group}
    p = STAGE.params_model.model_validate(relative).root
    assert isinstance(p, RelativeParams) and p.rotation_smoothness == 3.0 and p.space_group == "P 43 21 2"
    p = STAGE.params_model.model_validate({"mode": "absolute", "formula": cfg.formula}).root
    assert isinstance(p, AbsoluteParams) and p.formula == "C400H640"


def test_a_bug_is_a_failure_retried_not_a_rejection(planted_bug, volume):
    """A ValueError from a bug in the relative step is retried, then dead-lettered as a failure; the old worker
    turned it into a rejection (bad_input) at once."""
    import scaler.worker as worker

    rng = np.random.default_rng(0)
    n = 200
    obs = volume / "incoming" / "obs.h5"
    obs.parent.mkdir(parents=True)
    write_observations(obs, np.repeat(np.arange(10), n // 10), rng.integers(0, 20, n), rng.uniform(0.1, 0.5, n),
                       rng.uniform(50, 60, n), np.full(n, 2.0))
    assert planted_bug(STAGE, worker, "run_relative", {"observations": obs}, {}) == (2, [("bug", "failure")])


def test_a_bad_formula_is_an_input_error_naming_it(tmp_path):
    """The user's unit-cell contents are input: an unknown element is rejected (InputError), not retried."""
    import h5py

    from diffractflow.errors import InputError
    from scaler.pipeline import run_absolute

    mp = tmp_path / "map.h5"
    with h5py.File(mp, "w") as f:
        f["q_magnitude"] = np.linspace(0.05, 0.5, 200)
        f["intensity"] = np.full(200, 100.0)
    with pytest.raises(InputError, match="unknown element 'Qq'"):
        run_absolute(mp, tmp_path / "out", formula="C100Qq12", cell_volume=1e4)


def test_cli_refuses_a_bad_option_value_naming_it(tmp_path):
    from typer.testing import CliRunner

    r = CliRunner().invoke(app, ["run", "--observations", str(tmp_path / "x.h5"), "--out", str(tmp_path / "o"),
                                 "--minimizer", "newton"])
    assert r.exit_code == 2 and "--minimizer:" in r.output and "gauss_newton" in r.output
