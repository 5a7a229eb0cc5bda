"""General gradient-based refinement of simulator parameters against a target image.

The model image is ``scale * simulate(crystal, detector, beam) + background`` evaluated on the
masked pixels; the loss is the mean squared error over those pixels (seed 001's ``mse_loss``) or a
Poisson negative log-likelihood for counting data, or any callable.  Any subset of the groups in
:data:`~.params.PARAM_SPECS` (cell, misset, phi, mosaic, N, distance, beam_center, scale) is
refined with ``torch.optim.Adam``, ``torch.optim.LBFGS`` or Adam followed by an L-BFGS polish.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, get_args

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint

from ..core.config import BeamConfig, CrystalConfig, DetectorConfig, DetectorConvention, fval
from ..core.params import RefineParams
from ..core.simulator import DEFAULT_CHUNK_ELEMENTS, _chunk_intensity, native_pixels, prepare, render
from .params import PARAM_SPECS, ParamSpec, parse_param_list, resolve_bounds

#: the job model's fields (``core.params.RefineParams``): the one place the defaults and choices are written
_FIELDS = RefineParams.model_fields
OPTIMIZERS = get_args(_FIELDS["optimizer"].annotation)
LOSSES = get_args(_FIELDS["loss"].annotation)
TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _default(name: str):
    return _FIELDS[name].default


class RefinementError(RuntimeError):
    """The refinement cannot proceed (non-finite loss, parameter without effect, ...)."""


@dataclass
class RefineSettings:
    """Optimiser settings.

    ``optimizer``: ``adam``, ``lbfgs`` or ``adam+lbfgs`` (Adam for ``iterations`` steps, then
    ``lbfgs_steps`` L-BFGS steps of up to ``lbfgs_inner`` evaluations each, strong-Wolfe line search).
    ``lr``: Adam learning rate in units of each parameter's step (1 degree for angles by default).
    ``tol``: stop L-BFGS when the relative loss change of a step is below it.
    """

    optimizer: str = _default("optimizer")
    iterations: int = _default("iterations")
    lr: float = _default("lr")
    lbfgs_steps: int = _default("lbfgs_steps")
    lbfgs_inner: int = 10
    lbfgs_lr: float = 1.0
    tol: float = 1e-10
    plateau_patience: Optional[int] = None   # Adam: halve the lr after this many non-improving steps

    def __post_init__(self):
        self.optimizer = self.optimizer.lower()
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.iterations < 0 or self.lbfgs_steps < 0:
            raise ValueError("iterations and lbfgs_steps must be >= 0")
        if not self.lr > 0:
            raise ValueError("lr must be > 0")

    @classmethod
    def from_params(cls, params: RefineParams) -> "RefineSettings":
        """The optimiser settings of a refine job's validated parameters."""
        return cls(optimizer=params.optimizer, iterations=params.iterations, lr=params.lr,
                   lbfgs_steps=params.lbfgs_steps)


@dataclass
class RefineResult:
    """Outcome: history (one entry per optimiser step plus the final state), values and timings."""

    params: list[str]
    labels: list[str]
    units: dict[str, str]
    history: dict[str, list]
    initial: dict[str, float]
    final: dict[str, float]
    loss_initial: float
    loss_final: float
    iterations: int
    evaluations: int
    wall_seconds: float
    finite: bool
    crystal: CrystalConfig
    detector: DetectorConfig
    beam: BeamConfig
    scale: float
    settings: RefineSettings

    @property
    def loss_reduction(self) -> float:
        return self.loss_initial / self.loss_final if self.loss_final > 0 else math.inf

    def summary(self) -> dict:
        return dict(params=self.params, initial=self.initial, final=self.final, loss_initial=self.loss_initial,
                    loss_final=self.loss_final, loss_reduction=self.loss_reduction, iterations=self.iterations,
                    evaluations=self.evaluations, wall_seconds=self.wall_seconds, finite=self.finite,
                    optimizer=self.settings.optimizer)


def default_beam_center(det: DetectorConfig) -> tuple[float, float]:
    """The convention's default beam centre (mm, in the convention's own terms), as the geometry uses it."""
    px = fval(det.pixel_size_mm)
    conv = det.detector_convention
    df, ds = px * det.fpixels, px * det.spixels
    if conv in (DetectorConvention.MOSFLM, DetectorConvention.DENZO):
        return (df + px) / 2.0, (ds + px) / 2.0
    if conv == DetectorConvention.ADXV:
        return (df + px) / 2.0, (ds - px) / 2.0
    return df / 2.0, ds / 2.0


