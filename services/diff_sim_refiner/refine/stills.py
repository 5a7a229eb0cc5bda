"""Per-still refinement against measured pixels near indexed spots (the idea of diffBragg's "stage 1").

Starting from a DIALS still model (detector, beam, crystal from indexing), the simulator renders
only the pixels of small boxes around the indexed spots.  Structure factors are unknown here, so
each box gets its own scale (|F|^2 times the overall scale) and flat background, solved in closed
form (weighted linear least squares) at every evaluation; the loss that remains depends on the
crystal orientation (misset about the lab axes), the number of cells Na, Nb, Nc, the mosaic spread
and, optionally, the detector distance and beam centre, and is minimised by gradient descent.

Predicted spot positions of a model come from its crystal and detector as in DIALS' stills predictor
(:func:`predict_positions`); the refined model's and DIALS' own predictions are both compared with DIALS'
observed centroids, in DIALS' parallax-free millimetre frame (expressed in pixels).  The simulator has no
sensor parallax, so the measured boxes are resampled by dxtbx's parallax displacement before fitting.
"""
from __future__ import annotations

import bz2
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ..core.config import fval
from ..core.geometry import detector_geometry, lattice_vectors
from ..core.simulator import prepare
from .dials_geometry import configs_from_experiment
from .refiner import Refiner, RefineSettings, _render_pixels
THAUMATIN_SYMMETRY = ("P41212", (57.8, 57.8, 150.0, 90.0, 90.0, 90.0))


# ----------------------------------------------------------------------------- DIALS side
def decompress(path_bz2, workdir) -> Path:
    """``x.cbf.bz2`` -> ``workdir/x.cbf`` (Python's bz2)."""
    src = Path(path_bz2)
    dst = Path(workdir) / src.name.removesuffix(".bz2")
    if not dst.exists():
        dst.write_bytes(bz2.decompress(src.read_bytes()))
    return dst


def index_still(cbf_path, space_group: str = THAUMATIN_SYMMETRY[0],
                unit_cell: Sequence[float] = THAUMATIN_SYMMETRY[1], max_refine: int = 5, refine: bool = True):
    """Import one image as a still, find spots and index it in-process with DIALS.

    As ``dials.import convert_sequences_to_stills=True``, ``dials.find_spots`` and ``dials.index
    indexing.stills.indexer=sequences`` with known symmetry (the stills indexer's default candidate
    refinement needs an extension Debian's cctbx lacks).  Returns (experiments, indexed reflections).
    """
    # DIALS/dxtbx (1-2 s) only for the stills route, not for the general refiner
    from dials.algorithms.indexing.indexer import Indexer
    from dials.array_family import flex
    from dials.command_line.stills_process import phil_scope
    from dxtbx.imageset import ImageSetFactory
    from dxtbx.model.experiment_list import Experiment, ExperimentList, ExperimentListFactory

    lines = ["refinement.parameterisation.beam.fix=in_spindle_plane+wavelength",
             "refinement.parameterisation.detector.fix=None",
             "refinement.parameterisation.auto_reduction.min_nref_per_parameter=5",
             "refinement.reflections.outlier.algorithm=auto",
             "refinement.reflections.weighting_strategy.override=None",
             "indexing.stills.indexer=sequences", f"indexing.known_symmetry.space_group={space_group}",
             "indexing.known_symmetry.unit_cell=" + ",".join(f"{v:g}" for v in unit_cell),
             f"indexing.basis_vector_combinations.max_refine={max_refine}", "spotfinder.mp.nproc=1",
             "indexing.nproc=1"]
    interp = phil_scope.command_line_argument_interpreter(home_scope="")
    params = phil_scope.fetch(sources=[interp.process(arg=a) for a in lines]).extract()
    found = ExperimentListFactory.from_filenames([str(cbf_path)], load_models=False)
    if len(found) == 0:
        raise ValueError(f"{cbf_path}: not an image dxtbx can read")
    iset = ImageSetFactory.imageset_from_anyset(found[0].imageset)
    one = iset[0:1]
    one.set_scan(None, 0)
    one.set_goniometer(None, 0)
    expts = ExperimentList([Experiment(imageset=one, beam=one.get_beam(0), detector=one.get_detector(0))])
    strong = flex.reflection_table.from_observations(expts, params, is_stills=True)
    idxr = Indexer.from_parameters(strong, expts, params=params)
    idxr.index()
    refl = idxr.refined_reflections
    sel = refl.get_flags(refl.flags.indexed) & (refl["miller_index"] != (0, 0, 0)) & (refl["id"] == 0)
    experiments, refl = idxr.refined_experiments[0:1], refl.select(sel)
    if refine:
        from dials.algorithms.refinement import RefinerFactory  # DIALS, see index_still

        refiner = RefinerFactory.from_parameters_data_experiments(params, refl, experiments)
        refiner.run()
        experiments = refiner.get_experiments()
        predicted = refiner.predict_for_indexed()
        for col in ("xyzcal.mm", "xyzcal.px", "delpsical.rad", "s1"):
            if col in predicted:
                refl[col] = predicted[col]
        refl = refl.select(refiner.selection_used_for_refinement())
    return experiments, refl


