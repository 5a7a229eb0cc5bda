"""torch.autograd.gradcheck (float64) of the full forward model for every refinable parameter family.

A 6 x 6 pixel ROI sits on the flank of a Bragg spot so every parameter changes the counts."""
from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck

from diff_sim_refiner.core.config import BeamConfig, CrystalConfig, DetectorConfig
from diff_sim_refiner.core.simulator import simulate

F64 = torch.float64


def _leaf(v) -> torch.Tensor:
    return torch.tensor(float(v), dtype=F64, requires_grad=True)


BASE_CRYSTAL = dict(cell_a=60.0, cell_b=70.0, cell_c=80.0, cell_alpha=88.0, cell_beta=93.0, cell_gamma=91.0,
                    N_cells=(5, 5, 5), default_F=100.0, misset_deg=(10.0, 20.0, 30.0))
# ROI on the flank of a spot (found once from a full render of this geometry)
BASE_DETECTOR = dict(distance_mm=100.0, pixel_size_mm=0.1, fpixels=128, spixels=128, roi=(20, 25, 21, 26))
BASE_BEAM = dict(wavelength_A=1.0)


def _render(crystal=None, detector=None, beam=None) -> torch.Tensor:
    c = CrystalConfig(**{**BASE_CRYSTAL, **(crystal or {})})
    d = DetectorConfig(**{**BASE_DETECTOR, **(detector or {})})
    b = BeamConfig(**{**BASE_BEAM, **(beam or {})})
    return simulate(c, d, b, dtype=F64, crop=True)


def test_roi_sits_on_a_spot_flank():
    img = _render().detach()
    assert img.shape == (6, 6)
    assert float(img.max()) > 20 * float(img.min()) > 0  # strongly varying counts across the ROI


CASES = {
    "cell_a": lambda x: _render(crystal=dict(cell_a=x)),
    "cell_gamma": lambda x: _render(crystal=dict(cell_gamma=x)),
    "misset_x": lambda x: _render(crystal=dict(misset_deg=(x, 20.0, 30.0))),
    "misset_z": lambda x: _render(crystal=dict(misset_deg=(10.0, 20.0, x))),
    "phi_start": lambda x: _render(crystal=dict(phi_start_deg=x, osc_range_deg=0.3, phi_steps=2)),
    "mosaic_spread": lambda x: _render(crystal=dict(mosaic_spread_deg=x, mosaic_domains=4, mosaic_seed=7)),
    "distance": lambda x: _render(detector=dict(distance_mm=x)),
    "beam_center_f": lambda x: _render(detector=dict(beam_center_f=x)),
    "beam_center_s": lambda x: _render(detector=dict(beam_center_s=x)),
    "wavelength": lambda x: _render(beam=dict(wavelength_A=x)),
    "N_a": lambda x: _render(crystal=dict(N_cells=(x, 5.0, 5.0))),
}
START = {"cell_a": 60.0, "cell_gamma": 91.0, "misset_x": 10.0, "misset_z": 30.0, "phi_start": 0.2,
         "mosaic_spread": 0.4, "distance": 100.0, "beam_center_f": 6.45, "beam_center_s": 6.45,
         "wavelength": 1.0, "N_a": 5.3}


@pytest.mark.parametrize("name", sorted(CASES))
def test_gradcheck(name):
    x = _leaf(START[name])
    fn = CASES[name]
    out = fn(x)
    g, = torch.autograd.grad(out.sum(), x)
    assert torch.isfinite(g) and abs(float(g)) > 0, f"{name}: no gradient"
    assert gradcheck(fn, (x,), eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True)


def test_gradcheck_joint_geometry_and_crystal():
    """Several parameters at once (full Jacobian, not fast mode) on a smaller ROI."""
    def fn(a, spread, dist, lam):
        return _render(crystal=dict(cell_a=a, mosaic_spread_deg=spread, mosaic_domains=3, mosaic_seed=3),
                       detector=dict(distance_mm=dist, roi=(22, 24, 22, 24)), beam=dict(wavelength_A=lam))
    args = (_leaf(60.0), _leaf(0.3), _leaf(100.0), _leaf(1.0))
    assert gradcheck(fn, args, eps=1e-6, atol=1e-6, rtol=1e-4)


def test_chunked_checkpointed_gradient_equals_single_chunk():
    """Pixel chunking with checkpointing gives the same gradient as one chunk."""
    from diff_sim_refiner.core.simulator import prepare, render

    def grad(batch):
        x = _leaf(0.5)
        c = CrystalConfig(**{**BASE_CRYSTAL, "mosaic_spread_deg": x, "mosaic_domains": 3})
        d = DetectorConfig(**{**BASE_DETECTOR, "roi": (14, 33, 16, 31)})
        p = prepare(c, d, BeamConfig(**BASE_BEAM), dtype=F64)
        img = render(p, d, pixel_batch_size=batch, crop=True)
        return torch.autograd.grad((img * img).sum(), x)[0]

    assert torch.allclose(grad(7), grad(10_000), rtol=1e-10)