def _field_values(spec: ParamSpec, crystal: CrystalConfig, detector: DetectorConfig, scale: float) -> list[float]:
    if spec.section == "model":
        return [float(scale)]
    obj = crystal if spec.section == "crystal" else detector
    if spec.name == "beam_center":
        dflt = default_beam_center(detector)
        return [fval(detector.beam_center_f) if detector.beam_center_f is not None else dflt[0],
                fval(detector.beam_center_s) if detector.beam_center_s is not None else dflt[1]]
    if spec.vector:
        return [fval(v) for v in getattr(obj, spec.fields[0])]
    return [fval(getattr(obj, f)) for f in spec.fields]


class Refiner:
    """Refine chosen parameter groups of a simulator model against ``target`` (photons, (spixels, fpixels)).

    ``mask``: boolean (spixels, fpixels), True = pixel used (default: all finite target pixels).
    ``background``: photons added to the model (array or scalar, default 0).
    ``init``: {group: values} starting values overriding the configs (physical units).
    ``steps`` / ``bounds``: {group: per-component step} / {group: [(lower, upper), ...]} overrides.
    ``loss``: ``"mse"``, ``"poisson"`` or a callable ``(model, target) -> scalar`` on the masked pixels.
    """

    def __init__(self, crystal: CrystalConfig, detector: DetectorConfig, beam: BeamConfig, target,
                 params: str | Sequence[str], *, hkl=None, mask=None, background=None,
                 init: Optional[dict] = None, steps: Optional[dict] = None, bounds: Optional[dict] = None,
                 scale: float = _default("scale"), loss=_default("loss"), dtype=TORCH_DTYPES[_default("dtype")],
                 spot_cutoff: Optional[float] = None,
                 pixel_batch_size: Optional[int] = None):
        self.crystal, self.detector, self.beam, self.hkl = crystal, detector, beam, hkl
        self.dtype = dtype
        self.spot_cutoff = spot_cutoff
        self.pixel_batch_size = pixel_batch_size
        self.params = parse_param_list(params)
        tgt = torch.as_tensor(np.asarray(target.detach().cpu() if hasattr(target, "detach") else target),
                              dtype=dtype)
        shape = (detector.spixels, detector.fpixels)
        if tuple(tgt.shape) != shape:
            raise ValueError(f"target image is {tuple(tgt.shape)} (slow, fast) but the detector is {shape}")
        finite = torch.isfinite(tgt)
        if mask is None:
            m = finite
        else:
            m = torch.as_tensor(np.asarray(mask), dtype=torch.bool)
            if tuple(m.shape) != shape:
                raise ValueError(f"mask is {tuple(m.shape)} but the detector is {shape}")
            m = m & finite
        if int(m.sum()) == 0:
            raise ValueError("the mask selects no (finite) target pixel")
        self.mask = m
        self.target_values = tgt[m]
        ss, fs = torch.nonzero(m, as_tuple=True)
        self._f, self._s = fs, ss   # masked pixels in mask (row-major) order
        # render only the bounding box of the mask
        self._roi = (int(fs.min()), int(fs.max()), int(ss.min()), int(ss.max()))
        if background is None:
            self.background_values = torch.zeros((), dtype=dtype)
        else:
            bg = torch.as_tensor(np.asarray(background), dtype=dtype)
            self.background_values = bg[m] if bg.ndim == 2 else bg
        if isinstance(loss, str):
            if loss not in LOSSES:
                raise ValueError(f"loss must be one of {', '.join(map(repr, LOSSES))} or a callable, got {loss!r}")
        self.loss_kind = loss
        self.specs = [PARAM_SPECS[p] for p in self.params]
        init = dict(init or {})
        steps = dict(steps or {})
        bounds = dict(bounds or {})
        unknown = (set(init) | set(steps) | set(bounds)) - set(PARAM_SPECS)
        if unknown:
            raise ValueError(f"unknown parameter group(s) in init/steps/bounds: {', '.join(sorted(unknown))}")
        self.scale0 = float(scale)
        self._check_effective()
        self._init: dict[str, torch.Tensor] = {}
        self._step: dict[str, torch.Tensor] = {}
        self._lo: dict[str, torch.Tensor] = {}
        self._hi: dict[str, torch.Tensor] = {}
        self.u: dict[str, torch.Tensor] = {}
        for spec in self.specs:
            k = len(spec.labels)
            vals = init.get(spec.name)
            if vals is None:
                vals = _field_values(spec, crystal, detector, self.scale0)
            vals = [float(v) for v in np.atleast_1d(np.asarray(vals, dtype=float))]
            if len(vals) != k:
                raise ValueError(f"{spec.name} needs {k} value(s) ({', '.join(spec.labels)}), got {len(vals)}")
            st = steps.get(spec.name, spec.step)
            st = [float(v) for v in np.atleast_1d(np.asarray(st, dtype=float))]
            if len(st) == 1 and k > 1:
                st = st * k
            if len(st) != k or any(not s > 0 for s in st):
                raise ValueError(f"steps for {spec.name} need {k} positive value(s)")
            bnd = resolve_bounds(spec, bounds.get(spec.name))
            v0 = torch.tensor(vals, dtype=torch.float64)
            s0 = torch.tensor(st, dtype=torch.float64)
            lo = torch.tensor([b[0] for b in bnd], dtype=torch.float64)
            hi = torch.tensor([b[1] for b in bnd], dtype=torch.float64)
            if spec.log:
                if bool((v0 <= 0).any()):
                    raise ValueError(f"{spec.name} must start > 0, got {vals}")
                ulo, uhi = torch.log(lo / v0) / s0, torch.log(hi / v0) / s0
            else:
                ulo, uhi = (lo - v0) / s0, (hi - v0) / s0
            v_in = ((ulo <= 0) & (uhi >= 0))
            if not bool(v_in.all()):
                raise ValueError(f"start value(s) {vals} of {spec.name} lie outside the bounds {bnd}")
            self._init[spec.name], self._step[spec.name] = v0, s0
            self._lo[spec.name], self._hi[spec.name] = ulo, uhi
            self.u[spec.name] = torch.zeros(k, dtype=torch.float64, requires_grad=True)
        self.evaluations = 0

    # ------------------------------------------------------------------ parametrisation
    @classmethod
    def from_params(cls, crystal: CrystalConfig, detector: DetectorConfig, beam: BeamConfig, target,
                    params: RefineParams, *, hkl=None, mask=None) -> "Refiner":
        """The refiner a refine job's validated parameters describe (groups, start values, bounds, scale, loss,
        precision); ValueError as the constructor's for what the model cannot refine."""
        return cls(crystal, detector, beam, target, params.params, hkl=hkl, mask=mask, init=params.init,
                   bounds={k: [tuple(b) for b in v] for k, v in params.bounds.items()}, scale=params.scale,
                   loss=params.loss, dtype=TORCH_DTYPES[params.dtype])

    def _check_effective(self) -> None:
        if "cell" in self.params and self.crystal.has_mosflm and not self.crystal.rescale_to_cell:
            raise ValueError("cell refinement needs a crystal given by its cell (this one uses a MOSFLM matrix, "
                             "which fixes the cell); refine 'misset' for the orientation instead")
        if ("distance" in self.params or "beam_center" in self.params) and self.detector.pix0_override_m is not None:
            raise ValueError("distance/beam_center have no effect with an explicit pix0 vector (CUSTOM geometry)")
        if "mosaic" in self.params and int(self.crystal.mosaic_domains) == 1:
            raise ValueError("mosaic refinement needs mosaic_domains > 1")

    def values(self) -> dict[str, torch.Tensor]:
        """{group: physical values (differentiable tensor)}."""
        out = {}
        for spec in self.specs:
            v0, s, u = self._init[spec.name], self._step[spec.name], self.u[spec.name]
            out[spec.name] = v0 * torch.exp(s * u) if spec.log else v0 + s * u
        return out

    def flat_values(self) -> dict[str, float]:
        """{component label: physical value} as floats."""
        vals = self.values()
        return {lab: float(vals[spec.name][i].detach()) for spec in self.specs for i, lab in enumerate(spec.labels)}

    def set_values(self, values: dict) -> None:
        """Move the refiner to the given physical values ({group: values}); e.g. for scans."""
        with torch.no_grad():
            for name, v in values.items():
                spec = PARAM_SPECS[name]
                v = torch.as_tensor(np.atleast_1d(np.asarray(v, dtype=float)), dtype=torch.float64)
                v0, s = self._init[name], self._step[name]
                self.u[name].copy_(torch.log(v / v0) / s if spec.log else (v - v0) / s)

    def configs(self, values: Optional[dict] = None, detach: bool = False):
        """(crystal, detector, beam, scale) with the refined groups substituted."""
        values = self.values() if values is None else values
        cr, de = {}, {}
        scale = self.scale0
        for spec in self.specs:
            v = values[spec.name]
            if detach:
                v = v.detach()
            if spec.section == "model":
                scale = v[0] if not detach else float(v[0])
                continue
            tgt = cr if spec.section == "crystal" else de
            if spec.vector:
                tgt[spec.fields[0]] = tuple(float(x) for x in v) if detach else v
            else:
                for i, f in enumerate(spec.fields):
                    tgt[f] = float(v[i]) if detach else v[i]
        crystal = dataclasses.replace(self.crystal, **cr) if cr else self.crystal
        detector = dataclasses.replace(self.detector, **de) if de else self.detector
        return crystal, detector, self.beam, scale

    # ------------------------------------------------------------------ model and loss
    def simulate_full(self, values: Optional[dict] = None, roi_only: bool = True) -> torch.Tensor:
        """Scaled model photons (without background) on the full (spixels, fpixels) grid (mask's bounding box)."""
        crystal, detector, beam, scale = self.configs(values)
        if roi_only:
            detector = dataclasses.replace(detector, roi=self._roi)
        p = prepare(crystal, detector, beam, self.hkl, dtype=self.dtype, spot_cutoff=self.spot_cutoff)
        img = render(p, detector, pixel_batch_size=self.pixel_batch_size)
        return img * scale

    def model_values(self, values: Optional[dict] = None) -> torch.Tensor:
        """Model photons (scale * simulation + background) on the masked pixels (1-D, mask order)."""
        crystal, detector, beam, scale = self.configs(values)
        detector = dataclasses.replace(detector, roi=self._roi)
        p = prepare(crystal, detector, beam, self.hkl, dtype=self.dtype, spot_cutoff=self.spot_cutoff)
        self.evaluations += 1
        vals = _render_pixels(p, self._f, self._s, self.pixel_batch_size)
        if vals is None:  # fall back on the simulator's full-frame renderer
            img = render(p, detector, pixel_batch_size=self.pixel_batch_size, pixel_mask=self.mask)
            vals = img[self.mask]
        return vals * scale + self.background_values

    def model_image(self, values: Optional[dict] = None) -> np.ndarray:
        """Full model image (photons, zeros outside the mask's bounding box), numpy float64."""
        with torch.no_grad():
            img = self.simulate_full(values)
            bg = torch.zeros_like(img)
            if self.background_values.ndim == 1:
                bg[self.mask] = self.background_values
            else:
                bg = bg + self.background_values
            return (img + bg).numpy()

    def loss(self, model: Optional[torch.Tensor] = None) -> torch.Tensor:
        model = self.model_values() if model is None else model
        t = self.target_values
        if callable(self.loss_kind):
            return self.loss_kind(model, t)
        if self.loss_kind == "poisson":
            m = torch.clamp(model, min=1e-12)
            return torch.mean(m - t * torch.log(m))
        return torch.mean((model - t) ** 2)

    def _project(self) -> None:
        with torch.no_grad():
            for name, u in self.u.items():
                u.copy_(torch.maximum(torch.minimum(u, self._hi[name]), self._lo[name]))

    # ------------------------------------------------------------------ optimisation
    def run(self, settings: Optional[RefineSettings] = None,
            callback: Optional[Callable[[int, float, dict], None]] = None) -> RefineResult:
        """Optimise; ``callback(iteration, loss, values)`` after each recorded step (e.g. progress bars, frames)."""
        settings = settings or RefineSettings()
        labels = [lab for spec in self.specs for lab in spec.labels]
        history: dict[str, list] = {"iteration": [], "loss": [], **{lab: [] for lab in labels}}
        initial = self.flat_values()
        t0 = time.perf_counter()
        state = {"it": 0}
        params = list(self.u.values())

        def record(loss_val: float, vals: dict) -> None:
            history["iteration"].append(state["it"])
            history["loss"].append(loss_val)
            for k, v in vals.items():
                history[k].append(v)
            if callback is not None:
                callback(state["it"], loss_val, vals)
            state["it"] += 1

        def check(loss_val: float) -> None:
            if not math.isfinite(loss_val):
                raise RefinementError(f"loss became {loss_val} at iteration {state['it']} "
                                      f"(parameters {self.flat_values()})")

        n_adam = settings.iterations if settings.optimizer in ("adam", "adam+lbfgs") else 0
        if n_adam:
            opt = torch.optim.Adam(params, lr=settings.lr)
            sched = None
            if settings.plateau_patience:
                sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=0.5,
                                                                   patience=settings.plateau_patience)
            for _ in range(n_adam):
                opt.zero_grad()
                vals = self.flat_values()
                loss = self.loss()
                lv = float(loss.detach())
                check(lv)
                loss.backward()
                for name, u in self.u.items():
                    if u.grad is not None and not bool(torch.isfinite(u.grad).all()):
                        raise RefinementError(f"non-finite gradient for {name} at iteration {state['it']}")
                record(lv, vals)
                opt.step()
                self._project()
                if sched is not None:
                    sched.step(lv)
        if settings.optimizer in ("lbfgs", "adam+lbfgs") and settings.lbfgs_steps:
            opt = torch.optim.LBFGS(params, lr=settings.lbfgs_lr, max_iter=settings.lbfgs_inner,
                                    line_search_fn="strong_wolfe", tolerance_change=1e-14, tolerance_grad=1e-14)

            def closure():
                opt.zero_grad()
                loss = self.loss()
                if torch.isfinite(loss):
                    loss.backward()
                return loss

            prev = None
            for _ in range(settings.lbfgs_steps):
                vals = self.flat_values()
                loss = opt.step(closure)
                lv = float(loss.detach())
                check(lv)
                record(lv, vals)
                self._project()
                if prev is not None and abs(prev - lv) <= settings.tol * max(abs(prev), 1e-300):
                    break
                prev = lv
        with torch.no_grad():
            vals = self.flat_values()
            final_loss = float(self.loss())
        check(final_loss)
        record(final_loss, vals)
        wall = time.perf_counter() - t0
        finite = all(math.isfinite(x) for k in history for x in history[k])
        crystal, detector, beam, scale = self.configs(detach=True)
        units = {lab: spec.unit for spec in self.specs for lab in spec.labels}
        return RefineResult(
            params=list(self.params), labels=labels, units=units, history=history, initial=initial, final=vals,
            loss_initial=history["loss"][0], loss_final=final_loss, iterations=len(history["loss"]) - 1,
            evaluations=self.evaluations, wall_seconds=wall, finite=finite, crystal=crystal, detector=detector,
            beam=beam, scale=float(scale), settings=settings,
        )


