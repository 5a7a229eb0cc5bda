"""The fused kernel's hand-written derivatives (the default under autograd) against plain autograd through the
same per-term ops, and against finite differences, for every parameter family at once (float64)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.autograd import gradcheck

from diff_sim_refiner.core.config import BeamConfig, CrystalConfig, DetectorConfig
from diff_sim_refiner.core.io import HKLTable
from diff_sim_refiner.core.simulator import prepare, render

F64 = torch.float64
START = dict(a=60.0, gamma=91.0, misset_x=10.0, phi=0.2, mosaic=0.4, distance=100.0, beam_f=6.45, beam_s=6.3,
             wavelength=1.0, Na=5.3, Nc=4.7, pixel=0.1, rotx=0.5, twotheta=1.0, kahn=0.6, fluence=1e24)


def _table() -> HKLTable:
    F = np.random.default_rng(0).uniform(10.0, 200.0, size=(21, 21, 21))
    return HKLTable(F=F, h_min=-10, k_min=-10, l_min=-10, default_F=50.0, n_reflections=F.size)


def _image(v: dict, opts: dict, fused: bool, dtype=F64, native: bool = True) -> torch.Tensor:
    c = CrystalConfig(cell_a=v["a"], cell_b=70.0, cell_c=80.0, cell_alpha=88.0, cell_beta=93.0, cell_gamma=v["gamma"],
                      N_cells=(v["Na"], 5.0, v["Nc"]), default_F=100.0, misset_deg=(v["misset_x"], 20.0, 30.0),
                      phi_start_deg=v["phi"], osc_range_deg=0.3, phi_steps=2, mosaic_spread_deg=v["mosaic"],
                      mosaic_domains=3, mosaic_seed=7)
    d = DetectorConfig(distance_mm=v["distance"], pixel_size_mm=v["pixel"], fpixels=128, spixels=128,
                       roi=(18, 27, 19, 28), beam_center_f=v["beam_f"], beam_center_s=v["beam_s"],
                       detector_rotx_deg=v["rotx"], detector_twotheta_deg=v["twotheta"],
                       oversample=opts.get("oversample", 2), point_pixel=opts.get("point_pixel", False))
    b = BeamConfig(wavelength_A=v["wavelength"], polarization_factor=v["kahn"], nopolar=opts.get("nopolar", False),
                   fluence=v["fluence"], hdiv_range_mrad=opts.get("div", 0.0), hdiv_steps=3 if opts.get("div") else 1,
                   dispersion_pct=opts.get("disp", 0.0), dispersion_steps=3 if opts.get("disp") else 1)
    p = prepare(c, d, b, _table() if opts.get("hkl") else None, dtype=dtype)
    p.fused_backward = fused
    p.native = native
    return render(p, d, crop=True)


def _grads(opts: dict, fused: bool, dtype=F64, native: bool = True):
    leaves = {k: torch.tensor(x, dtype=F64, requires_grad=True) for k, x in START.items()}
    img = _image(leaves, opts, fused, dtype, native)
    w = torch.linspace(0.5, 2.0, img.numel(), dtype=img.dtype).view_as(img)   # a loss that weights every pixel
    gs = torch.autograd.grad((img * img * w).sum(), list(leaves.values()), allow_unused=True)
    return img.detach(), dict(zip(leaves, (0.0 if g is None else float(g) for g in gs)))


@pytest.mark.parametrize("opts", [
    {}, {"point_pixel": True, "oversample": 3}, {"nopolar": True, "div": 2.0, "disp": 1.0},
    {"hkl": True, "oversample": 1, "div": 1.0},
], ids=["kahn-ov2", "point-pixel-ov3", "nopolar-divergence-dispersion", "hkl-ov1"])
def test_fused_gradients_equal_plain_autograd(opts):
    img_f, g_f = _grads(opts, fused=True)
    img_a, g_a = _grads(opts, fused=False)
    assert torch.equal(img_f, img_a)                       # same forward ops, bit for bit
    for k in START:
        if k == "kahn" and opts.get("nopolar"):
            assert g_f[k] == 0.0 and g_a[k] == 0.0
            continue
        assert g_a[k] != 0.0, k
        assert g_f[k] == pytest.approx(g_a[k], rel=1e-9), k


def test_fused_is_the_kernel_used_under_autograd():
    leaves = {k: torch.tensor(x, dtype=F64, requires_grad=True) for k, x in START.items()}
    img = _image(leaves, {}, fused=True)
    names, todo, seen = set(), [img.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        todo.extend(nxt for nxt, _ in node.next_functions)
    assert "_FusedFastChunkBackward" in names
    assert "_SincgSqProdBackward" not in names


def test_fused_gradcheck_kahn_pixel_size_and_fluence():
    """Parameters the plain gradcheck file does not cover: Kahn factor, pixel size, fluence (scale)."""
    def fn(kahn, pixel, fluence):
        v = {**START, "kahn": kahn, "pixel": pixel, "fluence": fluence * 1e24}
        return _image(v, {"oversample": 2}, fused=True)

    args = tuple(torch.tensor(x, dtype=F64, requires_grad=True) for x in (0.6, 0.1, 1.0))
    assert gradcheck(fn, args, eps=1e-7, atol=1e-6, rtol=1e-4, fast_mode=True)


@pytest.mark.parametrize("native", [True, False], ids=["compiled-terms", "torch-terms"])
def test_fused_float32_gradients_close_to_float64(native):
    _, g32 = _grads({}, fused=True, dtype=torch.float32, native=native)
    _, g64 = _grads({}, fused=True)
    for k in START:
        assert g32[k] == pytest.approx(g64[k], rel=1e-2), k   # phi's sum cancels to 2e-3 in float32


@pytest.mark.parametrize("opts", [
    {}, {"point_pixel": True, "oversample": 3}, {"nopolar": True, "div": 2.0, "disp": 1.0},
    {"hkl": True, "oversample": 1, "div": 1.0},
], ids=["kahn-ov2", "point-pixel-ov3", "nopolar-divergence-dispersion", "hkl-ov1"])
def test_fused_compiled_terms_equal_float64(opts):
    """In float32 the fused kernel takes its terms and lattice-factor derivatives from native.c
    (nb_fused_source): image and every gradient agree with the float64 kernel (within float32 rounding, which
    the torch float32 terms show too)."""
    from diff_sim_refiner.core import native

    assert native.available(), native.status()
    img32, g32 = _grads(opts, fused=True, dtype=torch.float32, native=True)
    imgt, gt = _grads(opts, fused=True, dtype=torch.float32, native=False)
    img64, g64 = _grads(opts, fused=True)
    assert torch.allclose(img32.double(), img64, rtol=0, atol=2e-4 * float(img64.max()))
    for k in START:
        if k == "kahn" and opts.get("nopolar"):
            assert g32[k] == 0.0
            continue
        assert g64[k] != 0.0, k
        err_native = abs(g32[k] - g64[k])
        err_torch = abs(gt[k] - g64[k])
        assert err_native <= max(2.0 * err_torch, 1e-3 * abs(g64[k])), (k, g32[k], gt[k], g64[k])


@pytest.mark.parametrize("masked", [False, True])
def test_render_loss_chunked_equals_full_backward(masked):
    """render_loss (per-chunk loss + backward) gives the loss and leaf gradients of render + loss.backward()."""
    from diff_sim_refiner.core.simulator import render_loss

    target = _image(START, {}, fused=True).detach() * 1.3 + 0.01
    d0 = DetectorConfig(fpixels=128, spixels=128, roi=(18, 27, 19, 28))
    full_target = torch.zeros(128, 128, dtype=F64)
    full_target[19:29, 18:28] = target
    mask = None
    if masked:
        mask = torch.zeros(128, 128, dtype=torch.bool)
        mask[20:27, 19:25] = True

    def run(chunked: bool):
        leaves = {k: torch.tensor(x, dtype=F64, requires_grad=True) for k, x in START.items()}
        v = leaves
        c = CrystalConfig(cell_a=v["a"], cell_b=70.0, cell_c=80.0, cell_alpha=88.0, cell_beta=93.0,
                          cell_gamma=v["gamma"], N_cells=(v["Na"], 5.0, v["Nc"]), default_F=100.0,
                          misset_deg=(v["misset_x"], 20.0, 30.0), phi_start_deg=v["phi"], osc_range_deg=0.3,
                          phi_steps=2, mosaic_spread_deg=v["mosaic"], mosaic_domains=3, mosaic_seed=7)
        d = DetectorConfig(distance_mm=v["distance"], pixel_size_mm=v["pixel"], fpixels=128, spixels=128,
                           roi=d0.roi, beam_center_f=v["beam_f"], beam_center_s=v["beam_s"],
                           detector_rotx_deg=v["rotx"], detector_twotheta_deg=v["twotheta"], oversample=2)
        b = BeamConfig(wavelength_A=v["wavelength"], polarization_factor=v["kahn"], fluence=v["fluence"])
        p = prepare(c, d, b, dtype=F64)
        if chunked:
            loss = render_loss(p, d, lambda pred, f, s: ((pred - full_target[s, f]) ** 2).sum(),
                               pixel_mask=mask, pixel_batch_size=7)
        else:
            img = render(p, d, pixel_mask=mask)
            sel = mask if mask is not None else torch.ones(128, 128, dtype=torch.bool)
            loss = ((img - full_target)[sel] ** 2).sum()
            loss.backward()
        return float(loss.detach()), {k: float(t.grad) for k, t in leaves.items()}

    l_c, g_c = run(True)
    l_f, g_f = run(False)
    assert l_c == pytest.approx(l_f, rel=1e-12) and l_f > 0
    for k in START:
        assert g_f[k] != 0.0, k
        assert g_c[k] == pytest.approx(g_f[k], rel=1e-9), k


def test_fused_gradients_beam_direction_and_polarisation_axis():
    """Incident direction (custom beam vector, with divergence) and the polarisation axis carry gradients
    through the fused kernel's source and polarisation-frame inputs."""
    from diff_sim_refiner.core.config import DetectorConvention

    def grads(fused: bool):
        by = torch.tensor(0.01, dtype=F64, requires_grad=True)
        pz = torch.tensor(0.05, dtype=F64, requires_grad=True)
        c = CrystalConfig(cell_a=60.0, cell_b=70.0, cell_c=80.0, N_cells=(5, 5, 5), default_F=100.0,
                          misset_deg=(10.0, 20.0, 30.0), mosaic_spread_deg=0.3, mosaic_domains=2)
        d = DetectorConfig(distance_mm=100.0, pixel_size_mm=0.1, fpixels=128, spixels=128, roi=(18, 27, 19, 28),
                           oversample=2, detector_convention=DetectorConvention.CUSTOM,
                           custom_fdet_vector=(0.0, 0.0, 1.0), custom_sdet_vector=(0.0, -1.0, 0.0),
                           custom_odet_vector=(1.0, 0.0, 0.0), custom_beam_vector=(1.0, by, 0.0),
                           custom_spindle_vector=(0.0, 0.0, 1.0), beam_center_f=6.4, beam_center_s=6.3)
        b = BeamConfig(wavelength_A=1.0, polarization_factor=0.7, polarization_axis=(pz, 0.0, 1.0),
                       hdiv_range_mrad=1.0, hdiv_steps=2)
        p = prepare(c, d, b, dtype=F64)
        assert p.src_dirs.requires_grad and p.polar_axis.requires_grad
        p.fused_backward = fused
        img = render(p, d, crop=True)
        w = torch.linspace(0.5, 2.0, img.numel(), dtype=F64).view_as(img)
        return [float(g) for g in torch.autograd.grad((img * img * w).sum(), (by, pz))]

    g_f, g_a = grads(True), grads(False)
    assert all(g != 0.0 for g in g_a)
    assert g_f == pytest.approx(g_a, rel=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_lattice_factor_derivative_against_extended_precision(dtype):
    """dr/dx of r = sin(N x)/sin(x) across the range, including the series region near x = 0 and x = 0
    itself (the kernel evaluates x = pi d + 1e-30), against mpmath at 50 digits."""
    import math

    import mpmath

    from diff_sim_refiner.core.simulator import _dr_dx, _dr_dx_series

    mpmath.mp.dps = 50
    N = torch.tensor([36.0, 47.0, 5.3], dtype=dtype).view(1, 3, 1)
    d = torch.tensor([0.0, 1e-9, -3e-6, 1e-4, -4e-4, 2e-3, 0.011, -0.05, 0.2, 0.4999], dtype=dtype)
    x = (d * math.pi + 1e-30).view(1, 1, -1).expand(1, 3, -1).contiguous()
    Nx = x * N
    sx = torch.sin(x)
    r = torch.sin(Nx) / sx
    thr, c1, c3 = _dr_dx_series(N, dtype)
    got = _dr_dx(x, Nx, r, sx, torch.cos(Nx), N, c1, c3, thr)[0]
    for i in range(3):
        n = mpmath.mpf(float(N[0, i, 0]))
        scale = float(n ** 3) / 3.0                      # |dr/dx| reaches about N^3 / 3 near the peak
        for j in range(d.numel()):
            xv = mpmath.mpf(float(x[0, i, j]))
            want = (n * mpmath.cos(n * xv) * mpmath.sin(xv) - mpmath.sin(n * xv) * mpmath.cos(xv)) / mpmath.sin(xv) ** 2
            tol = (2e-5 if dtype == torch.float32 else 1e-12) * scale
            assert abs(float(got[i, j]) - float(want)) < tol, (float(N[0, i, 0]), float(d[j]))
