"""datasets.planted: a dataset's truth dict read back as the per-image planted scale and true orientation(s)
(the demo's and the benchmarks' comparison), checked against rotations written out by hand, not the generator's."""
from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np

from diff_sim_refiner.datasets.planted import SWEEP_GENERATOR, planted_images, stills_spec
from diff_sim_refiner.datasets.stills import StillsSpec
from diff_sim_refiner.datasets.sweep import SweepSpec


def _rot_x(deg: float) -> np.ndarray:
    """Right-handed rotation about lab +x (the sweep's goniometer axis)."""
    c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


def test_sweep_frames_average_over_their_oscillation():
    A0 = np.array([[0.02, 0.001, 0.0], [0.0, 0.025, 0.002], [0.001, 0.0, 0.0166]])
    spec = SweepSpec(n_frames=2, osc_deg=1.0, start_deg=10.0, phi_steps=8, modules=(1, 2))
    truth = {"generator": SWEEP_GENERATOR, "spec": asdict(spec), "A0": A0.tolist(), "stills": [],
             "frames": [{"file": "sweep_0001.cbf", "phi_start_deg": 10.0, "phi_end_deg": 11.0, "scale": 1.2},
                        {"file": "sweep_0002.cbf", "phi_start_deg": 11.0, "phi_end_deg": 12.0, "scale": 0.8}]}
    got = planted_images(truth)
    assert set(got) == {"sweep_0001.cbf", "sweep_0002.cbf"} and got["sweep_0002.cbf"]["scale"] == 0.8
    As = got["sweep_0002.cbf"]["A"]
    assert len(As) == 8  # phi_steps sub-steps at their midpoints: 11.0625, 11.1875, ... 11.9375 deg
    for j, A in enumerate(As):
        np.testing.assert_allclose(A, _rot_x(11.0 + (j + 0.5) / 8) @ A0, atol=1e-12)
    coarse = planted_images({**truth, "spec": asdict(SweepSpec(phi_steps=1, modules=(1, 2)))})
    assert len(coarse["sweep_0001.cbf"]["A"]) == 4  # at least 4 sub-steps even when the frame was rendered with 1
    # the stills spec of a sweep: its detector, as the stills generator would build it
    assert stills_spec(truth).image_size == spec.image_size and stills_spec(truth).n_stills == 0


def test_stills_keep_their_one_orientation_and_spec():
    spec = StillsSpec(n_stills=1, modules=(1, 1), distance_mm=120.0)
    A = [[0.025, 0, 0], [0, 0.025, 0], [0, 0, 0.0166]]
    truth = {"generator": "diff_sim_refiner.datasets.stills", "spec": asdict(spec),
             "stills": [{"file": "still_0001.cbf", "scale": 1.3, "U": np.eye(3).tolist(), "A": A}]}
    assert planted_images(truth) == {"still_0001.cbf": {"scale": 1.3, "A": A}}
    truth = json.loads(json.dumps(truth))  # as read from truth.json: the spec's tuples are lists
    assert stills_spec(truth) == spec
