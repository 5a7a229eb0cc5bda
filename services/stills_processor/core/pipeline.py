"""The two DIALS workflows, in-process, on DIALS' Python API (no subprocesses, no log parsing).

Stills (one image of a file): import as a still (dxtbx ``ExperimentListFactory.from_filenames``,
then ``ImageSetFactory.imageset_from_anyset`` with scan and goniometer removed, as
``dials.import convert_sequences_to_stills=True`` does), spot finding
(``flex.reflection_table.from_observations(..., is_stills=True)``), indexing
(``Indexer.from_parameters`` with the ``sequences`` stills indexer and known symmetry), refinement
(``RefinerFactory.from_parameters_data_experiments``) and stills integration
(``ProfileModelFactory.create`` + ``reflection_table.from_predictions_multi`` + ``create_integrator``),
mirroring ``dials.stills_process``' ``Processor``.

Sequences (a rotation scan): ``from_observations``, ``dials.command_line.index.index``,
``dials.command_line.refine.run_dials_refine`` and ``dials.command_line.integrate.run_integration``
(the functional interfaces of the DIALS programs).

Every step's numbers (spot counts, cells, A matrices, RMSDs) are read from the DIALS objects.
"""
from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from libtbx import Auto

from diffractflow.errors import InputError

from .params import STRATEGIES, ProcessingSettings, sequence_params, stills_params
from .validation import QValidation, validate_q_vectors

# dxtbx and DIALS are imported inside the functions that use them: they take ~3 s (dxtbx) to ~4 s (DIALS'
# programs) to import, which `stills-processor --help`, `show` and parameter checks should not pay; the
# worker's pool imports them once per process before any image (batch.warm_up, run by _preload.py).

log = logging.getLogger("stills_processor.pipeline")

# statuses of one image (or one sequence)
INDEXED = "indexed"  # indexed, refined and integrated
NON_HIT = "non_hit"  # too few strong spots to try indexing (blank, or beam off)
FAILED = "failed"  # readable with spots, but indexing / refinement / integration failed
ERROR = "error"  # the file could not be read (corrupt, truncated, not an image)


class UnreadableImage(InputError):
    """An input file dxtbx cannot read (corrupt, truncated, unknown format): bad input, not a failure."""


@dataclass
class Outcome:
    """Result of one still or one sequence: summary numbers and the DIALS objects to save."""

    kind: str  # "still" | "sequence"
    status: str
    reason: str = ""
    n_spots: int = 0
    n_indexed: int = 0  # spots given a Miller index by the indexer
    n_refined: int = 0  # indexed spots kept by the final refinement (outliers removed)
    n_integrated: int = 0
    unit_cell: tuple[float, ...] | None = None
    space_group: str = ""
    A_matrix: np.ndarray | None = None  # 3x3, 1/Angstrom, lab frame at the goniometer datum
    rmsd_x_px: float = math.nan
    rmsd_y_px: float = math.nan
    rmsd_z: float = math.nan  # stills: DeltaPsi (deg); sequences: phi (deg)
    validation: QValidation | None = None
    timings: dict[str, float] = field(default_factory=dict)
    strategy: str = ""  # the processing strategy that produced this outcome (stills; see params.STRATEGIES)
    attempts: list[dict[str, str]] = field(default_factory=list)  # failed attempts before it: strategy, reason
    experiments: Any = None  # dxtbx ExperimentList (refined / integrated)
    strong: Any = None  # reflection tables
    indexed: Any = None
    integrated: Any = None


# ------------------------------------------------------------------------------------ import
def import_still(path: str, frame: int = 0):
    """One image of ``path`` as a still ExperimentList (no scan, no goniometer)."""
    # dxtbx (~2 s) and DIALS (~1.5 s more) only when an image is processed: the CLI imports this module
    from dxtbx.imageset import ImageSetFactory
    from dxtbx.model.experiment_list import Experiment, ExperimentList, ExperimentListFactory

    try:
        found = ExperimentListFactory.from_filenames([path], load_models=False)
    except Exception as exc:  # dxtbx raises various types for corrupt headers
        raise UnreadableImage(f"{path}: dxtbx cannot read it ({type(exc).__name__}: {exc})") from exc
    if len(found) == 0:
        raise UnreadableImage(f"{path}: not an image format dxtbx understands")
    imagesets = [ImageSetFactory.imageset_from_anyset(e.imageset) for e in found]
    offsets = np.cumsum([0] + [len(s) for s in imagesets])
    if not 0 <= frame < offsets[-1]:
        raise UnreadableImage(f"{path}: has {offsets[-1]} images, frame {frame} requested")
    k = int(np.searchsorted(offsets, frame, side="right") - 1)
    iset, j = imagesets[k], frame - int(offsets[k])
    one = iset[j : j + 1]
    one.set_scan(None, 0)
    one.set_goniometer(None, 0)
    expts = ExperimentList([Experiment(imageset=one, beam=one.get_beam(0), detector=one.get_detector(0))])
    _check_readable(expts, path)
    return expts


