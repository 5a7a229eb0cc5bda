"""The refinement library's defaults are the job models' (core.params): a refine job, the Python API and the
seed-001 demo run the same settings when nothing is given."""
from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

from diff_sim_refiner.core.params import DemoParams, RefineParams
from diff_sim_refiner.refine.demo import demo_configs, run_demo
from diff_sim_refiner.refine.refiner import Refiner, RefineSettings


def _defaults(fn) -> dict:
    return {k: p.default for k, p in inspect.signature(fn).parameters.items() if p.default is not p.empty}


def test_library_defaults_are_the_models():
    job = RefineParams()
    s = RefineSettings()
    assert (s.optimizer, s.iterations, s.lr, s.lbfgs_steps) == (job.optimizer, job.iterations, job.lr, job.lbfgs_steps)
    d = _defaults(Refiner.__init__)
    assert (d["scale"], d["loss"], d["dtype"]) == (job.scale, job.loss, {"float64": torch.float64}[job.dtype])
    demo = DemoParams()
    d = _defaults(run_demo)
    assert (d["adam_iterations"], d["lr"], d["lbfgs_steps"]) == (demo.iterations, demo.lr, demo.lbfgs_steps)


def test_a_jobs_parameters_reach_the_refiner():
    p = RefineParams(params=["mosaic"], optimizer="lbfgs", iterations=7, lr=0.2, lbfgs_steps=3, loss="poisson",
                     scale=2.5, dtype="float32", init={"mosaic": [0.3]}, bounds={"mosaic": [[0.1, 0.9]]})
    s = RefineSettings.from_params(p)
    assert (s.optimizer, s.iterations, s.lr, s.lbfgs_steps) == ("lbfgs", 7, 0.2, 3)
    crystal, detector, beam = demo_configs()
    r = Refiner.from_params(crystal, detector, beam, np.zeros((detector.spixels, detector.fpixels)), p)
    assert r.params == ["mosaic"] and r.loss_kind == "poisson" and r.dtype == torch.float32
    assert r.flat_values()["mosaic_spread"] == pytest.approx(0.3)
    with pytest.raises(ValueError, match="bound"):  # a start outside the job's bounds is refused
        Refiner.from_params(crystal, detector, beam, np.zeros((detector.spixels, detector.fpixels)),
                            p.model_copy(update={"init": {"mosaic": [2.0]}}))