def raw_image(experiment) -> np.ndarray:
    """Panel 0's counts (slow, fast) as float64."""
    data = experiment.imageset.get_raw_data(0)[0]
    return data.as_numpy_array().astype(np.float64)


# ----------------------------------------------------------------------------- spot boxes
@dataclass
class SpotBoxes:
    """Non-overlapping square boxes around selected indexed spots."""

    obs_px: np.ndarray     # (n, 2) DIALS observed centroids (fast, slow), pixel units (pixel i spans [i, i+1))
    cal_px: np.ndarray     # (n, 2) DIALS predicted positions
    hkl: np.ndarray        # (n, 3)
    boxes: np.ndarray      # (n, 4) inclusive fmin, fmax, smin, smax
    mask: np.ndarray       # (slow, fast) bool: pixels used
    box_id: np.ndarray     # (slow, fast) int: box index, -1 outside
    obs_mm_px: Optional[np.ndarray] = None   # (n, 2) DIALS xyzobs.mm / pixel size (parallax-free frame)
    cal_mm_px: Optional[np.ndarray] = None   # (n, 2) DIALS xyzcal.mm / pixel size

    @property
    def n(self) -> int:
        return len(self.boxes)

    def box_index(self) -> np.ndarray:
        """(n, h, w) position of every box pixel in the mask's row-major order."""
        order = np.full(self.mask.shape, -1, np.int64)
        order[self.mask] = np.arange(int(self.mask.sum()))
        return np.stack([order[s0:s1 + 1, f0:f1 + 1] for f0, f1, s0, s1 in self.boxes])