def import_sequence(paths: list[str]):
    """A rotation sequence from its image files (one ImageSequence)."""
    # dxtbx only when an image is processed (see import_still)
    from dxtbx.imageset import ImageSequence
    from dxtbx.model.experiment_list import ExperimentListFactory

    try:
        expts = ExperimentListFactory.from_filenames(list(paths))
    except Exception as exc:
        raise UnreadableImage(f"{paths[0]}...: dxtbx cannot read the sequence ({type(exc).__name__}: {exc})") from exc
    if len(expts) != 1 or not isinstance(expts[0].imageset, ImageSequence):
        raise UnreadableImage(f"{paths[0]}...: the {len(paths)} files do not form one rotation sequence")
    _check_readable(expts, paths[0])
    return expts


def _check_readable(expts, name: str) -> None:
    """Decode every image once, so a corrupt or truncated file fails here with its name."""
    iset = expts[0].imageset
    for i in range(len(iset)):
        try:
            data = iset.get_raw_data(i)
        except Exception as exc:
            path = iset.get_path(i) if hasattr(iset, "get_path") else name
            raise UnreadableImage(f"{path}: image data cannot be decoded ({type(exc).__name__}: {exc})") from exc
        if not data or any(d.size() == 0 for d in data):
            raise UnreadableImage(f"{name}: image {i} has no pixel data")


# ------------------------------------------------------------------------------- helpers
def _crystal_summary(out: Outcome, crystal) -> None:
    out.unit_cell = tuple(float(v) for v in crystal.get_unit_cell().parameters())
    out.space_group = str(crystal.get_space_group().info())
    out.A_matrix = np.array(crystal.get_A(), dtype=float).reshape(3, 3)


def _rmsds(refl, stills: bool) -> tuple[float, float, float]:
    """Unweighted RMSDs observed-predicted: x, y (px) and DeltaPsi or phi (deg)."""
    obs = np.array(refl["xyzobs.px.value"]).reshape(-1, 3)
    cal = np.array(refl["xyzcal.px"]).reshape(-1, 3)
    if len(obs) == 0:
        return math.nan, math.nan, math.nan
    rx = float(np.sqrt(np.mean((obs[:, 0] - cal[:, 0]) ** 2)))
    ry = float(np.sqrt(np.mean((obs[:, 1] - cal[:, 1]) ** 2)))
    if stills and "delpsical.rad" in refl:
        rz = float(np.degrees(np.sqrt(np.mean(np.array(refl["delpsical.rad"]) ** 2))))
    elif not stills:
        omm = np.array(refl["xyzobs.mm.value"]).reshape(-1, 3)
        cmm = np.array(refl["xyzcal.mm"]).reshape(-1, 3)
        rz = float(np.degrees(np.sqrt(np.mean((omm[:, 2] - cmm[:, 2]) ** 2))))
    else:
        rz = math.nan
    return rx, ry, rz


def _indexed_only(refl):
    """Rows with a Miller index assigned to a crystal (drops unindexed spots)."""
    sel = refl.get_flags(refl.flags.indexed) & (refl["miller_index"] != (0, 0, 0))
    sel &= refl["id"] >= 0
    return refl.select(sel) if sel.count(True) < len(refl) else refl


class _Timer:
    def __init__(self, out: Outcome):
        self.out = out

    def __call__(self, name: str):
        out = self.out

        class _T:
            def __enter__(self):
                self.t = time.perf_counter()

            def __exit__(self, *exc):
                out.timings[name] = time.perf_counter() - self.t

        return _T()