def _render_pixels(p, f: torch.Tensor, s: torch.Tensor, batch: Optional[int]) -> Optional[torch.Tensor]:
    """Photons of the listed pixels only (chunked, check-pointed under autograd as the simulator's render).

    Avoids building a full-frame image when the mask holds a few boxes spread over a large detector.
    """
    v = native_pixels(p, f, s)  # the compiled photons + derivatives kernel, when it covers every gradient needed
    if v is not None:
        return v
    per_pixel = p.oversample ** 2 * p.n_orient * int(p.src_dirs.shape[0]) * (24 if p.ftable.interpolate else 1)
    batch = batch or max(1, DEFAULT_CHUNK_ELEMENTS // per_pixel)
    diff = [t for t in (p.A, p.pix0, p.fdet, p.sdet, p.px, p.close_distance, p.N, p.scale, p.src_dirs, p.src_lams,
                        p.ftable.F, p.recip, p.distance, p.beam) if isinstance(t, torch.Tensor) and t.requires_grad]
    use_ckpt = torch.is_grad_enabled() and bool(diff) and f.numel() > batch
    outs = []
    for start in range(0, f.numel(), batch):
        fc, sc = f[start:start + batch], s[start:start + batch]
        if use_ckpt:
            outs.append(checkpoint(_chunk_intensity, p, fc, sc, *diff, use_reentrant=False))
        else:
            outs.append(_chunk_intensity(p, fc, sc))
    return torch.cat(outs)


def refine(crystal: CrystalConfig, detector: DetectorConfig, beam: BeamConfig, target, params, *,
           settings: Optional[RefineSettings] = None, callback=None, **kw) -> RefineResult:
    """One-call API: ``refine(crystal, detector, beam, target, "misset,mosaic", mask=..., settings=...)``."""
    return Refiner(crystal, detector, beam, target, params, **kw).run(settings, callback)


__all__ = ["Refiner", "RefineSettings", "RefineResult", "RefinementError", "refine", "default_beam_center", "OPTIMIZERS",
           "LOSSES", "TORCH_DTYPES"]