def select_spots(refl, image: np.ndarray, n_spots: int = 100, half: int = 5, trusted_max: Optional[float] = None,
                 pixel_size_mm: Optional[float] = None) -> SpotBoxes:
    """Pick up to ``n_spots`` indexed spots whose (2 half + 1)^2 boxes lie on valid pixels and do not overlap.

    Spots are taken by decreasing summed intensity; pixels < 0 (module gaps, bad pixels) or above
    ``trusted_max`` disqualify a box.  With ``pixel_size_mm``, DIALS' mm positions (parallax-free) are kept too.
    """
    obs = np.array(refl["xyzobs.px.value"]).reshape(-1, 3)[:, :2]
    cal = np.array(refl["xyzcal.px"]).reshape(-1, 3)[:, :2]
    hkl = np.array(refl["miller_index"]).reshape(-1, 3)
    inten = np.array(refl["intensity.sum.value"]) if "intensity.sum.value" in refl else np.ones(len(obs))
    order = np.argsort(-inten)
    S, F = image.shape
    taken = np.zeros((S, F), bool)
    box_id = np.full((S, F), -1, np.int64)
    keep, boxes = [], []
    for i in order:
        fc, sc = int(math.floor(obs[i, 0])), int(math.floor(obs[i, 1]))
        f0, f1, s0, s1 = fc - half, fc + half, sc - half, sc + half
        if f0 < 0 or s0 < 0 or f1 >= F or s1 >= S:
            continue
        patch = image[s0:s1 + 1, f0:f1 + 1]
        if (patch < 0).any() or (trusted_max is not None and (patch > trusted_max).any()):
            continue
        if taken[max(s0 - 1, 0):s1 + 2, max(f0 - 1, 0):f1 + 2].any():
            continue
        taken[s0:s1 + 1, f0:f1 + 1] = True
        box_id[s0:s1 + 1, f0:f1 + 1] = len(keep)
        keep.append(i)
        boxes.append((f0, f1, s0, s1))
        if len(keep) >= n_spots:
            break
    if not keep:
        raise ValueError("no indexed spot has a complete box of valid pixels")
    keep = np.array(keep)
    obs_mm = cal_mm = None
    if pixel_size_mm and "xyzobs.mm.value" in refl and "xyzcal.mm" in refl:
        obs_mm = np.array(refl["xyzobs.mm.value"]).reshape(-1, 3)[keep, :2] / pixel_size_mm
        cal_mm = np.array(refl["xyzcal.mm"]).reshape(-1, 3)[keep, :2] / pixel_size_mm
    return SpotBoxes(obs[keep], cal[keep], hkl[keep], np.array(boxes), taken, box_id, obs_mm, cal_mm)