# ------------------------------------------------------------------------------- stills
class ProfileTooWide(RuntimeError):
    """The stills profile model's sigma_b is at or above the cut-off (DIALS rejects such a still)."""

    def __init__(self, sigma_b: float, cutoff: float):
        super().__init__(f"profile sigma_b {sigma_b:.3f} deg >= cutoff {cutoff}")
        self.sigma_b, self.cutoff = sigma_b, cutoff


_STRATEGY_PARAMS: dict[tuple, Any] = {}


def _params_for(settings: ProcessingSettings, strategy: str):
    """Working parameters of one strategy, built once per process (PHIL parsing costs seconds)."""
    key = (settings, strategy)
    if key not in _STRATEGY_PARAMS:
        _STRATEGY_PARAMS[key] = stills_params(settings, strategy)
    return copy.deepcopy(_STRATEGY_PARAMS[key])


def process_still(path: str, frame: int, settings: ProcessingSettings, params=None) -> Outcome:
    """Import, find spots, index, refine, integrate and validate one still image.

    The strategies of ``settings.strategies`` are tried in order (``params``, if given, are the first
    strategy's parameters) until one gives an integrated still whose q-vector validation passes; each
    failed attempt is kept in ``Outcome.attempts`` with its reason and ``Outcome.strategy`` names the one
    that worked. A profile wider than DIALS' ``sigma_b_cutoff`` but below
    ``settings.relaxed_sigma_b_cutoff`` is integrated at once (strategy ``<name>+relaxed_profile``).
    Too few spots with the first strategy is a non-hit (no cascade: blank images stay cheap). If no
    strategy passes validation, the first indexed-but-unvalidated result is returned.

    Raises :class:`UnreadableImage` for a file that cannot be read; every other failure is
    returned as an Outcome with status ``non_hit`` / ``failed`` and a reason.
    """
    t_import = time.perf_counter()
    expts = import_still(path, frame)
    t_import = time.perf_counter() - t_import
    names = settings.strategies or ("default",)
    attempts: list[dict[str, str]] = []
    first_spots = None  # the first strategy's spots, reused by strategies that keep spot finding
    unvalidated: Outcome | None = None
    out = Outcome(kind="still", status=FAILED)
    unvalidated_attempts: list[dict[str, str]] = []
    for k, name in enumerate(names):
        if k > 0 and not STRATEGIES[name].spots and first_spots is None:
            attempts.append({"strategy": name, "reason": "skipped: reuses the first strategy's spots, which failed"})
            continue
        p = params if (k == 0 and params is not None) else _params_for(settings, name)
        out = _attempt_still(expts, p, settings, name, None if (k == 0 or STRATEGIES[name].spots) else first_spots)
        out.timings["import"] = t_import
        if k == 0:
            first_spots = out.strong if out.n_spots else None
            if out.status == NON_HIT:
                return out
        if out.status == INDEXED and out.validation is not None and out.validation.passed:
            out.attempts = attempts + out.attempts
            return out
        if out.status == INDEXED:
            if unvalidated is None:
                unvalidated, unvalidated_attempts = out, attempts + out.attempts
            attempts.append({"strategy": out.strategy, "reason": (
                "q-vector validation failed (median |dq| %.2g 1/A, median offset %.2f px)"
                % (out.validation.q_median, out.validation.px_median))})
        else:
            attempts.append({"strategy": out.strategy or name, "reason": out.reason})
    if unvalidated is not None:
        unvalidated.attempts = unvalidated_attempts
        return unvalidated
    out.attempts = attempts
    if len(attempts) > 1:
        out.reason = "; ".join(f"{a['strategy']}: {a['reason']}" for a in attempts)
    return out


