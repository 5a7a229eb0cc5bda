"""diff-sim-refiner's one parameter model per job kind: unknown keys refused naming them, the CLI's defaults are the
models', input errors rejected at once, and a bug in the handler a failure the bus retries (not a rejection)."""
from __future__ import annotations


import pytest
import typer
from pydantic import ValidationError

from diff_sim_refiner.cli import app
from diff_sim_refiner.core.params import REFINABLE_GROUPS, DemoParams, RefineParams, SimulateParams
from diff_sim_refiner.worker import STAGE

SMALL = ["-cell", "100", "100", "100", "90", "90", "90", "-default_F", "100", "-N", "5", "-lambda", "1.0",
         "-distance", "100", "-detpixels", "16", "-pixel", "0.1", "-oversample", "1"]


def _reason(exc: ValidationError) -> str:
    """The rejection reason as the runtime words it (diffractflow.runtime, bad_params)."""
    return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())


@pytest.mark.parametrize("params, key", [
    ({"spotcutoff": 3}, "spotcutoff"),
    ({"kind": "simulate", "iterations": 5}, "iterations"),          # a refine field on a simulate job
    ({"kind": "refine", "optimiser": "adam"}, "optimiser"),
    ({"kind": "refine", "crystal": {"misset": [1, 2, 3]}}, "misset"),  # inside a model section: CrystalConfig's fields
    ({"detector": {"distance": 100}}, "distance"),
    ({"beam": {"lambda_A": 1.0}}, "lambda_A"),
])
def test_unknown_params_are_refused_naming_the_key(params, key):
    with pytest.raises(ValidationError) as e:
        STAGE.params_model.model_validate(params)
    assert key in _reason(e.value)
    assert "Extra inputs are not permitted" in _reason(e.value) or "unknown key(s) in" in _reason(e.value)


def test_job_kind_simulate_when_absent_and_checked_ranges():
    assert isinstance(STAGE.params_model.model_validate({}).root, SimulateParams)
    p = STAGE.params_model.model_validate({"kind": "refine", "params": ["orientation", "mosaic_spread"]}).root
    assert isinstance(p, RefineParams) and p.params == ["misset", "mosaic"]   # the refine package's aliases
    with pytest.raises(ValidationError) as e:
        STAGE.params_model.model_validate({"kind": "render"})
    assert "kind must be 'simulate' or 'refine'" in _reason(e.value)
    for bad, needle in [({"kind": "refine", "lr": 0}, "lr"), ({"spot_cutoff": -1}, "spot_cutoff"),
                        ({"kind": "refine", "init": {"misset": [1.0, 2.0]}}, "init.misset needs 3 value(s)"),
                        ({"kind": "refine", "bounds": {"wobble": [[0, 1]]}}, "unknown parameter group 'wobble'"),
                        ({"kind": "refine", "params": ["wobble"]}, "unknown parameter 'wobble'")]:
        with pytest.raises(ValidationError) as e:
            STAGE.params_model.model_validate(bad)
        assert needle in _reason(e.value), (bad, _reason(e.value))


def test_refinable_groups_are_the_refine_packages():
    """core.params lists the groups without importing torch; the refine package's table is the owner."""
    from diff_sim_refiner.refine.params import PARAM_SPECS

    assert REFINABLE_GROUPS == {name: len(spec.labels) for name, spec in PARAM_SPECS.items()}


# CLI option -> model field where the names differ (the flags are booleans for the dtype)
CLI_NAMES = {"float64": "dtype", "float32": "dtype"}


@pytest.mark.parametrize("command, model, flags", [("run", SimulateParams, {"float64": "float64"}),
                                                   ("refine", RefineParams, {"float32": "float32"}),
                                                   ("refine-demo", DemoParams, {})])
def test_cli_defaults_are_the_models(command, model, flags):
    # the model sections come from the config file; init/bounds are NAME=... lists (empty by default); scale and
    # max_pixels are bus-only
    not_options = {"kind", "crystal", "detector", "beam", "nanobragg", "max_pixels", "init", "bounds", "scale"}
    cmd = typer.main.get_command(app).commands[command]
    checked = set()
    for p in cmd.params:
        field = CLI_NAMES.get(p.name, p.name)
        if field not in model.model_fields or field in not_options:
            continue
        want = model.model_fields[field].get_default(call_default_factory=True)
        if p.name in flags:       # a boolean flag: set means the non-default precision
            assert p.default == (want == flags[p.name]), (command, p.name)
        elif isinstance(want, list):
            assert p.default == ",".join(want), (command, p.name)
        else:
            assert p.default == want, (command, p.name)
        checked.add(field)
    assert checked == set(model.model_fields) - not_options


def test_cli_refuses_a_bad_option_value_naming_it(tmp_path):
    from typer.testing import CliRunner

    r = CliRunner().invoke(app, ["refine", "--target", str(tmp_path / "t.npy"), "--config", str(tmp_path / "c.yaml"),
                                 "--optimizer", "sgd"])
    assert r.exit_code == 2 and "--optimizer:" in r.output and "adam+lbfgs" in r.output
    r = CliRunner().invoke(app, ["run", str(tmp_path / "c.yaml"), "--spot-cutoff", "0"])
    assert r.exit_code == 2 and "--spot-cutoff:" in r.output


def test_input_errors_are_input_errors(tmp_path):
    """A bad flag, a config value the simulator refuses and an unreadable hkl file are InputErrors (rejected)."""
    from diffractflow.errors import InputError

    from diff_sim_refiner.artifacts import job_from_mapping, job_from_params
    from diff_sim_refiner.nbargs import FlagError

    assert issubclass(FlagError, InputError)
    with pytest.raises(InputError, match="-roi"):
        job_from_params(SimulateParams(nanobragg=[*SMALL, "-roi", "1", "2"]), {})
    with pytest.raises(InputError, match="'detector'.*1x1"):
        job_from_mapping({"crystal": {"cell_a": 50.0}, "detector": {"fpixels": 0}})
    bad = tmp_path / "bad.hkl"
    bad.write_text("1 2 x 4\n")
    with pytest.raises(InputError, match="bad.hkl"):
        job_from_params(SimulateParams(nanobragg=[*SMALL, "-hkl", "ignored"]), {"hkl": bad})
    with pytest.raises(InputError, match="max_pixels"):
        job_from_params(SimulateParams(nanobragg=SMALL, max_pixels=10), {})


def test_a_bug_is_a_failure_retried_not_a_rejection(planted_bug):
    """A ValueError from a bug in building the model (here in the structure-factor step) is retried, then
    dead-lettered as a failure; the old worker turned any ValueError or TypeError of that step into a rejection
    (bad_input) at once. (Bad flags are still rejected at once: tests/reliability/test_reliability_bad_inputs.py.)"""
    import diff_sim_refiner.artifacts as artifacts

    assert planted_bug(STAGE, artifacts, "load_structure_factors", {}, {"nanobragg": SMALL}) == \
        (2, [("bug", "failure")])


