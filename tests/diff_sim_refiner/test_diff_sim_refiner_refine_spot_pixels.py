"""Near-spot losses (core/spot_pixels.py), the route seed 004's notebook takes to whole-detector gradients.

- ``near_spot_mask`` keeps exactly the pixels above the threshold, grown by the stated square neighbourhood;
- ``render_pixels`` gives the compiled kernel's whole-detector render (an independent C implementation) at the
  chosen pixels, with or without autograd;
- the gradient of the MSE on the near-spot pixels equals the all-pixel gradient of ``render_loss`` (and both a
  central finite difference) on a sharp-spot still (seed 004's whole detector: checked by the notebook's test).
"""
from __future__ import annotations

import pytest
import torch

from diff_sim_refiner.core.config import BeamConfig, CrystalConfig, DetectorConfig
from diff_sim_refiner.core.simulator import native_ok, prepare, render, render_loss
from diff_sim_refiner.core.spot_pixels import mask_pixels, near_spot_mask, render_pixels


def test_near_spot_mask_threshold_and_dilation():
    img = torch.zeros(20, 30)
    img[5, 7] = 100.0        # a spot
    img[15, 25] = 0.02       # above 1e-4 of the peak (0.01)
    img[2, 20] = 0.005       # below it
    m = near_spot_mask([img], rel_threshold=1e-4, dilate_px=1)
    expected = torch.zeros(20, 30, dtype=torch.bool)
    expected[4:7, 6:9] = True
    expected[14:17, 24:27] = True
    assert torch.equal(m, expected)
    # a second image adds its own pixels; an explicit peak sets the threshold
    other = torch.zeros(20, 30)
    other[10, 10] = 0.5
    m2 = near_spot_mask([img, other], rel_threshold=1e-2, dilate_px=0, peak=10.0)
    assert set(map(tuple, torch.nonzero(m2).tolist())) == {(5, 7), (10, 10)}
    f, s = mask_pixels(m2)
    assert f.tolist() == [7, 10] and s.tolist() == [5, 10]
    with pytest.raises(ValueError, match="shape"):
        near_spot_mask([img, torch.zeros(3, 3)])


def _still(phi, mosaic=0.2, dtype=torch.float32):
    c = CrystalConfig(cell_a=52.0, cell_b=61.0, cell_c=70.0, cell_alpha=88.0, cell_beta=95.0, cell_gamma=91.0,
                      N_cells=(20, 25, 18), default_F=100.0, misset_deg=(12.0, -30.0, 47.0), phi_start_deg=phi,
                      mosaic_spread_deg=mosaic, mosaic_domains=3, mosaic_seed=7)
    d = DetectorConfig(distance_mm=120.0, pixel_size_mm=0.1, fpixels=300, spixels=280, oversample=1)
    return c, d, BeamConfig(wavelength_A=1.0)


def test_render_pixels_equals_compiled_whole_render():
    c, d, b = _still(0.3)
    p = prepare(c, d, b)
    assert native_ok(p)
    with torch.no_grad():
        full = render(p, d)                              # compiled C kernel, whole detector
    f, s = mask_pixels(near_spot_mask([full], rel_threshold=1e-3))
    assert 0 < f.numel() < full.numel() // 5
    with torch.no_grad():
        vals = render_pixels(p, f, s, chunk_elements=4096)   # torch kernel, several chunks
    # the torch kernel forms h = A q in float32 (the compiled one in float64): near the sharpest peaks that
    # moves a value by up to ~2e-3 of itself
    tol = dict(rtol=3e-3, atol=1e-5 * float(full.max()))
    torch.testing.assert_close(vals, full[s, f], **tol)
    phi = torch.tensor(0.3, requires_grad=True)
    c2, _, _ = _still(phi)
    g = render_pixels(prepare(c2, d, b), f, s)         # fused autograd kernel
    assert g.requires_grad
    torch.testing.assert_close(g.detach(), full[s, f], **tol)


def _grads(make, target, det, params, rel_threshold=1e-4):
    """(near-spot gradient, all-pixel render_loss gradient) of the mean squared error w.r.t. params."""
    n = target.numel()
    with torch.no_grad():
        model = render(prepare(*make([float(x) for x in params])), det)
    f, s = mask_pixels(near_spot_mask([target, model], rel_threshold=rel_threshold, peak=float(target.max())))
    leaves = [torch.tensor(float(x), requires_grad=True) for x in params]
    loss = ((render_pixels(prepare(*make(leaves)), f, s) - target[s, f]) ** 2).sum() / n
    near = torch.autograd.grad(loss, leaves)
    leaves2 = [torch.tensor(float(x), requires_grad=True) for x in params]
    render_loss(prepare(*make(leaves2)), det, lambda pred, ff, ss: ((pred - target[ss, ff]) ** 2).sum() / n)
    return torch.stack(near), torch.stack([t.grad for t in leaves2]), f.numel()


def test_near_spot_gradient_equals_all_pixel_gradient_small_still():
    _, d, _ = _still(0.0)

    def make(ps):
        c, _, b = _still(ps[0], ps[1])
        return c, d, b
    with torch.no_grad():
        target = render(prepare(*make([0.0, 0.2])), d)
    near, whole, k = _grads(make, target, d, [0.05, 0.3])
    assert k < target.numel() // 3
    torch.testing.assert_close(near, whole, rtol=2e-3, atol=0.0)
    # and both are the slope of the loss: a central difference in float64 over every pixel
    t64 = target.to(torch.float64)

    def loss64(phi):
        c, _, b = _still(phi, 0.3, torch.float64)
        with torch.no_grad():
            return float(((render(prepare(c, d, b, dtype=torch.float64), d) - t64) ** 2).mean())
    fd = (loss64(0.05 + 1e-3) - loss64(0.05 - 1e-3)) / 2e-3
    assert near[0].item() == pytest.approx(fd, rel=2e-2)