def _attempt_still(expts, params, settings: ProcessingSettings, strategy: str, strong=None) -> Outcome:
    """One strategy on one imported still (spots given by ``strong`` are reused, not found again)."""
    # DIALS only when an image is processed (see import_still)
    from dials.algorithms.indexing.indexer import Indexer
    from dials.array_family import flex

    out = Outcome(kind="still", status=FAILED, strategy=strategy)
    out.experiments = expts
    timer = _Timer(out)
    if strong is None:
        try:
            with timer("find_spots"):
                strong = flex.reflection_table.from_observations(expts, params, is_stills=True)
        except Exception as exc:  # e.g. "number of strong pixels ... greater than the maximum allowed"
            out.reason = f"spot finding failed: {_msg(exc)}"
            return out
    out.strong = strong
    out.n_spots = len(strong)
    if out.n_spots < settings.min_spots:
        out.status = NON_HIT
        out.reason = f"too few strong spots to index ({out.n_spots} < {settings.min_spots})"
        return out

    try:
        with timer("index"):
            idxr = Indexer.from_parameters(strong, expts, params=params)
            idxr.index()
    except Exception as exc:
        out.reason = f"indexing failed: {_msg(exc)}"
        return out
    experiments, indexed = idxr.refined_experiments, _indexed_only(idxr.refined_reflections)
    if len(experiments) > 1:  # keep the lattice with the most spots (max_lattices > 1 requested)
        counts = [int((indexed["id"] == i).count(True)) for i in range(len(experiments))]
        best = int(np.argmax(counts))
        # dxtbx (see import_still)
        from dxtbx.model.experiment_list import ExperimentList

        indexed = indexed.select(indexed["id"] == best)
        indexed["id"] = flex.int(len(indexed), 0)
        experiments = ExperimentList([experiments[best]])
        indexed.experiment_identifiers()[0] = experiments[0].identifier
        for k in list(indexed.experiment_identifiers().keys()):
            if k != 0:
                del indexed.experiment_identifiers()[k]

    out.n_indexed = len(indexed)
    try:
        with timer("refine"):
            experiments, indexed = _refine(params, experiments, indexed)
    except Exception as exc:
        out.reason = f"refinement failed: {_msg(exc)}"
        return out
    out.experiments, out.indexed = experiments, indexed
    out.n_refined = len(indexed)
    _crystal_summary(out, experiments[0].crystal)
    out.rmsd_x_px, out.rmsd_y_px, out.rmsd_z = _rmsds(indexed, stills=True)
    with timer("validate"):
        out.validation = validate_q_vectors(experiments[0], indexed, settings.q_tolerance, settings.px_tolerance)

    try:
        with timer("integrate"):
            try:
                experiments, integrated = _integrate_stills(params, experiments, indexed)
            except ProfileTooWide as wide:
                relaxed = settings.relaxed_sigma_b_cutoff
                if relaxed is None or wide.sigma_b >= relaxed:
                    raise
                out.attempts.append({"strategy": strategy, "reason": f"integration failed: {wide}"})
                out.strategy = f"{strategy}+relaxed_profile"
                experiments, integrated = _integrate_stills(params, experiments, indexed, sigma_b_cutoff=relaxed)
    except Exception as exc:
        out.reason = f"integration failed: {_msg(exc) if not isinstance(exc, ProfileTooWide) else exc}"
        return out
    out.experiments, out.integrated = experiments, integrated
    out.n_integrated = int(integrated.get_flags(integrated.flags.integrated_sum).count(True))
    out.status, out.reason = INDEXED, ""
    return out


def _refine(params, experiments, indexed):
    """Static refinement of the indexed still (``RefinerFactory``); updates predictions."""
    # DIALS (see import_still)
    from dials.algorithms.refinement import RefinerFactory

    refiner = RefinerFactory.from_parameters_data_experiments(params, indexed, experiments)
    refiner.run()
    experiments = refiner.get_experiments()
    predicted = refiner.predict_for_indexed()
    for col in ("xyzcal.mm", "xyzcal.px", "delpsical.rad", "s1", "entering"):
        if col in predicted:
            indexed[col] = predicted[col]
    indexed = indexed.select(refiner.selection_used_for_refinement())
    return experiments, indexed


def _integrate_stills(params, experiments, indexed, sigma_b_cutoff: float | None = None):
    """Stills integration as ``dials.stills_process`` does it (summation, simple background).

    ``sigma_b_cutoff`` (deg) replaces the parameters' cut-off; :class:`ProfileTooWide` if exceeded."""
    # DIALS (see import_still)
    from dials.algorithms.integration.integrator import create_integrator
    from dials.algorithms.profile_model.factory import ProfileModelFactory
    from dials.array_family import flex
    from dials.command_line.integrate import process_reference

    reference, _ = process_reference(indexed.copy())
    experiments = ProfileModelFactory.create(params, experiments, reference)
    cutoff = sigma_b_cutoff if sigma_b_cutoff is not None else params.profile.gaussian_rs.parameters.sigma_b_cutoff
    if cutoff is not None and experiments[0].profile.sigma_b() >= cutoff:
        raise ProfileTooWide(float(experiments[0].profile.sigma_b()), cutoff)
    predicted = flex.reflection_table.from_predictions_multi(
        experiments,
        dmin=params.prediction.d_min,
        dmax=params.prediction.d_max,
        margin=params.prediction.margin,
        force_static=params.prediction.force_static,
    )
    predicted.match_with_reference(reference)
    integrator = create_integrator(params, experiments, predicted)
    integrated = integrator.integrate()
    if params.integration.debug.delete_shoeboxes and "shoebox" in integrated:
        del integrated["shoebox"]
    return experiments, integrated