class ProfiledSpotLoss:
    """Weighted least squares with a free scale and flat background per box, profiled out in closed form.

    For box k: min over (a_k, b_k) of sum_i w_i (d_i - a_k m_i - b_k)^2; the loss is the mean over pixels of
    the weighted residuals at those optima (differentiable in the model m).  Weights 1 / (max(d, 0) + 1)
    approximate Poisson variances.
    """

    def __init__(self, box_ids: torch.Tensor, n_boxes: int, target: torch.Tensor, weighting: str = "poisson",
                 psf_sigma_px: float = 0.0, box_index: Optional[torch.Tensor] = None):
        self.ids = box_ids.long()
        self.n = int(n_boxes)
        self.box_index = box_index            # (n, h, w) positions of each box's pixels in mask order
        self.kernel = None
        if psf_sigma_px > 0:
            if box_index is None:
                raise ValueError("a point-spread function needs box_index")
            r = int(math.ceil(3 * psf_sigma_px))
            x = torch.arange(-r, r + 1, dtype=torch.float64)
            g = torch.exp(-0.5 * (x / psf_sigma_px) ** 2)
            g = g / g.sum()
            self.kernel = (g[:, None] * g[None, :])[None, None]
        if weighting == "poisson":
            self.w = 1.0 / (torch.clamp(target, min=0.0) + 1.0)
        elif weighting == "none":
            self.w = torch.ones_like(target) / torch.clamp(target.abs().max(), min=1.0) ** 2
        else:
            raise ValueError(f"weighting must be 'poisson' or 'none', got {weighting!r}")
        self.last_coeffs: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    def _sum(self, v: torch.Tensor) -> torch.Tensor:
        return torch.zeros(self.n, dtype=v.dtype).index_add(0, self.ids, v)

    def coefficients(self, model: torch.Tensor, target: torch.Tensor):
        scale = torch.clamp(model.detach().max(), min=1e-300)
        m = model / scale
        w = self.w.to(m.dtype)
        Sw, Sm, Sd = self._sum(w), self._sum(w * m), self._sum(w * target)
        Smm, Smd = self._sum(w * m * m), self._sum(w * m * target)
        det = Sw * Smm - Sm * Sm
        det = det + 1e-12 * Sw * Sw + 1e-300
        a = (Sw * Smd - Sm * Sd) / det
        b = (Smm * Sd - Sm * Smd) / det
        return a / scale, b

    def blur(self, model: torch.Tensor) -> torch.Tensor:
        """The model seen through a Gaussian point-spread function (within each box, zero outside)."""
        if self.kernel is None:
            return model
        idx = self.box_index
        boxes = model[idx.reshape(-1)].reshape(idx.shape)[:, None]                  # (n, 1, h, w)
        k = self.kernel.to(model.dtype)
        out = torch.nn.functional.conv2d(boxes, k, padding=k.shape[-1] // 2)[:, 0]
        return torch.zeros_like(model).index_put((idx.reshape(-1),), out.reshape(-1))

    def __call__(self, model: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        model = self.blur(model)
        a, b = self.coefficients(model, target)
        self.last_coeffs = (a.detach(), b.detach())
        resid = target - a[self.ids] * model - b[self.ids]
        return torch.mean(self.w.to(model.dtype) * resid * resid)


def profile_centroids(values: np.ndarray, box_ids: np.ndarray, mask: np.ndarray, n: int) -> np.ndarray:
    """(n, 2) intensity-weighted centroids (fast, slow; pixel i spans [i, i+1)) of positive model values per box."""
    ss, ff = np.nonzero(mask)
    ids = box_ids[mask]
    w = np.clip(values, 0.0, None)
    sw = np.bincount(ids, weights=w, minlength=n)
    cf = np.bincount(ids, weights=w * (ff + 0.5), minlength=n)
    cs = np.bincount(ids, weights=w * (ss + 0.5), minlength=n)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.stack([cf / sw, cs / sw], axis=1)


def rmsd(a: np.ndarray, b: np.ndarray) -> float:
    """Root-mean-square 2-D distance between matched positions (pixels), over finite pairs."""
    d = np.asarray(a, float) - np.asarray(b, float)
    ok = np.isfinite(d).all(axis=1)
    return float(np.sqrt(np.mean(np.sum(d[ok] ** 2, axis=1))))


def predict_positions(crystal, detector, beam, hkl: np.ndarray) -> np.ndarray:
    """(n, 2) spot positions (fast, slow; pixel i spans [i, i+1)) a simulator model predicts for Miller indices.

    As DIALS' stills predictor: the reciprocal-lattice vector q is rotated about q x s0 (the smallest
    rotation, by "delta psi") onto the Ewald sphere, |q + s0| = |s0|, and the diffracted ray s1 = s0 + q'
    meets the detector plane.  No parallax (the simulator models none): compare with DIALS' mm positions.
    """
    with torch.no_grad():
        lat = lattice_vectors(crystal, beam.wavelength_A)
        g = detector_geometry(detector, beam)
        recip = lat.recip.numpy()                                  # rows a*, b*, c*, 1/A
        q = np.asarray(hkl, float) @ recip                         # (n, 3) 1/A
        s0 = g.beam.numpy() / fval(beam.wavelength_A)
        k = np.linalg.norm(s0)
        u = s0 / k
        qn = np.linalg.norm(q, axis=1)
        qw = q - (q @ u)[:, None] * u
        w = qw / np.linalg.norm(qw, axis=1, keepdims=True)
        cosb = -qn / (2.0 * k)
        sinb = np.sqrt(np.clip(1.0 - cosb ** 2, 0.0, None))
        s1 = s0 + qn[:, None] * (cosb[:, None] * u + sinb[:, None] * w)
        pix0, fdet, sdet, odet = (t.numpy() for t in (g.pix0, g.fdet, g.sdet, g.odet))
        t = np.dot(pix0, odet) / (s1 @ odet)
        P = t[:, None] * s1 - pix0
        px = fval(g.pixel_size)
        return np.stack([P @ fdet / px, P @ sdet / px], axis=1)


def model_centroids(crystal, detector, beam, centres_px: np.ndarray, half: int = 8, dtype=torch.float64) -> np.ndarray:
    """(n, 2) centroids of the simulated spots in (2 half + 1)^2 boxes centred on ``centres_px`` (the model's own
    predictions, so the boxes carry no information from the observations); pixel i spans [i, i+1)."""
    c = np.floor(np.asarray(centres_px, float)).astype(np.int64)
    o = np.arange(-half, half + 1)
    df, ds = np.meshgrid(o, o, indexing="xy")
    f = (c[:, 0, None] + df.ravel()[None, :])
    s = (c[:, 1, None] + ds.ravel()[None, :])
    ok = (f >= 0) & (f < detector.fpixels) & (s >= 0) & (s < detector.spixels)
    f, s = np.where(ok, f, 0), np.where(ok, s, 0)
    with torch.no_grad():
        p = prepare(crystal, detector, beam, None, dtype=dtype)
        vals = _render_pixels(p, torch.as_tensor(f.ravel()), torch.as_tensor(s.ravel()), None)
    w = vals.numpy().reshape(f.shape) * ok
    sw = w.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.stack([(w * (f + 0.5)).sum(1) / sw, (w * (s + 0.5)).sum(1) / sw], axis=1)


def parallax_shifts_px(panel, centres_px: np.ndarray) -> np.ndarray:
    """(n, 2) dxtbx's parallax displacement (fast, slow; pixels) at raw pixel positions: raw px - mm / pixel size."""
    size = np.array(panel.get_pixel_size())
    mm = np.array([panel.pixel_to_millimeter(tuple(map(float, c))) for c in np.asarray(centres_px, float)])
    return np.asarray(centres_px, float) - mm / size


def parallax_corrected_boxes(image: np.ndarray, spots: "SpotBoxes", panel, margin: int = 3) -> np.ndarray:
    """Copy of ``image`` whose spot boxes are resampled (bilinear) to undo the sensor parallax, so that the
    measured counts sit where the parallax-free simulator puts them; pixels outside boxes are unchanged."""
    from scipy.ndimage import shift as nd_shift  # scipy (~0.2 s) only for the parallax resampling

    out = image.copy()
    centres = np.stack([(spots.boxes[:, 0] + spots.boxes[:, 1] + 1) / 2.0,
                        (spots.boxes[:, 2] + spots.boxes[:, 3] + 1) / 2.0], axis=1)
    d = parallax_shifts_px(panel, centres)
    S, F = image.shape
    for (f0, f1, s0, s1), (df, ds) in zip(spots.boxes, d):
        a0, a1 = max(s0 - margin, 0), min(s1 + margin, S - 1)
        b0, b1 = max(f0 - margin, 0), min(f1 + margin, F - 1)
        patch = np.clip(image[a0:a1 + 1, b0:b1 + 1], 0.0, None)
        # ndimage.shift(x, +d) moves content by +d; measured content is displaced by +parallax, so move it by -d
        moved = nd_shift(patch, (-ds, -df), order=1, mode="nearest")
        out[s0:s1 + 1, f0:f1 + 1] = moved[s0 - a0:s1 - a0 + 1, f0 - b0:f1 - b0 + 1]
    return out


def dials_parallax_free_px(refl, panel) -> np.ndarray:
    """DIALS' predictions (``xyzcal.mm``) as parallax-free pixel coordinates (mm / pixel size)."""
    mm = np.array(refl["xyzcal.mm"]).reshape(-1, 3)[:, :2]
    return mm / np.array(panel.get_pixel_size())


# ----------------------------------------------------------------------------- refinement
@dataclass
class StillRefinement:
    result: object                   # RefineResult
    spots: SpotBoxes
    pred_initial_px: np.ndarray      # simulated spot centroids at DIALS' model (start)
    pred_refined_px: np.ndarray      # after refinement
    rmsd_dials: float                # DIALS xyzcal.mm vs xyzobs.mm, in pixels (parallax-free frame)
    rmsd_initial: float              # simulator predictions at DIALS' model vs xyzobs.mm, pixels
    rmsd_refined: float              # after refinement
    n_pixels: int
    wall_seconds: float
    extra: dict = field(default_factory=dict)

    def summary(self) -> dict:
        r = self.result
        return dict(n_spots=self.spots.n, n_pixels=self.n_pixels, rmsd_dials_px=self.rmsd_dials,
                    rmsd_simulator_initial_px=self.rmsd_initial, rmsd_simulator_refined_px=self.rmsd_refined,
                    loss_initial=r.loss_initial, loss_final=r.loss_final, iterations=r.iterations,
                    evaluations=r.evaluations, wall_seconds=self.wall_seconds, initial=r.initial, final=r.final,
                    **self.extra)


def refine_still(experiment, image: np.ndarray, spots: SpotBoxes,
                 params: Sequence[str] = ("misset", "N", "mosaic"), *, N_init=(20, 20, 8),
                 mosaic_init: float = 0.05, mosaic_domains: int = 10, settings=None, callback=None,
                 dtype=torch.float64, shape: str = "SQUARE", weighting: str = "poisson",
                 psf_sigma_px: float = 0.0, parallax: bool = True) -> StillRefinement:
    """Refine a DIALS still model against the pixels of ``spots`` (see the module docstring).

    Positions are compared in DIALS' parallax-free frame (mm / pixel size): DIALS' ``xyzcal.mm`` and
    the simulator model's predictions against DIALS' ``xyzobs.mm.value``.  With ``parallax`` the measured
    boxes are first resampled by dxtbx's parallax displacement so that the (parallax-free) simulator is
    fitted to counts in that same frame.
    """
    t0 = time.perf_counter()
    panel = experiment.detector[0]
    if spots.obs_mm_px is None:
        raise ValueError("select the spots with pixel_size_mm so DIALS' mm positions are available")
    crystal, detector, beam = configs_from_experiment(experiment, N_cells=N_init, mosaic_spread_deg=mosaic_init,
                                                      mosaic_domains=mosaic_domains)
    crystal = crystal.replace(shape=shape)
    data = parallax_corrected_boxes(image, spots, panel) if parallax else image
    target = torch.as_tensor(data, dtype=dtype)
    ids = torch.as_tensor(spots.box_id[spots.mask])
    loss = ProfiledSpotLoss(ids, spots.n, target[torch.as_tensor(spots.mask)], weighting=weighting,
                            psf_sigma_px=psf_sigma_px, box_index=torch.as_tensor(spots.box_index()))
    bounds = {"N": [(2.0, 2000.0)] * 3, "mosaic": [(0.001, 2.0)]}
    steps = {"N": [1.0, 1.0, 1.0], "misset": [0.01, 0.01, 0.01], "mosaic": [0.01]}
    ref = Refiner(crystal, detector, beam, data, list(params), mask=spots.mask, loss=loss, dtype=dtype,
                  bounds={k: v for k, v in bounds.items() if k in params},
                  steps={k: v for k, v in steps.items() if k in params})
    pred0 = predict_positions(crystal, detector, beam, spots.hkl)
    settings = settings or RefineSettings(optimizer="lbfgs", lbfgs_steps=15)
    result = ref.run(settings, callback=callback)
    pred1 = predict_positions(result.crystal, result.detector, result.beam, spots.hkl)
    cen1 = model_centroids(result.crystal, result.detector, result.beam, pred1)
    extra = {"rmsd_dials_raw_px": rmsd(spots.cal_px, spots.obs_px),
             "rmsd_refined_profile_centroids_px": rmsd(cen1, spots.obs_mm_px)}
    wall = time.perf_counter() - t0
    return StillRefinement(result=result, spots=spots, pred_initial_px=pred0, pred_refined_px=pred1,
                           rmsd_dials=rmsd(spots.cal_mm_px, spots.obs_mm_px),
                           rmsd_initial=rmsd(pred0, spots.obs_mm_px), rmsd_refined=rmsd(pred1, spots.obs_mm_px),
                           n_pixels=int(spots.mask.sum()), wall_seconds=wall, extra=extra)


__all__ = ["parallax_shifts_px", "parallax_corrected_boxes", "model_centroids", "predict_positions", "dials_parallax_free_px", "decompress", "index_still", "raw_image", "select_spots", "SpotBoxes", "ProfiledSpotLoss",
           "profile_centroids", "rmsd", "refine_still", "StillRefinement", "THAUMATIN_SYMMETRY"]