# ----------------------------------------------------------------------------- sequences
def process_sequence(paths: list[str], settings: ProcessingSettings) -> Outcome:
    """Import, find spots, index, refine and (unless ``settings.integrate_sequences`` is False) integrate
    a rotation scan.

    Refinement as dials.refine: static, then a scan-varying macrocycle (``settings.scan_varying`` None or
    True), or static only (False). A ``refinement.parameterisation.scan_varying`` given in ``settings.phil``
    wins over ``settings.scan_varying``.
    """
    # DIALS and dxtbx only when a sequence is processed (see import_still)
    from dials.array_family import flex
    from dials.command_line.index import index
    from dials.command_line.integrate import run_integration
    from dials.command_line.refine import run_dials_refine
    from dxtbx.model.experiment_list import ExperimentList

    p = sequence_params(settings)
    if settings.scan_varying is not None and not any("scan_varying" in a for a in settings.phil):
        # dials.refine's Auto = a static macrocycle, then a scan-varying one
        p.refine.refinement.parameterisation.scan_varying = Auto if settings.scan_varying else False
    out = Outcome(kind="sequence", status=FAILED)
    timer = _Timer(out)
    with timer("import"):
        expts = import_sequence(paths)
    out.experiments = expts
    with timer("find_spots"):
        strong = flex.reflection_table.from_observations(expts, p.find_spots)
    out.strong = strong
    out.n_spots = len(strong)
    if out.n_spots < settings.min_spots:
        out.status = NON_HIT
        out.reason = f"too few strong spots to index ({out.n_spots} < {settings.min_spots})"
        return out
    try:
        with timer("index"):
            experiments, indexed = index(expts, [strong], p.index)
    except Exception as exc:
        out.reason = f"indexing failed: {_msg(exc)}"
        return out
    if len(experiments) > 1:
        keep = int(np.argmax([int((indexed["id"] == i).count(True)) for i in range(len(experiments))]))
        indexed = indexed.select(indexed["id"] == keep)
        indexed["id"] = flex.int(len(indexed), 0)
        experiments = ExperimentList([experiments[keep]])
        indexed.experiment_identifiers()[0] = experiments[0].identifier
        for k in list(indexed.experiment_identifiers().keys()):
            if k != 0:
                del indexed.experiment_identifiers()[k]
    indexed = _indexed_only(indexed)
    out.n_indexed = len(indexed)
    try:
        with timer("refine"):
            experiments, refined, _refiner, _history = run_dials_refine(experiments, indexed, p.refine)
    except Exception as exc:
        out.reason = f"refinement failed: {_msg(exc)}"
        return out
    refined = _indexed_only(refined)
    out.experiments, out.indexed = experiments, refined
    out.n_refined = len(refined)
    _crystal_summary(out, experiments[0].crystal)
    out.rmsd_x_px, out.rmsd_y_px, out.rmsd_z = _rmsds(refined, stills=False)
    with timer("validate"):
        out.validation = validate_q_vectors(experiments[0], refined, settings.q_tolerance, settings.px_tolerance)
    if not settings.integrate_sequences:
        out.status, out.reason = INDEXED, ""
        return out
    try:
        with timer("integrate"):
            experiments, integrated, _report = run_integration(p.integrate, experiments, reference=refined)
    except Exception as exc:
        out.reason = f"integration failed: {_msg(exc)}"
        return out
    if "shoebox" in integrated:
        del integrated["shoebox"]
    out.experiments, out.integrated = experiments, integrated
    out.n_integrated = int(integrated.get_flags(integrated.flags.integrated_sum).count(True))
    out.status, out.reason = INDEXED, ""
    return out


def _msg(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}"[:500] if text else type(exc).__name__
